//! Congestion control for long, lossy links: `vmr`, vmreplica's own controller, and the
//! memory of paths that lets a new connection start where the last one left off.
//!
//! # Why our own
//! A loss-based controller (cubic, newreno) halves its window on every loss, so on a 100 ms
//! path with 0.5% random loss it cannot get past a few Mbit/s, whatever the link (the Mathis
//! bound). quinn's experimental BBR ignores random loss but keeps twice the BDP in flight plus
//! its ack-aggregation estimate, which overfills a one-BDP bottleneck queue: it sent 2.2-2.7
//! datagrams per one delivered in `benches/wan.sh`.
//!
//! # The model (in the way of BBR v1 / v3)
//! - **Bottleneck bandwidth**: the windowed maximum (12 rounds) of per-round delivery rates,
//!   bytes acknowledged in a round / the round's duration. A round ends when a packet sent
//!   after it began is acknowledged; quinn's `on_ack` hands us each packet's send time, so
//!   rounds need no per-packet state. Rounds the application left idle only count if they
//!   raise the estimate.
//! - **RTT floor**: the lowest `ack time - send time` of any packet (that includes the peer's
//!   ACK delay; the lowest of many does not). A sample within 1/32 (or 1 ms) of it confirms
//!   it; with none for 5 s (the queue never drained: other flows, or our estimates adding up
//!   to more than the link), `ProbeRtt` measures it again, keeping what it finds, so a path
//!   that got longer is learnt too.
//! - **Random-loss level**: the loss rate of datagrams sent while less than a BDP was in
//!   flight (they cannot have overflowed a queue of ours): startup before its queue forms,
//!   the drain of each probe cycle, `ProbeRtt`. A prior of 1% weighs as 100 datagrams; the
//!   level is learnt up to 10%.
//!
//! # The window
//! quinn 0.11 lets a controller set only the window; it paces at 1.25 x window / smoothed RTT.
//! So the window is the in-flight cap: `target = gain x bandwidth x RTT floor (+ the
//! ack-aggregation allowance, BBR's "extra acked", at most 10% of the RTT floor at the
//! bottleneck rate)`, capped by `inflight_hi`. Phases:
//! - `Startup`: the window grows by 3/4 of what is acknowledged (x1.75 a round; x1.25 once RTT
//!   samples show half the queue threshold) until 8 RTT samples in a row see a queue (the
//!   floor + 25%, at least 2 ms), the bandwidth stopped growing for 3 rounds with data
//!   waiting, or a round is congested. Then `Down`. (Doubling overflows a one-BDP buffer:
//!   the queue is seen a round late.) Samples taken while the application had nothing to send
//!   do not count: a lone datagram's ACK waits for the peer's ACK delay.
//! - `Resume`: a remembered path (see [`PathBook`]): half its BDP, then all of it, each as
//!   long as no 8 samples in a row see a queue; then `Cruise` with the remembered bandwidth. A
//!   queue or a congested round falls back to `Startup` at half the window, within a round.
//! - Probe cycle: `Down` (0.9 BDP until in flight is that low, at most 2 rounds: drains this
//!   flow's queue, so the RTT floor is seen again), `Cruise` (1.2 BDP for 4 to 8 rounds, at
//!   random so flows desynchronise: the 0.2 is headroom for bunched ACKs and all the standing
//!   queue this flow builds), `Up` (1.5 BDP for two rounds, one to fill, one to measure; more
//!   while `inflight_hi` holds it back). While the link has room a cruise round delivers 1.2x
//!   the estimate, which then grows 20% a round; while it is full, a probe gains most share
//!   for the smallest flow, which pulls competing flows towards equal shares.
//! - `ProbeRtt`: half a BDP for 200 ms and at least a round (see above). Flows sharing a
//!   queue synchronise on it: each sees the others' probe as a new floor sample.
//! - Pacing headroom: on a busy host quinn's pacer (bursts of 2 ms worth, refilled on timers)
//!   falls short of 1.25 x window / RTT and in flight stays under the target. A cruise round
//!   whose mean in flight is under 92% of the target raises the window 8% above it (up to
//!   1.6x, and 1.75 BDP at most); one over the target lowers it again.
//!
//! # What it reacts to
//! A round is **congested** when its loss rate is above `max(2 x level, level + 1%)`, with at
//! least 3 datagrams lost and more than random loss at the level would plausibly give in a
//! round that size (mean + 3 sigma + 1), *and* its mean RTT is inflated (a queue
//! overflowing); or when that high loss lasts two rounds (a policer, a shallow buffer); or on
//! an ECN mark. Then `inflight_hi` = 0.8 x the round's in-flight peak, and `Down`. Random loss
//! at the learnt level does nothing. `inflight_hi` grows again only while probing (1, 2, 4, ...
//! datagrams a round), so a loss-based flow sharing the link regrows its window meanwhile.
//! Persistent congestion (quinn: every packet for several PTOs lost) restarts from `Startup`,
//! keeping only the RTT floor.
//!
//! # Approximations (from what quinn's trait gives)
//! - Delivery rate per round, not per packet: bunched ACKs average out over a round, at the
//!   price of reacting a round later than BBR's per-packet samples.
//! - quinn reports losses once per batch, with the send time of the newest one lost: the whole
//!   batch is classed (sent below or above a BDP) by that time, and counts in the round that
//!   is running when it is reported.
//! - In flight at send time is tracked from `on_end_acks` (exact) plus `on_sent` since; the
//!   below/above-BDP history keeps its last 256 changes.
//! - `app_limited` is quinn's flag at ACK time (the connection had nothing to send), not a
//!   mark on each packet sent while idle.
//!
//! # Known limits
//! In a very shallow bottleneck buffer (a tenth of a BDP) there is no queue to see: overflow
//! shows only as loss two rounds in a row, `vmr` sends up to ~9% more than it delivers, and a
//! cubic flow sharing that buffer gets little (as beside BBR).

