//! A replica's state file (`STORE/VM/state.json`): disks, lineage and its history, the last
//! cycle, the recovery points and the undo logs between them, and the cycle held in part.
//!
//! Every change is made on a clone, saved (temp, fsync, rename, fsync dir) and only then
//! swapped in: a save that fails (a full disk, an I/O error) leaves the state in memory as
//! it is on disk, so nothing is acknowledged that a restart would not know.
//!
//! Fields added after version 2 was released carry `#[serde(default)]` and stay inside
//! version 2 (a file without them reads as before, no version bump needed): the VM's `role`
//! on this site and its transitions (see [`Role`]), per-disk `image` paths outside the
//! store, `definition` (the VM definition the replica holds), `tests` (the test failovers,
//! which pin their points), operations' `excluded` disks, `ops` (what status needs: the
//! primary's interval and RPO limit, the cycle history) and points' `app_consistent`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmreplica_common::lineage::Lineage;
use vmreplica_common::wire::{
    CycleKind, DefinitionHash, LineagePoint, Receiving, Role as WireRole,
};
use vmreplica_common::{read_state, write_state, StateFileError};

use crate::rules::Replica;

pub(crate) const STATE_FORMAT: &str = "vmreplica-replica";
pub(crate) const STATE_VERSION: u32 = 2;

/// One recovery point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointInfo {
    pub cycle: u64,
    /// Seconds since the epoch when it was applied.
    pub applied_at: u64,
    pub kind: String,
    /// Bytes it costs: the undo log that leads to it (0 for the newest point).
    pub bytes: u64,
    /// The guest's filesystems were frozen through its agent for it: it mounts without
    /// journal recovery.
    #[serde(default)]
    pub app_consistent: bool,
}

/// An undo log turning point `from` back into point `to` (`to` < `from`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct UndoRef {
    pub from: u64,
    pub to: u64,
    pub file: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct DiskMeta {
    pub name: String,
    pub size: u64,
    pub granularity: u32,
    /// The image, when it is not `STORE/VM/disks/NAME.img` (an old primary's own images,
    /// adopted as the replica for reverse replication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
}

/// What this site is for the VM. Every transition is saved (clone, save, swap) before it is
/// acted on: from `FailedOver` on, no cycle of the old primary is taken.
///
/// - `Replica` takes cycles from its owner (the only role before failover existed);
/// - `FailedOver`: an unplanned failover made this site the primary (its tracker serves the
///   images), not committed yet: cancel returns to `Replica` at the point it left;
/// - `Primary`: a committed or planned failover: this site is the primary;
/// - `ReversePending`: this site's images (a former primary's, or a primary that gave way)
///   wait for the reverse cycle from the new primary, which continues `parent`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Role {
    #[default]
    Replica,
    FailedOver(FailedOver),
    Primary(Primary),
    ReversePending(ReversePending),
}

/// How far an unplanned failover got (each step is redone idempotently after a crash).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverStep {
    /// The role is saved: cycles are refused; the images are being rolled back.
    Begun,
    /// The images hold the failover point (a redo log, if any, leads back to `from`).
    RolledBack,
    /// The tracker serves the images, its baseline frozen.
    Serving,
    /// A cancel is putting the images back to `from`.
    Cancelling,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedOver {
    /// The new lineage, and the point it continues.
    pub lineage: Lineage,
    pub parent: SpanParent,
    /// The point failed over to, and the newest point before (what a cancel returns to).
    pub point: u64,
    pub from: u64,
    /// Seconds since the epoch.
    pub since: u64,
    pub step: FailoverStep,
    /// The redo log (`failover/redo.log`), when older points were rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redo: Option<String>,
    /// Start the VM once the disks are served (and a VM definition to use, if not the
    /// shipped one).
    #[serde(default)]
    pub start: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<PathBuf>,
}

/// Where reverse replication goes: the old primary site's applier (`back`), and how that
/// site reaches this one (`here`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReverseTarget {
    pub back: vmreplica_common::wire::Endpoint,
    pub here: vmreplica_common::wire::Endpoint,
    pub interval: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Primary {
    pub lineage: Lineage,
    pub parent: SpanParent,
    /// The recovery point an unplanned failover went to (what status calls its point before
    /// and after the commit: `parent` may be a later, empty cycle with the same contents).
    /// None after a planned failover (its point is `parent`), and in records saved before
    /// this field (added within version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<u64>,
    pub since: u64,
    /// Set once reverse replication is asked for (a planned failover, or `reverse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseTarget>,
    #[serde(default)]
    pub start: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReversePending {
    pub parent: SpanParent,
    /// This site's divergent ranges (`failover/divergent.json`), sent to the new primary's
    /// shipper, which ships them with its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergent: Option<String>,
    /// The state dir of the tracker that served these images: no reverse cycle lands while
    /// it still runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<PathBuf>,
    pub since: u64,
    /// The primary this record was before it gave way (a planned failover away from it),
    /// restored if the promote on the other site fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<Primary>>,
    /// When (seconds since the epoch) the planned failover that made this adoption gave
    /// up (`--timeout`) and withdrew it: the record is kept (its history, its divergent
    /// ranges) but takes no cycle, until the command, run again, adopts the images anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn: Option<u64>,
}

/// Where a span of cycles came from: the point it continues from in another lineage (a
/// failover), or in the same one after a gap (a resync).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpanParent {
    pub lineage: Lineage,
    pub cycle: u64,
}

