//! A simulated bottleneck link for the controllers' tests, in virtual time.
//!
//! Mirrors `scripts/wan-relay.py` (per direction: random loss, then a drop-tail queue drained
//! at the bottleneck rate, then propagation delay; 28 bytes of IP/UDP overhead per datagram)
//! and quinn's sender as far as a controller can tell: the pacer (a token bucket refilled at
//! 1.25 x window / smoothed RTT, bursts of 2 ms), the window check, an acknowledgement every
//! second packet or after 25 ms, RTT estimation (RFC 9002), loss detection by packet (3) and
//! time (9/8 RTT) thresholds, PTO probes, and the order of the controller calls: `on_ack` per
//! packet, `on_end_acks` per ACK frame, then `on_loss` for what that frame revealed lost.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::vmr::Vmr;

/// What the simulation needs of a controller.
pub trait Cc {
    fn on_sent(&mut self, now: Instant, bytes: u64);
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool);
    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool);
    fn on_loss(&mut self, now: Instant, sent: Instant, persistent: bool, bytes: u64);
    fn window(&self) -> u64;
    /// A line of state for test traces.
    fn describe(&self) -> String {
        format!("cwnd {}", self.window())
    }
    fn as_vmr(&self) -> Option<&Vmr> {
        None
    }
}

impl Cc for Vmr {
    fn on_sent(&mut self, now: Instant, bytes: u64) {
        Vmr::on_sent(self, now, bytes)
    }
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        Vmr::on_ack(self, now, sent, bytes, app_limited)
    }
    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        Vmr::on_end_acks(self, now, in_flight, app_limited)
    }
    fn on_loss(&mut self, now: Instant, sent: Instant, persistent: bool, bytes: u64) {
        Vmr::on_loss(self, now, sent, persistent, bytes)
    }
    fn window(&self) -> u64 {
        Vmr::window(self)
    }
    fn as_vmr(&self) -> Option<&Vmr> {
        Some(self)
    }
    fn describe(&self) -> String {
        format!(
            "{:?} cwnd {} (boost {:.2}) bw {:.1} Mbit/s min_rtt {:?} loss {:.4} events {}",
            self.phase(),
            self.window(),
            self.pace_boost(),
            self.bandwidth().unwrap_or(0) as f64 * 8e-6,
            self.min_rtt(),
            self.loss_baseline(),
            self.congestion_events()
        )
    }
}

/// CUBIC (RFC 9438: beta 0.7, C 0.4, the Reno-friendly region, fast convergence), one
/// reduction per round trip, as a loss-based peer for the coexistence tests.
pub struct TestCubic {
    mss: u64,
    cwnd: f64,
    ssthresh: f64,
    w_max: f64,
    k: f64,
    epoch: Option<Instant>,
    w_est: f64,
    recovery: Option<Instant>,
}

impl TestCubic {
    pub fn new(mss: u64) -> TestCubic {
        TestCubic {
            mss,
            cwnd: 14720.0,
            ssthresh: f64::INFINITY,
            w_max: 0.0,
            k: 0.0,
            epoch: None,
            w_est: 0.0,
            recovery: None,
        }
    }
}

impl Cc for TestCubic {
    fn on_sent(&mut self, _now: Instant, _bytes: u64) {}
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        if app_limited || self.recovery.is_some_and(|r| sent <= r) {
            return;
        }
        let b = bytes as f64;
        if self.cwnd < self.ssthresh {
            self.cwnd += b;
            return;
        }
        let mss = self.mss as f64;
        let epoch = *self.epoch.get_or_insert_with(|| {
            self.w_est = self.cwnd;
            self.k = if self.cwnd < self.w_max {
                ((self.w_max - self.cwnd) / mss / 0.4).cbrt()
            } else {
                0.0
            };
            now
        });
        let t = now.saturating_duration_since(epoch).as_secs_f64();
        let target = (self.w_max + 0.4 * (t - self.k).powi(3) * mss).max(0.0);
        self.w_est += 3.0 * 0.3 / 1.7 * b * mss / self.cwnd;
        if target > self.cwnd {
            let step = ((target - self.cwnd) / self.cwnd * b).min(b / 2.0);
            self.cwnd += step;
        }
        self.cwnd = self.cwnd.max(self.w_est);
    }
    fn on_end_acks(&mut self, _now: Instant, _in_flight: u64, _app_limited: bool) {}
    fn on_loss(&mut self, now: Instant, sent: Instant, _persistent: bool, _bytes: u64) {
        if self.recovery.is_some_and(|r| sent <= r) {
            return;
        }
        self.recovery = Some(now);
        let w = self.cwnd;
        self.w_max = if w < self.w_max { w * 1.7 / 2.0 } else { w };
        self.cwnd = (w * 0.7).max(2.0 * self.mss as f64);
        self.ssthresh = self.cwnd;
        self.epoch = None;
    }
    fn window(&self) -> u64 {
        self.cwnd as u64
    }
}