mod filter;
mod vmr;

#[cfg(test)]
mod quic_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

pub use vmr::{Params, PathHint, Phase, Vmr};

/// How long a remembered path is trusted.
const PATH_MAX_AGE: Duration = Duration::from_secs(30 * 60);

/// How often a connection updates its path's record.
const PATH_STORE_EVERY: Duration = Duration::from_millis(250);

/// What the connections of one endpoint learnt about their paths, by remote address.
#[derive(Clone, Debug, Default)]
pub struct PathBook {
    paths: Arc<Mutex<HashMap<SocketAddr, (PathHint, Instant)>>>,
}

impl PathBook {
    /// The remembered path to `remote`, if it is recent.
    pub fn get(&self, remote: SocketAddr, now: Instant) -> Option<PathHint> {
        let paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        paths
            .get(&remote)
            .filter(|(_, at)| now.saturating_duration_since(*at) <= PATH_MAX_AGE)
            .map(|(h, _)| *h)
    }

    pub fn put(&self, remote: SocketAddr, hint: PathHint, now: Instant) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        paths.insert(remote, (hint, now));
    }
}

/// Builds `vmr` controllers for quinn; with a path (book and remote address) each
/// controller starts from that path's record and keeps it up to date.
#[derive(Clone, Debug, Default)]
pub struct VmrConfig {
    pub params: Params,
    pub path: Option<(PathBook, SocketAddr)>,
}

impl ControllerFactory for VmrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let hint = self.path.as_ref().and_then(|(b, r)| b.get(*r, now));
        if let Some(h) = hint {
            tracing::debug!(
                bw_mbit = h.bw * 8 / 1_000_000,
                min_rtt_ms = h.min_rtt.as_millis() as u64,
                "congestion: starting from the remembered path"
            );
        }
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Box::new(VmrController {
            core: Vmr::new(self.params, now, current_mtu, hint, seed),
            path: self.path.clone(),
            stored: None,
        })
    }
}

/// The quinn adapter: forwards to [`Vmr`] and records the path.
#[derive(Clone, Debug)]
struct VmrController {
    core: Vmr,
    path: Option<(PathBook, SocketAddr)>,
    stored: Option<Instant>,
}

impl Controller for VmrController {
    fn on_sent(&mut self, now: Instant, bytes: u64, _last_packet_number: u64) {
        self.core.on_sent(now, bytes);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        self.core.on_ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        let before = self.core.phase();
        self.core.on_end_acks(now, in_flight, app_limited);
        if self.core.phase() != before {
            tracing::debug!(
                phase = ?self.core.phase(),
                why = self.core.why(),
                cwnd = self.core.window(),
                pace_boost = self.core.pace_boost(),
                in_flight,
                bw_mbit = self.core.bandwidth().unwrap_or(0) as f64 * 8e-6,
                min_rtt_ms = self.core.min_rtt().unwrap_or_default().as_secs_f64() * 1e3,
                loss_level = self.core.loss_baseline(),
                rounds = self.core.rounds(),
                congestion_events = self.core.congestion_events(),
                "congestion: vmr phase"
            );
        }
        if let Some((book, remote)) = &self.path {
            if self
                .stored
                .is_none_or(|t| now.saturating_duration_since(t) >= PATH_STORE_EVERY)
            {
                if let Some(h) = self.core.path_hint() {
                    book.put(*remote, h, now);
                    self.stored = Some(now);
                }
            }
        }
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.core
            .on_loss(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.core.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.core.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.core.window();
        m.pacing_rate = self.core.bandwidth().map(|b| b * 8);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.core.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
