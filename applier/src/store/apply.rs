//! A cycle's life in the store: started (or continued) when the shipper begins it, committed
//! when its manifest proves it complete, rolled back from its undo log otherwise.
//!
//! Commit order: every write done and the images fdatasynced (the pipeline's last mark), the
//! applied set checked against the manifest, the undo log finished (trailer, index, fsync),
//! then the state records the point (clone, save, swap), and only then is the cycle
//! acknowledged. Rollback order: the old contents put back from the undo log, images
//! fsynced, views told, the state forgets the cycle, the log is removed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::RangeSet;
use vmreplica_common::sparse::punch_hole;
use vmreplica_common::validate_name;
use vmreplica_common::wire::{CycleKind, CycleMeta, DiskInfo, LineagePoint};

use super::receive::{JobSender, Partial, Running};
use super::state::{DiskMeta, ExcludedDisk, PointInfo, ReceivingState, UndoRef, VmState};
use super::{StoreError, VmStore};
use crate::rules::{self, Decision};
use crate::undo::{Enc, Header, LogIndex, UndoLog};

/// Most disks one replica takes (a VM has a few; a peer naming more is refused).
pub const MAX_DISKS: usize = 256;

/// A cycle started or continued.
#[derive(Debug)]
pub struct Started {
    /// The epoch of this receive attempt.
    pub epoch: u64,
    /// What the cycle already holds durably (the shipper skips it).
    pub applied: RangeSet,
    pub continued: bool,
}

/// What a commit made of the cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// A new recovery point.
    Point,
    /// The cycle changed nothing: no new point, but the replica is at this cycle.
    Empty,
}

pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records what a cycle's metadata tells of the replica (a shipper that sends none leaves
/// what is known).
fn note_meta(next: &mut VmState, meta: &CycleMeta) {
    if *meta == CycleMeta::default() {
        return;
    }
    next.excluded = meta
        .excluded
        .iter()
        .map(|(name, size)| ExcludedDisk {
            name: name.clone(),
            size: *size,
        })
        .collect();
    if meta.interval != 0 {
        next.ops.interval = Some(meta.interval);
    }
    if meta.rpo_limit != 0 {
        next.ops.rpo_limit = Some(meta.rpo_limit);
    }
}

impl VmStore {
    /// Starts cycle `cycle` of `lineage` (or continues it, if it is the one held in part):
    /// checks the lineage rules, rolls back a different cycle held in part, hands out a new
    /// epoch. A refusal changes nothing.
    pub fn start_cycle(
        &mut self,
        lineage: Lineage,
        cycle: u64,
        kind: CycleKind,
        freeze: u64,
        disks: &[DiskInfo],
        parent: Option<LineagePoint>,
    ) -> Result<Started, StoreError> {
        let meta = CycleMeta::default();
        self.start_cycle_with(lineage, cycle, kind, freeze, disks, parent, &meta)
    }

