//! The volatile write cache of one file: what a disk with a write-back cache holds and loses at
//! a power cut.
//!
//! An [`Overlay`] sits over a backing file, which plays the disk's stable media. It records
//! writes page by page (4 KiB pages, each held whole), zeroed or punched ranges of whole
//! pages, and the file's pending size. Reads through the overlay see the newest contents;
//! [`Overlay::apply`] (an fsync) writes everything to the backing file; dropping the overlay
//! is the power cut. [`Overlay::apply_some`] models a cache that had written back some pages
//! on its own before the cut.
//!
//! Invariants: a page is either in `pages` (its full contents), or covered by `zeros` (all
//! zero), or unchanged from the backing file (which reads as zeros past its end); every byte at
//! or past `size` reads as zero, so growing the file shows zeros.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Page size of the overlay.
pub const PAGE: u64 = 4096;

/// The stable media under an overlay.
pub trait Backing {
    /// Like pread: may return fewer bytes than asked at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Deallocates `[offset, offset+len)` (reads back as zeros), keeping the size.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// lseek's SEEK_DATA (`data`) or SEEK_HOLE from `pos`: `None` past the end (ENXIO).
    fn seek(&self, pos: u64, data: bool) -> io::Result<Option<u64>>;
}

/// lseek(2) with SEEK_DATA or SEEK_HOLE; `None` for ENXIO.
pub fn seek_fd(fd: i32, pos: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

impl Backing for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate(2) on a descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // A backing file system without holes: write the zeros.
        let end = (offset + len).min(Backing::len(self)?);
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeros.len() as u64);
            FileExt::write_all_at(self, &zeros[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn seek(&self, pos: u64, data: bool) -> io::Result<Option<u64>> {
        seek_fd(self.as_raw_fd(), pos, data)
    }
}

/// Pending (not yet durable) changes to one file.
#[derive(Debug, Clone)]
pub struct Overlay {
    size: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Zeroed whole pages: start page -> end page (exclusive); disjoint, never adjacent.
    zeros: BTreeMap<u64, u64>,
}

fn page_start(p: u64) -> u64 {
    p.saturating_mul(PAGE)
}

impl Overlay {
    /// An empty overlay over a backing file of `size` bytes.
    pub fn new(size: u64) -> Overlay {
        Overlay {
            size,
            pages: BTreeMap::new(),
            zeros: BTreeMap::new(),
        }
    }

    /// The file's size as seen through the overlay.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages held with their contents.
    pub fn dirty_pages(&self) -> usize {
        self.pages.len()
    }

    fn zeroed(&self, p: u64) -> bool {
        self.zeros
            .range(..=p)
            .next_back()
            .is_some_and(|(_, e)| *e > p)
    }

    /// Removes pages `[a, b)` from the zeroed set.
    fn unzero(&mut self, a: u64, b: u64) {
        let mut hits: Vec<(u64, u64)> = Vec::new();
        if let Some((s, e)) = self.zeros.range(..a).next_back() {
            if *e > a {
                hits.push((*s, *e));
            }
        }
        hits.extend(self.zeros.range(a..b).map(|(s, e)| (*s, *e)));
        for (s, e) in hits {
            self.zeros.remove(&s);
            if s < a {
                self.zeros.insert(s, a);
            }
            if e > b {
                self.zeros.insert(b, e);
            }
        }
    }

    /// Adds pages `[a, b)` to the zeroed set (merging neighbours).
    fn zero_pages(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let (mut lo, mut hi) = (a, b);
        if let Some((s, e)) = self.zeros.range(..a).next_back() {
            if *e >= a {
                lo = *s;
                hi = hi.max(*e);
            }
        }
        let inside: Vec<(u64, u64)> = self.zeros.range(lo..=b).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in inside {
            self.zeros.remove(&s);
            hi = hi.max(e);
        }
        self.zeros.insert(lo, hi);
        let held: Vec<u64> = self.pages.range(a..b).map(|(p, _)| *p).collect();
        for p in held {
            self.pages.remove(&p);
        }
    }

    /// The page `p`, materialised (from the zeroed set or the backing file) if not yet held.
    fn page_mut(&mut self, backing: &dyn Backing, p: u64, whole: bool) -> io::Result<&mut [u8]> {
        if !self.pages.contains_key(&p) {
            let mut buf = vec![0u8; PAGE as usize].into_boxed_slice();
            if !whole && !self.zeroed(p) {
                backing.read_at(&mut buf, page_start(p))?;
            }
            self.unzero(p, p + 1);
            self.pages.insert(p, buf);
        }
        Ok(self.pages.get_mut(&p).expect("inserted above"))
    }

    /// Stores `data` at `offset` without changing the size.
    fn store(&mut self, backing: &dyn Backing, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let p = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - pos);
            let page = self.page_mut(backing, p, n == PAGE as usize)?;
            page[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file).
    pub fn read(&self, backing: &dyn Backing, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = ((PAGE as usize - in_page) as u64).min(end - at) as usize;
            let dst = (at - offset) as usize;
            if let Some(page) = self.pages.get(&p) {
                out[dst..dst + n].copy_from_slice(&page[in_page..in_page + n]);
                at += n as u64;
            } else if self.zeroed(p) {
                at += n as u64;
            } else {
                // A run of untouched pages: one read from the backing file.
                let mut q = p + 1;
                while page_start(q) < end && !self.pages.contains_key(&q) && !self.zeroed(q) {
                    q += 1;
                }
                let run_end = page_start(q).min(end);
                let len = (run_end - at) as usize;
                backing.read_at(&mut out[dst..dst + len], at)?;
                at = run_end;
            }
        }
        Ok(out)
    }

    /// Whether the bytes from `p` are data (or a hole), and where that run ends (`> p`), as
    /// seen through the overlay: pages it holds are data, ranges it zeroed are holes, the rest
    /// is as the backing file has it (holes past its end).
    fn run_at(&self, backing: &dyn Backing, p: u64) -> io::Result<(bool, u64)> {
        let page = p / PAGE;
        if self.pages.contains_key(&page) {
            return Ok((true, page_start(page + 1)));
        }
        if let Some((_, e)) = self
            .zeros
            .range(..=page)
            .next_back()
            .filter(|(_, e)| **e > page)
        {
            return Ok((false, page_start(*e)));
        }
        // Untouched by the overlay up to its next page or zeroed range.
        let next_page = self.pages.range(page + 1..).next().map(|(k, _)| *k);
        let next_zero = self.zeros.range(page + 1..).next().map(|(k, _)| *k);
        let limit = [next_page, next_zero]
            .into_iter()
            .flatten()
            .min()
            .map_or(u64::MAX, page_start);
        let len = backing.len()?;
        if p >= len {
            return Ok((false, limit));
        }
        let data_at = backing.seek(p, true)?;
        let (data, end) = match data_at {
            Some(d) if d == p => (true, backing.seek(p, false)?.unwrap_or(len)),
            Some(d) => (false, d),
            None => (false, len),
        };
        Ok((data, end.min(limit).max(p + 1)))
    }

    /// lseek's SEEK_DATA (`data`) or SEEK_HOLE from `pos` as seen through the overlay; `None`
    /// at or past the end (ENXIO). The end of the file counts as a hole.
    pub fn seek(&self, backing: &dyn Backing, pos: u64, data: bool) -> io::Result<Option<u64>> {
        let mut p = pos;
        if p >= self.size {
            return Ok(None);
        }
        while p < self.size {
            let (is_data, end) = self.run_at(backing, p)?;
            if is_data == data {
                return Ok(Some(p));
            }
            p = end;
        }
        Ok(if data { None } else { Some(self.size) })
    }

    /// A write: stores `data` at `offset`, growing the file if it ends past the size.
    pub fn write(&mut self, backing: &dyn Backing, offset: u64, data: &[u8]) -> io::Result<()> {
        self.store(backing, offset, data)?;
        self.size = self.size.max(offset + data.len() as u64);
        Ok(())
    }

    /// Zeroes `[offset, offset+len)` (punch hole or zero range); grows the file to its end
    /// unless `keep_size`.
    pub fn zero(
        &mut self,
        backing: &dyn Backing,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> io::Result<()> {
        let end = offset.saturating_add(len);
        let first_whole = offset.div_ceil(PAGE);
        let last_whole = end / PAGE;
        if first_whole >= last_whole {
            // Within one page (or across one page boundary without a whole page).
            self.store_zeros(backing, offset, end)?;
        } else {
            self.store_zeros(backing, offset, page_start(first_whole))?;
            self.zero_pages(first_whole, last_whole);
            self.store_zeros(backing, page_start(last_whole), end)?;
        }
        if !keep_size {
            self.size = self.size.max(end);
        }
        Ok(())
    }

    fn store_zeros(&mut self, backing: &dyn Backing, from: u64, to: u64) -> io::Result<()> {
        if from < to {
            self.store(backing, from, &vec![0u8; (to - from) as usize])?;
        }
        Ok(())
    }

    /// Sets the size: shrinking forgets everything past it, growing shows zeros.
    pub fn truncate(&mut self, backing: &dyn Backing, size: u64) -> io::Result<()> {
        if size < self.size {
            let first_gone = size.div_ceil(PAGE);
            self.zero_pages(first_gone, u64::MAX);
            if size % PAGE != 0 {
                let page = self.page_mut(backing, size / PAGE, false)?;
                page[(size % PAGE) as usize..].fill(0);
            }
        }
        self.size = size;
        Ok(())
    }

    /// Makes everything durable in the backing file (an fsync).
    pub fn apply(&self, backing: &dyn Backing) -> io::Result<()> {
        for (p, data) in &self.pages {
            let start = page_start(*p);
            if start >= self.size {
                continue;
            }
            let n = PAGE.min(self.size - start) as usize;
            backing.write_all_at(&data[..n], start)?;
        }
        let len = backing.len()?;
        for (a, b) in &self.zeros {
            let start = page_start(*a);
            let end = page_start(*b).min(self.size).min(len);
            if start < end {
                backing.punch(start, end - start)?;
            }
        }
        if backing.len()? != self.size {
            backing.set_len(self.size)?;
        }
        Ok(())
    }

    /// Writes back only the pages `keep` picks, and only inside the backing file's current
    /// size (a cache that wrote some pages back before the power cut; the size, punches and
    /// the remaining pages are lost). Returns how many pages were written.
    pub fn apply_some(
        &self,
        backing: &dyn Backing,
        keep: &mut dyn FnMut() -> bool,
    ) -> io::Result<usize> {
        let len = backing.len()?.min(self.size);
        let mut n = 0;
        for (p, data) in &self.pages {
            let start = page_start(*p);
            if start >= len || !keep() {
                continue;
            }
            let k = PAGE.min(len - start) as usize;
            backing.write_all_at(&data[..k], start)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// An in-memory backing file.
    #[derive(Default)]
    struct Mem(RefCell<Vec<u8>>);

    impl Backing for Mem {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let v = self.0.borrow();
            let start = (offset as usize).min(v.len());
            let n = buf.len().min(v.len() - start);
            buf[..n].copy_from_slice(&v[start..start + n]);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut v = self.0.borrow_mut();
            let end = offset as usize + buf.len();
            if v.len() < end {
                v.resize(end, 0);
            }
            v[offset as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
            let mut v = self.0.borrow_mut();
            let end = ((offset + len) as usize).min(v.len());
            if (offset as usize) < end {
                v[offset as usize..end].fill(0);
            }
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.borrow_mut().resize(len as usize, 0);
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.0.borrow().len() as u64)
        }
        /// Data wherever a byte is not zero, 4 KiB at a time (as a file system with holes).
        fn seek(&self, pos: u64, data: bool) -> io::Result<Option<u64>> {
            let v = self.0.borrow();
            let len = v.len() as u64;
            if pos >= len {
                return Ok(None);
            }
            let mut p = pos;
            while p < len {
                let page =
                    &v[(p / PAGE * PAGE) as usize..((p / PAGE + 1) * PAGE).min(len) as usize];
                if page.iter().any(|b| *b != 0) == data {
                    return Ok(Some(p));
                }
                p = (p / PAGE + 1) * PAGE;
            }
            Ok(if data { None } else { Some(len) })
        }
    }

    fn mem(data: &[u8]) -> Mem {
        Mem(RefCell::new(data.to_vec()))
    }

    fn all(o: &Overlay, b: &dyn Backing) -> Vec<u8> {
        o.read(b, 0, o.size() as usize + 100).unwrap()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn writes_are_visible_but_not_durable_until_applied() {
        let base = pattern(3 * PAGE as usize, 1);
        let b = mem(&base);
        let mut o = Overlay::new(b.len().unwrap());
        o.write(&b, 100, b"hello").unwrap();
        let mut want = base.clone();
        want[100..105].copy_from_slice(b"hello");
        assert_eq!(all(&o, &b), want);
        // The backing file is untouched: dropping the overlay is a power cut.
        assert_eq!(*b.0.borrow(), base);
        o.apply(&b).unwrap();
        assert_eq!(*b.0.borrow(), want);
    }

    #[test]
    fn overlapping_writes_keep_the_newest_bytes() {
        let b = mem(&[7u8; 10000]);
        let mut o = Overlay::new(10000);
        o.write(&b, 4000, &[1u8; 300]).unwrap();
        o.write(&b, 4200, &[2u8; 5000]).unwrap();
        o.write(&b, 0, &[3u8; 10]).unwrap();
        let mut want = vec![7u8; 10000];
        want[4000..4300].fill(1);
        want[4200..9200].fill(2);
        want[..10].fill(3);
        assert_eq!(all(&o, &b), want);
        o.apply(&b).unwrap();
        assert_eq!(*b.0.borrow(), want);
    }

    #[test]
    fn writes_past_the_end_grow_the_file_with_zeros_between() {
        let b = mem(b"abc");
        let mut o = Overlay::new(3);
        o.write(&b, 10000, b"xyz").unwrap();
        assert_eq!(o.size(), 10003);
        let got = all(&o, &b);
        assert_eq!(&got[..3], b"abc");
        assert!(got[3..10000].iter().all(|x| *x == 0));
        assert_eq!(&got[10000..], b"xyz");
        o.apply(&b).unwrap();
        assert_eq!(*b.0.borrow(), got);
    }

    #[test]
    fn punch_and_zero_range() {
        let base = pattern(8 * PAGE as usize, 3);
        let b = mem(&base);
        let mut o = Overlay::new(base.len() as u64);
        // Partial head page, two whole pages, partial tail page.
        o.zero(&b, 1000, 3 * PAGE + 500, true).unwrap();
        let mut want = base.clone();
        want[1000..(1000 + 3 * PAGE + 500) as usize].fill(0);
        assert_eq!(all(&o, &b), want);
        // A write into the punched range, then a zero range that grows the file.
        o.write(&b, PAGE + 10, b"in the hole").unwrap();
        want[(PAGE + 10) as usize..(PAGE + 21) as usize].copy_from_slice(b"in the hole");
        o.zero(&b, 7 * PAGE, 3 * PAGE, false).unwrap();
        want[7 * PAGE as usize..].fill(0);
        want.resize(10 * PAGE as usize, 0);
        assert_eq!(o.size(), 10 * PAGE);
        assert_eq!(all(&o, &b), want);
        assert_eq!(*b.0.borrow(), base);
        o.apply(&b).unwrap();
        assert_eq!(*b.0.borrow(), want);
    }

    #[test]
    fn truncate_shrinks_then_grows_with_zeros() {
        let base = pattern(5 * PAGE as usize, 5);
        let b = mem(&base);
        let mut o = Overlay::new(base.len() as u64);
        o.truncate(&b, PAGE + 7).unwrap();
        assert_eq!(all(&o, &b), base[..(PAGE + 7) as usize]);
        o.truncate(&b, 4 * PAGE).unwrap();
        let mut want = base[..(PAGE + 7) as usize].to_vec();
        want.resize(4 * PAGE as usize, 0);
        assert_eq!(all(&o, &b), want);
        o.apply(&b).unwrap();
        assert_eq!(*b.0.borrow(), want);
        // Truncate to zero and write: only the new bytes.
        let mut o = Overlay::new(b.len().unwrap());
        o.truncate(&b, 0).unwrap();
        o.write(&b, 0, b"new").unwrap();
        assert_eq!(all(&o, &b), b"new");
        o.apply(&b).unwrap();
        assert_eq!(*b.0.borrow(), b"new");
    }

    #[test]
    fn some_pages_may_be_written_back_before_the_cut() {
        let b = mem(&[0u8; 4 * PAGE as usize]);
        let mut o = Overlay::new(4 * PAGE);
        for p in 0..6 {
            o.write(&b, p * PAGE, &[p as u8 + 1; PAGE as usize])
                .unwrap();
        }
        let mut flip = false;
        let n = o
            .apply_some(&b, &mut || {
                flip = !flip;
                flip
            })
            .unwrap();
        // Pages 0 and 2 (page 4 is past the durable size), no size change.
        assert_eq!(n, 2);
        let v = b.0.borrow();
        assert_eq!(v.len(), 4 * PAGE as usize);
        assert!(v[..PAGE as usize].iter().all(|x| *x == 1));
        assert!(v[PAGE as usize..2 * PAGE as usize].iter().all(|x| *x == 0));
        assert!(v[2 * PAGE as usize..3 * PAGE as usize]
            .iter()
            .all(|x| *x == 3));
    }

    /// A tiny deterministic generator for the model test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random operations against a plain byte vector as the model, with fsyncs (the model's
    /// durable copy catches up) and power cuts (the view falls back to the durable copy).
    #[test]
    fn random_operations_match_a_model() {
        for seed in 0..200u64 {
            let mut r = Rng(seed);
            let start = pattern(r.below(6 * PAGE) as usize, seed as u8);
            let b = mem(&start);
            let mut durable = start.clone();
            let mut view = start.clone();
            let mut o = Overlay::new(start.len() as u64);
            for step in 0..60 {
                let off = r.below(8 * PAGE);
                let len = r.below(3 * PAGE) + 1;
                match r.below(10) {
                    0..=3 => {
                        let data = pattern(len as usize, r.next() as u8);
                        o.write(&b, off, &data).unwrap();
                        let end = (off + len) as usize;
                        if view.len() < end {
                            view.resize(end, 0);
                        }
                        view[off as usize..end].copy_from_slice(&data);
                    }
                    4 | 5 => {
                        let keep = r.below(2) == 0;
                        o.zero(&b, off, len, keep).unwrap();
                        let end = (off + len) as usize;
                        if !keep && view.len() < end {
                            view.resize(end, 0);
                        }
                        let e = end.min(view.len());
                        if (off as usize) < e {
                            view[off as usize..e].fill(0);
                        }
                    }
                    6 => {
                        let n = r.below(8 * PAGE);
                        o.truncate(&b, n).unwrap();
                        view.resize(n as usize, 0);
                    }
                    7 => {
                        o.apply(&b).unwrap();
                        o = Overlay::new(b.len().unwrap());
                        durable = view.clone();
                    }
                    8 => {
                        o = Overlay::new(b.len().unwrap());
                        view = durable.clone();
                    }
                    _ => {
                        let got = o.read(&b, off, len as usize).unwrap();
                        let s = (off as usize).min(view.len());
                        let e = ((off + len) as usize).min(view.len());
                        assert_eq!(got, view[s..e], "seed {seed} step {step}: read");
                    }
                }
                assert_eq!(o.size(), view.len() as u64, "seed {seed} step {step}: size");
                // Holes (SEEK_HOLE..SEEK_DATA) read as zeroes; data and holes alternate.
                let size = view.len() as u64;
                let mut at = 0;
                while at < size {
                    let hole = o.seek(&b, at, false).unwrap().unwrap();
                    assert!(hole >= at && hole <= size, "seed {seed} step {step}");
                    let data = o.seek(&b, hole, true).unwrap().unwrap_or(size);
                    assert!(data >= hole, "seed {seed} step {step}");
                    let zeros = &view[hole as usize..data as usize];
                    assert!(
                        zeros.iter().all(|x| *x == 0),
                        "seed {seed} step {step}: data in a hole at {hole}..{data}"
                    );
                    at = data.max(at + 1);
                }
                assert_eq!(o.seek(&b, size, true).unwrap(), None);
                assert_eq!(all(&o, &b), view, "seed {seed} step {step}: view");
                assert_eq!(*b.0.borrow(), durable, "seed {seed} step {step}: durable");
            }
        }
    }

    #[test]
    fn applies_to_a_real_file_with_holes() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        FileExt::write_all_at(&f, &[9u8; 64 * 1024], 0).unwrap();
        let mut o = Overlay::new(64 * 1024);
        o.zero(&f, 8192, 32768, true).unwrap();
        o.write(&f, 100, b"x").unwrap();
        o.truncate(&f, 60000).unwrap();
        let view = o.read(&f, 0, 1 << 20).unwrap();
        o.apply(&f).unwrap();
        let mut back = Vec::new();
        use std::io::Read;
        File::open(dir.path().join("f"))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, view);
        assert_eq!(back.len(), 60000);
        assert_eq!(back[100], b'x');
        assert!(back[8192..40960].iter().all(|x| *x == 0));
        assert!(back[40960..].iter().all(|x| *x == 9));
    }

    #[test]
    fn seek_data_and_hole_follow_writes_and_punches() {
        let b = mem(&[0u8; 10 * PAGE as usize]);
        let mut o = Overlay::new(10 * PAGE);
        assert_eq!(o.seek(&b, 0, true).unwrap(), None);
        assert_eq!(o.seek(&b, 0, false).unwrap(), Some(0));
        o.write(&b, 3 * PAGE + 10, b"x").unwrap();
        assert_eq!(o.seek(&b, 0, true).unwrap(), Some(3 * PAGE));
        assert_eq!(o.seek(&b, 3 * PAGE, false).unwrap(), Some(4 * PAGE));
        o.zero(&b, 3 * PAGE, PAGE, true).unwrap();
        assert_eq!(o.seek(&b, 0, true).unwrap(), None);
        // Backing data shows, unless the overlay punched it.
        let b = mem(&[5u8; 4 * PAGE as usize]);
        let mut o = Overlay::new(4 * PAGE);
        o.zero(&b, PAGE, 2 * PAGE, true).unwrap();
        assert_eq!(o.seek(&b, 0, false).unwrap(), Some(PAGE));
        assert_eq!(o.seek(&b, PAGE, true).unwrap(), Some(3 * PAGE));
        assert_eq!(o.seek(&b, 4 * PAGE, true).unwrap(), None);
    }
}
