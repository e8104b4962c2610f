//! Generations: freezing every disk at one instant, releasing or merging the frozen
//! generation, and the state changes around them (lineage, resync marks).

use vmreplica_common::lineage::Lineage;

use super::{FrozenDisk, FrozenState, Generation, Parent, State, Tracker, TrackerError};
use crate::bitmap::COW_SLOT;
use crate::crashpoint::crash_point;
use crate::disk::Disk;

impl Tracker {
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
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
