//! A blocking client of the QEMU guest agent (qemu-ga) over its host-side unix socket.
//!
//! virtio-serial has no connection semantics: the agent may hold half a request of an
//! earlier client, and its output may hold replies nobody read. So every session starts
//! with `guest-sync-delimited`: a 0xFF byte (the agent's parser resets), the command with a
//! random id, then everything is skipped up to a 0xFF the agent sends before the reply
//! carrying that id. After any timeout the next command syncs again.
//!
//! [`GuestAgent::freeze_then`] freezes the guest's filesystems, runs a closure and always
//! thaws: after an error, a timeout, or a panic in the closure.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::conn::{excerpt, LineConn};
use crate::error::{connect, wire, Peer, ProtocolError};

/// What can go wrong with the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{peer}: guest-fsfreeze-freeze failed ({freeze}); {}", thaw_outcome(.thaw))]
    FreezeFailed {
        peer: Peer,
        freeze: Box<ProtocolError>,
        /// The thaw tried afterwards: None when it worked (or was not needed).
        thaw: Option<Box<ProtocolError>>,
    },
    #[error("{peer}: the guest may still be frozen (for {frozen_for:?} so far): thawing failed: {source}; run guest-fsfreeze-thaw through the agent, or check the guest")]
    ThawFailed {
        peer: Peer,
        frozen_for: Duration,
        source: Box<ProtocolError>,
    },
}

fn thaw_outcome(thaw: &Option<Box<ProtocolError>>) -> String {
    match thaw {
        None => "the guest is thawed".into(),
        Some(e) => format!(
            "and thawing failed too, so the guest may still be frozen: {e}; run guest-fsfreeze-thaw through the agent"
        ),
    }
}

/// The agent's view of its filesystems.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// How long freezing and thawing may take.
#[derive(Clone, Copy, Debug)]
pub struct FreezeTimeouts {
    /// `guest-fsfreeze-freeze` syncs every filesystem first: allow for writeback.
    pub freeze: Duration,
    /// All attempts to thaw together (each resyncs first).
    pub thaw: Duration,
}

impl Default for FreezeTimeouts {
    fn default() -> Self {
        FreezeTimeouts {
            freeze: Duration::from_secs(30),
            thaw: Duration::from_secs(10),
        }
    }
}

/// The result of [`GuestAgent::freeze_then`].
#[derive(Debug)]
pub struct Frozen<T> {
    /// What the closure returned.
    pub value: T,
    /// Filesystems the agent froze.
    pub filesystems: u64,
    /// From sending the freeze to the thaw's reply: the longest the guest can have been
    /// frozen.
    pub frozen_for: Duration,
}

/// One guest-agent connection.
pub struct GuestAgent {
    conn: LineConn,
    timeout: Duration,
    synced: bool,
}

