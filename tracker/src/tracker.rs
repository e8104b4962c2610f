//! The tracker: a set of disks served together, their state directory, and generations.
//!
//! State directory contents: `tracker.json` (versioned state, written atomically), and per
//! disk `NAME.bitmap` (mapped dirty bitmap), `NAME.al` (activity log) and `NAME.cow`
//! (sparse copy-on-write store for the frozen generation), plus `lock` held while running.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmreplica_common::{read_state, validate_name, write_state, NameError, StateFileError};

use crate::bitmap::{Geometry, COW_SLOT};
use crate::disk::Disk;
use crate::engine::{self, Engine};
use crate::tracking::{OpenOutcome, Slots, Tracking, TrackingError};

pub const STATE_FILE: &str = "tracker.json";
const STATE_FORMAT: &str = "vmreplica-tracker";
const STATE_VERSION: u32 = 1;
pub const DEFAULT_GRANULARITY: u32 = 64 * 1024;

#[derive(Debug, Error)]
pub enum TrackerError {
    #[error("granularity {0} is not a power of two from 4 KiB to 1 MiB")]
    BadGranularity(u64),
    #[error("disk name {name:?}: {source}")]
    BadName { name: String, source: NameError },
    #[error("disk {0:?} is given twice")]
    DuplicateDisk(String),
    #[error("no disks given")]
    NoDisks,
    #[error("disk {name}: image {path}: {source}")]
    Image {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("disk {name}: image {path} is empty")]
    EmptyImage { name: String, path: PathBuf },
    #[error("state dir {dir} belongs to other disks ({found}); this tracker was given ({given})")]
    ForeignStateDir {
        dir: PathBuf,
        found: String,
        given: String,
    },
    #[error("state dir {dir} was created with granularity {found}, not {given}")]
    GranularityChanged {
        dir: PathBuf,
        found: u32,
        given: u32,
    },
    #[error("disk {name}: image {path} is {size} bytes, but the state dir tracked {found} bytes")]
    SizeChanged {
        name: String,
        path: PathBuf,
        size: u64,
        found: u64,
    },
    #[error("state dir {dir}: {source}")]
    StateDir { dir: PathBuf, source: io::Error },
    #[error("state dir {0} is in use by another tracker")]
    Locked(PathBuf),
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error("disk {name}: {source}")]
    Tracking { name: String, source: TrackingError },
    #[error("generation {0} is still frozen: release or merge it first")]
    AlreadyFrozen(u64),
    #[error("generation {asked} is not the frozen one ({frozen:?})")]
    NotFrozen { asked: u64, frozen: Option<u64> },
    #[error("tracking is off")]
    TrackingOff,
}

