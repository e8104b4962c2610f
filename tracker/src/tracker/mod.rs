//! The tracker: a set of disks served together, their state directory, and generations.
//!
//! State directory contents: `tracker.json` (versioned state, written atomically), and per
//! disk `NAME.bitmap` (mapped dirty bitmap), `NAME.al` (activity log) and `NAME.cow`
//! (sparse copy-on-write store for the frozen generation), plus `lock` held while running.
//!
//! Every change of generations follows one order: first what can be undone or is harmless
//! (bits merged into the active set, emptied slots), durably; then the state file; only then
//! what the old state still needed (the frozen slot, the copy-on-write store). A failure or a
//! crash at any step leaves a state file that describes complete data. State that cannot be
//! proven complete (a state file gone while tracking files remain, a bitmap that does not
//! match its checksum) marks every affected disk for a checksum resync.
//!
//! Here the tracker and what its disks' failure hooks share; beside it: `open` (opening and
//! recovering), `generations` (freeze, release, merge, lineage, resync marks), `state` (the
//! state file), `config` and `error`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cow::CowBudget;
use crate::disk::Disk;
use crate::engine::Engine;
use crate::tracking::Tracking;

mod config;
mod error;
mod generations;
mod open;
mod state;

pub use config::{CowLimit, TrackerConfig, DEFAULT_GRANULARITY};
pub use error::TrackerError;
pub(crate) use state::{save_state, STATE_FORMAT, STATE_VERSION};
pub use state::{DiskState, FrozenDisk, FrozenState, Generation, Parent, State, STATE_FILE};

/// What the tracker and its disks' failure hooks share.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) disks: Vec<Arc<Disk>>,
    pub(crate) state: Mutex<State>,
    /// When a write last reached a disk (see `Disk::last_write`).
    pub(crate) last_write: Arc<AtomicU64>,
    /// The state in memory is ahead of the file (a save after a tracking failure failed):
    /// every later operation saves it again first.
    unsaved: AtomicBool,
    /// Frozen slots of an abandoned generation, emptied once the state without it is saved.
    pub(crate) drop_pending: AtomicBool,
}

/// A tracked disk: its index among all disks, the disk, its tracking.
type TrackedDisk<'a> = (usize, &'a Arc<Disk>, &'a Tracking);

pub struct Tracker {
    pub(crate) shared: Arc<Shared>,
    /// Serialises freeze, release, merge and clear-resync.
    ops: Mutex<()>,
    engine: Arc<dyn Engine>,
    budget: Arc<CowBudget>,
    cow_limit: CowLimit,
    /// NBD connections of a disk, when a server reports them (see
    /// [`Tracker::set_connections`]).
    pub(crate) connections: std::sync::OnceLock<crate::failover::Connections>,
    /// Stops the thread that persists the last write's time.
    pub(crate) _stamper: Option<crate::failover::Stamper>,
    _lock: File,
}

impl Shared {
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves `st` (the state in memory); after a failure, later operations try again.
    pub(crate) fn persist(&self, st: &State) -> Result<(), TrackerError> {
        match save_state(&self.dir, st) {
            Ok(()) => {
                self.unsaved.store(false, Ordering::SeqCst);
                if self.drop_pending.swap(false, Ordering::SeqCst) {
                    self.drop_frozen_slots();
                }
                Ok(())
            }
            Err(e) => {
                self.unsaved.store(true, Ordering::SeqCst);
                vmreplica_common::error_limited!(
                    std::time::Duration::from_secs(10),
                    "{e}; the state kept in memory is saved again by the next operation"
                );
                Err(e)
            }
        }
    }

    /// Saves the state again if an earlier save failed.
    pub(crate) fn settle(&self) -> Result<(), TrackerError> {
        if self.unsaved.load(Ordering::SeqCst) {
            let st = self.lock_state();
            self.persist(&st)?;
        }
        Ok(())
    }

    fn drop_frozen_slots(&self) {
        for d in &self.disks {
            if let Some(t) = d.tracking() {
                if let Err(e) = t.drop_frozen() {
                    tracing::warn!(disk = %d.name, "emptying the abandoned generation's slots: {e} (the next freeze empties them again)");
                }
            }
        }
    }

