//! Recovery points and their retention: time tiers as DR users expect them (every point for
//! a while, then one per hour, then one per day), with an optional cap on the count. A point
//! is dropped by merging the undo logs on either side of it; a point a view holds open is
//! never dropped.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use super::state::{PointInfo, UndoRef};
use super::{StoreError, VmStore};
use crate::undo::{self, LogIndex};

/// How long points are kept. Times are in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Every point younger than this is kept.
    pub all_for: u64,
    /// Then the newest point of each clock hour, for points younger than this.
    pub hourly_for: u64,
    /// Then the newest point of each day (UTC), for points younger than this; older points
    /// are dropped.
    pub daily_for: u64,
    /// At most this many points (the oldest go first); None: no cap.
    pub keep: Option<usize>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            all_for: 3600,
            hourly_for: 24 * 3600,
            daily_for: 7 * 24 * 3600,
            keep: None,
        }
    }
}

impl Retention {
    /// Keeps every point (tests, and users who thin points themselves).
    pub fn keep_all() -> Retention {
        Retention {
            all_for: u64::MAX,
            hourly_for: u64::MAX,
            daily_for: u64::MAX,
            keep: None,
        }
    }
}

/// The points (cycles) retention `r` drops from `points` (oldest first) at time `now`; the
/// newest point and pinned points are always kept.
pub fn plan_retention(
    points: &[PointInfo],
    now: u64,
    r: &Retention,
    pinned: &BTreeSet<u64>,
) -> Vec<u64> {
    let Some(newest) = points.last().map(|p| p.cycle) else {
        return Vec::new();
    };
    let mut hours = HashSet::new();
    let mut days = HashSet::new();
    let mut kept: Vec<u64> = Vec::new();
    let mut dropped: BTreeSet<u64> = BTreeSet::new();
    // Newest first: within an hour or a day, the newest point stays.
    for p in points.iter().rev() {
        let age = now.saturating_sub(p.applied_at);
        let (hour, day) = (p.applied_at / 3600, p.applied_at / 86400);
        let keep = if p.cycle == newest || pinned.contains(&p.cycle) || age < r.all_for {
            true
        } else if age < r.hourly_for {
            !hours.contains(&hour)
        } else if age < r.daily_for {
            !days.contains(&day)
        } else {
            false
        };
        if keep {
            hours.insert(hour);
            days.insert(day);
            kept.push(p.cycle);
        } else {
            dropped.insert(p.cycle);
        }
    }
    if let Some(cap) = r.keep {
        // Oldest first, but never the newest or a pinned one.
        for c in kept.iter().rev() {
            if kept.len() - dropped.iter().filter(|d| kept.contains(d)).count() <= cap.max(1) {
                break;
            }
            if *c != newest && !pinned.contains(c) {
                dropped.insert(*c);
            }
        }
    }
    dropped.into_iter().collect()
}

impl VmStore {
    /// Applies the retention policy at time `now`.
    pub(crate) fn retain(&mut self, now: u64) -> Result<(), StoreError> {
        self.settle()?;
        let mut pinned = self.shared.pinned();
        // A test failover's point stays, also while its view is not open (an applier
        // restarting serves it again).
        pinned.extend(self.state.tests.iter().map(|t| t.point));
        let drop = plan_retention(&self.state.points, now, &self.retention, &pinned);
        for cycle in drop {
            if !self.shared.unpinned_take(cycle) {
                continue;
            }
            self.drop_point(cycle)?;
        }
        Ok(())
    }

