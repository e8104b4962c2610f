//! Per-VM replica storage: sparse replica images, the staged cycle, all-or-nothing apply and
//! recovery points.
//!
//! Layout under the store root, per VM: `state.json` (versioned, atomic), `disks/NAME.img`
//! (sparse replica images, always at the newest point), `staging/CYCLE/` (the cycle being
//! received: `cycle.json`, `chunks.log` and `undo.journal`), `undo/*.undo` (recovery points).
//!
//! Apply order, so that a crash at any instant leaves the replica at the previous cycle or
//! the new one: (1) every staged chunk is verified against its checksum as it arrives and
//! the set against the manifest; (2) the undo log, journalled as the chunks arrived (the
//! old contents of their ranges: the images do not change before the apply), is completed
//! with whatever a restart cut from it, and fsynced; (3) `cycle.json`
//! records the manifest and the state `applying = CYCLE`; (4) the chunks are written (zero
//! runs punched as holes) and the images fsynced; (5) the state records the new point; (6)
//! staging is removed. A restart that finds `applying` set redoes (4)-(6) from the staged
//! chunks, which stay until (5) is durable. If the staged chunks no longer match the manifest
//! or fail their checksum during (4) (the disk under the staging log failed), the undo log
//! puts the old contents back: the replica is the previous point again and the cycle is sent
//! anew.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmreplica_common::wire::{self, Chunk, CycleKind, DiskInfo, StagedChunk, MAX_CHUNK};
use vmreplica_common::{read_state, validate_name, write_state, NameError, StateFileError};

use crate::image::{Image, ImageWriter, WriteError};
use crate::staging::Staging;
use crate::undo::{self, Journal};
use vmreplica_common::direct;
use vmreplica_common::sparse::{data_regions, is_hole, punch_hole};

const STATE_FORMAT: &str = "vmreplica-replica";
const STATE_VERSION: u32 = 1;
const CYCLE_FORMAT: &str = "vmreplica-staged-cycle";

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
    #[error("VM {vm}: cycle {cycle} is not after the last applied cycle {last}")]
    OldCycle { vm: String, cycle: u64, last: u64 },
    #[error("VM {vm}: no cycle {cycle} is being received")]
    NoSuchCycle { vm: String, cycle: u64 },
    #[error(
        "VM {vm} cycle {cycle}: {have} chunks staged, manifest says {want} (or digests differ)"
    )]
    Incomplete {
        vm: String,
        cycle: u64,
        have: u64,
        want: u64,
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
    #[error(transparent)]
    State(#[from] StateFileError),
}

/// One recovery point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointInfo {
    pub cycle: u64,
    /// Seconds since the epoch when it was applied.
    pub applied_at: u64,
    pub kind: String,
    /// Bytes it costs: the undo log that leads to it (0 for the newest point).
    pub bytes: u64,
}

