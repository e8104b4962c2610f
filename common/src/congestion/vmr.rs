//! The `vmr` controller's state machine: a model of the path (bottleneck bandwidth, minimum
//! RTT, the random-loss level) and the in-flight cap derived from it. Pure: events in (sent,
//! acked, lost, with the time passed in), a window out; no clock, no I/O. The quinn adapter and
//! the design notes are in the parent module.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::filter::WindowedMax;

/// The controller's constants. `Default` holds the tuned values; tests vary them.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// In-flight cap while cruising, in bandwidth-delay products: the headroom over 1.0 keeps
    /// the link busy through delayed and bunched acknowledgements and is the standing queue
    /// this flow builds (0.2 BDP at most, drained once per probe cycle).
    pub cruise_gain: f64,
    /// Multiplier over the cruise cap while probing for more bandwidth (two rounds).
    pub up_gain: f64,
    /// In-flight cap while draining the queue once per cycle (lets the RTT fall to its floor).
    pub down_gain: f64,
    /// Cruise rounds per probe cycle: uniformly random in this range (flows desynchronise).
    pub cruise_rounds: (u32, u32),
    /// A round's RTT counts as inflated (a queue is growing) above min_rtt by this fraction of
    /// min_rtt, and at least by `queue_floor`.
    pub queue_frac: f64,
    pub queue_floor: Duration,
    /// Multiplicative decrease of the in-flight cap on a congested round.
    pub beta: f64,
    /// A round's loss counts as high above max(2 x level, level + this), where the level is the
    /// random-loss rate learnt from packets sent while this flow's in-flight was below its
    /// BDP (they cannot have overflowed a queue of its making).
    pub loss_margin: f64,
    /// The random-loss level assumed before measuring, weighted as `loss_prior_packets`
    /// datagrams' worth of samples.
    pub loss_prior: f64,
    pub loss_prior_packets: u64,
    /// The level's memory: its samples are halved past this many datagrams.
    pub loss_window_packets: u64,
    /// The random-loss level is learnt up to this rate; more than that is never "normal".
    pub loss_base_max: f64,
    /// Bottleneck bandwidth filter window, in rounds (covers one probe cycle and then some).
    pub bw_window_rounds: u64,
    /// Without an RTT sample near the floor for this long (the queue never drained: another
    /// flow keeps it up, or our bandwidth estimates add up to more than the link), probe the
    /// floor: `ProbeRtt`.
    pub probe_rtt_interval: Duration,
    /// How long `ProbeRtt` holds its reduced window (at least one round).
    pub probe_rtt_time: Duration,
    /// `ProbeRtt`'s window, in BDPs.
    pub probe_rtt_gain: f64,
    /// Window before the first measurement, bytes.
    pub initial_window: u64,
    /// quinn paces at 1.25 x window / smoothed RTT in bursts of 2 ms worth, refilled on
    /// timers: on a busy host (late timers) that delivers less, and the in-flight target is
    /// not reached though the window allows it. While cruising, a round whose mean in flight
    /// stays below 92% of the target raises the window by 8% above the target (up to this
    /// factor); one above the target lowers it again.
    pub pace_boost_max: f64,
    /// The allowance for bunched acknowledgements (BBR's "extra acked") is capped at this
    /// fraction of min RTT at the bottleneck rate, but allows at least `aggregation_floor` and
    /// at most `aggregation_max`.
    pub aggregation_frac: f64,
    pub aggregation_floor: Duration,
    pub aggregation_max: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            cruise_gain: 1.2,
            up_gain: 1.25,
            down_gain: 0.9,
            cruise_rounds: (4, 8),
            queue_frac: 0.25,
            queue_floor: Duration::from_millis(2),
            beta: 0.8,
            loss_margin: 0.01,
            loss_prior: 0.01,
            loss_prior_packets: 100,
            loss_window_packets: 8000,
            loss_base_max: 0.10,
            bw_window_rounds: 12,
            probe_rtt_interval: Duration::from_secs(5),
            probe_rtt_time: Duration::from_millis(200),
            probe_rtt_gain: 0.5,
            initial_window: 14720,
            pace_boost_max: 1.6,
            aggregation_frac: 0.1,
            aggregation_floor: Duration::from_millis(5),
            aggregation_max: Duration::from_millis(25),
        }
    }
}

