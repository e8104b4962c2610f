//! A failed-over VM's tracker state lost (`STORE/VM/primary/tracker` deleted or emptied, a
//! host restored without it): the record says a tracker served the images, so the VM may
//! have written, but nothing says where any more. A fresh tracker started there would know
//! no write, so the reverse cycle would ship a partial delta (or nothing) and the old
//! primary would diverge silently; a cancel would keep the VM's writes in a replica it calls
//! point M. So the loss is recorded first (a marker beside the tracker's directory, so a
//! crash in between cannot forget it), then the fresh tracker is put in the record's lineage
//! and every disk it tracks is marked for a checksum resync (saved in the tracker's state,
//! which the shipper back and `cancel` read), then the marker goes.
//!
//! Limit: the state of a record promoted by a planned failover is created by the promote
//! itself; if the applier crashed between saving the promote and starting the tracker, the
//! missing state is taken for a lost one (a checksum resync that was not needed, never a
//! gap).

use std::path::PathBuf;

use serde_json::Value;
use vmreplica_tracker::control::Request;

use super::{err, set_lineage, Procs};
use crate::store::{FailoverStep, Role, StoreError, VmStore};

/// The marker's file: it exists from the moment the loss is seen until every disk is marked.
pub fn marker(procs: &Procs) -> PathBuf {
    procs.dir.join("tracker-state-lost")
}

/// Whether the state of the tracker that served the images is gone while the record says
/// one did (`fresh`: the caller has just created the record, whose tracker never ran). Seen
/// before the tracker is started (its start creates a new state). Records the loss.
pub(super) fn check_before_start(
    vs: &VmStore,
    procs: &Procs,
    fresh: bool,
) -> Result<bool, StoreError> {
    if marker(procs).exists() {
        return Ok(true);
    }
    let expected = match vs.role() {
        Role::FailedOver(f) => f.step == FailoverStep::Serving,
        Role::Primary(_) => !fresh,
        _ => false,
    };
    if !expected || procs.tracker_pid().is_some() {
        return Ok(false);
    }
    let dir = procs.tracker_dir();
    match vmreplica_tracker::failover::state_offline(&dir) {
        Ok(None) => {}
        // A state that is there (or unreadable: the tracker refuses it itself) is not lost.
        _ => return Ok(false),
    }
    tracing::error!(vm = %vs.vm(), dir = %dir.display(), "the tracker state of the VM this site serves was lost (its state file is missing): where the VM wrote since the failover is unknown; every disk is marked for a checksum resync");
    std::fs::create_dir_all(&procs.dir).map_err(|e| err(vs.vm(), "primary dir", e))?;
    vmreplica_common::statefile::write_atomic(
        &marker(procs),
        format!("{} had no state file\n", dir.display()).as_bytes(),
    )
    .map_err(|e| err(vs.vm(), "recording the lost tracker state", e))?;
    Ok(true)
}

/// After the fresh tracker started (status `st`): its lineage is the record's and every
/// disk it tracks needs a checksum resync; then the marker goes. Returns the new status.
pub(super) fn mark_resync(vs: &VmStore, procs: &Procs, st: &Value) -> Result<Value, StoreError> {
    let vm = vs.vm();
    let (lineage, parent) = match vs.role() {
        Role::FailedOver(f) => (f.lineage, f.parent),
        Role::Primary(p) => (p.lineage, p.parent),
        other => {
            return Err(StoreError::Role(format!(
                "VM {vm}: this site is its {}: no tracker of its serves the images",
                other.name()
            )))
        }
    };
    // Lineage first: marks made after it outlive the generation it sets.
    set_lineage(vs, procs, st, lineage, parent)?;
    for d in st["disks"].as_array().cloned().unwrap_or_default() {
        if d["excluded"] == Value::Bool(true) {
            continue;
        }
        let disk = d["name"].as_str().unwrap_or_default().to_string();
        procs
            .tracker(&Request::MarkResync { disk })
            .map_err(|e| err(vm, "marking the disks for a checksum resync", e))?;
    }
    std::fs::remove_file(marker(procs))
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })
        .map_err(|e| err(vm, "removing the lost-state marker", e))?;
    procs
        .tracker(&Request::Status)
        .map_err(|e| err(vm, "tracker", e))
}

/// Whether the tracker's state (status `st`) says its tracking was lost or failed: a disk
/// marked for a checksum resync. Where the VM wrote is then unknown.
pub fn untrusted(st: &Value) -> bool {
    st["disks"]
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["resync_required"] == Value::Bool(true)))
}
