//! io_uring engine: any thread submits under a lock; one completion thread, woken through an
//! eventfd registered with the ring, runs the callbacks.
//!
//! A submission the ring cannot take (its queue full and the kernel refusing to drain it) is
//! handed back to the caller before it reaches the queue; once an entry is in the queue it is
//! the kernel's, and a failed `io_uring_enter` only delays it: the completion thread submits
//! it again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

use super::{
    complete, into_completion, mark_completion_thread, run_blocking, Callback, Engine, Op, Rejected,
};

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
    /// Entries are in the submission queue that an `io_uring_enter` failed to submit.
    resubmit: AtomicBool,
    /// Tests: refuse this many submissions as a full, failing queue would.
    #[cfg(test)]
    refuse: std::sync::atomic::AtomicU32,
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
            resubmit: AtomicBool::new(false),
            #[cfg(test)]
            refuse: std::sync::atomic::AtomicU32::new(0),
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
        engine
            .try_submit(
                Op::Nop,
                Box::new(move |c| {
                    let _ = tx.send(c.result);
                }),
            )
            .map_err(|r| r.error)?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| io::Error::other("io_uring probe did not complete"))??;
        Ok(engine)
    }

    /// Tests: the next `n` submissions are refused.
    #[cfg(test)]
    pub(crate) fn refuse_next(&self, n: u32) {
        self.inner.refuse.store(n, Ordering::SeqCst);
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inner
            .slots
            .lock()
            .map(|s| s.items.len() - s.free.len())
            .unwrap_or(0)
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a local buffer to our own eventfd.
        unsafe { libc::write(self.inner.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl Inner {
    /// Takes back an operation that never reached the submission queue.
    fn reject(&self, idx: usize, error: io::Error) -> Rejected {
        let p = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(idx)
            .expect("a slot not yet submitted is still ours");
        Rejected {
            error,
            op: p.op,
            done: p.done,
        }
    }

    /// Submits what is queued; entries stay queued on EBUSY/EAGAIN/EINTR (the completion
    /// thread submits them later).
    fn submit_queued(&self) -> io::Result<()> {
        match self.ring.submitter().submit() {
            Ok(_) => {
                self.resubmit.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.resubmit.store(true, Ordering::Release);
                Err(e)
            }
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
        Op::Nop => opcode::Nop::new().build(),
    }
}

fn completion_loop(inner: &Inner) {
    mark_completion_thread();
    let mut counter = [0u8; 8];
    let mut wait = true;
    loop {
        if wait && inner.resubmit.load(Ordering::Acquire) {
            // Entries wait in the submission queue: retry shortly even if nothing completes.
            let mut pfd = libc::pollfd {
                fd: inner.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            if let Ok(_guard) = inner.sq_lock.lock() {
                let _ = inner.submit_queued();
            }
        }
        if wait {
            // SAFETY: reading 8 bytes into a local buffer from our own eventfd.
            let n = unsafe {
                libc::read(
                    inner.eventfd.as_raw_fd(),
                    counter.as_mut_ptr().cast(),
                    counter.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    // Never end this thread while operations are in flight: reap by polling.
                    crate::error_limited!(
                        Duration::from_secs(10),
                        "io_uring completion thread: reading its eventfd failed ({e}); polling every 10 ms"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
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
            let p = inner
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(idx);
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
            complete(done, into_completion(op, result));
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
    fn try_submit(&self, mut op: Op, done: Callback) -> Result<(), Rejected> {
        let entry = entry_for(&mut op);
        let inner = &self.inner;
        let idx = inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Pending { op, done });
        let entry = entry.user_data(idx as u64);
        let guard = inner.sq_lock.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(test)]
        if inner
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            drop(guard);
            return Err(inner.reject(idx, io::Error::from_raw_os_error(libc::EBUSY)));
        }
        // SAFETY: the submission queue is only touched while `sq_lock` is held.
        let mut sq = unsafe { inner.ring.submission_shared() };
        // SAFETY: the entry's buffer belongs to the Pending stored in `slots`, which lives
        // (its bytes unmoved: a Vec's heap allocation or a DirectBuf's mapping, neither of
        // which moves with the IoBuf) until the completion thread takes it after the CQE, or
        // until `reject` takes it back, which only happens if the entry never entered the
        // queue.
        if unsafe { sq.push(&entry) }.is_err() {
            // Full: hand what is queued to the kernel, then try once more.
            sq.sync();
            drop(sq);
            if let Err(e) = inner.submit_queued() {
                drop(guard);
                self.wake();
                return Err(inner.reject(idx, e));
            }
            // SAFETY: as above, still under `sq_lock`.
            sq = unsafe { inner.ring.submission_shared() };
            // SAFETY: as for the first push.
            if unsafe { sq.push(&entry) }.is_err() {
                drop(sq);
                drop(guard);
                return Err(inner.reject(idx, io::Error::other("io_uring submission queue full")));
            }
        }
        sq.sync();
        drop(sq);
        // The entry is queued and no longer ours to take back. If the kernel does not take
        // it now (EBUSY while completions overflow, EAGAIN), the completion thread submits
        // it again.
        let r = inner.submit_queued();
        drop(guard);
        if let Err(e) = r {
            crate::warn_limited!(
                Duration::from_secs(10),
                "io_uring submit deferred ({e}); the completion thread retries it"
            );
            self.wake();
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
