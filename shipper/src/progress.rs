//! A cycle's progress while it is shipped. [`send_data`](crate::ship::send_data) reports to
//! a [`Progress`] a few times a second (also while the link is stalled); the command line
//! draws a bar on a terminal, and [`LogProgress`] (for a service) logs a line every few
//! seconds.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmreplica_common::wire::CycleKind;

/// Where a cycle's transfer stands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    pub cycle: u64,
    pub kind: CycleKind,
    /// Data bytes (uncompressed) the applier acknowledged as durably applied so far, of
    /// `total` to send.
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
}

impl Snapshot {
    /// Average data rate so far, bytes/s.
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.done as f64 / s
        } else {
            0.0
        }
    }

    /// Time left at the average rate so far (None before anything moved).
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0)
            .then(|| Duration::from_secs_f64(self.total.saturating_sub(self.done) as f64 / rate))
    }

    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            100.0 * self.done as f64 / self.total as f64
        }
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cycle {} ({}): {:.1} / {:.1} MiB ({:.0}%), {:.1} MB/s, ETA ",
            self.cycle,
            kind_label(self.kind),
            self.done as f64 / 1048576.0,
            self.total as f64 / 1048576.0,
            self.percent(),
            self.rate() / 1e6,
        )?;
        match self.eta() {
            Some(eta) => write!(f, "{} s", eta.as_secs()),
            None => f.write_str("unknown"),
        }
    }
}

/// What a cycle kind is called where people read it.
pub fn kind_label(kind: CycleKind) -> &'static str {
    match kind {
        CycleKind::Initial => "initial copy",
        CycleKind::Resync => "resync",
        CycleKind::Delta => "delta",
        CycleKind::Reverse => "reverse",
    }
}

/// Receives the progress of each cycle a shipper sends.
pub trait Progress: Send + Sync {
    /// A cycle starts sending `total` data bytes (after what the applier already staged).
    fn begin(&self, cycle: u64, kind: CycleKind, total: u64);
    /// Called a few times a second while the cycle's chunks are sent and acknowledged.
    fn update(&self, now: &Snapshot);
    /// Every byte is acknowledged as durably applied; the manifest commits the cycle next.
    fn sent(&self, now: &Snapshot);
    /// The cycle ended: applied, or failed (it is retried as a new attempt, with `begin`).
    fn end(&self, applied: bool);
}

/// Logs a line per `every` while a cycle is sent: for a service, whose log is a file.
pub struct LogProgress {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogProgress {
    pub fn new(every: Duration) -> LogProgress {
        LogProgress {
            every,
            last: Mutex::new(None),
        }
    }

    /// Whether a line is due at `at`; notes it as logged if so.
    fn due(&self, at: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if at.duration_since(t) < self.every => false,
            _ => {
                *last = Some(at);
                true
            }
        }
    }
}

impl Default for LogProgress {
    fn default() -> Self {
        LogProgress::new(Duration::from_secs(5))
    }
}

impl Progress for LogProgress {
    fn begin(&self, _cycle: u64, _kind: CycleKind, _total: u64) {
        // The first line comes one period in: short cycles log only their result.
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn update(&self, now: &Snapshot) {
        if self.due(Instant::now()) {
            tracing::info!("{now}");
        }
    }

    fn sent(&self, now: &Snapshot) {
        if now.elapsed >= self.every {
            tracing::info!("{now}; all applied, committing");
        }
    }

    fn end(&self, _applied: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(done: u64, total: u64, secs: u64) -> Snapshot {
        Snapshot {
            cycle: 7,
            kind: CycleKind::Initial,
            done,
            total,
            elapsed: Duration::from_secs(secs),
        }
    }

    #[test]
    fn rate_eta_and_the_log_line() {
        let s = at(512 << 20, 2048 << 20, 4);
        assert_eq!(s.rate(), (128 << 20) as f64);
        assert_eq!(s.eta(), Some(Duration::from_secs(12)));
        assert_eq!(s.percent(), 25.0);
        assert_eq!(
            s.to_string(),
            "cycle 7 (initial copy): 512.0 / 2048.0 MiB (25%), 134.2 MB/s, ETA 12 s"
        );
        // Nothing moved yet (a stalled link at the start): no rate, no ETA, no division by 0.
        let s = at(0, 2048 << 20, 0);
        assert_eq!((s.rate(), s.eta()), (0.0, None));
        assert!(s.to_string().ends_with("ETA unknown"));
        // An empty cycle is complete.
        assert_eq!(at(0, 0, 1).percent(), 100.0);
    }

    #[test]
    fn log_lines_are_spaced_by_the_period() {
        let p = LogProgress::new(Duration::from_secs(5));
        p.begin(1, CycleKind::Delta, 10);
        let t0 = Instant::now();
        assert!(!p.due(t0 + Duration::from_secs(1)));
        assert!(p.due(t0 + Duration::from_secs(6)));
        assert!(!p.due(t0 + Duration::from_secs(8)));
        assert!(p.due(t0 + Duration::from_secs(12)));
    }
}