/// What a connection learnt about its path, for the next connection to start from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathHint {
    /// Bottleneck bandwidth this connection achieved, bytes/s.
    pub bw: u64,
    pub min_rtt: Duration,
    /// Random-loss level (fraction of bytes).
    pub loss: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Growing the window x1.75 a round until the queue grows, the bandwidth stops growing or
    /// loss says the path is congested.
    Startup,
    /// Starting from a remembered path: half its BDP, then all of it, as long as the RTT
    /// stays at its floor; anything else falls back to `Startup`.
    Resume {
        step: u8,
    },
    /// Draining the queue (after startup, after congestion, and once per probe cycle).
    Down,
    Cruise,
    /// Probing for more bandwidth.
    Up,
    /// Half the BDP in flight for 200 ms and a round, so that the RTT floor is measured again.
    ProbeRtt,
}

#[derive(Clone, Debug, Default)]
struct Round {
    acked: u64,
    lost: u64,
    rtt_min: Option<Duration>,
    rtt_sum: Duration,
    rtt_n: u32,
    app_limited: bool,
    max_inflight: u64,
    /// In flight before each batch of ACKs, summed, and the batches.
    inflight_sum: f64,
    inflight_n: u32,
    ecn: bool,
}

/// RTT samples in a row above the inflation threshold that end startup.
const QUEUE_STREAK: u32 = 8;

/// A boosted window (see `Params::pace_boost_max`) stays below this many BDPs.
const BOOSTED_MAX: f64 = 1.75;

/// In-flight level changes remembered (a few per probe cycle; a few RTTs' worth).
const LEVELS_KEPT: usize = 256;

/// One connection's controller state.
#[derive(Clone, Debug)]
pub struct Vmr {
    p: Params,
    mtu: u64,
    phase: Phase,
    why: &'static str,
    phase_round: u64,
    phase_rounds: u32,
    startup_cwnd: u64,
    cwnd: u64,
    /// The in-flight target the window aims at (before `pace_boost`), and what the model
    /// alone would aim at (before `inflight_hi`).
    target: u64,
    uncapped: u64,
    /// Window over target while cruising or probing (see `Params::pace_boost_max`).
    pace_boost: f64,
    bw: WindowedMax,
    min_rtt: Option<Duration>,
    /// When an RTT sample last came near `min_rtt`.
    min_rtt_seen: Instant,
    /// `ProbeRtt`: the lowest RTT since it began, and when it ends.
    probe_min: Option<Duration>,
    probe_until: Option<Instant>,
    extra_acked: WindowedMax,
    agg_start: Option<Instant>,
    agg_bytes: u64,
    round: u64,
    round_start: Instant,
    round_done: bool,
    r: Round,
    batch_acked: u64,
    /// Consecutive RTT samples that saw a queue, or half of one.
    queue_streak: u32,
    early_streak: u32,
    /// Startup grows by a quarter per round instead of three quarters.
    startup_gentle: bool,
    prev_high_loss: bool,
    /// Bytes acknowledged and lost of datagrams sent while in flight was below the BDP.
    low_acked: f64,
    low_lost: f64,
    loss_prior: f64,
    /// In flight as last reported, plus what was sent since.
    in_flight: u64,
    /// When in flight went above the BDP (true) or below it (false), oldest first.
    levels: VecDeque<(Instant, bool)>,
    inflight_hi: u64,
    hi_growth: u64,
    full_bw: u64,
    full_bw_rounds: u32,
    hint: Option<PathHint>,
    resume_delivered: u64,
    rng: u64,
    congestion_events: u64,
}

