//! The applier's local admin socket (`STORE/applier.sock`, JSON lines, like the tracker's
//! control socket): what a running applier knows of its replicas, and operations that need a
//! replica while it keeps receiving.
//!
//! Requests: `{"op":"status"}`, `{"op":"points","vm":V}`,
//! `{"op":"export","vm":V,"point":N,"dir":D}` (through a point view: the point is pinned
//! while it is written out, and later cycles go on landing); operations (see
//! [`crate::ops`], [`crate::seed`]): `{"op":"report"}` (every VM's status, the status
//! schema's `VmStatus`), `{"op":"remove","vm":V}`, `{"op":"seed-import","vm":V,"dir":D}`,
//! `{"op":"adopt","vm":V,"owner":O,"disks":[[NAME,PATH],...]}`; test failovers' `test-start`,
//! `test-stop` and `tests` (see `testfo::admin`); failover's (handled in
//! `crate::failover::admin`): `failover-unplanned`, `failover-commit`, `failover-cancel`,
//! `failover-abandon`, `adopt-primary`, `adopt-primary-undo`. Responses:
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. The socket is the owner's only
//! (mode 0600).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::pointview::PointView;
use crate::server::App;
use crate::store::{check_export_dir, export, StoreError};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Points {
        vm: String,
    },
    Export {
        vm: String,
        point: u64,
        dir: PathBuf,
    },
    TestStart(crate::testfo::admin::StartRequest),
    TestStop(crate::testfo::admin::StopRequest),
    Tests(crate::testfo::admin::ListRequest),
    Report,
    Remove {
        vm: String,
    },
    SeedImport {
        vm: String,
        dir: PathBuf,
        #[serde(default)]
        owner: Option<String>,
    },
    Adopt {
        vm: String,
        owner: String,
        disks: Vec<(String, PathBuf)>,
        granularity: u32,
    },
    FailoverUnplanned(crate::failover::admin::Unplanned),
    FailoverCommit(crate::failover::admin::Vm),
    FailoverCancel(crate::failover::admin::Vm),
    FailoverAbandon(crate::failover::admin::Vm),
    AdoptPrimary(crate::failover::admin::Adopt),
    AdoptPrimaryUndo(crate::failover::admin::Vm),
}

pub(crate) struct AdminServer {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Binds the admin socket at `path` (a stale one, that nobody answers on, is replaced;
    /// one that answers means another applier serves this store).
    pub fn start(app: Arc<App>, path: &Path) -> io::Result<AdminServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another applier serves this store: its admin socket {} answers",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "admin socket {}: {e} (a store on a filesystem without unix sockets needs \
                     --admin-socket elsewhere)",
                    path.display()
                ),
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let rt = tokio::runtime::Handle::current();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                for s in listener.incoming() {
                    if stopping.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    let Ok(s) = s else { return };
                    let (app, rt) = (Arc::clone(&app), rt.clone());
                    let _ = std::thread::Builder::new()
                        .name("admin-client".into())
                        .spawn(move || {
                            if let Err(e) = serve_client(&app, &rt, s) {
                                tracing::debug!("admin client: {e}");
                            }
                        });
                }
            })?;
        tracing::info!(socket = %path.display(), "admin socket ready");
        Ok(AdminServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving (the accept loop sees the flag when a last connection wakes it) and
    /// removes the socket.
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_client(app: &Arc<App>, rt: &tokio::runtime::Handle, s: UnixStream) -> io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        let n = (&mut r).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            writeln!(
                w,
                "{}",
                json!({"ok": false, "error": "request line too long"})
            )?;
            return Ok(());
        }
        let v = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => match dispatch(app, rt, req) {
                Ok(v) => json!({"ok": true, "result": v}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        writeln!(w, "{v}")?;
    }
}

