//! One exported disk: its raw image, the I/O engine, dirty tracking and the write gate.
//!
//! Every modifying operation follows the same order: enter the gate, mark the blocks dirty
//! (durably, see [`crate::activity_log`]), copy aside frozen blocks it would overwrite, then
//! issue the I/O; the gate is left when the I/O completes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use vmreplica_nbd::consts::STATE_DIRTY;
use vmreplica_nbd::device::{file_allocation, Zero, BASE_ALLOCATION};
use vmreplica_nbd::{BlockDevice, Done, Extent, ReadDone};

use crate::engine::{Completion, Engine, Op};
use crate::gate::Gate;
use crate::tracking::Tracking;

/// The name under which the dirty bitmap is offered: `qemu:dirty-bitmap:vmreplica`.
pub const DIRTY_BITMAP_CONTEXT: &str = "qemu:dirty-bitmap:vmreplica";

pub struct Disk {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub(crate) file: File,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) tracking: Option<Tracking>,
    pub(crate) gate: Gate,
    /// This disk itself, for completions that outlive the call that started them (a disk
    /// always lives in an `Arc`: see [`Disk::new`]).
    me: Weak<Disk>,
}

/// Modes for fallocate.
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

impl Disk {
    pub(crate) fn new(
        name: String,
        path: PathBuf,
        size: u64,
        file: File,
        engine: Arc<dyn Engine>,
        tracking: Option<Tracking>,
    ) -> Arc<Disk> {
        Arc::new_cyclic(|me| Disk {
            name,
            path,
            size,
            file,
            engine,
            tracking,
            gate: Gate::default(),
            me: me.clone(),
        })
    }

    fn arc(&self) -> Arc<Disk> {
        self.me
            .upgrade()
            .expect("a disk is only used while its Arc is alive")
    }

    pub fn tracking(&self) -> Option<&Tracking> {
        self.tracking.as_ref()
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    pub fn read(&self, offset: u64, len: u32, done: ReadDone) {
        self.engine.submit(
            Op::Read {
                fd: self.fd(),
                offset,
                buf: vec![0u8; len as usize],
                at: 0,
            },
            Box::new(move |c: Completion| done(c.result.map(|_| c.buf))),
        );
    }

    /// Runs `op` inside the gate, after marking its blocks dirty and copying aside the
    /// frozen blocks it overwrites (which may wait for the copies' group commit), then an
    /// fdatasync if `fua`.
    fn modify(&self, offset: u64, len: u64, op: Op, fua: bool, done: Done) {
        self.gate.enter();
        let disk = self.arc();
        let issue = move |r: Result<(), String>| {
            if let Err(e) = r {
                tracing::error!(disk = %disk.name, "tracking failed, refusing the write: {e}");
                disk.gate.exit();
                return done(Err(io::Error::other(e)));
            }
            let d2 = Arc::clone(&disk);
            disk.engine.submit(
                op,
                Box::new(move |c: Completion| {
                    d2.gate.exit();
                    match c.result {
                        Ok(()) if fua => d2.flush(done),
                        r => done(r),
                    }
                }),
            );
        };
        let Some(t) = &self.tracking else {
            return issue(Ok(()));
        };
        match t.mark(offset, len) {
            Err(e) => issue(Err(e.to_string())),
            Ok(None) => issue(Ok(())),
            Ok(Some(frozen)) => {
                t.copy_on_write(frozen, &self.file, &self.path, offset, len, Box::new(issue))
            }
        }
    }

    pub fn write(&self, offset: u64, buf: Vec<u8>, fua: bool, done: Done) {
        let len = buf.len() as u64;
        let op = Op::Write {
            fd: self.fd(),
            offset,
            buf,
            at: 0,
        };
        self.modify(offset, len, op, fua, done);
    }

    /// Deallocates a range (reads back as zeroes), keeping the image sparse.
    pub fn trim(&self, offset: u64, len: u64, fua: bool, done: Done) {
        self.zero(offset, len, fua, false, false, done)
    }

    /// Zeroes a range: punches a hole unless `no_hole`; with `fast`, fails with ENOTSUP
    /// rather than writing zeroes slowly.
    pub fn zero(&self, offset: u64, len: u64, fua: bool, no_hole: bool, fast: bool, done: Done) {
        if len == 0 {
            return done(Ok(()));
        }
        let mode = if no_hole { ZERO_RANGE } else { PUNCH };
        let op = Op::Fallocate {
            fd: self.fd(),
            offset,
            len,
            mode,
        };
        let disk = self.arc();
        self.modify(
            offset,
            len,
            op,
            fua,
            Box::new(move |r| match r {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && !fast => {
                    disk.write_zeroes_slowly(offset, len, fua, done)
                }
                r => done(r),
            }),
        );
    }

    fn write_zeroes_slowly(&self, offset: u64, len: u64, fua: bool, done: Done) {
        const CHUNK: u64 = 1 << 20;
        let n = len.min(CHUNK);
        let disk = self.arc();
        self.write(
            offset,
            vec![0u8; n as usize],
            fua,
            Box::new(move |r| match r {
                Ok(()) if n < len => disk.write_zeroes_slowly(offset + n, len - n, fua, done),
                r => done(r),
            }),
        );
    }

    /// Makes every completed write durable (image, bitmap and copy-on-write store).
    pub fn flush(&self, done: Done) {
        self.engine.submit(
            Op::Sync {
                fd: self.fd(),
                datasync: true,
            },
            Box::new(move |c| done(c.result)),
        );
    }

    /// `base:allocation` extents from `offset`, at most `len` bytes: (length, flags).
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        file_allocation(&self.file, self.size, offset, len, max)
    }