/// An undo log turning point `from` into point `to` (`to` < `from`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct UndoRef {
    from: u64,
    to: u64,
    file: String,
    bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct DiskMeta {
    name: String,
    size: u64,
    granularity: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct VmState {
    owner: String,
    disks: Vec<DiskMeta>,
    last_cycle: u64,
    applying: Option<u64>,
    points: Vec<PointInfo>,
    undo: Vec<UndoRef>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CycleMeta {
    cycle: u64,
    kind: String,
    /// Chunk count and digest of the manifest, recorded before the apply starts, so a
    /// restart can tell whether the staged chunks are still all there.
    #[serde(default)]
    manifest: Option<(u64, u64)>,
}

/// Retention of recovery points.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Most points kept (the newest always is).
    pub keep: usize,
    /// Points older than this many seconds are thinned to one per hour.
    pub hourly_after: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: 24,
            hourly_after: None,
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn kind_name(k: CycleKind) -> &'static str {
    match k {
        CycleKind::Delta => "delta",
        CycleKind::Initial => "initial",
        CycleKind::Resync => "resync",
    }
}

/// The old contents of `len` bytes at `offset` of image `img`, packed as an undo entry of
/// `cycle`; a hole becomes a zero marker without being read.
fn read_old(
    img: &Image,
    cycle: u64,
    disk: u16,
    offset: u64,
    len: u32,
    buf: &mut Vec<u8>,
) -> io::Result<Chunk> {
    if is_hole(&img.file, offset, u64::from(len))? {
        return Ok(Chunk::zeroes(cycle, disk, offset, len));
    }
    let at = img.read(offset, len as usize, buf)?;
    Ok(Chunk::pack(cycle, disk, offset, &buf[at..], true))
}

thread_local! {
    /// Per thread, where old contents are read for the undo log: reused across chunks.
    static OLD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads the old contents of ranges a receiving cycle will overwrite, without the VM's
/// lock (the images do not change while a cycle is received).
pub struct UndoSource {
    images: Arc<Vec<Image>>,
    cycle: u64,
}

impl UndoSource {
    /// The undo entry for chunk `c`'s range.
    pub fn capture(&self, c: &Chunk) -> io::Result<Chunk> {
        let img = self
            .images
            .get(c.disk as usize)
            .ok_or_else(|| io::Error::other(format!("no disk {}", c.disk)))?;
        OLD.with_borrow_mut(|buf| read_old(img, self.cycle, c.disk, c.offset, c.len, buf))
    }
}

/// The root of all replicas on this host.
pub struct Store {
    root: PathBuf,
    retention: Retention,
}

impl Store {
    pub fn new(root: &Path, retention: Retention) -> Result<Store, StoreError> {
        fs::create_dir_all(root).map_err(|source| StoreError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Store {
            root: root.to_path_buf(),
            retention,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the replica of `vm` for primary `peer` (creating it on first contact), after
    /// finishing any apply a crash interrupted.
    pub fn open_vm(&self, vm: &str, peer: &str) -> Result<VmStore, StoreError> {
        VmStore::open(&self.root, vm, Some(peer), self.retention)
    }

    /// Opens an existing replica for local administration (export), after finishing any
    /// apply a crash interrupted. Like [`Store::open_vm`], it has the replica to itself:
    /// [`StoreError::Busy`] while another process (a running applier) has it open.
    pub fn open_existing(&self, vm: &str) -> Result<VmStore, StoreError> {
        VmStore::open(&self.root, vm, None, self.retention)
    }

    /// The recovery points of `vm`, read from its state file without opening the replica (so
    /// also while an applier has it open).
    pub fn points(&self, vm: &str) -> Result<Vec<PointInfo>, StoreError> {
        let state: VmState = read_state(
            &vm_dir(&self.root, vm)?.join("state.json"),
            STATE_FORMAT,
            STATE_VERSION,
        )?
        .ok_or_else(|| StoreError::NoReplica(vm.to_string()))?;
        Ok(state.points)
    }

    /// VMs with a replica here.
    pub fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("state.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    }
}

struct Receiving {
    cycle: u64,
    kind: CycleKind,
    staging: Staging,
    /// An initial copy: chunks go straight into the images (see [`Staging`]).
    direct: bool,
    /// Direct: bytes written into the images since they were last made durable.
    unsynced: u64,
    /// The cycle's undo log, built as its chunks arrive (a delta or resync after a point).
    journal: Option<Journal>,
    /// A write into it failed (see [`VmStore::stop_after_io_error`]): every later use gets
    /// this error again, until a [`VmStore::begin`] reopens the cycle.
    broken: Option<StoreError>,
}

impl StoreError {
    /// The same error again, for a write error that every later user of a broken cycle gets.
    fn again(&self) -> StoreError {
        match self {
            StoreError::NoSpace { vm, path } => StoreError::NoSpace {
                vm: vm.clone(),
                path: path.clone(),
            },
            StoreError::Io { path, source } => StoreError::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            other => StoreError::Io {
                path: PathBuf::new(),
                source: io::Error::other(other.to_string()),
            },
        }
    }
}

/// A direct (in-place) copy makes what it wrote durable at least this often, so a crash
/// resends at most about this much.
const DIRECT_SYNC_BYTES: u64 = 64 << 20;

/// An apply has what it wrote written back in the background after this much.
const WRITEBACK_BYTES: u64 = 128 << 20;

/// Staged chunks an apply's reader decompresses ahead of its writer (at most this many
/// chunks' data are held).
const APPLY_QUEUE: usize = 16;

pub struct VmStore {
    vm: String,
    dir: PathBuf,
    state: VmState,
    retention: Retention,
    /// Shared with [`UndoSource`]s, which read old contents outside the VM's lock.
    images: Arc<Vec<Image>>,
    receiving: Option<Receiving>,
    /// This process's hold on the replica (see [`lock_vm`]); released when dropped.
    _lock: File,
    /// Test hook: fail (as a crash would) after writing this many chunks of an apply.
    #[cfg(test)]
    crash_after: Option<u64>,
}

/// The directory of VM `vm`'s replica under `root`, once its name is checked.
fn vm_dir(root: &Path, vm: &str) -> Result<PathBuf, StoreError> {
    validate_name(vm).map_err(|source| StoreError::Name {
        name: vm.to_string(),
        source,
    })?;
    Ok(root.join(vm))
}

/// Takes `ROOT/VM.lock` exclusively (flock; released when the file is closed, also by a
/// crash), so that one process at a time opens a replica: a second applier on the same store,
/// or an export (which may finish an interrupted apply) beside a running applier, would write
/// the same images, staging and state.
fn lock_vm(root: &Path, vm: &str) -> Result<File, StoreError> {
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
        let state: VmState = match read_state(&state_path, STATE_FORMAT, STATE_VERSION)? {
            Some(s) => s,
            None => {
                let Some(peer) = peer else {
                    return Err(StoreError::NoReplica(vm.to_string()));
                };
                VmState {
                    owner: peer.to_string(),
                    disks: Vec::new(),
                    last_cycle: 0,
                    applying: None,
                    points: Vec::new(),
                    undo: Vec::new(),
                }
            }
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
        let mut s = VmStore {
            vm: vm.to_string(),
            dir,
            state,
            retention,
            images: Arc::new(Vec::new()),
            receiving: None,
            _lock: lock,
            #[cfg(test)]
            crash_after: None,
        };
        s.open_images(false)?;
        s.finish_interrupted_apply()?;
        s.remove_stale_staging()?;
        Ok(s)
    }

    /// An apply that stopped part-way (crash, full disk, I/O error) is finished from its
    /// staged chunks before anything else happens to the replica, or rolled back if they
    /// are damaged. Until then nothing else may touch the images: the undo log of a later
    /// cycle would record half-applied contents as the old ones.
    fn finish_interrupted_apply(&mut self) -> Result<(), StoreError> {
        let Some(cycle) = self.state.applying else {
            return Ok(());
        };
        tracing::warn!(
            vm = %self.vm,
            cycle,
            "an apply was interrupted; finishing it from the staged chunks"
        );
        let meta: CycleMeta = read_state(&self.cycle_meta_path(cycle), CYCLE_FORMAT, 1)?.ok_or(
            StoreError::NoSuchCycle {
                vm: self.vm.clone(),
                cycle,
            },
        )?;
        let staging = self.open_staging(cycle, false)?;
        let kind = match meta.kind.as_str() {
            "initial" => CycleKind::Initial,
            "resync" => CycleKind::Resync,
            _ => CycleKind::Delta,
        };
        let intact = meta
            .manifest
            .is_some_and(|(n, d)| staging.count() == n && staging.digest() == d);
        let finished = if intact {
            self.finish_apply(cycle, kind, &staging)
        } else {
            Err(StoreError::Incomplete {
                vm: self.vm.clone(),
                cycle,
                have: staging.count(),
                want: meta.manifest.map_or(0, |m| m.0),
            })
        };
        match finished {
            Err(e @ (StoreError::BadChunk { .. } | StoreError::Incomplete { .. })) => {
                drop(staging);
                self.roll_back(cycle, &e)?;
            }
            other => other?,
        }
        Ok(())
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> StoreError {
        let path = path.to_path_buf();
        let vm = self.vm.clone();
        move |source| {
            if source.kind() == io::ErrorKind::StorageFull
                || source.raw_os_error() == Some(libc::ENOSPC)
            {
                StoreError::NoSpace {
                    vm: vm.clone(),
                    path: path.clone(),
                }
            } else {
                StoreError::Io {
                    path: path.clone(),
                    source,
                }
            }
        }
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub fn owner(&self) -> &str {
        &self.state.owner
    }

    pub fn last_cycle(&self) -> u64 {
        self.state.last_cycle
    }

    pub fn points(&self) -> Vec<PointInfo> {
        self.state.points.clone()
    }

    pub fn disk_names(&self) -> Vec<String> {
        self.state.disks.iter().map(|d| d.name.clone()).collect()
    }

    pub fn image_path(&self, disk: &str) -> PathBuf {
        self.dir.join("disks").join(format!("{disk}.img"))
    }

    fn cycle_dir(&self, cycle: u64) -> PathBuf {
        self.dir.join("staging").join(cycle.to_string())
    }

    fn cycle_meta_path(&self, cycle: u64) -> PathBuf {
        self.cycle_dir(cycle).join("cycle.json")
    }

    fn open_staging(&self, cycle: u64, direct: bool) -> Result<Staging, StoreError> {
        let p = self.cycle_dir(cycle).join("chunks.log");
        Staging::open(&p, cycle, direct).map_err(self.io(&p))
    }

    /// Writes `data` at `offset` of disk `disk`'s image through the page cache, or punches
    /// `len` bytes there if it is all zeroes (None), so the replica stays sparse.
    fn write_range(
        &self,
        disk: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.images[disk as usize]
            .write_range(offset, len, data)
            .map_err(self.io(&self.image_path(&self.state.disks[disk as usize].name)))
    }

    /// The error of a failed write into an image.
    fn write_error(&self, e: WriteError) -> StoreError {
        let p = match self.state.disks.get(e.disk as usize) {
            Some(d) => self.image_path(&d.name),
            None => self.dir.join("disks"),
        };
        self.io(&p)(e.source)
    }

    /// fsyncs every replica image.
    fn sync_images(&self) -> Result<(), StoreError> {
        for (img, d) in self.images.iter().zip(&self.state.disks) {
            img.file
                .sync_all()
                .map_err(self.io(&self.image_path(&d.name)))?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), StoreError> {
        write_state(
            &self.dir.join("state.json"),
            STATE_FORMAT,
            STATE_VERSION,
            &self.state,
        )?;
        Ok(())
    }

    fn open_images(&mut self, create: bool) -> Result<(), StoreError> {
        let mut images = Vec::new();
        let ddir = self.dir.join("disks");
        if create {
            fs::create_dir_all(&ddir).map_err(self.io(&ddir))?;
        }
        for d in self.state.disks.clone() {
            let p = self.image_path(&d.name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(&p)
                .map_err(self.io(&p))?;
            if create && f.metadata().map_err(self.io(&p))?.len() != d.size {
                f.set_len(d.size).map_err(self.io(&p))?;
            }
            let direct = direct::open(&p, true).map_err(self.io(&p))?;
            images.push(Image { file: f, direct });
        }
        self.images = Arc::new(images);
        Ok(())
    }

    fn remove_stale_staging(&self) -> Result<(), StoreError> {
        let sdir = self.dir.join("staging");
        for e in fs::read_dir(&sdir).into_iter().flatten().flatten() {
            let keep = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|c| c > self.state.last_cycle);
            if !keep {
                fs::remove_dir_all(e.path()).map_err(self.io(&e.path()))?;
            }
        }
        Ok(())
    }

    /// A cycle starts or resumes: returns the chunks already staged for it.
    pub fn begin(
        &mut self,
        cycle: u64,
        kind: CycleKind,
        disks: &[DiskInfo],
    ) -> Result<Vec<StagedChunk>, StoreError> {
        let r = self.begin_inner(cycle, kind, disks);
        self.stop_after_io_error(r)
    }

    /// A write into the cycle being received failed (a full disk, an I/O error): its staging
    /// log and journal may end in a torn frame, and their writers refuse anything more. The
    /// cycle stops taking chunks: every stream still sending gets the same error (not a
    /// confusing one of its own), and the next [`VmStore::begin`] reopens staging log and
    /// journal, whose scans keep what reached the disk (the shipper resends the rest).
    fn stop_after_io_error<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let (Err(e @ (StoreError::Io { .. } | StoreError::NoSpace { .. })), Some(rc)) =
            (&r, &mut self.receiving)
        {
            if rc.broken.is_none() {
                tracing::warn!(vm = %self.vm, cycle = rc.cycle, "the cycle being received stops after a write error ({e}); it resumes from what is on disk");
                rc.broken = Some(e.again());
            }
        }
        r
    }

    /// The error that stopped the cycle being received, if one did.
    fn broken(&self) -> Result<(), StoreError> {
        match self.receiving.as_ref().and_then(|r| r.broken.as_ref()) {
            Some(e) => Err(e.again()),
            None => Ok(()),
        }
    }

    fn begin_inner(
        &mut self,
        cycle: u64,
        kind: CycleKind,
        disks: &[DiskInfo],
    ) -> Result<Vec<StagedChunk>, StoreError> {
        self.finish_interrupted_apply()?;
        // A cycle stopped by a write error is reopened from what reached the disk.
        if self.receiving.as_ref().is_some_and(|r| r.broken.is_some()) {
            self.receiving = None;
        }
        // Resuming the cycle being received: what it holds so far becomes durable and listed.
        if self.receiving.as_ref().is_some_and(|r| r.cycle == cycle) {
            self.sync_staging()?;
        }
        if cycle <= self.state.last_cycle {
            return Err(StoreError::OldCycle {
                vm: self.vm.clone(),
                cycle,
                last: self.state.last_cycle,
            });
        }
        let given: Vec<DiskMeta> = disks
            .iter()
            .map(|d| DiskMeta {
                name: d.name.clone(),
                size: d.size,
                granularity: d.granularity,
            })
            .collect();
        for d in &given {
            validate_name(&d.name).map_err(|source| StoreError::Name {
                name: d.name.clone(),
                source,
            })?;
        }
        if self.state.disks.is_empty() {
            fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
            self.state.disks = given;
            self.open_images(true)?;
            self.save()?;
        } else if self.state.disks != given {
            return Err(StoreError::DiskMismatch {
                vm: self.vm.clone(),
                given: disks
                    .iter()
                    .map(|d| format!("{}:{}", d.name, d.size))
                    .collect(),
                have: self
                    .state
                    .disks
                    .iter()
                    .map(|d| format!("{}:{}", d.name, d.size))
                    .collect(),
            });
        }
        // Another cycle's partial staging is obsolete (the primary merged it into this one).
        let sdir = self.dir.join("staging");
        for e in fs::read_dir(&sdir).into_iter().flatten().flatten() {
            if e.file_name().to_str() != Some(&cycle.to_string()) {
                fs::remove_dir_all(e.path()).map_err(self.io(&e.path()))?;
            }
        }
        let cdir = self.cycle_dir(cycle);
        // An initial copy with no point before it goes straight into the images. Starting
        // afresh (not resuming this cycle), they are emptied first: an abandoned earlier
        // attempt may have written where this copy has holes.
        let direct = kind == CycleKind::Initial && self.state.last_cycle == 0;
        if direct && !cdir.join("chunks.log").exists() {
            for (img, d) in self.images.iter().zip(&self.state.disks) {
                let p = self.image_path(&d.name);
                img.file.set_len(0).map_err(self.io(&p))?;
                img.file.set_len(d.size).map_err(self.io(&p))?;
            }
            self.sync_images()?;
        }
        fs::create_dir_all(&cdir).map_err(self.io(&cdir))?;
        write_state(
            &self.cycle_meta_path(cycle),
            CYCLE_FORMAT,
            1,
            &CycleMeta {
                cycle,
                kind: kind_name(kind).to_string(),
                manifest: None,
            },
        )?;
        let staging = self.open_staging(cycle, direct)?;
        let journal = if kind != CycleKind::Initial && self.state.last_cycle > 0 {
            let jp = cdir.join("undo.journal");
            Some(Journal::open(&jp, cycle).map_err(self.io(&jp))?)
        } else {
            None
        };
        let ids = staging.entries();
        self.receiving = Some(Receiving {
            cycle,
            kind,
            staging,
            direct,
            unsynced: 0,
            journal,
            broken: None,
        });
        Ok(ids)
    }

    fn bad_chunk(&self, reason: String) -> StoreError {
        StoreError::BadChunk {
            vm: self.vm.clone(),
            reason,
        }
    }

    /// Verifies and stages one chunk of the cycle being received.
    pub fn stage(&mut self, c: &Chunk) -> Result<(), StoreError> {
        let data = c.unpack().map_err(|e| self.bad_chunk(e.to_string()))?;
        self.stage_verified(c, data.as_deref(), None)
    }

    /// Stages one chunk whose payload the caller verified with [`Chunk::unpack`] (so that
    /// decompressing and checksumming run outside the VM's lock, one stream each); `data` is
    /// what it unpacked to (None: zeroes).
    /// `undo`: the old contents of the chunk's range, from [`VmStore::undo_source`] (None:
    /// read them here).
    pub fn stage_verified(
        &mut self,
        c: &Chunk,
        data: Option<&[u8]>,
        undo: Option<Chunk>,
    ) -> Result<(), StoreError> {
        let r = self.stage_inner(c, data, undo);
        self.stop_after_io_error(r)
    }

    fn stage_inner(
        &mut self,
        c: &Chunk,
        data: Option<&[u8]>,
        undo: Option<Chunk>,
    ) -> Result<(), StoreError> {
        let Some(r) = &self.receiving else {
            return Err(StoreError::NoSuchCycle {
                vm: self.vm.clone(),
                cycle: c.cycle,
            });
        };
        if r.cycle != c.cycle {
            return Err(StoreError::NoSuchCycle {
                vm: self.vm.clone(),
                cycle: c.cycle,
            });
        }
        self.broken()?;
        let Some(d) = self.state.disks.get(c.disk as usize) else {
            return Err(self.bad_chunk(format!("disk index {} out of range", c.disk)));
        };
        if c.offset
            .checked_add(u64::from(c.len))
            .is_none_or(|e| e > d.size)
        {
            return Err(self.bad_chunk(format!(
                "{}+{} is beyond the end of disk {} ({} bytes)",
                c.offset, c.len, d.name, d.size
            )));
        }
        if self.receiving.as_ref().is_some_and(|r| r.direct) {
            self.write_range(c.disk, c.offset, c.len, data)?;
            let r = self.receiving.as_mut().expect("checked above");
            r.staging.append_header(c);
            r.unsynced += u64::from(c.len);
            if r.unsynced >= DIRECT_SYNC_BYTES {
                self.sync_staging()?;
            }
            return Ok(());
        }
        self.capture_undo(c.disk, c.offset, c.len, undo)?;
        let io = self.io(&self.cycle_dir(c.cycle));
        let r = self.receiving.as_mut().expect("checked above");
        r.staging.append(c).map_err(io)
    }

    /// While a cycle that keeps an undo log is received: a handle that reads the old contents
    /// of a chunk's range without this store's lock, for [`VmStore::stage_verified`].
    pub fn undo_source(&self) -> Option<UndoSource> {
        let r = self.receiving.as_ref()?;
        r.journal.as_ref()?;
        Some(UndoSource {
            images: Arc::clone(&self.images),
            cycle: r.cycle,
        })
    }

    /// Records in the receiving cycle's undo journal the old contents of `[offset,
    /// offset+len)` of disk `disk`, where it holds none yet. The images do not change until
    /// the cycle's apply, so what they hold now is what the cycle overwrites. `prepared`: those
    /// contents read beforehand by an [`UndoSource`].
    fn capture_undo(
        &mut self,
        disk: u16,
        offset: u64,
        len: u32,
        prepared: Option<Chunk>,
    ) -> Result<(), StoreError> {
        if self.receiving.as_ref().is_none_or(|r| r.journal.is_none()) {
            return Ok(());
        }
        let img_err = self.io(&self.image_path(&self.state.disks[disk as usize].name));
        let journal_err = self.io(&self.dir.join("staging"));
        let img = &self.images[disk as usize];
        let r = self.receiving.as_mut().expect("checked above");
        let j = r.journal.as_mut().expect("checked above");
        let end = offset + u64::from(len);
        let parts = j.uncovered(disk, offset, end);
        if let Some(p) = prepared {
            if parts == [(offset, end)]
                && (p.cycle, p.disk, p.offset, p.len) == (r.cycle, disk, offset, len)
            {
                return j.append(&p).map_err(journal_err);
            }
        }
        let mut buf = Vec::new();
        for (start, end) in parts {
            let old = read_old(img, r.cycle, disk, start, (end - start) as u32, &mut buf)
                .map_err(&img_err)?;
            j.append(&old).map_err(&journal_err)?;
        }
        Ok(())
    }

    /// Makes the staged chunks durable (for a direct cycle: the images first, then the log
    /// that lists what they hold).
    fn sync_staging(&mut self) -> Result<(), StoreError> {
        self.broken()?;
        let Some(r) = &self.receiving else {
            return Ok(());
        };
        if r.direct {
            self.sync_images()?;
        }
        let p = self.dir.clone();
        let io = self.io(&p);
        let r = self.receiving.as_mut().expect("checked above");
        r.unsynced = 0;
        // The undo journal is written out too (not fsynced: what a crash cuts from it is
        // captured again at commit), so a restart finds most of it.
        if let Some(j) = &mut r.journal {
            j.flush().map_err(&io)?;
        }
        r.staging.sync().map_err(io)
    }

    /// Makes the staged chunks durable and lists them (for a resuming shipper).
    pub fn staged(&mut self) -> Result<Vec<StagedChunk>, StoreError> {
        let r = self.sync_staging();
        self.stop_after_io_error(r)?;
        Ok(self
            .receiving
            .as_ref()
            .map(|r| r.staging.entries())
            .unwrap_or_default())
    }

    /// The manifest arrived: verify completeness, then apply all-or-nothing.
    pub fn commit(&mut self, cycle: u64, chunks: u64, digest: u64) -> Result<(), StoreError> {
        let r = self.commit_inner(cycle, chunks, digest);
        self.stop_after_io_error(r)
    }

    fn commit_inner(&mut self, cycle: u64, chunks: u64, digest: u64) -> Result<(), StoreError> {
        match &self.receiving {
            Some(r) if r.cycle == cycle => {}
            other => {
                return Err(StoreError::NoSuchCycle {
                    vm: self.vm.clone(),
                    cycle: other.as_ref().map_or(cycle, |r| r.cycle),
                })
            }
        }
        self.sync_staging()?;
        let r = self.receiving.as_ref().expect("matched above");
        if r.staging.count() != chunks || r.staging.digest() != digest {
            return Err(StoreError::Incomplete {
                vm: self.vm.clone(),
                cycle,
                have: r.staging.count(),
                want: chunks,
            });
        }
        // The journal is not fsynced as it grows: after a restart it may lack ranges that the
        // staging log kept. They are captured now; the images are still unchanged.
        if r.journal.is_some() {
            let ranges: Vec<(u16, u64, u32)> = r.staging.ranges().collect();
            for (disk, offset, len) in ranges {
                self.capture_undo(disk, offset, len, None)?;
            }
        }
        let mut r = self.receiving.take().expect("matched above");
        if r.direct {
            // Already in the images, and durable (sync_staging): it only becomes the point.
            tracing::info!(vm = %self.vm, cycle, chunks, "initial copy received in place");
            drop(r);
            return self.record_point(cycle, CycleKind::Initial, chunks);
        }
        tracing::info!(vm = %self.vm, cycle, chunks, staged_mib = r.staging.bytes() >> 20, "cycle received: applying");
        // Every staged chunk was verified (length, checksum) when it arrived or, after a
        // restart, when the staging log was reopened; count and digest match the manifest.
        if let Some(journal) = r.journal.take() {
            let name = format!("{cycle}.undo");
            let udir = self.dir.join("undo");
            fs::create_dir_all(&udir).map_err(self.io(&udir))?;
            let up = udir.join(&name);
            let bytes = journal.finish(cycle, &up).map_err(self.io(&up))?;
            self.state.undo.retain(|u| u.from != cycle);
            self.state.undo.push(UndoRef {
                from: cycle,
                to: self.state.last_cycle,
                file: name,
                bytes,
            });
        }
        write_state(
            &self.cycle_meta_path(cycle),
            CYCLE_FORMAT,
            1,
            &CycleMeta {
                cycle,
                kind: kind_name(r.kind).to_string(),
                manifest: Some((chunks, digest)),
            },
        )?;
        self.state.applying = Some(cycle);
        self.save()?;
        match self.finish_apply(cycle, r.kind, &r.staging) {
            Err(e @ (StoreError::BadChunk { .. } | StoreError::Incomplete { .. })) => {
                drop(r);
                self.roll_back(cycle, &e)?;
                Err(e)
            }
            other => other,
        }
    }

    /// The staged cycle turned out damaged during its apply (its chunks were verified when
    /// they arrived, so only the disk under the staging log can have changed): puts back the
    /// old contents from the cycle's undo log, so the replica is the previous point again, and
    /// drops the cycle; the shipper sends it again.
    fn roll_back(&mut self, cycle: u64, why: &StoreError) -> Result<(), StoreError> {
        tracing::error!(vm = %self.vm, cycle, "apply failed ({why}): rolling back to the previous point");
        if let Some(pos) = self.state.undo.iter().position(|u| u.from == cycle) {
            let up = self.dir.join("undo").join(&self.state.undo[pos].file);
            // Checked whole before anything is put back; then streamed, one entry at a time.
            undo::check(&up).map_err(self.io(&up))?;
            for e in undo::Entries::open(&up).map_err(self.io(&up))? {
                let (c, data) = e.map_err(self.io(&up))?;
                if usize::from(c.disk) >= self.images.len() {
                    return Err(self.bad_chunk(format!(
                        "undo log {}: disk {}",
                        up.display(),
                        c.disk
                    )));
                }
                self.write_range(c.disk, c.offset, c.len, data.as_deref())?;
            }
            self.sync_images()?;
            self.state.undo.remove(pos);
        }
        self.state.applying = None;
        self.save()?;
        let cdir = self.cycle_dir(cycle);
        fs::remove_dir_all(&cdir).map_err(self.io(&cdir))?;
        self.remove_unreferenced_undo()
    }

    fn finish_apply(
        &mut self,
        cycle: u64,
        kind: CycleKind,
        staging: &Staging,
    ) -> Result<(), StoreError> {
        let total = staging.count();
        let this = &*self;
        // The first error of the background writeback: fsync reports a write-back error once
        // per open file, so one seen there must fail the apply, not vanish.
        let writeback_error: Mutex<Option<io::Error>> = Mutex::new(None);
        // A reader thread reads the staging log through (large direct reads) and decompresses
        // its chunks while this one hands them to an [`ImageWriter`], which keeps many direct
        // writes in flight; the queue between them bounds what is decompressed ahead. What
        // goes through the page cache instead (chunks that cannot go direct) is written back
        // by a third thread as the apply goes on, so the final fsync has little left.
        std::thread::scope(|scope| -> Result<(), StoreError> {
            let (tick, ticks) = std::sync::mpsc::sync_channel::<()>(1);
            let writeback_error = &writeback_error;
            scope.spawn(move || {
                while ticks.recv().is_ok() {
                    for img in this.images.iter() {
                        if let Err(e) = img.file.sync_data() {
                            let mut slot =
                                writeback_error.lock().unwrap_or_else(|e| e.into_inner());
                            slot.get_or_insert(e);
                        }
                    }
                }
            });
            let (tx, rx) = std::sync::mpsc::sync_channel(APPLY_QUEUE);
            // Buffers the writer is done with go back to the reader: no chunk allocates or
            // zeroes one of its own (only the few in the queue and in flight are in use).
            let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            scope.spawn(move || {
                let chunks = match staging.chunks() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(this.io(&this.dir)(e)));
                        return;
                    }
                };
                for c in chunks {
                    let item = c.map_err(this.io(&this.dir)).and_then(|c| {
                        let mut buf = spare_rx.try_recv().unwrap_or_default();
                        let at = c
                            .unpack_aligned(&mut buf)
                            .map_err(|e| this.bad_chunk(e.to_string()))?;
                        Ok((c.disk, c.offset, c.len, at.map(|at| (buf, at))))
                    });
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        break;
                    }
                }
            });
            // Dropped before this scope returns, error or not: it waits for its writes.
            let mut writer = ImageWriter::new(&this.images, spare_tx);
            let mut done = 0u64;
            let mut unsynced = 0u64;
            let mut last_log = std::time::Instant::now();
            for item in rx {
                let (disk, offset, len, data) = item?;
                #[cfg(test)]
                if this.crash_after == Some(done) {
                    return Err(StoreError::Io {
                        path: this.dir.clone(),
                        source: io::Error::other("simulated crash"),
                    });
                }
                unsynced += writer
                    .write(disk, offset, len, data)
                    .map_err(|e| this.write_error(e))?;
                if unsynced >= WRITEBACK_BYTES {
                    // Never waits: a tick already pending covers these pages too.
                    let _ = tick.try_send(());
                    unsynced = 0;
                }
                done += 1;
                if last_log.elapsed().as_secs() >= 5 {
                    tracing::info!(vm = %this.vm, cycle, done, total, "applying");
                    last_log = std::time::Instant::now();
                }
            }
            writer.finish().map_err(|e| this.write_error(e))?;
            if done != total {
                return Err(StoreError::Incomplete {
                    vm: this.vm.clone(),
                    cycle,
                    have: done,
                    want: total,
                });
            }
            Ok(())
        })?;
        if let Some(e) = writeback_error
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
        {
            return Err(self.io(&self.dir.join("disks"))(e));
        }
        self.record_point(cycle, kind, total)
    }

    /// The images hold cycle `cycle` (written, maybe not yet durable): fsyncs them and
    /// records the new point, then drops the staging and applies the retention policy.
    fn record_point(&mut self, cycle: u64, kind: CycleKind, total: u64) -> Result<(), StoreError> {
        self.sync_images()?;
        self.state.applying = None;
        self.state.last_cycle = cycle;
        self.state.points.push(PointInfo {
            cycle,
            applied_at: now(),
            kind: kind_name(kind).to_string(),
            bytes: 0,
        });
        if kind == CycleKind::Initial {
            // Nothing before an initial copy can be rebuilt: it starts the history afresh.
            self.state.points.retain(|p| p.cycle == cycle);
            self.state.undo.clear();
        }
        self.refresh_point_sizes();
        self.save()?;
        let cdir = self.cycle_dir(cycle);
        fs::remove_dir_all(&cdir).map_err(self.io(&cdir))?;
        self.retain()?;
        self.remove_unreferenced_undo()?;
        tracing::info!(vm = %self.vm, cycle, chunks = total, "cycle applied");
        Ok(())
    }

    fn refresh_point_sizes(&mut self) {
        for p in &mut self.state.points {
            p.bytes = self
                .state
                .undo
                .iter()
                .find(|u| u.to == p.cycle)
                .map(|u| u.bytes)
                .unwrap_or(0);
        }
    }

    fn remove_unreferenced_undo(&self) -> Result<(), StoreError> {
        let udir = self.dir.join("undo");
        for e in fs::read_dir(&udir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.state.undo.iter().any(|u| u.file == name) {
                fs::remove_file(e.path()).map_err(self.io(&e.path()))?;
            }
        }
        Ok(())
    }

    /// Drops point `cycle` (not the newest), merging the undo logs around it.
    fn drop_point(&mut self, cycle: u64) -> Result<(), StoreError> {
        let to_it = self.state.undo.iter().position(|u| u.to == cycle);
        let from_it = self.state.undo.iter().position(|u| u.from == cycle);
        match (to_it, from_it) {
            (Some(a), Some(b)) => {
                let newer = self.state.undo[a].clone();
                let older = self.state.undo[b].clone();
                let udir = self.dir.join("undo");
                let np = udir.join(&newer.file);
                let op = udir.join(&older.file);
                let name = format!("{}-{}.undo", newer.from, older.to);
                let mp = udir.join(&name);
                let bytes = undo::merge(&op, &np, newer.from, &mp).map_err(self.io(&mp))?;
                self.state.undo.retain(|u| u.to != cycle && u.from != cycle);
                self.state.undo.push(UndoRef {
                    from: newer.from,
                    to: older.to,
                    file: name,
                    bytes,
                });
            }
            (Some(_), None) => self.state.undo.retain(|u| u.to != cycle),
            _ => {}
        }
        self.state.points.retain(|p| p.cycle != cycle);
        Ok(())
    }

    /// Applies the retention policy: hourly thinning of old points, then the count limit.
    fn retain(&mut self) -> Result<(), StoreError> {
        let mut changed = false;
        if let Some(after) = self.retention.hourly_after {
            let cutoff = now().saturating_sub(after);
            let newest = self.state.points.last().map(|p| p.cycle);
            // Newest first: within an hour, keep the newest point.
            let mut seen_hours = std::collections::HashSet::new();
            let mut drop = Vec::new();
            for p in self.state.points.iter().rev() {
                if Some(p.cycle) == newest || p.applied_at >= cutoff {
                    continue;
                }
                if !seen_hours.insert(p.applied_at / 3600) {
                    drop.push(p.cycle);
                }
            }
            for c in drop {
                self.drop_point(c)?;
                changed = true;
            }
        }
        while self.state.points.len() > self.retention.keep.max(1) {
            let oldest = self.state.points[0].cycle;
            self.drop_point(oldest)?;
            changed = true;
        }
        if changed {
            self.refresh_point_sizes();
            self.save()?;
        }
        Ok(())
    }

    /// Writes the images of recovery point `cycle` into `out_dir` (sparse), one per disk.
    pub fn export_point(&self, cycle: u64, out_dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
        if !self.state.points.iter().any(|p| p.cycle == cycle) {
            return Err(StoreError::NoSuchPoint {
                vm: self.vm.clone(),
                cycle,
            });
        }
        fs::create_dir_all(out_dir).map_err(self.io(out_dir))?;
        let mut outs = Vec::new();
        for (i, d) in self.state.disks.iter().enumerate() {
            let op = out_dir.join(format!("{}.img", d.name));
            let out = File::create(&op).map_err(self.io(&op))?;
            out.set_len(d.size).map_err(self.io(&op))?;
            let src = &self.images[i].file;
            let sp = self.image_path(&d.name);
            let mut buf = vec![0u8; MAX_CHUNK as usize];
            for (off, len) in data_regions(src, d.size).map_err(self.io(&sp))? {
                let mut pos = off;
                while pos < off + len {
                    let n = (off + len - pos).min(buf.len() as u64) as usize;
                    src.read_exact_at(&mut buf[..n], pos)
                        .map_err(self.io(&sp))?;
                    if buf[..n].iter().any(|b| *b != 0) {
                        out.write_all_at(&buf[..n], pos).map_err(self.io(&op))?;
                    }
                    pos += n as u64;
                }
            }
            outs.push((op, out));
        }
        // Walk the undo chain from the newest point back to `cycle`.
        let mut at = self.state.last_cycle;
        while at != cycle {
            let u =
                self.state
                    .undo
                    .iter()
                    .find(|u| u.from == at)
                    .ok_or(StoreError::NoSuchPoint {
                        vm: self.vm.clone(),
                        cycle,
                    })?;
            let up = self.dir.join("undo").join(&u.file);
            for e in undo::Entries::open(&up).map_err(self.io(&up))? {
                let (c, data) = e.map_err(self.io(&up))?;
                let (op, out) = outs.get(c.disk as usize).ok_or_else(|| {
                    self.bad_chunk(format!("undo log {}: disk {}", up.display(), c.disk))
                })?;
                match data {
                    Some(data) => out.write_all_at(&data, c.offset).map_err(self.io(op))?,
                    None => punch_hole(out, c.offset, u64::from(c.len)).map_err(self.io(op))?,
                }
            }
            at = u.to;
        }
        let mut paths = Vec::new();
        for (op, out) in outs {
            out.sync_all().map_err(self.io(&op))?;
            paths.push(op);
        }
        Ok(paths)
    }

    /// xxh3 checksums of `count` blocks of `block` bytes of `disk` from `offset`.
    pub fn hashes(
        &self,
        disk: &str,
        offset: u64,
        block: u32,
        count: u32,
    ) -> Result<Vec<u64>, StoreError> {
        let i = self
            .state
            .disks
            .iter()
            .position(|d| d.name == disk)
            .ok_or_else(|| self.bad_chunk(format!("no disk {disk}")))?;
        let size = self.state.disks[i].size;
        let p = self.image_path(disk);
        let block = u64::from(block.clamp(4096, MAX_CHUNK));
        let mut buf = vec![0u8; block as usize];
        let mut out = Vec::new();
        let mut pos = offset;
        for _ in 0..count.min(wire::MAX_LIST) {
            if pos >= size {
                break;
            }
            let n = block.min(size - pos) as usize;
            self.images[i]
                .file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(self.io(&p))?;
            out.push(wire::checksum(&buf[..n]));
            pos += n as u64;
        }
        Ok(out)
    }

    /// Staged chunk ids grouped per disk (for diagnostics).
    pub fn receiving_cycle(&self) -> Option<u64> {
        self.receiving.as_ref().map(|r| r.cycle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    const SIZE: u64 = 4 << 20;
    const G: u32 = 65536;

    fn disks() -> Vec<DiskInfo> {
        ["a", "b"]
            .iter()
            .map(|n| DiskInfo {
                name: n.to_string(),
                size: SIZE,
                granularity: G,
            })
            .collect()
    }

    /// Ships blocks `blocks` of the primary images as one cycle.
    fn ship(
        vs: &mut VmStore,
        cycle: u64,
        kind: CycleKind,
        primary: &[Vec<u8>],
        blocks: &[(u16, u64)],
    ) -> Result<(), StoreError> {
        vs.begin(cycle, kind, &disks())?;
        let mut ids = Vec::new();
        for &(d, b) in blocks {
            let off = b * u64::from(G);
            let c = Chunk::pack(
                cycle,
                d,
                off,
                &primary[d as usize][off as usize..(off + u64::from(G)) as usize],
                true,
            );
            ids.push((c.id(), c.checksum));
            vs.stage(&c)?;
        }
        vs.commit(cycle, ids.len() as u64, wire::digest(ids))
    }

    fn mutate(rng: &mut impl Rng, primary: &mut [Vec<u8>]) -> Vec<(u16, u64)> {
        let mut blocks = Vec::new();
        for _ in 0..rng.gen_range(1..12) {
            let d = rng.gen_range(0..2u16);
            let b = rng.gen_range(0..SIZE / u64::from(G));
            let off = (b * u64::from(G)) as usize;
            let fill = if rng.gen_bool(0.2) { 0 } else { rng.gen() };
            primary[d as usize][off..off + G as usize].fill(fill);
            if !blocks.contains(&(d, b)) {
                blocks.push((d, b));
            }
        }
        blocks
    }

    /// Opens vm1 and ships `primary` whole as its initial cycle 1; history holds point 1.
    /// Mutates `primary` at least once and until `blocks` lists `at_least` distinct blocks,
    /// adding each block written that it does not list yet.
    fn mutate_until(
        rng: &mut impl Rng,
        primary: &mut [Vec<u8>],
        blocks: &mut Vec<(u16, u64)>,
        at_least: usize,
    ) {
        loop {
            for b in mutate(rng, primary) {
                if !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
            if blocks.len() >= at_least {
                return;
            }
        }
    }

    fn initial(store: &Store, primary: &[Vec<u8>]) -> (VmStore, BTreeMap<u64, Vec<Vec<u8>>>) {
        let mut vs = store.open_vm("vm1", "primary-1").unwrap();
        let all: Vec<(u16, u64)> = (0..2)
            .flat_map(|d| (0..SIZE / u64::from(G)).map(move |b| (d, b)))
            .collect();
        ship(&mut vs, 1, CycleKind::Initial, primary, &all).unwrap();
        (vs, BTreeMap::from([(1, primary.to_vec())]))
    }

    fn read_images(vs: &VmStore) -> Vec<Vec<u8>> {
        ["a", "b"]
            .iter()
            .map(|n| fs::read(vs.image_path(n)).unwrap())
            .collect()
    }

    #[test]
    fn cycles_points_retention_and_interrupted_apply() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(
            dir.path(),
            Retention {
                keep: 4,
                hourly_after: None,
            },
        )
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut primary = vec![vec![0u8; SIZE as usize]; 2];
        primary[0][..1000].fill(9);
        let (mut vs, mut history) = initial(&store, &primary);
        for cycle in 2..=7 {
            let blocks = mutate(&mut rng, &mut primary);
            ship(&mut vs, cycle, CycleKind::Delta, &primary, &blocks).unwrap();
            history.insert(cycle, primary.clone());
            assert!(
                read_images(&vs) == primary,
                "replica differs after cycle {cycle}"
            );
        }
        let points: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
        assert_eq!(points, vec![4, 5, 6, 7]);
        for &k in &points {
            let out = dir.path().join(format!("point-{k}"));
            let files = vs.export_point(k, &out).unwrap();
            for (i, f) in files.iter().enumerate() {
                assert!(
                    fs::read(f).unwrap() == history[&k][i],
                    "point {k} disk {i} differs"
                );
            }
        }
        assert!(matches!(
            vs.export_point(3, dir.path()),
            Err(StoreError::NoSuchPoint { .. })
        ));
        // Thinning drops a middle point by merging the undo logs around it.
        vs.drop_point(5).unwrap();
        vs.save().unwrap();
        assert_eq!(
            vs.points().iter().map(|p| p.cycle).collect::<Vec<_>>(),
            vec![4, 6, 7]
        );
        for k in [4u64, 6] {
            let out = dir.path().join(format!("thinned-{k}"));
            let files = vs.export_point(k, &out).unwrap();
            for (i, f) in files.iter().enumerate() {
                assert!(
                    fs::read(f).unwrap() == history[&k][i],
                    "after thinning, point {k} disk {i} differs"
                );
            }
        }
        // Zero blocks are holes in the replica.
        let regions = data_regions(&File::open(vs.image_path("a")).unwrap(), SIZE).unwrap();
        let allocated: u64 = regions.iter().map(|r| r.1).sum();
        assert!(allocated < SIZE, "replica is not sparse");

        // An apply interrupted after 2 chunks: reopening finishes it.
        let blocks = mutate(&mut rng, &mut primary);
        vs.crash_after = Some(2);
        let err = ship(&mut vs, 8, CycleKind::Delta, &primary, &blocks);
        assert!(err.is_err());
        drop(vs);
        let vs = store.open_vm("vm1", "primary-1").unwrap();
        assert_eq!(vs.last_cycle(), 8);
        assert!(
            read_images(&vs) == primary,
            "interrupted apply not finished on restart"
        );
        let out = dir.path().join("point-7");
        let files = vs.export_point(7, &out).unwrap();
        assert!(fs::read(&files[1]).unwrap() == history[&7][1]);
        assert!(!vs.dir.join("staging").join("8").exists());
    }

    #[test]
    fn hourly_thinning_keeps_the_newest_point_of_each_old_hour() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(
            dir.path(),
            Retention {
                keep: 24,
                hourly_after: Some(2 * 3600),
            },
        )
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut primary = vec![vec![0u8; SIZE as usize]; 2];
        let (mut vs, mut history) = initial(&store, &primary);
        for cycle in 2..=7 {
            let blocks = mutate(&mut rng, &mut primary);
            ship(&mut vs, cycle, CycleKind::Delta, &primary, &blocks).unwrap();
            history.insert(cycle, primary.clone());
        }
        // Points 1..5 were applied hours ago (2 and 3 in one hour, 4 and 5 in the next),
        // 6 a minute ago, 7 now.
        let h0 = (now() / 3600 - 10) * 3600;
        let when = [
            h0 + 60,
            h0 + 3660,
            h0 + 3720,
            h0 + 7260,
            h0 + 7320,
            now() - 60,
        ];
        for (p, t) in vs.state.points.iter_mut().zip(when) {
            p.applied_at = t;
        }
        vs.retain().unwrap();
        let kept: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
        assert_eq!(kept, vec![1, 3, 5, 6, 7]);
        for &k in &kept {
            let out = dir.path().join(format!("point-{k}"));
            for (i, f) in vs.export_point(k, &out).unwrap().iter().enumerate() {
                assert!(
                    fs::read(f).unwrap() == history[&k][i],
                    "after hourly thinning, point {k} disk {i} differs"
                );
            }
        }
        // Thinning survives a restart: the state file lists the same points.
        drop(vs);
        let vs = store.open_vm("vm1", "primary-1").unwrap();
        let again: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
        assert_eq!(again, kept);
    }

    /// Stages `blocks` of `primary` as `cycle` and returns the manifest, without committing.
    fn stage_only(
        vs: &mut VmStore,
        cycle: u64,
        primary: &[Vec<u8>],
        blocks: &[(u16, u64)],
    ) -> (u64, u64) {
        vs.begin(cycle, CycleKind::Delta, &disks()).unwrap();
        let mut ids = Vec::new();
        for &(d, b) in blocks {
            let off = (b * u64::from(G)) as usize;
            let c = Chunk::pack(
                cycle,
                d,
                off as u64,
                &primary[d as usize][off..off + G as usize],
                true,
            );
            ids.push((c.id(), c.checksum));
            vs.stage(&c).unwrap();
        }
        (ids.len() as u64, wire::digest(ids))
    }

    /// Flips a byte in the middle of the staged chunk log of `cycle` (the disk under it failed
    /// after the chunks were staged durably).
    fn damage_staging(vs: &mut VmStore, cycle: u64) {
        vs.staged().unwrap();
        let p = vs.cycle_dir(cycle).join("chunks.log");
        let mut bytes = fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&p, bytes).unwrap();
    }

    #[test]
    fn a_staged_cycle_damaged_during_apply_is_rolled_back_to_the_previous_point() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut primary = vec![vec![0u8; SIZE as usize]; 2];
        primary[1].fill(4);
        let (mut vs, _) = initial(&store, &primary);
        let before = read_images(&vs);
        // Enough blocks that the damage falls in a chunk the apply reaches after others.
        let mut blocks = Vec::new();
        mutate_until(&mut rng, &mut primary, &mut blocks, 8);
        // Live: the damage is found during the apply.
        let (n, d) = stage_only(&mut vs, 2, &primary, &blocks);
        damage_staging(&mut vs, 2);
        let e = vs.commit(2, n, d).unwrap_err();
        assert!(matches!(e, StoreError::BadChunk { .. }), "{e}");
        assert!(read_images(&vs) == before, "replica left between points");
        assert_eq!(vs.last_cycle(), 1);
        // Sent again, the cycle lands.
        ship(&mut vs, 2, CycleKind::Delta, &primary, &blocks).unwrap();
        assert!(read_images(&vs) == primary);
        let at2 = primary.clone();

        // After a crash mid-apply: the restart finds the staging damaged and rolls back.
        let mut more = blocks.clone();
        mutate_until(&mut rng, &mut primary, &mut more, 0);
        let (n, d) = stage_only(&mut vs, 3, &primary, &more);
        vs.crash_after = Some(2);
        assert!(vs.commit(3, n, d).is_err());
        damage_staging(&mut vs, 3);
        drop(vs);
        let vs = store.open_vm("vm1", "primary-1").unwrap();
        assert_eq!(vs.last_cycle(), 2);
        assert!(
            read_images(&vs) == at2,
            "restart left the replica between points"
        );
        assert!(!vs.cycle_dir(3).exists());
    }

    #[test]
    fn undo_is_captured_as_chunks_arrive_and_completed_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut primary = vec![vec![0u8; SIZE as usize]; 2];
        primary[0][..SIZE as usize / 2].fill(6);
        let (mut vs, mut history) = initial(&store, &primary);
        let mut blocks = Vec::new();
        mutate_until(&mut rng, &mut primary, &mut blocks, 10);
        let (n, d) = stage_only(&mut vs, 2, &primary, &blocks);
        vs.staged().unwrap();
        let journal = vs.cycle_dir(2).join("undo.journal");
        let full = fs::metadata(&journal).unwrap().len();
        assert!(
            full > 0,
            "old contents are journalled while the cycle arrives"
        );
        // A crash loses the journal's unsynced tail; the staged chunks survive.
        drop(vs);
        let f = OpenOptions::new().write(true).open(&journal).unwrap();
        f.set_len(full / 3).unwrap();
        let mut vs = store.open_vm("vm1", "primary-1").unwrap();
        assert_eq!(
            vs.begin(2, CycleKind::Delta, &disks()).unwrap().len(),
            blocks.len()
        );
        vs.commit(2, n, d).unwrap();
        history.insert(2, primary.clone());
        assert!(read_images(&vs) == primary);
        let out = dir.path().join("point-1");
        for (i, f) in vs.export_point(1, &out).unwrap().iter().enumerate() {
            assert!(
                fs::read(f).unwrap() == history[&1][i],
                "point 1 disk {i} differs: the undo log lost old contents"
            );
        }
        assert!(!journal.exists());
    }

    #[test]
    fn an_initial_copy_goes_in_place_resumes_and_a_new_one_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let mut primary = vec![vec![0u8; SIZE as usize]; 2];
        let blocks: Vec<(u16, u64)> = (0..2)
            .flat_map(|d| (0..SIZE / u64::from(G)).map(move |b| (d, b)))
            .collect();
        for (i, &(d, b)) in blocks.iter().enumerate() {
            let off = (b * u64::from(G)) as usize;
            primary[d as usize][off..off + G as usize].fill(i as u8 | 1);
        }
        let pack = |cycle, &(d, b): &(u16, u64), data: &[Vec<u8>]| {
            let off = (b * u64::from(G)) as usize;
            Chunk::pack(
                cycle,
                d,
                off as u64,
                &data[d as usize][off..off + G as usize],
                true,
            )
        };
        let mut vs = store.open_vm("vm1", "primary-1").unwrap();
        vs.begin(1, CycleKind::Initial, &disks()).unwrap();
        let half = blocks.len() / 2;
        for b in &blocks[..half] {
            vs.stage(&pack(1, b, &primary)).unwrap();
        }
        assert_eq!(vs.staged().unwrap().len(), half);
        // Written after the last sync: a crash forgets them, they are sent again.
        for b in &blocks[half..half + 3] {
            vs.stage(&pack(1, b, &primary)).unwrap();
        }
        drop(vs);
        let mut vs = store.open_vm("vm1", "primary-1").unwrap();
        let have = vs.begin(1, CycleKind::Initial, &disks()).unwrap();
        assert_eq!(have.len(), half, "only durable chunks are listed");
        let log = vs.cycle_dir(1).join("chunks.log");
        assert!(
            fs::metadata(&log).unwrap().len() < u64::from(G),
            "an in-place initial copy must not stage its data"
        );
        let mut ids: Vec<_> = have.iter().map(|s| (s.id, s.checksum)).collect();
        for b in &blocks[half..] {
            let c = pack(1, b, &primary);
            ids.push((c.id(), c.checksum));
            vs.stage(&c).unwrap();
        }
        vs.commit(1, ids.len() as u64, wire::digest(ids)).unwrap();
        assert!(read_images(&vs) == primary);
        assert_eq!(vs.last_cycle(), 1);

        // An initial copy abandoned part-way, then a new one (another cycle) where the
        // primary has holes: nothing of the first attempt may remain.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let mut vs = store.open_vm("vm1", "primary-1").unwrap();
        vs.begin(1, CycleKind::Initial, &disks()).unwrap();
        for b in &blocks[..4] {
            vs.stage(&pack(1, b, &primary)).unwrap();
        }
        vs.staged().unwrap();
        drop(vs);
        let mut vs = store.open_vm("vm1", "primary-1").unwrap();
        let empty = vec![vec![0u8; SIZE as usize]; 2];
        vs.begin(2, CycleKind::Initial, &disks()).unwrap();
        vs.commit(2, 0, wire::digest([])).unwrap();
        assert!(
            read_images(&vs) == empty,
            "data of the abandoned copy survived"
        );
    }

    #[test]
    fn an_apply_that_failed_live_is_finished_before_the_next_cycle_starts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut primary = vec![vec![0u8; SIZE as usize]; 2];
        primary[0].fill(1);
        let (mut vs, mut history) = initial(&store, &primary);
        let blocks = mutate(&mut rng, &mut primary);
        ship(&mut vs, 2, CycleKind::Delta, &primary, &blocks).unwrap();
        history.insert(2, primary.clone());
        // The apply of cycle 3 fails part-way (as a full disk or an I/O error would) and the
        // applier keeps running: the shipper comes back with cycle 3 again.
        let mut blocks = Vec::new();
        mutate_until(&mut rng, &mut primary, &mut blocks, 4);
        vs.crash_after = Some(2);
        assert!(ship(&mut vs, 3, CycleKind::Delta, &primary, &blocks).is_err());
        vs.crash_after = None;
        history.insert(3, primary.clone());
        assert!(matches!(
            vs.begin(3, CycleKind::Delta, &disks()),
            Err(StoreError::OldCycle { .. })
        ));
        assert_eq!(vs.last_cycle(), 3);
        assert!(read_images(&vs) == primary);
        // The next cycle's undo log records cycle 3's contents, not half of them.
        let blocks = mutate(&mut rng, &mut primary);
        ship(&mut vs, 4, CycleKind::Delta, &primary, &blocks).unwrap();
        for k in [2u64, 3] {
            let out = dir.path().join(format!("point-{k}"));
            for (i, f) in vs.export_point(k, &out).unwrap().iter().enumerate() {
                assert!(
                    fs::read(f).unwrap() == history[&k][i],
                    "point {k} disk {i} differs"
                );
            }
        }
    }

    #[test]
    fn one_process_at_a_time_opens_a_replica_and_points_are_readable_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let (vs, _) = initial(
            &store,
            &[vec![3u8; SIZE as usize], vec![4u8; SIZE as usize]],
        );
        // The applier holds it: another applier and an export are refused (flock is per open
        // file, so a second open in this process stands for another process).
        assert!(matches!(
            store.open_vm("vm1", "primary-1"),
            Err(StoreError::Busy { .. })
        ));
        let e = store.open_existing("vm1").err().unwrap();
        assert!(e.to_string().contains("open in another process"), "{e}");
        // Listing points needs no lock.
        let listed = store.points("vm1").unwrap();
        assert_eq!(listed, vs.points());
        assert_eq!(listed[0].kind, "initial");
        drop(vs);
        drop(store.open_existing("vm1").unwrap());
        // No lock file for a replica that is not there.
        assert!(matches!(
            store.open_existing("nope"),
            Err(StoreError::NoReplica(_))
        ));
        assert!(matches!(
            store.points("nope"),
            Err(StoreError::NoReplica(_))
        ));
        assert!(!dir.path().join("nope.lock").exists());
    }

    #[test]
    fn incomplete_cycles_owner_and_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Retention::default()).unwrap();
        let mut vs = store.open_vm("vm1", "p1").unwrap();
        let primary = vec![vec![3u8; SIZE as usize]; 2];
        ship(&mut vs, 1, CycleKind::Initial, &primary, &[(0, 0), (1, 0)]).unwrap();
        // A manifest that promises more than arrived: nothing applied, staging kept.
        vs.begin(2, CycleKind::Delta, &disks()).unwrap();
        let c = Chunk::pack(2, 0, 65536, &[5u8; G as usize], true);
        vs.stage(&c).unwrap();
        let before = read_images(&vs);
        assert!(matches!(
            vs.commit(2, 2, 0),
            Err(StoreError::Incomplete {
                have: 1,
                want: 2,
                ..
            })
        ));
        assert!(read_images(&vs) == before);
        // Resume: the staged chunk is reported, so the shipper skips it.
        drop(vs);
        let mut vs = store.open_vm("vm1", "p1").unwrap();
        assert_eq!(
            vs.begin(2, CycleKind::Delta, &disks()).unwrap(),
            vec![StagedChunk {
                id: c.id(),
                len: c.len,
                checksum: c.checksum
            }]
        );
        // Out of range, corrupt, wrong disk: refused.
        let mut far = Chunk::pack(2, 0, SIZE - 4096, &[1u8; 8192], true);
        assert!(matches!(vs.stage(&far), Err(StoreError::BadChunk { .. })));
        far.disk = 9;
        assert!(matches!(vs.stage(&far), Err(StoreError::BadChunk { .. })));
        let mut bad = Chunk::pack(2, 0, 0, &[1u8; 4096], false);
        bad.payload[0] = 2;
        assert!(matches!(vs.stage(&bad), Err(StoreError::BadChunk { .. })));
        assert!(matches!(
            vs.begin(1, CycleKind::Delta, &disks()),
            Err(StoreError::OldCycle { .. })
        ));
        let mut other = disks();
        other[0].size += 4096;
        assert!(matches!(
            vs.begin(3, CycleKind::Delta, &other),
            Err(StoreError::DiskMismatch { .. })
        ));
        drop(vs);
        assert!(matches!(
            store.open_vm("vm1", "p2"),
            Err(StoreError::NotOwner { .. })
        ));
        assert!(matches!(
            store.open_vm("../x", "p1"),
            Err(StoreError::Name { .. })
        ));
    }
}
