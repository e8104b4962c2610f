//! Application-consistent freezes: the guest's filesystems are frozen through its
//! qemu-guest-agent (`guest-fsfreeze-freeze`, which flushes them and, for ext4 and xfs,
//! their journals), the tracker freezes the generation, and the guest is thawed at once:
//! always, also after an error or a timeout (the `vm` crate's `GuestAgent::freeze_then`).
//! The guest is frozen for the few milliseconds the tracker's freeze takes; the time is
//! measured and reported. A guest agent that does not answer makes the point
//! crash-consistent, never a missed cycle.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use vmreplica_tracker::control::{self, Request};
use vmreplica_vm::{AgentError, FreezeTimeouts, GuestAgent};

/// How long connecting to the agent may take (a guest without a running agent).
const CONNECT: Duration = Duration::from_secs(5);

pub enum Outcome {
    /// The tracker froze while the guest was frozen (its answer, which may be an error).
    Frozen {
        tracker: std::io::Result<Value>,
        frozen_ms: u64,
        filesystems: u64,
    },
    /// The guest was not frozen (no agent, or it refused): freeze without it.
    NotFrozen(String),
    /// The tracker's freeze ran, but thawing the guest failed: it may still be frozen.
    ThawFailed(String),
}

/// Freezes the guest through the agent at `agent`, runs the tracker's freeze, thaws.
pub fn freeze(agent: &Path, tracker: &Path, full: bool) -> Outcome {
    let mut ga = match GuestAgent::connect(agent, CONNECT) {
        Ok(a) => a,
        Err(e) => return Outcome::NotFrozen(e.to_string()),
    };
    let r = ga.freeze_then(FreezeTimeouts::default(), || {
        control::call(
            tracker,
            &Request::Freeze {
                full,
                baseline: false,
            },
        )
    });
    match r {
        Ok(f) => Outcome::Frozen {
            tracker: f.value,
            frozen_ms: f.frozen_for.as_millis() as u64,
            filesystems: f.filesystems,
        },
        Err(e @ AgentError::ThawFailed { .. }) => Outcome::ThawFailed(e.to_string()),
        Err(e) => Outcome::NotFrozen(e.to_string()),
    }
}
