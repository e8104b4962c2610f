//! Cycle history, kept by each site for status: the cycles applied (sizes, durations, bytes
//! on the wire), pauses, failed attempts, totals and the last error, bounded to the last 25
//! hours. It lives inside each site's state file (the shipper's `shipper.json`, the
//! replica's `state.json`), so a restart does not lose it.

use serde::{Deserialize, Serialize};

/// What is kept: a day and an hour of cycles, at most this many.
const KEEP_SECS: u64 = 25 * 3600;
const MAX_CYCLES: usize = 4096;
const MAX_FAILURES: usize = 4096;
const HOUR: u64 = 3600;

/// One cycle applied on the replica.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CycleRecord {
    pub cycle: u64,
    /// `initial`, `delta`, `resync`, `seed`.
    pub kind: String,
    /// When the tracker froze it (the instant the point is of), seconds since the epoch.
    pub frozen_at: u64,
    /// When shipping (or receiving) began and when it was applied, ms since the epoch.
    pub started_ms: u64,
    pub applied_ms: u64,
    /// Data bytes of the cycle (uncompressed).
    pub bytes: u64,
    /// Bytes of chunk frames on the link (primary side; 0 where unknown).
    #[serde(default)]
    pub wire_bytes: u64,
    #[serde(default)]
    pub app_consistent: bool,
}

impl CycleRecord {
    pub fn seconds(&self) -> f64 {
        self.applied_ms.saturating_sub(self.started_ms) as f64 / 1000.0
    }
}

/// A pause: from, and until (None: still paused). Seconds since the epoch.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pause {
    pub from: u64,
    pub to: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub cycles: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorRecord {
    /// Seconds since the epoch.
    pub at: u64,
    pub message: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct History {
    /// When the first cycle was applied (cycles are expected from then on).
    #[serde(default)]
    pub since: Option<u64>,
    #[serde(default)]
    pub cycles: Vec<CycleRecord>,
    #[serde(default)]
    pub pauses: Vec<Pause>,
    /// Failed attempts (seconds since the epoch).
    #[serde(default)]
    pub failures: Vec<u64>,
    #[serde(default)]
    pub totals: Totals,
    #[serde(default)]
    pub last_error: Option<ErrorRecord>,
}

/// The last hour at a glance.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LastHour {
    pub cycles_done: u64,
    /// Cycles the interval asked for in the part of the hour replication was on (not
    /// paused, after the first cycle); None for continuous replication.
    pub cycles_expected: Option<u64>,
    /// Expected and not done (continuous replication: failed attempts).
    pub cycles_missed: u64,
    pub avg_cycle_bytes: u64,
    pub peak_cycle_bytes: u64,
    pub avg_cycle_seconds: f64,
    pub peak_cycle_seconds: f64,
    pub bytes: u64,
    pub wire_bytes: u64,
}

impl History {
    /// Records an applied cycle (and forgets what is past keeping).
    pub fn record(&mut self, rec: CycleRecord) {
        let now = rec.applied_ms / 1000;
        self.since.get_or_insert(now);
        self.totals.cycles += 1;
        self.totals.bytes += rec.bytes;
        self.totals.wire_bytes += rec.wire_bytes;
        self.cycles.push(rec);
        self.prune(now);
    }

    pub fn failed(&mut self, now: u64, message: &str) {
        self.failures.push(now);
        self.last_error = Some(ErrorRecord {
            at: now,
            message: message.to_string(),
        });
        self.prune(now);
    }

    pub fn paused(&self) -> bool {
        self.pauses.last().is_some_and(|p| p.to.is_none())
    }

    /// Opens a pause (no-op if paused).
    pub fn pause(&mut self, now: u64) {
        if !self.paused() {
            self.pauses.push(Pause {
                from: now,
                to: None,
            });
        }
        self.prune(now);
    }

    pub fn resume(&mut self, now: u64) {
        if let Some(p) = self.pauses.last_mut().filter(|p| p.to.is_none()) {
            p.to = Some(now);
        }
    }

