//! The failover requests of the admin socket (`admin.rs` dispatches them here):
//!
//! - `{"op":"failover-unplanned","vm":V,"point":N,"start":true,"definition":PATH}` (`point`
//!   and `definition` optional): fail over to point N (default the newest);
//! - `{"op":"failover-commit","vm":V}`, `{"op":"failover-cancel","vm":V}`,
//!   `{"op":"failover-abandon","vm":V}`;
//! - `{"op":"adopt-primary","vm":V,"owner":NAME,"tracker":CONTROL_SOCKET,"lineage":L,"cycle":N}`:
//!   this site's images (served by that tracker, or this site's own primary record) become
//!   the replica of `owner` waiting for the reverse cycle continuing `(L, N)`;
//!   `{"op":"adopt-primary-undo","vm":V}` takes that back (the promote on the other site failed).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vmreplica_common::lineage::Lineage;

use crate::server::{App, VmEntry};
use crate::store::{Role, SpanParent, StoreError, VmStore};

#[derive(Debug, Serialize, Deserialize)]
pub struct Unplanned {
    pub vm: String,
    #[serde(default)]
    pub point: Option<u64>,
    #[serde(default)]
    pub start: bool,
    #[serde(default)]
    pub definition: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Vm {
    pub vm: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Adopt {
    pub vm: String,
    pub owner: String,
    pub tracker: PathBuf,
    pub lineage: Lineage,
    pub cycle: u64,
}

fn lock(m: &Mutex<VmStore>) -> MutexGuard<'_, VmStore> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the VM's store, then tells its session what changed.
fn on_vm(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    vm: &str,
    f: impl FnOnce(&mut VmStore) -> Result<Value, StoreError>,
) -> Result<Value, StoreError> {
    let entry: Arc<VmEntry> = rt.block_on(app.vm(vm, None))?;
    let (r, replica) = {
        let mut vs = lock(&entry.store);
        let r = f(&mut vs);
        (r, vs.replica())
    };
    rt.block_on(entry.replica_changed(replica));
    r
}

pub(crate) fn unplanned(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: Unplanned,
) -> Result<Value, StoreError> {
    tracing::warn!(vm = req.vm, point = ?req.point, start = req.start, "unplanned failover asked");
    on_vm(app, rt, &req.vm, |vs| {
        super::unplanned(vs, req.point, req.start, req.definition)
    })
}

pub(crate) fn commit(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: Vm,
) -> Result<Value, StoreError> {
    on_vm(app, rt, &req.vm, super::commit)
}

pub(crate) fn cancel(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: Vm,
) -> Result<Value, StoreError> {
    on_vm(app, rt, &req.vm, super::cancel)
}

pub(crate) fn abandon(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: Vm,
) -> Result<Value, StoreError> {
    on_vm(app, rt, &req.vm, super::abandon)
}

pub(crate) fn adopt(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: Adopt,
) -> Result<Value, StoreError> {
    let parent = SpanParent {
        lineage: req.lineage,
        cycle: req.cycle,
    };
    let own = app
        .store
        .peek_state(&req.vm)
        .ok()
        .is_some_and(|s| match &s.role {
            Role::Primary(_) => true,
            Role::ReversePending(r) => r.previous.is_some(),
            _ => false,
        });
    if own {
        return on_vm(app, rt, &req.vm, |vs| {
            super::adopt_own(vs, &req.owner, parent)
        });
    }
    // A record open here holds its lock: one opened empty (a shipper's hello before the
    // adoption) or a pending adoption (this one again) is closed, to be written anew.
    if let Some(e) = app.open_vms().into_iter().find(|e| e.name == req.vm) {
        let st = e.shared.state();
        if st.disks.is_empty() || matches!(st.role, Role::ReversePending(_)) {
            drop(e);
            app.forget(&req.vm);
        }
    }
    let v = super::adopt_new(&app.store, &req.vm, &req.owner, &req.tracker, parent)?;
    // Open it, so the new primary's shipper finds it served.
    let entry = rt.block_on(app.vm(&req.vm, None))?;
    let replica = lock(&entry.store).replica();
    rt.block_on(entry.replica_changed(replica));
    Ok(v)
}

pub(crate) fn adopt_undo(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: Vm,
) -> Result<Value, StoreError> {
    let Ok(st) = app.store.peek_state(&req.vm) else {
        return Ok(json!({"vm": req.vm, "undone": false}));
    };
    if let Role::ReversePending(r) = &st.role {
        if r.previous.is_some() {
            return on_vm(app, rt, &req.vm, |vs| {
                let undone = vs.unyield()?;
                super::supervise(&app.site, vs);
                Ok(json!({"vm": vs.vm(), "undone": undone}))
            });
        }
    }
    // Withdrawn, not removed: the record (its history, its divergent ranges) stays, takes
    // no cycle, and the command run again adopts the images anew.
    app.forget(&req.vm);
    let undone = app.store.withdraw_adopted(&req.vm)?;
    Ok(json!({"vm": req.vm, "undone": undone, "withdrawn": undone}))
}

/// At the applier's start: every VM this site is primary for gets its tracker and shipper
/// back (found running, or started).
pub(crate) async fn supervise(app: &Arc<App>) {
    for name in app.store.vms() {
        let Ok(st) = app.store.peek_state(&name) else {
            continue;
        };
        if !matches!(st.role, Role::FailedOver(_) | Role::Primary(_)) {
            continue;
        }
        match app.vm(&name, None).await {
            Ok(entry) => {
                let site = Arc::clone(&app.site);
                let _ = tokio::task::spawn_blocking(move || {
                    let vs = lock(&entry.store);
                    super::supervise(&site, &vs);
                })
                .await;
            }
            Err(e) => tracing::error!(vm = name, "cannot open a VM this site is primary for: {e}"),
        }
    }
}