/// One direction of the link, like the relay's `Pipe`.
#[derive(Clone, Copy, Debug)]
pub struct LinkParams {
    /// Bottleneck rate, bits/s (0: none).
    pub rate_bits: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Loss probability per datagram, each direction.
    pub loss: f64,
    /// Drop-tail queue, bytes (`None`: one BDP, at least 64 KiB, as the relay).
    pub queue: Option<u64>,
}

impl LinkParams {
    pub fn new(rate_bits: f64, rtt_ms: u64, loss: f64) -> LinkParams {
        LinkParams {
            rate_bits,
            delay: Duration::from_millis(rtt_ms) / 2,
            loss,
            queue: None,
        }
    }

    pub fn bdp(&self) -> u64 {
        (self.rate_bits / 8.0 * 2.0 * self.delay.as_secs_f64()) as u64
    }
}

const OVERHEAD: u64 = 28;
const ACK_SIZE: u64 = 60;
const MAX_ACK_DELAY: u64 = 25_000_000;

struct Pipe {
    rate_bps: f64,
    queue: u64,
    delay: u64,
    loss: f64,
    busy_until: f64,
    last_deliver: u64,
    fwd: u64,
    drop_loss: u64,
    drop_queue: u64,
}

impl Pipe {
    fn new(p: &LinkParams) -> Pipe {
        Pipe {
            rate_bps: p.rate_bits / 8.0,
            queue: p.queue.unwrap_or_else(|| p.bdp().max(64 << 10)),
            delay: p.delay.as_nanos() as u64,
            loss: p.loss,
            busy_until: 0.0,
            last_deliver: 0,
            fwd: 0,
            drop_loss: 0,
            drop_queue: 0,
        }
    }

    fn backlog(&self, now: u64) -> f64 {
        if self.rate_bps == 0.0 {
            return 0.0;
        }
        ((self.busy_until - now as f64) / 1e9 * self.rate_bps).max(0.0)
    }

    /// When a datagram of `len` bytes sent now arrives, or `None` if it is dropped.
    fn admit(&mut self, now: u64, len: u64, rng: &mut Rng) -> Option<u64> {
        if self.loss > 0.0 && rng.unit() < self.loss {
            self.drop_loss += 1;
            return None;
        }
        let mut t = now as f64;
        if self.rate_bps > 0.0 {
            let backlog = self.backlog(now);
            if backlog + len as f64 > self.queue as f64 {
                self.drop_queue += 1;
                return None;
            }
            let start = self.busy_until.max(now as f64);
            t = start + (len + OVERHEAD) as f64 / self.rate_bps * 1e9;
            self.busy_until = t;
        }
        let at = (t as u64 + self.delay).max(self.last_deliver);
        self.last_deliver = at;
        self.fwd += 1;
        Some(at)
    }
}

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// quinn's pacer (`connection/pacing.rs`), in nanoseconds.
struct Pacer {
    /// 1.0: quinn's pacer as designed; less: a host whose timers fire late, so that the
    /// pacer delivers this share of its nominal rate.
    efficiency: f64,
    capacity: u64,
    last_window: u64,
    tokens: u64,
    prev: u64,
}

impl Pacer {
    fn capacity(srtt: u64, window: u64, mtu: u64) -> u64 {
        let c = (window as u128 * 2_000_000 / u128::from(srtt.max(1))) as u64;
        c.clamp(10 * mtu, 256 * mtu)
    }

