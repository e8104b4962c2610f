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

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::{Deserialize, Serialize};
use vmreplica_common::lineage::Lineage;
use vmreplica_common::{read_state, validate_name, write_state, StateFileError};

use crate::bitmap::{Geometry, COW_SLOT};
use crate::cow::CowBudget;
use crate::crashpoint::crash_point;
use crate::disk::Disk;
use crate::engine::{self, Engine};
use crate::imagelock::{self, Conflict};
use crate::tracking::{OpenArgs, OpenOutcome, Slots, Tracking};

mod config;
mod error;
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

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn dir_for_log(p: &Path) -> String {
    p.display().to_string()
}

fn describe(disks: &[(String, PathBuf)]) -> String {
    disks
        .iter()
        .map(|(n, p)| format!("{n}={}", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether any tracking file of `disks` exists in `dir`.
fn tracking_files_exist(dir: &Path, disks: &[(String, PathBuf)]) -> bool {
    disks.iter().any(|(name, _)| {
        ["bitmap", "al", "cow"]
            .iter()
            .any(|ext| dir.join(format!("{name}.{ext}")).exists())
    })
}

struct Image {
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
}

/// Opens, checks and locks the images (nothing is created or changed).
fn open_images(disks: &[(String, PathBuf)]) -> Result<Vec<Image>, TrackerError> {
    let mut images: Vec<(Image, (u64, u64))> = Vec::new();
    for (i, (name, path)) in disks.iter().enumerate() {
        validate_name(name).map_err(|source| TrackerError::BadName {
            name: name.clone(),
            source,
        })?;
        if disks[..i].iter().any(|(n, _)| n == name) {
            return Err(TrackerError::DuplicateDisk(name.clone()));
        }
        let img_err = |source| TrackerError::Image {
            name: name.clone(),
            path: path.clone(),
            source,
        };
        let path = fs::canonicalize(path).map_err(img_err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(img_err)?;
        let meta = file.metadata().map_err(img_err)?;
        let size = meta.len();
        if size == 0 {
            return Err(TrackerError::EmptyImage {
                name: name.clone(),
                path,
            });
        }
        let key = (meta.dev(), meta.ino());
        if let Some((other, _)) = images.iter().find(|(_, k)| *k == key) {
            return Err(TrackerError::SameImage {
                first: other.name.clone(),
                second: name.clone(),
                path,
            });
        }
        match imagelock::lock(&file).map_err(img_err)? {
            Ok(()) => {}
            Err(Conflict::Tracker) => {
                return Err(TrackerError::ImageTaken {
                    name: name.clone(),
                    path,
                })
            }
            Err(Conflict::Writer) => {
                return Err(TrackerError::ImageInUse {
                    name: name.clone(),
                    path,
                })
            }
        }
        images.push((
            Image {
                name: name.clone(),
                path,
                file,
                size,
            },
            key,
        ));
    }
    Ok(images.into_iter().map(|(i, _)| i).collect())
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
    /// Validates everything first (nothing is created or changed if that fails), then opens
    /// or creates the state directory, recovering from an unclean stop.
    pub fn open(cfg: TrackerConfig) -> Result<Tracker, TrackerError> {
        let g = cfg.granularity;
        if !g.is_power_of_two() || !(4096..=1 << 20).contains(&g) {
            return Err(TrackerError::BadGranularity(g.into()));
        }
        if cfg.disks.is_empty() {
            return Err(TrackerError::NoDisks);
        }
        if let Some(x) = cfg
            .excluded
            .iter()
            .find(|x| !cfg.disks.iter().any(|(n, _)| n == *x))
        {
            return Err(TrackerError::UnknownExcluded(x.clone()));
        }
        if cfg.disks.iter().all(|(n, _)| cfg.excluded.contains(n)) {
            return Err(TrackerError::AllExcluded);
        }
        let images = open_images(&cfg.disks)?;
        let given: Vec<(String, PathBuf)> = images
            .iter()
            .map(|i| (i.name.clone(), i.path.clone()))
            .collect();
        let dir = cfg.state_dir.clone();
        let state_path = dir.join(STATE_FILE);
        let previous: Option<State> = if cfg.tracking {
            match read_state(&state_path, STATE_FORMAT, STATE_VERSION) {
                Err(StateFileError::WrongVersion { found: 1, .. }) => {
                    // Version 1 is version 2 without a lineage: read as such; saved as
                    // version 2 below.
                    let s: Option<State> = read_state(&state_path, STATE_FORMAT, 1)?;
                    tracing::info!(dir = %dir_for_log(&cfg.state_dir), "state file version 1 migrated to version 2 (no lineage yet)");
                    s
                }
                r => r?,
            }
        } else {
            None
        };
        if let Some(prev) = &previous {
            let found: Vec<(String, PathBuf)> = prev
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.image.clone()))
                .collect();
            if found != given {
                return Err(TrackerError::ForeignStateDir {
                    dir,
                    found: describe(&found),
                    given: describe(&given),
                });
            }
            if prev.granularity != g {
                return Err(TrackerError::GranularityChanged {
                    dir,
                    found: prev.granularity,
                    given: g,
                });
            }
            for d in &prev.disks {
                let now = cfg.excluded.contains(&d.name);
                if let (Some(f), true) = (&prev.frozen, now != d.excluded) {
                    return Err(TrackerError::ExclusionWhileFrozen {
                        generation: f.generation,
                        disk: d.name.clone(),
                        was: if d.excluded {
                            "excluded (now it is not)"
                        } else {
                            "tracked (now it is excluded)"
                        },
                    });
                }
            }
            for (d, img) in prev.disks.iter().zip(&images) {
                if d.size != img.size {
                    return Err(TrackerError::SizeChanged {
                        name: img.name.clone(),
                        path: img.path.clone(),
                        size: img.size,
                        found: d.size,
                    });
                }
            }
        }
        // Checks passed: from here on the state dir may be created and changed.
        let dir_err = |source| TrackerError::StateDir {
            dir: dir.clone(),
            source,
        };
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(dir_err)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(dir_err)?;
            }
        }
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(dir_err)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(TrackerError::Locked(dir));
        }
        let engine = cfg
            .engine
            .clone()
            .unwrap_or_else(|| engine::probe(cfg.force_thread_pool));
        let existed = previous.is_some();
        let unclean = previous.as_ref().is_some_and(|p| !p.clean);
        // Tracking files without the state that explains them: what they say cannot be
        // trusted (a deleted or lost tracker.json), so every disk is resynchronised.
        let state_lost = cfg.tracking && !existed && tracking_files_exist(&dir, &given);
        let mut state = previous.unwrap_or_else(|| State {
            lineage: None,
            parent: None,
            sealed: false,
            clean: false,
            granularity: g,
            next_generation: 1,
            epoch: 0,
            frozen: None,
            disks: images
                .iter()
                .map(|i| DiskState {
                    name: i.name.clone(),
                    image: i.path.clone(),
                    size: i.size,
                    active_slot: 0,
                    resync_required: false,
                    resync_since: 0,
                    excluded: false,
                })
                .collect(),
        });
        for ds in &mut state.disks {
            let excluded = cfg.excluded.contains(&ds.name);
            if ds.excluded && !excluded && existed {
                // Its writes were never tracked: only a checksum resync can tell what differs.
                tracing::warn!(disk = %ds.name, "disk no longer excluded: it needs a checksum resync (and a replica that has it: a new initial copy if the replica never had it)");
                ds.resync_required = true;
                ds.resync_since = state.next_generation;
            }
            ds.excluded = excluded;
        }
        let stamps = images
            .iter()
            .map(|i| (i.name.as_str(), i.path.as_path(), &i.file));
        let (restored, epoch) =
            crate::epoch::check(&dir, existed && cfg.tracking, state.epoch, stamps);
        state.epoch = epoch;
        if cfg.tracking && !existed {
            // The state file comes first, so tracking files without it always mean it was
            // lost.
            save_state(&dir, &state)?;
        }
        if unclean {
            tracing::warn!(dir = %dir.display(), "tracker did not stop cleanly; recovering dirty bits from the activity logs");
        }
        if state_lost {
            tracing::error!(dir = %dir.display(), "{STATE_FILE} is missing but tracking files are there: the tracker's state was lost; every disk is marked for a checksum resync");
        }
        let budget = Arc::new(CowBudget::new(cfg.cow_limit.bytes(&dir)));
        let last_write = Arc::new(AtomicU64::new(crate::failover::read_stamp(&dir)));
        let baseline = state.frozen.as_ref().is_some_and(|f| f.baseline);
        let mut baseline_lost = false;
        let mut disks = Vec::new();
        let mut abandon = false;
        let since = state.next_generation;
        for (img, ds) in images.into_iter().zip(state.disks.iter_mut()) {
            let tracking = if cfg.tracking && !ds.excluded {
                let args = OpenArgs {
                    geo: Geometry {
                        disk_size: img.size,
                        granularity: g,
                    },
                    slots: Slots {
                        active: ds.active_slot,
                        frozen: state.frozen.as_ref().map(|_| 1 - ds.active_slot),
                    },
                    unclean,
                    existed_before: existed,
                    lost_state: state_lost,
                    al_capacity: cfg.al_extents,
                };
                let (t, outcome) = Tracking::open(&dir, &img.name, args, Arc::clone(&budget))
                    .map_err(|source| TrackerError::Tracking {
                        name: img.name.clone(),
                        source,
                    })?;
                match outcome {
                    OpenOutcome::Clean => {}
                    OpenOutcome::Replayed(n) => {
                        tracing::info!(disk = %img.name, extents = n, "replayed activity log")
                    }
                    OpenOutcome::ResyncRequired(why) => {
                        tracing::error!(disk = %img.name, "{why}: tracking cannot be proven complete; disk marked for checksum resync");
                        ds.resync_required = true;
                        ds.resync_since = since;
                        abandon = true;
                    }
                }
                if baseline && t.bitmap().abandoned() {
                    // A baseline whose copy-on-write failed is dropped, not abandoned: the
                    // writes since the failover are in the active slot.
                    baseline_lost = true;
                } else if restored || (state.frozen.is_some() && t.bitmap().abandoned()) {
                    tracing::error!(disk = %img.name, restored, "the disk's tracking cannot be trusted (an older state restored, or the frozen generation abandoned before the tracker stopped); disk marked for checksum resync");
                    ds.resync_required = true;
                    ds.resync_since = since;
                    abandon = true;
                }
                Some(t)
            } else {
                None
            };
            disks.push(Disk::new(
                img.name,
                img.path,
                img.size,
                img.file,
                Arc::clone(&engine),
                tracking,
                Arc::clone(&last_write),
            ));
        }
        for d in &disks {
            d.sealed.store(state.sealed, Ordering::SeqCst);
        }
        let mut drop_frozen = false;
        if let (true, Some(f)) = (baseline_lost && !abandon, &state.frozen) {
            tracing::error!(generation = f.generation, "the failover's baseline was dropped before the tracker stopped (its copy-on-write failed): the failover can no longer be cancelled");
            state.frozen = None;
            drop_frozen = true;
        } else if let (true, Some(f)) = (abandon, &state.frozen) {
            // A generation whose bits or copies cannot be trusted is not shipped.
            tracing::error!(generation = f.generation, "the frozen generation cannot be proven complete: abandoned, its blocks return to the dirty set");
            for d in &disks {
                if let Some(t) = d.tracking() {
                    t.abandon();
                    t.merge_frozen().map_err(|source| TrackerError::Tracking {
                        name: d.name.clone(),
                        source,
                    })?;
                }
            }
            state.frozen = None;
            drop_frozen = true;
        }
        state.clean = false;
        if cfg.tracking {
            save_state(&dir, &state)?;
            // Saved first: the live directory's epoch is never behind an image's.
            for d in &disks {
                crate::epoch::stamp(d, state.epoch, true);
            }
        }
        let shared = Arc::new(Shared {
            dir,
            disks,
            state: Mutex::new(state),
            last_write,
            unsaved: AtomicBool::new(false),
            drop_pending: AtomicBool::new(false),
        });
        if drop_frozen {
            shared.drop_frozen_slots();
        }
        for (i, d) in shared.disks.iter().enumerate() {
            let weak: Weak<Shared> = Arc::downgrade(&shared);
            d.set_failure_hook(Box::new(move |why, cow| {
                if let Some(s) = weak.upgrade() {
                    s.tracking_failed(i, why, cow);
                }
            }));
        }
        crate::failover::write_pid(&lock);
        let stamper = cfg
            .tracking
            .then(|| crate::failover::Stamper::start(&shared));
        Ok(Tracker {
            shared,
            ops: Mutex::new(()),
            engine,
            budget,
            cow_limit: cfg.cow_limit,
            connections: std::sync::OnceLock::new(),
            _stamper: stamper,
            _lock: lock,
        })
    }

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

    fn generation_info(&self, st: &State) -> Option<Generation> {
        let frozen = st.frozen.as_ref()?;
        let disks = self
            .disks()
            .iter()
            .zip(&st.disks)
            .filter_map(|(d, ds)| {
                let t = d.tracking()?;
                let slot = t.slots().frozen?;
                Some(FrozenDisk {
                    name: d.name.clone(),
                    image: d.path.clone(),
                    size: d.size,
                    granularity: st.granularity,
                    bitmap: t.bitmap().path().to_path_buf(),
                    frozen_slot: slot,
                    cow_slot: COW_SLOT,
                    cow: t.cow_path().to_path_buf(),
                    blocks: t.bitmap().count(slot),
                    resync_required: ds.resync_required,
                })
            })
            .collect();
        Some(Generation {
            generation: frozen.generation,
            id: frozen.id,
            frozen_at: frozen.frozen_at,
            full: frozen.full,
            baseline: frozen.baseline,
            disks,
        })
    }

    /// The frozen generation, if any.
    pub fn frozen(&self) -> Option<Generation> {
        let _ = self.shared.settle();
        self.generation_info(&self.lock_state())
    }

    /// Freezes all disks at one instant: writes acknowledged before are in the generation,
    /// later ones are not, and the generation's blocks stay readable as they were.
    pub fn freeze(&self) -> Result<Generation, TrackerError> {
        self.freeze_with(false, || {})
    }

    /// [`Self::freeze`], running `at_freeze` at the freeze instant, while every disk is
    /// quiesced (tests use it to copy the images exactly as frozen). With `full`, every block
    /// of every disk belongs to the generation (initial sync and resync read whole disks).
    ///
    /// All or nothing: the slots only change roles in memory once the state saying so is
    /// durable; a failure before leaves every dirty bit where it was.
    pub fn freeze_with(
        &self,
        full: bool,
        at_freeze: impl FnOnce(),
    ) -> Result<Generation, TrackerError> {
        self.freeze_as(full, false, at_freeze)
    }

    /// [`Self::freeze_with`]; with `baseline`, a full freeze that is a failover's baseline
    /// (never shipped, see [`FrozenState::baseline`]).
    pub(crate) fn freeze_as(
        &self,
        full: bool,
        baseline: bool,
        at_freeze: impl FnOnce(),
    ) -> Result<Generation, TrackerError> {
        let full = full || baseline;
        let _op = self.lock_ops();
        self.shared.settle()?;
        let tracked = self.tracked()?;
        if let Some(f) = &self.lock_state().frozen {
            return Err(TrackerError::AlreadyFrozen(f.generation));
        }
        let tracking_err = |d: &Disk| {
            let name = d.name.clone();
            move |source| TrackerError::Tracking { name, source }
        };
        self.quiesced(|| -> Result<(), TrackerError> {
            at_freeze();
            self.budget.reset(self.cow_limit.bytes(&self.shared.dir));
            for (_, d, t) in &tracked {
                t.prepare_freeze(full).map_err(tracking_err(d))?;
            }
            let mut st = self.lock_state();
            let mut next = st.clone();
            let generation = next.next_generation;
            for (i, _, t) in &tracked {
                next.disks[*i].active_slot = 1 - t.slots().active;
            }
            next.frozen = Some(FrozenState {
                generation,
                id: rand::random::<u64>() | 1,
                frozen_at: now(),
                full,
                baseline,
            });
            next.next_generation = generation + 1;
            next.epoch += 1;
            crash_point("freeze.before-save");
            self.save(&next)?;
            crash_point("freeze.saved");
            for (_, _, t) in &tracked {
                t.flip();
            }
            *st = next;
            Ok(())
        })?;
        let st = self.lock_state();
        for (_, d, _) in &tracked {
            crate::epoch::stamp(d, st.epoch, false);
        }
        let g = self
            .generation_info(&st)
            .expect("a generation was just frozen");
        tracing::info!(generation = g.generation, full, baseline, "froze all disks");
        Ok(g)
    }

    fn end_generation(&self, generation: u64, merge: bool) -> Result<(), TrackerError> {
        let _op = self.lock_ops();
        self.end_generation_held(generation, merge)
    }

    /// [`Self::end_generation`], the operations lock held by the caller.
    fn end_generation_held(&self, generation: u64, merge: bool) -> Result<(), TrackerError> {
        self.shared.settle()?;
        let tracked = self.tracked()?;
        let frozen = self.lock_state().frozen.as_ref().map(|f| f.generation);
        if frozen != Some(generation) {
            return Err(TrackerError::NotFrozen {
                asked: generation,
                frozen,
            });
        }
        let what = if merge { "merge" } else { "release" };
        self.quiesced(|| -> Result<(), TrackerError> {
            if merge {
                // The generation's bits go back to the active set, durably, while the
                // generation stays intact: a failure or crash here loses nothing.
                for (_, d, t) in &tracked {
                    t.merge_frozen().map_err(|source| TrackerError::Tracking {
                        name: d.name.clone(),
                        source,
                    })?;
                }
            }
            crash_point(&format!("{what}.before-save"));
            let mut st = self.lock_state();
            let mut next = st.clone();
            next.frozen = None;
            self.save(&next)?;
            *st = next;
            drop(st);
            crash_point(&format!("{what}.saved"));
            // Only now that no state names the generation are its slot and copies emptied.
            for (_, d, t) in &tracked {
                if let Err(e) = t.drop_frozen() {
                    tracing::warn!(disk = %d.name, "emptying generation {generation}'s slots after the {what}: {e} (the next freeze empties them again)");
                }
            }
            Ok(())
        })?;
        tracing::info!(generation, merge, "generation ended");
        Ok(())
    }

    /// The frozen generation reached the replica: forget it.
    pub fn release(&self, generation: u64) -> Result<(), TrackerError> {
        self.end_generation(generation, false)
    }

    /// Shipping the frozen generation failed: put its blocks back into the dirty set.
    pub fn merge(&self, generation: u64) -> Result<(), TrackerError> {
        self.end_generation(generation, true)
    }

    /// The frozen generation reached the replica: forget it, given the replica's proof that
    /// it applied it (`applied`: its lineage and cycle, which must be this tracker's lineage
    /// and the frozen generation). Without the proof the release is refused unless `force`d.
    pub fn release_proven(
        &self,
        generation: u64,
        applied: Option<(Lineage, u64, Option<u64>)>,
        force: bool,
    ) -> Result<(), TrackerError> {
        let _op = self.lock_ops(); // no merge or freeze between the check and the release
        let st = self.state();
        let frozen_id = st.frozen.as_ref().map(|f| f.id);
        let baseline = st
            .frozen
            .as_ref()
            .is_some_and(|f| f.baseline && f.generation == generation);
        let why = match (applied, st.lineage) {
            // Never shipped: nothing to prove (releasing it commits a failover).
            _ if force || baseline => None,
            (None, _) => Some("no proof that the replica applied it was given".to_string()),
            (Some((l, _, _)), None) => Some(format!(
                "the replica's proof names lineage {l}, but this tracker has no lineage"
            )),
            (Some((l, c, _)), Some(have)) if l != have || c != generation => Some(format!(
                "the replica's proof (lineage {l}, cycle {c}) is not for generation \
                 {generation} of this tracker's lineage {have}"
            )),
            (Some((_, _, Some(id))), _) if Some(id) != frozen_id => Some(format!(
                "the replica applied another freeze numbered {generation} (an older state \
                 directory was restored here since)"
            )),
            // A generation number alone can come again after a restore: the id is needed.
            (Some((_, _, None)), _) if frozen_id.is_some_and(|id| id != 0) => Some(format!(
                "the replica's proof names no freeze, and generation {generation} is freeze \
                 {:#x}: a proof without it cannot tell this freeze from an older one",
                frozen_id.unwrap_or(0)
            )),
            _ => None,
        };
        if let Some(why) = why {
            return Err(TrackerError::Unproven { generation, why });
        }
        if force {
            tracing::warn!(
                generation,
                "generation released without the replica's proof (forced)"
            );
        }
        self.end_generation_held(generation, false)
    }

    /// Sets the lineage (the replica's, after a resync) and raises `next_generation` to at
    /// least `next_generation`. Refused while a generation is frozen, and, unless `force`d,
    /// if another lineage is set already (forced, every disk then needs a checksum resync).
    pub fn set_lineage(
        &self,
        lineage: Lineage,
        next_generation: u64,
        force: bool,
    ) -> Result<(), TrackerError> {
        self.set_lineage_from(lineage, next_generation, None, force)
    }

    /// [`Self::set_lineage`], recording `parent` as the point the lineage continues from (a
    /// failover's new lineage); `None` keeps what is recorded (for the same lineage).
    pub fn set_lineage_from(
        &self,
        lineage: Lineage,
        next_generation: u64,
        parent: Option<Parent>,
        force: bool,
    ) -> Result<(), TrackerError> {
        let _op = self.lock_ops();
        let mut st = self.lock_state();
        if let Some(f) = &st.frozen {
            return Err(TrackerError::LineageWhileFrozen(f.generation));
        }
        if let Some(have) = st.lineage.filter(|h| *h != lineage && !force) {
            return Err(TrackerError::OtherLineage {
                have,
                given: lineage,
            });
        }
        let mut next = st.clone();
        if st.lineage.is_some_and(|h| h != lineage) {
            // Forced onto another history: what the bitmaps hold is relative to the old
            // one, so only a checksum resync can tell what differs.
            for d in &mut next.disks {
                d.resync_required = true;
            }
        }
        if st.lineage != Some(lineage) || parent.is_some() {
            next.parent = parent;
        }
        next.lineage = Some(lineage);
        next.next_generation = next.next_generation.max(next_generation);
        self.save(&next)?;
        *st = next;
        tracing::info!(%lineage, next_generation = st.next_generation, "lineage set");
        Ok(())
    }

    /// Marks a disk for a checksum resync because an operator asked for one (`vmreplica
    /// resync`): saved before it counts, so it survives restarts; the shipper's next cycle
    /// compares checksums, and its release clears the mark as after lost tracking.
    pub fn mark_resync(&self, name: &str) -> Result<(), TrackerError> {
        let _op = self.lock_ops();
        self.shared.settle()?;
        let Some(idx) = self.disks().iter().position(|d| d.name == name) else {
            return Err(TrackerError::NoSuchDisk(name.to_string()));
        };
        let mut st = self.lock_state();
        let mut next = st.clone();
        next.disks[idx].resync_required = true;
        next.disks[idx].resync_since = next.next_generation;
        self.save(&next)?;
        *st = next;
        tracing::info!(disk = name, "disk marked for a checksum resync");
        Ok(())
    }

    /// Clears the resync flag of a disk once the shipper has resynchronised it: its bitmap is
    /// made durable first. A disk whose tracking failed again after the last freeze (the one
    /// the resync shipped) keeps the flag.
    pub fn clear_resync(&self, name: &str) -> Result<(), TrackerError> {
        let _op = self.lock_ops();
        self.shared.settle()?;
        let Some(idx) = self.disks().iter().position(|d| d.name == name) else {
            return Ok(());
        };
        if let Some(t) = self.disks()[idx].tracking() {
            t.checkpoint().map_err(|source| TrackerError::Tracking {
                name: name.to_string(),
                source,
            })?;
        }
        let mut st = self.lock_state();
        let ds = &st.disks[idx];
        if !ds.resync_required {
            return Ok(());
        }
        if ds.resync_since >= st.next_generation {
            tracing::warn!(
                disk = name,
                "tracking failed again after the resync was frozen: the disk still needs a resync"
            );
            return Ok(());
        }
        let mut next = st.clone();
        next.disks[idx].resync_required = false;
        self.save(&next)?;
        *st = next;
        Ok(())
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
