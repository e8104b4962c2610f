//! One step of the simulation: deliveries in random order, and the faults.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::Rng;
use vmreplica_applier::session as aps;
use vmreplica_common::wire::{code, CycleKind, Message};
use vmreplica_shipper::session as sps;

use super::{trace, Sim};
use crate::model::{Tracker, BLOCKS};
use crate::net::Wire;

impl Sim {
    // ---- one step --------------------------------------------------------------------------

    pub(crate) fn step(&mut self, faults: bool) {
        self.now += Duration::from_millis(self.rng.gen_range(1..20));
        // Something ready to happen, picked at random (so deliveries reorder across queues);
        // now and then, a fault.
        let pick = self.rng.gen_range(0..1000);
        let what = if faults && pick < 15 { 3 } else { pick % 3 };
        match what {
            0 => self.deliver_some(),
            1 => {
                if let Some((sh, ev)) = self.pending.pop_front() {
                    self.shipper_event(sh, ev);
                }
                if let Some((sh, a)) = self.tracker_answers.pop_front() {
                    self.shipper_event(sh, sps::Event::Tracker(a));
                }
            }
            2 => {
                if faults && !self.tracker.sealed && self.rng.gen_bool(0.3) {
                    // The guest writes.
                    let b = self.rng.gen_range(0..BLOCKS);
                    self.disk[b as usize] = if self.rng.gen_bool(0.2) {
                        0
                    } else {
                        self.rng.gen_range(1..1_000_000)
                    };
                    self.tracker.dirty.insert(b);
                }
                for sh in 0..self.shippers.len() {
                    let due = self.shippers[sh]
                        .s
                        .poll_timeout()
                        .is_some_and(|t| t <= self.at());
                    if due && self.shippers[sh].alive {
                        self.shipper_event(sh, sps::Event::Tick);
                    }
                }
            }
            _ => self.fault(),
        }
        if self.history.len() < 64 && self.rng.gen_bool(0.05) {
            self.history
                .push((self.tracker.clone(), self.store.clone()));
        }
    }

