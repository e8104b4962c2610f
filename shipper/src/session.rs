//! The primary side of the cycle protocol as a state machine without I/O (quinn-proto's
//! shape): the driver feeds it [`Event`]s (the tracker's answers, the applier's messages,
//! the outcome of planning and sending, the passing of time) with
//! [`ShipperSession::handle`], and carries out the [`Action`]s it takes from
//! [`ShipperSession::poll_action`]; [`ShipperSession::poll_timeout`] says when to wake it.
//! No sockets, files, clocks or randomness inside: a simulated pair drives it through a lossy,
//! reordering, restarting network in tests.
//!
//! What it decides (the lineage rules, shipper side), from the tracker's state (lineage T,
//! frozen generation F, next generation) and the replica's (lineage R, last cycle N):
//! - an empty replica gets an initial copy: a lineage is created (if the tracker has none)
//!   and set in the tracker before the full freeze;
//! - F == N and the replica applied this very freeze (the freeze ids match): its
//!   acknowledgement was lost: F is released with the replica's proof (a number that came
//!   again after an older tracker state was restored is another freeze: a resync);
//! - F == N + 1 (or a full F > N): F is shipped, as a delta (or a resync);
//! - no F, and the tracker's last generation is N: the next delta is frozen at the interval
//!   (a resync if tracking was lost);
//! - anything else (the tracker behind the replica or more than one ahead: a restored
//!   tracker state or replica store; the tracker without a lineage: its state was lost): a
//!   checksum resync, after merging what is frozen and setting the tracker to the replica's
//!   lineage, never a release;
//! - T != R: replication stops with a message naming both; nothing is released.
//!
//! A generation is released only with the replica's proof: its `Applied` for exactly that
//! lineage and cycle.
//!
//! Failover:
//! - a frozen baseline (an uncommitted failover's) is never shipped: replication stops until
//!   the failover is committed;
//! - a replica the VM failed over to (its welcome says so) stops replication, with the
//!   message naming the point and the commands that replicate back or resolve a split brain;
//! - a replica waiting for a reverse cycle continuing point P sends its divergent ranges
//!   after the welcome: if this tracker's lineage continues P (a failover's new lineage, or
//!   P's own lineage after an abandoned failover), those ranges are marked dirty, a
//!   generation frozen after that is shipped as a `Reverse` cycle, and replication goes on;
//! - planned failover ([`Config::planned`], the tracker sealed): one last generation is
//!   frozen after the seal, shipped and released, then the driver adopts this site's images
//!   as the replica ([`Action::Adopt`]) and the replica is asked to `Promote`; once it
//!   answers (or its welcome shows it promoted at that very point already), the session
//!   finishes ([`Action::Finished`]).
//!
//! The VM's definition travels with its disks: when the replica's welcome names another
//! definition than the session's ([`ShipperSession::set_definition`]), it is sent before the
//! next cycle begins (and again before any cycle once the driver hands a changed one). The
//! replica answers `DefinitionStored`, stored or refused; either way replication goes on, and
//! a refused definition is not sent again until it changes.
//!
//! An operator's pause is told to the replica site, so that its status shows the VM paused
//! rather than missing cycles (see [`operator`]): once paused, the session connects (at
//! once, or at the next chance if the applier cannot be reached), says `Paused` unless the
//! replica's welcome shows it recorded that very pause, waits a bounded time for its
//! acknowledgement, and closes; a paused session holds no connection otherwise. Resumed, the
//! welcome of the next attempt shows whether the replica still records a pause, and
//! `Resumed` ends it before any cycle begins.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

mod decide;
mod failover;
mod operator;
mod replica;

use replica::Welcomed;

use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::{Range, RangeSet};
use vmreplica_common::wire::{
    CycleKind, DefinitionHash, DiskInfo, Endpoint, LineagePoint, Message, Receiving, ReverseTarget,
    Role, Tag, PROTOCOL_VERSION,
};