    /// [`VmStore::start_cycle`] with what the cycle says of itself (`meta`): recorded with
    /// the cycle (app-consistent, frozen at) and the replica (excluded disks, the primary's
    /// interval and RPO limit, for status).
    #[allow(clippy::too_many_arguments)] // a BeginCycle's fields, as the wire has them
    pub fn start_cycle_with(
        &mut self,
        lineage: Lineage,
        cycle: u64,
        kind: CycleKind,
        freeze: u64,
        disks: &[DiskInfo],
        parent: Option<LineagePoint>,
        meta: &CycleMeta,
    ) -> Result<Started, StoreError> {
        self.settle()?;
        if let super::state::Role::ReversePending(r) = &self.state.role {
            if let Some(at) = r.withdrawn {
                return Err(StoreError::Refused(format!(
                    "VM {}: this site's adoption of its own images as the replica was \
                     withdrawn (at {at}, seconds since the epoch) when the planned failover \
                     that made it did not complete: no cycle lands in them. Run `vmreplica \
                     failover planned {}` on this site again (it adopts them anew and \
                     finishes); nothing on the replica was changed",
                    self.vm(),
                    self.vm()
                )));
            }
        }
        let decision = rules::decide(
            self.vm(),
            &self.state.replica(),
            lineage,
            cycle,
            kind,
            freeze,
            parent,
        )
        .map_err(StoreError::Refused)?;
        if kind == CycleKind::Reverse {
            self.check_reverse_ready()?;
        }
        self.hold_images()?;
        self.register_disks(disks)?;
        let epoch = self.state.epoch + 1;
        if decision == Decision::Continue {
            let mut next = self.state.clone();
            note_meta(&mut next, meta);
            if let Some(r) = next.receiving.as_mut() {
                r.epoch = epoch;
                r.app_consistent = meta.app_consistent;
                r.frozen_at = meta.frozen_at;
            }
            next.epoch = epoch;
            self.commit_state(next)?;
            let applied = match &self.running {
                Some(run) => run.epoch(epoch).map_err(StoreError::Receive),
                None => Err(StoreError::Receive(super::Failure::stopped(self.vm()))),
            };
            let applied = match applied {
                Ok(a) => a,
                Err(_) => {
                    // Not running (a restart) or broken: go on from what is on disk.
                    let mut p = self.take_partial()?;
                    p.epoch = epoch;
                    let a = p.applied.clone();
                    self.run(p);
                    a
                }
            };
            tracing::info!(vm = %self.vm(), cycle, epoch, applied_bytes = applied.bytes(), "cycle resumed");
            return Ok(Started {
                epoch,
                applied,
                continued: true,
            });
        }
        if self.state.receiving.is_some() {
            self.roll_back()?;
        }
        let capture = !self.state.points.is_empty();
        let file = format!("{cycle}.undo");
        let path = self.undo_path(&file);
        let udir = self.dir().join("undo");
        crate::undo::log::create_dirs(&udir).map_err(self.io(&udir))?;
        let log = UndoLog::create(
            &path,
            Header {
                from: cycle,
                to: self.state.newest_point(),
                lineage: Some(lineage),
            },
        )
        .map_err(self.io(&path))?;
        let mut next = self.state.clone();
        next.epoch = epoch;
        next.receiving = Some(ReceivingState {
            lineage,
            cycle,
            kind: kind.name().to_string(),
            epoch,
            freeze,
            log: file,
            capture,
            app_consistent: meta.app_consistent,
            frozen_at: meta.frozen_at,
            started_ms: now_ms(),
        });
        note_meta(&mut next, meta);
        if let Err(e) = self.commit_state(next) {
            if !self.unsynced() {
                let _ = crate::undo::log::remove(&path);
            }
            return Err(e);
        }
        let index = Arc::new(
            LogIndex::open(cycle, self.state.newest_point(), &path, []).map_err(self.io(&path))?,
        );
        self.shared
            .chain
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .receiving = Some(Arc::clone(&index));
        self.run(Partial {
            lineage,
            cycle,
            kind,
            epoch,
            capture,
            log,
            applied: RangeSet::new(),
            index,
        });
        tracing::info!(vm = %self.vm(), cycle, epoch, kind = kind.name(), capture, "cycle started");
        Ok(Started {
            epoch,
            applied: RangeSet::new(),
            continued: false,
        })
    }

    fn run(&mut self, p: Partial) {
        let dir = self.dir().to_path_buf();
        self.running = Some(Running::start(
            self.vm(),
            dir,
            p,
            self.shared.images(),
            Arc::clone(&self.buffers),
        ));
    }

    /// Buffers verified chunks are unpacked into (they come back once written).
    pub(crate) fn buffers(&self) -> Arc<crate::image::Buffers> {
        Arc::clone(&self.buffers)
    }

    /// Where data streams hand the chunks of the cycle being received.
    pub fn sender(&self) -> Option<JobSender> {
        self.running.as_ref().map(|r| r.sender())
    }