    fn delay(&mut self, srtt: u64, bytes: u64, mtu: u64, window: u64, now: u64) -> Option<u64> {
        if window != self.last_window {
            self.capacity = Pacer::capacity(srtt, window, mtu);
            self.tokens = self.tokens.min(self.capacity);
            self.last_window = window;
        }
        if self.tokens >= bytes {
            return None;
        }
        let elapsed = now.saturating_sub(self.prev) as f64;
        let new = window as f64 * 1.25 * self.efficiency * elapsed / srtt.max(1) as f64;
        self.tokens = (self.tokens.saturating_add(new as u64)).min(self.capacity);
        self.prev = now;
        if self.tokens >= bytes {
            return None;
        }
        let unscaled =
            srtt as f64 * (bytes.max(self.capacity) - self.tokens) as f64 / window as f64;
        Some(self.prev + (unscaled * 0.8) as u64)
    }
}

struct Sent {
    at: u64,
    size: u64,
    data: u64,
}

/// A flow's workload.
pub struct FlowSpec {
    pub cc: Box<dyn Cc>,
    /// When it starts sending.
    pub start: Duration,
    /// Application rate limit (bytes/s of payload), like the shipper's bandwidth_limit.
    pub app_rate: Option<u64>,
}

/// What a flow achieved.
#[derive(Clone, Debug, Default)]
pub struct FlowStats {
    pub sent: u64,
    /// Datagrams the bottleneck delivered to the receiver.
    pub delivered: u64,
    /// Unique payload bytes the receiver got.
    pub goodput_bytes: u64,
    pub declared_lost: u64,
    pub start: Duration,
}

impl FlowStats {
    /// Datagrams sent per datagram delivered.
    pub fn sent_per_delivered(&self) -> f64 {
        self.sent as f64 / self.delivered.max(1) as f64
    }
}

struct Flow {
    spec: FlowSpec,
    next_pn: u64,
    sent: BTreeMap<u64, Sent>,
    in_flight: u64,
    largest_acked: Option<u64>,
    srtt: Option<u64>,
    rttvar: u64,
    latest: u64,
    last_ack_at: u64,
    pto_count: u32,
    probes: u32,
    pacer: Pacer,
    wake_at: Option<u64>,
    app_limited: bool,
    next_data: u64,
    retx: VecDeque<u64>,
    app_next: u64,
    // Receiver side.
    got: HashSet<u64>,
    since_ack: u32,
    ack_timer: Option<u64>,
    cur: Vec<u64>,
    recent: VecDeque<Vec<u64>>,
    // Per-flow counters.
    stats: FlowStats,
    /// Goodput bytes at the start of the measurement window.
    mark: u64,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Wake(usize),
    Deliver(usize, u64, u64),
    AckTimer(usize, u64),
    Ack(usize, Vec<u64>),
    Tick,
}

/// The simulation: flows sharing one bottleneck, in virtual time.
pub struct Sim {
    base: Instant,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    fwd: Pipe,
    rev: Pipe,
    flows: Vec<Flow>,
    rng: Rng,
    mss: u64,
    queue_sum: f64,
    queue_n: u64,
    queue_max: f64,
    mark_at: u64,
}

impl Sim {
    pub fn new(link: LinkParams, seed: u64) -> Sim {
        let mut s = Sim {
            base: Instant::now(),
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            fwd: Pipe::new(&link),
            rev: Pipe::new(&link),
            flows: Vec::new(),
            rng: Rng::new(seed),
            mss: 1200,
            queue_sum: 0.0,
            queue_n: 0,
            queue_max: 0.0,
            mark_at: 0,
        };
        s.at(1_000_000, Ev::Tick);
        s
    }

    /// The instant the simulation started (controllers must be built with it).
    pub fn epoch(&self) -> Instant {
        self.base
    }

