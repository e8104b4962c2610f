//! One exported disk: its raw image, the I/O engine, dirty tracking and the write gate.
//!
//! Every modifying operation follows the same order: enter the gate, mark the blocks dirty
//! (durably, see [`crate::activity_log`]), copy aside frozen blocks it would overwrite, then
//! issue the I/O; the gate is left when the I/O completes.
//!
//! Replication never fails or stalls the guest: if marking or copying fails (a full or
//! failing state directory, the copy-on-write limit), the disk is reported to the tracker
//! (which abandons the frozen generation and marks the disk for a checksum resync) and the
//! write goes ahead. Errors of the image itself reach the client with their errno.
//!
//! A sealed disk (planned failover: the VM is shut down and its last cycle is being shipped)
//! refuses every modifying operation with EPERM and serves reads; the seal is checked inside
//! the gate, so a seal that drained the gate leaves no write behind it.
//!
//! Nothing here blocks an engine's completion thread: work that must block (writing zeroes
//! where the file system cannot, an operation the engine refused) goes to the disk's own
//! worker thread, and so does the gate's exit that follows it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use vmreplica_common::error_limited;
use vmreplica_nbd::consts::STATE_DIRTY;
use vmreplica_nbd::device::{file_allocation, Zero, BASE_ALLOCATION};
use vmreplica_nbd::{BlockDevice, Done, Extent, ReadDone};

use crate::engine::{Callback, Completion, Engine, Op, Rejected};
use crate::gate::Gate;
use crate::tracking::Tracking;

/// The name under which the dirty bitmap is offered: `qemu:dirty-bitmap:vmreplica`.
pub const DIRTY_BITMAP_CONTEXT: &str = "qemu:dirty-bitmap:vmreplica";

/// Told of a tracking failure (with its reason, and whether it was the copy-on-write of a
/// frozen block rather than the dirty tracking itself), before the write it hit goes ahead.
pub type FailureHook = Box<dyn Fn(&str, bool) + Send + Sync>;

type Job = Box<dyn FnOnce() + Send>;

pub struct Disk {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub(crate) file: File,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) tracking: Option<Tracking>,
    pub(crate) gate: Gate,
    /// Writes are refused with EPERM (a planned failover sealed the VM's disks).
    pub(crate) sealed: AtomicBool,
    /// When a write last reached the disk (seconds since the epoch; shared by the tracker's
    /// disks): split-brain detection compares it with a failover's time.
    pub(crate) last_write: Arc<AtomicU64>,
    /// This disk itself, for completions that outlive the call that started them (a disk
    /// always lives in an `Arc`: see [`Disk::new`]).
    me: Weak<Disk>,
    on_failure: OnceLock<FailureHook>,
    /// The worker for blocking work, started on first use.
    worker: Mutex<Option<Sender<Job>>>,
}

/// Writes up to this size are done with a plain `pwrite` on the thread that issues them (the
/// connection's reader) instead of through the engine. A buffered write of a few pages is a
/// copy into the page cache; through io_uring on a file system without non-blocking buffered
/// writes (ext4) it is punted to a kernel worker and costs two thread wakeups more than the
/// copy itself (measured: `benches/nbd-servers.sh`). The reader may wait for such a write as
/// it waits for the gate or the budget; completions never do: they do not write inline.
pub const INLINE_WRITE_MAX: usize = 64 << 10;