/// The tracker's state, as its status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerView {
    pub lineage: Option<Lineage>,
    pub next_generation: u64,
    pub frozen: Option<Frozen>,
    /// Some disk lost its tracking: only a resync can catch up.
    pub resync_required: bool,
    pub disks: Vec<DiskInfo>,
    /// The point the lineage continues (a failover's new lineage).
    pub parent: Option<LineagePoint>,
    /// Writes are refused (a planned failover's last cycle).
    pub sealed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frozen {
    pub generation: u64,
    /// The freeze's id (the tracker's, random).
    pub id: u64,
    /// Every block (an initial copy or a resync), not only the changed ones.
    pub full: bool,
    /// A failover's baseline: never shipped.
    pub baseline: bool,
}

/// The replica's position, as its welcome reports it (and as cycles move it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaView {
    pub lineage: Option<Lineage>,
    pub last_cycle: u64,
    /// The freeze id of the last cycle (0: unknown).
    pub last_freeze: u64,
    pub receiving: Option<Receiving>,
    pub role: Role,
}

/// The VM's definition as the shipper sends it: `VmDefinition::to_toml()` and the primary
/// site's reverse target, and their hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Definition {
    pub hash: DefinitionHash,
    pub text: String,
    pub reverse: Option<ReverseTarget>,
}

impl Definition {
    pub fn new(text: String, reverse: Option<ReverseTarget>) -> Definition {
        Definition {
            hash: DefinitionHash::of(&text, reverse.as_ref()),
            text,
            reverse,
        }
    }
}

/// A request to the tracker's control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackerOp {
    Status,
    Freeze {
        full: bool,
    },
    /// Release with the replica's proof: its lineage, cycle and freeze id.
    Release {
        generation: u64,
        proof: (Lineage, u64, u64),
    },
    Merge {
        generation: u64,
    },
    /// `lineage` None: a fresh one (the driver makes it).
    SetLineage {
        lineage: Option<Lineage>,
        next_generation: u64,
    },
    ClearResync,
    /// Marks every tracked disk for a checksum resync, saved by the tracker: the shipper's
    /// decision to resync, made durable before it acts on it.
    MarkResync,
    /// Mark these ranges (by disk index) dirty: a reverse cycle's divergent ranges.
    MarkDirty {
        ranges: RangeSet,
    },
}

