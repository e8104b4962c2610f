//! An operator's events (pause, resume, resync, a new interval), and telling the replica
//! site of a pause.
//!
//! Paused, the session tells the replica site: between cycles on the connection it holds,
//! else on a connection of its own (at once; when the applier cannot be reached, again
//! after a backoff, for as long as the pause lasts). It sends `Paused { since }` unless the
//! welcome shows the replica records that very pause already, or holds nothing a pause
//! concerns (an empty replica, which a pause must not create; a site the VM failed over
//! to, whose status is the failover's); the applier saves it before it answers
//! `PauseNoted`. Each try is bounded ([`TELL_TIMEOUT`]); told, the session closes the
//! connection and holds none until it resumes. Resumed, the next welcome shows whether the
//! replica still records a pause, and `Resumed` ends it before anything else is asked.

use std::time::Duration;

use vmreplica_common::wire::{Message, Role};

use super::{Action, Event, Phase, ShipperSession, Tell, MAX_BACKOFF, MIN_BACKOFF};

/// How long one try to tell the replica site of a pause may take (connect, hello, the
/// acknowledgement), before it is given up and tried again later.
pub const TELL_TIMEOUT: Duration = Duration::from_secs(30);

/// The refusal of an applier of another protocol version.
pub(super) fn version_refused(theirs: u16) -> String {
    vmreplica_common::wire::version_refused(
        "the applier",
        theirs,
        "this shipper",
        "replica",
        "primary",
    )
}

impl ShipperSession {
    /// Operator events: pause, resume, resync, a new interval.
    pub(super) fn operator(&mut self, ev: Event) {
        match ev {
            Event::Pause { since } => {
                if self.is_paused() {
                    return;
                }
                self.paused_since = Some(since);
                self.cycle = None;
                self.backoff = MIN_BACKOFF;
                match self.phase {
                    // Between cycles, connected: told on this connection.
                    Phase::Waiting { .. } => self.tell(),
                    // No connection (or none any more).
                    Phase::Idle { .. } | Phase::Status | Phase::Stopped => self.tell_later(),
                    _ => {
                        // The attempt ends, and with it the connection; a tracker operation
                        // in flight finishes on its own and its answer is ignored (resume
                        // reads the tracker's state afresh).
                        self.act(Action::Close {
                            attempt: self.attempt,
                        });
                        self.tell_later();
                    }
                }
            }
            Event::Resume { at } => {
                if !self.is_paused() && self.phase != Phase::Stopped {
                    return;
                }
                if matches!(self.phase, Phase::Telling { .. }) {
                    self.act(Action::Close {
                        attempt: self.attempt,
                    });
                }
                if self.paused_since.take().is_some() {
                    self.resumed_at = at;
                }
                self.backoff = MIN_BACKOFF;
                self.phase = Phase::Idle { at: self.now };
                self.handle(Event::Tick, self.now);
            }
            Event::ResyncRequested => {
                self.must_resync = true;
                if let Phase::Waiting { .. } = self.phase {
                    self.phase = Phase::Waiting {
                        until: self.now,
                        full: true,
                    };
                    self.handle(Event::Tick, self.now);
                }
            }
            Event::SetInterval(i) => {
                self.cfg.interval = i;
                if let Phase::Waiting { full: false, .. } = self.phase {
                    let until = match (i, self.last_freeze) {
                        (Some(i), Some(last)) => last + i,
                        _ => self.now,
                    };
                    self.phase = Phase::Waiting { until, full: false };
                    self.handle(Event::Tick, self.now);
                }
            }
            _ => {}
        }
    }

    /// Tells the replica site on a new connection, at once.
    fn tell_later(&mut self) {
        self.phase = Phase::PauseWait { at: self.now };
        self.handle(Event::Tick, self.now);
    }

    /// Connected and welcomed (the replica known): says `Paused` if the replica needs to
    /// hear it, else is done.
    fn tell(&mut self) {
        let Some(since) = self.paused_since else {
            return;
        };
        let concerns = self.replica.is_some_and(|r| {
            r.role == Role::Replica
                && (r.lineage.is_some() || r.last_cycle > 0 || r.receiving.is_some())
        });
        if !concerns || self.replica_paused == Some(since) {
            return self.told(self.replica_paused.filter(|_| concerns));
        }
        self.phase = Phase::Telling {
            step: Tell::Noting,
            until: self.now + TELL_TIMEOUT,
        };
        self.act(Action::Send {
            attempt: self.attempt,
            msg: Message::Paused { since },
        });
    }