impl GuestAgent {
    /// Connects and syncs, both within `timeout` (also each later command's timeout).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<GuestAgent, ProtocolError> {
        let conn = connect(Peer::agent(socket), Instant::now() + timeout, timeout)?;
        let mut a = Self::over(conn, timeout);
        a.sync()?;
        Ok(a)
    }

    /// Waits up to `timeout` for the agent to answer (a guest still booting starts it late):
    /// connects and syncs again every 2 s until it does.
    pub fn wait_ready(socket: &Path, timeout: Duration) -> Result<GuestAgent, ProtocolError> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            let r = connect(Peer::agent(socket), Instant::now() + attempt, attempt).and_then(|c| {
                let mut a = Self::over(c, attempt);
                a.sync().map(|()| a)
            });
            match r {
                Ok(mut a) => {
                    a.timeout = timeout;
                    return Ok(a);
                }
                Err(e) if Instant::now() + Duration::from_millis(200) >= deadline => return Err(e),
                Err(ProtocolError::Timeout { .. }) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Uses an already connected stream; call [`GuestAgent::sync`] before anything else.
    pub fn over(conn: LineConn, timeout: Duration) -> GuestAgent {
        GuestAgent {
            conn,
            timeout,
            synced: false,
        }
    }

    /// Treats the stream as in step without syncing (for fuzzing the reply handling, which a
    /// random sync id would keep out of reach).
    #[doc(hidden)]
    pub fn assume_synced(&mut self) {
        self.synced = true;
    }

    /// The timeout of each command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The socket this connection is on.
    pub fn socket(&self) -> &Path {
        &self.conn.peer().socket
    }

    fn peer(&self) -> Peer {
        self.conn.peer().clone()
    }

    /// `guest-sync-delimited`: brings the stream back in step.
    pub fn sync(&mut self) -> Result<(), ProtocolError> {
        let id: i64 = rand::random::<i64>() & ((1 << 53) - 1);
        let deadline = Instant::now() + self.timeout;
        let doing = "syncing (guest-sync-delimited)";
        let peer = self.peer();
        let w = |e| wire(&peer, e, self.timeout, doing);
        self.synced = false;
        self.conn.discard_buffered();
        let mut req = vec![0xff];
        req.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        req.push(b'\n');
        self.conn.write_all(&req, deadline).map_err(w)?;
        loop {
            self.conn.skip_past(0xff, deadline).map_err(w)?;
            let line = self.conn.read_line(deadline).map_err(w)?;
            let v: Option<Value> = serde_json::from_slice(&line).ok();
            if v.as_ref()
                .and_then(|v| v.get("return"))
                .and_then(Value::as_i64)
                == Some(id)
            {
                self.synced = true;
                return Ok(());
            }
            tracing::debug!(%peer, line = %excerpt(&line), "skipping stale guest-agent output");
        }
    }

    /// Runs `command` with `arguments`; its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, ProtocolError> {
        self.execute_within(command, arguments, self.timeout)
    }

    /// [`GuestAgent::execute`] with its own timeout.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ProtocolError> {
        if !self.synced {
            self.sync()?;
        }
        let r = self.execute_synced(command, arguments, timeout);
        if matches!(
            r,
            Err(ProtocolError::Timeout { .. } | ProtocolError::Malformed { .. })
        ) {
            self.synced = false;
        }
        r
    }

    fn execute_synced(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ProtocolError> {
        let deadline = Instant::now() + timeout;
        let doing = format!("running {command}");
        let peer = self.peer();
        let w = |e| wire(&peer, e, timeout, &doing);
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.conn.write_all(&bytes, deadline).map_err(w)?;
        let line = self.conn.read_line(deadline).map_err(w)?;
        let bad = |reason: &str| ProtocolError::Malformed {
            peer: peer.clone(),
            doing: doing.clone(),
            reason: reason.into(),
            line: excerpt(&line),
        };
        let mut v: Value = serde_json::from_slice(&line).map_err(|_| bad("not JSON"))?;
        if let Some(r) = v.get_mut("return") {
            return Ok(r.take());
        }
        if let Some(e) = v.get("error") {
            return Err(ProtocolError::Command {
                peer: peer.clone(),
                command: command.to_string(),
                class: e["class"].as_str().unwrap_or("(no class)").to_string(),
                desc: e["desc"].as_str().unwrap_or("(no description)").to_string(),
            });
        }
        Err(bad("neither a reply nor an error"))
    }

    fn count(&mut self, command: &str, timeout: Duration) -> Result<u64, ProtocolError> {
        let v = self.execute_within(command, None, timeout)?;
        v.as_u64().ok_or_else(|| ProtocolError::Malformed {
            peer: self.peer(),
            doing: format!("running {command}"),
            reason: "the reply is not a count".into(),
            line: excerpt(v.to_string().as_bytes()),
        })
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<(), ProtocolError> {
        self.execute("guest-ping", None).map(|_| ())
    }

    /// `guest-fsfreeze-status`.
    pub fn fsfreeze_status(&mut self) -> Result<FreezeStatus, ProtocolError> {
        let v = self.execute("guest-fsfreeze-status", None)?;
        match v.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            _ => Err(ProtocolError::Malformed {
                peer: self.peer(),
                doing: "running guest-fsfreeze-status".into(),
                reason: "neither \"thawed\" nor \"frozen\"".into(),
                line: excerpt(v.to_string().as_bytes()),
            }),
        }
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen. Prefer
    /// [`GuestAgent::freeze_then`], which always thaws.
    pub fn fsfreeze_freeze(&mut self, timeout: Duration) -> Result<u64, ProtocolError> {
        self.count("guest-fsfreeze-freeze", timeout)
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub fn fsfreeze_thaw(&mut self, timeout: Duration) -> Result<u64, ProtocolError> {
        self.count("guest-fsfreeze-thaw", timeout)
    }

    /// Thaws, retrying (each attempt resyncs) until `within` has passed.
    fn thaw_hard(&mut self, within: Duration) -> Result<u64, ProtocolError> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fsfreeze_thaw(left.max(Duration::from_millis(100))) {
                Ok(n) => return Ok(n),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "thawing the guest failed; retrying");
                    self.synced = false;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Freezes the guest's filesystems, runs `f`, and thaws: always, also when freezing
    /// timed out (the guest may have frozen anyway), and when `f` panics (the panic goes
    /// on once the guest is thawed). A freeze the agent refused (a command error) is not
    /// thawed: the agent thaws itself on error, and a refusal because someone else froze
    /// the guest must not undo their freeze.
    pub fn freeze_then<T>(
        &mut self,
        timeouts: FreezeTimeouts,
        f: impl FnOnce() -> T,
    ) -> Result<Frozen<T>, AgentError> {
        let t0 = Instant::now();
        let filesystems = match self.fsfreeze_freeze(timeouts.freeze) {
            Ok(n) => n,
            Err(e @ ProtocolError::Command { .. }) => return Err(e.into()),
            Err(e) => {
                let thaw = self.thaw_hard(timeouts.thaw).err().map(Box::new);
                return Err(AgentError::FreezeFailed {
                    peer: self.peer(),
                    freeze: Box::new(e),
                    thaw,
                });
            }
        };
        let r = catch_unwind(AssertUnwindSafe(f));
        let thawed = self.thaw_hard(timeouts.thaw);
        let frozen_for = t0.elapsed();
        match (r, thawed) {
            (Err(panic), thawed) => {
                if let Err(e) = thawed {
                    tracing::error!(error = %e, "the guest may still be frozen");
                }
                resume_unwind(panic)
            }
            (Ok(_), Err(e)) => Err(AgentError::ThawFailed {
                peer: self.peer(),
                frozen_for,
                source: Box::new(e),
            }),
            (Ok(value), Ok(_)) => Ok(Frozen {
                value,
                filesystems,
                frozen_for,
            }),
        }
    }
}

#[cfg(test)]
#[path = "qga_tests.rs"]
mod tests;
