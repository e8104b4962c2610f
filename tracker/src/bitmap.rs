//! The persistent dirty bitmap of one disk: a file mapped shared and read-write by the tracker
//! (memmap2's `MmapRaw`: a raw pointer, never a Rust slice over memory that other processes
//! change), updated with 8-byte atomics. The shipper reads the same file with `pread` (see
//! [`crate::frozen`]).
//!
//! Layout (all little-endian): a 4 KiB header, then three slots of `slot_bytes` each. Slots 0
//! and 1 alternate as the *active* set (blocks written since the last freeze) and the *frozen*
//! set (blocks of the generation being shipped); slot 2 marks frozen blocks whose old contents
//! were copied aside before an overwrite (copy-on-write). Which slot is active is recorded in
//! the tracker's state file, not here.
//!
//! Header: magic, version, granularity, disk size, slot bytes and a CRC of those (bytes 0..36,
//! written once), and at [`ABANDONED_AT`] a word the tracker sets when the frozen generation
//! can no longer be read as frozen (its copy-on-write failed): readers check it after every
//! read and fail instead of returning a torn point.
//!
//! The body has no checksum of its own (it changes with every write); the activity log records
//! [`Bitmap::checksum`] of it at every checkpoint instead (see [`crate::activity_log`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;
use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"VMRBMAP1";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 4096;
pub const COW_SLOT: usize = 2;
/// Offset of the header word that says the frozen generation was abandoned (non-zero).
pub const ABANDONED_AT: u64 = 64;
const PAGE: u64 = 4096;

#[derive(Debug, Error)]
pub enum BitmapError {
    #[error("bitmap {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("bitmap {path} is not a vmreplica bitmap or is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("bitmap {path} was made for a {found_size}-byte disk with {found_gran}-byte blocks, but the disk is {size} bytes with {gran}-byte blocks")]
    Mismatch {
        path: PathBuf,
        found_size: u64,
        found_gran: u32,
        size: u64,
        gran: u32,
    },
}

/// Geometry shared by the tracker and the shipper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub disk_size: u64,
    pub granularity: u32,
}

impl Geometry {
    pub fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.granularity))
    }
    pub fn words(&self) -> usize {
        self.blocks().div_ceil(64) as usize
    }
    pub fn slot_bytes(&self) -> u64 {
        ((self.words() as u64) * 8).div_ceil(PAGE).max(1) * PAGE
    }
    pub fn file_len(&self) -> u64 {
        HEADER_LEN + 3 * self.slot_bytes()
    }
    /// Byte offset of `slot` in the file.
    pub fn slot_offset(&self, slot: usize) -> u64 {
        HEADER_LEN + slot as u64 * self.slot_bytes()
    }
    /// Blocks covering the byte range `[offset, offset + len)`.
    pub fn block_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let g = u64::from(self.granularity);
        offset / g..(offset + len).div_ceil(g).min(self.blocks())
    }
    /// Byte range of block `b`, clipped to the disk.
    pub fn block_bytes(&self, b: u64) -> (u64, u64) {
        let g = u64::from(self.granularity);
        let start = b * g;
        (start, g.min(self.disk_size - start))
    }
}

