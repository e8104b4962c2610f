//! What the tracker's operations fail with.

use std::io;
use std::path::PathBuf;

use thiserror::Error;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::{NameError, StateFileError};

use crate::tracking::TrackingError;

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
    #[error("this tracker serves no disk named {0:?}")]
    NoSuchDisk(String),
    #[error("disk {name}: image {path} is in use by another vmreplica tracker; one tracker serves an image")]
    ImageTaken { name: String, path: PathBuf },
    #[error("disk {name}: image {path} is open for writing by another process (a running VM, qemu-nbd, qemu-img?); stop it, or point it at the tracker's socket instead of the file")]
    ImageInUse { name: String, path: PathBuf },
    #[error("disks {first} and {second} are the same image ({path}) under two names")]
    SameImage {
        first: String,
        second: String,
        path: PathBuf,
    },
    #[error("--exclude {0}: no --disk of that name")]
    UnknownExcluded(String),
    #[error("every disk is excluded: nothing would be replicated")]
    AllExcluded,
    #[error(
        "generation {generation} is frozen with disk {disk} {was}: start the tracker with the \
         disks excluded as before until the shipper has shipped it (or `ctl merge {generation}`)"
    )]
    ExclusionWhileFrozen {
        generation: u64,
        disk: String,
        was: &'static str,
    },
    #[error("generation {0} is frozen: the lineage cannot change until it is released or merged")]
    LineageWhileFrozen(u64),
    #[error(
        "this tracker's state belongs to lineage {have}, not {given}: refusing to change it \
         (force it only if the replica of lineage {given} is the one to follow)"
    )]
    OtherLineage { have: Lineage, given: Lineage },
    #[error(
        "generation {generation} was not released: {why}. Releasing a generation the replica \
         does not hold loses its changes; merge it instead (or force the release if you know \
         the replica holds it)"
    )]
    Unproven { generation: u64, why: String },
    #[error("disk {disk}: range {offset}+{len} is beyond its end ({size} bytes)")]
    BadRange {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error(
        "generation {0} is a failover's baseline (it keeps the failover point so the failover \
         can be cancelled; it is never shipped): release it by committing the failover"
    )]
    Baseline(u64),
}