    fn deliver_some(&mut self) {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alive)
            .map(|(i, _)| *i)
            .collect();
        if !self.stale.is_empty() && self.rng.gen_bool(0.2) {
            let i = self.rng.gen_range(0..self.stale.len());
            let w = self.stale.swap_remove(i);
            self.faults.hit("stale chunk delivered");
            // It arrives on its dead connection: the applier still processes it.
            self.deliver_to_applier(0, w);
            return;
        }
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.gen_range(0..ids.len())];
        let c = self.conns.get_mut(&id).unwrap();
        if !c.connected {
            c.connected = true;
            let (sh, attempt) = (c.shipper, c.attempt);
            self.shipper_event(sh, sps::Event::Connected { attempt });
            return;
        }
        match self.rng.gen_range(0..3) {
            0 => {
                if let Some(w) = c.to_applier.pop_front() {
                    self.deliver_to_applier(id, w);
                }
            }
            1 => {
                if !c.to_applier_data.is_empty() {
                    let i = self.rng.gen_range(0..c.to_applier_data.len());
                    let w = c.to_applier_data.swap_remove(i);
                    self.deliver_to_applier(id, w);
                }
            }
            _ => {
                if let Some(w) = c.to_shipper.pop_front() {
                    if matches!(w, Wire::Ctl(Message::Applied { .. })) && self.rng.gen_bool(0.15) {
                        // The acknowledgement is lost with its connection.
                        self.faults.hit("lost acknowledgement");
                        self.cut(id);
                        return;
                    }
                    self.deliver_to_shipper(id, w);
                }
            }
        }
    }

    fn fault(&mut self) {
        let before = self.faults.0.clone();
        self.fault_inner();
        if trace() && before != self.faults.0 {
            eprintln!("{:>6?} FAULT {:?}", self.now, self.faults.0);
        }
    }

    fn fault_inner(&mut self) {
        let pick = self.rng.gen_range(0..100);
        // A planned failover meets cut links, crashes and lost answers; the restored states
        // and the rogue peers of the replication runs are theirs.
        if self.planned && (35..=54).contains(&pick) {
            return;
        }
        match pick {
            0..=14 => {
                let ids: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.alive)
                    .map(|(i, _)| *i)
                    .collect();
                if let Some(id) = ids.get(self.rng.gen_range(0..ids.len().max(1))) {
                    self.faults.hit("link cut");
                    self.cut(*id);
                }
            }
            15..=24 => {
                // The shipper crashes and restarts (the lock goes with it).
                self.faults.hit("shipper crash");
                if self.finished.is_some() {
                    return;
                }
                for sh in 0..self.shippers.len() {
                    if self.shippers[sh].alive {
                        self.shippers[sh].alive = false;
                        self.kill_conns(|c| c.shipper == sh);
                    }
                }
                self.pending.clear();
                self.tracker_answers.clear();
                self.start_shipper(true);
            }
            25..=34 => {
                // The applier crashes: its session is gone, the store stays (with a cycle
                // held in part, if any); every connection dies.
                self.faults.hit("applier crash");
                self.kill_conns(|_| true);
                // A new process: a dead connection's packets no longer reach it (QUIC).
                self.stale.clear();
                self.new_applier();
            }
            35..=37 => {
                // The tracker's state directory is lost, all of it (recreated empty: no
                // tracking files left to say so): no lineage, generation 1, no resync flags.
                // Only the missing lineage tells the shipper to resync.
                self.faults.hit("tracker state lost");
                self.tracker = Tracker {
                    lineage: None,
                    next_generation: 1,
                    frozen: None,
                    dirty: BTreeSet::new(),
                    resync_required: false,
                    resync_since: 0,
                    sealed: false,
                };
            }
            38..=40 => {
                if let Some((t, _)) = self.pick_history() {
                    // An older tracker state restored: its bitmaps miss writes since. The
                    // tracker tells it by the epoch its images carry (newer than the copy's):
                    // every disk is marked for resync and the copy's frozen generation, whose
                    // copies-on-write miss what was written since, is abandoned (merged).
                    self.faults.hit("tracker state restored");
                    self.tracker = t;
                    self.tracker.raise_resync();
                    if let Some(f) = self.tracker.frozen.take() {
                        self.tracker.dirty.extend(f.2);
                    }
                }
            }
            41..=44 => {
                if let Some((_, s)) = self.pick_history() {
                    self.faults.hit("replica store restored");
                    self.kill_conns(|_| true);
                    self.stale.clear();
                    self.store = s;
                    self.new_applier();
                }
            }
            45..=49 => {
                // A second shipper on the same tracker: refused by the lock (without it,
                // both run).
                let locked = self.locked;
                if !self.start_shipper(locked) {
                    self.faults.hit("second shipper refused");
                } else if self.shippers.iter().filter(|s| s.alive).count() > 1 {
                    self.faults.hit("two shippers at once");
                }
            }
            50..=54 => self.rogue_gap(),
            55..=57 => {
                let bad = self.rng.gen_bool(0.4);
                self.faults.hit("definition edited");
                self.edit_definition(bad);
            }
            58..=61 if self.pausing => self.toggle_pause(),
            _ => {}
        }
    }

    /// A peer sends the delta cycle after next (a gap): the applier refuses it with a
    /// lineage error and changes nothing.
    fn rogue_gap(&mut self) {
        let (Some(l), n) = (self.store.lineage, self.store.last_cycle) else {
            return;
        };
        self.faults.hit("a gap refused");
        let id = self.peer_conn();
        let before = (
            self.store.image.clone(),
            self.store.last_cycle,
            self.store.receiving.clone().map(|r| (r.0, r.2)),
        );
        self.applier_event(aps::Event::Hello {
            conn: id,
            version: vmreplica_common::wire::PROTOCOL_VERSION,
            lineage: Some(l),
        });
        self.applier_event(aps::Event::Message {
            conn: id,
            msg: Message::BeginCycle {
                lineage: l,
                cycle: n + 2,
                kind: CycleKind::Delta,
                freeze: 1,
                disks: Vec::new(),
                parent: None,
                meta: Default::default(),
            },
        });
        let c = self.conns.remove(&id).unwrap();
        let answer = c.to_shipper.into_iter().nth(1);
        assert!(
            matches!(
                answer,
                Some(Wire::Ctl(Message::Error {
                    code: code::LINEAGE,
                    ..
                }))
            ),
            "delta {} after {n} was not refused: {answer:?}",
            n + 2
        );
        let after = (
            self.store.image.clone(),
            self.store.last_cycle,
            self.store.receiving.clone().map(|r| (r.0, r.2)),
        );
        assert!(before == after, "a refused cycle changed the replica");
    }
}
