//! Pacing to a bandwidth limit: each send reserves its bytes on a virtual clock that advances
//! at the configured rate, and waits until its slot. A small burst allowance keeps the pipe
//! busy without exceeding the rate over any window longer than the burst.
//!
//! The limit is a hard ceiling above the congestion controller: the controller paces what the
//! shipper hands QUIC, and the shipper hands it no more than this. It can change while a cycle
//! runs ([`RateLimit::set_rate`], for a bandwidth schedule); the new rate applies from the next
//! send on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// No limit.
const UNLIMITED: u64 = 0;

pub struct RateLimit {
    /// Bytes per second; `UNLIMITED` for none.
    bytes_per_sec: AtomicU64,
    burst: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (`None`: unlimited until [`RateLimit::set_rate`] says otherwise).
    pub fn new(bytes_per_sec: Option<u64>) -> RateLimit {
        RateLimit {
            bytes_per_sec: AtomicU64::new(bytes_per_sec.map_or(UNLIMITED, |b| b.max(1))),
            burst: Duration::from_millis(50),
            next: Mutex::new(None),
        }
    }

    /// Changes the limit (`None`: unlimited) from the next send on.
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        let rate = bytes_per_sec.map_or(UNLIMITED, |b| b.max(1));
        if self.bytes_per_sec.swap(rate, Ordering::Relaxed) != rate {
            // Slots reserved at the old rate do not carry over.
            *self.next.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// The current limit in bytes per second, if any.
    pub fn rate(&self) -> Option<u64> {
        match self.bytes_per_sec.load(Ordering::Relaxed) {
            UNLIMITED => None,
            r => Some(r),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: u64) {
        let Some(rate) = self.rate() else { return };
        let wait_until = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = match *next {
                // Idle time does not bank more than the burst allowance.
                Some(t) if t + self.burst > now => t,
                _ => now.checked_sub(self.burst).unwrap_or(now),
            };
            let cost = Duration::from_secs_f64(n as f64 / rate as f64);
            *next = Some(start + cost);
            start + cost
        };
        let now = Instant::now();
        if wait_until > now + self.burst {
            tokio::time::sleep_until(wait_until - self.burst).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate() {
        let r = RateLimit::new(Some(1_000_000));
        let t0 = Instant::now();
        for _ in 0..100 {
            r.acquire(100_000).await;
        }
        // 10 MB at 1 MB/s: 10 s, less the burst allowance.
        let took = t0.elapsed().as_secs_f64();
        assert!((9.8..=10.05).contains(&took), "took {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_applies_from_the_next_send() {
        let r = RateLimit::new(None);
        let t0 = Instant::now();
        for _ in 0..100 {
            r.acquire(1_000_000).await;
        }
        assert!(t0.elapsed() < Duration::from_millis(1), "unlimited waits");
        // A schedule lowers the limit: 5 MB at 1 MB/s.
        r.set_rate(Some(1_000_000));
        assert_eq!(r.rate(), Some(1_000_000));
        let t1 = Instant::now();
        for _ in 0..50 {
            r.acquire(100_000).await;
        }
        let took = t1.elapsed().as_secs_f64();
        assert!((4.8..=5.05).contains(&took), "took {took}");
        // Raised again: 5 MB at 5 MB/s.
        r.set_rate(Some(5_000_000));
        let t2 = Instant::now();
        for _ in 0..50 {
            r.acquire(100_000).await;
        }
        let took = t2.elapsed().as_secs_f64();
        assert!((0.9..=1.05).contains(&took), "took {took}");
        r.set_rate(None);
        assert_eq!(r.rate(), None);
    }
}