    /// Drops point `cycle` (not the newest): merges the undo logs on either side of it into
    /// one (written whole before the state refers to it), saves the state, then removes the
    /// logs no longer referred to.
    pub(crate) fn drop_point(&mut self, cycle: u64) -> Result<(), StoreError> {
        if self.state.newest_point() == cycle {
            return Ok(());
        }
        let newer = self.state.undo.iter().find(|u| u.to == cycle).cloned();
        let older = self.state.undo.iter().find(|u| u.from == cycle).cloned();
        let mut next = self.state.clone();
        next.points.retain(|p| p.cycle != cycle);
        let mut gone: Vec<UndoRef> = Vec::new();
        let mut merged: Option<(UndoRef, Arc<LogIndex>)> = None;
        match (newer, older) {
            (Some(n), Some(o)) => {
                let (np, op) = (self.undo_path(&n.file), self.undo_path(&o.file));
                let nl = undo::Loaded::open(&np).map_err(self.io(&np))?;
                let ol = undo::Loaded::open(&op).map_err(self.io(&op))?;
                let file = format!("{}-{}.undo", n.from, o.to);
                let mp = self.undo_path(&file);
                let bytes = undo::log::merge(&ol, &nl, &mp).map_err(self.io(&mp))?;
                let ml = undo::Loaded::open(&mp).map_err(self.io(&mp))?;
                let idx = LogIndex::open(n.from, o.to, &mp, ml.entries).map_err(self.io(&mp))?;
                let r = UndoRef {
                    from: n.from,
                    to: o.to,
                    file,
                    bytes,
                };
                next.undo.retain(|u| u.file != n.file && u.file != o.file);
                next.undo.push(r.clone());
                gone = vec![n, o];
                merged = Some((r, Arc::new(idx)));
            }
            (Some(n), None) => {
                // The oldest point: the log leading back to it is not needed any more.
                next.undo.retain(|u| u.file != n.file);
                gone = vec![n];
            }
            _ => {}
        }
        next.undo.sort_by_key(|u| u.from);
        next.refresh_point_sizes();
        if let Err(e) = self.commit_state(next) {
            if let Some((r, _)) = merged.as_ref().filter(|_| !self.unsynced()) {
                let _ = undo::log::remove(&self.undo_path(&r.file));
            }
            self.shared.publish(&self.state);
            return Err(e);
        }
        {
            let mut chain = self.shared.chain.write().unwrap_or_else(|e| e.into_inner());
            chain
                .logs
                .retain(|l| !gone.iter().any(|g| g.from == l.from && g.to == l.to));
            if let Some((_, idx)) = merged {
                chain.logs.push(idx);
                chain.logs.sort_by_key(|l| l.from);
            }
        }
        for g in gone {
            let p = self.undo_path(&g.file);
            undo::log::remove(&p).map_err(self.io(&p))?;
        }
        tracing::info!(vm = %self.vm(), cycle, "recovery point dropped (retention)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(times: &[u64]) -> Vec<PointInfo> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| PointInfo {
                cycle: i as u64 + 1,
                applied_at: *t,
                kind: "delta".into(),
                bytes: 0,
                app_consistent: false,
            })
            .collect()
    }

    #[test]
    fn tiers_keep_everything_recent_then_one_per_hour_then_one_per_day() {
        const H: u64 = 3600;
        const D: u64 = 86400;
        let now = 100 * D + 30 * 60; // half past midnight, day 100
        let r = Retention::default();
        let times = [
            now - 9 * D,           // 1: older than 7 days: dropped
            now - 6 * D - 2 * H,   // 2: day tier
            now - 6 * D - H,       // 3: same day as 2, newer: kept, 2 dropped
            now - 3 * D,           // 4: day tier, its own day
            now - 5 * H - 20 * 60, // 5: hourly tier
            now - 5 * H - 10 * 60, // 6: same hour as 5, newer: kept
            now - 2 * H,           // 7: hourly, own hour
            now - 40 * 60,         // 8: within the hour: kept
            now - 30 * 60,         // 9
            now - 60,              // 10: newest
        ];
        let p = pts(&times);
        let none = BTreeSet::new();
        assert_eq!(plan_retention(&p, now, &r, &none), vec![1, 2, 5]);
        // Pinned points are never dropped.
        let pinned: BTreeSet<u64> = [1, 5].into();
        assert_eq!(plan_retention(&p, now, &r, &pinned), vec![2]);
        // A cap drops the oldest of what the tiers keep, never the newest or a pinned one.
        let capped = Retention { keep: Some(4), ..r };
        assert_eq!(
            plan_retention(&p, now, &capped, &none),
            vec![1, 2, 3, 4, 5, 6]
        );
        assert_eq!(
            plan_retention(&p, now, &capped, &[3].into()),
            vec![1, 2, 4, 5, 6, 7]
        );
        let one = Retention {
            keep: Some(1),
            ..Retention::keep_all()
        };
        assert_eq!(plan_retention(&p, now, &one, &none).len(), 9);
        assert!(plan_retention(&p, now, &Retention::keep_all(), &none).is_empty());
        // Time goes on (a fake clock): a day later, the hourly points fall to daily.
        let later = now + D;
        assert_eq!(
            plan_retention(&p, later, &r, &none),
            vec![1, 2, 3, 5, 6, 7, 9]
        );
        assert!(plan_retention(&[], now, &r, &none).is_empty());
    }
}
