//! The persistent dirty bitmap of one disk: a file mapped with memmap2 and shared with the
//! shipper, which maps it read-only and reads bits without a copy.
//!
//! Layout (all little-endian): a 4 KiB header, then three slots of `slot_bytes` each. Slots 0
//! and 1 alternate as the *active* set (blocks written since the last freeze) and the *frozen*
//! set (blocks of the generation being shipped); slot 2 marks frozen blocks whose old contents
//! were copied aside before an overwrite (copy-on-write). Which slot is active is recorded in
//! the tracker's state file, not here. Bits are updated with atomic operations on the mapping.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;
use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"VMRBMAP1";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 4096;
pub const COW_SLOT: usize = 2;
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

/// The words of `slot` in a mapped bitmap file, as atomics.
pub(crate) fn slot_words(map: &[u8], geo: Geometry, slot: usize) -> &[AtomicU64] {
    assert!(slot < 3);
    let start = HEADER_LEN as usize + slot * geo.slot_bytes() as usize;
    let ptr = map[start..start + geo.words() * 8].as_ptr();
    // SAFETY: the range is inside the mapping (checked by the slice above), 8-byte aligned
    // (mappings are page aligned and slot offsets are page multiples), lives as long as the
    // borrowed mapping, and AtomicU64 has the layout of u64. Every access goes through
    // atomics, also across processes sharing the file.
    unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), geo.words()) }
}

pub struct Bitmap {
    path: PathBuf,
    file: File,
    map: MmapMut,
    geo: Geometry,
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

impl Bitmap {
    /// Opens the bitmap at `path`, creating it (all clear) if absent. Returns the bitmap and
    /// whether it was newly created.
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
        }
        // SAFETY: the file is ours (state dir), sized above, and only ever changed through this
        // mapping with atomic operations (and read by the shipper through its own mapping).
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err)?;
        Ok((
            Bitmap {
                path: path.to_path_buf(),
                file,
                map,
                geo,
            },
            created,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    fn words(&self, slot: usize) -> &[AtomicU64] {
        slot_words(&self.map, self.geo, slot)
    }

    /// Sets bit `b` in `slot`; returns true if it was clear.
    pub fn set(&self, slot: usize, b: u64) -> bool {
        let w = &self.words(slot)[(b / 64) as usize];
        let mask = 1u64 << (b % 64);
        w.fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    pub fn test(&self, slot: usize, b: u64) -> bool {
        let w = &self.words(slot)[(b / 64) as usize];
        w.load(Ordering::Acquire) & (1u64 << (b % 64)) != 0
    }

    /// Sets every bit of blocks `range` in `slot`.
    pub fn set_range(&self, slot: usize, range: std::ops::Range<u64>) {
        for b in range {
            self.set(slot, b);
        }
    }

    pub fn clear_slot(&self, slot: usize) {
        for w in self.words(slot) {
            w.store(0, Ordering::Release);
        }
    }

    /// ORs slot `src` into slot `dst`.
    pub fn merge(&self, dst: usize, src: usize) {
        for (d, s) in self.words(dst).iter().zip(self.words(src)) {
            let v = s.load(Ordering::Acquire);
            if v != 0 {
                d.fetch_or(v, Ordering::AcqRel);
            }
        }
    }

    pub fn count(&self, slot: usize) -> u64 {
        self.words(slot)
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Set blocks of `slot`, in order.
    pub fn iter_set(&self, slot: usize) -> impl Iterator<Item = u64> + '_ {
        let blocks = self.geo.blocks();
        self.words(slot).iter().enumerate().flat_map(move |(i, w)| {
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

    /// Makes the whole mapping durable.
    pub fn flush(&self) -> Result<(), BitmapError> {
        self.map.flush().map_err(|source| BitmapError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Makes one slot durable.
    pub fn flush_slot(&self, slot: usize) -> Result<(), BitmapError> {
        let start = HEADER_LEN + slot as u64 * self.geo.slot_bytes();
        self.map
            .flush_range(start as usize, self.geo.slot_bytes() as usize)
            .map_err(|source| BitmapError::Io {
                path: self.path.clone(),
                source,
            })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_persist_across_reopen_and_geometry_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bitmap");
        let geo = Geometry {
            disk_size: (1 << 30) + 1,
            granularity: 65536,
        };
        assert_eq!(geo.blocks(), 16385);
        {
            let (bm, created) = Bitmap::open(&p, geo).unwrap();
            assert!(created);
            assert!(bm.set(0, 5));
            assert!(!bm.set(0, 5));
            bm.set(1, 16384);
            bm.set(COW_SLOT, 7);
            bm.flush().unwrap();
        }
        let (bm, created) = Bitmap::open(&p, geo).unwrap();
        assert!(!created);
        assert!(bm.test(0, 5) && bm.test(1, 16384) && bm.test(COW_SLOT, 7));
        assert_eq!(bm.iter_set(0).collect::<Vec<_>>(), vec![5]);
        bm.merge(0, 1);
        assert_eq!(bm.iter_set(0).collect::<Vec<_>>(), vec![5, 16384]);
        assert_eq!(bm.count(0), 2);
        bm.clear_slot(0);
        assert_eq!(bm.count(0), 0);
        drop(bm);
        let other = Geometry {
            disk_size: 1 << 30,
            granularity: 65536,
        };
        assert!(matches!(
            Bitmap::open(&p, other),
            Err(BitmapError::Mismatch { .. })
        ));
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(
            Bitmap::open(&p, geo),
            Err(BitmapError::Corrupt { .. })
        ));
    }

    #[test]
    fn an_interrupted_creation_leaves_no_bitmap_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bitmap");
        let geo = Geometry {
            disk_size: 1 << 30,
            granularity: 65536,
        };
        // What a power cut during the first start leaves: a half-made temporary file only.
        std::fs::write(p.with_extension("bitmap.tmp"), b"").unwrap();
        assert!(!p.exists());
        let (bm, created) = Bitmap::open(&p, geo).unwrap();
        assert!(created);
        assert_eq!(bm.count(0), 0);
        assert!(!p.with_extension("bitmap.tmp").exists());
        drop(bm);
        assert!(!Bitmap::open(&p, geo).unwrap().1);
    }

    #[test]
    fn headers_round_trip_and_damaged_or_impossible_ones_are_refused() {
        let geo = Geometry {
            disk_size: 8 << 30,
            granularity: 65536,
        };
        let mut h = header_bytes(&geo);
        assert_eq!(parse_header(&h), Ok(geo));
        assert_eq!(parse_header(&h[..35]).unwrap_err(), "file too short");
        h[17] ^= 1;
        assert_eq!(parse_header(&h).unwrap_err(), "header checksum mismatch");
        // Checksummed but larger than any file can be: its lengths would overflow.
        let huge = Geometry {
            disk_size: u64::MAX,
            granularity: 1,
        };
        let h = header_bytes(&huge);
        assert_eq!(parse_header(&h).unwrap_err(), "inconsistent geometry");
    }

    #[test]
    fn block_ranges() {
        let geo = Geometry {
            disk_size: 10 * 4096 + 100,
            granularity: 4096,
        };
        assert_eq!(geo.block_range(0, 1), 0..1);
        assert_eq!(geo.block_range(4095, 2), 0..2);
        assert_eq!(geo.block_range(0, 0), 0..0);
        assert_eq!(geo.block_range(10 * 4096, 100), 10..11);
        assert_eq!(geo.block_bytes(10), (40960, 100));
    }
}