    /// The cycle held in part, its pipeline stopped (or, if that failed, reopened from what
    /// is durable).
    fn take_partial(&mut self) -> Result<Partial, StoreError> {
        if let Some(run) = self.running.take() {
            match run.stop() {
                Ok(p) => return Ok(p),
                Err(f) => {
                    tracing::warn!(vm = %self.vm(), "reopening the cycle from disk after: {f}")
                }
            }
        }
        if let Some(p) = self.partial.take() {
            return Ok(p);
        }
        // Reopened from the undo log: what it holds durably.
        self.load_chain()?;
        self.partial
            .take()
            .ok_or_else(|| StoreError::Receive(super::Failure::stopped(self.vm())))
    }

    /// Registers the cycle's disks (first cycle: creates the images) or checks them.
    fn register_disks(&mut self, disks: &[DiskInfo]) -> Result<(), StoreError> {
        let given: Vec<DiskMeta> = disks
            .iter()
            .map(|d| DiskMeta {
                name: d.name.clone(),
                size: d.size,
                granularity: d.granularity,
                image: None,
            })
            .collect();
        if given.len() > MAX_DISKS {
            return Err(StoreError::Refused(format!(
                "VM {}: the cycle names {} disks, more than the {MAX_DISKS} a replica takes; \
                 nothing on the replica was changed",
                self.vm(),
                given.len()
            )));
        }
        for d in &given {
            validate_name(&d.name).map_err(|source| StoreError::Name {
                name: d.name.clone(),
                source,
            })?;
        }
        let same = |a: &DiskMeta, b: &DiskMeta| {
            (&a.name, a.size, a.granularity) == (&b.name, b.size, b.granularity)
        };
        if self.state.disks.len() == given.len()
            && self.state.disks.iter().zip(&given).all(|(a, b)| same(a, b))
        {
            return Ok(());
        }
        if !self.state.disks.is_empty() || given.is_empty() {
            let show =
                |d: &[DiskMeta]| d.iter().map(|d| format!("{}:{}", d.name, d.size)).collect();
            return Err(StoreError::DiskMismatch {
                vm: self.vm().to_string(),
                given: show(&given),
                have: show(&self.state.disks),
            });
        }
        let dir = self.dir().to_path_buf();
        crate::undo::log::create_dirs(&dir).map_err(self.io(&dir))?;
        let mut next = self.state.clone();
        next.disks = given;
        let old = std::mem::replace(&mut self.state.disks, next.disks.clone());
        let opened = self.open_images(true);
        self.state.disks = old;
        opened?;
        self.commit_state(next)
    }

    /// Makes what the cycle being received wrote durable; what it holds applied.
    pub fn applied(&mut self) -> Result<RangeSet, StoreError> {
        match &self.running {
            Some(r) => r.sync().map_err(StoreError::Receive),
            None => Ok(self
                .partial
                .as_ref()
                .map(|p| p.applied.clone())
                .unwrap_or_default()),
        }
    }

