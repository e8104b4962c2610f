//! Where a receiving cycle's images have holes, as far as the pipeline has asked: the answers
//! of `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`, kept per disk for the life of one pipeline,
//! so that capturing a cycle's old contents asks the kernel about a few extents rather than
//! once per range (a delta of 16,384 random 64 KiB blocks spent 0.2 to 0.9 s of a 7 to 8 s
//! cycle on one `SEEK_DATA` per range, each contending on the inode with the pipeline's own
//! `O_DIRECT` writes). A fully allocated image costs one call for the whole cycle.
//!
//! Why an answer stays true while the pipeline runs, although the pipeline writes and punches
//! the same images meanwhile:
//!
//! - The pipeline asks only about ranges its cycle's undo log does not cover yet
//!   (`Pipeline::capture` in `receive`), and it writes (or punches) into an image only
//!   ranges that the log covers, after their entries are durable. A cycle's coverage only
//!   grows (entries are never taken out of a log in progress). So no byte that is asked about
//!   was written since the pipeline started, and none that will be asked about later is
//!   written before it is asked about. Writes of covered ranges allocate (or deallocate) only
//!   blocks that hold covered bytes; an uncovered byte keeps what it held.
//! - Before the pipeline started, every byte this cycle wrote (in an earlier attempt, before
//!   a restart or a reconnect) is covered: writes wait for their entries' sync, and the
//!   coverage of a pipeline's log is what the log durably holds (rebuilt from the file after
//!   a restart). So "uncovered" means "as it was when the cycle started".
//! - Nothing else writes an image while a pipeline runs: a rollback (also the one a failover,
//!   a promote or a new cycle starts with), a settle after an unsure save and a commit all
//!   stop the pipeline first (`take_partial`, `settle`), and the images of a running VM
//!   (failover, adopted images) are held, so no cycle starts on them. A resumed attempt of
//!   the same cycle (`Msg::Epoch`) keeps the pipeline, its log and so its knowledge; a new
//!   attempt after a restart, a failure or a rollback gets a new pipeline and starts
//!   knowing nothing.
//! - An initial copy (`capture == false`) asks nothing: no undo log, no hole checks, and it
//!   writes where nothing is covered; its pipeline never consults this.
//!
//! So an answer that `[a, b)` has no data (reads as zeroes) holds for every uncovered part of
//! `[a, b)` until the pipeline stops, even after covered parts of it were written: those
//! parts are never asked about again. An answer that `[a, b)` is data only ever leads to
//! reading the range, which is right whatever it holds. Two answers about the same bytes can
//! differ only where covered bytes changed in between (or, on a filesystem whose blocks are
//! larger than a chunk's alignment, where an uncovered byte shares a block with a written
//! one: it still reads as zeroes, and whichever answer is kept is right); the newer answer
//! is kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;

use vmreplica_common::sparse::{seek_data, seek_hole};

/// Spans one disk remembers, about at most: a badly fragmented sparse image forgets them all
/// when it has this many, and learns again (a span is a few dozen bytes in the map).
pub(crate) const MAX_SPANS: usize = 4096;

/// Calls one disk may make beyond one per range asked about: learning a span whole (a second
/// call, or one from where the span before ends) pays only where later ranges fall into it.
/// Where they do not (a badly fragmented image), it asks as [`sparse::is_hole`] did, one call
/// per range, remembering only what that call tells; so it never costs more than that, but
/// for this many calls.
///
/// [`sparse::is_hole`]: vmreplica_common::sparse::is_hole
pub(crate) const CREDIT: u64 = 64;

/// What is known of one image's holes: disjoint spans, each all data or all hole.
pub(crate) struct Holes {
    /// The image's size: past it there is no data.
    size: u64,
    /// start -> (end, data); adjacent spans of one kind are merged.
    spans: BTreeMap<u64, (u64, bool)>,
    /// `lseek` calls made, for the stage log and tests.
    seeks: u64,
    /// Ranges asked about.
    asked: u64,
}

/// What the spans tell of a range.
enum Known {
    Hole,
    Data,
    /// Not known from here on (everything before it is hole).
    From(u64),
}