impl Vmr {
    /// A fresh controller; `hint` (a remembered path) starts it in `Resume`, `seed` drives the
    /// random cruise lengths.
    pub fn new(p: Params, now: Instant, mtu: u16, hint: Option<PathHint>, seed: u64) -> Vmr {
        let mtu = u64::from(mtu).max(1200);
        let initial = p.initial_window.max(2 * mtu);
        let mut v = Vmr {
            p,
            mtu,
            phase: Phase::Startup,
            why: "new connection",
            phase_round: 0,
            phase_rounds: 0,
            startup_cwnd: initial,
            cwnd: initial,
            target: initial,
            uncapped: initial,
            pace_boost: 1.0,
            bw: WindowedMax::new(p.bw_window_rounds),
            min_rtt: None,
            min_rtt_seen: now,
            probe_min: None,
            probe_until: None,
            extra_acked: WindowedMax::new(10),
            agg_start: None,
            agg_bytes: 0,
            round: 0,
            round_start: now,
            round_done: false,
            r: Round::default(),
            batch_acked: 0,
            queue_streak: 0,
            early_streak: 0,
            startup_gentle: false,
            prev_high_loss: false,
            low_acked: 0.0,
            low_lost: 0.0,
            loss_prior: p.loss_prior,
            in_flight: 0,
            levels: VecDeque::from([(now, false)]),
            inflight_hi: u64::MAX,
            hi_growth: mtu,
            full_bw: 0,
            full_bw_rounds: 0,
            hint: None,
            resume_delivered: 0,
            rng: seed | 1,
            congestion_events: 0,
        };
        if let Some(h) = hint.filter(|h| h.bw > 0 && !h.min_rtt.is_zero()) {
            v.hint = Some(h);
            v.loss_prior = h.loss.clamp(0.0, p.loss_base_max);
            v.phase = Phase::Resume { step: 0 };
            v.startup_cwnd = (bdp(h.bw, h.min_rtt) / 2).max(initial);
        }
        v.update_cwnd();
        v
    }

    pub fn window(&self) -> u64 {
        self.cwnd
    }

    /// The window before the first measurement.
    pub fn initial_window(&self) -> u64 {
        self.p.initial_window.max(2 * self.mtu)
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Why the controller entered its current phase (for logs).
    pub fn why(&self) -> &'static str {
        self.why
    }