    pub fn add(&mut self, spec: FlowSpec) -> usize {
        let i = self.flows.len();
        let start = spec.start.as_nanos() as u64;
        self.flows.push(Flow {
            stats: FlowStats {
                start: spec.start,
                ..FlowStats::default()
            },
            spec,
            next_pn: 0,
            sent: BTreeMap::new(),
            in_flight: 0,
            largest_acked: None,
            srtt: None,
            rttvar: 0,
            latest: 0,
            last_ack_at: start,
            pto_count: 0,
            probes: 0,
            pacer: Pacer {
                efficiency: 1.0,
                capacity: 10 * self.mss,
                last_window: 0,
                tokens: 10 * self.mss,
                prev: start,
            },
            wake_at: None,
            app_limited: false,
            next_data: 0,
            retx: VecDeque::new(),
            app_next: start,
            got: HashSet::new(),
            since_ack: 0,
            ack_timer: None,
            cur: Vec::new(),
            recent: VecDeque::new(),
            mark: 0,
        });
        self.at(start, Ev::Wake(i));
        i
    }

    fn at(&mut self, t: u64, e: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, e)));
    }

    fn instant(&self, t: u64) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    /// Runs until `until` (virtual time since the start).
    pub fn run(&mut self, until: Duration) {
        let end = until.as_nanos() as u64;
        while let Some(Reverse((t, _, _))) = self.events.peek() {
            if *t > end {
                break;
            }
            let Reverse((t, _, e)) = self.events.pop().expect("peeked");
            self.now = t;
            match e {
                Ev::Wake(f) => {
                    if self.flows[f].wake_at == Some(t) {
                        self.flows[f].wake_at = None;
                    }
                    self.try_send(f);
                }
                Ev::Deliver(f, pn, data) => self.deliver(f, pn, data),
                Ev::AckTimer(f, at) => {
                    if self.flows[f].ack_timer == Some(at) {
                        self.send_ack(f);
                    }
                }
                Ev::Ack(f, pns) => self.on_ack(f, pns),
                Ev::Tick => self.tick(),
            }
        }
        self.now = end;
    }

    /// Starts the measurement window now: goodput and queue figures count from here.
    pub fn mark(&mut self) {
        self.mark_at = self.now;
        self.queue_sum = 0.0;
        self.queue_n = 0;
        self.queue_max = 0.0;
        for f in &mut self.flows {
            f.mark = f.stats.goodput_bytes;
        }
    }

    /// Payload bytes/s flow `f` delivered since the mark.
    pub fn goodput(&self, f: usize) -> f64 {
        let fl = &self.flows[f];
        let since = self.mark_at.max(fl.stats.start.as_nanos() as u64);
        let secs = (self.now.saturating_sub(since)) as f64 / 1e9;
        (fl.stats.goodput_bytes - fl.mark) as f64 / secs.max(1e-9)
    }

    pub fn describe(&self, f: usize) -> String {
        let fl = &self.flows[f];
        format!(
            "in_flight {} srtt {:?} {}",
            fl.in_flight,
            fl.srtt.map(Duration::from_nanos),
            fl.spec.cc.describe()
        )
    }

    /// Flow `f`'s controller, if it is a [`Vmr`].
    pub fn vmr(&self, f: usize) -> Option<&Vmr> {
        self.flows[f].spec.cc.as_vmr()
    }

    pub fn stats(&self, f: usize) -> &FlowStats {
        &self.flows[f].stats
    }

    /// Mean and max bottleneck queue (bytes) since the mark, sampled every millisecond.
    pub fn queue(&self) -> (f64, f64) {
        (self.queue_sum / self.queue_n.max(1) as f64, self.queue_max)
    }

    /// Makes flow `f`'s pacer deliver `efficiency` of its nominal rate (late timers).
    pub fn set_pacer_efficiency(&mut self, f: usize, efficiency: f64) {
        self.flows[f].pacer.efficiency = efficiency;
    }

    /// Changes flow `f`'s application rate limit from now on.
    pub fn set_app_rate(&mut self, f: usize, rate: Option<u64>) {
        self.flows[f].spec.app_rate = rate;
        self.flows[f].app_next = self.now;
        self.at(self.now, Ev::Wake(f));
    }

    /// Changes the link (both directions) from now on: rate and loss.
    pub fn set_link(&mut self, rate_bits: f64, loss: f64) {
        for p in [&mut self.fwd, &mut self.rev] {
            p.rate_bps = rate_bits / 8.0;
            p.loss = loss;
        }
    }

    /// Datagrams dropped (forward direction): by random loss, by the queue.
    pub fn drops(&self) -> (u64, u64) {
        (self.fwd.drop_loss, self.fwd.drop_queue)
    }

    fn tick(&mut self) {
        let q = self.fwd.backlog(self.now);
        self.queue_sum += q;
        self.queue_n += 1;
        self.queue_max = self.queue_max.max(q);
        if self.now % 5_000_000 < 1_000_000 {
            for f in 0..self.flows.len() {
                self.detect_losses(f);
                self.check_pto(f);
            }
        }
        self.at(self.now + 1_000_000, Ev::Tick);
    }

    fn has_data(&mut self, f: usize) -> bool {
        let fl = &mut self.flows[f];
        if fl.spec.app_rate.is_none() || fl.app_next <= self.now + 50_000_000 {
            return true;
        }
        let at = fl.app_next - 50_000_000;
        if fl.wake_at.is_none_or(|w| w > at) {
            fl.wake_at = Some(at);
            self.at(at, Ev::Wake(f));
        }
        false
    }

    fn try_send(&mut self, f: usize) {
        if self.now < self.flows[f].stats.start.as_nanos() as u64 {
            return;
        }
        let mss = self.mss;
        let mut blocked = false;
        let mut no_data = false;
        loop {
            if !self.has_data(f) {
                no_data = true;
                break;
            }
            let now = self.now;
            let fl = &mut self.flows[f];
            let window = fl.spec.cc.window().max(1);
            let probe = fl.probes > 0;
            if !probe && fl.in_flight + mss >= window {
                blocked = true;
                break;
            }
            let srtt = fl.srtt.unwrap_or(100_000_000);
            if !probe {
                if let Some(t) = fl.pacer.delay(srtt, mss, mss, window, now) {
                    blocked = true;
                    if fl.wake_at.is_none_or(|w| w > t) {
                        fl.wake_at = Some(t);
                        self.at(t.max(now + 1), Ev::Wake(f));
                    }
                    break;
                }
            } else {
                fl.probes -= 1;
            }
            self.send_one(f);
        }
        self.flows[f].app_limited = no_data && !blocked;
    }

    fn send_one(&mut self, f: usize) {
        let now = self.now;
        let mss = self.mss;
        let at = self.instant(now);
        let fl = &mut self.flows[f];
        let data = fl.retx.pop_front().unwrap_or_else(|| {
            fl.next_data += 1;
            fl.next_data - 1
        });
        if let Some(rate) = fl.spec.app_rate {
            fl.app_next = fl.app_next.max(now.saturating_sub(50_000_000))
                + (mss as f64 / rate as f64 * 1e9) as u64;
        }
        let pn = fl.next_pn;
        fl.next_pn += 1;
        fl.sent.insert(
            pn,
            Sent {
                at: now,
                size: mss,
                data,
            },
        );
        fl.in_flight += mss;
        fl.pacer.tokens = fl.pacer.tokens.saturating_sub(mss);
        fl.stats.sent += 1;
        fl.spec.cc.on_sent(at, mss);
        if let Some(t) = self.fwd.admit(now, mss, &mut self.rng) {
            self.at(t, Ev::Deliver(f, pn, data));
        }
    }

    fn deliver(&mut self, f: usize, pn: u64, data: u64) {
        let mss = self.mss;
        let fl = &mut self.flows[f];
        fl.stats.delivered += 1;
        if fl.got.insert(data) {
            fl.stats.goodput_bytes += mss;
        }
        fl.cur.push(pn);
        fl.since_ack += 1;
        if fl.since_ack >= 2 {
            self.send_ack(f);
        } else if fl.ack_timer.is_none() {
            let at = self.now + MAX_ACK_DELAY;
            fl.ack_timer = Some(at);
            self.at(at, Ev::AckTimer(f, at));
        }
    }

    fn send_ack(&mut self, f: usize) {
        let fl = &mut self.flows[f];
        fl.ack_timer = None;
        fl.since_ack = 0;
        let cur = std::mem::take(&mut fl.cur);
        // Each packet number is reported in three consecutive ACKs (QUIC's ranges repeat until
        // acknowledged), so one lost ACK loses nothing.
        let mut pns: Vec<u64> = fl.recent.iter().flatten().copied().collect();
        pns.extend_from_slice(&cur);
        fl.recent.push_back(cur);
        if fl.recent.len() > 2 {
            fl.recent.pop_front();
        }
        if let Some(t) = self.rev.admit(self.now, ACK_SIZE, &mut self.rng) {
            self.at(t, Ev::Ack(f, pns));
        }
    }

    fn on_ack(&mut self, f: usize, mut pns: Vec<u64>) {
        let now = self.now;
        let at = self.instant(now);
        let base = self.base;
        let fl = &mut self.flows[f];
        pns.sort_unstable();
        pns.dedup();
        let mut newly = Vec::new();
        for pn in pns {
            if let Some(s) = fl.sent.remove(&pn) {
                newly.push((pn, s));
            }
        }
        if newly.is_empty() {
            return;
        }
        let app_limited = fl.app_limited;
        let (largest, largest_at) = newly.last().map(|(pn, s)| (*pn, s.at)).expect("non-empty");
        for (_, s) in &newly {
            fl.in_flight -= s.size;
            fl.spec
                .cc
                .on_ack(at, base + Duration::from_nanos(s.at), s.size, app_limited);
        }
        fl.spec.cc.on_end_acks(at, fl.in_flight, app_limited);
        if fl.largest_acked.is_none_or(|l| largest > l) {
            fl.largest_acked = Some(largest);
            let rtt = now - largest_at;
            fl.latest = rtt;
            match fl.srtt {
                None => {
                    fl.srtt = Some(rtt);
                    fl.rttvar = rtt / 2;
                }
                Some(s) => {
                    fl.rttvar = (3 * fl.rttvar + s.abs_diff(rtt)) / 4;
                    fl.srtt = Some((7 * s + rtt) / 8);
                }
            }
        }
        fl.last_ack_at = now;
        fl.pto_count = 0;
        self.detect_losses(f);
        self.try_send(f);
    }

    fn detect_losses(&mut self, f: usize) {
        let now = self.now;
        let base = self.base;
        let fl = &mut self.flows[f];
        let Some(largest) = fl.largest_acked else {
            return;
        };
        let srtt = fl.srtt.unwrap_or(100_000_000);
        let delay = (srtt.max(fl.latest) * 9 / 8).max(1_000_000);
        let lost: Vec<u64> = fl
            .sent
            .range(..largest)
            .filter(|(pn, s)| largest >= *pn + 3 || now.saturating_sub(s.at) >= delay)
            .map(|(pn, _)| *pn)
            .collect();
        let mut bytes = 0;
        let mut last_at = 0;
        for pn in lost {
            let s = fl.sent.remove(&pn).expect("listed");
            fl.in_flight -= s.size;
            bytes += s.size;
            last_at = s.at;
            fl.retx.push_back(s.data);
            fl.stats.declared_lost += 1;
        }
        if bytes > 0 {
            fl.spec.cc.on_loss(
                base + Duration::from_nanos(now),
                base + Duration::from_nanos(last_at),
                false,
                bytes,
            );
        }
    }

    fn check_pto(&mut self, f: usize) {
        let now = self.now;
        let fl = &mut self.flows[f];
        if fl.in_flight == 0 {
            return;
        }
        let srtt = fl.srtt.unwrap_or(100_000_000);
        let pto = (srtt + (4 * fl.rttvar).max(1_000_000) + MAX_ACK_DELAY) << fl.pto_count.min(6);
        if now.saturating_sub(fl.last_ack_at) >= pto {
            fl.pto_count += 1;
            fl.last_ack_at = now;
            fl.probes = 2;
            // Probes carry the oldest outstanding data again, as quinn's do.
            if let Some((_, s)) = fl.sent.iter().next() {
                fl.retx.push_front(s.data);
            }
            self.try_send(f);
        }
    }
}