impl Holes {
    pub fn new(size: u64) -> Holes {
        Holes {
            size,
            spans: BTreeMap::new(),
            seeks: 0,
            asked: 0,
        }
    }

    /// `lseek` calls made so far.
    pub fn seeks(&self) -> u64 {
        self.seeks
    }

    /// Ranges asked about so far.
    #[cfg(test)]
    pub fn asked(&self) -> u64 {
        self.asked
    }

    /// Spans remembered now.
    #[cfg(test)]
    pub fn spans(&self) -> usize {
        self.spans.len()
    }

    /// Whether `[start, end)` of `f` (this image) is all hole: what
    /// [`vmreplica_common::sparse::is_hole`] answered when the pipeline started, for a range
    /// the cycle has not captured (see the module's comment for why that is all it is asked
    /// about). Asks the kernel only about what no earlier answer told.
    pub fn is_hole(&mut self, f: &File, start: u64, end: u64) -> io::Result<bool> {
        let end = end.min(self.size);
        if start >= end {
            return Ok(true);
        }
        self.asked += 1;
        // Bounded memory: a query adds at most a few spans, so this is the only check needed.
        if self.spans.len() >= MAX_SPANS {
            self.spans.clear();
        }
        let mut anchored = false;
        loop {
            let at = match self.known(start, end) {
                Known::Hole => return Ok(true),
                Known::Data => return Ok(false),
                Known::From(at) => at,
            };
            if self.seeks >= self.asked + CREDIT {
                // Learning did not pay: the one call that answers the rest of the range.
                return self.ask(f, at, end);
            }
            // The span before `at` ends at or before it (`at` is not known). Its end is where
            // the kernel said its kind changes, so one call from there learns the next span
            // whole: once per query, a gap before the range is filled from its left (a fully
            // allocated image is then learnt in one call, from 0); otherwise ask from `at`.
            let left = self
                .spans
                .range(..at)
                .next_back()
                .map(|(_, &(e, d))| (e, d));
            let (pos, data_first) = match left {
                Some((e, d)) if e == at => (at, !d),
                Some((e, d)) if !anchored => {
                    anchored = true;
                    (e, !d)
                }
                None if !anchored => {
                    anchored = true;
                    // Images mostly start with data (a partition table, a boot sector).
                    (0, true)
                }
                _ => (at, false),
            };
            if !self.learn(f, pos, data_first)? && pos == at {
                // The kernel told nothing past `at` (it should not happen): read the range,
                // which is right whatever it holds.
                return Ok(false);
            }
        }
    }

    /// What the spans tell of `[start, end)`: data if any known data span overlaps it, hole
    /// if hole spans cover it, else the first position not known.
    fn known(&self, start: u64, end: u64) -> Known {
        let first = self
            .spans
            .range(..=start)
            .next_back()
            .filter(|(_, &(e, _))| e > start)
            .map_or(start, |(&s, _)| s);
        let mut pos = start;
        let mut gap = None;
        for (&s, &(e, data)) in self.spans.range(first..end) {
            if data {
                return Known::Data;
            }
            if s > pos && gap.is_none() {
                gap = Some(pos);
            }
            pos = e;
        }
        match gap {
            Some(g) => Known::From(g),
            None if pos < end => Known::From(pos),
            None => Known::Hole,
        }
    }

    /// Whether `[at, end)` is all hole, with one call; remembers the hole it tells of.
    fn ask(&mut self, f: &File, at: u64, end: u64) -> io::Result<bool> {
        self.seeks += 1;
        let data = seek_data(f, at)?.unwrap_or(self.size).min(self.size);
        self.insert(at, data, false);
        Ok(data >= end)
    }

