//! The shipper's calls to the tracker's control socket (on blocking threads), and the
//! tracker's status as the session sees it.

use std::path::Path;

use serde_json::Value;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::wire::{DiskInfo, LineagePoint};
use vmreplica_tracker::control::{self, Applied, Request};
use vmreplica_tracker::Generation;

use super::Excluded;
use crate::session::{Frozen, TrackerOp, TrackerView};
use crate::ship::ShipError;

/// Calls the tracker's control socket off the async threads. Its failures name the tracker
/// and its socket: the primary's side, not the applier's.
pub(super) async fn tracker(socket: &Path, req: Request) -> Result<Value, ShipError> {
    let path = socket.to_path_buf();
    tokio::task::spawn_blocking(move || control::call(&path, &req))
        .await
        .map_err(|e| ShipError::Tracker(e.to_string()))?
        .map_err(|e| tracker_error(socket, &e))
}

/// A tracker failure in words that say which side and which file.
pub fn tracker_error(socket: &Path, e: &std::io::Error) -> ShipError {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    ShipError::Tracker(if matches!(e.kind(), NotFound | ConnectionRefused) {
        format!(
            "the tracker on this (primary) host does not answer at its control socket {}: \
             {}; is `vmreplica tracker` running for this VM, and is `tracker` in the shipper's \
             configuration its control socket?",
            socket.display(),
            if e.kind() == NotFound {
                "there is no such socket"
            } else {
                "nothing listens on it (a tracker that stopped left it behind)"
            }
        )
    } else {
        format!("the tracker at {} (primary host): {e}", socket.display())
    })
}

/// The tracker's status as the session sees it (its tracked disks only), its frozen
/// generation (for reading), and the disks it serves without tracking them.
fn tracker_view(st: &Value) -> Result<(TrackerView, Option<Generation>, Excluded), String> {
    let frozen: Option<Generation> = if st["frozen"].is_null() {
        None
    } else {
        Some(
            serde_json::from_value(st["frozen"].clone())
                .map_err(|e| format!("tracker status: {e}"))?,
        )
    };
    let lineage = match st["lineage"].as_str() {
        Some(s) => Some(Lineage::parse(s).map_err(|e| format!("tracker status: {e}"))?),
        None => None,
    };
    let parent: Option<LineagePoint> = if st["parent"].is_null() {
        None
    } else {
        Some(
            serde_json::from_value(st["parent"].clone())
                .map_err(|e| format!("tracker status: parent: {e}"))?,
        )
    };
    let granularity = st["granularity"].as_u64().unwrap_or(65536) as u32;
    let (excluded, disks): (Vec<Value>, Vec<Value>) = st["disks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .partition(|d| d["excluded"] == Value::Bool(true));
    let excluded = excluded
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or_default().to_string(),
                d["size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Ok((
        TrackerView {
            lineage,
            next_generation: st["next_generation"].as_u64().unwrap_or(1),
            frozen: frozen.as_ref().map(|g| Frozen {
                generation: g.generation,
                id: g.id,
                full: g.full,
                baseline: g.baseline,
            }),
            parent,
            sealed: st["sealed"] == Value::Bool(true),
            resync_required: disks
                .iter()
                .any(|d| d["resync_required"] == Value::Bool(true)),
            disks: disks
                .iter()
                .map(|d| DiskInfo {
                    name: d["name"].as_str().unwrap_or_default().to_string(),
                    size: d["size"].as_u64().unwrap_or(0),
                    granularity,
                })
                .collect(),
        },
        frozen,
        excluded,
    ))
}

/// Carries out one tracker operation, then reads the status after it.
pub(super) async fn tracker_op(
    socket: &Path,
    op: TrackerOp,
) -> Result<(TrackerView, Option<Generation>, Excluded), String> {
    let call = |req| async { tracker(socket, req).await.map_err(|e| e.to_string()) };
    match op {
        TrackerOp::Status => {}
        TrackerOp::Freeze { full } => {
            call(Request::Freeze {
                full,
                baseline: false,
            })
            .await?;
        }
        TrackerOp::Release { generation, proof } => {
            call(Request::Release {
                generation,
                applied: Some(Applied {
                    lineage: proof.0,
                    cycle: proof.1,
                    freeze: (proof.2 != 0).then_some(proof.2),
                }),
                force: false,
            })
            .await?;
        }
        TrackerOp::Merge { generation } => {
            call(Request::Merge { generation }).await?;
        }
        TrackerOp::SetLineage {
            lineage,
            next_generation,
        } => {
            let lineage = lineage.unwrap_or_else(Lineage::random);
            tracing::info!(%lineage, next_generation, "setting the tracker's lineage");
            call(Request::SetLineage {
                lineage,
                next_generation,
                force: false,
                parent: None,
            })
            .await?;
        }
        TrackerOp::MarkResync => mark_resync(socket).await?,
        TrackerOp::ClearResync => {
            let st = call(Request::Status).await?;
            for d in st["disks"].as_array().cloned().unwrap_or_default() {
                if d["resync_required"] == Value::Bool(true) {
                    let disk = d["name"].as_str().unwrap_or_default().to_string();
                    call(Request::ClearResync { disk }).await?;
                }
            }
        }
        TrackerOp::MarkDirty { ranges } => {
            let st = call(Request::Status).await?;
            let disks = st["disks"].as_array().cloned().unwrap_or_default();
            for (i, d) in disks.iter().enumerate() {
                let marks: Vec<(u64, u64)> = ranges
                    .iter()
                    .filter(|r| usize::from(r.disk) == i)
                    .map(|r| (r.offset, r.len))
                    .collect();
                if marks.is_empty() {
                    continue;
                }
                let disk = d["name"].as_str().unwrap_or_default().to_string();
                tracing::info!(
                    disk,
                    ranges = marks.len(),
                    "marking the replica's divergent ranges dirty"
                );
                call(Request::MarkDirty {
                    disk,
                    ranges: marks,
                })
                .await?;
            }
        }
    }
    tracker_view(&call(Request::Status).await?)
}

/// Marks every tracked disk of the tracker for a checksum resync.
pub(super) async fn mark_resync(socket: &Path) -> Result<(), String> {
    let st = tracker(socket, Request::Status)
        .await
        .map_err(|e| e.to_string())?;
    for d in st["disks"].as_array().cloned().unwrap_or_default() {
        if d["excluded"] == Value::Bool(true) {
            continue;
        }
        let disk = d["name"].as_str().unwrap_or_default().to_string();
        tracker(socket, Request::MarkResync { disk })
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Fails unless the tracker's frozen generation is still freeze `id` (a tracker restarted on
/// a restored state directory may hold another freeze of the same number).
pub(super) async fn still_frozen(socket: &Path, id: u64) -> Result<(), String> {
    let (view, _, _) = tracker_op(socket, TrackerOp::Status).await?;
    match view.frozen {
        Some(f) if f.id == id => Ok(()),
        other => Err(format!(
            "the tracker's frozen generation changed under the cycle (now {:?}): it is shipped anew",
            other.map(|f| f.generation)
        )),
    }
}