/// The header recording `geo`, as [`parse_header`] reads it.
pub fn header_bytes(geo: &Geometry) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&geo.granularity.to_le_bytes());
    h[16..24].copy_from_slice(&geo.disk_size.to_le_bytes());
    h[24..32].copy_from_slice(&geo.slot_bytes().to_le_bytes());
    let crc = crc32fast::hash(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a bitmap header; returns the geometry it records.
pub fn parse_header(h: &[u8]) -> Result<Geometry, String> {
    if h.len() < 36 {
        return Err("file too short".into());
    }
    if &h[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let le32 = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let le64 = |i: usize| u64::from(le32(i)) | (u64::from(le32(i + 4)) << 32);
    if crc32fast::hash(&h[..32]) != le32(32) {
        return Err("header checksum mismatch".into());
    }
    if le32(8) != VERSION {
        return Err(format!("version {} (expected {VERSION})", le32(8)));
    }
    let geo = Geometry {
        granularity: le32(12),
        disk_size: le64(16),
    };
    // No file is larger than i64::MAX bytes; the bound also keeps the lengths derived from
    // the geometry (slots, file length) from overflowing.
    if !geo.granularity.is_power_of_two()
        || geo.disk_size > i64::MAX as u64
        || geo.slot_bytes() != le64(24)
    {
        return Err("inconsistent geometry".into());
    }
    Ok(geo)
}

/// One word's share of [`Bitmap::checksum`]: zero words add nothing, others a well-mixed
/// value of their position and contents (so zeroed, shifted or swapped words all show).
pub fn word_sum(index: u64, value: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    if value == 0 {
        0
    } else {
        mix(value ^ mix(index.wrapping_add(0x9e37_79b9_7f4a_7c15)))
    }
}

/// Where the words live.
enum Memory {
    /// A shared read-write mapping of the bitmap file.
    File(MmapRaw),
    /// Plain heap memory (unit tests, also under Miri, which cannot map files). Only held,
    /// to own what `base` points into.
    #[cfg(test)]
    Heap(#[allow(dead_code)] Vec<AtomicU64>),
}

pub struct Bitmap {
    path: PathBuf,
    file: Option<File>,
    memory: Memory,
    /// Start of the header; the words follow it (see [`Bitmap::word`]).
    base: NonNull<u8>,
    len: usize,
    geo: Geometry,
}

// SAFETY: the memory behind `base` is only ever accessed through 8-byte atomics (see
// `Bitmap::word`), which are safe to use from any thread; the mapping (or heap buffer) it
// points into is owned by the Bitmap and freed only when it is dropped.
unsafe impl Send for Bitmap {}
// SAFETY: as above: shared references only hand out atomics.
unsafe impl Sync for Bitmap {}

impl Bitmap {
    /// Opens the bitmap at `path`, creating it (all clear) if absent. Returns the bitmap and
    /// whether it was newly created. A damaged header or a wrong length is
    /// [`BitmapError::Corrupt`]; a bitmap of another geometry [`BitmapError::Mismatch`].
    pub fn open(path: &Path, geo: Geometry) -> Result<(Bitmap, bool), BitmapError> {
        let io_err = |source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let created = !path.exists();
        if created {
            // Built under a temporary name and renamed, so a crash or power cut while it is
            // made never leaves a headerless bitmap that the next start would refuse.
            let tmp = path.with_extension("bitmap.tmp");
            let tmp_err = |source| BitmapError::Io {
                path: tmp.clone(),
                source,
            };
            let f = File::create(&tmp).map_err(tmp_err)?;
            f.set_len(geo.file_len()).map_err(tmp_err)?;
            allocate(&f, geo.file_len(), true).map_err(tmp_err)?;
            f.write_all_at(&header_bytes(&geo), 0).map_err(tmp_err)?;
            f.sync_all().map_err(tmp_err)?;
            std::fs::rename(&tmp, path).map_err(io_err)?;
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        if !created {
            check_file(&file, path, geo)?;
            // Older bitmaps may be sparse: allocate them now if the space is there.
            if let Err(e) = allocate(&file, geo.file_len(), false) {
                tracing::warn!(bitmap = %path.display(), "cannot allocate the bitmap's blocks ({e}); a full file system could then stop the tracker");
            }
        }
        let map = MmapRaw::map_raw(&file).map_err(io_err)?;
        if (map.len() as u64) < geo.file_len() {
            return Err(BitmapError::Corrupt {
                path: path.to_path_buf(),
                reason: "shorter than its geometry".into(),
            });
        }
        let base = NonNull::new(map.as_mut_ptr()).ok_or_else(|| BitmapError::Corrupt {
            path: path.to_path_buf(),
            reason: "empty mapping".into(),
        })?;
        let len = map.len();
        Ok((
            Bitmap {
                path: path.to_path_buf(),
                file: Some(file),
                memory: Memory::File(map),
                base,
                len,
                geo,
            },
            created,
        ))
    }

    /// A bitmap in memory only (unit tests).
    #[cfg(test)]
    pub fn in_memory(geo: Geometry) -> Bitmap {
        let words = (geo.file_len() / 8) as usize;
        // A Vec, not a Box: moving it into the struct leaves the pointer into it valid.
        let heap: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let base = NonNull::new(heap.as_ptr().cast_mut().cast::<u8>()).expect("a vector");
        Bitmap {
            path: PathBuf::from("(memory)"),
            file: None,
            memory: Memory::Heap(heap),
            base,
            len: words * 8,
            geo,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The 8-byte word at byte offset `at` of the file, as an atomic.
    fn atomic_at(&self, at: u64) -> &AtomicU64 {
        assert!(
            at.is_multiple_of(8) && at + 8 <= self.len as u64,
            "bitmap word {at} out of range"
        );
        // SAFETY: `at + 8 <= len` keeps the word inside the memory `base` points to (the
        // whole mapping, checked at open to cover the geometry, or the heap buffer); `base`
        // is page-aligned (a mapping) or 8-aligned (a Vec<AtomicU64>) and `at` a multiple
        // of 8, so the pointer is aligned for AtomicU64. The memory is readable and writable
        // (a read-write shared mapping) and stays mapped as long as `self` lives, which
        // bounds the returned reference. Every access to it, in this process and in others
        // sharing the file, is an 8-byte atomic on 8-aligned words (the header's first 36
        // bytes are never written once the file exists), so atomics of one size never mix
        // with plain accesses.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(at as usize).cast::<u64>()) }
    }

    /// Word `i` of `slot`.
    fn word(&self, slot: usize, i: usize) -> &AtomicU64 {
        assert!(slot < 3 && i < self.geo.words(), "slot {slot} word {i}");
        self.atomic_at(self.geo.slot_offset(slot) + i as u64 * 8)
    }

    fn words(&self, slot: usize) -> impl Iterator<Item = &AtomicU64> + '_ {
        (0..self.geo.words()).map(move |i| self.word(slot, i))
    }

    /// Sets bit `b` in `slot`; returns true if it was clear.
    pub fn set(&self, slot: usize, b: u64) -> bool {
        let w = self.word(slot, (b / 64) as usize);
        let mask = 1u64 << (b % 64);
        w.fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    pub fn test(&self, slot: usize, b: u64) -> bool {
        let w = self.word(slot, (b / 64) as usize);
        w.load(Ordering::Acquire) & (1u64 << (b % 64)) != 0
    }

    /// Sets every bit of blocks `range` in `slot`.
    pub fn set_range(&self, slot: usize, range: std::ops::Range<u64>) {
        let mut b = range.start;
        while b < range.end {
            // Whole words at once where the range covers them.
            if b.is_multiple_of(64) && b + 64 <= range.end {
                self.word(slot, (b / 64) as usize)
                    .store(u64::MAX, Ordering::Release);
                b += 64;
            } else {
                self.set(slot, b);
                b += 1;
            }
        }
    }

    pub fn clear_slot(&self, slot: usize) {
        for w in self.words(slot) {
            w.store(0, Ordering::Release);
        }
    }

    /// ORs slot `src` into slot `dst`.
    pub fn merge(&self, dst: usize, src: usize) {
        for i in 0..self.geo.words() {
            let v = self.word(src, i).load(Ordering::Acquire);
            if v != 0 {
                self.word(dst, i).fetch_or(v, Ordering::AcqRel);
            }
        }
    }

    /// ORs the bits of blocks `range` of slot `src` into slot `dst`, and no others.
    pub fn merge_range(&self, dst: usize, src: usize, range: std::ops::Range<u64>) {
        let mut b = range.start;
        while b < range.end {
            let i = b / 64;
            let lo = b % 64;
            let hi = (range.end - i * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let v = self.word(src, i as usize).load(Ordering::Acquire) & mask;
            if v != 0 {
                self.word(dst, i as usize).fetch_or(v, Ordering::AcqRel);
            }
            b = i * 64 + hi;
        }
    }

    /// Word `i` of `slot`, as it is now.
    pub fn word_value(&self, slot: usize, i: usize) -> u64 {
        self.word(slot, i).load(Ordering::Acquire)
    }

    pub fn count(&self, slot: usize) -> u64 {
        self.words(slot)
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Set blocks of `slot`, in order.
    pub fn iter_set(&self, slot: usize) -> impl Iterator<Item = u64> + '_ {
        let blocks = self.geo.blocks();
        self.words(slot).enumerate().flat_map(move |(i, w)| {
            let mut v = w.load(Ordering::Acquire);
            std::iter::from_fn(move || {
                if v == 0 {
                    return None;
                }
                let bit = v.trailing_zeros();
                v &= v - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
            .filter(move |b| *b < blocks)
        })
    }

    /// A checksum of data slot `slot`: the XOR of [`word_sum`] over its words, leaving out
    /// those for which `masked` is true (in the active slot, words that may change without a
    /// checkpoint: those of extents in the activity log). The copy-on-write slot has none (it
    /// changes with every batch of copies).
    pub fn checksum(&self, slot: usize, masked: &dyn Fn(usize) -> bool) -> u64 {
        assert!(slot < 2, "slot {slot} has no checksum");
        (0..self.geo.words())
            .filter(|i| !masked(*i))
            .fold(0, |sum, i| sum ^ self.word_share(slot, i))
    }

    /// The share of word `i` of slot `slot` in [`Bitmap::checksum`], as it is now.
    pub fn word_share(&self, slot: usize, i: usize) -> u64 {
        let v = self.word(slot, i).load(Ordering::Acquire);
        word_sum((slot * self.geo.words() + i) as u64, v)
    }

    /// Marks the frozen generation abandoned (or clears the mark): readers fail from now on.
    pub fn set_abandoned(&self, abandoned: bool) {
        self.atomic_at(ABANDONED_AT)
            .store(u64::from(abandoned), Ordering::SeqCst);
    }

    pub fn abandoned(&self) -> bool {
        self.atomic_at(ABANDONED_AT).load(Ordering::SeqCst) != 0
    }

    /// Makes the whole mapping durable.
    pub fn flush(&self) -> Result<(), BitmapError> {
        let r = match &self.memory {
            Memory::File(m) => m.flush(),
            #[cfg(test)]
            Memory::Heap(_) => Ok(()),
        };
        r.map_err(|source| BitmapError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Makes one slot durable.
    pub fn flush_slot(&self, slot: usize) -> Result<(), BitmapError> {
        let (start, len) = (
            self.geo.slot_offset(slot) as usize,
            self.geo.slot_bytes() as usize,
        );
        let r = match &self.memory {
            Memory::File(m) => m.flush_range(start, len),
            #[cfg(test)]
            Memory::Heap(_) => Ok(()),
        };
        r.map_err(|source| BitmapError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }
}

/// Allocates the blocks of the first `len` bytes of `f` (the mapping is written through page
/// faults, which cannot report ENOSPC: a fault on a hole of a full file system is a SIGBUS).
/// Where the file system cannot allocate, `zero_fill` writes zeroes instead (new files only).
fn allocate(f: &File, len: u64, zero_fill: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor `f` keeps open; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    if zero_fill {
        let zeroes = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len() as u64) as usize;
            f.write_all_at(&zeroes[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Checks an existing bitmap file's header and length against `geo`.
fn check_file(file: &File, path: &Path, geo: Geometry) -> Result<(), BitmapError> {
    let io_err = |source| BitmapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    let mut h = vec![0u8; 36.min(len as usize)];
    file.read_exact_at(&mut h, 0).map_err(io_err)?;
    let found = parse_header(&h).map_err(|reason| BitmapError::Corrupt {
        path: path.to_path_buf(),
        reason,
    })?;
    if found != geo {
        return Err(BitmapError::Mismatch {
            path: path.to_path_buf(),
            found_size: found.disk_size,
            found_gran: found.granularity,
            size: geo.disk_size,
            gran: geo.granularity,
        });
    }
    if len != geo.file_len() {
        return Err(BitmapError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("length {len}, expected {}", geo.file_len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(disk_size: u64, granularity: u32) -> Geometry {
        Geometry {
            disk_size,
            granularity,
        }
    }

    /// The bit operations, on memory (this test also runs under Miri: it covers the unsafe
    /// word access).
    #[test]
    fn bit_operations_in_memory() {
        let g = geo((1 << 30) + 1, 65536);
        assert_eq!(g.blocks(), 16385);
        let bm = Bitmap::in_memory(g);
        assert!(bm.set(0, 5));
        assert!(!bm.set(0, 5));
        bm.set(1, 16384);
        bm.set(COW_SLOT, 7);
        assert!(bm.test(0, 5) && bm.test(1, 16384) && bm.test(COW_SLOT, 7));
        assert!(!bm.test(0, 6) && !bm.test(1, 5));
        assert_eq!(bm.iter_set(0).collect::<Vec<_>>(), vec![5]);
        bm.merge(0, 1);
        assert_eq!(bm.iter_set(0).collect::<Vec<_>>(), vec![5, 16384]);
        assert_eq!(bm.count(0), 2);
        bm.set_range(1, 60..200);
        assert_eq!(bm.count(1), 141);
        assert_eq!(bm.iter_set(1).next(), Some(60));
        assert_eq!(bm.iter_set(1).last(), Some(16384));
        // The last word's bits past the disk's end are never reported.
        bm.set_range(0, 0..g.blocks());
        assert_eq!(bm.iter_set(0).count() as u64, g.blocks());
        bm.clear_slot(0);
        assert_eq!(bm.count(0), 0);
        assert!(!bm.abandoned());
        bm.set_abandoned(true);
        assert!(bm.abandoned());
    }

    #[test]
    fn checksum_sees_damage_outside_masked_words_only() {
        let g = geo(64 << 20, 4096);
        let bm = Bitmap::in_memory(g);
        bm.set_range(0, 100..300);
        bm.set(1, 9000);
        let none = |_: usize| false;
        let clean = bm.checksum(0, &none);
        assert_ne!(clean, 0);
        // A word that is masked may change freely.
        let masked = |i: usize| i == 10;
        let before = bm.checksum(0, &masked);
        bm.set(0, 10 * 64 + 3);
        assert_eq!(bm.checksum(0, &masked), before);
        assert_ne!(bm.checksum(0, &none), clean);
        // Slots have sums of their own.
        let one = bm.checksum(1, &none);
        bm.set(1, 10 * 64 + 3);
        assert_ne!(bm.checksum(1, &none), one);
        assert_eq!(bm.checksum(0, &masked), before);
        // Zeroing a slot shows.
        let sum = bm.checksum(1, &none);
        bm.clear_slot(1);
        assert_ne!(bm.checksum(1, &none), sum);
        assert_eq!(bm.checksum(1, &none), 0);
        // The shares add up to the whole.
        let parts = (0..g.words()).fold(0, |p, i| p ^ bm.word_share(0, i));
        assert_eq!(parts, bm.checksum(0, &none));
        // The same bits in the other slot or another word sum differently.
        let a = Bitmap::in_memory(g);
        a.set(0, 5);
        let b = Bitmap::in_memory(g);
        b.set(1, 5);
        let c = Bitmap::in_memory(g);
        c.set(0, 64 + 5);
        assert_ne!(a.checksum(0, &none), b.checksum(1, &none));
        assert_ne!(a.checksum(0, &none), c.checksum(0, &none));
    }

    #[test]
    #[cfg_attr(miri, ignore = "maps a file")]
    fn bits_persist_across_reopen_and_geometry_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bitmap");
        let g = geo((1 << 30) + 1, 65536);
        {
            let (bm, created) = Bitmap::open(&p, g).unwrap();
            assert!(created);
            assert!(bm.set(0, 5));
            bm.set(1, 16384);
            bm.set(COW_SLOT, 7);
            bm.set_abandoned(true);
            bm.flush().unwrap();
        }
        let (bm, created) = Bitmap::open(&p, g).unwrap();
        assert!(!created);
        assert!(bm.test(0, 5) && bm.test(1, 16384) && bm.test(COW_SLOT, 7));
        assert!(bm.abandoned());
        assert_eq!(bm.iter_set(0).collect::<Vec<_>>(), vec![5]);
        drop(bm);
        assert!(matches!(
            Bitmap::open(&p, geo(1 << 30, 65536)),
            Err(BitmapError::Mismatch { .. })
        ));
        // A truncated file is corrupt, not a crash.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(g.file_len() - 4096).unwrap();
        assert!(matches!(
            Bitmap::open(&p, g),
            Err(BitmapError::Corrupt { .. })
        ));
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(
            Bitmap::open(&p, g),
            Err(BitmapError::Corrupt { .. })
        ));
    }

    #[test]
    #[cfg_attr(miri, ignore = "creates files")]
    fn an_interrupted_creation_leaves_no_bitmap_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bitmap");
        let g = geo(1 << 30, 65536);
        // What a power cut during the first start leaves: a half-made temporary file only.
        std::fs::write(p.with_extension("bitmap.tmp"), b"").unwrap();
        assert!(!p.exists());
        let (bm, created) = Bitmap::open(&p, g).unwrap();
        assert!(created);
        assert_eq!(bm.count(0), 0);
        assert!(!p.with_extension("bitmap.tmp").exists());
        drop(bm);
        assert!(!Bitmap::open(&p, g).unwrap().1);
    }

    #[test]
    fn headers_round_trip_and_damaged_or_impossible_ones_are_refused() {
        let g = geo(8 << 30, 65536);
        let mut h = header_bytes(&g);
        assert_eq!(parse_header(&h), Ok(g));
        assert_eq!(parse_header(&h[..35]).unwrap_err(), "file too short");
        h[17] ^= 1;
        assert_eq!(parse_header(&h).unwrap_err(), "header checksum mismatch");
        // Checksummed but larger than any file can be: its lengths would overflow.
        let huge = geo(u64::MAX, 1);
        let h = header_bytes(&huge);
        assert_eq!(parse_header(&h).unwrap_err(), "inconsistent geometry");
    }

    #[test]
    fn block_ranges() {
        let g = geo(10 * 4096 + 100, 4096);
        assert_eq!(g.block_range(0, 1), 0..1);
        assert_eq!(g.block_range(4095, 2), 0..2);
        assert_eq!(g.block_range(0, 0), 0..0);
        assert_eq!(g.block_range(10 * 4096, 100), 10..11);
        assert_eq!(g.block_bytes(10), (40960, 100));
    }
}
