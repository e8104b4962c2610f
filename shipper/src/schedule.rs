//! Bandwidth by time of day (as Zerto and DRBD Proxy offer): windows of the week, each with
//! its own limit; outside them `bandwidth_limit` applies. Times are the host's local time.
//!
//! ```toml
//! bandwidth_limit = "100M"             # outside the windows
//! [[bandwidth_schedule]]
//! days = "mon-fri"                     # optional (default every day): mon,wed,fri; sat-sun
//! from = "08:00"
//! to = "18:00"                         # may cross midnight: from = "22:00", to = "06:00"
//! limit = "10M"                        # or "unlimited"
//! ```
//!
//! The first window that holds the time wins. A window crossing midnight belongs to the day
//! it starts on. The shipper checks the schedule every few seconds and changes its rate
//! limiter's rate at once (the send in flight keeps its slot).

use serde::Deserialize;

use crate::config::parse_bytes;

/// One window as written in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    #[serde(default)]
    pub days: Option<String>,
    pub from: String,
    pub to: String,
    pub limit: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Bit d: day d (0 = Monday).
    days: u8,
    /// Minutes after midnight.
    from: u32,
    to: u32,
    /// Bytes per second; None: unlimited.
    limit: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    windows: Vec<Window>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<u32, String> {
    let s = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|d| s.starts_with(d) && d.len() <= s.len())
        .map(|i| i as u32)
        .ok_or_else(|| format!("{s:?} is not a day (mon, tue, ..., sun)"))
}

fn days(s: &str) -> Result<u8, String> {
    let s = s.trim();
    if s.is_empty() || s == "*" {
        return Ok(0x7f);
    }
    let mut bits = 0u8;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    bits |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => bits |= 1 << day(part)?,
        }
    }
    Ok(bits)
}

fn minute(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time of day (HH:MM, 00:00 to 24:00)");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Schedule {
    pub fn parse(raw: &[RawWindow]) -> Result<Schedule, String> {
        let mut windows = Vec::new();
        for (i, w) in raw.iter().enumerate() {
            let at = |e: String| format!("bandwidth_schedule[{i}]: {e}");
            let limit = match w.limit.trim() {
                "unlimited" | "none" => None,
                l => Some(parse_bytes(l).map_err(at)?),
            };
            let (from, to) = (minute(&w.from).map_err(at)?, minute(&w.to).map_err(at)?);
            if from == to {
                return Err(at(format!("from and to are both {}", w.from)));
            }
            windows.push(Window {
                days: days(w.days.as_deref().unwrap_or("")).map_err(at)?,
                from,
                to,
                limit,
            });
        }
        Ok(Schedule { windows })
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The window's limit at `weekday` (0 = Monday) and `minute` after midnight, if a
    /// window holds that time: `Some(None)` for an unlimited window.
    pub fn at(&self, weekday: u32, minute: u32) -> Option<Option<u64>> {
        let yesterday = (weekday + 6) % 7;
        self.windows
            .iter()
            .find(|w| {
                let on = |d: u32| w.days & (1 << d) != 0;
                if w.from < w.to {
                    on(weekday) && (w.from..w.to).contains(&minute)
                } else {
                    (on(weekday) && minute >= w.from) || (on(yesterday) && minute < w.to)
                }
            })
            .map(|w| w.limit)
    }

    /// The limit in force now: a window's, else `default`.
    pub fn limit_now(&self, default: Option<u64>) -> Option<u64> {
        if self.windows.is_empty() {
            return default;
        }
        let (d, m) = local_now();
        self.at(d, m).unwrap_or(default)
    }
}

/// The local weekday (0 = Monday) and minute of the day.
fn local_now() -> (u32, u32) {
    // SAFETY: time(NULL) only returns the time.
    let t = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: a zeroed tm is a valid out-parameter; localtime_r is the reentrant form and
    // fills it from `t` (which lives across the call), reading the zone from TZ or
    // /etc/localtime; nothing in this program changes TZ while it runs.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return (0, 0);
    }
    (
        ((tm.tm_wday + 6) % 7) as u32,
        (tm.tm_hour * 60 + tm.tm_min) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days: Option<&str>, from: &str, to: &str, limit: &str) -> RawWindow {
        RawWindow {
            days: days.map(str::to_string),
            from: from.into(),
            to: to.into(),
            limit: limit.into(),
        }
    }

    #[test]
    fn windows_by_day_and_time_including_across_midnight() {
        let s = Schedule::parse(&[
            w(Some("mon-fri"), "08:00", "18:00", "10M"),
            w(None, "22:00", "06:00", "unlimited"),
            w(Some("sat,sun"), "00:00", "24:00", "50M"),
        ])
        .unwrap();
        let (mon, fri, sat) = (0, 4, 5);
        assert_eq!(s.at(mon, 9 * 60), Some(Some(10 << 20)));
        assert_eq!(s.at(mon, 18 * 60), None, "the end is not in the window");
        assert_eq!(s.at(mon, 23 * 60), Some(None));
        assert_eq!(s.at(sat, 3 * 60), Some(None), "friday night's window");
        assert_eq!(s.at(sat, 12 * 60), Some(Some(50 << 20)));
        assert_eq!(s.at(fri, 5 * 60), Some(None), "thursday night's window");
        assert_eq!(s.at(fri, 7 * 60), None);
        assert_eq!(s.at(fri, 20 * 60), None);
        assert_eq!(Schedule::default().limit_now(Some(5)), Some(5));
        assert_eq!(
            days("fri-mon").unwrap(),
            0b111_0001,
            "a range wraps the week"
        );
        for bad in [
            w(None, "8", "18:00", "1M"),
            w(None, "08:00", "25:00", "1M"),
            w(None, "08:00", "08:00", "1M"),
            w(Some("someday"), "08:00", "09:00", "1M"),
            w(None, "08:00", "09:00", "lots"),
        ] {
            let e = Schedule::parse(std::slice::from_ref(&bad)).unwrap_err();
            assert!(e.starts_with("bandwidth_schedule[0]"), "{bad:?}: {e}");
        }
    }
}
