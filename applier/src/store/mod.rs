//! Per-VM replica storage: sparse replica images, written in place behind each cycle's
//! write-ahead undo log, and recovery points.
//!
//! Layout under the store root, per VM: `state.json` (versioned, atomic: see [`state`]),
//! `disks/NAME.img` (sparse replica images), `undo/CYCLE.undo` (the undo log of each cycle
//! after the oldest point, and of the cycle being received), and `VM.lock` beside the VM's
//! directory (one process at a time opens a replica).
//!
//! A cycle (see `receive`) writes its chunks into the images as they arrive, each after the
//! old contents it overwrites are durable in its undo log. It commits (see `apply`) when its
//! manifest has arrived and all its writes are done: images fsynced, undo log finished,
//! state records the point, then the acknowledgement. A crash, a cut link or a bad manifest
//! leaves a partial cycle, which is continued when the shipper resumes it or rolled back from
//! its undo log (when another cycle starts, or on demand). Readers see the last complete
//! point through a [`PointView`](crate::pointview::PointView) (image, plus the undo overlay of
//! the cycle in progress and of later cycles), never a torn image.
//!
//! Modules: [`state`] (the state file), `receive` (the pipeline; `holes`, what it learns of
//! the images' holes), `apply` (commit and rollback), `points` (retention), `export`, `verify`
//! (checksums).

mod apply;
pub(crate) mod definition;
mod export;
mod failover;
#[cfg(test)]
mod failover_tests;
mod holes;
mod pause;
mod points;
mod receive;
pub(crate) mod state;
mod testpins;
#[cfg(test)]
pub(crate) mod tests;
mod verify;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use vmreplica_common::direct;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::wire::{code, DiskInfo, Receiving};
use vmreplica_common::{validate_name, NameError, StateFileError};

use crate::image::{Buffers, Image};
use crate::pointview::VmShared;
use crate::undo::LogIndex;

pub use apply::{Committed, Started};
pub use definition::DEFINITION_FILE;
pub use export::{check_export_dir, export};
pub use failover::{lock_holder, AdoptedDisk};
pub use points::{plan_retention, Retention};
pub use receive::{Failure, Job, JobSender};
pub use state::{
    DefinitionInfo, FailedOver, FailoverStep, PointInfo, Primary, ReversePending, ReverseTarget,
    Role, Span, SpanParent, TestPin,
};

