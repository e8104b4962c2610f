//! A windowed maximum: the largest value seen over a sliding window of rounds, in constant
//! memory.
//!
//! Kathleen Nichols' algorithm (as in BBR): keep the best, second-best and third-best samples
//! of successively later sub-windows; when the best ages out of the window the second one takes
//! its place. The answer is exact while samples grow and at most a quarter of the window late
//! otherwise, which is what a bandwidth estimate needs.

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    value: u64,
    at: u64,
}

/// The largest value over the last `window` units of `at` (rounds).
#[derive(Clone, Debug)]
pub struct WindowedMax {
    window: u64,
    s: Option<[Sample; 3]>,
}

impl WindowedMax {
    pub fn new(window: u64) -> WindowedMax {
        WindowedMax {
            window: window.max(1),
            s: None,
        }
    }

    /// The current maximum, if any sample was taken.
    pub fn get(&self) -> Option<u64> {
        self.s.map(|s| s[0].value)
    }

    /// Forgets every sample.
    pub fn reset(&mut self) {
        self.s = None;
    }

    /// Adds `value` taken at `at` (never earlier than the previous sample).
    pub fn update(&mut self, value: u64, at: u64) {
        let new = Sample { value, at };
        let Some(mut s) = self.s else {
            self.s = Some([new; 3]);
            return;
        };
        // A new maximum, or nothing left in the window: start over from this sample.
        if value >= s[0].value || at.saturating_sub(s[2].at) > self.window {
            self.s = Some([new; 3]);
            return;
        }
        if value >= s[1].value {
            s[1] = new;
            s[2] = new;
        } else if value >= s[2].value {
            s[2] = new;
        }
        // Age out: the maximum has left the window, promote the later ones.
        let dt = at.saturating_sub(s[0].at);
        if dt > self.window {
            s[0] = s[1];
            s[1] = s[2];
            s[2] = new;
            if at.saturating_sub(s[0].at) > self.window {
                s[0] = s[1];
                s[1] = s[2];
            }
        } else if s[1] == s[0] && dt > self.window / 4 {
            // A quarter of the window passed without a second choice: take one.
            s[1] = new;
            s[2] = new;
        } else if s[2] == s[1] && dt > self.window / 2 {
            s[2] = new;
        }
        self.s = Some(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_a_falling_signal_one_window_late() {
        let mut f = WindowedMax::new(10);
        f.update(100, 0);
        for t in 1..=10 {
            f.update(50, t);
            assert_eq!(f.get(), Some(100), "round {t}: still in the window");
        }
        f.update(50, 11);
        f.update(50, 12);
        assert_eq!(f.get(), Some(50));
        f.update(70, 13);
        assert_eq!(f.get(), Some(70));
        f.reset();
        assert_eq!(f.get(), None);
    }

    #[test]
    fn a_later_second_best_takes_over_when_the_best_expires() {
        let mut f = WindowedMax::new(1000);
        f.update(90, 0);
        f.update(60, 300);
        f.update(80, 600);
        assert_eq!(f.get(), Some(90));
        // 90 expires; the second-best of the later sub-window (80) takes over, not the newest.
        f.update(10, 1100);
        assert_eq!(f.get(), Some(80));
        f.update(95, 1200);
        assert_eq!(f.get(), Some(95));
    }
}