    /// Asks the kernel what lies at `pos` (first whether it is data, if `data_first`) and
    /// remembers the span that starts there. False if it learnt nothing.
    fn learn(&mut self, f: &File, pos: u64, data_first: bool) -> io::Result<bool> {
        if pos >= self.size {
            return Ok(false);
        }
        if data_first {
            self.seeks += 1;
            let hole = seek_hole(f, pos)?.unwrap_or(self.size).min(self.size);
            if hole > pos {
                self.insert(pos, hole, true);
                return Ok(true);
            }
        }
        self.seeks += 1;
        match seek_data(f, pos)? {
            None => {
                self.insert(pos, self.size, false);
                Ok(true)
            }
            Some(data) if data > pos => {
                self.insert(pos, data.min(self.size), false);
                Ok(true)
            }
            Some(_) => {
                self.seeks += 1;
                let hole = seek_hole(f, pos)?.unwrap_or(self.size).min(self.size);
                if hole > pos {
                    self.insert(pos, hole, true);
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Remembers that `[a, b)` is data (or hole): merged with the spans of its kind it
    /// touches; where it overlaps spans of the other kind, it wins (it is the newer answer).
    fn insert(&mut self, a: u64, b: u64, data: bool) {
        if a >= b {
            return;
        }
        let touching: Vec<(u64, u64, bool)> = self
            .spans
            .range(..=b)
            .rev()
            .take_while(|(_, &(e, _))| e >= a)
            .map(|(&s, &(e, d))| (s, e, d))
            .collect();
        let (mut lo, mut hi) = (a, b);
        for (s, e, d) in touching {
            if d == data {
                self.spans.remove(&s);
                lo = lo.min(s);
                hi = hi.max(e);
            } else if s < b && e > a {
                self.spans.remove(&s);
                if s < a {
                    self.spans.insert(s, (a, d));
                }
                if e > b {
                    self.spans.insert(b, (e, d));
                }
            }
        }
        self.spans.insert(lo, (hi, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::FileExt;
    use vmreplica_common::sparse::is_hole;

    const BLOCK: u64 = 64 << 10;

    fn file(size: u64) -> (tempfile::TempDir, File) {
        // /var/tmp: a real filesystem, with holes (/tmp may be a tmpfs).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        f.set_len(size).unwrap();
        (dir, f)
    }

    /// Every answer is the kernel's, on a file with data at scattered offsets (its first and
    /// last blocks among them), for random ranges: inside holes and data, across their
    /// boundaries, up to the end of the file.
    #[test]
    fn answers_as_the_kernel_does_on_a_sparse_file() {
        let size = 64 << 20;
        let (_dir, f) = file(size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut offsets = vec![0, size - 8192];
        offsets.extend((0..40).map(|_| rng.gen_range(0..size / 4096) * 4096));
        for &o in &offsets {
            let len = (rng.gen_range(1..64) * 4096).min(size - o);
            f.write_all_at(&vec![1u8; len as usize], o).unwrap();
        }
        // Where the kernel puts the boundaries (it may round them to its blocks).
        let mut edges: Vec<u64> = vec![0, size];
        for (s, e) in vmreplica_common::sparse::data_regions_in(&f, 0, size).unwrap() {
            edges.extend([s, e]);
        }
        assert!(edges.len() > 20, "the file has holes: {edges:?}");
        let mut holes = Holes::new(size);
        let (mut yes, mut no) = (0, 0);
        for i in 0..20_000 {
            let (s, e) = match i % 4 {
                // Around a boundary.
                0 => {
                    let b = edges[rng.gen_range(0..edges.len())];
                    let s = b.saturating_sub(rng.gen_range(0..3) * 4096);
                    (s, (b + rng.gen_range(0..3) * 4096).min(size))
                }
                // Up to the end of the file.
                1 => (rng.gen_range(0..size / 4096) * 4096, size),
                // A block, or a few bytes (a byte's worth of either).
                2 => {
                    let s = rng.gen_range(0..size);
                    (s, (s + rng.gen_range(1..16)).min(size))
                }
                _ => {
                    let s = rng.gen_range(0..size / BLOCK) * BLOCK;
                    (s, (s + rng.gen_range(1..8) * BLOCK).min(size))
                }
            };
            if s >= e {
                continue;
            }
            let want = is_hole(&f, s, e - s).unwrap();
            assert_eq!(holes.is_hole(&f, s, e).unwrap(), want, "[{s}, {e})");
            if want {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(
            yes > 1000 && no > 1000,
            "both kinds asked: {yes} holes, {no} data"
        );
        assert!(holes.seeks() < 2_000, "{} calls", holes.seeks());
    }

    /// A fully allocated image (the common case of a delta): a cycle's worth of random blocks
    /// costs a call or two in all, not one per range.
    #[test]
    fn a_fully_allocated_image_costs_a_call_or_two() {
        let size = 64 << 20;
        let (_dir, f) = file(0);
        let chunk = vec![7u8; 4 << 20];
        for at in (0..size).step_by(chunk.len()) {
            f.write_all_at(&chunk, at).unwrap();
        }
        let mut holes = Holes::new(size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..16_384 {
            let s = rng.gen_range(0..size / BLOCK) * BLOCK;
            assert!(!holes.is_hole(&f, s, s + BLOCK).unwrap());
        }
        assert!(holes.seeks() <= 2, "{} calls", holes.seeks());
    }

    /// An image allocated but for a hole at its start: a few calls.
    #[test]
    fn a_hole_at_the_start_costs_a_few_calls() {
        let size = 64 << 20;
        let (_dir, f) = file(size);
        let chunk = vec![7u8; 4 << 20];
        for at in (4 << 20..size).step_by(chunk.len()) {
            f.write_all_at(&chunk, at).unwrap();
        }
        let mut holes = Holes::new(size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for _ in 0..16_384 {
            let s = rng.gen_range(0..size / BLOCK) * BLOCK;
            let want = s < 4 << 20;
            assert_eq!(holes.is_hole(&f, s, s + BLOCK).unwrap(), want, "{s}");
        }
        assert!(holes.seeks() <= 6, "{} calls", holes.seeks());
    }

    /// An empty (all hole) image costs a call or two as well.
    #[test]
    fn an_empty_image_costs_a_call_or_two() {
        let size = 64 << 20;
        let (_dir, f) = file(size);
        let mut holes = Holes::new(size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..4096 {
            let s = rng.gen_range(0..size / BLOCK) * BLOCK;
            assert!(holes.is_hole(&f, s, s + BLOCK).unwrap());
        }
        assert!(holes.seeks() <= 2, "{} calls", holes.seeks());
    }

    /// Very many alternating holes and data blocks: the spans stay bounded, and the answers
    /// right.
    #[test]
    fn memory_stays_bounded_on_a_fragmented_image() {
        let size = 64 << 20;
        let (_dir, f) = file(size);
        // Data in every other 4 KiB: 8192 data spans and as many holes.
        let step = 8 << 10;
        let data = vec![3u8; 4 << 10];
        for at in (0..size).step_by(step) {
            f.write_all_at(&data, at).unwrap();
        }
        let mut holes = Holes::new(size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut most = 0;
        for _ in 0..40_000 {
            let s = rng.gen_range(0..size / 4096) * 4096;
            let e = (s + rng.gen_range(1..4) * 4096).min(size);
            let want = is_hole(&f, s, e - s).unwrap();
            assert_eq!(holes.is_hole(&f, s, e).unwrap(), want, "[{s}, {e})");
            most = most.max(holes.spans());
        }
        assert!(most <= MAX_SPANS + 8, "{most} spans");
        // Learning spans hardly pays here: no more calls than one per range, but a few.
        assert!(
            holes.seeks() <= holes.asked() + CREDIT + 2,
            "{} calls for {} ranges",
            holes.seeks(),
            holes.asked()
        );
        assert!(most >= MAX_SPANS / 2, "it did fill up: {most} spans");
    }

    /// Spans of one kind merge; a newer answer of the other kind cuts an older span.
    #[test]
    fn spans_merge_and_newer_answers_win() {
        let mut h = Holes::new(100);
        h.insert(10, 20, true);
        h.insert(20, 30, true);
        h.insert(5, 12, true);
        assert_eq!(h.spans.iter().collect::<Vec<_>>(), [(&5, &(30, true))]);
        h.insert(30, 40, false);
        h.insert(15, 18, false);
        assert_eq!(
            h.spans.iter().collect::<Vec<_>>(),
            [
                (&5, &(15, true)),
                (&15, &(18, false)),
                (&18, &(30, true)),
                (&30, &(40, false))
            ]
        );
        h.insert(0, 100, true);
        assert_eq!(h.spans.iter().collect::<Vec<_>>(), [(&0, &(100, true))]);
        assert!(matches!(h.known(3, 7), Known::Data));
    }
}
