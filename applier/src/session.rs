//! The replica side of the cycle protocol as a state machine without I/O (quinn-proto's
//! shape): the driver feeds it [`Event`]s (messages from the shipper's control streams,
//! results of store operations) with [`ApplierSession::handle`], and carries out the
//! [`Action`]s it takes from [`ApplierSession::poll_action`] (send a message, start or
//! commit a cycle in the store, compute checksums). No sockets, files or clocks inside: a
//! simulated pair drives it through a lossy, reordering, restarting network in tests.
//!
//! One session per VM. It answers hellos with the replica's lineage and position, checks
//! every `BeginCycle` against the lineage rules before the store sees it, hands out the
//! epoch of each receive attempt and admits only that attempt's chunks ([`ApplierSession::admit`]),
//! and commits a cycle only for the attempt's own manifest. Store operations run one at a
//! time; events that arrive meanwhile wait their turn.
//!
//! It also keeps the VM's definition: the welcome says which one the replica holds, a
//! `Definition` whose hash matches its contents is handed to the store (which checks and
//! keeps it, or refuses it and keeps the one it had), and the answer is `DefinitionStored`;
//! a refusal never stops replication.
//! Failover: the welcome says what the site is for the VM (its role); a replica waiting for
//! a reverse cycle follows it with its divergent ranges (loaded by the driver); `Promote`
//! (planned failover) and `Reverse` (replicate back after an unplanned one) are carried out
//! by the driver and answered here.
//! Pause: the welcome says which pause of the primary's the replica records; `Paused` and
//! `Resumed` are recorded by the store (saved) and answered `PauseNoted` (see [`pause`]).

use std::collections::VecDeque;

use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::RangeSet;
use vmreplica_common::wire::{
    code, divergent_pages, resume_pages, CycleKind, CycleMeta, DefinitionHash, DiskInfo, Endpoint,
    LineagePoint, Message, ReverseTarget, Role, Tag, PROTOCOL_VERSION,
};

use crate::rules::{self, Replica};

mod pause;
#[cfg(test)]
mod pause_tests;

pub use pause::PauseChange;

/// A connection (its control stream), as the driver numbers them.
pub type ConnId = u64;

#[derive(Debug)]
pub enum Event {
    /// A control stream said hello for this session's VM.
    Hello {
        conn: ConnId,
        version: u16,
        lineage: Option<Lineage>,
    },
    /// A message on a control stream after its hello.
    Message { conn: ConnId, msg: Message },
    /// The store started (or continued) a cycle: its epoch and what it holds applied.
    Started(Result<(u64, RangeSet), (u16, String)>, Replica),
    /// The store committed a cycle (or refused to).
    Committed(Result<(), (u16, String)>, Replica),
    /// Checksums for a hash request.
    Hashes {
        conn: ConnId,
        disk: String,
        offset: u64,
        result: Result<Vec<u64>, (u16, String)>,
    },
    /// The replica changed outside the session (an administrator's rollback, a failover).
    Replica(Replica),
    /// The store kept definition `hash`, or refused it.
    DefinitionStored {
        conn: ConnId,
        hash: DefinitionHash,
        result: Result<(), String>,
    },
    /// The divergent ranges of a replica waiting for a reverse cycle, loaded.
    Divergent {
        conn: ConnId,
        result: Result<RangeSet, (u16, String)>,
    },
    /// A promote was carried out (the new lineage) or refused.
    Promoted {
        conn: ConnId,
        result: Result<Lineage, (u16, String)>,
        replica: Replica,
    },
    /// A reverse request was carried out (or checked): the new lineage, the point it
    /// continues, the failover's time; or refused.
    Reversed {
        conn: ConnId,
        result: Result<(Lineage, LineagePoint, u64), (u16, String)>,
        replica: Replica,
    },
    /// The store recorded (and saved) a pause or resume of the primary, or failed to.
    PauseRecorded {
        conn: ConnId,
        result: Result<(), (u16, String)>,
        replica: Replica,
    },
}