    /// The manifest of cycle `cycle` (attempt `epoch`) arrived: if what is applied is what
    /// it lists, the cycle becomes a point (or, if it changed nothing, the replica's last
    /// cycle without a new point). Otherwise it stays held in part.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &mut self,
        lineage: Lineage,
        cycle: u64,
        epoch: u64,
        ranges: u64,
        bytes: u64,
        digest: u64,
    ) -> Result<Committed, StoreError> {
        self.settle()?;
        let matches = self
            .state
            .receiving
            .as_ref()
            .is_some_and(|r| r.lineage == lineage && r.cycle == cycle && r.epoch == epoch);
        if !matches {
            return Err(StoreError::NoSuchCycle {
                vm: self.vm().to_string(),
                cycle,
                epoch,
            });
        }
        tracing::info!(vm = %self.vm(), cycle, "cycle received: committing");
        let applied = self.applied()?;
        if applied.len() as u64 != ranges || applied.bytes() != bytes || applied.digest() != digest
        {
            return Err(StoreError::Incomplete {
                vm: self.vm().to_string(),
                cycle,
                have_ranges: applied.len() as u64,
                have_bytes: applied.bytes(),
                want_ranges: ranges,
                want_bytes: bytes,
            });
        }
        let p = self.take_partial()?;
        match self.finish(p, now()) {
            Ok(c) => Ok(c),
            Err(e) => {
                // The state still holds the cycle in part: reopen it from disk (after a save
                // that was maybe made, the next operation settles the store instead: the
                // finished log must not be reopened as a log in progress, cutting its trailer).
                self.partial = None;
                if !self.unsynced() {
                    let _ = self.load_chain();
                }
                Err(e)
            }
        }
    }

    fn finish(&mut self, p: Partial, at: u64) -> Result<Committed, StoreError> {
        let Partial {
            lineage,
            cycle,
            kind,
            capture,
            log,
            applied,
            index,
            ..
        } = p;
        let path = log.path().to_path_buf();
        let file = self
            .state
            .receiving
            .as_ref()
            .map(|r| r.log.clone())
            .unwrap_or_default();
        let mut next = self.state.clone();
        let prev = next.newest_point();
        next.last_freeze = next.receiving.as_ref().map_or(0, |r| r.freeze);
        let (app_consistent, frozen_at, started_ms) =
            next.receiving.as_ref().map_or((false, 0, 0), |r| {
                (r.app_consistent, r.frozen_at, r.started_ms)
            });
        next.receiving = None;
        next.ops.last_frozen_at = frozen_at;
        next.ops
            .history
            .record(vmreplica_ops::history::CycleRecord {
                cycle,
                kind: kind.name().to_string(),
                frozen_at,
                started_ms,
                applied_ms: (at * 1000).max(now_ms()),
                bytes: applied.bytes(),
                wire_bytes: 0,
                app_consistent,
            });
        next.record_cycle(lineage, cycle, kind);
        let reversed = kind == CycleKind::Reverse;
        let divergent = match &next.role {
            super::state::Role::ReversePending(r) if reversed => r.divergent.clone(),
            _ => None,
        };
        if reversed {
            // The reverse cycle landed: this site is the new primary's replica.
            next.role = super::state::Role::Replica;
        }
        // A cycle is empty only if it wrote nothing in any attempt: an attempt cut short
        // after its image writes but before they were marked applied leaves captured entries
        // (and changed images) that a later attempt's plan no longer sends.
        let empty = applied.is_empty() && log.entries().is_empty() && !next.points.is_empty();
        let keeps_log = capture && !empty;
        if empty {
            drop(log);
        } else {
            // The last mark synced what this attempt wrote; what an earlier attempt wrote
            // without a mark is made durable here, before a point says it is there.
            for (img, d) in self.shared.images().iter().zip(&self.state.disks) {
                img.file
                    .sync_data()
                    .map_err(self.io(&self.image_path(&d.name)))?;
            }
            if keeps_log {
                let size = log.finish().map_err(self.io(&path))?;
                next.undo.push(UndoRef {
                    from: cycle,
                    to: prev,
                    file,
                    bytes: size,
                });
            } else {
                drop(log);
            }
            next.points.push(PointInfo {
                cycle,
                applied_at: at,
                kind: kind.name().to_string(),
                bytes: 0,
                app_consistent,
            });
            if kind == CycleKind::Initial {
                // Nothing before an initial copy can be rebuilt: it starts the history afresh.
                next.points.retain(|p| p.cycle == cycle);
                next.undo.clear();
            }
            next.refresh_point_sizes();
        }
        self.commit_state(next)?;
        {
            let mut chain = self.shared.chain.write().unwrap_or_else(|e| e.into_inner());
            chain.receiving = None;
            if keeps_log {
                chain.logs.push(index);
            }
        }
        if !keeps_log {
            crate::undo::log::remove(&path).map_err(self.io(&path))?;
        }
        if let Some(f) = divergent {
            let p = self.dir().join("failover").join(f);
            if let Err(e) = crate::undo::log::remove(&p) {
                tracing::warn!(vm = %self.vm(), "{e} (left behind, harmless)");
            }
        }
        if reversed {
            tracing::info!(vm = %self.vm(), cycle, %lineage, "the reverse cycle landed: this site replicates the new primary");
        }
        tracing::info!(
            vm = %self.vm(),
            cycle,
            kind = kind.name(),
            applied_mib = applied.bytes() >> 20,
            point = !empty,
            "cycle applied"
        );
        if let Err(e) = self.retain(at) {
            tracing::warn!(vm = %self.vm(), "retention: {e} (it is tried again after the next cycle)");
        }
        // Between cycles the VM holds no chunk buffers: after an initial copy's whole-MiB
        // chunks, 96 kept huge pages would be 192 MiB held by an idle VM.
        self.buffers.clear();
        Ok(if empty {
            Committed::Empty
        } else {
            Committed::Point
        })
    }

    /// Rolls the cycle held in part back from its undo log: the replica is the last point
    /// again. False if no cycle was held in part.
    pub fn roll_back(&mut self) -> Result<bool, StoreError> {
        self.settle()?;
        if self.state.receiving.is_none() {
            return Ok(false);
        }
        let mut p = self.take_partial()?;
        let cycle = p.cycle;
        tracing::warn!(vm = %self.vm(), cycle, "rolling back the cycle held in part");
        let path = p.log.path().to_path_buf();
        if p.log.sync().is_err() {
            // Its tail is unknown: what is durable is what the file holds.
            drop(p);
            self.partial = None;
            self.load_chain()?;
            p = self.partial.take().expect("loaded above");
        }
        // From here on the images lose what the cycle wrote: the log must say so before,
        // or a restart (or a failed state save) would resume the cycle skipping it.
        p.log.reset_applied().map_err(self.io(&path))?;
        p.applied = RangeSet::new();
        let images = self.shared.images();
        if p.capture {
            let f = std::fs::File::open(&path).map_err(self.io(&path))?;
            let mut buf = Vec::new();
            for e in p.log.entries() {
                let img = images
                    .get(e.disk as usize)
                    .ok_or_else(|| StoreError::BadChunk {
                        vm: self.vm().to_string(),
                        reason: format!("undo log {}: no disk {}", path.display(), e.disk),
                    })?;
                let ip = self.image_path(&self.state.disks[e.disk as usize].name);
                if e.enc == Enc::Zero {
                    punch_hole(&img.file, e.offset, u64::from(e.len)).map_err(self.io(&ip))?;
                    continue;
                }
                buf.resize(e.len as usize, 0);
                crate::undo::log::read_entry(&f, e, e.offset, e.end(), &mut buf)
                    .map_err(self.io(&path))?;
                std::os::unix::fs::FileExt::write_all_at(&img.file, &buf, e.offset)
                    .map_err(self.io(&ip))?;
            }
        } else {
            // An initial copy into an empty replica: there was nothing to keep.
            for (img, d) in images.iter().zip(&self.state.disks) {
                let ip = self.image_path(&d.name);
                img.file.set_len(0).map_err(self.io(&ip))?;
                img.file.set_len(d.size).map_err(self.io(&ip))?;
            }
        }
        for (img, d) in images.iter().zip(&self.state.disks) {
            img.file
                .sync_all()
                .map_err(self.io(&self.image_path(&d.name)))?;
        }
        self.shared.shrinks.fetch_add(1, Ordering::AcqRel);
        let mut next = self.state.clone();
        next.receiving = None;
        if let Err(e) = self.commit_state(next) {
            self.partial = Some(p);
            return Err(e);
        }
        self.shared
            .chain
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .receiving = None;
        drop(p);
        crate::undo::log::remove(&path).map_err(self.io(&path))?;
        tracing::info!(vm = %self.vm(), cycle, "rolled back: the replica is at its last point again");
        Ok(true)
    }
}