    /// Bottleneck bandwidth estimate, bytes/s.
    pub fn bandwidth(&self) -> Option<u64> {
        self.bw.get()
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The random-loss level: the loss rate of datagrams sent while in flight was below the
    /// BDP, blended with the prior.
    pub fn loss_baseline(&self) -> f64 {
        let k = (self.p.loss_prior_packets * self.mtu) as f64;
        let b = (self.low_lost + self.loss_prior * k) / (self.low_acked + self.low_lost + k);
        b.min(self.p.loss_base_max)
    }

    /// Whether a datagram sent at `sent` left with more than a BDP in flight (unknown: yes).
    fn sent_high(&self, sent: Instant) -> bool {
        let i = self.levels.partition_point(|(t, _)| *t <= sent);
        i == 0 || self.levels[i - 1].1
    }

    /// Rounds completed so far (a round: one flight sent and acknowledged).
    pub fn rounds(&self) -> u64 {
        self.round
    }

    /// Congested rounds the controller reacted to.
    pub fn congestion_events(&self) -> u64 {
        self.congestion_events
    }

    /// What a later connection over the same path may start from, once the model is complete.
    pub fn path_hint(&self) -> Option<PathHint> {
        if matches!(self.phase, Phase::Startup | Phase::Resume { .. }) {
            return None;
        }
        Some(PathHint {
            bw: self.bw.get()?,
            min_rtt: self.min_rtt()?,
            loss: self.loss_baseline(),
        })
    }

    fn min_window(&self) -> u64 {
        4 * self.mtu
    }

    fn bdp(&self) -> Option<u64> {
        Some(bdp(self.bw.get()?, self.min_rtt()?))
    }

    /// The RTT above which a queue counts as building.
    fn inflated_rtt(&self, min_rtt: Duration) -> Duration {
        min_rtt + min_rtt.mul_f64(self.p.queue_frac).max(self.p.queue_floor)
    }

    fn loss_threshold(&self) -> f64 {
        let b = self.loss_baseline();
        (2.0 * b).max(b + self.p.loss_margin)
    }

    fn random_cruise(&mut self) -> u32 {
        // xorshift64: cheap, and a flow only needs to differ from its neighbours.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let (lo, hi) = self.p.cruise_rounds;
        lo + (self.rng % u64::from(hi.saturating_sub(lo) + 1)) as u32
    }

    fn enter(&mut self, phase: Phase, why: &'static str) {
        self.phase = phase;
        self.why = why;
        self.phase_round = self.round;
        self.phase_rounds = match phase {
            Phase::Cruise => self.random_cruise(),
            Phase::Up => 2,
            Phase::Down => 2,
            _ => 0,
        };
        if phase == Phase::Startup {
            self.pace_boost = 1.0;
            self.full_bw = 0;
            self.full_bw_rounds = 0;
            self.startup_gentle = false;
        }
        self.update_cwnd();
    }

    /// Packets were sent: note whether they left with more than a BDP in flight.
    pub fn on_sent(&mut self, now: Instant, bytes: u64) {
        self.in_flight += bytes;
        // Startup counts as below the BDP until it sees a queue: its losses up to then are
        // random (or an overflow, which ends startup and discards them).
        let high = match self.phase {
            Phase::Startup => self.startup_gentle,
            _ => self.bdp().is_none_or(|b| self.in_flight > b),
        };
        if self.levels.back().is_none_or(|(_, h)| *h != high) {
            if self.levels.len() >= LEVELS_KEPT {
                self.levels.pop_front();
            }
            self.levels.push_back((now, high));
        }
    }

    /// One packet sent at `sent` was acknowledged at `now`.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        let rtt = now.saturating_duration_since(sent);
        if !rtt.is_zero() {
            match self.min_rtt {
                Some(m) if rtt > m => {
                    // Near the floor (within 1/32 or 1 ms): the floor still holds.
                    if rtt <= m + (m / 32).max(Duration::from_millis(1)) {
                        self.min_rtt_seen = now;
                    }
                }
                _ => {
                    self.min_rtt = Some(rtt);
                    self.min_rtt_seen = now;
                }
            }
            if self.phase == Phase::ProbeRtt {
                self.probe_min = Some(self.probe_min.map_or(rtt, |m| m.min(rtt)));
            }
            self.r.rtt_min = Some(self.r.rtt_min.map_or(rtt, |m| m.min(rtt)));
            self.r.rtt_sum += rtt;
            self.r.rtt_n += 1;
            self.track_queue(rtt, app_limited);
        }
        self.r.acked += bytes;
        self.batch_acked += bytes;
        if !self.sent_high(sent) {
            self.low_acked += bytes as f64;
        }
        self.r.app_limited |= app_limited;
        if sent >= self.round_start {
            self.round_done = true;
        }
        match self.phase {
            Phase::Startup if !app_limited => {
                // x1.75 a round until a queue starts to form, then x1.25: the queue is seen a
                // round late (doubling would by then have put two BDPs in flight: a one-BDP
                // buffer overflows).
                self.startup_cwnd += if self.startup_gentle {
                    bytes / 4
                } else {
                    bytes * 3 / 4
                }
            }
            Phase::Resume { .. } => self.resume_delivered += bytes,
            _ => {}
        }
    }

    /// Streaks of RTT samples that saw a queue (see [`Vmr::check_queue`]). Samples taken
    /// while the application had nothing to send do not count: a lone datagram's ACK waits for
    /// the peer's ACK delay (up to 25 ms), which is no queue.
    fn track_queue(&mut self, rtt: Duration, app_limited: bool) {
        if app_limited {
            self.queue_streak = 0;
            self.early_streak = 0;
            return;
        }
        let floor = self.min_rtt.unwrap_or(rtt);
        if rtt > self.inflated_rtt(floor) {
            self.queue_streak += 1;
        } else {
            self.queue_streak = 0;
        }
        // A queue starting to form: startup grows gently from here on (the queue it sees
        // is a round old, and growing fast for another round would overflow a 1-BDP buffer).
        if rtt > floor + (self.inflated_rtt(floor) - floor) / 2 {
            self.early_streak += 1;
            if self.early_streak >= QUEUE_STREAK {
                self.startup_gentle = true;
            }
        } else {
            self.early_streak = 0;
        }
    }

