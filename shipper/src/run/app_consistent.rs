//! Application-consistent freezes: the guest agent freezes the guest's filesystems around
//! the tracker's freeze; the outcome is recorded for status and events.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;
use vmreplica_tracker::Generation;

use super::{tracker_error, tracker_op, Excluded, Report};
use crate::appfreeze::Outcome;
use crate::ops::Ops;
use crate::session::{TrackerOp, TrackerView};

/// An application-consistent freeze, then the tracker's status; a guest that could not be
/// frozen makes a crash-consistent freeze instead.
pub(super) async fn app_freeze(
    agent: &Path,
    socket: &Path,
    full: bool,
    tx: &mpsc::UnboundedSender<Report>,
) -> Result<(TrackerView, Option<Generation>, Excluded), String> {
    let (a, t) = (agent.to_path_buf(), socket.to_path_buf());
    let outcome = tokio::task::spawn_blocking(move || crate::appfreeze::freeze(&a, &t, full))
        .await
        .map_err(|e| e.to_string())?;
    match outcome {
        Outcome::Frozen {
            tracker: Ok(g),
            frozen_ms,
            ..
        } => {
            let id = g["id"].as_u64().unwrap_or(0);
            let generation = g["generation"].as_u64().unwrap_or(0);
            let _ = tx.send(Report::App(Ok((id, generation, frozen_ms))));
        }
        Outcome::Frozen {
            tracker: Err(e), ..
        } => return Err(tracker_error(socket, &e).to_string()),
        Outcome::ThawFailed(e) => {
            let _ = tx.send(Report::App(Err(e)));
        }
        Outcome::NotFrozen(e) => {
            let _ = tx.send(Report::App(Err(e)));
            return tracker_op(socket, TrackerOp::Freeze { full }).await;
        }
    }
    tracker_op(socket, TrackerOp::Status).await
}

/// Records the outcome of an application-consistent freeze.
pub(super) fn note_app(ops: &mut Ops, r: Result<(u64, u64, u64), String>) {
    let now = crate::ops::now_ms() / 1000;
    match r {
        Ok((id, generation, frozen_ms)) => {
            tracing::info!(
                vm = ops.vm,
                generation,
                frozen_ms,
                "application-consistent freeze: the guest was frozen for {frozen_ms} ms"
            );
            ops.state.app.record(id, generation, now, frozen_ms);
            ops.state.app.last_error = None;
            vmreplica_ops::events::emit(
                ops.event(vmreplica_ops::events::APP_CONSISTENT_FREEZE)
                    .field("generation", generation)
                    .field("frozen_ms", frozen_ms),
            );
        }
        Err(e) => {
            vmreplica_common::warn_limited!(
                Duration::from_secs(600),
                vm = ops.vm,
                "application-consistent freeze failed, the point is crash-consistent: {e}"
            );
            // Tried: the next try waits a whole period.
            ops.state.app.last_at = Some(now);
            ops.state.app.last_error = Some(e.clone());
            ops.state.app.last_error_at = Some(now);
            vmreplica_ops::events::emit(
                ops.event(vmreplica_ops::events::APP_CONSISTENT_FREEZE)
                    .field("error", e),
            );
        }
    }
    let _ = ops.save();
}
