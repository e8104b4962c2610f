//! Copy-on-write of frozen blocks, with group commit.
//!
//! Before the guest overwrites a block of the frozen generation, the block's old contents
//! must be durable in the store (`NAME.cow`, sparse, same offsets as the image) and its bit
//! set in the bitmap's copy-on-write slot, so the generation stays readable as frozen, also
//! after a crash or power cut. Doing that synchronously costs two syncs per block on the
//! connection's reader thread. Instead, a copy is written to the store without syncing and the
//! overwrite waits in the open batch; a syncer thread makes a whole batch durable with one
//! fdatasync and one bitmap flush, sets the bits, then releases the batch's overwrites. The
//! reader thread keeps pipelining meanwhile.
//!
//! Ordering kept: store data durable, then bit set and flushed, then the overwrite issued. A
//! later write to a block whose copy is still pending waits for the batch after it.
//!
//! The stores of all disks share a [`CowBudget`]: during a full freeze (initial sync, resync)
//! they could otherwise grow to the disks' size. A copy that would pass it fails like a full
//! disk would, and the tracker abandons the generation (see `Tracker`).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::bitmap::{Bitmap, Geometry, COW_SLOT};

/// Bytes the copy-on-write stores of one tracker may hold for the frozen generation.
#[derive(Debug)]
pub struct CowBudget {
    limit: AtomicU64,
    used: AtomicU64,
}

impl CowBudget {
    pub fn new(limit: u64) -> CowBudget {
        CowBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        }
    }

    /// A new generation: nothing used, and this limit.
    pub fn reset(&self, limit: u64) {
        self.limit.store(limit, Ordering::SeqCst);
        self.used.store(0, Ordering::SeqCst);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Takes `n` bytes if they fit.
    fn take(&self, n: u64) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|t| *t <= limit)
            })
            .is_ok()
    }
}

/// Runs once the copies it waited for are durable (or failed).
pub type Then = Box<dyn FnOnce(Result<(), String>) + Send>;

#[derive(Default)]
struct State {
    /// Blocks copied into the open batch, not yet durable.
    pending: HashSet<u64>,
    blocks: Vec<u64>,
    waiters: Vec<Then>,
    stop: bool,
}

pub struct CowStore {
    pub path: PathBuf,
    file: File,
    state: Mutex<State>,
    cv: Condvar,
    budget: Arc<CowBudget>,
}

impl CowStore {
    pub fn new(path: PathBuf, file: File, budget: Arc<CowBudget>) -> CowStore {
        CowStore {
            path,
            file,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the syncer thread of this store.
    pub fn spawn_syncer(self: &Arc<Self>, bitmap: Arc<Bitmap>, name: &str) -> JoinHandle<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("cow-sync-{name}"))
            .spawn(move || me.syncer(&bitmap))
            .expect("spawning the copy-on-write syncer")
    }

    pub fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    fn syncer(&self, bitmap: &Bitmap) {
        loop {
            let (blocks, waiters) = {
                let mut st = self.lock();
                while st.waiters.is_empty() && !st.stop {
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.waiters.is_empty() && st.stop {
                    return;
                }
                (
                    std::mem::take(&mut st.blocks),
                    std::mem::take(&mut st.waiters),
                )
            };
            let r = self
                .file
                .sync_data()
                .map_err(|e| format!("copy-on-write store {}: {e}", self.path.display()))
                .and_then(|_| {
                    for b in &blocks {
                        bitmap.set(COW_SLOT, *b);
                    }
                    bitmap.flush_slot(COW_SLOT).map_err(|e| e.to_string())
                });
            {
                let mut st = self.lock();
                for b in &blocks {
                    st.pending.remove(b);
                }
            }
            for w in waiters {
                w(r.clone());
            }
        }
    }

    /// Before `[offset, offset+len)` of the image is overwritten: copies the frozen blocks not
    /// yet copied into the store, then runs `then` once they are durable (at once if nothing
    /// had to be copied or waited for).
    #[allow(clippy::too_many_arguments)]
    pub fn before_overwrite(
        &self,
        bitmap: &Bitmap,
        geo: Geometry,
        frozen: usize,
        image: &File,
        image_path: &Path,
        offset: u64,
        len: u64,
        then: Then,
    ) {
        let mut st = self.lock();
        let mut wait = false;
        for b in geo.block_range(offset, len) {
            if !bitmap.test(frozen, b) || bitmap.test(COW_SLOT, b) {
                continue;
            }
            wait = true;
            if st.pending.contains(&b) {
                continue;
            }
            let (start, n) = geo.block_bytes(b);
            if !self.budget.take(n) {
                drop(st);
                return then(Err(format!(
                    "copy-on-write store {}: the limit of {} bytes for a frozen generation \
                     is reached (--cow-limit)",
                    self.path.display(),
                    self.budget.limit()
                )));
            }
            let mut buf = vec![0u8; n as usize];
            let copied = image
                .read_exact_at(&mut buf, start)
                .map_err(|e| format!("image {}: {e}", image_path.display()))
                .and_then(|_| {
                    self.file
                        .write_all_at(&buf, start)
                        .map_err(|e| format!("copy-on-write store {}: {e}", self.path.display()))
                });
            if let Err(e) = copied {
                drop(st);
                return then(Err(e));
            }
            st.pending.insert(b);
            st.blocks.push(b);
        }
        if wait {
            st.waiters.push(then);
            drop(st);
            self.cv.notify_all();
        } else {
            drop(st);
            then(Ok(()));
        }
    }

    /// Reads frozen contents of `[at, at+buf.len())` from the store.
    pub fn read(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, at)
    }

    /// Empties the store. Callers have drained all writes (nothing is pending).
    pub fn truncate(&self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()
    }
}