#[derive(Debug)]
pub enum Event {
    /// The tracker answered (every answer carries its status after the operation).
    Tracker(Result<TrackerView, String>),
    /// A connection to the applier is up (its control stream open).
    Connected { attempt: u64 },
    /// Connecting failed, or the connection was lost.
    Disconnected { attempt: u64, reason: String },
    /// A message on the control stream.
    Message { attempt: u64, msg: Message },
    /// Planning finished: the ranges of the frozen generation to ship (for a resync, the
    /// ones whose checksums differ).
    Planned {
        attempt: u64,
        result: Result<RangeSet, String>,
    },
    /// Every range was sent and is durably applied (each data stream's last `Acked`).
    Sent {
        attempt: u64,
        result: Result<(), String>,
    },
    /// Time passed (see [`ShipperSession::poll_timeout`]).
    Tick,
    /// The driver adopted this site's images as the replica (planned failover), or failed.
    Adopted(Result<(), String>),
    /// An operator paused replication at `since` (seconds since the epoch): the attempt
    /// under way ends (a frozen generation stays frozen, and resumes where it stopped),
    /// nothing more is frozen or shipped until [`Event::Resume`], and the replica site is
    /// told. The tracker keeps tracking meanwhile.
    Pause { since: u64 },
    /// Replication goes on (resumed at `at`, seconds since the epoch): at once, one cycle of
    /// everything that changed meanwhile. From a stop (an error that needed an operator), it
    /// tries again.
    Resume { at: u64 },
    /// An operator asked for a checksum resync: the next freeze is a full one (at once, if
    /// the session is waiting for the interval).
    ResyncRequested,
    /// The interval changed (None: continuous): the next freeze is due at the new interval
    /// after the last one.
    SetInterval(Option<Duration>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Tracker(TrackerOp),
    /// Open a connection (or several) to the applier; report `Connected` or `Disconnected`.
    Connect {
        attempt: u64,
    },
    /// Close the connection: the attempt is over.
    Close {
        attempt: u64,
    },
    /// A message on the control stream.
    Send {
        attempt: u64,
        msg: Message,
    },
    /// Plan the frozen generation, which must still be freeze `freeze` (skipping, for an
    /// initial copy, its holes; for a resync, comparing checksums over the control stream);
    /// report `Planned`.
    Plan {
        attempt: u64,
        generation: u64,
        freeze: u64,
        kind: CycleKind,
    },
    /// Read, pack and send `ranges` of the frozen generation as chunks of `tag`; report
    /// `Sent`, an error if the frozen generation is not freeze `freeze` any more when all is
    /// sent (a tracker restarted on another state meanwhile).
    SendData {
        attempt: u64,
        tag: Tag,
        freeze: u64,
        ranges: Vec<Range>,
    },
    /// A cycle was applied (its release follows).
    Done {
        cycle: u64,
        kind: CycleKind,
        /// Bytes of the cycle.
        bytes: u64,
        /// Of which the replica held already when this attempt began.
        skipped: u64,
    },
    /// Something failed; the session retries after `after`.
    Retry {
        error: String,
        after: Duration,
    },
    /// Replication cannot go on without an operator: the message says why and what to do.
    Stop {
        error: String,
    },
    /// The replica stored definition `hash`, or refused it (replication goes on).
    Definition {
        hash: DefinitionHash,
        result: Result<(), String>,
    },
    /// Planned failover: `parent` (this tracker's last, sealed generation) is on the replica;
    /// adopt this site's images as the replica that waits for the reverse cycle continuing
    /// it, then report [`Event::Adopted`].
    Adopt {
        parent: LineagePoint,
    },
    /// Planned failover done: the replica is the primary in `lineage`, which continues
    /// `parent`. The session is over.
    Finished {
        parent: LineagePoint,
        lineage: Lineage,
    },
    /// The replica site recorded the pause since `since` (or, None, holds nothing a pause
    /// concerns: an empty replica, a site the VM failed over to).
    PauseTold {
        since: Option<u64>,
    },
    /// The replica site could not be told of the pause; tried again after `after`.
    PauseUntold {
        error: String,
        after: Duration,
    },
}

/// What a planned failover asks the replica (see `Message::Promote`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub back: Endpoint,
    pub here: Endpoint,
    pub interval: String,
    pub start: bool,
    pub definition: Option<String>,
}

pub struct Config {
    pub vm: String,
    /// Between freezes; None: continuous (the next freeze follows each release).
    pub interval: Option<Duration>,
    /// No initial copy before this instant.
    pub initial_sync_at: Option<Instant>,
    /// A planned failover: ship the last generation, then promote the replica.
    pub planned: Option<Planned>,
    /// Start paused since then (seconds since the epoch): a pause survives a restart, and
    /// the replica site is told of it again if its welcome shows it does not record it.
    pub paused: Option<u64>,
    /// When replication was last resumed (seconds since the epoch; 0: unknown), for a
    /// replica site that still records a pause.
    pub resumed_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting to (re)start: at `at`, ask the tracker for its state.
    Idle {
        at: Instant,
    },
    /// The tracker's status before connecting.
    Status,
    Connecting,
    Hello,
    /// A tracker operation in flight; `then` what it was for.
    Tracker(After),
    /// Until `until`, then freeze (`full`).
    Waiting {
        until: Instant,
        full: bool,
    },
    Resume {
        applied: RangeSet,
    },
    Planning {
        applied: RangeSet,
    },
    Sending {
        plan: RangeSet,
    },
    Manifest,
    /// The divergent ranges of a replica waiting for a reverse cycle, arriving.
    Divergent {
        ranges: RangeSet,
    },
    /// Planned failover: the driver adopts, then the replica is promoted.
    Adopting {
        parent: LineagePoint,
    },
    Promoting {
        parent: LineagePoint,
    },
    Stopped,
    /// Paused by an operator: nothing is frozen or shipped; the replica site was told (or
    /// holds nothing a pause concerns).
    Paused,
    /// Paused, the replica site not told yet: at `at`, connect to tell it.
    PauseWait {
        at: Instant,
    },
    /// Paused, telling the replica site: this step, given up at `until`.
    Telling {
        step: Tell,
        until: Instant,
    },
    /// Resumed: the replica's welcome showed a pause it still records; `Resumed` was sent,
    /// its acknowledgement awaited before anything else.
    Resuming,
}

