//! Reading a frozen generation from another process (the shipper), without the tracker's
//! help and without copying the bitmap: the bitmap file is mapped read-only and its bits read
//! atomically; block data comes from the image, or from the copy-on-write store for blocks
//! the guest rewrote after the freeze.
//!
//! Race-free by ordering: the tracker sets a block's copy-on-write bit (after the old data is
//! durable in the store) *before* it issues the overwrite. So a reader that reads the image
//! first and then finds the bit clear read the frozen data; if it finds the bit set, it reads
//! the store instead.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};

use memmap2::Mmap;

use vmreplica_common::direct;
use vmreplica_common::sparse::data_regions;

use crate::bitmap::{parse_header, slot_words, Geometry, COW_SLOT};
use crate::engine::Op;
use crate::tracker::FrozenDisk;

pub struct FrozenReader {
    pub name: String,
    pub image_path: PathBuf,
    geo: Geometry,
    frozen_slot: usize,
    map: Mmap,
    image: File,
    /// The image opened for direct reads, where its filesystem allows them.
    direct: Option<File>,
    cow: File,
    cow_path: PathBuf,
}

fn ctx(path: &std::path::Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl FrozenReader {
    pub fn open(d: &FrozenDisk) -> io::Result<FrozenReader> {
        let bf = File::open(&d.bitmap).map_err(|e| ctx(&d.bitmap, e))?;
        // SAFETY: a read-only shared mapping of the tracker's bitmap file; the tracker only
        // changes it with atomic word operations, which is how it is read here.
        let map = unsafe { Mmap::map(&bf) }.map_err(|e| ctx(&d.bitmap, e))?;
        let geo = parse_header(&map).map_err(|r| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {r}", d.bitmap.display()),
            )
        })?;
        let want = Geometry {
            disk_size: d.size,
            granularity: d.granularity,
        };
        if geo != want || (map.len() as u64) < geo.file_len() || d.frozen_slot > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: geometry does not match disk {}",
                    d.bitmap.display(),
                    d.name
                ),
            ));
        }
        Ok(FrozenReader {
            name: d.name.clone(),
            image_path: d.image.clone(),
            geo,
            frozen_slot: d.frozen_slot,
            map,
            image: File::open(&d.image).map_err(|e| ctx(&d.image, e))?,
            direct: direct::open(&d.image, false).map_err(|e| ctx(&d.image, e))?,
            cow: File::open(&d.cow).map_err(|e| ctx(&d.cow, e))?,
            cow_path: d.cow.clone(),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Whether the image is read with direct I/O where a read's alignment allows it.
    pub fn reads_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The engine operation that reads `len` bytes of the image at `offset` into `buf`
    /// (reused: its contents do not matter), and where in `buf` they will start. Aligned reads
    /// go direct when the image allows it: no page-cache page is allocated for bytes that are
    /// shipped once. Callers pass the bytes read through [`FrozenReader::fix_up`].
    pub fn read_op(&self, offset: u64, len: usize, mut buf: Vec<u8>) -> (Op, usize) {
        let (fd, at) = match &self.direct {
            Some(f) if direct::fits(offset, len) => (f.as_raw_fd(), direct::aligned(&mut buf, len)),
            _ => {
                buf.resize(len, 0);
                (self.image.as_raw_fd(), 0)
            }
        };
        (
            Op::Read {
                fd,
                offset,
                buf,
                at,
            },
            at,
        )
    }

    fn bit(&self, slot: usize, b: u64) -> bool {
        let w = &slot_words(&self.map, self.geo, slot)[(b / 64) as usize];
        w.load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    pub fn is_frozen(&self, b: u64) -> bool {
        self.bit(self.frozen_slot, b)
    }

    /// The generation's blocks, in order.
    pub fn blocks(&self) -> Vec<u64> {
        let words = slot_words(&self.map, self.geo, self.frozen_slot);
        let mut out = Vec::new();
        for (i, w) in words.iter().enumerate() {
            let mut v = w.load(Ordering::Acquire);
            while v != 0 {
                let b = i as u64 * 64 + u64::from(v.trailing_zeros());
                if b < self.geo.blocks() {
                    out.push(b);
                }
                v &= v - 1;
            }
        }
        out
    }

    /// Frozen blocks grouped into runs of consecutive blocks, each at most `max` bytes:
    /// (offset, length). With `skip_holes`, blocks that are holes in the image and were not
    /// copied aside are left out (they read as zeroes either way on a fresh replica).
    pub fn runs(&self, max: u64, skip_holes: bool) -> io::Result<Vec<(u64, u64)>> {
        let g = u64::from(self.geo.granularity);
        let data = if skip_holes {
            Some(
                data_regions(&self.image, self.geo.disk_size)
                    .map_err(|e| ctx(&self.image_path, e))?,
            )
        } else {
            None
        };
        let in_data = |off: u64, len: u64| {
            data.as_ref().is_none_or(|d| {
                let i = d.partition_point(|(s, l)| s + l <= off);
                d.get(i).is_some_and(|(s, _)| *s < off + len)
            })
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in self.blocks() {
            let (off, len) = self.geo.block_bytes(b);
            if !in_data(off, len) && !self.bit(COW_SLOT, b) {
                continue;
            }
            match out.last_mut() {
                Some((o, l)) if *o + *l == off && *l + len <= max => *l += len,
                _ => out.push((off, len)),
            }
        }
        debug_assert!(out.iter().all(|(_, l)| *l <= max.max(g)));
        Ok(out)
    }

    /// After `buf` was read from the image at `offset`: replaces the blocks the guest has
    /// rewritten since the freeze with their frozen contents from the copy-on-write store.
    pub fn fix_up(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        fence(Ordering::SeqCst);
        for b in self.geo.block_range(offset, buf.len() as u64) {
            if !self.bit(COW_SLOT, b) {
                continue;
            }
            let (bs, bl) = self.geo.block_bytes(b);
            let s = bs.max(offset);
            let e = (bs + bl).min(offset + buf.len() as u64);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            self.cow
                .read_exact_at(dst, s)
                .map_err(|e| ctx(&self.cow_path, e))?;
        }
        Ok(())
    }

    /// Reads `[offset, offset+len)` of the frozen generation with blocking reads.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image
            .read_exact_at(buf, offset)
            .map_err(|e| ctx(&self.image_path, e))?;
        self.fix_up(offset, buf)
    }
}