    /// Tracking of disk `idx` failed (its log, bitmap or copy-on-write store): the disk needs
    /// a resync, and a frozen generation, which can no longer be read as it was frozen, is
    /// abandoned: its blocks go back into the dirty sets. Runs in the thread that hit the
    /// failure, while the write waits; never under a lock a freeze holds while draining.
    fn tracking_failed(&self, idx: usize, why: &str, cow: bool) {
        let mut st = self.lock_state();
        if cow && st.frozen.as_ref().is_some_and(|f| f.baseline) {
            return self.drop_baseline(st, why);
        }
        let since = st.next_generation;
        let ds = &st.disks[idx];
        if ds.resync_required && ds.resync_since == since && st.frozen.is_none() {
            return;
        }
        let name = ds.name.clone();
        st.disks[idx].resync_required = true;
        st.disks[idx].resync_since = since;
        if let Some(f) = st.frozen.take() {
            tracing::error!(disk = %name, generation = f.generation, "tracking failed ({why}): the frozen generation is abandoned, its blocks return to the dirty set; every disk is resynchronised by checksums next");
            for (i, d) in self.disks.iter().enumerate() {
                let Some(t) = d.tracking() else { continue };
                t.abandon();
                if let Err(e) = t.merge_frozen() {
                    tracing::error!(disk = %d.name, "returning the abandoned generation's blocks to the dirty set: {e}; the disk needs a resync");
                    st.disks[i].resync_required = true;
                    st.disks[i].resync_since = since;
                }
            }
            self.drop_pending.store(true, Ordering::SeqCst);
        } else {
            tracing::error!(disk = %name, "tracking failed ({why}): the disk is marked for a checksum resync; the guest's writes go on");
        }
        let _ = self.persist(&st);
    }
}

impl Tracker {
    pub fn disks(&self) -> &[Arc<Disk>] {
        &self.shared.disks
    }

    /// The disks as NBD exports, each under its name.
    pub fn nbd_exports(&self) -> Vec<vmreplica_nbd::Export> {
        self.disks()
            .iter()
            .map(|d| vmreplica_nbd::Export {
                name: d.name.clone(),
                description: format!("vmreplica disk {} ({})", d.name, d.path.display()),
                device: Arc::clone(d) as Arc<dyn vmreplica_nbd::BlockDevice>,
                read_only: false,
            })
            .collect()
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn state_dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Bytes the copy-on-write stores hold for the frozen generation, and their limit.
    pub fn cow_usage(&self) -> (u64, u64) {
        (self.budget.used(), self.budget.limit())
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.shared.lock_state()
    }

    /// The state (saving it first if an earlier save failed).
    pub fn state(&self) -> State {
        let _ = self.shared.settle();
        self.lock_state().clone()
    }

    pub(crate) fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A save maybe made (renamed, its directory not synced) fails like any other, and the
    /// state in memory (the old one) is saved again before the next operation.
    pub(crate) fn save(&self, state: &State) -> Result<(), TrackerError> {
        let r = save_state(&self.shared.dir, state);
        if matches!(&r, Err(TrackerError::State(e)) if e.maybe_made()) {
            self.shared.unsaved.store(true, Ordering::SeqCst);
        }
        r
    }

    /// The tracked disks (all but the excluded ones), with their index among all disks.
    pub(crate) fn tracked(&self) -> Result<Vec<TrackedDisk<'_>>, TrackerError> {
        let excluded: Vec<bool> = self.lock_state().disks.iter().map(|d| d.excluded).collect();
        self.disks()
            .iter()
            .enumerate()
            .filter(|(i, _)| !excluded.get(*i).copied().unwrap_or(false))
            .map(|(i, d)| {
                d.tracking()
                    .map(|t| (i, d, t))
                    .ok_or(TrackerError::TrackingOff)
            })
            .collect()
    }

    /// Runs `f` with every disk's writes drained and held back. Callers hold `ops` and no
    /// other lock: a write being drained may need the state lock (a tracking failure).
    pub(crate) fn quiesced<T>(&self, f: impl FnOnce() -> T) -> T {
        for d in self.disks() {
            d.gate.close();
        }
        let r = f();
        for d in self.disks() {
            d.gate.open();
        }
        r
    }

    /// Flushes images and bitmaps and marks the state clean. Callers have stopped I/O.
    pub fn close(&self) -> Result<(), TrackerError> {
        let tracked = self.disks().iter().any(|d| d.tracking().is_some());
        for d in self.disks() {
            d.file.sync_all().map_err(|source| TrackerError::Image {
                name: d.name.clone(),
                path: d.path.clone(),
                source,
            })?;
            if let Some(t) = d.tracking() {
                t.flush().map_err(|source| TrackerError::Tracking {
                    name: d.name.clone(),
                    source,
                })?;
            }
        }
        if tracked {
            let mut st = self.lock_state();
            let mut next = st.clone();
            next.clean = true;
            self.save(&next)?;
            *st = next;
            crate::failover::write_stamp(&self.shared);
        }
        tracing::info!(dir = %self.shared.dir.display(), "tracker state flushed and marked clean");
        Ok(())
    }
}
