//! Errors of the two JSON protocols (QMP and the guest agent): each names the socket and
//! what was being done.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::conn::{WireError, MAX_LINE};

/// The other end of a connection: which protocol, on which socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// `QMP` or `guest agent`.
    pub kind: &'static str,
    pub socket: PathBuf,
}

impl Peer {
    pub fn qmp(socket: &Path) -> Peer {
        Peer {
            kind: "QMP",
            socket: socket.to_path_buf(),
        }
    }

    pub fn agent(socket: &Path) -> Peer {
        Peer {
            kind: "guest agent",
            socket: socket.to_path_buf(),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.socket.display())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{peer}: cannot connect: {source}")]
    Connect { peer: Peer, source: std::io::Error },
    #[error("{peer}: no answer within {waited:?} while {doing}")]
    Timeout {
        peer: Peer,
        waited: Duration,
        doing: String,
    },
    #[error("{peer}: the connection was closed while {doing}")]
    Closed { peer: Peer, doing: String },
    #[error("{peer}: {source} while {doing}")]
    Io {
        peer: Peer,
        doing: String,
        source: std::io::Error,
    },
    #[error("{peer}: {reason} while {doing}: {line}")]
    Malformed {
        peer: Peer,
        doing: String,
        reason: String,
        line: String,
    },
    #[error("{peer}: {command} failed: {class}: {desc}")]
    Command {
        peer: Peer,
        command: String,
        class: String,
        desc: String,
    },
}

impl ProtocolError {
    /// The error class (`GenericError`, `CommandNotFound`, ...) of a command refused.
    pub fn class(&self) -> Option<&str> {
        match self {
            ProtocolError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// The peer the error came from.
    pub fn peer(&self) -> &Peer {
        match self {
            ProtocolError::Connect { peer, .. }
            | ProtocolError::Timeout { peer, .. }
            | ProtocolError::Closed { peer, .. }
            | ProtocolError::Io { peer, .. }
            | ProtocolError::Malformed { peer, .. }
            | ProtocolError::Command { peer, .. } => peer,
        }
    }
}

/// Names a wire error.
pub(crate) fn wire(peer: &Peer, e: WireError, waited: Duration, doing: &str) -> ProtocolError {
    let peer = peer.clone();
    let doing = doing.to_string();
    match e {
        WireError::Timeout => ProtocolError::Timeout {
            peer,
            waited,
            doing,
        },
        WireError::Closed => ProtocolError::Closed { peer, doing },
        WireError::TooLong => ProtocolError::Malformed {
            peer,
            doing,
            reason: format!("a message longer than {MAX_LINE} bytes"),
            line: String::new(),
        },
        WireError::Io(source) => ProtocolError::Io {
            peer,
            doing,
            source,
        },
    }
}

/// Connects a line connection, naming the peer on failure.
pub(crate) fn connect(
    peer: Peer,
    deadline: std::time::Instant,
    timeout: Duration,
) -> Result<crate::conn::LineConn, ProtocolError> {
    crate::conn::LineConn::connect(peer.clone(), deadline).map_err(|e| match e {
        WireError::Io(source) => ProtocolError::Connect { peer, source },
        e => wire(&peer, e, timeout, "connecting"),
    })
}
