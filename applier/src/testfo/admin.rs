//! The admin socket's test-failover requests (`test-start`, `test-stop`, `tests`), and
//! serving the recorded test failovers again when an applier starts.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vmreplica_vm::Network;

use super::{launch, now, register, remove_orphans, serve, test_dir, Running, TestError};
use crate::server::{App, VmEntry};
use crate::store::TestPin;

/// `{"op":"test-start","vm":V,"point":N|null,"start":bool,"tcp":"HOST:PORT"|null,
/// "tls_allow":[...],"scratch_limit":BYTES|null}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StartRequest {
    pub vm: String,
    /// None: the newest point.
    #[serde(default)]
    pub point: Option<u64>,
    /// Boot the VM from its shipped definition, on its test network.
    #[serde(default)]
    pub start: bool,
    #[serde(default)]
    pub tcp: Option<String>,
    #[serde(default)]
    pub tls_allow: Vec<String>,
    /// Most bytes the scratch files may hold, per disk (default: half the store's free
    /// space when the test starts).
    #[serde(default)]
    pub scratch_limit: Option<u64>,
}

/// `{"op":"test-stop","vm":V,"point":N|null,"all":bool}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StopRequest {
    pub vm: String,
    #[serde(default)]
    pub point: Option<u64>,
    #[serde(default)]
    pub all: bool,
}

/// `{"op":"tests","vm":V|null}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListRequest {
    #[serde(default)]
    pub vm: Option<String>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a test failover looks like to its user.
fn describe(r: &Running) -> Value {
    let run_dir = r.dir.join("vm");
    let disks: Vec<Value> = r
        .overlays
        .iter()
        .map(|o| {
            json!({
                "disk": o.name(),
                "uri": r.unix_uri(o.name()),
                "tcp_uri": r.tcp_uri(o.name()),
                "scratch_bytes": o.scratch_bytes(),
            })
        })
        .collect();
    let qemu = launch::running(&run_dir).map(|pid| {
        json!({
            "pid": pid,
            "qmp": run_dir.join("qmp.sock"),
            "console": run_dir.join("console.log"),
        })
    });
    json!({
        "vm": r.vm,
        "point": r.point,
        "since": r.created_at,
        "socket": r.socket,
        "disks": disks,
        "qemu": qemu,
    })
}

/// The point `req` names, checked against the replica's points.
fn pick_point(entry: &VmEntry, want: Option<u64>) -> Result<u64, TestError> {
    let state = entry.shared.state();
    let points: Vec<u64> = state.points.iter().map(|p| p.cycle).collect();
    let list = |p: &[u64]| p.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    match want {
        None => points.last().copied().ok_or_else(|| {
            TestError(format!(
                "VM {} has no recovery point yet (its initial copy has not completed)",
                entry.name
            ))
        }),
        Some(p) if points.contains(&p) => Ok(p),
        Some(p) => Err(TestError(format!(
            "VM {} has no recovery point {p}; its points: {} (vmreplica applier points {})",
            entry.name,
            list(&points),
            entry.name
        ))),
    }
}

