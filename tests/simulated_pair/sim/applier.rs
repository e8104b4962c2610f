//! The applier's driver: its events, and deliveries to either side.

use vmreplica_applier::session as aps;
use vmreplica_common::ranges::RangeSet;
use vmreplica_common::wire::{code, LineagePoint, Message, Role, Tag};
use vmreplica_shipper::session as sps;

use super::{definition, trace, Sim};
use crate::net::Wire;

impl Sim {
    // ---- the applier's driver ------------------------------------------------------------

    pub(crate) fn applier_event(&mut self, ev: aps::Event) {
        if trace() {
            eprintln!("{:>6?} applier <- {ev:?}", self.now);
        }
        self.applier.handle(ev);
        while let Some(a) = self.applier.poll_action() {
            if trace() {
                eprintln!("{:>6?} applier: {a:?}", self.now);
            }
            match a {
                aps::Action::Send { conn, msg } => {
                    if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.alive) {
                        c.to_shipper.push_back(Wire::Ctl(msg));
                    }
                }
                aps::Action::Start {
                    lineage,
                    cycle,
                    kind,
                    freeze,
                    ..
                } => {
                    let r = self.store.start(lineage, cycle, kind, freeze);
                    let rep = self.store.replica();
                    self.applier.handle(aps::Event::Started(r, rep));
                }
                aps::Action::Commit {
                    lineage,
                    cycle,
                    epoch,
                    ranges,
                    bytes,
                    digest,
                } => {
                    let tag = Tag {
                        lineage,
                        cycle,
                        epoch,
                    };
                    let r = self
                        .store
                        .commit(tag, ranges, bytes, digest, &mut self.committed);
                    let rep = self.store.replica();
                    self.applier.handle(aps::Event::Committed(r, rep));
                }
                aps::Action::StoreDefinition { conn, hash, .. } => {
                    let bad = self
                        .bad_definitions
                        .iter()
                        .any(|v| definition(*v).hash == hash);
                    let result = if bad {
                        Err("refused".to_string())
                    } else {
                        self.store.definition = Some(hash);
                        Ok(())
                    };
                    self.applier
                        .handle(aps::Event::DefinitionStored { conn, hash, result });
                }
                aps::Action::Hashes {
                    conn, disk, offset, ..
                } => {
                    self.applier.handle(aps::Event::Hashes {
                        conn,
                        disk,
                        offset,
                        result: Ok(Vec::new()),
                    });
                }
                aps::Action::LoadDivergent { conn } => {
                    self.applier.handle(aps::Event::Divergent {
                        conn,
                        result: Ok(RangeSet::new()),
                    });
                }
                aps::Action::Promote { conn, request } => {
                    let point = LineagePoint {
                        lineage: request.lineage,
                        cycle: request.cycle,
                    };
                    let before = self.store.role;
                    let r = self
                        .store
                        .promote(request.lineage, request.cycle, &mut self.rng);
                    if r.is_ok() && before == Role::Replica {
                        // Promoted only holding exactly the sealed disk, after the adoption.
                        assert!(
                            self.tracker.sealed,
                            "promoted an unsealed primary's replica"
                        );
                        assert_eq!(
                            self.store.image, self.disk,
                            "promoted a replica that lacks the primary's last writes"
                        );
                        assert_eq!(self.adopted, Some(point), "promoted before the adoption");
                        self.promotions += 1;
                    }
                    let rep = self.store.replica();
                    self.applier.handle(aps::Event::Promoted {
                        conn,
                        result: r,
                        replica: rep,
                    });
                }
                aps::Action::RecordPause { conn, change } => {
                    if let Some(p) = self.store.paused {
                        assert!(self.pauses_made.contains(&p), "a pause never made");
                    }
                    self.store.paused = match change {
                        aps::PauseChange::Paused(since) => {
                            assert!(self.pauses_made.contains(&since), "told a pause never made");
                            Some(since)
                        }
                        aps::PauseChange::Resumed(_) => None,
                    };
                    let rep = self.store.replica();
                    self.applier.handle(aps::Event::PauseRecorded {
                        conn,
                        result: Ok(()),
                        replica: rep,
                    });
                }
                aps::Action::Reverse { conn, .. } => {
                    let rep = self.store.replica();
                    self.applier.handle(aps::Event::Reversed {
                        conn,
                        result: Err((code::PROTOCOL, "not in this simulation".into())),
                        replica: rep,
                    });
                }
            }
        }
    }

    pub(crate) fn deliver_to_applier(&mut self, id: u64, w: Wire) {
        match w {
            Wire::Ctl(Message::Hello {
                version, lineage, ..
            }) => self.applier_event(aps::Event::Hello {
                conn: id,
                version,
                lineage,
            }),
            Wire::Ctl(msg) => self.applier_event(aps::Event::Message { conn: id, msg }),
            Wire::Chunk {
                send,
                tag,
                block,
                value,
            } => {
                // The driver admits a chunk through the session; the store checks again.
                let result = self
                    .applier
                    .admit(&tag)
                    .and_then(|()| self.store.apply(tag, block, value));
                if let Some(c) = self.conns.get_mut(&id).filter(|c| c.alive) {
                    c.to_shipper.push_back(Wire::Ack { send, result });
                }
            }
            Wire::Ack { .. } => unreachable!(),
        }
    }

    pub(crate) fn deliver_to_shipper(&mut self, id: u64, w: Wire) {
        let (sh, attempt) = {
            let c = &self.conns[&id];
            (c.shipper, c.attempt)
        };
        match w {
            Wire::Ctl(msg) => self.shipper_event(sh, sps::Event::Message { attempt, msg }),
            Wire::Ack { send, result } => {
                let Some((s, a, left)) = self.shippers[sh].sending else {
                    return;
                };
                if s != send {
                    return;
                }
                match result {
                    Err((_, m)) => {
                        self.shippers[sh].sending = None;
                        self.shipper_event(
                            sh,
                            sps::Event::Sent {
                                attempt: a,
                                result: Err(m),
                            },
                        );
                    }
                    Ok(()) if left == 1 => {
                        self.shippers[sh].sending = None;
                        self.shipper_event(
                            sh,
                            sps::Event::Sent {
                                attempt: a,
                                result: Ok(()),
                            },
                        );
                    }
                    Ok(()) => self.shippers[sh].sending = Some((s, a, left - 1)),
                }
            }
            Wire::Chunk { .. } => unreachable!(),
        }
    }
}