/// The steps of telling the replica site of a pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tell {
    Connecting,
    Hello,
    /// `Paused` sent, waiting for `PauseNoted`.
    Noting,
}

/// What a tracker operation was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Decide,
    /// After a release: clear the resync flags if the released generation was a full freeze
    /// made while they were set (one frozen before tracking was lost does not cover what was
    /// written since), then decide.
    Released {
        clear: bool,
    },
    /// After a freeze: remember whether it was a full one asked for because of the resync
    /// flags.
    Froze {
        for_resync: bool,
    },
    /// After the reverse cycle's divergent ranges were marked dirty.
    Marked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cycle {
    lineage: Lineage,
    generation: u64,
    kind: CycleKind,
    freeze: u64,
    epoch: u64,
    parent: Option<LineagePoint>,
}

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub struct ShipperSession {
    cfg: Config,
    phase: Phase,
    attempt: u64,
    tracker: Option<TrackerView>,
    replica: Option<ReplicaView>,
    cycle: Option<Cycle>,
    last_freeze: Option<Instant>,
    backoff: Duration,
    now: Instant,
    /// The id of a full freeze made while the tracker's resync flags were set: releasing it
    /// clears them.
    resync_freeze: Option<u64>,
    /// A resync was decided (the next freeze is a full one), whatever the tracker's flags say
    /// once its lineage is set.
    must_resync: bool,
    /// The decision to resync was saved in the tracker (its resync flags), this process: a
    /// restarted shipper reads it back from them.
    resync_marked: bool,
    /// Bytes of the cycle being shipped (its manifest's), and of them, those the replica
    /// held when this attempt began.
    cycle_bytes: u64,
    cycle_skipped: u64,
    /// The definition to keep on the replica, the one the replica holds (as its welcome or
    /// its last answer said), the one sent on this attempt, and the last one it refused.
    definition: Option<Definition>,
    replica_definition: Option<DefinitionHash>,
    definition_sent: Option<DefinitionHash>,
    definition_refused: Option<DefinitionHash>,
    /// The divergent ranges of a replica waiting for a reverse cycle, and whether this
    /// session marked them dirty in the tracker.
    divergent: Option<RangeSet>,
    reverse_marked: bool,
    /// Planned failover: the first generation this session froze (after the seal), and the
    /// replica's new lineage once it was promoted.
    final_from: Option<u64>,
    promoted: Option<Lineage>,
    /// The operator's pause in force (since), the last resume's time, and the pause the
    /// replica records (as its welcome or its last `PauseNoted` said).
    paused_since: Option<u64>,
    resumed_at: u64,
    replica_paused: Option<u64>,
    actions: VecDeque<Action>,
}

impl ShipperSession {
    pub fn new(cfg: Config, now: Instant) -> ShipperSession {
        let phase = if cfg.paused.is_some() {
            Phase::PauseWait { at: now }
        } else {
            Phase::Idle { at: now }
        };
        let (paused_since, resumed_at) = (cfg.paused, cfg.resumed_at);
        ShipperSession {
            cfg,
            phase,
            attempt: 0,
            tracker: None,
            replica: None,
            cycle: None,
            last_freeze: None,
            backoff: MIN_BACKOFF,
            now,
            resync_freeze: None,
            must_resync: false,
            resync_marked: false,
            cycle_bytes: 0,
            cycle_skipped: 0,
            definition: None,
            replica_definition: None,
            definition_sent: None,
            definition_refused: None,
            divergent: None,
            reverse_marked: false,
            final_from: None,
            promoted: None,
            paused_since,
            resumed_at,
            replica_paused: None,
            actions: VecDeque::new(),
        }
    }

    /// The definition the replica should hold (None: the session sends none). Sent before the
    /// next cycle begins if the replica holds another.
    pub fn set_definition(&mut self, d: Option<Definition>) {
        self.definition = d;
    }

