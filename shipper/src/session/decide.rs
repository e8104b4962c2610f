//! The lineage rules: from the tracker's and the replica's state, what comes next (a delta,
//! an initial copy, a checksum resync, a release, a stop), and the cycle it ships.

use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::RangeSet;
use vmreplica_common::wire::{failed_over_message, CycleKind, LineagePoint, Message, Role};

use super::{Action, After, Cycle, Event, Frozen, Phase, ShipperSession, TrackerOp, TrackerView};

impl ShipperSession {
    /// The lineage rules: what to do next, from the tracker's and the replica's state.
    pub(super) fn decide(&mut self) {
        let (Some(t), Some(r)) = (self.tracker.clone(), self.replica) else {
            return;
        };
        if let Some(f) = t.frozen.filter(|f| f.baseline) {
            return self.stop(format!(
                "VM {}: the tracker's frozen generation {} is a failover's baseline (it keeps \
                 the failover point so that the failover can be cancelled) and is never \
                 shipped: commit the failover first (`vmreplica failover commit {}`)",
                self.cfg.vm, f.generation, self.cfg.vm
            ));
        }
        if let Some(m) = self.already_promoted(&t, &r) {
            return m;
        }
        if let Some(m) = failed_over_message(&self.cfg.vm, &r.role) {
            return self.stop(m);
        }
        if self.cfg.planned.is_some() && !t.sealed {
            return self.stop(format!(
                "VM {}: a planned failover ships the last cycle of a sealed tracker, and this \
                 one is not sealed (`vmreplica ctl seal`)",
                self.cfg.vm
            ));
        }
        if let Role::ReversePending { parent } = r.role {
            return self.decide_reverse(&t, &r, parent);
        }
        let empty = r.lineage.is_none() && r.last_cycle == 0;
        if empty {
            return self.decide_initial(&t);
        }
        let Some(rl) = r.lineage else {
            // A replica with points but no lineage: only a resync continues it.
            return self.resync(&t, r.last_cycle, None);
        };
        let n = r.last_cycle;
        if n >= vmreplica_common::wire::MAX_CYCLE {
            return self.stop(format!(
                "VM {}: the replica reports cycle {n}, beyond any this primary can follow: \
                 nothing is shipped or released",
                self.cfg.vm
            ));
        }
        let Some(tl) = t.lineage else {
            tracing::info!(vm = %self.cfg.vm, "the tracker has no lineage (its state was lost or recreated): checksum resync");
            return self.resync(&t, n, Some(rl));
        };
        if tl != rl {
            return self.stop(format!(
                "VM {}: the tracker's generations belong to lineage {tl}, the replica's cycles \
                 to lineage {rl} (up to cycle {n}): they are not one history of this VM, so \
                 nothing is shipped or released. If the replica is the one to keep, set the \
                 tracker to its lineage (this makes the next cycle a checksum resync); if the \
                 primary is, remove the replica on the applier's side for a new initial copy",
                self.cfg.vm
            ));
        }
        match t.frozen {
            // The replica applied this very freeze: its acknowledgement was lost.
            Some(f) if f.generation == n && f.id == r.last_freeze => self.tracker_op(
                TrackerOp::Release {
                    generation: f.generation,
                    proof: (rl, n, f.id),
                },
                After::Released {
                    clear: self.resync_freeze == Some(f.id),
                },
            ),
            Some(f)
                if f.generation == n + 1
                    && (f.full || !(t.resync_required || self.must_resync)) =>
            {
                let kind = if f.full {
                    CycleKind::Resync
                } else {
                    CycleKind::Delta
                };
                self.ship(tl, f, kind, &t);
            }
            Some(f) if f.full && f.generation > n => self.ship(tl, f, CycleKind::Resync, &t),
            Some(_) => self.resync(&t, n, Some(rl)),
            None if t.next_generation == n + 1
                && self.cfg.planned.is_some()
                && self.final_from.is_some_and(|g| g <= n) =>
            {
                // The last generation, frozen after the seal, is on the replica.
                self.phase = Phase::Adopting {
                    parent: LineagePoint {
                        lineage: tl,
                        cycle: n,
                    },
                };
                self.act(Action::Adopt {
                    parent: LineagePoint {
                        lineage: tl,
                        cycle: n,
                    },
                });
            }
            None if t.next_generation == n + 1 => {
                let full = t.resync_required || self.must_resync;
                let until = match (self.cfg.interval, self.last_freeze) {
                    (Some(i), Some(last)) if !full && self.cfg.planned.is_none() => last + i,
                    _ => self.now,
                };
                self.phase = Phase::Waiting { until, full };
                self.handle(Event::Tick, self.now);
            }
            None => self.resync(&t, n, Some(rl)),
        }
    }

