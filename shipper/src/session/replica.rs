//! The applier's messages: its welcome read, and each answer taken in the phase it belongs to.

use vmreplica_common::ranges::RangeSet;
use vmreplica_common::wire::{code, DefinitionHash, Message, Role, PROTOCOL_VERSION};

use super::operator::version_refused;

use super::{Action, After, Phase, ReplicaView, ShipperSession, TrackerOp, MIN_BACKOFF};

/// What a replica's welcome says: its position, the pause it records (since when, in the
/// primary's clock) and the definition it holds.
pub(super) struct Welcomed {
    pub(super) view: ReplicaView,
    pub(super) paused: Option<u64>,
    pub(super) definition: Option<DefinitionHash>,
}

impl Welcomed {
    /// Reads a welcome; the refusal to give instead if the replica speaks another protocol
    /// version (or the message is not a welcome).
    pub(super) fn of(msg: Message) -> Result<Welcomed, String> {
        match msg {
            Message::Welcome {
                version,
                lineage,
                last_cycle,
                last_freeze,
                receiving,
                definition,
                role,
                paused,
            } => {
                if version != PROTOCOL_VERSION {
                    return Err(version_refused(version));
                }
                Ok(Welcomed {
                    view: ReplicaView {
                        lineage,
                        last_cycle,
                        last_freeze,
                        receiving,
                        role,
                    },
                    paused,
                    definition,
                })
            }
            other => Err(format!("unexpected {} instead of a welcome", other.name())),
        }
    }
}

impl ShipperSession {
    pub(super) fn message(&mut self, msg: Message) {
        if let Message::Error { code: c, message } = &msg {
            if matches!(self.phase, Phase::Promoting { .. }) && *c != code::BUSY {
                return self.stop(format!(
                    "VM {}: the replica refused the promote: {message}",
                    self.cfg.vm
                ));
            }
            if matches!(*c, code::FAILED_OVER | code::SPLIT_BRAIN) {
                return self.stop(message.clone());
            }
            let e = if *c == code::PROTOCOL && self.phase == Phase::Hello {
                format!("the applier refused the hello: {message}")
            } else {
                format!("the applier: {message} (code {c})")
            };
            return self.retry(e);
        }
        if let Message::DefinitionStored { hash, error } = msg {
            // Answers the definition sent on this attempt, whatever the cycle is doing.
            match error {
                None => {
                    self.replica_definition = Some(hash);
                    self.act(Action::Definition {
                        hash,
                        result: Ok(()),
                    });
                }
                Some(e) => {
                    self.definition_refused = Some(hash);
                    self.act(Action::Definition {
                        hash,
                        result: Err(e),
                    });
                }
            }
            return;
        }
        match (self.phase.clone(), msg) {
            (Phase::Hello, welcome @ Message::Welcome { .. }) => {
                let w = match Welcomed::of(welcome) {
                    Ok(w) => w,
                    Err(refused) => return self.retry(refused),
                };
                let (role, paused, definition) = (w.view.role, w.paused, w.definition);
                self.replica = Some(w.view);
                self.replica_definition = definition;
                self.divergent = None;
                if self.resume_replica(paused) {
                    return;
                }
                if matches!(role, Role::ReversePending { .. }) {
                    self.phase = Phase::Divergent {
                        ranges: RangeSet::new(),
                    };
                    return;
                }
                self.offer_definition();
                self.decide();
            }
            (Phase::Divergent { mut ranges }, Message::Divergent { ranges: page, last }) => {
                for r in page {
                    if r.offset.checked_add(r.len).is_some() {
                        ranges.insert_range(r);
                    }
                }
                if !last {
                    self.phase = Phase::Divergent { ranges };
                    return;
                }
                self.divergent = Some(ranges);
                self.decide();
            }
            (Phase::Promoting { parent }, Message::Promoted { lineage }) => {
                self.finish(parent, lineage);
            }
            (Phase::Resuming, Message::PauseNoted { paused }) => self.resumed_replica(paused),
            (
                Phase::Resume { mut applied },
                Message::Resume {
                    lineage,
                    cycle,
                    epoch,
                    ranges,
                    last,
                },
            ) => {
                let Some(mut c) = self.cycle else { return };
                if (lineage, cycle) != (c.lineage, c.generation)
                    || (c.epoch != 0 && c.epoch != epoch)
                {
                    return self.retry(format!(
                        "the applier answered for cycle {cycle} attempt {epoch}, not {}",
                        c.generation
                    ));
                }
                c.epoch = epoch;
                self.cycle = Some(c);
                for r in ranges {
                    applied.insert_range(r);
                }
                if !last {
                    self.phase = Phase::Resume { applied };
                    return;
                }
                self.phase = Phase::Planning { applied };
                self.act(Action::Plan {
                    attempt: self.attempt,
                    generation: c.generation,
                    freeze: c.freeze,
                    kind: c.kind,
                });
            }
            (Phase::Manifest, Message::Applied { lineage, cycle }) => {
                let Some(c) = self.cycle else { return };
                if (lineage, cycle) != (c.lineage, c.generation) {
                    return self.retry(format!(
                        "the applier acknowledged cycle {cycle} of lineage {lineage}, not {} of {}",
                        c.generation, c.lineage
                    ));
                }
                // A reverse cycle made the replica an ordinary one.
                self.replica = Some(ReplicaView {
                    lineage: Some(lineage),
                    last_cycle: cycle,
                    last_freeze: c.freeze,
                    receiving: None,
                    role: Role::Replica,
                });
                self.divergent = None;
                self.backoff = MIN_BACKOFF;
                self.act(Action::Done {
                    cycle,
                    kind: c.kind,
                    bytes: self.cycle_bytes,
                    skipped: self.cycle_skipped,
                });
                self.cycle = None;
                self.tracker_op(
                    TrackerOp::Release {
                        generation: cycle,
                        proof: (lineage, cycle, c.freeze),
                    },
                    After::Released {
                        clear: self.resync_freeze == Some(c.freeze),
                    },
                );
            }
            (_, Message::Hashes { .. }) => {} // the planner's (routed by the driver)
            (phase, m) => {
                self.retry(format!(
                    "unexpected {} from the applier while {phase:?}",
                    m.name()
                ));
            }
        }
    }
}