    /// Sends the definition if the replica holds another one and it was neither sent on this
    /// attempt nor refused.
    fn offer_definition(&mut self) {
        let Some(d) = &self.definition else { return };
        // A site the VM failed over to runs it from the definition it holds: not replaced.
        if self
            .replica
            .as_ref()
            .is_some_and(|r| matches!(r.role, Role::FailedOver { .. } | Role::Primary { .. }))
        {
            return;
        }
        if self.replica_definition == Some(d.hash)
            || self.definition_sent == Some(d.hash)
            || self.definition_refused == Some(d.hash)
        {
            return;
        }
        let msg = Message::Definition {
            hash: d.hash,
            definition: d.text.clone(),
            reverse: d.reverse.clone(),
        };
        self.definition_sent = Some(d.hash);
        self.act(Action::Send {
            attempt: self.attempt,
            msg,
        });
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the session wants a [`Event::Tick`] (None: only when something happens).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Idle { at } | Phase::PauseWait { at } => Some(*at),
            Phase::Waiting { until, .. } | Phase::Telling { until, .. } => Some(*until),
            _ => None,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Paused by an operator (whether or not the replica site was told yet).
    pub fn is_paused(&self) -> bool {
        matches!(
            self.phase,
            Phase::Paused | Phase::PauseWait { .. } | Phase::Telling { .. }
        )
    }

    /// Between cycles: waiting for the interval (or paused, or stopped), no attempt or
    /// tracker operation under way.
    pub fn is_idle(&self) -> bool {
        matches!(
            self.phase,
            Phase::Waiting { .. } | Phase::Paused | Phase::PauseWait { .. } | Phase::Stopped
        )
    }

    /// The interval in force (None: continuous).
    pub fn interval(&self) -> Option<Duration> {
        self.cfg.interval
    }

    /// The cycle being shipped: generation, kind.
    pub fn current(&self) -> Option<(u64, CycleKind)> {
        self.cycle.map(|c| (c.generation, c.kind))
    }

    fn act(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn tracker_op(&mut self, op: TrackerOp, then: After) {
        self.phase = Phase::Tracker(then);
        self.act(Action::Tracker(op));
    }

    /// The first message of a connected attempt.
    fn say_hello(&mut self, attempt: u64) {
        self.definition_sent = None;
        let lineage = self.tracker.as_ref().and_then(|t| t.lineage);
        self.act(Action::Send {
            attempt,
            msg: Message::Hello {
                version: PROTOCOL_VERSION,
                vm: self.cfg.vm.clone(),
                lineage,
            },
        });
    }

    /// Gives up the attempt: closes the connection and retries after a backoff.
    fn retry(&mut self, error: String) {
        if self.phase == Phase::Stopped {
            return;
        }
        if !matches!(self.phase, Phase::Idle { .. } | Phase::Status) {
            self.act(Action::Close {
                attempt: self.attempt,
            });
        }
        let after = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.act(Action::Retry { error, after });
        self.phase = Phase::Idle {
            at: self.now + after,
        };
        self.cycle = None;
    }

    fn stop(&mut self, error: String) {
        self.act(Action::Close {
            attempt: self.attempt,
        });
        self.act(Action::Stop { error });
        self.phase = Phase::Stopped;
        self.cycle = None;
    }

    pub fn handle(&mut self, ev: Event, now: Instant) {
        self.now = now;
        if matches!(
            ev,
            Event::Pause { .. }
                | Event::Resume { .. }
                | Event::ResyncRequested
                | Event::SetInterval(_)
        ) {
            return self.operator(ev);
        }
        if self.is_paused() {
            return self.paused_event(ev);
        }
        if self.phase == Phase::Stopped {
            return;
        }
        match ev {
            Event::Tick => match self.phase.clone() {
                Phase::Idle { at } if now >= at => {
                    self.phase = Phase::Status;
                    self.act(Action::Tracker(TrackerOp::Status));
                }
                Phase::Waiting { until, full } if now >= until => {
                    self.last_freeze = Some(now);
                    let for_resync = full
                        && (self.must_resync
                            || self.tracker.as_ref().is_some_and(|t| t.resync_required));
                    self.tracker_op(TrackerOp::Freeze { full }, After::Froze { for_resync });
                }
                _ => {}
            },
            Event::Tracker(r) => self.tracker_answer(r),
            Event::Adopted(r) => {
                let Phase::Adopting { parent } = self.phase.clone() else {
                    return;
                };
                match r {
                    Err(e) => self.stop(format!(
                        "VM {}: adopting this site's images as the replica failed: {e}",
                        self.cfg.vm
                    )),
                    Ok(()) => self.promote(parent),
                }
            }
            Event::Connected { attempt }
                if attempt == self.attempt && self.phase == Phase::Connecting =>
            {
                self.phase = Phase::Hello;
                self.say_hello(attempt);
            }
            Event::Disconnected { attempt, reason }
                if attempt == self.attempt
                    && !matches!(self.phase, Phase::Idle { .. } | Phase::Status) =>
            {
                self.retry(reason);
            }
            Event::Message { attempt, msg } if attempt == self.attempt => self.message(msg),
            Event::Planned { attempt, result } if attempt == self.attempt => {
                let (Phase::Planning { applied }, Some(c)) = (self.phase.clone(), self.cycle)
                else {
                    return;
                };
                match result {
                    Ok(runs) => {
                        let mut plan = runs.clone();
                        plan.union(&applied);
                        self.cycle_skipped = applied.bytes();
                        let mut todo = runs;
                        if c.kind != CycleKind::Resync {
                            for r in applied.iter() {
                                todo.remove(r.disk, r.offset, r.end());
                            }
                        }
                        self.phase = Phase::Sending { plan };
                        self.act(Action::SendData {
                            attempt,
                            tag: Tag {
                                lineage: c.lineage,
                                cycle: c.generation,
                                epoch: c.epoch,
                            },
                            freeze: c.freeze,
                            ranges: todo.iter().collect(),
                        });
                    }
                    Err(e) => self.retry(e),
                }
            }
            Event::Sent { attempt, result } if attempt == self.attempt => {
                let (Phase::Sending { plan }, Some(c)) = (self.phase.clone(), self.cycle) else {
                    return;
                };
                match result {
                    Ok(()) => {
                        self.phase = Phase::Manifest;
                        self.act(Action::Send {
                            attempt,
                            msg: Message::Manifest {
                                lineage: c.lineage,
                                cycle: c.generation,
                                epoch: c.epoch,
                                ranges: plan.len() as u64,
                                bytes: plan.bytes(),
                                digest: plan.digest(),
                            },
                        });
                        self.cycle_bytes = plan.bytes();
                    }
                    Err(e) => self.retry(e),
                }
            }
            _ => {} // an earlier attempt's, or out of turn
        }
    }

    fn tracker_answer(&mut self, r: Result<TrackerView, String>) {
        let phase = self.phase.clone();
        let t = match r {
            Ok(t) => t,
            Err(e) => {
                if matches!(phase, Phase::Status | Phase::Tracker(_)) {
                    // Whether a mark in flight was saved is unknown: it is made again.
                    self.resync_marked = false;
                    self.retry(e);
                }
                return;
            }
        };
        self.tracker = Some(t);
        match phase {
            Phase::Status => {
                self.attempt += 1;
                self.phase = Phase::Connecting;
                self.act(Action::Connect {
                    attempt: self.attempt,
                });
            }
            Phase::Tracker(After::Released { clear: true }) => {
                self.tracker_op(TrackerOp::ClearResync, After::Decide);
            }
            Phase::Tracker(After::Marked) => {
                self.reverse_marked = true;
                self.decide();
            }
            Phase::Tracker(After::Froze { for_resync }) => {
                if self.cfg.planned.is_some() && self.final_from.is_none() {
                    self.final_from = self
                        .tracker
                        .as_ref()
                        .and_then(|t| t.frozen)
                        .map(|f| f.generation);
                }
                let full = self
                    .tracker
                    .as_ref()
                    .and_then(|t| t.frozen)
                    .filter(|f| f.full);
                if let (true, Some(f)) = (for_resync, full) {
                    self.resync_freeze = Some(f.id);
                }
                if full.is_some() {
                    self.must_resync = false;
                    self.resync_marked = false;
                }
                self.decide();
            }
            Phase::Tracker(_) => self.decide(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod pause_tests;
#[cfg(test)]
mod tests;