/// Cycles `first_cycle..=last_cycle` of one lineage, received one after another.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Span {
    pub lineage: Lineage,
    pub first_cycle: u64,
    pub last_cycle: u64,
    pub parent: Option<SpanParent>,
}

/// The cycle held in part: received (some of it written into the images behind its undo
/// log), not yet a point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ReceivingState {
    pub lineage: Lineage,
    pub cycle: u64,
    pub kind: String,
    /// The current receive attempt.
    pub epoch: u64,
    /// The freeze it is (the tracker's id).
    #[serde(default)]
    pub freeze: u64,
    /// Its undo log, in `undo/`.
    pub log: String,
    /// Whether old contents are captured (false: an initial copy into an empty replica,
    /// which has no earlier point to keep).
    pub capture: bool,
    /// What the cycle said of itself: application-consistent, when it was frozen; when
    /// receiving began (ms since the epoch).
    #[serde(default)]
    pub app_consistent: bool,
    #[serde(default)]
    pub frozen_at: u64,
    #[serde(default)]
    pub started_ms: u64,
}

/// A disk the primary serves without replicating it (swap, scratch): failover recreates it
/// blank and sparse, of this size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExcludedDisk {
    pub name: String,
    pub size: u64,
}

/// What status needs of a replica (all learnt from the cycles' metadata).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpsState {
    /// The primary's interval in seconds (None: unknown; `u64::MAX`: continuous).
    #[serde(default)]
    pub interval: Option<u64>,
    #[serde(default)]
    pub rpo_limit: Option<u64>,
    /// When the last cycle applied was frozen (seconds since the epoch; 0: unknown).
    #[serde(default)]
    pub last_frozen_at: u64,
    #[serde(default)]
    pub history: vmreplica_ops::history::History,
}

/// The VM definition the replica holds (`definition.toml` beside the state, when
/// `has_definition`), as the primary shipped it, with the primary site's reverse target.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DefinitionInfo {
    pub hash: DefinitionHash,
    pub has_definition: bool,
    /// The primary's `[reverse]` (its own applier), as its shipper configuration says.
    pub reverse: Option<vmreplica_common::wire::ReverseTarget>,
    /// Seconds since the epoch when it was stored.
    pub stored_at: u64,
}

/// A test failover: point `point` served over NBD with a scratch overlay in `tests/POINT/`.
/// Persisted, so an applier restart serves it again (with its scratch writes) and retention
/// never drops its point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestPin {
    pub point: u64,
    /// Seconds since the epoch when it started.
    pub created_at: u64,
    /// Also served on this TCP address (with TLS, admitting these client names).
    #[serde(default)]
    pub tcp: Option<String>,
    #[serde(default)]
    pub tls_allow: Vec<String>,
    /// The VM was booted from the shipped definition (`tests/POINT/vm/`).
    #[serde(default)]
    pub started: bool,
    /// Most bytes each scratch file may hold.
    #[serde(default)]
    pub scratch_limit: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VmState {
    pub owner: String,
    pub disks: Vec<DiskMeta>,
    /// The lineage of the replica's points (None until the initial copy commits).
    pub lineage: Option<Lineage>,
    pub history: Vec<Span>,
    /// The last cycle applied (a point, or an empty cycle after one), and its freeze id.
    pub last_cycle: u64,
    #[serde(default)]
    pub last_freeze: u64,
    /// The last epoch handed out (receive attempts are numbered across all cycles).
    pub epoch: u64,
    pub receiving: Option<ReceivingState>,
    pub points: Vec<PointInfo>,
    pub undo: Vec<UndoRef>,
    #[serde(default)]
    pub definition: Option<DefinitionInfo>,
    #[serde(default)]
    pub tests: Vec<TestPin>,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub excluded: Vec<ExcludedDisk>,
    #[serde(default)]
    pub ops: OpsState,
}

/// The disks a failover must recreate blank and sparse (name, size): served by the primary's
/// tracker but not replicated. F2 creates them where a failover opens the VM's disks (see
/// [`crate::store::VmStore::create_excluded_images`]).
pub fn excluded_disks(state: &VmState) -> Vec<(String, u64)> {
    state
        .excluded
        .iter()
        .map(|d| (d.name.clone(), d.size))
        .collect()
}