/// A planned failover's promote, as the old primary asks it (see `Message::Promote`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromoteRequest {
    pub lineage: Lineage,
    pub cycle: u64,
    pub back: Endpoint,
    pub here: Endpoint,
    pub interval: String,
    pub start: bool,
    pub definition: Option<String>,
}

/// An old primary's request to be replicated back to (see `Message::Reverse`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReverseRequest {
    pub start: bool,
    pub discard_local: bool,
    pub last_write_at: u64,
    pub back: Endpoint,
    pub here: Endpoint,
    pub interval: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: Message,
    },
    /// Start or continue a cycle in the store (`VmStore::start_cycle`), then report
    /// [`Event::Started`].
    Start {
        lineage: Lineage,
        cycle: u64,
        kind: CycleKind,
        freeze: u64,
        disks: Vec<DiskInfo>,
        parent: Option<LineagePoint>,
        /// What the cycle says of itself (app-consistent, excluded disks, ...).
        meta: CycleMeta,
    },
    /// Commit the cycle (`VmStore::commit`), then report [`Event::Committed`].
    Commit {
        lineage: Lineage,
        cycle: u64,
        epoch: u64,
        ranges: u64,
        bytes: u64,
        digest: u64,
    },
    /// Compute checksums, then report [`Event::Hashes`].
    Hashes {
        conn: ConnId,
        disk: String,
        offset: u64,
        block: u32,
        count: u32,
    },
    /// Check and keep a VM definition (its hash checked already), then report
    /// [`Event::DefinitionStored`].
    StoreDefinition {
        conn: ConnId,
        hash: DefinitionHash,
        definition: String,
        reverse: Option<ReverseTarget>,
    },
    /// Load the replica's divergent ranges, then report [`Event::Divergent`].
    LoadDivergent {
        conn: ConnId,
    },
    /// Promote the replica (planned failover), then report [`Event::Promoted`].
    Promote {
        conn: ConnId,
        request: PromoteRequest,
    },
    /// Replicate back to the old primary (or check that it may be), then report
    /// [`Event::Reversed`].
    Reverse {
        conn: ConnId,
        request: ReverseRequest,
    },
    /// Record the primary's pause or resume in the VM's history and save it, then report
    /// [`Event::PauseRecorded`].
    RecordPause {
        conn: ConnId,
        change: PauseChange,
    },
}

/// A store operation in flight, and who asked.
#[derive(Debug)]
enum Pending {
    Start {
        conn: ConnId,
        lineage: Lineage,
        cycle: u64,
    },
    Commit {
        conn: ConnId,
        lineage: Lineage,
        cycle: u64,
    },
    Hashes,
    Definition,
    /// A divergent list, a promote, a reverse request or a pause.
    Other,
}

/// Requests that may wait while the store works for another: a shipper sends one at a time,
/// so more means a confused or hostile peer; they are refused (BUSY), not queued without end.
pub const MAX_WAITING: usize = 256;

pub struct ApplierSession {
    vm: String,
    replica: Replica,
    /// The definition the replica holds.
    definition: Option<DefinitionHash>,
    /// The receive attempt whose chunks are admitted.
    current: Option<Tag>,
    pending: Option<Pending>,
    waiting: VecDeque<Event>,
    actions: VecDeque<Action>,
}

fn error(code: u16, message: String) -> Message {
    Message::Error { code, message }
}

