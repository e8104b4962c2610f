//! Rate-limited logging: a line that can repeat (an accept loop out of descriptors, a failing
//! disk under a busy guest) is written at most once per interval per call site and key, with
//! the number of repeats it stood for.
//!
//! ```
//! use std::time::Duration;
//! use vmreplica_common::ratelog::RateLimit;
//!
//! static ACCEPT_FAILED: RateLimit = RateLimit::new(Duration::from_secs(10));
//! for _ in 0..1000 {
//!     if let Some(suppressed) = ACCEPT_FAILED.allow() {
//!         eprintln!("accept failed ({suppressed} more since the last report)");
//!     }
//! }
//! ```
//!
//! Or, for `tracing`, the [`crate::warn_limited!`] and [`crate::error_limited!`] macros, which
//! keep one limiter per call site and add a `suppressed` field when repeats were dropped.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys remembered per limiter; the least recently reported is forgotten beyond this.
const MAX_KEYS: usize = 256;

struct Entry {
    key: String,
    last: Instant,
    suppressed: u64,
}

/// At most one report per `interval` for each key.
pub struct RateLimit {
    interval: Duration,
    entries: Mutex<Vec<Entry>>,
}

impl RateLimit {
    pub const fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// [`RateLimit::allow_key`] with one key for the whole limiter.
    pub fn allow(&self) -> Option<u64> {
        self.allow_key("")
    }

    /// `Some(n)` if a line for `key` may be written now (`n` lines for it were suppressed since
    /// the last one), `None` to drop this one.
    pub fn allow_key(&self, key: &str) -> Option<u64> {
        self.allow_key_at(key, Instant::now())
    }

    fn allow_key_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.iter_mut().find(|e| e.key == key) {
            if now.saturating_duration_since(e.last) < self.interval {
                e.suppressed += 1;
                return None;
            }
            e.last = now;
            return Some(std::mem::take(&mut e.suppressed));
        }
        if entries.len() >= MAX_KEYS {
            if let Some(oldest) = entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last)
                .map(|(i, _)| i)
            {
                entries.swap_remove(oldest);
            }
        }
        entries.push(Entry {
            key: key.to_string(),
            last: now,
            suppressed: 0,
        });
        Some(0)
    }
}

/// `tracing::warn!` at most once per interval for this call site (and key, if given):
/// `warn_limited!(Duration::from_secs(10), "accept failed: {e}")`, or with a key,
/// `warn_limited!(Duration::from_secs(10), key = &disk, "...")`.
#[macro_export]
macro_rules! warn_limited {
    ($interval:expr, key = $key:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelog::RateLimit = $crate::ratelog::RateLimit::new($interval);
        if let Some(suppressed) = LIMIT.allow_key($key) {
            if suppressed > 0 {
                ::tracing::warn!(suppressed, $($arg)+);
            } else {
                ::tracing::warn!($($arg)+);
            }
        }
    }};
    ($interval:expr, $($arg:tt)+) => {
        $crate::warn_limited!($interval, key = "", $($arg)+)
    };
}

/// `tracing::error!` at most once per interval for this call site (and key): see
/// [`crate::warn_limited!`].
#[macro_export]
macro_rules! error_limited {
    ($interval:expr, key = $key:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelog::RateLimit = $crate::ratelog::RateLimit::new($interval);
        if let Some(suppressed) = LIMIT.allow_key($key) {
            if suppressed > 0 {
                ::tracing::error!(suppressed, $($arg)+);
            } else {
                ::tracing::error!($($arg)+);
            }
        }
    }};
    ($interval:expr, $($arg:tt)+) => {
        $crate::error_limited!($interval, key = "", $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_key_with_the_count_of_repeats() {
        let l = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow_key_at("a", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.allow_key_at("a", t0 + Duration::from_secs(i)), None);
        }
        // Another key is limited on its own.
        assert_eq!(l.allow_key_at("b", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(l.allow_key_at("a", t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.allow_key_at("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(l.allow_key_at("a", t0 + Duration::from_secs(20)), Some(1));
    }

    #[test]
    fn keys_are_bounded() {
        let l = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS as u64 * 3) {
            assert_eq!(
                l.allow_key_at(&i.to_string(), t0 + Duration::from_millis(i)),
                Some(0)
            );
        }
        assert_eq!(l.entries.lock().unwrap().len(), MAX_KEYS);
    }

    #[test]
    fn macros_compile_and_limit() {
        for i in 0..3 {
            crate::warn_limited!(Duration::from_secs(60), "repeated warning {i}");
            crate::error_limited!(
                Duration::from_secs(60),
                key = "k",
                disk = i,
                "repeated error"
            );
        }
    }
}