    /// Since when replication is paused (None: it is not).
    pub fn paused_since(&self) -> Option<u64> {
        self.pauses
            .last()
            .filter(|p| p.to.is_none())
            .map(|p| p.from)
    }

    /// Records a pause that began at `since` as another site tells it (the replica site,
    /// told by the primary, maybe late; `now` is this site's clock): kept with the primary's
    /// `since`, so the same pause told again changes nothing. An open pause that began at
    /// another time (a resume that was never told) ends where this one begins. Whether
    /// anything changed.
    pub fn pause_since(&mut self, since: u64, now: u64) -> bool {
        match self.paused_since() {
            Some(from) if from == since => return false,
            Some(from) => self.resume(since.max(from)),
            None => {}
        }
        self.pauses.push(Pause {
            from: since,
            to: None,
        });
        self.prune(now);
        true
    }

    /// Ends an open pause at `at` as another site tells it (0: unknown, `now`), kept between
    /// the pause's start and `now`. Whether anything changed.
    pub fn resume_at(&mut self, at: u64, now: u64) -> bool {
        let Some(from) = self.paused_since() else {
            return false;
        };
        let at = if at == 0 { now } else { at.min(now) };
        self.resume(at.max(from));
        true
    }

    fn prune(&mut self, now: u64) {
        let keep_from = now.saturating_sub(KEEP_SECS);
        self.cycles.retain(|c| c.applied_ms / 1000 >= keep_from);
        if self.cycles.len() > MAX_CYCLES {
            self.cycles.drain(..self.cycles.len() - MAX_CYCLES);
        }
        self.pauses.retain(|p| p.to.is_none_or(|t| t >= keep_from));
        self.failures.retain(|t| *t >= keep_from);
        if self.failures.len() > MAX_FAILURES {
            self.failures.drain(..self.failures.len() - MAX_FAILURES);
        }
    }

    /// The last cycle applied.
    pub fn last(&self) -> Option<&CycleRecord> {
        self.cycles.last()
    }

    /// Seconds of `[from, to)` spent paused.
    fn paused_within(&self, from: u64, to: u64) -> u64 {
        self.pauses
            .iter()
            .map(|p| {
                let a = p.from.max(from);
                let b = p.to.unwrap_or(to).min(to);
                b.saturating_sub(a)
            })
            .sum()
    }