    fn told(&mut self, since: Option<u64>) {
        self.backoff = MIN_BACKOFF;
        self.act(Action::Close {
            attempt: self.attempt,
        });
        self.act(Action::PauseTold { since });
        self.phase = Phase::Paused;
    }

    fn untold(&mut self, error: String) {
        self.act(Action::Close {
            attempt: self.attempt,
        });
        let after = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.act(Action::PauseUntold { error, after });
        self.phase = Phase::PauseWait {
            at: self.now + after,
        };
    }

    /// What a paused session does with an event: tell the replica site, ignore the rest
    /// (tracker answers, an earlier attempt's news).
    pub(super) fn paused_event(&mut self, ev: Event) {
        let now = self.now;
        match (self.phase.clone(), ev) {
            (Phase::PauseWait { at }, Event::Tick) if now >= at => {
                self.attempt += 1;
                self.phase = Phase::Telling {
                    step: Tell::Connecting,
                    until: now + TELL_TIMEOUT,
                };
                self.act(Action::Connect {
                    attempt: self.attempt,
                });
            }
            (Phase::Telling { .. }, Event::Tick)
                if self.poll_timeout().is_some_and(|u| now >= u) =>
            {
                self.untold(format!(
                    "the applier did not answer within {}s",
                    TELL_TIMEOUT.as_secs()
                ));
            }
            (
                Phase::Telling {
                    step: Tell::Connecting,
                    until,
                },
                Event::Connected { attempt },
            ) if attempt == self.attempt => {
                self.phase = Phase::Telling {
                    step: Tell::Hello,
                    until,
                };
                self.say_hello(attempt);
            }
            (Phase::Telling { .. }, Event::Disconnected { attempt, reason })
                if attempt == self.attempt =>
            {
                self.untold(reason);
            }
            (Phase::Telling { step, .. }, Event::Message { attempt, msg })
                if attempt == self.attempt =>
            {
                self.tell_message(step, msg);
            }
            _ => {}
        }
    }

    fn tell_message(&mut self, step: Tell, msg: Message) {
        match (step, msg) {
            (_, Message::Error { code, message }) => {
                self.untold(format!("the applier: {message} (code {code})"))
            }
            (Tell::Hello, welcome @ Message::Welcome { .. }) => {
                let w = match super::Welcomed::of(welcome) {
                    Ok(w) => w,
                    Err(refused) => return self.untold(refused),
                };
                self.replica = Some(w.view);
                self.replica_paused = w.paused;
                self.tell();
            }
            (Tell::Noting, Message::PauseNoted { paused }) => {
                self.replica_paused = paused;
                if paused.is_some() && paused == self.paused_since {
                    self.told(paused);
                } else {
                    self.untold(format!(
                        "the applier recorded the pause {paused:?}, not the one since {:?}",
                        self.paused_since
                    ));
                }
            }
            // A replica waiting for a reverse cycle follows its welcome with these.
            (_, Message::Divergent { .. } | Message::DefinitionStored { .. }) => {}
            (_, m) => self.untold(format!(
                "unexpected {} from the applier while telling it of the pause",
                m.name()
            )),
        }
    }

    /// After the welcome of an attempt that is not paused: a replica that still records a
    /// pause hears `Resumed` before anything else (true: wait for its answer).
    pub(super) fn resume_replica(&mut self, paused: Option<u64>) -> bool {
        self.replica_paused = paused;
        // A replica waiting for a reverse cycle sends its divergent ranges after the
        // welcome: its pause waits for the next welcome, once it is a replica again.
        let pending = self
            .replica
            .is_some_and(|r| matches!(r.role, Role::ReversePending { .. }));
        if paused.is_none() || pending {
            return false;
        }
        self.phase = Phase::Resuming;
        self.act(Action::Send {
            attempt: self.attempt,
            msg: Message::Resumed {
                at: self.resumed_at,
            },
        });
        true
    }

    /// The replica's answer to `Resumed`: the pause ended, the welcome's work goes on.
    pub(super) fn resumed_replica(&mut self, paused: Option<u64>) {
        if let Some(since) = paused {
            return self.retry(format!(
                "the applier still records the pause since {since} after it was told of the \
                 resume"
            ));
        }
        self.replica_paused = None;
        self.offer_definition();
        self.decide();
    }
}
