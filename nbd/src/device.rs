//! What the server serves: a block device, free of anything the device does besides storing
//! blocks (tracking, recovery points).
//!
//! Operations complete through a callback, so a device backed by io_uring can complete them
//! out of order while the driver keeps reading requests; a device with synchronous I/O simply
//! calls the callback before returning. Every callback runs exactly once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::consts::{STATE_HOLE, STATE_ZERO};

/// Completes a request without data.
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send>;
/// Completes a read with the bytes read (exactly the length asked for).
pub type ReadDone = Box<dyn FnOnce(io::Result<Vec<u8>>) + Send>;
/// One block-status extent: (length in bytes, status flags of its metadata context).
pub type Extent = (u64, u32);

/// The name of the `base:allocation` metadata context (holes and zeroes).
pub const BASE_ALLOCATION: &str = "base:allocation";

/// What a device supports; the server advertises it and refuses what it lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFlags {
    /// No write, trim or write-zeroes (refused with EPERM).
    pub read_only: bool,
    /// Writes are volatile until a flush (or a write with FUA).
    pub flush: bool,
    /// Deallocation (the range reads back as zeroes afterwards).
    pub trim: bool,
    /// Write-zeroes, with `fast_zero` also its fail-fast variant.
    pub write_zeroes: bool,
    pub fast_zero: bool,
    /// Prefetch hints.
    pub cache: bool,
    /// Several connections see one consistent device (a flush on one covers all).
    pub multi_conn: bool,
}

impl Default for DeviceFlags {
    fn default() -> Self {
        DeviceFlags {
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
        }
    }
}

impl DeviceFlags {
    /// A read-only device with nothing to flush.
    pub fn read_only() -> Self {
        DeviceFlags {
            read_only: true,
            flush: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: false,
            multi_conn: true,
        }
    }
}

fn read_only_refusal() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// A device served over NBD. Offsets and lengths are checked by the server against
/// [`BlockDevice::size`] before any method is called.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    fn flags(&self) -> DeviceFlags {
        DeviceFlags::default()
    }

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32, done: ReadDone);

    /// Writes `data` at `offset`; with `fua`, durable before `done` runs.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool, done: Done) {
        let _ = (offset, data, fua);
        done(Err(read_only_refusal()))
    }

    /// Writes `data`, which the caller keeps: a small write's payload, still in the
    /// connection's read buffer. A device that is done with `data` before this returns (a
    /// `pwrite` here and now) saves copying it into a buffer of its own; the default copies it
    /// into a payload buffer and calls [`BlockDevice::write`].
    fn write_from(&self, offset: u64, data: &[u8], fua: bool, done: Done) {
        self.write(offset, crate::buffers::copy_of(data), fua, done)
    }

    /// Makes every completed write durable.
    fn flush(&self, done: Done) {
        done(Ok(()))
    }

    /// Deallocates a range; it reads back as zeroes.
    fn trim(&self, offset: u64, len: u64, fua: bool, done: Done) {
        let _ = (offset, len, fua);
        done(Err(read_only_refusal()))
    }

    /// Zeroes a range: may deallocate it unless `no_hole`; with `fast`, fails with
    /// EOPNOTSUPP rather than writing zeroes slowly.
    fn write_zeroes(&self, offset: u64, len: u64, zero: Zero, done: Done) {
        let _ = (offset, len, zero);
        done(Err(read_only_refusal()))
    }

    /// A prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// The metadata contexts this device reports, by full name (`base:allocation`,
    /// `qemu:dirty-bitmap:NAME`, ...). A client selects them by name; block-status queries
    /// then name a context by its index in this list.
    fn contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Extents of context `context` (an index into [`BlockDevice::contexts`]) from `offset`,
    /// covering at most `len` bytes, at most `max` of them; at least one unless an error.
    fn block_status(
        &self,
        context: usize,
        offset: u64,
        len: u64,
        max: usize,
    ) -> io::Result<Vec<Extent>>;
}

/// How to zero a range (NBD_CMD_WRITE_ZEROES's flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Zero {
    pub fua: bool,
    pub no_hole: bool,
    pub fast: bool,
}

fn seek(f: &File, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor `f` keeps open; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// `base:allocation` extents of a sparse file from `offset`, at most `len` bytes and `max`
/// extents: holes (SEEK_DATA/SEEK_HOLE) are `HOLE|ZERO`, the rest data. `size` is the
/// device's size (a file may be shorter: past its end reads as a hole).
pub fn file_allocation(
    f: &File,
    size: u64,
    offset: u64,
    len: u64,
    max: usize,
) -> io::Result<Vec<Extent>> {
    let end = offset.saturating_add(len).min(size);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max.max(1) {
        let (next, flags) = match seek(f, pos, libc::SEEK_DATA)? {
            None => (end, STATE_HOLE | STATE_ZERO),
            Some(d) if d > pos => (d.min(end), STATE_HOLE | STATE_ZERO),
            Some(_) => {
                let hole = seek(f, pos, libc::SEEK_HOLE)?.unwrap_or(size);
                (hole.min(end), 0)
            }
        };
        if next <= pos {
            // Defensive: never loop without progress.
            out.push((end - pos, 0));
            break;
        }
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += next - pos,
            _ => out.push((next - pos, flags)),
        }
        pos = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn allocation_of_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 1 << 19).unwrap();
        let ext = file_allocation(&f, 1 << 20, 0, 1 << 20, 100).unwrap();
        let total: u64 = ext.iter().map(|e| e.0).sum();
        assert_eq!(total, 1 << 20);
        assert_eq!(ext[0], (1 << 19, STATE_HOLE | STATE_ZERO));
        assert!(ext.iter().any(|e| e.1 == 0));
        // Limited to one extent.
        assert_eq!(
            file_allocation(&f, 1 << 20, 0, 1 << 20, 1).unwrap().len(),
            1
        );
        // Past the file's end (a device larger than its file) reads as a hole.
        let ext = file_allocation(&f, 2 << 20, 1 << 20, 1 << 20, 10).unwrap();
        assert_eq!(ext, vec![(1 << 20, STATE_HOLE | STATE_ZERO)]);
    }
}
