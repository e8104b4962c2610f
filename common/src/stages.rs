//! Per-stage timing of a cycle's data path, to see where its pipeline idles: for each named
//! stage, the time spent in it (busy, or waiting: a stage is whatever a caller times) and how
//! often, plus when it first and last ran relative to the timer's start. Off (no clock read,
//! nothing logged) unless the caller's log level asks for it, e.g.
//! `VMREPLICA_LOG=info,vmreplica_applier=debug,vmreplica_shipper=debug`.
//!
//! Thread-safe (atomics only): the stages of one pipeline may run on many threads.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One stage's totals.
#[derive(Default)]
struct Stage {
    nanos: AtomicU64,
    count: AtomicU64,
    /// Nanoseconds after the start when it first began (u64::MAX: never) and last ended.
    first: AtomicU64,
    last: AtomicU64,
    /// The largest value given to [`Stages::depth`] (a queue depth, bytes in flight).
    depth: AtomicU64,
}

/// The stage timers of one pipeline run.
pub struct Stages {
    start: Option<Instant>,
    names: &'static [&'static str],
    stages: Vec<Stage>,
}

impl Stages {
    /// Timers for `names`, running if `on` (pass `tracing::enabled!(tracing::Level::DEBUG)`).
    pub fn new(names: &'static [&'static str], on: bool) -> Stages {
        Stages {
            start: on.then(Instant::now),
            names,
            stages: names
                .iter()
                .map(|_| Stage {
                    first: AtomicU64::new(u64::MAX),
                    ..Stage::default()
                })
                .collect(),
        }
    }

    /// Timers that never run.
    pub fn off(names: &'static [&'static str]) -> Stages {
        Stages::new(names, false)
    }

    pub fn on(&self) -> bool {
        self.start.is_some()
    }

    /// The clock, if timing: give it to [`Stages::add`] when the stage ends.
    #[inline]
    pub fn begin(&self) -> Option<Instant> {
        self.start.map(|_| Instant::now())
    }

    /// Adds the time since `began` to stage `i`.
    #[inline]
    pub fn add(&self, i: usize, began: Option<Instant>) {
        let (Some(start), Some(b)) = (self.start, began) else {
            return;
        };
        let now = Instant::now();
        let s = &self.stages[i];
        s.nanos
            .fetch_add((now - b).as_nanos() as u64, Ordering::Relaxed);
        s.count.fetch_add(1, Ordering::Relaxed);
        s.first
            .fetch_min((b - start).as_nanos() as u64, Ordering::Relaxed);
        s.last
            .fetch_max((now - start).as_nanos() as u64, Ordering::Relaxed);
    }

    /// Records `d` as a depth seen in stage `i` (its maximum is reported).
    #[inline]
    pub fn depth(&self, i: usize, d: u64) {
        if self.start.is_some() {
            self.stages[i].depth.fetch_max(d, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the start (0 when off).
    pub fn elapsed_ms(&self) -> u64 {
        self.start.map_or(0, |s| s.elapsed().as_millis() as u64)
    }

    /// Each stage that ran: `name=total_ms/count@first_ms-last_ms` (and `^max_depth`).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (name, s) in self.names.iter().zip(&self.stages) {
            let count = s.count.load(Ordering::Relaxed);
            let depth = s.depth.load(Ordering::Relaxed);
            if count == 0 && depth == 0 {
                continue;
            }
            let ms = |n: u64| n / 1_000_000;
            let _ = write!(
                out,
                "{}{name}={}/{count}",
                if out.is_empty() { "" } else { " " },
                ms(s.nanos.load(Ordering::Relaxed)),
            );
            if count > 0 {
                let _ = write!(
                    out,
                    "@{}-{}",
                    ms(s.first.load(Ordering::Relaxed)),
                    ms(s.last.load(Ordering::Relaxed))
                );
            }
            if depth > 0 {
                let _ = write!(out, "^{depth}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_costs_no_clock_and_reports_nothing() {
        let s = Stages::off(&["a"]);
        assert!(s.begin().is_none());
        s.add(0, s.begin());
        s.depth(0, 3);
        assert_eq!(s.summary(), "");
    }

    #[test]
    fn on_adds_time_counts_and_depths() {
        let s = Stages::new(&["a", "b", "c"], true);
        let t = s.begin();
        s.add(0, t);
        s.add(0, t);
        s.depth(2, 7);
        let sum = s.summary();
        assert!(sum.starts_with("a=0/2@0-"), "{sum}");
        assert!(!sum.contains("b="), "{sum}");
        assert!(sum.ends_with("c=0/0^7"), "{sum}");
    }
}
