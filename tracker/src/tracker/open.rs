//! Opening a tracker: the images checked and locked, the state directory created or
//! recovered (an unclean stop, a lost or restored state, a changed exclusion), and the
//! disks' tracking opened.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vmreplica_common::{read_state, validate_name, StateFileError};

use super::{
    save_state, DiskState, Shared, State, Tracker, TrackerConfig, TrackerError, STATE_FILE,
    STATE_FORMAT, STATE_VERSION,
};
use crate::bitmap::Geometry;
use crate::cow::CowBudget;
use crate::disk::Disk;
use crate::engine;
use crate::imagelock::{self, Conflict};
use crate::tracking::{OpenArgs, OpenOutcome, Slots, Tracking};

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
