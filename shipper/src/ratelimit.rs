//! Pacing to a bandwidth limit: each send reserves its bytes on a virtual clock that advances
//! at the configured rate, and waits until its slot. A small burst allowance keeps the pipe
//! busy without exceeding the rate over any window longer than the burst.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimit {
    bytes_per_sec: u64,
    burst: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit {
            bytes_per_sec: bytes_per_sec.max(1),
            burst: Duration::from_millis(50),
            next: Mutex::new(None),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: u64) {
        let wait_until = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = match *next {
                // Idle time does not bank more than the burst allowance.
                Some(t) if t + self.burst > now => t,
                _ => now.checked_sub(self.burst).unwrap_or(now),
            };
            let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
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
        let r = RateLimit::new(1_000_000);
        let t0 = Instant::now();
        for _ in 0..100 {
            r.acquire(100_000).await;
        }
        // 10 MB at 1 MB/s: 10 s, less the burst allowance.
        let took = t0.elapsed().as_secs_f64();
        assert!((9.8..=10.05).contains(&took), "took {took}");
    }
}
