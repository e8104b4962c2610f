//! What failover needs of a tracker, beside replication:
//!
//! - **seal**: a planned failover shuts the VM down, then seals its disks: every write,
//!   trim or write-zeroes is refused with EPERM (reads are served), durably (the seal
//!   survives a restart), so the last cycle shipped holds everything the VM ever wrote;
//! - **baseline**: an unplanned failover starts the new primary's tracker with a full freeze
//!   that is never shipped; its copy-on-write store keeps the failover point's contents of
//!   every block the failed-over VM overwrites, so the failover can be cancelled. If that
//!   copy-on-write fails (full, past `--cow-limit`), only the baseline is dropped: the
//!   writes since the failover are in the active slot, so no resync is needed, but the
//!   failover can no longer be cancelled;
//! - **mark-dirty** and **dirty-ranges**: reverse replication ships the ranges where the two
//!   sites can differ; one site marks the other's ranges dirty, the other lists its own;
//! - **the last write's time**, kept in `activity.json` (at most a few seconds behind, and
//!   exact at a clean stop): a split brain is an old primary that wrote after the failover;
//! - the tracker's PID in its `lock` file, so a failover can stop it.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmreplica_common::{read_state, write_state};

use crate::bitmap::COW_SLOT;
use crate::tracker::{FrozenDisk, Generation, Shared, State, Tracker, TrackerError, STATE_FILE};

/// Per disk (by name), byte ranges `(offset, length)`.
pub type DiskRanges = Vec<(String, Vec<(u64, u64)>)>;

/// The NBD connections a disk (by name) serves now.
pub type Connections = Box<dyn Fn(&str) -> usize + Send + Sync>;

const STAMP_FILE: &str = "activity.json";
const STAMP_FORMAT: &str = "vmreplica-tracker-activity";
const STAMP_VERSION: u32 = 1;
/// How often a changed last-write time is saved.
const STAMP_EVERY: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
struct Stamp {
    /// Seconds since the epoch of the last write any disk took (0: none recorded).
    last_write_at: u64,
}

/// The state of a stopped tracker (its state dir `dir`), read without opening it; None if
/// there is none.
pub fn state_offline(dir: &Path) -> Result<Option<State>, TrackerError> {
    Ok(read_state(
        &dir.join(STATE_FILE),
        crate::tracker::STATE_FORMAT,
        crate::tracker::STATE_VERSION,
    )?)
}

/// The frozen generation of a stopped tracker (its state dir `dir`), for a
/// [`crate::frozen::FrozenReader`]: cancelling a failover reads its baseline this way.
pub fn frozen_offline(dir: &Path) -> Result<Option<Generation>, TrackerError> {
    let Some(st) = state_offline(dir)? else {
        return Ok(None);
    };
    let Some(f) = st.frozen else { return Ok(None) };
    Ok(Some(Generation {
        generation: f.generation,
        id: f.id,
        frozen_at: f.frozen_at,
        full: f.full,
        baseline: f.baseline,
        disks: st
            .disks
            .iter()
            .map(|d| FrozenDisk {
                name: d.name.clone(),
                image: d.image.clone(),
                size: d.size,
                granularity: st.granularity,
                bitmap: dir.join(format!("{}.bitmap", d.name)),
                frozen_slot: 1 - d.active_slot.min(1),
                cow_slot: COW_SLOT,
                cow: dir.join(format!("{}.cow", d.name)),
                blocks: 0,
                resync_required: d.resync_required,
            })
            .collect(),
    }))
}

/// The last write's time saved in state dir `dir` (0 if none, or unreadable: a missing
/// stamp never invents a write).
pub fn read_stamp(dir: &Path) -> u64 {
    match read_state::<Stamp>(&dir.join(STAMP_FILE), STAMP_FORMAT, STAMP_VERSION) {
        Ok(Some(s)) => s.last_write_at,
        Ok(None) => 0,
        Err(e) => {
            tracing::warn!("{e}; the time of the last write is taken as unknown");
            0
        }
    }
}

/// Saves the last write's time now.
pub(crate) fn write_stamp(shared: &Shared) {
    let s = Stamp {
        last_write_at: shared.last_write.load(Ordering::SeqCst),
    };
    if let Err(e) = write_state(
        &shared.dir.join(STAMP_FILE),
        STAMP_FORMAT,
        STAMP_VERSION,
        &s,
    ) {
        vmreplica_common::warn_limited!(
            Duration::from_secs(60),
            "saving the time of the last write: {e}"
        );
    }
}

/// Writes this process's PID into the tracker's (locked) `lock` file, for whoever must stop
/// it (a planned failover); best effort.
pub(crate) fn write_pid(lock: &File) {
    let mut f = lock;
    let _ = f.set_len(0);
    let _ = f.seek(SeekFrom::Start(0));
    let _ = writeln!(f, "{}", std::process::id());
}