impl VmState {
    pub fn new(owner: &str) -> VmState {
        VmState {
            owner: owner.to_string(),
            disks: Vec::new(),
            lineage: None,
            history: Vec::new(),
            last_cycle: 0,
            last_freeze: 0,
            epoch: 0,
            receiving: None,
            points: Vec::new(),
            undo: Vec::new(),
            definition: None,
            tests: Vec::new(),
            role: Role::Replica,
            excluded: Vec::new(),
            ops: OpsState::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Option<VmState>, StateFileError> {
        read_state(path, STATE_FORMAT, STATE_VERSION)
    }

    pub fn save(&self, path: &Path) -> Result<(), StateFileError> {
        write_state(path, STATE_FORMAT, STATE_VERSION, self)
    }

    pub fn receiving_info(&self) -> Option<Receiving> {
        self.receiving.as_ref().map(|r| Receiving {
            lineage: r.lineage,
            cycle: r.cycle,
            kind: CycleKind::from_name(&r.kind).unwrap_or(CycleKind::Delta),
            freeze: r.freeze,
        })
    }

    /// What the lineage rules need.
    pub fn replica(&self) -> Replica {
        Replica {
            lineage: self.lineage,
            last_cycle: self.last_cycle,
            last_freeze: self.last_freeze,
            has_points: !self.points.is_empty(),
            receiving: self.receiving_info(),
            role: self.role.wire(),
            paused: self.ops.history.paused_since(),
        }
    }

    /// The newest point's cycle (0: none).
    pub fn newest_point(&self) -> u64 {
        self.points.last().map_or(0, |p| p.cycle)
    }

    /// Records that cycle `cycle` of `lineage` (of `kind`) was applied: the lineage, its
    /// history (a resync, or a first cycle, opens a new span), the last cycle.
    pub fn record_cycle(&mut self, lineage: Lineage, cycle: u64, kind: CycleKind) {
        let continues = self.history.last().is_some_and(|s| {
            s.lineage == lineage && s.last_cycle + 1 == cycle && kind == CycleKind::Delta
        });
        if continues {
            if let Some(s) = self.history.last_mut() {
                s.last_cycle = cycle;
            }
        } else {
            let parent = match (self.lineage, self.last_cycle) {
                (Some(l), last) if last > 0 && kind != CycleKind::Initial => Some(SpanParent {
                    lineage: l,
                    cycle: last,
                }),
                _ => None,
            };
            self.history.push(Span {
                lineage,
                first_cycle: cycle,
                last_cycle: cycle,
                parent,
            });
        }
        self.lineage = Some(lineage);
        self.last_cycle = cycle;
    }

    /// Whether this site takes cycles into its images as a replica (not a primary).
    pub fn is_replica(&self) -> bool {
        matches!(self.role, Role::Replica | Role::ReversePending(_))
    }

    /// Sizes of points: each costs the undo log that leads back to it.
    pub fn refresh_point_sizes(&mut self) {
        for p in &mut self.points {
            p.bytes = self
                .undo
                .iter()
                .find(|u| u.to == p.cycle)
                .map(|u| u.bytes)
                .unwrap_or(0);
        }
    }
}

impl SpanParent {
    pub fn point(&self) -> LineagePoint {
        LineagePoint {
            lineage: self.lineage,
            cycle: self.cycle,
        }
    }
}

impl Role {
    /// The role as a shipper is told it.
    pub fn wire(&self) -> WireRole {
        match self {
            Role::Replica => WireRole::Replica,
            Role::FailedOver(f) => WireRole::FailedOver {
                lineage: f.lineage,
                parent: f.parent.point(),
            },
            Role::Primary(p) => WireRole::Primary {
                lineage: p.lineage,
                parent: p.parent.point(),
            },
            Role::ReversePending(r) => WireRole::ReversePending {
                parent: r.parent.point(),
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Role::Replica => "replica",
            Role::FailedOver(_) => "failed-over",
            Role::Primary(_) => "primary",
            Role::ReversePending(_) => "reverse-pending",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_spans_follow_deltas_and_open_on_a_resync() {
        let a = Lineage([1; 16]);
        let mut s = VmState::new("p");
        s.record_cycle(a, 1, CycleKind::Initial);
        s.record_cycle(a, 2, CycleKind::Delta);
        s.record_cycle(a, 3, CycleKind::Delta);
        s.record_cycle(a, 9, CycleKind::Resync);
        s.record_cycle(a, 10, CycleKind::Delta);
        assert_eq!(
            s.history,
            vec![
                Span {
                    lineage: a,
                    first_cycle: 1,
                    last_cycle: 3,
                    parent: None
                },
                Span {
                    lineage: a,
                    first_cycle: 9,
                    last_cycle: 10,
                    parent: Some(SpanParent {
                        lineage: a,
                        cycle: 3
                    })
                },
            ]
        );
        assert_eq!((s.lineage, s.last_cycle), (Some(a), 10));
    }
}
