//! Sets of byte ranges per disk, kept merged (disjoint, adjacent ranges joined), so that two
//! sets holding the same bytes are equal and have the same [`RangeSet::digest`].
//!
//! The applier records what a cycle has durably applied as one, and answers a resuming
//! shipper with it; the shipper plans what is left by subtracting it; the manifest proves a
//! cycle complete by the digest of the whole set; the undo log's coverage (what a cycle has
//! captured) is one too.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::Xxh3;

/// One range of a disk (by index in the cycle's disk list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub disk: u16,
    pub offset: u64,
    pub len: u64,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// Per disk: start → end, disjoint and not touching.
    disks: BTreeMap<u16, BTreeMap<u64, u64>>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    pub fn is_empty(&self) -> bool {
        self.disks.values().all(|m| m.is_empty())
    }

    /// Ranges held (after merging).
    pub fn len(&self) -> usize {
        self.disks.values().map(|m| m.len()).sum()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.iter().map(|r| r.len).sum()
    }

    /// Adds `[start, end)` of `disk`.
    pub fn insert(&mut self, disk: u16, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let m = self.disks.entry(disk).or_default();
        let (mut s, mut e) = (start, end);
        // Every range that overlaps or touches [s, e).
        let touching: Vec<(u64, u64)> = m
            .range(..=e)
            .rev()
            .take_while(|(_, re)| **re >= s)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, b) in touching {
            m.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        m.insert(s, e);
    }

    pub fn insert_range(&mut self, r: Range) {
        self.insert(r.disk, r.offset, r.end());
    }

    /// Removes `[start, end)` of `disk`.
    pub fn remove(&mut self, disk: u16, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let Some(m) = self.disks.get_mut(&disk) else {
            return;
        };
        let over: Vec<(u64, u64)> = m
            .range(..end)
            .rev()
            .take_while(|(_, re)| **re > start)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, b) in over {
            m.remove(&a);
            if a < start {
                m.insert(a, start);
            }
            if b > end {
                m.insert(end, b);
            }
        }
    }

    /// The held parts of `[start, end)` of `disk`, in order.
    pub fn overlapping(&self, disk: u16, start: u64, end: u64) -> Vec<(u64, u64)> {
        let Some(m) = self.disks.get(&disk) else {
            return Vec::new();
        };
        let mut over: Vec<(u64, u64)> = m
            .range(..end)
            .rev()
            .take_while(|(_, re)| **re > start)
            .map(|(a, b)| ((*a).max(start), (*b).min(end)))
            .collect();
        over.reverse();
        over
    }

    /// The parts of `[start, end)` of `disk` not held, in order.
    pub fn uncovered(&self, disk: u16, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        for (a, b) in self.overlapping(disk, start, end) {
            if a > pos {
                out.push((pos, a));
            }
            pos = b;
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }

    /// Whether every byte of `[start, end)` of `disk` is held.
    pub fn contains(&self, disk: u16, start: u64, end: u64) -> bool {
        self.uncovered(disk, start, end).is_empty()
    }

    /// Adds every range of `other`.
    pub fn union(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.insert_range(r);
        }
    }

    /// The ranges, by disk then offset.
    pub fn iter(&self) -> impl Iterator<Item = Range> + '_ {
        self.disks.iter().flat_map(|(d, m)| {
            m.iter().map(move |(s, e)| Range {
                disk: *d,
                offset: *s,
                len: e - s,
            })
        })
    }

    /// A digest of the set: equal sets (the same bytes) have equal digests, whatever order
    /// and pieces they were built from.
    pub fn digest(&self) -> u64 {
        let mut h = Xxh3::new();
        for r in self.iter() {
            h.update(&r.disk.to_be_bytes());
            h.update(&r.offset.to_be_bytes());
            h.update(&r.len.to_be_bytes());
        }
        h.digest()
    }
}

impl FromIterator<Range> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range>>(iter: I) -> Self {
        let mut s = RangeSet::new();
        for r in iter {
            s.insert_range(r);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(disk: u16, offset: u64, len: u64) -> Range {
        Range { disk, offset, len }
    }

    #[test]
    fn sets_merge_subtract_and_digest_by_content() {
        let mut a = RangeSet::new();
        a.insert(0, 10, 20);
        a.insert(0, 30, 40);
        a.insert(0, 20, 30); // joins both
        a.insert(1, 0, 5);
        a.insert(0, 100, 100); // empty: ignored
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![r(0, 10, 30), r(1, 0, 5)]);
        assert_eq!((a.len(), a.bytes()), (2, 35));
        assert_eq!(a.uncovered(0, 0, 50), vec![(0, 10), (40, 50)]);
        assert_eq!(a.overlapping(0, 15, 50), vec![(15, 40)]);
        assert!(a.contains(0, 12, 38) && !a.contains(0, 5, 12) && !a.contains(2, 0, 1));
        let b: RangeSet = [r(1, 0, 5), r(0, 25, 15), r(0, 10, 16)]
            .into_iter()
            .collect();
        assert_eq!(a, b);
        assert_eq!(a.digest(), b.digest());
        let mut c = a.clone();
        c.remove(0, 15, 20);
        assert_eq!(c.uncovered(0, 10, 40), vec![(15, 20)]);
        assert_ne!(c.digest(), a.digest());
        c.insert(0, 15, 20);
        assert_eq!(c, a);
        c.remove(0, 0, 100);
        c.remove(1, 2, 3);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![r(1, 0, 2), r(1, 3, 2)]);
        assert_ne!(RangeSet::new().digest(), c.digest());
        let mut u = RangeSet::new();
        u.union(&a);
        u.union(&c);
        assert_eq!(u, a);
    }

    #[test]
    fn a_random_model_agrees() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut set = RangeSet::new();
        let mut model = vec![false; 512];
        for _ in 0..2000 {
            let s = next(500);
            let e = s + next(12);
            if next(3) == 0 {
                set.remove(0, s, e);
                model[s as usize..e as usize].fill(false);
            } else {
                set.insert(0, s, e);
                model[s as usize..e as usize].fill(true);
            }
            let mut rebuilt = vec![false; 512];
            let mut last_end = None;
            for r in set.iter() {
                assert!(
                    last_end.is_none_or(|le| le < r.offset),
                    "not merged: {set:?}"
                );
                rebuilt[r.offset as usize..r.end() as usize].fill(true);
                last_end = Some(r.end());
            }
            assert_eq!(rebuilt, model);
        }
    }
}
