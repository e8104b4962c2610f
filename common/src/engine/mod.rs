//! Asynchronous image I/O: io_uring where the kernel allows it, positional I/O on a small
//! thread pool otherwise. Both complete through a callback, so the NBD driver can pipeline
//! requests and reply out of order.

mod pool;
mod uring;

use std::io;
use std::os::fd::RawFd;
use std::sync::mpsc;
use std::sync::Arc;

pub use pool::PoolEngine;
pub use uring::UringEngine;

/// One image operation. Buffers are owned by the operation and handed back on completion.
#[derive(Debug)]
pub enum Op {
    /// Fill `buf[at..]` from `offset` (`at` > 0: an aligned start inside the buffer, for
    /// direct I/O; see `vmreplica_common::direct`).
    Read {
        fd: RawFd,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
    },
    /// Write all of `buf[at..]` at `offset` (`at` > 0: an aligned start inside the buffer,
    /// for direct I/O).
    Write {
        fd: RawFd,
        offset: u64,
        buf: Vec<u8>,
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
}

/// The result of an [`Op`], with its buffer (empty for ops without one).
#[derive(Debug)]
pub struct Completion {
    pub result: io::Result<()>,
    pub buf: Vec<u8>,
}

pub type Callback = Box<dyn FnOnce(Completion) + Send>;

pub trait Engine: Send + Sync {
    /// Starts `op`; `done` runs on an engine thread when it finishes.
    fn submit(&self, op: Op, done: Callback);
    /// "io_uring" or "thread-pool".
    fn name(&self) -> &'static str;
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
            buf: Vec::new(),
        })
    }
}

/// Picks io_uring if a probe ring works, else the thread pool; logs which one runs.
pub fn probe(force_pool: bool) -> Arc<dyn Engine> {
    if !force_pool {
        match UringEngine::new(256) {
            Ok(e) => {
                tracing::info!("image I/O engine: io_uring");
                return Arc::new(e);
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
    }
}

fn into_completion(op: Op, result: io::Result<()>) -> Completion {
    let buf = match op {
        Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
        _ => Vec::new(),
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
            buf: data.clone(),
            at: 0,
        });
        c.result.unwrap();
        let c = engine.run(Op::Read {
            fd,
            offset: 4096,
            buf: vec![0; 65536],
            at: 0,
        });
        c.result.unwrap();
        assert_eq!(c.buf, data);
        // Into a buffer from `at` on: the bytes before it are left alone.
        let c = engine.run(Op::Read {
            fd,
            offset: 4096,
            buf: vec![7; 100 + 65536],
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
            buf: shifted.clone(),
            at: 100,
        });
        c.result.unwrap();
        assert_eq!(c.buf, shifted, "the buffer comes back whole");
        let c = engine.run(Op::Read {
            fd,
            offset: 4096,
            buf: vec![0; 65536 + 1],
            at: 0,
        });
        c.result.unwrap();
        assert_eq!(&c.buf[..65536], &shifted[100..]);
        assert_eq!(c.buf[65536], 0, "nothing written past the buffer's end");
        engine.run(Op::Sync { fd, datasync: true }).result.unwrap();
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
            buf: vec![1; 65536],
            at: 0,
        });
        assert!(c.buf.iter().all(|b| *b == 0));
        // Errors come back as errors: reading a write-only descriptor fails.
        let c = engine.run(Op::Read {
            fd: -1,
            offset: 0,
            buf: vec![0; 16],
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
                    buf: vec![i as u8; 512],
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
            buf: vec![0; 512],
            at: 0,
        });
        assert!(c.buf.iter().all(|b| *b == (499u64 as u8)));
    }

    #[test]
    fn pool_engine_round_trip() {
        exercise(Arc::new(PoolEngine::new(2)));
    }

    #[test]
    fn uring_engine_round_trip() {
        match UringEngine::new(64) {
            Ok(e) => exercise(Arc::new(e)),
            Err(e) => eprintln!("io_uring not available here: {e}"),
        }
    }

    /// Far more operations in flight than the completion queue holds: overflowed completions
    /// must still be delivered (they once hung the engine).
    #[test]
    fn uring_engine_survives_completion_queue_overflow() {
        let Ok(engine) = UringEngine::new(4) else {
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
                        buf: vec![0; 4096],
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
