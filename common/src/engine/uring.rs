//! io_uring engine: any thread submits under a lock; one completion thread, woken through an
//! eventfd registered with the ring, runs the callbacks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

use super::{into_completion, run_blocking, Callback, Engine, Op};

struct Pending {
    op: Op,
    done: Callback,
}

struct Inner {
    ring: IoUring,
    /// Serialises use of the submission queue.
    sq_lock: Mutex<()>,
    /// In-flight operations, indexed by the entry's user_data.
    slots: Mutex<Slots>,
    eventfd: OwnedFd,
    stop: AtomicBool,
}

#[derive(Default)]
struct Slots {
    items: Vec<Option<Pending>>,
    free: Vec<usize>,
}

impl Slots {
    fn insert(&mut self, p: Pending) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(p);
                i
            }
            None => {
                self.items.push(Some(p));
                self.items.len() - 1
            }
        }
    }
    fn take(&mut self, i: usize) -> Option<Pending> {
        let p = self.items.get_mut(i)?.take();
        if p.is_some() {
            self.free.push(i);
        }
        p
    }
}

pub struct UringEngine {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let inner = Arc::new(Inner {
            ring,
            sq_lock: Mutex::new(()),
            slots: Mutex::new(Slots::default()),
            eventfd,
            stop: AtomicBool::new(false),
        });
        let engine_inner = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("io-uring-cq".into())
            .spawn(move || completion_loop(&engine_inner))?;
        let engine = UringEngine {
            inner,
            thread: Some(thread),
        };
        // Probe: some sandboxes allow ring setup but refuse operations.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        engine.submit_entry(
            opcode::Nop::new().build(),
            Pending {
                op: Op::Sync {
                    fd: -1,
                    datasync: true,
                },
                done: Box::new(move |c| {
                    let _ = tx.send(c.result);
                }),
            },
        )?;
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .map_err(|_| io::Error::other("io_uring probe did not complete"))??;
        Ok(engine)
    }

    fn submit_entry(&self, entry: io_uring::squeue::Entry, p: Pending) -> io::Result<()> {
        let idx = self
            .inner
            .slots
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .insert(p);
        let entry = entry.user_data(idx as u64);
        let _guard = self
            .inner
            .sq_lock
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        // SAFETY: the submission queue is only touched while `sq_lock` is held.
        let mut sq = unsafe { self.inner.ring.submission_shared() };
        // SAFETY: the entry's buffer belongs to the Pending stored in `slots`, which lives
        // (unmoved heap allocation) until the completion thread takes it after the CQE.
        while unsafe { sq.push(&entry) }.is_err() {
            sq.sync();
            drop(sq);
            self.inner.ring.submitter().submit()?;
            // SAFETY: as above, still under `sq_lock`.
            sq = unsafe { self.inner.ring.submission_shared() };
        }
        sq.sync();
        drop(sq);
        // EBUSY: the kernel holds overflowed completions; the entry stays queued and goes in
        // with the next submit (the completion thread flushes the overflow).
        match self.inner.ring.submitter().submit() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

fn entry_for(op: &mut Op) -> io_uring::squeue::Entry {
    match op {
        Op::Read {
            fd,
            offset,
            buf,
            at,
        } => {
            let dst = &mut buf[*at..];
            opcode::Read::new(types::Fd(*fd), dst.as_mut_ptr(), dst.len() as u32)
                .offset(*offset)
                .build()
        }
        Op::Write {
            fd,
            offset,
            buf,
            at,
        } => {
            let src = &buf[*at..];
            opcode::Write::new(types::Fd(*fd), src.as_ptr(), src.len() as u32)
                .offset(*offset)
                .build()
        }
        Op::Sync { fd, datasync } => {
            let mut s = opcode::Fsync::new(types::Fd(*fd));
            if *datasync {
                s = s.flags(types::FsyncFlags::DATASYNC);
            }
            s.build()
        }
        Op::Fallocate {
            fd,
            offset,
            len,
            mode,
        } => opcode::Fallocate::new(types::Fd(*fd), *len)
            .offset(*offset)
            .mode(*mode)
            .build(),
    }
}

fn completion_loop(inner: &Inner) {
    let mut counter = [0u8; 8];
    let mut wait = true;
    loop {
        if wait {
            // SAFETY: reading 8 bytes into a local buffer from our own eventfd.
            let n = unsafe {
                libc::read(
                    inner.eventfd.as_raw_fd(),
                    counter.as_mut_ptr().cast(),
                    counter.len(),
                )
            };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
        wait = true;
        let mut ready = Vec::new();
        {
            // SAFETY: only this thread uses the completion queue.
            let mut cq = unsafe { inner.ring.completion_shared() };
            cq.sync();
            for cqe in &mut cq {
                ready.push((cqe.user_data() as usize, cqe.result()));
            }
        }
        for (idx, res) in ready {
            let p = inner.slots.lock().ok().and_then(|mut s| s.take(idx));
            let Some(Pending { mut op, done }) = p else {
                continue;
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                match &op {
                    // Short transfers (rare) are finished synchronously.
                    Op::Read { buf, at, .. } if (res as usize) < buf.len() - at => {
                        run_blocking(&mut op, res as usize)
                    }
                    Op::Write { buf, at, .. } if (res as usize) < buf.len() - at => {
                        run_blocking(&mut op, res as usize)
                    }
                    _ => Ok(()),
                }
            };
            done(into_completion(op, result));
        }
        // More completions than the CQ holds wait in the kernel's overflow list; only an enter
        // with GETEVENTS (which submit() adds when the overflow flag is up) moves them into the
        // CQ, and that does not necessarily signal the eventfd: flush, then drain again.
        if let Ok(_guard) = inner.sq_lock.lock() {
            // SAFETY: the submission queue is only touched while `sq_lock` is held.
            let overflow = unsafe { inner.ring.submission_shared() }.cq_overflow();
            if overflow {
                let _ = inner.ring.submitter().submit();
                wait = false;
                continue;
            }
        }
        if inner.stop.load(Ordering::Acquire) {
            let empty = inner
                .slots
                .lock()
                .map(|s| s.free.len() == s.items.len())
                .unwrap_or(true);
            if empty {
                return;
            }
        }
    }
}

impl Engine for UringEngine {
    fn submit(&self, mut op: Op, done: Callback) {
        let entry = entry_for(&mut op);
        let p = Pending { op, done };
        if let Err(e) = self.submit_entry(entry, p) {
            // The entry may or may not have reached the kernel; the slot keeps the buffer
            // alive either way. Report the failure only if the slot is still ours.
            tracing::error!("io_uring submit failed: {e}");
        }
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our own eventfd to wake the completion thread.
        unsafe { libc::write(self.inner.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