    /// `qemu:dirty-bitmap:vmreplica` extents from `offset`, at most `len` bytes.
    pub fn dirty_extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let Some(t) = &self.tracking else {
            return vec![(len, 0)];
        };
        let g = u64::from(t.geometry().granularity);
        let end = offset + len;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / g;
            let next = ((b + 1) * g).min(end);
            let flags = if t.is_dirty(b) { STATE_DIRTY } else { 0 };
            let full = out.len() == max;
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += next - pos,
                _ if full => break,
                _ => out.push((next - pos, flags)),
            }
            pos = next;
        }
        out
    }

    /// Hints the kernel to read a range into the page cache.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on the image descriptor we own.
        let r = unsafe {
            libc::posix_fadvise(
                self.fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    /// Reads `[offset, offset+len)` as of the frozen generation (live data if none).
    pub fn read_frozen(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.tracking {
            Some(t) if t.slots().frozen.is_some() => t
                .read_frozen(&self.file, &self.path, offset, buf)
                .map_err(|e| io::Error::other(e.to_string())),
            _ => self.file.read_exact_at(buf, offset),
        }
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u32, done: ReadDone) {
        Disk::read(self, offset, len, done)
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool, done: Done) {
        Disk::write(self, offset, data, fua, done)
    }

    fn flush(&self, done: Done) {
        Disk::flush(self, done)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool, done: Done) {
        Disk::trim(self, offset, len, fua, done)
    }

    fn write_zeroes(&self, offset: u64, len: u64, z: Zero, done: Done) {
        self.zero(offset, len, z.fua, z.no_hole, z.fast, done)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        Disk::cache(self, offset, len)
    }

    fn contexts(&self) -> Vec<String> {
        let mut c = vec![BASE_ALLOCATION.to_string()];
        if self.tracking.is_some() {
            c.push(DIRTY_BITMAP_CONTEXT.to_string());
        }
        c
    }

    fn block_status(
        &self,
        context: usize,
        offset: u64,
        len: u64,
        max: usize,
    ) -> io::Result<Vec<Extent>> {
        match context {
            0 => self.allocation(offset, len, max),
            1 if self.tracking.is_some() => Ok(self.dirty_extents(offset, len, max)),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}