    /// The hour before `now_ms`, for a replication `interval` (None: continuous).
    pub fn last_hour(&self, now_ms: u64, interval: Option<u64>) -> LastHour {
        let now = now_ms / 1000;
        let from = now.saturating_sub(HOUR);
        let recent: Vec<&CycleRecord> = self
            .cycles
            .iter()
            .filter(|c| c.applied_ms / 1000 >= from)
            .collect();
        let done = recent.len() as u64;
        let (expected, missed) = match interval.filter(|i| *i > 0) {
            Some(i) => {
                let start = self.since.map_or(now, |s| s.max(from));
                let active = now
                    .saturating_sub(start)
                    .saturating_sub(self.paused_within(start, now));
                // The interval under way may not have finished its cycle yet: not counted.
                let expected = (active / i).saturating_sub(1);
                (Some(expected), expected.saturating_sub(done))
            }
            None => (
                None,
                self.failures.iter().filter(|t| **t >= from).count() as u64,
            ),
        };
        let bytes: u64 = recent.iter().map(|c| c.bytes).sum();
        let secs: f64 = recent.iter().map(|c| c.seconds()).sum();
        LastHour {
            cycles_done: done,
            cycles_expected: expected,
            cycles_missed: missed,
            avg_cycle_bytes: bytes.checked_div(done).unwrap_or(0),
            peak_cycle_bytes: recent.iter().map(|c| c.bytes).max().unwrap_or(0),
            avg_cycle_seconds: if done > 0 { secs / done as f64 } else { 0.0 },
            peak_cycle_seconds: recent.iter().map(|c| c.seconds()).fold(0.0, f64::max),
            bytes,
            wire_bytes: recent.iter().map(|c| c.wire_bytes).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cycle: u64, at: u64, bytes: u64, secs: u64) -> CycleRecord {
        CycleRecord {
            cycle,
            kind: "delta".into(),
            frozen_at: at - secs,
            started_ms: (at - secs) * 1000,
            applied_ms: at * 1000,
            bytes,
            wire_bytes: bytes / 2,
            app_consistent: false,
        }
    }

    #[test]
    fn the_last_hour_counts_done_and_missed_cycles_leaving_out_pauses() {
        let t0 = 1_000_000u64;
        let mut h = History::default();
        // A cycle a minute for 30 minutes, then none for 20 minutes, then 10 more.
        for i in 0..30 {
            h.record(rec(i + 1, t0 + 60 * i, 1000 * (i + 1), 2));
        }
        for i in 50..60 {
            h.record(rec(i + 1, t0 + 60 * i, 500, 1));
        }
        let now = t0 + 3600;
        let l = h.last_hour(now * 1000, Some(60));
        assert_eq!(l.cycles_done, 40);
        assert_eq!(l.cycles_expected, Some(59));
        assert_eq!(l.cycles_missed, 19);
        assert_eq!(l.peak_cycle_bytes, 30_000);
        assert_eq!(l.peak_cycle_seconds, 2.0);
        assert_eq!(l.avg_cycle_bytes, (465_000 + 5_000) / 40);
        assert_eq!(l.wire_bytes, l.bytes / 2);
        // Had those 20 minutes been a pause, nothing was missed.
        let mut p = h.clone();
        p.pauses.push(Pause {
            from: t0 + 60 * 29 + 30,
            to: Some(t0 + 60 * 49 + 30),
        });
        assert_eq!(p.last_hour(now * 1000, Some(60)).cycles_missed, 0);
        // Continuous: failures are what is missed.
        h.failed(now - 10, "link down");
        h.failed(now - 5, "link down");
        assert_eq!(h.last_hour(now * 1000, None).cycles_missed, 2);
        assert_eq!(h.last_error.as_ref().unwrap().message, "link down");
        assert_eq!(h.totals.cycles, 40);
        // Nothing is expected before the first cycle.
        assert_eq!(
            History::default().last_hour(now * 1000, Some(60)),
            LastHour {
                cycles_expected: Some(0),
                ..LastHour::default()
            }
        );
    }

    #[test]
    fn pauses_open_and_close_and_old_records_go() {
        let mut h = History::default();
        h.pause(100);
        h.pause(150);
        assert!(h.paused());
        assert_eq!(h.pauses.len(), 1);
        h.resume(200);
        assert!(!h.paused());
        h.record(rec(1, 1000, 1, 1));
        h.record(rec(2, 1000 + KEEP_SECS + 10, 1, 1));
        assert_eq!(h.cycles.len(), 1, "the day-old record is gone");
        assert!(h.pauses.is_empty());
        assert_eq!(h.totals.cycles, 2);
    }

    /// A pause told by the primary: kept with the primary's start, told again changes
    /// nothing, a new one ends an open one that began earlier; a resume ends it at the
    /// primary's time, never before its start nor after this site's now.
    #[test]
    fn pauses_told_by_another_site_are_idempotent() {
        let mut h = History::default();
        assert!(h.pause_since(1000, 1005));
        assert!(!h.pause_since(1000, 1010), "told again");
        assert_eq!(h.paused_since(), Some(1000));
        // A resume never told, then another pause: the first ends where the second begins.
        assert!(h.pause_since(1100, 1110));
        assert_eq!(
            h.pauses,
            vec![
                Pause {
                    from: 1000,
                    to: Some(1100)
                },
                Pause {
                    from: 1100,
                    to: None
                }
            ]
        );
        assert!(h.resume_at(1200, 1150), "at is kept at or before now");
        assert_eq!(h.pauses[1].to, Some(1150));
        assert!(!h.resume_at(1300, 1300), "nothing open");
        assert!(h.pause_since(1400, 1400));
        assert!(h.resume_at(0, 1450), "unknown: now");
        assert_eq!(h.pauses[2].to, Some(1450));
        assert!(h.pause_since(1500, 1500));
        assert!(h.resume_at(1, 1600), "never before the start");
        assert_eq!(h.pauses[3].to, Some(1500));
    }
}