/// Each request to the module that handles it (one match over every request: none is left
/// to a second dispatcher that could be handed the wrong one).
fn dispatch(app: &Arc<App>, rt: &tokio::runtime::Handle, req: Request) -> Result<Value, String> {
    use crate::failover::admin as failover;
    use crate::testfo::admin as testfo;
    let tested = |r: Result<Value, crate::testfo::TestError>| r.map_err(|e| e.to_string());
    let stored = |r: Result<Value, StoreError>| r.map_err(|e| e.to_string());
    match req {
        Request::TestStart(r) => tested(testfo::start(app, rt, r)),
        Request::TestStop(r) => tested(testfo::stop(app, rt, r)),
        Request::Tests(r) => tested(testfo::list(app, r)),
        Request::Status => Ok(status(app)),
        Request::Points { vm } => stored(points(app, &vm)),
        Request::Export { vm, point, dir } => stored(export_point(app, rt, &vm, point, &dir)),
        Request::Report => Ok(json!(crate::ops::report(app, &app.admin_path))),
        Request::Remove { vm } => stored(crate::ops::remove(app, &vm)),
        Request::SeedImport { vm, dir, owner } => {
            stored(crate::ops::seed_import(app, &vm, &dir, owner.as_deref()))
        }
        Request::Adopt {
            vm,
            owner,
            disks,
            granularity,
        } => stored(crate::ops::adopt(app, &vm, &owner, &disks, granularity)),
        Request::FailoverUnplanned(r) => stored(failover::unplanned(app, rt, r)),
        Request::FailoverCommit(r) => stored(failover::commit(app, rt, r)),
        Request::FailoverCancel(r) => stored(failover::cancel(app, rt, r)),
        Request::FailoverAbandon(r) => stored(failover::abandon(app, rt, r)),
        Request::AdoptPrimary(r) => stored(failover::adopt(app, rt, r)),
        Request::AdoptPrimaryUndo(r) => stored(failover::adopt_undo(app, rt, r)),
    }
}

/// Every replica in the store, as this applier sees it (open ones from memory).
fn status(app: &Arc<App>) -> Value {
    let open = app.open_vms();
    let states = app.store.vms().into_iter().filter_map(|name| {
        let state = match open.iter().find(|e| e.name == name) {
            Some(e) => Some((*e.shared.state()).clone()),
            None => app.store.peek_state(&name).ok(),
        };
        state.map(|s| (name.clone(), s, open.iter().any(|e| e.name == name)))
    });
    crate::store::status_json(app.store.root(), states)
}

/// VM `vm`'s recovery points.
fn points(app: &Arc<App>, vm: &str) -> Result<Value, StoreError> {
    let points = match app.open_vms().into_iter().find(|e| e.name == vm) {
        Some(e) => e.shared.state().points.clone(),
        None => app.store.points(vm)?,
    };
    Ok(json!(points))
}

/// Writes point `point` of VM `vm` out to `dir` through a point view (the point pinned
/// meanwhile; later cycles go on landing).
fn export_point(
    app: &Arc<App>,
    rt: &tokio::runtime::Handle,
    vm: &str,
    point: u64,
    dir: &Path,
) -> Result<Value, StoreError> {
    let entry = rt.block_on(app.vm(vm, None))?;
    let names: Vec<String> = entry
        .shared
        .state()
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect();
    check_export_dir(app.store.root(), dir, &names)?;
    let view = PointView::open(&entry.shared, point)?;
    tracing::info!(vm, point, dir = %dir.display(), "exporting a recovery point");
    let files = export(&view, dir)?;
    Ok(json!({ "files": files }))
}

/// See `crate::failover::admin::supervise`.
pub(crate) async fn supervise(app: &Arc<App>) {
    crate::failover::admin::supervise(app).await
}

/// Sends one request to an applier's admin socket and returns its result (or its error as
/// Err). `Ok(None)`: no applier answers there. Long operations (an export, a resync's
/// wait) answer when done: the timeout is an hour.
pub fn call(socket: &Path, req: &Request) -> io::Result<Option<Value>> {
    vmreplica_common::jsonline::call_if_running(
        socket,
        "applier admin socket",
        req,
        Duration::from_secs(3600),
    )
}
