//! The tracker's state file (`tracker.json`): what it holds, and what a freeze reports.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmreplica_common::lineage::Lineage;
use vmreplica_common::write_state;

use super::TrackerError;

pub const STATE_FILE: &str = "tracker.json";
pub(crate) const STATE_FORMAT: &str = "vmreplica-tracker";
/// Version 2 added `lineage`; version 1 files are migrated (lineage None) when opened.
pub(crate) const STATE_VERSION: u32 = 2;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskState {
    pub name: String,
    pub image: PathBuf,
    pub size: u64,
    pub active_slot: usize,
    /// Tracking was lost: the shipper must resync this disk by comparing checksums.
    pub resync_required: bool,
    /// `next_generation` when tracking was last lost: a resync of a generation frozen
    /// before that cannot clear `resync_required`.
    #[serde(default)]
    pub resync_since: u64,
    /// Served but not tracked (added within version 2: absent reads as false).
    #[serde(default)]
    pub excluded: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrozenState {
    pub generation: u64,
    /// Which freeze this is (random): a generation number can come again after an older
    /// state directory is restored; the replica records the id of what it applied.
    #[serde(default)]
    pub id: u64,
    /// Seconds since the Unix epoch.
    pub frozen_at: u64,
    /// Every block was frozen (initial sync or resync), not just the changed ones.
    #[serde(default)]
    pub full: bool,
    /// A failover's baseline: a full freeze that is never shipped; its copy-on-write store
    /// keeps the failover point's contents of every block written since, so the failover can
    /// be cancelled. Released without a replica's proof; dropped (not abandoned: no resync)
    /// if its copy-on-write fails.
    #[serde(default)]
    pub baseline: bool,
}

/// The point a lineage continues from: a failover's new lineage starts at `cycle` of
/// `lineage` (its parent), with the same contents.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Parent {
    pub lineage: Lineage,
    pub cycle: u64,
}

/// Fields added inside version 2 carry `#[serde(default)]` (a file without them reads as
/// before); an unknown version is refused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The lineage the generations belong to (set by the shipper before the first initial
    /// copy; None after a migration from version 1, or before the first copy).
    #[serde(default)]
    pub lineage: Option<Lineage>,
    /// Where the lineage continues from (a failover's parent point), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// Writes are refused (planned failover): kept across restarts until unsealed.
    #[serde(default)]
    pub sealed: bool,
    pub clean: bool,
    pub granularity: u32,
    pub next_generation: u64,
    pub frozen: Option<FrozenState>,
    pub disks: Vec<DiskState>,
    /// Raised at every open and freeze, saved before the images are stamped with it (see
    /// [`crate::epoch`]). Added within version 2 (absent reads as 0).
    #[serde(default)]
    pub epoch: u64,
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
    /// The freeze's id (see [`FrozenState::id`]).
    #[serde(default)]
    pub id: u64,
    pub frozen_at: u64,
    /// A full freeze (every block), for initial sync or resync.
    #[serde(default)]
    pub full: bool,
    /// A failover's baseline (never shipped; see [`FrozenState::baseline`]).
    #[serde(default)]
    pub baseline: bool,
    pub disks: Vec<FrozenDisk>,
}

pub(crate) fn save_state(dir: &Path, state: &State) -> Result<(), TrackerError> {
    write_state(&dir.join(STATE_FILE), STATE_FORMAT, STATE_VERSION, state)?;
    Ok(())
}