/// The thread that saves the last write's time when it changed, every few seconds.
pub(crate) struct Stamper {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Stamper {
    pub(crate) fn start(shared: &Arc<Shared>) -> Stamper {
        let (stop, rx) = channel::<()>();
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let mut saved = shared.last_write.load(Ordering::SeqCst);
        let thread = std::thread::Builder::new()
            .name("write-stamp".into())
            .spawn(move || loop {
                match rx.recv_timeout(STAMP_EVERY) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let Some(s) = weak.upgrade() else { return };
                let now = s.last_write.load(Ordering::SeqCst);
                if now != saved {
                    write_stamp(&s);
                    saved = now;
                }
            })
            .ok();
        Stamper { stop, thread }
    }
}

impl Drop for Stamper {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// The baseline's copy-on-write failed (`why`): only the baseline goes. Readers of it
    /// were told (its bitmaps say abandoned); its slots are emptied once the state without
    /// it is saved. No disk needs a resync: the writes since the failover are tracked.
    pub(crate) fn drop_baseline(&self, mut st: MutexGuard<'_, State>, why: &str) {
        let Some(f) = st.frozen.take() else { return };
        tracing::error!(
            generation = f.generation,
            "the failover's baseline is dropped: its copy-on-write failed ({why}). Cancelling \
             the failover is no longer possible (commit it); the writes since the failover \
             stay tracked, no resync is needed"
        );
        for d in &self.disks {
            if let Some(t) = d.tracking() {
                t.abandon();
            }
        }
        self.drop_pending.store(true, Ordering::SeqCst);
        let _ = self.persist(&st);
    }
}

/// Byte ranges `(offset, length)` of the set blocks `blocks` (in order), merged.
fn byte_ranges(blocks: impl Iterator<Item = u64>, geo: crate::bitmap::Geometry) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        let (o, l) = geo.block_bytes(b);
        match out.last_mut() {
            Some((so, sl)) if *so + *sl == o => *sl += l,
            _ => out.push((o, l)),
        }
    }
    out
}

impl Tracker {
    /// Tells the tracker how many NBD connections each disk serves (the NBD server's count),
    /// for `status`; set once.
    pub fn set_connections(&self, f: Connections) {
        let _ = self.connections.set(f);
    }

    /// NBD connections disk `name` serves now (None: no server reports them).
    pub fn connections(&self, name: &str) -> Option<usize> {
        self.connections.get().map(|f| f(name))
    }

    /// When a write last reached one of the disks (seconds since the epoch; 0: none
    /// recorded since the state dir was made).
    pub fn last_write_at(&self) -> u64 {
        self.shared.last_write.load(Ordering::SeqCst)
    }

    /// Seals (or unseals) the disks: writes in flight finish first; from then on every
    /// modifying request is refused with EPERM, also after a restart, until unsealed.
    pub fn seal(&self, sealed: bool) -> Result<(), TrackerError> {
        let _op = self.lock_ops();
        self.shared.settle()?;
        self.quiesced(|| -> Result<(), TrackerError> {
            let mut st = self.lock_state();
            if st.sealed != sealed {
                let mut next = st.clone();
                next.sealed = sealed;
                self.save(&next)?;
                *st = next;
            }
            for d in self.disks() {
                d.sealed.store(sealed, Ordering::SeqCst);
            }
            Ok(())
        })?;
        tracing::info!(
            sealed,
            "{}",
            if sealed {
                "disks sealed: writes are refused (EPERM) until unsealed"
            } else {
                "disks unsealed: writes are taken again"
            }
        );
        Ok(())
    }

    /// Freezes a failover's baseline (see the module's notes).
    pub fn freeze_baseline(&self) -> Result<Generation, TrackerError> {
        self.freeze_as(true, true, || {})
    }

    /// Marks byte ranges of disk `name` dirty (in the active slot, durably), so the next
    /// freeze ships them.
    pub fn mark_dirty(&self, name: &str, ranges: &[(u64, u64)]) -> Result<(), TrackerError> {
        let _op = self.lock_ops();
        self.shared.settle()?;
        let d = self
            .disks()
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| TrackerError::NoSuchDisk(name.to_string()))?;
        for &(offset, len) in ranges {
            if offset.checked_add(len).is_none_or(|e| e > d.size) {
                return Err(TrackerError::BadRange {
                    disk: name.to_string(),
                    offset,
                    len,
                    size: d.size,
                });
            }
        }
        let t = d.tracking().ok_or(TrackerError::TrackingOff)?;
        t.mark_ranges(ranges)
            .map_err(|source| TrackerError::Tracking {
                name: name.to_string(),
                source,
            })?;
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        tracing::info!(
            disk = name,
            ranges = ranges.len(),
            bytes,
            "ranges marked dirty"
        );
        Ok(())
    }

    /// Per disk, the byte ranges changed and not yet replicated: the active slot and a
    /// frozen generation (but not a baseline, whose every block is frozen).
    pub fn dirty_ranges(&self) -> Result<DiskRanges, TrackerError> {
        let _op = self.lock_ops();
        let baseline = self
            .lock_state()
            .frozen
            .as_ref()
            .is_some_and(|f| f.baseline);
        let mut out = Vec::new();
        for (_, d, t) in self.tracked()? {
            let s = t.slots();
            let bm = t.bitmap();
            let geo = t.geometry();
            let frozen = s.frozen.filter(|_| !baseline);
            let blocks = (0..geo.blocks())
                .filter(|b| bm.test(s.active, *b) || frozen.is_some_and(|f| bm.test(f, *b)));
            out.push((d.name.clone(), byte_ranges(blocks, geo)));
        }
        Ok(out)
    }
}
