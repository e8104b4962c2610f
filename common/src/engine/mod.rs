//! Asynchronous image I/O: io_uring where the kernel allows it, positional I/O on a small
//! thread pool otherwise. Both complete through a callback, so the NBD driver can pipeline
//! requests and reply out of order.

mod pool;
mod uring;

use std::io;
use std::os::fd::RawFd;
use std::sync::mpsc;
use std::sync::Arc;

pub use crate::iobuf::IoBuf;
pub use pool::PoolEngine;
pub use uring::UringEngine;

/// Set (to anything) in tests that must exercise io_uring: an engine probe that would fall
/// back to the thread pool fails instead, so a production path is never skipped silently.
pub const REQUIRE_URING_ENV: &str = "VMREPLICA_REQUIRE_URING";

/// Whether [`REQUIRE_URING_ENV`] is set.
pub fn uring_required() -> bool {
    std::env::var_os(REQUIRE_URING_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// One image operation. Buffers are owned by the operation and handed back on completion.
#[derive(Debug)]
pub enum Op {
    /// Fill `buf[at..]` from `offset` (`at` > 0: an aligned start inside the buffer, for
    /// direct I/O; see `vmreplica_common::direct`).
    Read {
        fd: RawFd,
        offset: u64,
        buf: IoBuf,
        at: usize,
    },
    /// Write all of `buf[at..]` at `offset` (`at` > 0: an aligned start inside the buffer,
    /// for direct I/O).
    Write {
        fd: RawFd,
        offset: u64,
        buf: IoBuf,
        at: usize,
    },
    /// fdatasync (or fsync).
    Sync { fd: RawFd, datasync: bool },
    /// fallocate with `mode` (punch hole, zero range, ...).
    Fallocate {
        fd: RawFd,
        offset: u64,
        len: u64,
        mode: i32,
    },
    /// Nothing: completes at once (probes).
    Nop,
}

/// The result of an [`Op`], with its buffer (empty for ops without one).
#[derive(Debug)]
pub struct Completion {
    pub result: io::Result<()>,
    pub buf: IoBuf,
}

pub type Callback = Box<dyn FnOnce(Completion) + Send>;

/// An operation the engine could not take (a full or failing submission queue, a stopped
/// pool), handed back whole to its owner, who decides what to do with it; its callback has
/// not run.
pub struct Rejected {
    pub error: io::Error,
    pub op: Op,
    pub done: Callback,
}

impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejected")
            .field("error", &self.error)
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

impl Rejected {
    /// Performs the operation with blocking system calls in this thread, then runs its
    /// callback.
    pub fn run_blocking(self) {
        let Rejected { mut op, done, .. } = self;
        let result = run_blocking(&mut op, 0);
        done(into_completion(op, result));
    }

    /// Runs the callback with the rejection's error, without performing the operation.
    pub fn fail(self) {
        let Rejected { error, op, done } = self;
        done(into_completion(op, Err(error)));
    }
}

pub trait Engine: Send + Sync {
    /// Starts `op`; `done` runs on an engine thread when it finishes. If the engine cannot
    /// take it, `op` and `done` come back in the error (firecracker's `push`), never lost.
    fn try_submit(&self, op: Op, done: Callback) -> Result<(), Rejected>;

    /// "io_uring" or "thread-pool".
    fn name(&self) -> &'static str;

    /// Starts `op`; `done` always runs exactly once: an operation the engine refuses is
    /// performed with blocking calls in the calling thread instead (logged, rate-limited).
    fn submit(&self, op: Op, done: Callback) {
        if let Err(r) = self.try_submit(op, done) {
            crate::warn_limited!(
                std::time::Duration::from_secs(10),
                "{} engine refused an operation ({}); running it synchronously",
                self.name(),
                r.error
            );
            r.run_blocking();
        }
    }
}

/// Whether the calling thread is an engine's completion thread, where callbacks run and
/// nothing may block (waiting there can stall every completion).
pub fn on_completion_thread() -> bool {
    COMPLETION_THREAD.with(|c| c.get())
}

thread_local! {
    static COMPLETION_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as an engine's completion thread.
pub(crate) fn mark_completion_thread() {
    COMPLETION_THREAD.with(|c| c.set(true));
}

impl dyn Engine {
    /// Runs `op` and waits for it.
    pub fn run(&self, op: Op) -> Completion {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            op,
            Box::new(move |c| {
                let _ = tx.send(c);
            }),
        );
        rx.recv().unwrap_or(Completion {
            result: Err(io::Error::other("I/O engine stopped")),
            buf: IoBuf::default(),
        })
    }
}

/// Picks io_uring if a probe ring works, else the thread pool; logs which one runs. With
/// [`REQUIRE_URING_ENV`] set, a failing probe panics instead of falling back.
pub fn probe(force_pool: bool) -> Arc<dyn Engine> {
    if !force_pool {
        match UringEngine::new(256) {
            Ok(e) => {
                tracing::info!("image I/O engine: io_uring");
                return Arc::new(e);
            }
            Err(e) if uring_required() => {
                panic!("io_uring unavailable ({e}) but {REQUIRE_URING_ENV} is set")
            }
            Err(e) => {
                tracing::warn!("io_uring unavailable ({e}); image I/O engine: thread pool")
            }
        }
    } else {
        tracing::info!("image I/O engine: thread pool (forced)");
    }
    Arc::new(PoolEngine::new(4))
}

/// Performs `op` with blocking system calls, starting `done` bytes in (used by the pool and to
/// finish short io_uring transfers).
pub(crate) fn run_blocking(op: &mut Op, mut done: usize) -> io::Result<()> {
    match op {
        Op::Read {
            fd,
            offset,
            buf,
            at,
        } => {
            while *at + done < buf.len() {
                let rest = &mut buf[*at + done..];
                // SAFETY: `rest` is a valid writable buffer of rest.len() bytes for the call.
                let n = unsafe {
                    libc::pread(
                        *fd,
                        rest.as_mut_ptr().cast(),
                        rest.len(),
                        (*offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    // Past end of file: the rest reads as zeroes.
                    rest.fill(0);
                    break;
                }
                done += n as usize;
            }
            Ok(())
        }
        Op::Write {
            fd,
            offset,
            buf,
            at,
        } => {
            while *at + done < buf.len() {
                let rest = &buf[*at + done..];
                // SAFETY: `rest` is a valid readable buffer of rest.len() bytes for the call.
                let n = unsafe {
                    libc::pwrite(
                        *fd,
                        rest.as_ptr().cast(),
                        rest.len(),
                        (*offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
                }
                done += n as usize;
            }
            Ok(())
        }
        Op::Sync { fd, datasync } => {
            // SAFETY: plain syscalls on a file descriptor owned by the caller.
            let r = unsafe {
                if *datasync {
                    libc::fdatasync(*fd)
                } else {
                    libc::fsync(*fd)
                }
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        Op::Fallocate {
            fd,
            offset,
            len,
            mode,
        } => {
            // SAFETY: plain syscall on a file descriptor owned by the caller.
            let r =
                unsafe { libc::fallocate(*fd, *mode, *offset as libc::off_t, *len as libc::off_t) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        Op::Nop => Ok(()),
    }
}

/// Runs an operation's callback on an engine thread. A callback that panics is logged and the
/// engine goes on: otherwise the panic would end the thread that completes every other
/// operation, leaving their owners waiting forever (and, for io_uring, buffers the kernel
/// still writes into freed when the engine is dropped).
pub(crate) fn complete(done: Callback, c: Completion) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(c)));
    if r.is_err() {
        crate::error_limited!(
            std::time::Duration::from_secs(10),
            "an I/O completion's callback panicked (see the message above); the I/O engine goes on"
        );
    }
}

fn into_completion(op: Op, result: io::Result<()>) -> Completion {
    let buf = match op {
        Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
        _ => IoBuf::default(),
    };
    Completion { result, buf }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn exercise(engine: Arc<dyn Engine>) {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = f.as_raw_fd();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let c = engine.run(Op::Write {
            fd,
            offset: 4096,
            buf: data.clone().into(),
            at: 0,
        });
        c.result.unwrap();
        let c = engine.run(Op::Read {
            fd,
            offset: 4096,
            buf: vec![0; 65536].into(),
            at: 0,
        });
        c.result.unwrap();
        assert_eq!(&c.buf[..], &data[..]);
        // Into a buffer from `at` on: the bytes before it are left alone.
        let c = engine.run(Op::Read {
            fd,
            offset: 4096,
            buf: vec![7; 100 + 65536].into(),
            at: 100,
        });
        c.result.unwrap();
        assert_eq!((&c.buf[..100], &c.buf[100..]), (&[7u8; 100][..], &data[..]));
        // From a buffer's `at` on: the bytes before it are not written.
        let mut shifted = vec![9u8; 100];
        shifted.extend(data.iter().map(|b| b ^ 0xff));
        let c = engine.run(Op::Write {
            fd,
            offset: 4096,
            buf: shifted.clone().into(),
            at: 100,
        });
        c.result.unwrap();
        assert_eq!(&c.buf[..], &shifted[..], "the buffer comes back whole");
        let c = engine.run(Op::Read {
            fd,
            offset: 4096,
            buf: vec![0; 65536 + 1].into(),
            at: 0,
        });
        c.result.unwrap();
        assert_eq!(&c.buf[..65536], &shifted[100..]);
        assert_eq!(c.buf[65536], 0, "nothing written past the buffer's end");
        engine.run(Op::Sync { fd, datasync: true }).result.unwrap();
        if cfg!(miri) {
            // Miri runs the blocking paths (pread/pwrite loops) but has no fallocate.
            return;
        }
        engine
            .run(Op::Fallocate {
                fd,
                offset: 4096,
                len: 65536,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            })
            .result
            .unwrap();
        let c = engine.run(Op::Read {
            fd,
            offset: 4096,
            buf: vec![1; 65536].into(),
            at: 0,
        });
        assert!(c.buf.iter().all(|b| *b == 0));
        // Errors come back as errors: reading a write-only descriptor fails.
        let c = engine.run(Op::Read {
            fd: -1,
            offset: 0,
            buf: vec![0; 16].into(),
            at: 0,
        });
        assert!(c.result.is_err());
        // Many concurrent ops all complete.
        let (tx, rx) = mpsc::channel();
        for i in 0..500u64 {
            let tx = tx.clone();
            engine.submit(
                Op::Write {
                    fd,
                    offset: i * 512,
                    buf: vec![i as u8; 512].into(),
                    at: 0,
                },
                Box::new(move |c| tx.send(c.result.is_ok()).unwrap()),
            );
        }
        drop(tx);
        assert_eq!(rx.iter().filter(|ok| *ok).count(), 500);
        let c = engine.run(Op::Read {
            fd,
            offset: 499 * 512,
            buf: vec![0; 512].into(),
            at: 0,
        });
        assert!(c.buf.iter().all(|b| *b == (499u64 as u8)));
    }

    /// io_uring, or `None` where it is unavailable (a test then passes without it, unless
    /// [`REQUIRE_URING_ENV`] says it must not).
    fn uring(entries: u32) -> Option<UringEngine> {
        match UringEngine::new(entries) {
            Ok(e) => Some(e),
            Err(e) if uring_required() => {
                panic!("io_uring unavailable ({e}) but {REQUIRE_URING_ENV} is set")
            }
            Err(e) => {
                eprintln!("io_uring not available here: {e}");
                None
            }
        }
    }

    /// Also under Miri: the thread pool's blocking pread/pwrite loops (unsafe, with raw
    /// buffer pointers and offsets) on a real file.
    #[test]
    fn pool_engine_round_trip() {
        exercise(Arc::new(PoolEngine::new(2)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "io_uring system calls")]
    fn uring_engine_round_trip() {
        if let Some(e) = uring(64) {
            exercise(Arc::new(e))
        }
    }

    /// Direct (`O_DIRECT`) transfers from and into [`crate::iobuf::DirectBuf`]s: the bytes
    /// arrive, and each buffer comes back to its owner (the same memory).
    fn exercise_direct(engine: Arc<dyn Engine>) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("img");
        std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
        let Some(f) = crate::direct::open(&p, true).unwrap() else {
            crate::direct::unavailable("direct engine transfers are not exercised");
            return;
        };
        let fd = f.as_raw_fd();
        let mut out = IoBuf::default();
        assert_eq!(out.for_direct(1 << 20), 0);
        for (i, b) in out.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let sent = out.as_ptr();
        let c = engine.run(Op::Write {
            fd,
            offset: 2 << 20,
            buf: out,
            at: 0,
        });
        c.result.unwrap();
        assert_eq!(c.buf.as_ptr(), sent, "the written buffer comes back");
        let mut back = IoBuf::default();
        back.for_direct(1 << 20);
        let c = engine.run(Op::Read {
            fd,
            offset: 2 << 20,
            buf: back,
            at: 0,
        });
        c.result.unwrap();
        assert!(matches!(c.buf, IoBuf::Direct(_)));
        assert!(c.buf.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8));
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri does not emulate mmap or O_DIRECT")]
    fn direct_buffers_round_trip_through_both_engines() {
        exercise_direct(Arc::new(PoolEngine::new(2)));
        if let Some(e) = uring(64) {
            exercise_direct(Arc::new(e))
        }
    }

    /// Submits an operation whose callback panics, then another: the second still completes.
    fn survives_a_panicking_callback(engine: Arc<dyn Engine>) {
        engine.submit(
            Op::Nop,
            Box::new(|_| panic!("a callback's bug (expected by this test)")),
        );
        let (tx, rx) = mpsc::channel();
        engine.submit(
            Op::Nop,
            Box::new(move |c| {
                let _ = tx.send(c.result.is_ok());
            }),
        );
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(true),
            "{} stopped completing after a callback panicked",
            engine.name()
        );
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_pool() {
        survives_a_panicking_callback(Arc::new(PoolEngine::new(1)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "io_uring system calls")]
    fn a_panicking_callback_does_not_stop_the_ring() {
        if let Some(e) = uring(8) {
            survives_a_panicking_callback(Arc::new(e))
        }
    }

    /// A submission the ring refuses comes back to its owner whole, and `submit` still
    /// completes it; nothing is left behind in the engine.
    #[test]
    #[cfg_attr(miri, ignore = "io_uring system calls")]
    fn refused_submissions_come_back_to_their_owner() {
        let Some(engine) = uring(8) else {
            return;
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = f.as_raw_fd();
        engine.refuse_next(3);
        let (tx, rx) = mpsc::channel();
        let mut rejected = Vec::new();
        for i in 0..10u64 {
            let tx = tx.clone();
            let r = engine.try_submit(
                Op::Write {
                    fd,
                    offset: i * 4096,
                    buf: vec![i as u8 + 1; 4096].into(),
                    at: 0,
                },
                Box::new(move |c| tx.send((i, c.result.is_ok())).unwrap()),
            );
            if let Err(r) = r {
                assert!(matches!(r.op, Op::Write { offset, .. } if offset == i * 4096));
                rejected.push(r);
            }
        }
        assert_eq!(rejected.len(), 3);
        for r in rejected {
            r.run_blocking();
        }
        let mut done: Vec<_> = (0..10)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        done.sort();
        assert_eq!(done, (0..10).map(|i| (i, true)).collect::<Vec<_>>());
        // `submit` never loses one either.
        engine.refuse_next(1);
        let (tx, rx) = mpsc::channel();
        engine.submit(
            Op::Sync { fd, datasync: true },
            Box::new(move |c| tx.send(c.result.is_ok()).unwrap()),
        );
        assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
        assert_eq!(engine.in_flight(), 0);
    }

    /// Far more operations in flight than the completion queue holds: overflowed completions
    /// must still be delivered (they once hung the engine).
    #[test]
    #[cfg_attr(miri, ignore = "io_uring system calls")]
    fn uring_engine_survives_completion_queue_overflow() {
        let Some(engine) = uring(4) else {
            return;
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = f.as_raw_fd();
        for _ in 0..20 {
            let (tx, rx) = mpsc::channel();
            for i in 0..2000u64 {
                let tx = tx.clone();
                engine.submit(
                    Op::Read {
                        fd,
                        offset: (i % 256) * 4096,
                        buf: vec![0; 4096].into(),
                        at: 0,
                    },
                    Box::new(move |c| tx.send(c.result.is_ok()).unwrap()),
                );
            }
            drop(tx);
            let got = rx.iter().take(2000).filter(|ok| *ok).count();
            assert_eq!(got, 2000);
        }
    }
}