pub struct TrackerConfig {
    pub state_dir: PathBuf,
    pub disks: Vec<(String, PathBuf)>,
    pub granularity: u32,
    pub tracking: bool,
    /// Use the thread-pool engine even where io_uring works.
    pub force_thread_pool: bool,
    /// Activity-log capacity in 4 MiB extents (default [`crate::activity_log::CAPACITY`]).
    pub al_extents: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskState {
    pub name: String,
    pub image: PathBuf,
    pub size: u64,
    pub active_slot: usize,
    /// Tracking was lost: the shipper must resync this disk by comparing checksums.
    pub resync_required: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrozenState {
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub frozen_at: u64,
    /// Every block was frozen (initial sync or resync), not just the changed ones.
    #[serde(default)]
    pub full: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub clean: bool,
    pub granularity: u32,
    pub next_generation: u64,
    pub frozen: Option<FrozenState>,
    pub disks: Vec<DiskState>,
}

/// What a freeze produced, per disk: enough for a shipper to read the frozen blocks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrozenDisk {
    pub name: String,
    pub image: PathBuf,
    pub size: u64,
    pub granularity: u32,
    pub bitmap: PathBuf,
    pub frozen_slot: usize,
    pub cow_slot: usize,
    pub cow: PathBuf,
    pub blocks: u64,
    pub resync_required: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Generation {
    pub generation: u64,
    pub frozen_at: u64,
    /// A full freeze (every block), for initial sync or resync.
    #[serde(default)]
    pub full: bool,
    pub disks: Vec<FrozenDisk>,
}

pub struct Tracker {
    dir: PathBuf,
    disks: Vec<Arc<Disk>>,
    state: Mutex<State>,
    engine: Arc<dyn Engine>,
    _lock: File,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn describe(disks: &[(String, PathBuf)]) -> String {
    disks
        .iter()
        .map(|(n, p)| format!("{n}={}", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
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
        let mut images = Vec::new();
        for (i, (name, path)) in cfg.disks.iter().enumerate() {
            validate_name(name).map_err(|source| TrackerError::BadName {
                name: name.clone(),
                source,
            })?;
            if cfg.disks[..i].iter().any(|(n, _)| n == name) {
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
            let size = file.metadata().map_err(img_err)?.len();
            if size == 0 {
                return Err(TrackerError::EmptyImage {
                    name: name.clone(),
                    path,
                });
            }
            images.push((name.clone(), path, file, size));
        }
        let given: Vec<(String, PathBuf)> = images
            .iter()
            .map(|(n, p, _, _)| (n.clone(), p.clone()))
            .collect();
        let dir = cfg.state_dir.clone();
        let state_path = dir.join(STATE_FILE);
        let previous: Option<State> = if cfg.tracking {
            read_state(&state_path, STATE_FORMAT, STATE_VERSION)?
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
            for (d, (name, path, _, size)) in prev.disks.iter().zip(&images) {
                if d.size != *size {
                    return Err(TrackerError::SizeChanged {
                        name: name.clone(),
                        path: path.clone(),
                        size: *size,
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
        fs::create_dir_all(&dir).map_err(dir_err)?;
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
        let engine = engine::probe(cfg.force_thread_pool);
        let existed = previous.is_some();
        let unclean = previous.as_ref().is_some_and(|p| !p.clean);
        let mut state = previous.unwrap_or_else(|| State {
            clean: true,
            granularity: g,
            next_generation: 1,
            frozen: None,
            disks: images
                .iter()
                .map(|(name, path, _, size)| DiskState {
                    name: name.clone(),
                    image: path.clone(),
                    size: *size,
                    active_slot: 0,
                    resync_required: false,
                })
                .collect(),
        });
        if unclean {
            tracing::warn!(dir = %dir.display(), "tracker did not stop cleanly; recovering dirty bits from the activity logs");
        }
        let mut disks = Vec::new();
        for ((name, path, file, size), ds) in images.into_iter().zip(state.disks.iter_mut()) {
            let tracking = if cfg.tracking {
                let geo = Geometry {
                    disk_size: size,
                    granularity: g,
                };
                let slots = Slots {
                    active: ds.active_slot,
                    frozen: state.frozen.as_ref().map(|_| 1 - ds.active_slot),
                };
                let (t, outcome) =
                    Tracking::open(&dir, &name, geo, slots, unclean, existed, cfg.al_extents)
                        .map_err(|source| TrackerError::Tracking {
                            name: name.clone(),
                            source,
                        })?;
                match outcome {
                    OpenOutcome::Clean => {}
                    OpenOutcome::Replayed(n) => {
                        tracing::info!(disk = %name, extents = n, "replayed activity log")
                    }
                    OpenOutcome::ResyncRequired(why) => {
                        tracing::error!(disk = %name, "{why}: tracking cannot be proven complete; disk marked for checksum resync");
                        ds.resync_required = true;
                    }
                }
                Some(t)
            } else {
                None
            };
            disks.push(Disk::new(
                name,
                path,
                size,
                file,
                Arc::clone(&engine),
                tracking,
            ));
        }
        state.clean = false;
        if cfg.tracking {
            write_state(&state_path, STATE_FORMAT, STATE_VERSION, &state)?;
        }
        Ok(Tracker {
            dir,
            disks,
            state: Mutex::new(state),
            engine,
            _lock: lock,
        })
    }

    pub fn disks(&self) -> &[Arc<Disk>] {
        &self.disks
    }

    /// The disks as NBD exports, each under its name.
    pub fn nbd_exports(&self) -> Vec<vmreplica_nbd::Export> {
        self.disks
            .iter()
            .map(|d| vmreplica_nbd::Export {
                name: d.name.clone(),
                description: format!("vmreplica disk {} ({})", d.name, d.path.display()),
                device: Arc::clone(d) as Arc<dyn vmreplica_nbd::BlockDevice>,
            })
            .collect()
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.lock_state().clone()
    }

    fn save(&self, state: &State) -> Result<(), TrackerError> {
        write_state(
            &self.dir.join(STATE_FILE),
            STATE_FORMAT,
            STATE_VERSION,
            state,
        )?;
        Ok(())
    }

    fn tracked(&self) -> Result<Vec<(&Arc<Disk>, &Tracking)>, TrackerError> {
        self.disks
            .iter()
            .map(|d| {
                d.tracking()
                    .map(|t| (d, t))
                    .ok_or(TrackerError::TrackingOff)
            })
            .collect()
    }

    /// Runs `f` with every disk's writes drained and held back.
    fn quiesced<T>(&self, f: impl FnOnce() -> T) -> T {
        for d in &self.disks {
            d.gate.close();
        }
        let r = f();
        for d in &self.disks {
            d.gate.open();
        }
        r
    }

    fn generation_info(&self, st: &State) -> Option<Generation> {
        let frozen = st.frozen.as_ref()?;
        let disks = self
            .disks
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
            frozen_at: frozen.frozen_at,
            full: frozen.full,
            disks,
        })
    }

    /// The frozen generation, if any.
    pub fn frozen(&self) -> Option<Generation> {
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
    pub fn freeze_with(
        &self,
        full: bool,
        at_freeze: impl FnOnce(),
    ) -> Result<Generation, TrackerError> {
        let tracked = self.tracked()?;
        let mut st = self.lock_state();
        if let Some(f) = &st.frozen {
            return Err(TrackerError::AlreadyFrozen(f.generation));
        }
        let generation = st.next_generation;
        self.quiesced(|| -> Result<(), TrackerError> {
            at_freeze();
            let mut next = st.clone();
            for ((d, t), ds) in tracked.iter().zip(next.disks.iter_mut()) {
                let slots = t.freeze(full).map_err(|source| TrackerError::Tracking {
                    name: d.name.clone(),
                    source,
                })?;
                ds.active_slot = slots.active;
            }
            next.frozen = Some(FrozenState {
                generation,
                frozen_at: now(),
                full,
            });
            next.next_generation = generation + 1;
            self.save(&next)?;
            *st = next;
            Ok(())
        })?;
        tracing::info!(generation, full, "froze all disks");
        Ok(self.generation_info(&st).expect("just frozen"))
    }

    fn end_generation(&self, generation: u64, merge: bool) -> Result<(), TrackerError> {
        let tracked = self.tracked()?;
        let mut st = self.lock_state();
        let frozen = st.frozen.as_ref().map(|f| f.generation);
        if frozen != Some(generation) {
            return Err(TrackerError::NotFrozen {
                asked: generation,
                frozen,
            });
        }
        self.quiesced(|| -> Result<(), TrackerError> {
            if merge {
                // Bits go back to the active set (durably) before the state forgets the
                // generation.
                for (d, t) in &tracked {
                    t.merge().map_err(|source| TrackerError::Tracking {
                        name: d.name.clone(),
                        source,
                    })?;
                }
            }
            let mut next = st.clone();
            next.frozen = None;
            self.save(&next)?;
            *st = next;
            if !merge {
                for (d, t) in &tracked {
                    t.release().map_err(|source| TrackerError::Tracking {
                        name: d.name.clone(),
                        source,
                    })?;
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

    /// Clears the resync flag of a disk once the shipper has resynchronised it.
    pub fn clear_resync(&self, name: &str) -> Result<(), TrackerError> {
        let mut st = self.lock_state();
        let mut next = st.clone();
        for d in next.disks.iter_mut().filter(|d| d.name == name) {
            d.resync_required = false;
        }
        self.save(&next)?;
        *st = next;
        Ok(())
    }

    /// Flushes images and bitmaps and marks the state clean. Callers have stopped I/O.
    pub fn close(&self) -> Result<(), TrackerError> {
        let tracked = self.disks.iter().any(|d| d.tracking().is_some());
        for d in &self.disks {
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
        }
        tracing::info!(dir = %self.dir.display(), "tracker state flushed and marked clean");
        Ok(())
    }
}