    /// An empty replica: an initial copy, in the tracker's lineage or a fresh one.
    pub(super) fn decide_initial(&mut self, t: &TrackerView) {
        match (t.frozen, t.lineage) {
            (Some(f), Some(l)) if f.full => self.ship(l, f, CycleKind::Initial, t),
            (Some(f), _) => self.tracker_op(
                TrackerOp::Merge {
                    generation: f.generation,
                },
                After::Decide,
            ),
            (None, None) => self.tracker_op(
                TrackerOp::SetLineage {
                    lineage: None,
                    next_generation: t.next_generation,
                },
                After::Decide,
            ),
            (None, Some(_)) => {
                let until = self.cfg.initial_sync_at.unwrap_or(self.now).max(self.now);
                self.phase = Phase::Waiting { until, full: true };
                self.handle(Event::Tick, self.now);
            }
        }
    }

    /// A checksum resync against a replica at cycle `n` of `lineage` (None: the replica has
    /// none): merge what is frozen, put the tracker in the replica's lineage with a generation
    /// after `n`, freeze every block.
    ///
    /// The decision is saved in the tracker (its resync flags) before anything is changed:
    /// once `set-lineage` has put the tracker in step with the replica, nothing else tells a
    /// restarted shipper that the writes tracked before must be found by checksums.
    pub(super) fn resync(&mut self, t: &TrackerView, n: u64, lineage: Option<Lineage>) {
        self.must_resync = true;
        let want = lineage.or(t.lineage);
        let in_lineage = want.is_some() && t.lineage == want;
        match (t.frozen, want) {
            (Some(f), Some(l)) if f.full && f.generation > n && in_lineage => {
                return self.ship(l, f, CycleKind::Resync, t)
            }
            _ if !t.resync_required && !self.resync_marked => {
                self.resync_marked = true;
                return self.tracker_op(TrackerOp::MarkResync, After::Decide);
            }
            _ => {}
        }
        match (t.frozen, want) {
            (Some(f), _) => self.tracker_op(
                TrackerOp::Merge {
                    generation: f.generation,
                },
                After::Decide,
            ),
            (None, _) if !in_lineage || t.next_generation <= n => self.tracker_op(
                TrackerOp::SetLineage {
                    lineage: want,
                    next_generation: n + 1,
                },
                After::Decide,
            ),
            (None, _) => {
                self.last_freeze = Some(self.now);
                let for_resync = t.resync_required;
                self.tracker_op(
                    TrackerOp::Freeze { full: true },
                    After::Froze { for_resync },
                );
            }
        }
    }

    pub(super) fn ship(&mut self, lineage: Lineage, f: Frozen, kind: CycleKind, t: &TrackerView) {
        self.ship_from(lineage, f, kind, t, None)
    }

    pub(super) fn ship_from(
        &mut self,
        lineage: Lineage,
        f: Frozen,
        kind: CycleKind,
        t: &TrackerView,
        parent: Option<LineagePoint>,
    ) {
        // A definition changed since the welcome goes first.
        self.offer_definition();
        let generation = f.generation;
        self.cycle = Some(Cycle {
            lineage,
            generation,
            kind,
            freeze: f.id,
            epoch: 0,
            parent,
        });
        self.phase = Phase::Resume {
            applied: RangeSet::new(),
        };
        self.act(Action::Send {
            attempt: self.attempt,
            msg: Message::BeginCycle {
                lineage,
                cycle: generation,
                kind,
                freeze: f.id,
                disks: t.disks.clone(),
                parent,
                meta: Default::default(),
            },
        });
    }
}
