//! Reading a frozen generation from another process (the shipper), without the tracker's
//! help: the bitmap file is read with `pread` (never mapped, so a bitmap file truncated or
//! replaced behind the tracker's back is a clear error, not a SIGBUS); block data comes from
//! the image, or from the copy-on-write store for blocks the guest rewrote after the freeze.
//!
//! Race-free by ordering: the tracker sets a block's copy-on-write bit (after the old data is
//! durable in the store) *before* it issues the overwrite. So a reader that reads the image
//! first and then finds the bit clear read the frozen data; if it finds the bit set, it reads
//! the store instead. Bits only go from clear to set while a generation is frozen, so a word
//! read while the tracker sets one of its bits is either value, and both are right. If the
//! tracker had to give the generation up (its copy-on-write failed), it says so in the
//! bitmap's header before any block is overwritten uncopied, and every later read fails.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

use vmreplica_common::direct;
use vmreplica_common::sparse::data_regions;

use crate::bitmap::{parse_header, Geometry, ABANDONED_AT, COW_SLOT};
use crate::engine::{IoBuf, Op};
use crate::tracker::FrozenDisk;
use crate::tracking::ABANDONED;

pub struct FrozenReader {
    pub name: String,
    pub image_path: PathBuf,
    geo: Geometry,
    frozen_slot: usize,
    bitmap: File,
    bitmap_path: PathBuf,
    /// (device, inode) of the bitmap file when it was opened.
    bitmap_id: (u64, u64),
    image: File,
    /// The image opened for direct reads, where its filesystem allows them.
    direct: Option<File>,
    cow: File,
    cow_path: PathBuf,
}

fn ctx(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

impl FrozenReader {
    pub fn open(d: &FrozenDisk) -> io::Result<FrozenReader> {
        let bitmap = File::open(&d.bitmap).map_err(|e| ctx(&d.bitmap, e))?;
        let meta = bitmap.metadata().map_err(|e| ctx(&d.bitmap, e))?;
        let mut h = [0u8; 36];
        bitmap
            .read_exact_at(&mut h, 0)
            .map_err(|e| ctx(&d.bitmap, e))?;
        let geo = parse_header(&h).map_err(|r| invalid(&d.bitmap, r))?;
        let want = Geometry {
            disk_size: d.size,
            granularity: d.granularity,
        };
        if geo != want || d.frozen_slot > 1 {
            return Err(invalid(
                &d.bitmap,
                format!("geometry does not match disk {}", d.name),
            ));
        }
        let r = FrozenReader {
            name: d.name.clone(),
            image_path: d.image.clone(),
            geo,
            frozen_slot: d.frozen_slot,
            bitmap,
            bitmap_path: d.bitmap.clone(),
            bitmap_id: (meta.dev(), meta.ino()),
            image: File::open(&d.image).map_err(|e| ctx(&d.image, e))?,
            direct: direct::open(&d.image, false).map_err(|e| ctx(&d.image, e))?,
            cow: File::open(&d.cow).map_err(|e| ctx(&d.cow, e))?,
            cow_path: d.cow.clone(),
        };
        r.check()?;
        Ok(r)
    }

    /// Fails if the bitmap file was truncated, replaced or marked abandoned since it was
    /// opened.
    fn check(&self) -> io::Result<()> {
        let now = std::fs::metadata(&self.bitmap_path).map_err(|e| ctx(&self.bitmap_path, e))?;
        if (now.dev(), now.ino()) != self.bitmap_id {
            return Err(invalid(
                &self.bitmap_path,
                "the bitmap file was replaced while its generation was read",
            ));
        }
        let len = self
            .bitmap
            .metadata()
            .map_err(|e| ctx(&self.bitmap_path, e))?
            .len();
        if len < self.geo.file_len() {
            return Err(invalid(
                &self.bitmap_path,
                format!(
                    "the bitmap file was truncated ({len} bytes, {} expected)",
                    self.geo.file_len()
                ),
            ));
        }
        let mut w = [0u8; 8];
        self.pread(&mut w, ABANDONED_AT)?;
        if u64::from_le_bytes(w) != 0 {
            return Err(invalid(&self.bitmap_path, ABANDONED));
        }
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.bitmap.read_exact_at(buf, at).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                invalid(&self.bitmap_path, "the bitmap file was truncated")
            } else {
                ctx(&self.bitmap_path, e)
            }
        })
    }

    /// Words `first..first + n` of `slot`.
    fn words(&self, slot: usize, first: usize, n: usize) -> io::Result<Vec<u64>> {
        let n = n.min(self.geo.words().saturating_sub(first));
        let mut buf = vec![0u8; n * 8];
        self.pread(&mut buf, self.geo.slot_offset(slot) + first as u64 * 8)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
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
    /// go direct when the image allows it, into huge-page memory ([`IoBuf::for_direct`]): no
    /// page-cache page is allocated for bytes that are shipped once. Callers pass the bytes
    /// read through [`FrozenReader::fix_up`].
    pub fn read_op(&self, offset: u64, len: usize, mut buf: IoBuf) -> (Op, usize) {
        let (fd, at) = match &self.direct {
            Some(f) if direct::fits(offset, len) => (f.as_raw_fd(), buf.for_direct(len)),
            _ => {
                buf.for_buffered(len);
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

    pub fn is_frozen(&self, b: u64) -> io::Result<bool> {
        let w = self.words(self.frozen_slot, (b / 64) as usize, 1)?;
        Ok(w.first().is_some_and(|w| w & (1 << (b % 64)) != 0))
    }

    /// Set blocks of a slot, in order.
    fn set_blocks(&self, slot: usize) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for (i, mut v) in self
            .words(slot, 0, self.geo.words())?
            .into_iter()
            .enumerate()
        {
            while v != 0 {
                let b = i as u64 * 64 + u64::from(v.trailing_zeros());
                if b < self.geo.blocks() {
                    out.push(b);
                }
                v &= v - 1;
            }
        }
        Ok(out)
    }

    /// Blocks the guest rewrote since the freeze, whose frozen contents are in the
    /// copy-on-write store (cancelling a failover puts them back), in order.
    pub fn copied_blocks(&self) -> io::Result<Vec<u64>> {
        self.check()?;
        self.set_blocks(COW_SLOT)
    }

    /// The generation's blocks, in order.
    pub fn blocks(&self) -> io::Result<Vec<u64>> {
        self.check()?;
        self.set_blocks(self.frozen_slot)
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
        let copied: std::collections::HashSet<u64> = if skip_holes {
            self.set_blocks(COW_SLOT)?.into_iter().collect()
        } else {
            Default::default()
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in self.blocks()? {
            let (off, len) = self.geo.block_bytes(b);
            if !in_data(off, len) && !copied.contains(&b) {
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
    /// Fails if the generation was abandoned or the bitmap file damaged meanwhile.
    pub fn fix_up(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        fence(Ordering::SeqCst);
        let blocks = self.geo.block_range(offset, buf.len() as u64);
        if !blocks.is_empty() {
            let first = (blocks.start / 64) as usize;
            let last = ((blocks.end - 1) / 64) as usize;
            let words = self.words(COW_SLOT, first, last - first + 1)?;
            for b in blocks {
                let w = words[(b / 64) as usize - first];
                if w & (1 << (b % 64)) == 0 {
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
        }
        // Checked last: a generation abandoned before the image was read is refused.
        self.check()
    }

    /// Reads `[offset, offset+len)` of the frozen generation with blocking reads.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image
            .read_exact_at(buf, offset)
            .map_err(|e| ctx(&self.image_path, e))?;
        self.fix_up(offset, buf)
    }
}
