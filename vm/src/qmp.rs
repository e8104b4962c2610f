//! A blocking QMP client (QEMU Machine Protocol, docs/interop/qmp-spec).
//!
//! Connect reads the greeting and negotiates capabilities (none enabled: in-band only).
//! Every command carries an id; replies with another id (late answers to a command that
//! timed out) are dropped, so a timeout leaves the connection usable. Asynchronous events
//! arriving meanwhile are buffered for [`Qmp::wait_event`] and [`Qmp::take_events`].

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::conn::{excerpt, LineConn};
use crate::error::{connect, wire, Peer, ProtocolError};

/// Errors of QMP: the protocol errors shared with the guest agent.
pub type QmpError = ProtocolError;

/// Events kept when nobody takes them (the oldest are dropped beyond this).
const MAX_BUFFERED_EVENTS: usize = 1024;

/// An asynchronous event (`SHUTDOWN`, `STOP`, `BLOCK_IO_ERROR`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU stamped it.
    pub timestamp: Option<(i64, i64)>,
}

/// One QMP connection.
pub struct Qmp {
    conn: LineConn,
    greeting: Value,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    timeout: Duration,
}

enum Message {
    Event(QmpEvent),
    Reply { id: Option<Value>, body: Reply },
}

enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

impl Qmp {
    /// Connects to QEMU's QMP socket and negotiates; `timeout` bounds this and each later
    /// command (see [`Qmp::set_timeout`]).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let conn = connect(Peer::qmp(socket), Instant::now() + timeout, timeout)?;
        Self::handshake(conn, timeout)
    }

    /// Negotiates over an already connected stream (tests, or a socket passed in).
    pub fn handshake(mut conn: LineConn, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let doing = "reading the greeting";
        let line = conn
            .read_line(deadline)
            .map_err(|e| wire(conn.peer(), e, timeout, doing))?;
        let greeting = serde_json::from_slice::<Value>(&line)
            .ok()
            .filter(|v| v.get("QMP").is_some_and(Value::is_object))
            .ok_or_else(|| QmpError::Malformed {
                peer: conn.peer().clone(),
                doing: doing.into(),
                reason: "not a QMP greeting (is this a QMP socket?)".into(),
                line: excerpt(&line),
            })?;
        let mut q = Qmp {
            conn,
            greeting,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
        };
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version as `major.minor.micro`, from the greeting.
    pub fn qemu_version(&self) -> Option<String> {
        let v = &self.greeting["QMP"]["version"]["qemu"];
        Some(format!(
            "{}.{}.{}",
            v["major"].as_u64()?,
            v["minor"].as_u64()?,
            v["micro"].as_u64()?
        ))
    }

    /// The timeout of each command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The socket this connection is on.
    pub fn socket(&self) -> &Path {
        &self.conn.peer().socket
    }

    /// Runs `command` with `arguments` (an object, or None); its `return` value, or the
    /// error QEMU replied as [`QmpError::Command`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, self.timeout)
    }

    /// [`Qmp::execute`] with its own timeout.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), json!(command));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), json!(id));
        let mut bytes = serde_json::to_vec(&Value::Object(msg)).expect("JSON serializes");
        bytes.push(b'\n');
        let deadline = Instant::now() + timeout;
        let doing = format!("running {command}");
        let peer = self.conn.peer().clone();
        self.conn
            .write_all(&bytes, deadline)
            .map_err(|e| wire(&peer, e, timeout, &doing))?;
        loop {
            match self.next_message(deadline, timeout, &doing)? {
                Message::Event(e) => self.buffer(e),
                Message::Reply { id: Some(got), .. } if got != json!(id) => {
                    tracing::debug!(%peer, ?got, "dropping a late QMP reply");
                }
                Message::Reply {
                    id: None,
                    body: Reply::Return(_),
                } => {
                    return Err(QmpError::Malformed {
                        peer,
                        doing,
                        reason: "a reply without the command's id".into(),
                        line: String::new(),
                    })
                }
                Message::Reply { body, .. } => {
                    return match body {
                        Reply::Return(v) => Ok(v),
                        Reply::Error { class, desc } => Err(QmpError::Command {
                            peer,
                            command: command.to_string(),
                            class,
                            desc,
                        }),
                    }
                }
            }
        }
    }

    fn buffer(&mut self, e: QmpEvent) {
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn next_message(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        doing: &str,
    ) -> Result<Message, QmpError> {
        let peer = self.conn.peer().clone();
        let line = self
            .conn
            .read_line(deadline)
            .map_err(|e| wire(&peer, e, timeout, doing))?;
        let bad = |reason: &str| QmpError::Malformed {
            peer: peer.clone(),
            doing: doing.to_string(),
            reason: reason.to_string(),
            line: excerpt(&line),
        };
        let v: Value = serde_json::from_slice(&line).map_err(|_| bad("not JSON"))?;
        let Value::Object(mut o) = v else {
            return Err(bad("not a JSON object"));
        };
        if let Some(name) = o.get("event") {
            let name = name
                .as_str()
                .ok_or_else(|| bad("an event name that is not a string"))?;
            let ts = o
                .get("timestamp")
                .and_then(|t| Some((t["seconds"].as_i64()?, t["microseconds"].as_i64()?)));
            return Ok(Message::Event(QmpEvent {
                name: name.to_string(),
                data: o.remove("data").unwrap_or(Value::Null),
                timestamp: ts,
            }));
        }
        let id = o.remove("id");
        if let Some(r) = o.remove("return") {
            return Ok(Message::Reply {
                id,
                body: Reply::Return(r),
            });
        }
        if let Some(e) = o.get("error") {
            let class = e["class"].as_str().unwrap_or("(no class)").to_string();
            let desc = e["desc"].as_str().unwrap_or("(no description)").to_string();
            return Ok(Message::Reply {
                id,
                body: Reply::Error { class, desc },
            });
        }
        Err(bad("neither a reply nor an event"))
    }

    /// Waits up to `timeout` for event `name` (a buffered one first); other events that
    /// arrive meanwhile stay buffered.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        self.wait_event_where(timeout, |e| e.name == name)
    }

    /// Waits up to `timeout` for the first event `pick` accepts.
    pub fn wait_event_where(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&QmpEvent) -> bool,
    ) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(&mut pick) {
            return Ok(self.events.remove(i).expect("index found"));
        }
        let deadline = Instant::now() + timeout;
        let doing = "waiting for an event";
        loop {
            match self.next_message(deadline, timeout, doing)? {
                Message::Event(e) if pick(&e) => return Ok(e),
                Message::Event(e) => self.buffer(e),
                Message::Reply { .. } => {} // a late reply to a command that timed out
            }
        }
    }

    /// Reads whatever events arrive within `wait` (zero: only what is already buffered or
    /// readable at once), then returns and forgets all buffered events.
    pub fn take_events(&mut self, wait: Duration) -> Result<Vec<QmpEvent>, QmpError> {
        let deadline = Instant::now() + wait.max(Duration::from_millis(1));
        loop {
            match self.next_message(deadline, wait, "reading events") {
                Ok(Message::Event(e)) => self.buffer(e),
                Ok(Message::Reply { .. }) => {}
                Err(QmpError::Timeout { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.events.drain(..).collect())
    }

    /// `query-status`: the run state (`running`, `paused`, `shutdown`, `prelaunch`, ...).
    pub fn query_status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        v["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Malformed {
                peer: self.conn.peer().clone(),
                doing: "running query-status".into(),
                reason: "no status in the reply".into(),
                line: excerpt(v.to_string().as_bytes()),
            })
    }
}

#[cfg(test)]
#[path = "qmp_tests.rs"]
mod tests;