    /// The end of one batch of acknowledgements.
    pub fn on_end_acks(&mut self, now: Instant, in_flight: u64, _app_limited: bool) {
        self.in_flight = in_flight;
        let acked = std::mem::take(&mut self.batch_acked);
        self.r.max_inflight = self.r.max_inflight.max(in_flight + acked);
        self.r.inflight_sum += (in_flight + acked) as f64;
        self.r.inflight_n += 1;
        self.track_aggregation(now, acked);
        self.check_queue(now);
        if self.round_done {
            self.end_round(now);
        }
        match self.phase {
            Phase::Down if self.bdp().is_some() && in_flight <= self.cwnd => {
                self.enter(Phase::Cruise, "queue drained")
            }
            Phase::Resume { step } => self.resume_progress(step),
            Phase::ProbeRtt => self.probe_rtt_progress(now, in_flight),
            Phase::Down | Phase::Cruise | Phase::Up
                if now.saturating_duration_since(self.min_rtt_seen) > self.p.probe_rtt_interval =>
            {
                self.probe_min = None;
                self.probe_until = None;
                self.enter(Phase::ProbeRtt, "no RTT near the floor for a while");
            }
            _ => {}
        }
        self.update_cwnd();
    }

    /// `ProbeRtt`: once in flight is down to its window, hold it for `probe_rtt_time` and at
    /// least a round, then take the lowest RTT seen meanwhile as the floor (higher than the
    /// old one if the path got longer).
    fn probe_rtt_progress(&mut self, now: Instant, in_flight: u64) {
        match self.probe_until {
            None if in_flight <= self.cwnd => {
                let hold = self.p.probe_rtt_time.max(self.min_rtt.unwrap_or_default());
                self.probe_until = Some(now + hold);
                self.phase_round = self.round;
            }
            Some(t) if now >= t && self.round > self.phase_round => {
                if let Some(m) = self.probe_min {
                    self.min_rtt = Some(m);
                }
                self.min_rtt_seen = now;
                self.enter(Phase::Cruise, "RTT floor measured");
            }
            _ => {}
        }
    }

