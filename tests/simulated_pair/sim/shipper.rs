//! The shipper's driver: its actions carried out on the simulated network and tracker.

use std::collections::VecDeque;

use vmreplica_common::ranges::RangeSet;
use vmreplica_common::wire::{CycleKind, Message, Role};
use vmreplica_shipper::session::{self as sps, TrackerOp};

use super::{definition, trace, Sim};
use crate::model::{blocks_of, range_of};
use crate::net::{Conn, Wire};

impl Sim {
    // ---- the shipper's driver ------------------------------------------------------------

    fn shipper_actions(&mut self, sh: usize) {
        while let Some(a) = self.shippers[sh].s.poll_action() {
            if trace() {
                eprintln!("{:>6?} shipper {sh}: {a:?}", self.now);
            }
            match a {
                sps::Action::Tracker(op) => {
                    assert!(
                        !(self.op_paused.is_some() && matches!(op, TrackerOp::Freeze { .. })),
                        "froze a generation while paused"
                    );
                    self.tracker_op(sh, op)
                }
                sps::Action::Connect { attempt } => {
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(
                        id,
                        Conn {
                            shipper: sh,
                            attempt,
                            alive: true,
                            to_applier: VecDeque::new(),
                            to_applier_data: Vec::new(),
                            to_shipper: VecDeque::new(),
                            connected: false,
                        },
                    );
                }
                sps::Action::Close { attempt } => {
                    let ids: Vec<u64> = self
                        .conns
                        .iter()
                        .filter(|(_, c)| c.shipper == sh && c.attempt == attempt && c.alive)
                        .map(|(i, _)| *i)
                        .collect();
                    for id in ids {
                        self.conns.get_mut(&id).unwrap().alive = false;
                    }
                }
                sps::Action::Send { attempt, msg } => {
                    assert!(
                        self.op_paused.is_none()
                            || matches!(msg, Message::Hello { .. } | Message::Paused { .. }),
                        "sent {} while paused",
                        msg.name()
                    );
                    if let Some(c) = self.conn_of(sh, attempt) {
                        c.to_applier.push_back(Wire::Ctl(msg));
                    }
                }
                sps::Action::Plan {
                    attempt,
                    generation,
                    freeze,
                    kind,
                } => {
                    let result = match &self.tracker.frozen {
                        Some((g, _, blocks, contents, id)) if *g == generation && *id == freeze => {
                            let mut set = RangeSet::new();
                            for b in blocks {
                                // A resync compares checksums: only the blocks that differ.
                                if kind != CycleKind::Resync
                                    || self.store.image[*b as usize] != contents[*b as usize]
                                {
                                    set.insert_range(range_of(*b));
                                }
                            }
                            Ok(set)
                        }
                        _ => Err("not frozen".into()),
                    };
                    self.pending
                        .push_back((sh, sps::Event::Planned { attempt, result }));
                }
                sps::Action::SendData {
                    attempt,
                    tag,
                    freeze,
                    ranges,
                } => {
                    let contents = match &self.tracker.frozen {
                        Some((g, _, _, c, id)) if *g == tag.cycle && *id == freeze => {
                            Some(c.clone())
                        }
                        _ => None,
                    };
                    let send = self.next_send;
                    self.next_send += 1;
                    let set: RangeSet = ranges.into_iter().collect();
                    let blocks = blocks_of(&set);
                    match (contents, self.conn_of(sh, attempt)) {
                        (Some(d), Some(c)) => {
                            for b in &blocks {
                                c.to_applier_data.push(Wire::Chunk {
                                    send,
                                    tag,
                                    block: *b,
                                    value: d[*b as usize],
                                });
                            }
                            self.shippers[sh].sending = Some((send, attempt, blocks.len()));
                            if blocks.is_empty() {
                                self.shippers[sh].sending = None;
                                self.pending.push_back((
                                    sh,
                                    sps::Event::Sent {
                                        attempt,
                                        result: Ok(()),
                                    },
                                ));
                            }
                        }
                        _ => self.pending.push_back((
                            sh,
                            sps::Event::Sent {
                                attempt,
                                result: Err("gone".into()),
                            },
                        )),
                    }
                }
                sps::Action::Done { .. } => self.applied_cycles += 1,
                sps::Action::Retry { .. } => {}
                sps::Action::PauseTold { since } => {
                    assert_eq!(since.is_some(), since == self.op_paused, "told {since:?}");
                    // Told: the replica records exactly this pause, or holds nothing a
                    // pause concerns (empty).
                    match since {
                        Some(_) => assert_eq!(self.store.paused, since, "told, not recorded"),
                        None => assert!(
                            self.store.lineage.is_none() && self.store.last_cycle == 0,
                            "a replica that holds the VM was not told"
                        ),
                    }
                    self.faults.hit("pause told");
                }
                sps::Action::PauseUntold { .. } => self.faults.hit("pause not told yet"),
                sps::Action::Definition { hash, result } => {
                    let refused = self
                        .bad_definitions
                        .iter()
                        .any(|v| definition(*v).hash == hash);
                    assert_eq!(result.is_err(), refused, "definition {hash}: {result:?}");
                    self.faults.hit(if refused {
                        "definition refused"
                    } else {
                        "definition stored"
                    });
                }
                sps::Action::Adopt { parent } => {
                    // The sealed tracker's last generation, on the replica: what the driver
                    // adopts (again after a crash, possibly a later, empty one).
                    assert!(self.planned, "adopted outside a planned failover");
                    assert_eq!(
                        (Some(parent.lineage), parent.cycle),
                        (self.tracker.lineage, self.tracker.next_generation - 1),
                        "adopted another point than the sealed tracker's last generation"
                    );
                    self.faults.hit("adopted");
                    self.adopted = Some(parent);
                    self.pending.push_back((sh, sps::Event::Adopted(Ok(()))));
                }
                sps::Action::Finished { parent, lineage } => {
                    let Role::Primary {
                        lineage: l,
                        parent: p,
                    } = self.store.role
                    else {
                        panic!("finished, but the replica was never promoted");
                    };
                    assert_eq!((parent, lineage), (p, l), "finished with another promotion");
                    self.finished = Some((parent, lineage));
                    self.shippers[sh].alive = false;
                }
                sps::Action::Stop { error } => {
                    assert!(!self.planned, "a planned failover stopped: {error}");
                    // Only two different histories may stop replication; the operator then
                    // sets the tracker to the replica's lineage (forced: a resync follows).
                    let (t, r) = (self.tracker.lineage, self.store.lineage);
                    // (Two shippers at once may act on each other's stale views.)
                    assert!(
                        !self.locked || (t.is_some() && r.is_some() && t != r),
                        "stopped without cause: {error}"
                    );
                    self.faults.hit("different lineages: stopped");
                    self.shippers[sh].alive = false;
                    if self.tracker.frozen.is_none() {
                        self.tracker.lineage = r;
                        self.tracker.raise_resync();
                    } else if let Some(f) = self.tracker.frozen.take() {
                        // The operator merges what is frozen first.
                        self.tracker.dirty.extend(f.2);
                        self.tracker.lineage = r;
                        self.tracker.raise_resync();
                    }
                    self.start_shipper(true);
                }
            }
        }
    }

    fn conn_of(&mut self, sh: usize, attempt: u64) -> Option<&mut Conn> {
        self.conns
            .values_mut()
            .find(|c| c.shipper == sh && c.attempt == attempt && c.alive)
    }

    pub(crate) fn shipper_event(&mut self, sh: usize, ev: sps::Event) {
        if !self.shippers[sh].alive {
            return;
        }
        let at = self.at();
        self.shippers[sh].s.handle(ev, at);
        self.shipper_actions(sh);
    }
}