use receive::{Partial, Running};
use state::{DiskMeta, VmState};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no space left for VM {vm} at {path}")]
    NoSpace { vm: String, path: PathBuf },
    #[error("VM name {name:?}: {source}")]
    Name { name: String, source: NameError },
    #[error("VM {vm} belongs to primary {owner:?}; {peer:?} may not write it")]
    NotOwner {
        vm: String,
        owner: String,
        peer: String,
    },
    #[error("VM {vm}: disks {given:?} do not match the replica's {have:?}")]
    DiskMismatch {
        vm: String,
        given: Vec<String>,
        have: Vec<String>,
    },
    /// A cycle the lineage rules refuse (see `rules`): the replica is unchanged.
    #[error("{0}")]
    Refused(String),
    #[error("VM {vm}: cycle {cycle} (attempt {epoch}) is not the one being received")]
    NoSuchCycle { vm: String, cycle: u64, epoch: u64 },
    #[error(
        "VM {vm} cycle {cycle}: {have_ranges} ranges ({have_bytes} bytes) are applied, the \
         manifest says {want_ranges} ({want_bytes} bytes) or their digests differ; the cycle \
         stays received in part and resumes"
    )]
    Incomplete {
        vm: String,
        cycle: u64,
        have_ranges: u64,
        have_bytes: u64,
        want_ranges: u64,
        want_bytes: u64,
    },
    #[error("VM {vm}: bad chunk: {reason}")]
    BadChunk { vm: String, reason: String },
    #[error("VM {vm} has no recovery point {cycle}")]
    NoSuchPoint { vm: String, cycle: u64 },
    #[error("VM {0} has no replica")]
    NoReplica(String),
    #[error(
        "VM {vm}: its replica is open in another process (a running applier, or an export); \
         stop that first"
    )]
    Busy { vm: String },
    #[error(
        "VM {vm}: the replica at {path} was written by an older vmreplica (state format \
         version 1), whose staging and undo logs this version does not read; export what you \
         need with the older version, then remove the VM's directory and let the shipper make \
         a new initial copy"
    )]
    OldFormat { vm: String, path: PathBuf },
    #[error(
        "VM {vm}: replica image {path} is {found} bytes, its state says {want}: it was \
         changed outside vmreplica; refusing to use it"
    )]
    ImageSize {
        vm: String,
        path: PathBuf,
        found: u64,
        want: u64,
    },
    #[error(
        "VM {vm}: its state file {state} is missing but its directory holds replica data \
         ({found}): without the state nothing says which point these files hold, and a new \
         initial copy would keep their data where the primary has holes. Restore {state} \
         from a backup, or remove the directory {dir} so that the shipper makes a new \
         initial copy"
    )]
    StateLost {
        vm: String,
        state: PathBuf,
        dir: PathBuf,
        found: String,
    },
    #[error("{0}")]
    Receive(Failure),
    #[error("{0}")]
    Export(String),
    /// A VM definition the replica does not keep (it keeps the one it had).
    #[error("{0}")]
    Definition(String),
    /// A failover operation this site's role refuses (the message says why and what to do).
    #[error("{0}")]
    Role(String),
    /// Both sites wrote since their last common point.
    #[error("{0}")]
    SplitBrain(String),
    /// The operation was made from a state in memory that a save, maybe made, left
    /// untrusted: the state was re-read and is another one, so nothing was saved.
    #[error(
        "VM {vm}: an earlier save of {path} failed after its rename (it may have been made), \
         so the record was re-read from disk, and it is not the one this operation started \
         from: nothing was changed; run the command again"
    )]
    Reread { vm: String, path: PathBuf },
    #[error(transparent)]
    State(#[from] StateFileError),
}

impl StoreError {
    /// The wire error code the peer gets for it.
    pub fn code(&self) -> u16 {
        match self {
            StoreError::NoSpace { .. } => code::NO_SPACE,
            StoreError::BadChunk { .. } => code::BAD_DATA,
            StoreError::NotOwner { .. } | StoreError::Name { .. } => code::NOT_ALLOWED,
            StoreError::Incomplete { .. } => code::INCOMPLETE,
            StoreError::Refused(_) => code::LINEAGE,
            StoreError::NoSuchCycle { .. } => code::STALE,
            StoreError::DiskMismatch { .. } => code::PROTOCOL,
            StoreError::Busy { .. } | StoreError::Reread { .. } => code::BUSY,
            StoreError::Role(_) => code::FAILED_OVER,
            StoreError::SplitBrain(_) => code::SPLIT_BRAIN,
            StoreError::Receive(f) => f.code,
            StoreError::State(StateFileError::Write { source, .. })
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                code::NO_SPACE
            }
            _ => code::INTERNAL,
        }
    }
}

/// The root of all replicas on this host.
pub struct Store {
    root: PathBuf,
    retention: Retention,
}

