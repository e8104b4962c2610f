//! The simulation: the pair's state, starting shippers and appliers, cutting links, the
//! operator's edits and pauses, and the checks at every step. Its drivers and its step
//! are in the submodules.

mod applier;
mod shipper;
mod step;
mod tracker;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmreplica_applier::session::{self as aps, ApplierSession};
use vmreplica_common::lineage::Lineage;
use vmreplica_common::wire::{LineagePoint, Message, Role};
use vmreplica_shipper::session::{self as sps, Definition, ShipperSession, TrackerView};

use crate::model::{Disk, Store, Tracker, BLOCKS};
use crate::net::{Conn, Faults, Shipper, Wire};

pub(crate) struct Sim {
    rng: StdRng,
    base: Instant,
    pub(crate) now: Duration,
    pub(crate) disk: Disk,
    pub(crate) tracker: Tracker,
    /// The primary's contents at every freeze: (lineage, generation, contents). A restored
    /// tracker state may freeze a number again before the shipper resyncs, so one number
    /// can have several.
    truth: Vec<(Option<Lineage>, u64, Disk)>,
    pub(crate) lock_holder: Option<usize>,
    pub(crate) store: Store,
    pub(crate) committed: Vec<(Lineage, u64, Disk)>,
    applier: ApplierSession,
    pub(crate) shippers: Vec<Shipper>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    next_send: u64,
    /// Chunks of cut connections that still arrive.
    pub(crate) stale: Vec<Wire>,
    /// Tracker answers on their way back: (shipper, answer).
    pub(crate) tracker_answers: VecDeque<(usize, Result<TrackerView, String>)>,
    pub(crate) pending: VecDeque<(usize, sps::Event)>,
    history: Vec<(Tracker, Store)>,
    pub(crate) faults: Faults,
    pub(crate) applied_cycles: u64,
    lock_refused: u32,
    /// Whether shippers take the tracker's lock (without it, two run at once).
    pub(crate) locked: bool,
    /// A planned failover runs: shippers start in planned mode, the disk is sealed.
    pub(crate) planned: bool,
    /// What the planned failover's driver adopted, and how it finished.
    adopted: Option<LineagePoint>,
    pub(crate) finished: Option<(LineagePoint, Lineage)>,
    /// Promotes the store carried out (a repeated one for the same point counts once).
    pub(crate) promotions: u32,
    /// The primary's VM definition (its version), and the versions the replica refuses.
    pub(crate) definition: u64,
    bad_definitions: BTreeSet<u64>,
    /// The operator pauses and resumes now and then (a fault of its own); the pause in
    /// force (since, as the shipper's state file keeps it), and every pause made.
    pub(crate) pausing: bool,
    pub(crate) op_paused: Option<u64>,
    pauses_made: BTreeSet<u64>,
}

/// Version `v` of the simulated VM's definition.
pub(crate) fn definition(v: u64) -> Definition {
    Definition::new(format!("version = 1 # edit {v}"), None)
}