    /// Packets sent up to `sent` were lost (`bytes` of them), or ECN marked one (`bytes` 0).
    pub fn on_loss(&mut self, _now: Instant, sent: Instant, persistent: bool, bytes: u64) {
        self.in_flight = self.in_flight.saturating_sub(bytes);
        if !self.sent_high(sent) {
            self.low_lost += bytes as f64;
        }
        if persistent {
            // Everything in flight for several PTOs was lost: the path changed or went away.
            // Start over, keeping only the RTT floor.
            self.bw.reset();
            self.extra_acked.reset();
            self.inflight_hi = u64::MAX;
            self.hint = None;
            self.startup_cwnd = self.min_window();
            self.enter(Phase::Startup, "persistent congestion");
            return;
        }
        if bytes == 0 {
            self.r.ecn = true;
        }
        self.r.lost += bytes;
    }

    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu).max(1200);
        self.update_cwnd();
    }

    /// BBR's ack aggregation estimate: bytes acknowledged beyond what the bandwidth estimate
    /// explains since the current burst began.
    fn track_aggregation(&mut self, now: Instant, acked: u64) {
        let Some(bw) = self.bw.get() else { return };
        let expected = self.agg_start.map_or(0, |s| {
            (bw as f64 * now.saturating_duration_since(s).as_secs_f64()) as u64
        });
        if self.agg_start.is_none() || self.agg_bytes <= expected {
            self.agg_start = Some(now);
            self.agg_bytes = acked;
            return;
        }
        self.agg_bytes += acked;
        self.extra_acked
            .update(self.agg_bytes - expected, self.round);
    }

    /// A queue that the last `QUEUE_STREAK` RTT samples all saw ends startup (within a round,
    /// before it grows the queue much more), or a resume whose remembered path no longer holds.
    fn check_queue(&mut self, now: Instant) {
        if self.queue_streak < QUEUE_STREAK {
            return;
        }
        match self.phase {
            Phase::Startup => self.enter(Phase::Down, "queue building"),
            Phase::Resume { .. } => self.resume_failed(now),
            _ => {}
        }
    }

    fn resume_progress(&mut self, step: u8) {
        let Some(h) = self.hint else { return };
        let full = bdp(h.bw, h.min_rtt);
        let want = if step == 0 { full / 2 } else { full };
        if self.resume_delivered < want {
            return;
        }
        self.resume_delivered = 0;
        if step == 0 {
            self.startup_cwnd = full.max(self.startup_cwnd);
            self.phase = Phase::Resume { step: 1 };
        } else {
            // A whole remembered BDP went through without a queue: trust the memory.
            self.bw.update(h.bw, self.round);
            self.hint = None;
            self.enter(Phase::Cruise, "remembered path confirmed");
        }
    }

    fn resume_failed(&mut self, _now: Instant) {
        self.hint = None;
        self.startup_cwnd = (self.cwnd / 2).max(self.p.initial_window);
        self.enter(Phase::Startup, "remembered path not confirmed");
    }

    fn end_round(&mut self, now: Instant) {
        let r = std::mem::take(&mut self.r);
        let elapsed = now.saturating_duration_since(self.round_start);
        self.round += 1;
        self.round_start = now;
        self.round_done = false;

        let min = self.min_rtt();
        let long_enough = min.is_none_or(|m| elapsed >= m / 2) && !elapsed.is_zero();
        if long_enough && r.acked > 0 {
            let rate = (r.acked as f64 / elapsed.as_secs_f64()) as u64;
            if !r.app_limited || self.bw.get().is_none_or(|b| rate > b) {
                self.bw.update(rate, self.round);
            }
        }

        let total = r.acked + r.lost;
        let loss = if total > 0 {
            r.lost as f64 / total as f64
        } else {
            0.0
        };
        // High: above the threshold, and more lost datagrams than random loss at the learnt
        // level would plausibly give in a round this size (mean + 3 sigma + 1).
        let level = self.loss_baseline();
        let sent_pkts = total as f64 / self.mtu as f64;
        let lost_pkts = r.lost as f64 / self.mtu as f64;
        let expected = level * sent_pkts;
        let high = lost_pkts >= 3.0
            && loss > self.loss_threshold()
            && lost_pkts > expected + 3.0 * expected.sqrt() + 1.0;
        let inflated = match (min, r.rtt_n) {
            (Some(m), n) if n > 0 => r.rtt_sum / n > self.inflated_rtt(m),
            _ => false,
        };
        let congested = r.ecn || (high && (inflated || self.prev_high_loss));
        self.prev_high_loss = high;
        if self.low_acked + self.low_lost > (self.p.loss_window_packets * self.mtu) as f64 {
            self.low_acked /= 2.0;
            self.low_lost /= 2.0;
        }

        if congested {
            self.congestion_events += 1;
            let base = r.max_inflight.max(self.min_window());
            self.inflight_hi = ((base as f64 * self.p.beta) as u64).max(self.min_window());
            self.hi_growth = self.mtu;
        } else if self.phase == Phase::Up
            && self.inflight_hi != u64::MAX
            && self.uncapped > self.inflight_hi
        {
            // Probing, held back by the cap, without congestion: raise it, twice as much as at
            // the last probe. Only while probing: between probes the cap stays where congestion
            // put it, so a loss-based flow sharing the link regrows its window meanwhile.
            self.inflight_hi = self.inflight_hi.saturating_add(self.hi_growth);
            self.hi_growth = self.hi_growth.saturating_mul(2);
            // Keep probing while the cap is what holds the flow back (up to 8 more rounds):
            // after a cut that was too deep it comes back in a few rounds, not cycles.
            if self.phase_rounds < 10 {
                self.phase_rounds += 1;
            }
        }

        if self.phase == Phase::Cruise && !congested {
            self.adjust_pace_boost(&r);
        }

        match self.phase {
            Phase::Startup => {
                // The bandwidth stopped growing: only rounds with data waiting count (a
                // connection idle between its handshake and its first cycle is not full).
                let bw = self.bw.get().unwrap_or(0);
                if bw >= self.full_bw + self.full_bw / 4 {
                    self.full_bw = bw;
                    self.full_bw_rounds = 0;
                } else if !r.app_limited {
                    self.full_bw_rounds += 1;
                }
                if congested {
                    // Startup's losses may be an overflow rather than random: forget them.
                    self.low_acked = 0.0;
                    self.low_lost = 0.0;
                }
                if congested {
                    self.enter(Phase::Down, "congestion");
                } else if self.full_bw_rounds >= 3 {
                    self.enter(Phase::Down, "bandwidth stopped growing");
                }
            }
            Phase::Resume { .. } => {
                if congested || self.round > 20 {
                    self.resume_failed(now);
                }
            }
            Phase::ProbeRtt => {}
            _ if congested => self.enter(Phase::Down, "congestion"),
            Phase::Down | Phase::Cruise | Phase::Up => {
                if self.round - self.phase_round >= u64::from(self.phase_rounds) {
                    let next = match self.phase {
                        Phase::Cruise => Phase::Up,
                        Phase::Up => Phase::Down,
                        _ => Phase::Cruise,
                    };
                    self.enter(next, "probe cycle");
                }
            }
        }
    }

    fn update_cwnd(&mut self) {
        let model = match (self.bdp(), self.bw.get(), self.min_rtt) {
            (Some(bdp), Some(bw), Some(rtt)) => Some((bdp, bw, rtt)),
            _ => None,
        };
        let target = match (self.phase, model) {
            (Phase::Startup | Phase::Resume { .. }, _) | (_, None) => self.startup_cwnd,
            (phase, Some((bdp, bw, rtt))) => {
                let cap = rtt
                    .mul_f64(self.p.aggregation_frac)
                    .clamp(self.p.aggregation_floor, self.p.aggregation_max);
                let agg = self
                    .extra_acked
                    .get()
                    .unwrap_or(0)
                    .min((bw as f64 * cap.as_secs_f64()) as u64);
                let gain = match phase {
                    Phase::Down => self.p.down_gain,
                    Phase::ProbeRtt => self.p.probe_rtt_gain,
                    Phase::Up => self.p.cruise_gain * self.p.up_gain,
                    _ => self.p.cruise_gain,
                };
                let agg = if matches!(phase, Phase::Down | Phase::ProbeRtt) {
                    0
                } else {
                    agg
                };
                (bdp as f64 * gain) as u64 + agg
            }
        };
        self.uncapped = target;
        self.target = target.min(self.inflight_hi).max(self.min_window());
        self.cwnd = match (self.phase, self.bdp()) {
            // The boost is for a pacer that cannot fill the window; should it suddenly do so,
            // 1.75 BDP in flight still leaves a one-BDP buffer room.
            (Phase::Cruise | Phase::Up, Some(bdp)) => ((self.target as f64 * self.pace_boost)
                as u64)
                .min((bdp as f64 * BOOSTED_MAX) as u64)
                .max(self.target),
            _ => self.target,
        };
    }

    /// Window over target (1.0: none), see `Params::pace_boost_max`.
    pub fn pace_boost(&self) -> f64 {
        self.pace_boost
    }

    /// While cruising: the window must let quinn's pacer reach the in-flight target.
    fn adjust_pace_boost(&mut self, r: &Round) {
        if r.inflight_n < 4 || r.app_limited {
            return;
        }
        let mean = r.inflight_sum / f64::from(r.inflight_n);
        let target = self.target as f64;
        if mean < 0.92 * target {
            self.pace_boost = (self.pace_boost * 1.08).min(self.p.pace_boost_max);
        } else if mean > target {
            self.pace_boost = (self.pace_boost / 1.08).max(1.0);
        }
    }
}

/// Bandwidth-delay product in bytes.
pub fn bdp(bw: u64, rtt: Duration) -> u64 {
    (bw as f64 * rtt.as_secs_f64()) as u64
}