/// What a modifying operation writes: an operation of its own, or a small write's data
/// borrowed from the caller for the time of the call.
enum Payload<'a> {
    Op(Op),
    Borrowed(&'a [u8]),
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
        last_write: Arc<AtomicU64>,
    ) -> Arc<Disk> {
        Arc::new_cyclic(|me| Disk {
            name,
            path,
            size,
            file,
            engine,
            tracking,
            gate: Gate::default(),
            sealed: AtomicBool::new(false),
            last_write,
            me: me.clone(),
            on_failure: OnceLock::new(),
            worker: Mutex::new(None),
        })
    }

    fn arc(&self) -> Arc<Disk> {
        self.me
            .upgrade()
            .expect("a disk is only used while its Arc is alive")
    }

    /// Who is told of tracking failures (the tracker); set once.
    pub(crate) fn set_failure_hook(&self, hook: FailureHook) {
        let _ = self.on_failure.set(hook);
    }

    pub fn tracking(&self) -> Option<&Tracking> {
        self.tracking.as_ref()
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `job` on the disk's worker thread, where blocking is allowed.
    fn on_worker(&self, job: Job) {
        let mut w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let job = match w.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name(format!("disk-{}", self.name))
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        match spawned {
            Ok(_) => {
                let _ = tx.send(job);
                *w = Some(tx);
            }
            Err(e) => {
                // No thread to be had: do it here rather than lose it.
                drop(w);
                error_limited!(Duration::from_secs(10), key = &self.name, disk = %self.name, "cannot start a worker thread ({e}); running blocking work in place");
                job();
            }
        }
    }

    /// Submits `op` to the engine; one it refuses is performed on the worker thread instead.
    fn submit(&self, op: Op, done: Callback) {
        if let Err(r) = self.engine.try_submit(op, done) {
            error_limited!(Duration::from_secs(10), key = &self.name, disk = %self.name, "{} engine refused an operation ({}); performing it on the disk's worker thread", self.engine.name(), r.error);
            self.on_worker(Box::new(move || Rejected::run_blocking(r)));
        }
    }

    /// Tracking failed for a write about to be issued: the frozen generation can no longer be
    /// kept (readers are told before the write goes ahead), and the tracker is told (it
    /// abandons the generation and marks the disk for a resync, durably if it can).
    fn tracking_failed(&self, why: &str, cow: bool) {
        if let Some(t) = &self.tracking {
            if t.slots().frozen.is_some() && !t.abandoned() {
                t.abandon();
            }
        }
        error_limited!(Duration::from_secs(10), key = &self.name, disk = %self.name, "tracking failed: {why}; the write goes ahead, the frozen generation (if any) is abandoned");
        if let Some(hook) = self.on_failure.get() {
            hook(why, cow);
        }
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::SeqCst)
    }

    pub fn read(&self, offset: u64, len: u32, done: ReadDone) {
        let mut buf = vec![0u8; len as usize];
        // What the page cache holds is copied here and now, without blocking: a read it holds
        // whole costs no engine round trip (no completion-thread wakeup). The engine reads the
        // rest into the same buffer.
        let cached = if crate::engine::on_completion_thread() {
            0
        } else {
            read_cached(&self.file, &mut buf, offset)
        };
        if cached == buf.len() {
            return done(Ok(buf));
        }
        self.submit(
            Op::Read {
                fd: self.fd(),
                offset: offset + cached as u64,
                buf: buf.into(),
                at: cached,
            },
            Box::new(move |c: Completion| done(c.result.map(|_| c.buf.into_vec()))),
        );
    }

    /// Runs `payload`'s operation inside the gate, after marking its blocks dirty and copying
    /// aside the frozen blocks it overwrites (which may wait for the copies' group commit),
    /// then an fdatasync if `fua`. With `zeroes`, an operation the file system does not
    /// support (EOPNOTSUPP) is replaced by writing zeroes, on the worker thread.
    fn modify(
        &self,
        offset: u64,
        len: u64,
        payload: Payload<'_>,
        fua: bool,
        zeroes: bool,
        done: Done,
    ) {
        debug_assert!(
            !crate::engine::on_completion_thread(),
            "a write may wait at the gate: never on a completion thread"
        );
        // On a connection's reader thread, at a closed gate (a freeze draining writes): the
        // replies of the requests it already completed go out before it waits.
        self.gate.enter_with(vmreplica_nbd::send_held_replies);
        if self.is_sealed() {
            self.gate.exit();
            return done(Err(io::Error::from_raw_os_error(libc::EPERM)));
        }
        let now = coarse_now_secs();
        if self.last_write.load(Ordering::Relaxed) < now {
            self.last_write.fetch_max(now, Ordering::Relaxed);
        }
        let marked = match &self.tracking {
            None => Ok(None),
            Some(t) => t.mark(offset, len).map_err(|e| e.to_string()),
        };
        let frozen = match marked {
            Ok(Some(frozen)) => frozen,
            r => {
                // Nothing frozen to copy first: issued here and now (inline: on the caller's
                // thread, where a small write is a plain pwrite).
                if let Err(why) = r {
                    self.tracking_failed(&why, false);
                }
                let inline = !crate::engine::on_completion_thread();
                return match payload {
                    Payload::Borrowed(data) => self.write_inline(offset, data, fua, done),
                    Payload::Op(op) => self.issue(op, inline, offset, len, fua, zeroes, done),
                };
            }
        };
        // The write waits for the copy's group commit: it must own its data.
        let op = match payload {
            Payload::Op(op) => op,
            Payload::Borrowed(data) => Op::Write {
                fd: self.fd(),
                offset,
                buf: vmreplica_nbd::buffers::copy_of(data).into(),
                at: 0,
            },
        };
        let disk = self.arc();
        let t = self.tracking.as_ref().expect("marked by tracking");
        t.copy_on_write(
            frozen,
            &self.file,
            &self.path,
            offset,
            len,
            Box::new(move |r: Result<(), String>| {
                if let Err(why) = r {
                    disk.tracking_failed(&why, true);
                }
                // From the copy-on-write syncer: never inline.
                disk.issue(op, false, offset, len, fua, zeroes, done);
            }),
        );
    }

    /// A small write's `pwrite`, on the caller's thread, inside the gate (left here).
    fn write_inline(&self, offset: u64, data: &[u8], fua: bool, done: Done) {
        let r = self.file.write_all_at(data, offset);
        self.gate.exit();
        self.finish(r, fua, done)
    }

    /// Issues `op` (inside the gate, which its completion leaves): a small write `inline`
    /// with a pwrite on this thread, anything else through the engine.
    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        op: Op,
        inline: bool,
        offset: u64,
        len: u64,
        fua: bool,
        zeroes: bool,
        done: Done,
    ) {
        let op = match op {
            Op::Write { buf, at, .. } if inline && buf.len() - at <= INLINE_WRITE_MAX => {
                // On the connection's reader thread: its next write reuses the buffer.
                let data = buf.into_vec();
                self.write_inline(offset, &data[at..], fua, done);
                vmreplica_nbd::buffers::recycle(data);
                return;
            }
            op => op,
        };
        let d2 = self.arc();
        self.submit(
            op,
            Box::new(move |c: Completion| {
                if zeroes
                    && c.result.as_ref().err().and_then(|e| e.raw_os_error())
                        == Some(libc::EOPNOTSUPP)
                {
                    let d3 = Arc::clone(&d2);
                    return d2.on_worker(Box::new(move || {
                        let r = write_zeroes_blocking(&d3.file, offset, len);
                        d3.gate.exit();
                        d3.finish(r, fua, done);
                    }));
                }
                d2.gate.exit();
                d2.finish(c.result, fua, done);
            }),
        );
    }

    /// Completes a modifying operation: an fdatasync first if it asked for FUA.
    fn finish(&self, r: io::Result<()>, fua: bool, done: Done) {
        match r {
            Ok(()) if fua => self.flush(done),
            r => done(r),
        }
    }

    pub fn write(&self, offset: u64, buf: Vec<u8>, fua: bool, done: Done) {
        let len = buf.len() as u64;
        let op = Op::Write {
            fd: self.fd(),
            offset,
            buf: buf.into(),
            at: 0,
        };
        self.modify(offset, len, Payload::Op(op), fua, false, done);
    }

    /// Writes `data`, borrowed from the caller (a connection's read buffer): written here with
    /// a `pwrite` where a small write would be (see [`INLINE_WRITE_MAX`]), without a copy into
    /// a buffer of its own; copied into one only when the write must outlive this call (it
    /// waits for a copy-on-write, or goes through the engine).
    pub fn write_from(&self, offset: u64, data: &[u8], fua: bool, done: Done) {
        if data.len() > INLINE_WRITE_MAX || crate::engine::on_completion_thread() {
            return self.write(offset, vmreplica_nbd::buffers::copy_of(data), fua, done);
        }
        self.modify(
            offset,
            data.len() as u64,
            Payload::Borrowed(data),
            fua,
            false,
            done,
        );
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
        self.modify(offset, len, Payload::Op(op), fua, !fast, done);
    }

    /// Makes every completed write durable (image, bitmap and copy-on-write store).
    pub fn flush(&self, done: Done) {
        self.submit(
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

    /// Reads `[offset, offset+len)` as of the frozen generation (live data if none); fails if
    /// the generation was abandoned.
    pub fn read_frozen(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
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

    fn write_from(&self, offset: u64, data: &[u8], fua: bool, done: Done) {
        Disk::write_from(self, offset, data, fua, done)
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

/// Seconds since the Unix epoch from the kernel's coarse clock (advanced every tick, read
/// without a system call, and a fraction of `SystemTime::now` with its `duration_since`):
/// it is on every write's path, where a second's precision is all that is needed.
fn coarse_now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if r == 0 {
        u64::try_from(ts.tv_sec).unwrap_or(0)
    } else {
        now_secs()
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fills the front of `buf` from `offset` with what the page cache holds, without blocking
/// (`preadv2(RWF_NOWAIT)`), and says how many bytes that was: all of `buf`, a part, or none
/// (also on any error: the engine then reads the rest and reports the error).
fn read_cached(f: &File, buf: &mut [u8], offset: u64) -> usize {
    if buf.is_empty() {
        return 0;
    }
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, valid and writable for its whole length during the call,
    // and `f`'s descriptor stays open for it; RWF_NOWAIT only makes the call fail rather than
    // wait.
    let n = unsafe {
        libc::preadv2(
            f.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    usize::try_from(n).map_or(0, |n| n.min(buf.len()))
}

/// Writes zeroes over `[offset, offset+len)` with blocking calls, 1 MiB at a time.
fn write_zeroes_blocking(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(CHUNK);
        f.write_all_at(&zeroes[..n as usize], at)?;
        at += n;
    }
    Ok(())
}