impl ApplierSession {
    pub fn new(vm: &str, replica: Replica) -> ApplierSession {
        ApplierSession {
            vm: vm.to_string(),
            replica,
            definition: None,
            current: None,
            pending: None,
            waiting: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The definition the replica holds (as the store says when the replica is opened).
    pub fn set_definition(&mut self, d: Option<DefinitionHash>) {
        self.definition = d;
    }

    pub fn definition(&self) -> Option<DefinitionHash> {
        self.definition
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether a data chunk of `tag` may be applied now: only the current attempt's.
    pub fn admit(&self, tag: &Tag) -> Result<(), (u16, String)> {
        match &self.current {
            Some(c) if c == tag => Ok(()),
            Some(c) => Err((
                code::STALE,
                format!(
                    "VM {}: chunk of cycle {} attempt {} is stale: the replica receives cycle {} attempt {} now",
                    self.vm, tag.cycle, tag.epoch, c.cycle, c.epoch
                ),
            )),
            None => Err((
                code::STALE,
                format!(
                    "VM {}: chunk of cycle {} attempt {}, but no cycle is being received",
                    self.vm, tag.cycle, tag.epoch
                ),
            )),
        }
    }

    fn send(&mut self, conn: ConnId, msg: Message) {
        self.actions.push_back(Action::Send { conn, msg });
    }

    pub fn handle(&mut self, ev: Event) {
        let is_result = matches!(
            ev,
            Event::Started(..)
                | Event::Committed(..)
                | Event::Hashes { .. }
                | Event::Replica(_)
                | Event::DefinitionStored { .. }
                | Event::Divergent { .. }
                | Event::Promoted { .. }
                | Event::Reversed { .. }
                | Event::PauseRecorded { .. }
        );
        if self.pending.is_some() && !is_result {
            if self.waiting.len() >= MAX_WAITING {
                if let Event::Hello { conn, .. } | Event::Message { conn, .. } = ev {
                    let m = format!(
                        "VM {}: {MAX_WAITING} requests already wait for the replica's store; \
                         this one is refused (a shipper sends one at a time: is a second one \
                         running against this replica?)",
                        self.vm
                    );
                    self.send(conn, error(code::BUSY, m));
                }
                return;
            }
            self.waiting.push_back(ev);
            return;
        }
        self.step(ev);
        while self.pending.is_none() {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            self.step(next);
        }
    }

    fn step(&mut self, ev: Event) {
        match ev {
            Event::Hello {
                conn,
                version,
                lineage,
            } => {
                if version != PROTOCOL_VERSION {
                    let m = vmreplica_common::wire::version_refused(
                        "the primary's shipper",
                        version,
                        "this applier",
                        "primary",
                        "replica",
                    );
                    return self.send(conn, error(code::PROTOCOL, m));
                }
                if let (Some(t), Some(r)) = (lineage, self.replica.lineage) {
                    if t != r {
                        // Said here for the log; the shipper decides (it stops) and the
                        // rules refuse any cycle of another lineage anyway.
                        tracing::warn!(vm = %self.vm, tracker = %t, replica = %r, "the primary's tracker and this replica hold different lineages");
                    }
                }
                self.send(
                    conn,
                    Message::Welcome {
                        version: PROTOCOL_VERSION,
                        lineage: self.replica.lineage,
                        last_cycle: self.replica.last_cycle,
                        last_freeze: self.replica.last_freeze,
                        receiving: self.replica.receiving,
                        definition: self.definition,
                        role: self.replica.role,
                        paused: self.replica.paused,
                    },
                );
                if matches!(self.replica.role, Role::ReversePending { .. }) {
                    self.pending = Some(Pending::Other);
                    self.actions.push_back(Action::LoadDivergent { conn });
                }
            }
            Event::Message { conn, msg } => self.message(conn, msg),
            Event::Started(r, replica) => {
                self.replica = replica;
                let Some(Pending::Start {
                    conn,
                    lineage,
                    cycle,
                }) = self.pending.take()
                else {
                    return;
                };
                match r {
                    Ok((epoch, applied)) => {
                        self.current = Some(Tag {
                            lineage,
                            cycle,
                            epoch,
                        });
                        for page in resume_pages(lineage, cycle, epoch, &applied) {
                            self.send(conn, page);
                        }
                    }
                    Err((c, m)) => self.send(conn, error(c, m)),
                }
            }
            Event::Committed(r, replica) => {
                self.replica = replica;
                let Some(Pending::Commit {
                    conn,
                    lineage,
                    cycle,
                }) = self.pending.take()
                else {
                    return;
                };
                match r {
                    Ok(()) => {
                        self.current = None;
                        self.send(conn, Message::Applied { lineage, cycle });
                    }
                    Err((c, m)) => self.send(conn, error(c, m)),
                }
            }
            Event::Hashes {
                conn,
                disk,
                offset,
                result,
            } => {
                if matches!(self.pending, Some(Pending::Hashes)) {
                    self.pending = None;
                }
                match result {
                    Ok(hashes) => self.send(
                        conn,
                        Message::Hashes {
                            disk,
                            offset,
                            hashes,
                        },
                    ),
                    Err((c, m)) => self.send(conn, error(c, m)),
                }
            }
            Event::Replica(r) => {
                if r.receiving != self.replica.receiving || r.role != self.replica.role {
                    self.current = None;
                }
                self.replica = r;
            }
            Event::DefinitionStored { conn, hash, result } => {
                if matches!(self.pending, Some(Pending::Definition)) {
                    self.pending = None;
                }
                let error = match result {
                    Ok(()) => {
                        self.definition = Some(hash);
                        None
                    }
                    Err(e) => Some(e),
                };
                self.send(conn, Message::DefinitionStored { hash, error });
            }
            Event::Divergent { conn, result } => {
                self.end_other();
                match result {
                    Ok(set) => {
                        for page in divergent_pages(&set) {
                            self.send(conn, page);
                        }
                    }
                    Err((c, m)) => self.send(conn, error(c, m)),
                }
            }
            Event::Promoted {
                conn,
                result,
                replica,
            } => {
                self.end_other();
                self.set_replica(replica);
                match result {
                    Ok(lineage) => self.send(conn, Message::Promoted { lineage }),
                    Err((c, m)) => self.send(conn, error(c, m)),
                }
            }
            Event::Reversed {
                conn,
                result,
                replica,
            } => {
                self.end_other();
                self.set_replica(replica);
                match result {
                    Ok((lineage, parent, since)) => self.send(
                        conn,
                        Message::ReverseOk {
                            lineage,
                            parent,
                            since,
                        },
                    ),
                    Err((c, m)) => self.send(conn, error(c, m)),
                }
            }
            Event::PauseRecorded {
                conn,
                result,
                replica,
            } => self.pause_recorded(conn, result, replica),
        }
    }

    fn end_other(&mut self) {
        if matches!(self.pending, Some(Pending::Other)) {
            self.pending = None;
        }
    }

    /// The replica after a store operation that may have changed its role: an attempt in
    /// progress ends with a role change.
    fn set_replica(&mut self, r: Replica) {
        if r.role != self.replica.role {
            self.current = None;
        }
        self.replica = r;
    }

    fn message(&mut self, conn: ConnId, msg: Message) {
        match msg {
            Message::BeginCycle {
                lineage,
                cycle,
                kind,
                freeze,
                disks,
                parent,
                meta,
            } => {
                if let Err(m) = rules::decide(
                    &self.vm,
                    &self.replica,
                    lineage,
                    cycle,
                    kind,
                    freeze,
                    parent,
                ) {
                    tracing::warn!(vm = %self.vm, cycle, "refused: {m}");
                    let c = if rules::failed_over_message(&self.vm, &self.replica.role).is_some() {
                        code::FAILED_OVER
                    } else {
                        code::LINEAGE
                    };
                    return self.send(conn, error(c, m));
                }
                // From now on no chunk is admitted until the new attempt has its epoch.
                self.current = None;
                self.pending = Some(Pending::Start {
                    conn,
                    lineage,
                    cycle,
                });
                self.actions.push_back(Action::Start {
                    lineage,
                    cycle,
                    kind,
                    freeze,
                    disks,
                    parent,
                    meta,
                });
            }
            Message::Manifest {
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
                if self.current != Some(tag) {
                    let m = format!(
                        "VM {}: manifest of cycle {cycle} attempt {epoch} is stale (the replica \
                         receives {})",
                        self.vm,
                        self.current.map_or("nothing".to_string(), |c| format!(
                            "cycle {} attempt {}",
                            c.cycle, c.epoch
                        ))
                    );
                    return self.send(conn, error(code::STALE, m));
                }
                self.pending = Some(Pending::Commit {
                    conn,
                    lineage,
                    cycle,
                });
                self.actions.push_back(Action::Commit {
                    lineage,
                    cycle,
                    epoch,
                    ranges,
                    bytes,
                    digest,
                });
            }
            Message::HashRequest {
                disk,
                offset,
                block,
                count,
            } => {
                self.pending = Some(Pending::Hashes);
                self.actions.push_back(Action::Hashes {
                    conn,
                    disk,
                    offset,
                    block,
                    count,
                });
            }
            Message::Definition {
                hash,
                definition,
                reverse,
            } => {
                if DefinitionHash::of(&definition, reverse.as_ref()) != hash {
                    let m = format!(
                        "VM {}: the definition sent does not match its hash {hash}; nothing \
                         was stored",
                        self.vm
                    );
                    return self.send(
                        conn,
                        Message::DefinitionStored {
                            hash,
                            error: Some(m),
                        },
                    );
                }
                if self.definition == Some(hash) {
                    // Held already (an answer lost with a connection): nothing to store.
                    return self.send(conn, Message::DefinitionStored { hash, error: None });
                }
                self.pending = Some(Pending::Definition);
                self.actions.push_back(Action::StoreDefinition {
                    conn,
                    hash,
                    definition,
                    reverse,
                });
            }
            Message::Promote {
                lineage,
                cycle,
                back,
                here,
                interval,
                start,
                definition,
            } => {
                self.current = None;
                self.pending = Some(Pending::Other);
                self.actions.push_back(Action::Promote {
                    conn,
                    request: PromoteRequest {
                        lineage,
                        cycle,
                        back,
                        here,
                        interval,
                        start,
                        definition,
                    },
                });
            }
            Message::Reverse {
                start,
                discard_local,
                last_write_at,
                back,
                here,
                interval,
            } => {
                self.pending = Some(Pending::Other);
                self.actions.push_back(Action::Reverse {
                    conn,
                    request: ReverseRequest {
                        start,
                        discard_local,
                        last_write_at,
                        back,
                        here,
                        interval,
                    },
                });
            }
            Message::Paused { since } => self.pause_change(conn, PauseChange::Paused(since)),
            Message::Resumed { at } => self.pause_change(conn, PauseChange::Resumed(at)),
            other => {
                let m = format!("unexpected {} on the control stream", other.name());
                self.send(conn, error(code::PROTOCOL, m));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Lineage = Lineage([0xa; 16]);

    fn replica(last: u64) -> Replica {
        Replica {
            lineage: Some(A),
            last_cycle: last,
            last_freeze: 0,
            has_points: true,
            receiving: None,
            role: Role::Replica,
            paused: None,
        }
    }

    fn begin(cycle: u64) -> Message {
        Message::BeginCycle {
            lineage: A,
            cycle,
            kind: CycleKind::Delta,
            freeze: 9,
            disks: vec![],
            parent: None,
            meta: Default::default(),
        }
    }

    fn drain(s: &mut ApplierSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    #[test]
    fn requests_waiting_for_the_store_are_bounded() {
        let mut s = ApplierSession::new("vm1", replica(5));
        s.handle(Event::Message {
            conn: 1,
            msg: begin(6),
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::Start { cycle: 6, .. }]
        ));
        // While the store works, a peer floods: what exceeds the bound is refused at once.
        for _ in 0..MAX_WAITING + 10 {
            s.handle(Event::Message {
                conn: 2,
                msg: begin(6),
            });
        }
        let acts = drain(&mut s);
        assert_eq!(acts.len(), 10, "{acts:?}");
        for a in &acts {
            assert!(
                matches!(a, Action::Send { conn: 2, msg: Message::Error { code: c, message } }
                    if *c == code::BUSY && message.contains("vm1")),
                "{a:?}"
            );
        }
        assert_eq!(s.waiting.len(), MAX_WAITING);
    }

    #[test]
    fn a_gap_is_refused_before_the_store_sees_it_and_stale_data_is_not_admitted() {
        let mut s = ApplierSession::new("vm1", replica(5));
        s.handle(Event::Hello {
            conn: 1,
            version: 1,
            lineage: None,
        });
        match &drain(&mut s)[..] {
            [Action::Send {
                msg: Message::Error { code: c, message },
                ..
            }] => assert!(
                *c == code::PROTOCOL && message.contains("upgrade"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        s.handle(Event::Message {
            conn: 1,
            msg: begin(7),
        });
        match &drain(&mut s)[..] {
            [Action::Send {
                msg: Message::Error { code: c, .. },
                ..
            }] => assert_eq!(*c, code::LINEAGE),
            other => panic!("{other:?}"),
        }
        s.handle(Event::Message {
            conn: 1,
            msg: begin(6),
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::Start { cycle: 6, .. }]
        ));
        // While the store starts it, a second begin (another connection) waits its turn.
        s.handle(Event::Message {
            conn: 2,
            msg: begin(6),
        });
        assert!(drain(&mut s).is_empty());
        let tag = |epoch| Tag {
            lineage: A,
            cycle: 6,
            epoch,
        };
        assert!(s.admit(&tag(1)).is_err());
        s.handle(Event::Started(Ok((1, RangeSet::new())), replica(5)));
        let acts = drain(&mut s);
        assert!(matches!(
            &acts[0],
            Action::Send {
                conn: 1,
                msg: Message::Resume {
                    epoch: 1,
                    last: true,
                    ..
                }
            }
        ));
        assert!(
            matches!(&acts[1], Action::Start { cycle: 6, .. }),
            "{acts:?}"
        );
        s.handle(Event::Started(Ok((2, RangeSet::new())), replica(5)));
        drain(&mut s);
        assert_eq!(s.admit(&tag(1)).unwrap_err().0, code::STALE);
        s.admit(&tag(2)).unwrap();
        // The first attempt's manifest is stale; the second's commits.
        let manifest = |epoch| Message::Manifest {
            lineage: A,
            cycle: 6,
            epoch,
            ranges: 0,
            bytes: 0,
            digest: RangeSet::new().digest(),
        };
        s.handle(Event::Message {
            conn: 1,
            msg: manifest(1),
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::Send {
                msg: Message::Error {
                    code: code::STALE,
                    ..
                },
                ..
            }]
        ));
        s.handle(Event::Message {
            conn: 2,
            msg: manifest(2),
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::Commit { epoch: 2, .. }]
        ));
        s.handle(Event::Committed(Ok(()), replica(6)));
        assert_eq!(
            drain(&mut s),
            vec![Action::Send {
                conn: 2,
                msg: Message::Applied {
                    lineage: A,
                    cycle: 6
                }
            }]
        );
        assert!(
            s.admit(&tag(2)).is_err(),
            "a committed cycle takes no more data"
        );
    }

    /// A definition whose hash matches is stored (the welcome names it from then on), one
    /// held already is acknowledged without the store, one whose hash does not match or that
    /// the store refuses is answered with the reason; none of it stops a cycle.
    #[test]
    fn definitions_are_stored_checked_and_refused_without_stopping_cycles() {
        let mut s = ApplierSession::new("vm1", replica(5));
        let text = "version = 1".to_string();
        let hash = DefinitionHash::of(&text, None);
        let def = |hash| Message::Definition {
            hash,
            definition: text.clone(),
            reverse: None,
        };
        s.handle(Event::Message {
            conn: 1,
            msg: def(hash),
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::StoreDefinition { hash: h, .. }] if *h == hash
        ));
        // A cycle's begin waits for the store's answer, then goes on.
        s.handle(Event::Message {
            conn: 1,
            msg: begin(6),
        });
        assert!(drain(&mut s).is_empty());
        s.handle(Event::DefinitionStored {
            conn: 1,
            hash,
            result: Err("VM definition vm1: no qemu".into()),
        });
        let acts = drain(&mut s);
        assert!(
            matches!(
                &acts[..],
                [
                    Action::Send {
                        msg: Message::DefinitionStored { error: Some(e), .. },
                        ..
                    },
                    Action::Start { cycle: 6, .. }
                ] if e.contains("no qemu")
            ),
            "{acts:?}"
        );
        assert_eq!(s.definition(), None);
        s.handle(Event::Started(Ok((1, RangeSet::new())), replica(5)));
        drain(&mut s);
        s.handle(Event::Message {
            conn: 1,
            msg: def(hash),
        });
        drain(&mut s);
        s.handle(Event::DefinitionStored {
            conn: 1,
            hash,
            result: Ok(()),
        });
        assert_eq!(
            drain(&mut s),
            vec![Action::Send {
                conn: 1,
                msg: Message::DefinitionStored { hash, error: None }
            }]
        );
        // Held now: the welcome says so, and a resend needs no store.
        s.handle(Event::Hello {
            conn: 2,
            version: PROTOCOL_VERSION,
            lineage: Some(A),
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::Send { msg: Message::Welcome { definition: Some(h), .. }, .. }] if *h == hash
        ));
        s.handle(Event::Message {
            conn: 2,
            msg: def(hash),
        });
        assert_eq!(
            drain(&mut s),
            vec![Action::Send {
                conn: 2,
                msg: Message::DefinitionStored { hash, error: None }
            }]
        );
        // A hash that is not the text's: refused before the store.
        let wrong = DefinitionHash([1; 16]);
        s.handle(Event::Message {
            conn: 2,
            msg: def(wrong),
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::Send { msg: Message::DefinitionStored { error: Some(e), .. }, .. }]
                if e.contains("does not match")
        ));
        // The cycle in progress was never disturbed.
        s.admit(&Tag {
            lineage: A,
            cycle: 6,
            epoch: 1,
        })
        .unwrap();
    }

    /// The welcome says what the site is; a replica waiting for a reverse cycle follows it
    /// with its divergent ranges; a failed-over site refuses cycles with FAILED_OVER; a
    /// promote is carried out by the driver and answered.
    #[test]
    fn roles_divergent_ranges_and_promote() {
        let parent = LineagePoint {
            lineage: A,
            cycle: 5,
        };
        let mut s = ApplierSession::new(
            "vm1",
            Replica {
                role: Role::ReversePending { parent },
                ..replica(5)
            },
        );
        s.handle(Event::Hello {
            conn: 1,
            version: PROTOCOL_VERSION,
            lineage: None,
        });
        let acts = drain(&mut s);
        assert!(
            matches!(
                &acts[..],
                [
                    Action::Send {
                        msg: Message::Welcome {
                            role: Role::ReversePending { .. },
                            ..
                        },
                        ..
                    },
                    Action::LoadDivergent { conn: 1 }
                ]
            ),
            "{acts:?}"
        );
        let mut d = RangeSet::new();
        d.insert(0, 0, 4096);
        s.handle(Event::Divergent {
            conn: 1,
            result: Ok(d.clone()),
        });
        assert_eq!(
            drain(&mut s),
            vec![Action::Send {
                conn: 1,
                msg: Message::Divergent {
                    ranges: d.iter().collect(),
                    last: true
                }
            }]
        );
        // Failed over: cycles refused with FAILED_OVER.
        let mut s = ApplierSession::new(
            "vm1",
            Replica {
                role: Role::FailedOver {
                    lineage: Lineage([0xc; 16]),
                    parent,
                },
                ..replica(5)
            },
        );
        s.handle(Event::Message {
            conn: 1,
            msg: begin(6),
        });
        match &drain(&mut s)[..] {
            [Action::Send {
                msg: Message::Error { code: c, message },
                ..
            }] => assert!(
                *c == code::FAILED_OVER && message.contains("abandon vm1"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        // A promote: the driver does it, the session answers.
        let mut s = ApplierSession::new("vm1", replica(5));
        let ep = Endpoint {
            addr: "a:1".into(),
            name: "a".into(),
        };
        s.handle(Event::Message {
            conn: 2,
            msg: Message::Promote {
                lineage: A,
                cycle: 5,
                back: ep.clone(),
                here: ep.clone(),
                interval: "1m".into(),
                start: false,
                definition: None,
            },
        });
        assert!(matches!(
            &drain(&mut s)[..],
            [Action::Promote { conn: 2, .. }]
        ));
        let l2 = Lineage([0xd; 16]);
        s.handle(Event::Promoted {
            conn: 2,
            result: Ok(l2),
            replica: Replica {
                role: Role::Primary {
                    lineage: l2,
                    parent,
                },
                ..replica(5)
            },
        });
        assert_eq!(
            drain(&mut s),
            vec![Action::Send {
                conn: 2,
                msg: Message::Promoted { lineage: l2 }
            }]
        );
    }
}
