//! The failover part of the primary's session: a replica waiting for a reverse cycle (its
//! divergent ranges marked dirty, the generation after them shipped as the `Reverse`
//! cycle), and a planned failover's adoption, promote and finish (see the session's
//! documentation).

use vmreplica_common::lineage::Lineage;
use vmreplica_common::wire::{CycleKind, LineagePoint, Message, Receiving, Role};

use super::{Action, After, Frozen, Phase, ReplicaView, ShipperSession, TrackerOp, TrackerView};

impl ShipperSession {
    /// A replica waiting for a reverse cycle continuing `parent`: mark its divergent ranges
    /// dirty, freeze after that, ship the generation as the `Reverse` cycle.
    pub(super) fn decide_reverse(
        &mut self,
        t: &TrackerView,
        r: &ReplicaView,
        parent: LineagePoint,
    ) {
        let vm = self.cfg.vm.clone();
        let Some(tl) = t
            .lineage
            .filter(|l| *l == parent.lineage || t.parent == Some(parent))
        else {
            return self.stop(format!(
                "VM {vm}: the replica waits for a reverse cycle continuing {parent}, but this \
                 tracker's lineage {} (continuing {}) does not continue it: nothing is shipped",
                vmreplica_common::lineage::show(t.lineage),
                t.parent.map_or("nothing".to_string(), |p| p.to_string())
            ));
        };
        if t.next_generation <= parent.cycle {
            return self.tracker_op(
                TrackerOp::SetLineage {
                    lineage: Some(tl),
                    next_generation: parent.cycle + 1,
                },
                After::Decide,
            );
        }
        match t.frozen {
            Some(f)
                if r.receiving
                    == Some(Receiving {
                        lineage: tl,
                        cycle: f.generation,
                        kind: CycleKind::Reverse,
                        freeze: f.id,
                    })
                    || (self.reverse_marked && f.generation > parent.cycle) =>
            {
                self.ship_reverse(tl, f, t, parent)
            }
            Some(f) => self.tracker_op(
                TrackerOp::Merge {
                    generation: f.generation,
                },
                After::Decide,
            ),
            None if !self.reverse_marked => {
                let ranges = self.divergent.clone().unwrap_or_default();
                self.tracker_op(TrackerOp::MarkDirty { ranges }, After::Marked)
            }
            None => {
                self.last_freeze = Some(self.now);
                let full = t.resync_required;
                self.tracker_op(
                    TrackerOp::Freeze { full },
                    After::Froze { for_resync: full },
                )
            }
        }
    }

    pub(super) fn ship_reverse(
        &mut self,
        lineage: Lineage,
        f: Frozen,
        t: &TrackerView,
        parent: LineagePoint,
    ) {
        self.ship_from(lineage, f, CycleKind::Reverse, t, Some(parent));
    }

    /// A planned failover whose promote already happened (the replica says it is primary
    /// continuing this tracker's last generation): adopt and finish.
    pub(super) fn already_promoted(&mut self, t: &TrackerView, r: &ReplicaView) -> Option<()> {
        self.cfg.planned.as_ref()?;
        let Role::Primary { lineage, parent } = r.role else {
            return None;
        };
        let last = t
            .frozen
            .map_or(t.next_generation.saturating_sub(1), |f| f.generation);
        if t.lineage != Some(parent.lineage) || parent.cycle != last {
            return None;
        }
        self.phase = Phase::Adopting { parent };
        self.promoted = Some(lineage);
        self.act(Action::Adopt { parent });
        Some(())
    }

    pub(super) fn promote(&mut self, parent: LineagePoint) {
        if let Some(lineage) = self.promoted {
            return self.finish(parent, lineage);
        }
        let Some(p) = self.cfg.planned.clone() else {
            return;
        };
        self.phase = Phase::Promoting { parent };
        self.act(Action::Send {
            attempt: self.attempt,
            msg: Message::Promote {
                lineage: parent.lineage,
                cycle: parent.cycle,
                back: p.back,
                here: p.here,
                interval: p.interval,
                start: p.start,
                definition: p.definition,
            },
        });
    }

    pub(super) fn finish(&mut self, parent: LineagePoint, lineage: Lineage) {
        self.act(Action::Close {
            attempt: self.attempt,
        });
        self.act(Action::Finished { parent, lineage });
        self.phase = Phase::Stopped;
    }
}