impl Store {
    pub fn new(root: &Path, retention: Retention) -> Result<Store, StoreError> {
        crate::undo::log::create_dirs(root).map_err(|source| StoreError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        crate::ops::clear_removing(root);
        Ok(Store {
            root: root.to_path_buf(),
            retention,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Opens the replica of `vm` for primary `peer` (creating it on first contact). It has
    /// the replica to itself: [`StoreError::Busy`] while another process has it open.
    pub fn open_vm(&self, vm: &str, peer: &str) -> Result<VmStore, StoreError> {
        VmStore::open(&self.root, vm, Some(peer), self.retention)
    }

    /// Opens an existing replica for local administration (points, export, rollback).
    pub fn open_existing(&self, vm: &str) -> Result<VmStore, StoreError> {
        VmStore::open(&self.root, vm, None, self.retention)
    }

    /// The recovery points of `vm`, read from its state file without opening the replica (so
    /// also while an applier has it open).
    pub fn points(&self, vm: &str) -> Result<Vec<PointInfo>, StoreError> {
        Ok(self.peek(vm)?.points)
    }

    pub(crate) fn peek_state(&self, vm: &str) -> Result<VmState, StoreError> {
        self.peek(vm)
    }

    fn peek(&self, vm: &str) -> Result<VmState, StoreError> {
        let p = vm_dir(&self.root, vm)?.join("state.json");
        read_vm_state(vm, &p)?.ok_or_else(|| StoreError::NoReplica(vm.to_string()))
    }

    /// What the store holds, as the admin socket's `status` reports it (read from the state
    /// files, for when no applier runs).
    pub fn status(&self) -> serde_json::Value {
        let states = self
            .vms()
            .into_iter()
            .filter_map(|n| self.peek(&n).ok().map(|s| (n, s, false)));
        status_json(&self.root, states)
    }

    /// VMs with a replica here.
    pub fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("state.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }
}

/// The status of replicas: (VM, state, whether an applier has it open).
pub(crate) fn status_json(
    root: &Path,
    states: impl IntoIterator<Item = (String, VmState, bool)>,
) -> serde_json::Value {
    let vms: Vec<serde_json::Value> = states
        .into_iter()
        .map(|(name, s, open)| {
            serde_json::json!({
                "vm": name,
                "open": open,
                "role": s.role,
                "owner": s.owner,
                "lineage": s.lineage,
                "last_cycle": s.last_cycle,
                "receiving": s.receiving.as_ref().map(|r| serde_json::json!({
                    "lineage": r.lineage, "cycle": r.cycle, "kind": r.kind, "epoch": r.epoch,
                })),
                "points": s.points.len(),
                "newest_point": s.points.last().map(|p| p.cycle),
                "history": s.history,
            })
        })
        .collect();
    serde_json::json!({ "store": root, "vms": vms })
}

/// Reads a VM's state, refusing a format-1 store with a message that says what to do.
fn read_vm_state(vm: &str, p: &Path) -> Result<Option<VmState>, StoreError> {
    match VmState::load(p) {
        Err(StateFileError::WrongVersion { found: 1, .. }) => Err(StoreError::OldFormat {
            vm: vm.to_string(),
            path: p.parent().unwrap_or(p).to_path_buf(),
        }),
        r => Ok(r?),
    }
}

/// A VM without a state file is a new replica only if its directory holds no replica data:
/// no undo log, no image with data in it (images that are all holes are what a crash leaves
/// between creating them for a first cycle and saving the state that names them).
fn refuse_leftovers(vm: &str, dir: &Path) -> Result<(), StoreError> {
    let mut found = Vec::new();
    for sub in ["disks", "undo"] {
        for e in fs::read_dir(dir.join(sub)).into_iter().flatten().flatten() {
            let p = e.path();
            let data = match File::open(&p) {
                Ok(f) => {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    sub == "undo" || !vmreplica_common::sparse::is_hole(&f, 0, len).unwrap_or(false)
                }
                Err(_) => true,
            };
            if data {
                found.push(p.display().to_string());
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    Err(StoreError::StateLost {
        vm: vm.to_string(),
        state: dir.join("state.json"),
        dir: dir.to_path_buf(),
        found: found.join(", "),
    })
}

/// The directory of VM `vm`'s replica under `root`, once its name is checked.
pub(crate) fn vm_dir(root: &Path, vm: &str) -> Result<PathBuf, StoreError> {
    validate_name(vm).map_err(|source| StoreError::Name {
        name: vm.to_string(),
        source,
    })?;
    Ok(root.join(vm))
}

/// Takes `ROOT/VM.lock` exclusively (flock; released when the file is closed, also by a
/// crash), so that one process at a time opens a replica.
pub(crate) fn lock_vm(root: &Path, vm: &str) -> Result<File, StoreError> {
    let p = root.join(format!("{vm}.lock"));
    let io = |source| StoreError::Io {
        path: p.clone(),
        source,
    };
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            StoreError::Busy { vm: vm.to_string() }
        } else {
            io(e)
        });
    }
    Ok(f)
}

/// An I/O error about `path` of VM `vm`, a full disk told apart.
pub(crate) fn io_err(vm: &str, path: &Path, source: io::Error) -> StoreError {
    if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::NoSpace {
            vm: vm.to_string(),
            path: path.to_path_buf(),
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One replica, opened by this process.
pub struct VmStore {
    shared: Arc<VmShared>,
    state: VmState,
    retention: Retention,
    /// The cycle held in part, when no pipeline runs it.
    partial: Option<Partial>,
    /// The pipeline of the cycle being received.
    running: Option<Running>,
    buffers: Arc<Buffers>,
    /// This process's hold on the replica (see [`lock_vm`]); released when dropped.
    _lock: File,
    /// A state save failed after its rename ([`StateFileError::Unsynced`]): the state file
    /// may be the new state or (after a power cut) the old one, so nothing either names may
    /// be removed, and the state in memory is not trusted until [`VmStore::settle`] syncs
    /// the directory and re-reads the state from disk.
    unsynced: bool,
    /// Images outside the store (an old primary's, adopted) held as a tracker holds them, so
    /// that no tracker or VM takes them while they are a replica (see `failover`).
    held: Vec<File>,
    /// Test hook: the next state save fails (as on a full disk).
    #[cfg(test)]
    pub(crate) fail_save: bool,
    /// Test hook: the next state save is made but reports failure after its rename (as a
    /// failed directory fsync does: maybe made).
    #[cfg(test)]
    pub(crate) fail_save_after_rename: bool,
    /// Test hook: how many saves go through before one of the two hooks above fires (to fail
    /// the N-th save of an operation).
    #[cfg(test)]
    pub(crate) fail_save_skip: u32,
}

impl VmStore {
    fn open(
        root: &Path,
        vm: &str,
        peer: Option<&str>,
        retention: Retention,
    ) -> Result<VmStore, StoreError> {
        let dir = vm_dir(root, vm)?;
        let state_path = dir.join("state.json");
        if peer.is_none() && !state_path.exists() {
            // Administration of a replica that is not there: no lock file left behind.
            return Err(StoreError::NoReplica(vm.to_string()));
        }
        let lock = lock_vm(root, vm)?;
        let state = match read_vm_state(vm, &state_path)? {
            Some(s) => s,
            None => match peer {
                Some(peer) => {
                    refuse_leftovers(vm, &dir)?;
                    VmState::new(peer)
                }
                None => return Err(StoreError::NoReplica(vm.to_string())),
            },
        };
        if let Some(peer) = peer {
            if state.owner != peer {
                return Err(StoreError::NotOwner {
                    vm: vm.to_string(),
                    owner: state.owner,
                    peer: peer.to_string(),
                });
            }
        }
        let shared = Arc::new(VmShared::new(vm, dir, &state));
        let mut s = VmStore {
            shared,
            state,
            retention,
            partial: None,
            running: None,
            buffers: Arc::default(),
            _lock: lock,
            unsynced: false,
            held: Vec::new(),
            #[cfg(test)]
            fail_save: false,
            #[cfg(test)]
            fail_save_after_rename: false,
            #[cfg(test)]
            fail_save_skip: 0,
        };
        // First of all: a record older than the files (restored from a backup) is refused
        // before anything else is opened, whichever of its undo logs is gone.
        s.check_undo_logs()?;
        s.open_images(false)?;
        s.load_chain()?;
        s.remove_unreferenced()?;
        if let Some(r) = &s.state.receiving {
            tracing::warn!(
                vm,
                cycle = r.cycle,
                "a cycle was received in part; it continues when the shipper resumes it, or is rolled back"
            );
        }
        Ok(s)
    }

    pub fn vm(&self) -> &str {
        &self.shared.vm
    }

    fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What point views of this replica share with it.
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    pub fn owner(&self) -> &str {
        &self.state.owner
    }

    pub fn last_cycle(&self) -> u64 {
        self.state.last_cycle
    }

    pub fn lineage(&self) -> Option<Lineage> {
        self.state.lineage
    }

    pub fn history(&self) -> &[Span] {
        &self.state.history
    }

    /// What the lineage rules need to know of this replica.
    pub fn replica(&self) -> crate::rules::Replica {
        self.state.replica()
    }

    /// The cycle held in part, if any.
    pub fn receiving(&self) -> Option<Receiving> {
        self.state.receiving_info()
    }

    pub fn points(&self) -> Vec<PointInfo> {
        self.state.points.clone()
    }

    pub fn disks(&self) -> Vec<DiskInfo> {
        self.state
            .disks
            .iter()
            .map(|d| DiskInfo {
                name: d.name.clone(),
                size: d.size,
                granularity: d.granularity,
            })
            .collect()
    }

    /// Disks the primary serves without replicating them (name, size): a failover recreates
    /// them blank and sparse ([`VmStore::create_excluded_images`]).
    pub fn excluded_disks(&self) -> Vec<(String, u64)> {
        state::excluded_disks(&self.state)
    }

    /// Creates the blank sparse images of the excluded disks in `dir` (`NAME.img`), for a
    /// failover to serve beside the replica's images; an image already there of the right
    /// size is kept (a rerun), one of another size refused. Returns (name, path) per disk.
    /// F2: call it where a failover opens the VM's disks (with `dir` = `STORE/VM/disks`).
    pub fn create_excluded_images(&self, dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
        let mut out = Vec::new();
        crate::undo::log::create_dirs(dir).map_err(self.io(dir))?;
        for (name, size) in self.excluded_disks() {
            let p = dir.join(format!("{name}.img"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(self.io(&p))?;
            let len = f.metadata().map_err(self.io(&p))?.len();
            if len == 0 {
                f.set_len(size).map_err(self.io(&p))?;
                f.sync_all().map_err(self.io(&p))?;
            } else if len != size {
                return Err(StoreError::ImageSize {
                    vm: self.vm().to_string(),
                    path: p,
                    found: len,
                    want: size,
                });
            }
            out.push((name, p));
        }
        crate::undo::log::sync_dir(&dir.join("x")).map_err(self.io(dir))?;
        Ok(out)
    }

    pub fn disk_names(&self) -> Vec<String> {
        self.state.disks.iter().map(|d| d.name.clone()).collect()
    }

    /// A disk's image: in the store (`disks/NAME.img`), or where the state says (an adopted
    /// one).
    pub fn image_path(&self, disk: &str) -> PathBuf {
        match self.state.disks.iter().find(|d| d.name == disk) {
            Some(DiskMeta { image: Some(p), .. }) => p.clone(),
            _ => self.dir().join("disks").join(format!("{disk}.img")),
        }
    }

    fn undo_path(&self, file: &str) -> PathBuf {
        self.dir().join("undo").join(file)
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> StoreError {
        let (vm, path) = (self.vm().to_string(), path.to_path_buf());
        move |source| io_err(&vm, &path, source)
    }

    /// Saves `next` as the state, then makes it the state in memory (and for views). If the
    /// save fails, nothing changes in memory. A save that failed after its rename (maybe
    /// made, see [`StateFileError::Unsynced`]) sets `unsynced`: the caller must then not
    /// clean up as if the old state were on disk (check [`VmStore::unsynced`]), and the next
    /// operation settles the store first.
    ///
    /// `next` is made from the state in memory. If that state is not trusted (a save before
    /// was maybe made, and the operation did not settle the store first, as the failover
    /// operations do not), the store is settled here: `next` is saved only if the state
    /// re-read from disk is the one it was made from; otherwise nothing is saved and the
    /// operation is refused ([`StoreError::Reread`]), to be asked again on the state now in
    /// memory. So no operation writes a state made from one a maybe-made save replaced.
    fn commit_state(&mut self, next: VmState) -> Result<(), StoreError> {
        if self.unsynced {
            let made_from = self.state.clone();
            self.settle()?;
            if self.state != made_from {
                return Err(StoreError::Reread {
                    vm: self.vm().to_string(),
                    path: self.dir().join("state.json"),
                });
            }
        }
        #[cfg(test)]
        let armed = match self.fail_save_skip {
            0 => true,
            n => {
                self.fail_save_skip = n - 1;
                false
            }
        };
        #[cfg(test)]
        if armed && std::mem::take(&mut self.fail_save) {
            return Err(StoreError::State(StateFileError::Write {
                path: self.dir().join("state.json"),
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            }));
        }
        let path = self.dir().join("state.json");
        #[allow(unused_mut)]
        let mut saved = next.save(&path);
        #[cfg(test)]
        if saved.is_ok() && armed && std::mem::take(&mut self.fail_save_after_rename) {
            saved = Err(StateFileError::Unsynced {
                path,
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        if let Err(e) = saved {
            if e.maybe_made() {
                tracing::error!(vm = %self.vm(), "{e}; the replica is re-read from disk before it is used again");
                self.unsynced = true;
            }
            return Err(e.into());
        }
        self.state = next;
        self.shared.publish(&self.state);
        Ok(())
    }

    /// Makes the next operation re-read the replica from disk first (see
    /// [`VmStore::settle`]): for a store an operation panicked in, whose memory is not
    /// trusted.
    pub fn reload(&mut self) {
        self.unsynced = true;
    }

    /// Whether the last state save may have been made despite its error: the caller keeps
    /// every file, and leaves the rest to [`VmStore::settle`].
    pub(crate) fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// After a save that was maybe made: syncs the VM's directory (so the state file on
    /// disk, whichever it is, is durable), then re-reads the state from it and reopens the
    /// replica as a restart would. Until the directory syncs, every operation that changes
    /// the replica is refused with that error.
    pub(crate) fn settle(&mut self) -> Result<(), StoreError> {
        if !self.unsynced {
            return Ok(());
        }
        let path = self.dir().join("state.json");
        crate::undo::log::sync_dir(&path).map_err(self.io(self.dir()))?;
        if let Some(run) = self.running.take() {
            // What it wrote and marked stays in its undo log; the state read below decides.
            let _ = run.stop();
        }
        self.partial = None;
        // None: nothing was saved yet (a first cycle), the replica is still new.
        let state =
            read_vm_state(self.vm(), &path)?.unwrap_or_else(|| VmState::new(&self.state.owner));
        self.state = state;
        self.shared.publish(&self.state);
        self.check_undo_logs()?;
        self.open_images(false)?;
        self.load_chain()?;
        self.remove_unreferenced()?;
        self.unsynced = false;
        tracing::info!(vm = %self.vm(), last_cycle = self.state.last_cycle, "state re-read from disk after a save that was maybe made");
        Ok(())
    }

    /// Opens (with `create`: creates) the images of the state's disks; an image whose size
    /// is not the one the state records is refused.
    fn open_images(&mut self, create: bool) -> Result<(), StoreError> {
        let ddir = self.dir().join("disks");
        if create {
            crate::undo::log::create_dirs(&ddir).map_err(self.io(&ddir))?;
        }
        let mut images = Vec::new();
        for d in &self.state.disks {
            let p = self.image_path(&d.name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(&p)
                .map_err(self.io(&p))?;
            let len = f.metadata().map_err(self.io(&p))?.len();
            if create && len == 0 {
                f.set_len(d.size).map_err(self.io(&p))?;
                f.sync_all().map_err(self.io(&p))?;
            } else if len != d.size {
                return Err(StoreError::ImageSize {
                    vm: self.vm().to_string(),
                    path: p,
                    found: len,
                    want: d.size,
                });
            }
            let direct = direct::open(&p, true).map_err(self.io(&p))?;
            images.push(Image { file: f, direct });
        }
        if create {
            crate::undo::log::sync_dir(&ddir.join("x")).map_err(self.io(&ddir))?;
        }
        *self
            .shared
            .images
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(images);
        Ok(())
    }

    /// Every undo log the record names (the points' and the one of the cycle held in part)
    /// is there: otherwise the record is older than the replica's files and is refused, saying
    /// so ([`VmStore::missing_undo_log`]), at every open, before the images are touched.
    fn check_undo_logs(&self) -> Result<(), StoreError> {
        for u in &self.state.undo {
            let p = self.undo_path(&u.file);
            if !p.exists() {
                return Err(self.missing_undo_log(
                    &p,
                    &format!("the undo log of points {}..{}", u.from, u.to),
                ));
            }
        }
        if let Some(r) = &self.state.receiving {
            // Created before the record named it: never legitimately missing.
            let p = self.undo_path(&r.log);
            if !p.exists() {
                return Err(self.missing_undo_log(
                    &p,
                    &format!("the undo log of cycle {}, received in part", r.cycle),
                ));
            }
        }
        Ok(())
    }

    /// Loads the undo logs of the points, and of the cycle held in part, for views.
    fn load_chain(&mut self) -> Result<(), StoreError> {
        let mut logs = Vec::new();
        let mut refs = self.state.undo.clone();
        refs.sort_by_key(|u| u.from);
        for u in refs {
            let p = self.undo_path(&u.file);
            if !p.exists() {
                return Err(self.missing_undo_log(
                    &p,
                    &format!("the undo log of points {}..{}", u.from, u.to),
                ));
            }
            let l = crate::undo::Loaded::open(&p).map_err(self.io(&p))?;
            let idx = LogIndex::open(u.from, u.to, &p, l.entries).map_err(self.io(&p))?;
            logs.push(Arc::new(idx));
        }
        let mut receiving = None;
        if let Some(r) = self.state.receiving.clone() {
            let p = self.undo_path(&r.log);
            let (log, rec) = crate::undo::UndoLog::open(&p).map_err(self.io(&p))?;
            if rec.cut > 0 {
                tracing::info!(vm = %self.vm(), cycle = r.cycle, bytes = rec.cut, "cut the undo log's torn tail");
            }
            let index = Arc::new(
                LogIndex::open(
                    r.cycle,
                    self.state.newest_point(),
                    &p,
                    log.entries().iter().copied(),
                )
                .map_err(self.io(&p))?,
            );
            receiving = Some(Arc::clone(&index));
            self.partial = Some(Partial {
                lineage: r.lineage,
                cycle: r.cycle,
                kind: vmreplica_common::wire::CycleKind::from_name(&r.kind)
                    .unwrap_or(vmreplica_common::wire::CycleKind::Delta),
                epoch: r.epoch,
                capture: r.capture,
                log,
                applied: rec.applied,
                index,
            });
        }
        let mut chain = self.shared.chain.write().unwrap_or_else(|e| e.into_inner());
        chain.logs = logs;
        chain.receiving = receiving;
        Ok(())
    }

    /// An undo log the record names is missing: the record is older than the replica's
    /// files (restored from a backup), most often over a failover committed since, whose
    /// commit removed every point and its undo log. Says which, and what to do.
    fn missing_undo_log(&self, path: &Path, log: &str) -> StoreError {
        let vm = self.vm();
        let record = self.dir().join("state.json");
        let tracker = self.dir().join("primary").join("tracker");
        let show = vmreplica_common::lineage::show;
        let what = match vmreplica_tracker::failover::state_offline(&tracker) {
            Ok(Some(t)) if t.lineage.is_some() && t.lineage != self.state.lineage => format!(
                "This site failed over VM {vm} since that record was saved: the tracker state \
                 at {} is in lineage {}, and the failover's commit removed the points the \
                 record names (it says {} in lineage {}). Put back the copy of {} saved after \
                 the failover's commit (role primary). Do not remove {}: its images are the \
                 failed-over VM's disks",
                tracker.display(),
                show(t.lineage),
                self.state.role.name(),
                show(self.state.lineage),
                record.display(),
                self.dir().display()
            ),
            _ => format!(
                "Put back the newest copy of {}; if there is none, stop the applier, remove {} \
                 and let the primary make a new initial copy",
                record.display(),
                self.dir().display()
            ),
        };
        StoreError::Role(format!(
            "VM {vm}: its record {} names {log}, {}, which is \
             missing: the record is older than the replica's files (restored from a backup?), \
             so it cannot describe them and is refused (nothing was changed). {what}",
            record.display(),
            path.display()
        ))
    }

    /// Removes undo files no state references (left by a crash between creating or merging
    /// a log and saving the state, or between saving and removing).
    fn remove_unreferenced(&self) -> Result<(), StoreError> {
        let udir = self.dir().join("undo");
        for e in fs::read_dir(&udir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let used = self.state.undo.iter().any(|u| u.file == name)
                || self.state.receiving.as_ref().is_some_and(|r| r.log == name);
            if !used {
                crate::undo::log::remove(&e.path()).map_err(self.io(&e.path()))?;
            }
        }
        Ok(())
    }
}
