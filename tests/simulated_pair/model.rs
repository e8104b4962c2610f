//! The simulated disk, and the models in memory of the tracker and the replica store.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::Rng;
use vmreplica_applier::rules::{self, Decision, Replica};
use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::{Range, RangeSet};
use vmreplica_common::wire::{
    code, CycleKind, DefinitionHash, DiskInfo, LineagePoint, Receiving, Role, Tag,
};
use vmreplica_shipper::session::{Frozen, TrackerView};

/// Blocks of the simulated disk, and their size.
pub(crate) const BLOCKS: u64 = 24;
pub(crate) const B: u64 = 4096;

pub(crate) fn range_of(b: u64) -> Range {
    Range {
        disk: 0,
        offset: b * B,
        len: B,
    }
}

pub(crate) fn blocks_of(set: &RangeSet) -> Vec<u64> {
    set.iter()
        .flat_map(|r| (r.offset / B)..(r.end() / B))
        .collect()
}

pub(crate) type Disk = Vec<u64>;

/// The tracker: the guest's disk, dirty blocks, the frozen generation, the lineage.
#[derive(Clone)]
pub(crate) struct Tracker {
    pub(crate) lineage: Option<Lineage>,
    pub(crate) next_generation: u64,
    /// Generation, full, its blocks, the disk's contents at the freeze, the freeze's id.
    pub(crate) frozen: Option<(u64, bool, BTreeSet<u64>, Disk, u64)>,
    pub(crate) dirty: BTreeSet<u64>,
    pub(crate) resync_required: bool,
    /// `next_generation` when tracking was last lost: a full freeze made before that cannot
    /// clear `resync_required` (as the real tracker's `clear-resync` refuses).
    pub(crate) resync_since: u64,
    pub(crate) sealed: bool,
}

impl Tracker {
    /// Tracking is lost (a restored or lost state, an operator's forced lineage).
    pub(crate) fn raise_resync(&mut self) {
        self.resync_required = true;
        self.resync_since = self.next_generation;
    }

    pub(crate) fn view(&self) -> TrackerView {
        TrackerView {
            lineage: self.lineage,
            next_generation: self.next_generation,
            frozen: self.frozen.as_ref().map(|f| Frozen {
                generation: f.0,
                id: f.4,
                full: f.1,
                baseline: false,
            }),
            resync_required: self.resync_required,
            parent: None,
            sealed: self.sealed,
            disks: vec![DiskInfo {
                name: "sys".into(),
                size: BLOCKS * B,
                granularity: B as u32,
            }],
        }
    }
}

/// The replica store, as the real one behaves at the level of cycles.
#[derive(Clone, Default)]
pub(crate) struct Store {
    pub(crate) image: Disk,
    pub(crate) lineage: Option<Lineage>,
    pub(crate) last_cycle: u64,
    pub(crate) last_freeze: u64,
    /// Every committed cycle's contents (points, and empty cycles).
    pub(crate) cycles: BTreeMap<u64, Disk>,
    pub(crate) points: BTreeSet<u64>,
    pub(crate) epoch: u64,
    /// The cycle held in part: its identity, epoch, what it applied, the image before it.
    pub(crate) receiving: Option<(Receiving, u64, RangeSet, Disk)>,
    /// The VM definition it holds.
    pub(crate) definition: Option<DefinitionHash>,
    pub(crate) role: Role,
    /// The primary's pause it records (since).
    pub(crate) paused: Option<u64>,
}

impl Store {
    pub(crate) fn replica(&self) -> Replica {
        Replica {
            lineage: self.lineage,
            last_cycle: self.last_cycle,
            last_freeze: self.last_freeze,
            has_points: !self.points.is_empty(),
            receiving: self.receiving.as_ref().map(|r| r.0),
            role: self.role,
            paused: self.paused,
        }
    }

    /// A planned failover's promote (as `VmStore::promote` decides it): only a replica that
    /// holds exactly `(l, c)`; again for the same point, the same answer.
    pub(crate) fn promote(
        &mut self,
        l: Lineage,
        c: u64,
        rng: &mut StdRng,
    ) -> Result<Lineage, (u16, String)> {
        let asked = LineagePoint {
            lineage: l,
            cycle: c,
        };
        match self.role {
            Role::Primary { lineage, parent } if parent == asked => return Ok(lineage),
            Role::Replica if self.lineage == Some(l) && self.last_cycle == c => {}
            _ => return Err((code::FAILED_OVER, "not promoted".into())),
        }
        self.receiving = None;
        let lineage = Lineage(rng.gen());
        self.role = Role::Primary {
            lineage,
            parent: asked,
        };
        Ok(lineage)
    }

    pub(crate) fn start(
        &mut self,
        l: Lineage,
        c: u64,
        k: CycleKind,
        f: u64,
    ) -> Result<(u64, RangeSet), (u16, String)> {
        let d = rules::decide("vm1", &self.replica(), l, c, k, f, None)
            .map_err(|m| (code::LINEAGE, m))?;
        self.epoch += 1;
        let epoch = self.epoch;
        if d == Decision::Continue {
            let r = self.receiving.as_mut().expect("continue holds a cycle");
            r.1 = epoch;
            return Ok((epoch, r.2.clone()));
        }
        if let Some((_, _, _, before)) = self.receiving.take() {
            self.image = before; // rolled back
        }
        let r = Receiving {
            lineage: l,
            cycle: c,
            kind: k,
            freeze: f,
        };
        self.receiving = Some((r, epoch, RangeSet::new(), self.image.clone()));
        Ok((epoch, RangeSet::new()))
    }

    pub(crate) fn apply(&mut self, tag: Tag, block: u64, value: u64) -> Result<(), (u16, String)> {
        match self.receiving.as_mut() {
            Some((r, e, applied, _))
                if (r.lineage, r.cycle, *e) == (tag.lineage, tag.cycle, tag.epoch) =>
            {
                self.image[block as usize] = value;
                applied.insert_range(range_of(block));
                Ok(())
            }
            _ => Err((code::STALE, "stale".into())),
        }
    }

    pub(crate) fn commit(
        &mut self,
        tag: Tag,
        ranges: u64,
        bytes: u64,
        digest: u64,
        log: &mut Vec<(Lineage, u64, Disk)>,
    ) -> Result<(), (u16, String)> {
        let Some((r, e, applied, _)) = self.receiving.clone() else {
            return Err((code::STALE, "nothing received".into()));
        };
        if (r.lineage, r.cycle, e) != (tag.lineage, tag.cycle, tag.epoch) {
            return Err((code::STALE, "another attempt".into()));
        }
        if (applied.len() as u64, applied.bytes(), applied.digest()) != (ranges, bytes, digest) {
            return Err((code::INCOMPLETE, "incomplete".into()));
        }
        if r.kind == CycleKind::Delta {
            assert_eq!(
                (Some(r.lineage), r.cycle),
                (self.lineage, self.last_cycle + 1),
                "the replica committed a delta that does not follow its last cycle"
            );
        }
        self.receiving = None;
        self.lineage = Some(r.lineage);
        self.last_cycle = r.cycle;
        self.last_freeze = r.freeze;
        self.cycles.insert(r.cycle, self.image.clone());
        if !applied.is_empty() || self.points.is_empty() {
            if r.kind == CycleKind::Initial {
                self.points.clear();
            }
            self.points.insert(r.cycle);
        }
        log.push((r.lineage, r.cycle, self.image.clone()));
        Ok(())
    }
}