impl Sim {
    pub(crate) fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let disk: Disk = (0..BLOCKS)
            .map(|b| {
                if b % 3 == 0 {
                    0
                } else {
                    rng.gen_range(1..1000)
                }
            })
            .collect();
        let base = Instant::now();
        let tracker = Tracker {
            lineage: None,
            next_generation: 1,
            frozen: None,
            dirty: BTreeSet::new(),
            resync_required: false,
            resync_since: 0,
            sealed: false,
        };
        let store = Store {
            image: vec![0; BLOCKS as usize],
            ..Store::default()
        };
        let applier = ApplierSession::new("vm1", store.replica());
        Sim {
            rng,
            base,
            now: Duration::ZERO,
            disk,
            tracker,
            truth: Vec::new(),
            lock_holder: None,
            store,
            committed: Vec::new(),
            applier,
            shippers: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            next_send: 1,
            stale: Vec::new(),
            tracker_answers: VecDeque::new(),
            pending: VecDeque::new(),
            history: Vec::new(),
            faults: Faults::default(),
            applied_cycles: 0,
            lock_refused: 0,
            locked: true,
            planned: false,
            adopted: None,
            finished: None,
            promotions: 0,
            definition: 1,
            bad_definitions: BTreeSet::new(),
            pausing: false,
            op_paused: None,
            pauses_made: BTreeSet::new(),
        }
    }

    pub(crate) fn new_applier(&mut self) {
        self.applier = ApplierSession::new("vm1", self.store.replica());
        self.applier.set_definition(self.store.definition);
    }

    /// The operator edits the definition (into one the replica refuses, with `bad`); running
    /// shippers pick it up.
    pub(crate) fn edit_definition(&mut self, bad: bool) {
        self.definition += 1;
        if bad {
            self.bad_definitions.insert(self.definition);
        }
        for sh in &mut self.shippers {
            sh.s.set_definition(Some(definition(self.definition)));
        }
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    /// Starts a shipper; with the lock, a second one is refused (as `shipper.lock` does).
    pub(crate) fn start_shipper(&mut self, locked: bool) -> bool {
        let i = self.shippers.len();
        if locked {
            if self.lock_holder.is_some_and(|h| self.shippers[h].alive) {
                self.lock_refused += 1;
                return false;
            }
            self.lock_holder = Some(i);
        }
        let cfg = sps::Config {
            vm: "vm1".into(),
            interval: Some(Duration::from_millis(300)),
            initial_sync_at: None,
            planned: self.planned.then(|| sps::Planned {
                back: vmreplica_common::wire::Endpoint {
                    addr: "a:1".into(),
                    name: "a".into(),
                },
                here: vmreplica_common::wire::Endpoint {
                    addr: "b:1".into(),
                    name: "b".into(),
                },
                interval: "1s".into(),
                start: true,
                definition: None,
            }),
            paused: self.op_paused,
            resumed_at: 0,
        };
        let mut s = ShipperSession::new(cfg, self.at());
        s.set_definition(Some(definition(self.definition)));
        self.shippers.push(Shipper {
            s,
            sending: None,
            alive: true,
        });
        true
    }

    fn cut(&mut self, id: u64) {
        let keep_stale = self.rng.gen_bool(0.5);
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.alive {
                return;
            }
            c.alive = false;
            if keep_stale {
                self.stale.append(&mut c.to_applier_data);
            }
            let (sh, attempt) = (c.shipper, c.attempt);
            self.pending.push_back((
                sh,
                sps::Event::Disconnected {
                    attempt,
                    reason: "link cut".into(),
                },
            ));
        }
    }

    /// A connection of a peer that is none of the shippers (connected already).
    fn peer_conn(&mut self) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                shipper: usize::MAX,
                attempt: 0,
                alive: true,
                to_applier: VecDeque::new(),
                to_applier_data: Vec::new(),
                to_shipper: VecDeque::new(),
                connected: true,
            },
        );
        id
    }

    /// The pause the applier's welcome shows (a hello on a connection of its own).
    pub(crate) fn welcome_paused(&mut self) -> Option<u64> {
        let id = self.peer_conn();
        self.applier_event(aps::Event::Hello {
            conn: id,
            version: vmreplica_common::wire::PROTOCOL_VERSION,
            lineage: None,
        });
        let c = self.conns.remove(&id).unwrap();
        match c.to_shipper.into_iter().next() {
            Some(Wire::Ctl(Message::Welcome { paused, .. })) => paused,
            other => panic!("no welcome: {other:?}"),
        }
    }

    /// The operator pauses (a new pause, since now) or resumes the VM: saved first (as the
    /// shipper's state file), then told to the running shipper.
    pub(crate) fn toggle_pause(&mut self) {
        let at = 1_000_000 + self.now.as_millis() as u64;
        let pause = match self.op_paused.take() {
            Some(_) => {
                self.faults.hit("resumed");
                None
            }
            None => {
                self.faults.hit("paused");
                self.op_paused = Some(at);
                self.pauses_made.insert(at);
                Some(at)
            }
        };
        for sh in 0..self.shippers.len() {
            let ev = match pause {
                Some(since) => sps::Event::Pause { since },
                None => sps::Event::Resume { at },
            };
            self.shipper_event(sh, ev);
        }
    }

    /// Faults stop: every shipper but one stops (as the lock would have them).
    pub(crate) fn keep_one_shipper(&mut self) {
        let mut keep = true;
        for sh in (0..self.shippers.len()).rev() {
            if self.shippers[sh].alive && !std::mem::replace(&mut keep, false) {
                self.shippers[sh].alive = false;
                self.kill_conns(|c| c.shipper == sh);
            }
        }
        if !self.shippers.iter().any(|s| s.alive) {
            self.start_shipper(false);
        }
    }

    fn pick_history(&mut self) -> Option<(Tracker, Store)> {
        if self.history.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.history.len());
        Some(self.history[i].clone())
    }

    pub(crate) fn kill_conns(&mut self, which: impl Fn(&Conn) -> bool) {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alive && which(c))
            .map(|(i, _)| *i)
            .collect();
        for id in ids {
            self.cut(id);
        }
    }

    /// [`Sim::check_points`] while the replica is a replica (a promoted one has no points).
    pub(crate) fn check_points_unless_promoted(&self) {
        if self.store.role == Role::Replica {
            self.check_points();
        }
    }

    /// Every point of the replica holds the primary's contents at that generation's freeze.
    pub(crate) fn check_points(&self) {
        for p in &self.store.points {
            let got = &self.store.cycles[p];
            let ok = self
                .truth
                .iter()
                .any(|(l, g, d)| *g == *p && *l == self.store.lineage && d == got);
            assert!(
                ok,
                "point {p} holds contents the primary never had at a freeze"
            );
        }
    }
}

fn trace() -> bool {
    std::env::var("SIM_TRACE").is_ok()
}