pub(crate) fn start(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: StartRequest,
) -> Result<Value, TestError> {
    let entry = rt.block_on(app.vm(&req.vm, None))?;
    let _busy = app.tests.serialize();
    lock(&entry.store).check_testable()?;
    // What the request asks is checked before the point it names.
    let definition = if req.start {
        Some(checked_definition(app, &entry)?)
    } else {
        None
    };
    if let Some(addr) = &req.tcp {
        super::check_tcp(addr, &req.tls_allow)?;
    }
    let point = pick_point(&entry, req.point)?;
    if let Some(r) = app.tests.get(&req.vm, point) {
        return Err(TestError(format!(
            "VM {} point {point} is already under test (its disks: {}); stop it first: \
             vmreplica failover test-stop {} --point {point}",
            req.vm,
            r.disks()
                .iter()
                .map(|d| r.unix_uri(d))
                .collect::<Vec<_>>()
                .join(" "),
            req.vm
        )));
    }
    let limit = scratch_limit(&entry, req.scratch_limit)?;
    let mut pin = TestPin {
        point,
        created_at: now(),
        tcp: req.tcp.clone(),
        tls_allow: req.tls_allow.clone(),
        started: false,
        scratch_limit: Some(limit),
    };
    let dir = test_dir(&entry.shared.dir, point);
    let running = match serve(&entry.shared, &pin, true, limit, &app.identity) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    // The port bound (for port 0), so that a restart binds the same one.
    pin.tcp = running.tcp.map(|a| a.to_string());
    // Recorded before it is reported: from here on a restart serves it again.
    if let Err(e) = lock(&entry.store).add_test(pin) {
        running.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    let running = register(&app.tests, running);
    tracing::info!(vm = req.vm, point, "test failover started");
    if let Some(def) = definition {
        let disks: BTreeMap<String, String> = running
            .disks()
            .iter()
            .map(|d| (d.clone(), running.unix_uri(d)))
            .collect();
        let unit = format!("vmreplica-test-{}-{point}", req.vm);
        let booted = launch::start(&dir.join("vm"), &def, disks, Network::Test, &unit)
            .map_err(|e| TestError(e.to_string()))
            .and_then(|s| {
                lock(&entry.store).set_test_started(point, true)?;
                Ok(s)
            });
        match booted {
            Ok(s) => tracing::info!(vm = req.vm, point, pid = s.pid, "test VM started"),
            Err(e) => {
                // Undone whole: the user fixes the cause and starts again.
                let _ = stop_one(app, &entry, point);
                return Err(TestError(format!(
                    "VM {} point {point}: the test VM did not start: {e}; the test failover \
                     was undone",
                    req.vm
                )));
            }
        }
    }
    Ok(describe(&running))
}

/// The definition the primary shipped, checked against the replica's disks.
fn checked_definition(
    app: &Arc<App>,
    entry: &VmEntry,
) -> Result<vmreplica_vm::VmDefinition, TestError> {
    let def = crate::definition::load(app.store.root(), &entry.name)
        .map_err(|e| TestError(e.to_string()))?
        .ok_or_else(|| {
            TestError(format!(
                "VM {} has no VM definition on this site, so there is nothing to start: set \
                 `definition = \"FILE\"` in its shipper's configuration (it is shipped with the \
                 next cycle), or start without --start and use the NBD URIs",
                entry.name
            ))
        })?;
    // Replicated disks, and the excluded ones (served blank).
    let state = entry.shared.state();
    let have: Vec<String> = (state.disks.iter().map(|d| d.name.clone()))
        .chain(state.excluded.iter().map(|d| d.name.clone()))
        .collect();
    drop(state);
    if let Some(d) = def.disks().iter().find(|d| !have.contains(d)) {
        return Err(TestError(format!(
            "VM {}: its definition uses disk {d:?}, which is not replicated here (the replica \
             holds {})",
            entry.name,
            have.join(", ")
        )));
    }
    Ok(def)
}

fn scratch_limit(entry: &VmEntry, given: Option<u64>) -> Result<u64, TestError> {
    match given {
        Some(l) => Ok(l),
        None => Ok(super::free_space(&entry.shared.dir)? / 2),
    }
}

/// Stops the test failover of `point`: its VM, its exports; forgets the pin (saved), then
/// removes its files.
fn stop_one(app: &Arc<App>, entry: &VmEntry, point: u64) -> Result<Value, TestError> {
    let dir = test_dir(&entry.shared.dir, point);
    let run_dir = dir.join("vm");
    let vm_stop = launch::stop_test_vm(&run_dir).map_err(|e| {
        TestError(format!(
            "VM {} point {point}: cannot stop the test VM: {e}; the test failover stays",
            entry.name
        ))
    })?;
    if let Some(r) = app.tests.remove(&entry.name, point) {
        r.shutdown();
    }
    lock(&entry.store).remove_test(point)?;
    remove_test_dir(&dir)?;
    tracing::info!(vm = %entry.name, point, ?vm_stop, "test failover stopped; its scratch files are gone");
    Ok(json!({ "point": point, "vm_stop": format!("{vm_stop:?}") }))
}

pub(crate) fn stop(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    req: StopRequest,
) -> Result<Value, TestError> {
    let entry = rt.block_on(app.vm(&req.vm, None))?;
    let _busy = app.tests.serialize();
    let pins: Vec<u64> = lock(&entry.store).tests().iter().map(|t| t.point).collect();
    let points = choose(&req, &pins)?;
    let mut stopped = Vec::new();
    for p in points {
        stopped.push(stop_one(app, &entry, p)?);
    }
    Ok(json!({ "vm": req.vm, "stopped": stopped }))
}

/// Which of the test failovers `pins` a stop request names.
fn choose(req: &StopRequest, pins: &[u64]) -> Result<Vec<u64>, TestError> {
    let points = match (req.point, req.all) {
        (Some(_), true) => {
            return Err(TestError("give --point N or --all, not both".into()));
        }
        (_, true) => pins.to_vec(),
        (Some(p), false) if pins.contains(&p) => vec![p],
        (Some(p), false) => {
            return Err(TestError(format!(
                "VM {} has no test failover of point {p}{}",
                req.vm,
                under_test(pins)
            )))
        }
        (None, false) => match pins {
            [p] => vec![*p],
            [] => vec![],
            _ => {
                return Err(TestError(format!(
                    "VM {} has test failovers of points {}: give --point N or --all",
                    req.vm,
                    pins.iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        },
    };
    if points.is_empty() {
        return Err(TestError(format!(
            "VM {} has no test failover to stop",
            req.vm
        )));
    }
    Ok(points)
}

/// `test-stop` with no applier running (it crashed, or was stopped): the test VMs are stopped,
/// the pins forgotten and the scratch files removed, from the store (under the replica's lock,
/// like any offline administration).
pub fn stop_offline(store_root: &std::path::Path, req: StopRequest) -> Result<Value, TestError> {
    let store = crate::store::Store::new(store_root, crate::store::Retention::keep_all())?;
    let mut vs = store.open_existing(&req.vm)?;
    let pins: Vec<u64> = vs.tests().iter().map(|t| t.point).collect();
    let points = choose(&req, &pins)?;
    let vm_dir = store_root.join(&req.vm);
    let mut stopped = Vec::new();
    for point in points {
        let dir = test_dir(&vm_dir, point);
        let vm_stop = launch::stop_test_vm(&dir.join("vm")).map_err(|e| {
            TestError(format!(
                "VM {} point {point}: cannot stop the test VM: {e}; the test failover stays",
                req.vm
            ))
        })?;
        vs.remove_test(point)?;
        remove_test_dir(&dir)?;
        tracing::info!(vm = %req.vm, point, ?vm_stop, "test failover stopped (no applier running)");
        stopped.push(json!({ "point": point, "vm_stop": format!("{vm_stop:?}") }));
    }
    Ok(json!({ "vm": req.vm, "stopped": stopped }))
}

fn remove_test_dir(dir: &std::path::Path) -> Result<(), TestError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(TestError(format!("{}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}

fn under_test(pins: &[u64]) -> String {
    if pins.is_empty() {
        " (none is running)".into()
    } else {
        format!(
            " (points under test: {})",
            pins.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

pub(crate) fn list(app: &Arc<App>, req: ListRequest) -> Result<Value, TestError> {
    if let Some(vm) = &req.vm {
        vmreplica_common::validate_name(vm).map_err(|e| TestError(format!("VM {vm:?}: {e}")))?;
        if !app.store.vms().contains(vm) {
            return Err(TestError(format!("VM {vm} has no replica on this site")));
        }
    }
    let mut out = Vec::new();
    for r in app.tests.all() {
        if req.vm.as_ref().is_none_or(|v| *v == r.vm) {
            out.push(describe(&r));
        }
    }
    // Recorded but not served (their replica could not be opened, say): said too.
    for vm in app.store.vms() {
        if req.vm.as_ref().is_some_and(|v| *v != vm) {
            continue;
        }
        let Ok(state) = app.store.peek_state(&vm) else {
            continue;
        };
        for t in state.tests {
            if app.tests.get(&vm, t.point).is_none() {
                out.push(json!({
                    "vm": vm, "point": t.point, "since": t.created_at,
                    "error": "recorded but not served: see the applier's log",
                }));
            }
        }
    }
    Ok(json!(out))
}

/// Serves again the test failovers the store records (an applier starting), with their
/// scratch writes; removes the files of stopped ones.
pub(crate) async fn restore(app: Arc<App>) {
    for vm in app.store.vms() {
        let Ok(state) = app.store.peek_state(&vm) else {
            continue;
        };
        let vm_dir = app.store.root().join(&vm);
        if state.tests.is_empty() {
            remove_orphans(&vm, &vm_dir, &[]);
            continue;
        }
        let entry = match app.vm(&vm, None).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(vm, "cannot serve its test failovers again: {e}");
                continue;
            }
        };
        let app2 = Arc::clone(&app);
        let r = tokio::task::spawn_blocking(move || {
            let _busy = app2.tests.serialize();
            let pins = lock(&entry.store).tests();
            remove_orphans(&entry.name, &entry.shared.dir, &pins);
            for pin in pins {
                let limit = pin.scratch_limit.unwrap_or(u64::MAX);
                match serve(&entry.shared, &pin, false, limit, &app2.identity) {
                    Ok(r) => {
                        let r = register(&app2.tests, r);
                        let vm_pid = launch::running(&r.dir.join("vm"));
                        tracing::info!(vm = %entry.name, point = pin.point, ?vm_pid, "test failover served again");
                        if pin.started && vm_pid.is_none() {
                            tracing::warn!(vm = %entry.name, point = pin.point, "its test VM is not running any more; `vmreplica failover test-stop {} --point {}` discards the test failover", entry.name, pin.point);
                        }
                    }
                    Err(e) => tracing::error!(
                        vm = %entry.name,
                        point = pin.point,
                        "cannot serve the test failover again: {e}; `vmreplica failover \
                         test-stop {} --point {}` discards it",
                        entry.name,
                        pin.point
                    ),
                }
            }
        })
        .await;
        if let Err(e) = r {
            tracing::error!(vm, "serving its test failovers again failed: {e}");
        }
    }
}
