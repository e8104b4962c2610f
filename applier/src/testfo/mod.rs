//! Test failover: a recovery point served over NBD, writable through a scratch overlay, while
//! replication goes on.
//!
//! `test-start` (admin socket; `vmreplica failover test VM`) pins point N in the replica's
//! state (so retention keeps it and an applier restart serves it again), opens a
//! [`PointView`] of it, wraps each disk in an [`Overlay`] (scratch files in
//! `STORE/VM/tests/N/`) and serves them with `vmreplica-nbd`'s [`Server`] on
//! `STORE/VM/tests/N/nbd.sock` (and on TCP with TLS when asked), one export per disk. Nothing
//! is copied: it is ready at once, whatever the disks' size. With `start`, the VM boots from
//! the definition its primary shipped, on its isolated test network, detached from the
//! applier ([`launch`]), its run directory `STORE/VM/tests/N/vm/`. `test-stop` stops the VM
//! and the exports, forgets the pin, then removes the scratch files.
//!
//! Several at once: any points of any VMs, one test failover per point.

pub mod admin;
pub mod launch;
pub mod overlay;
mod pool;
#[cfg(test)]
mod tests;
pub mod zerolog;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmreplica_common::tls::{AllowList, Identity};
use vmreplica_common::unixsock::{self, SocketPerms};
use vmreplica_nbd::{Export, Server, ServerConfig, TlsConfig};

use crate::pointview::{PointView, VmShared};
use crate::store::TestPin;
pub use overlay::Overlay;

/// Why a test failover cannot start, stop or be served.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TestError(pub String);

impl From<crate::store::StoreError> for TestError {
    fn from(e: crate::store::StoreError) -> Self {
        TestError(e.to_string())
    }
}

impl From<std::io::Error> for TestError {
    fn from(e: std::io::Error) -> Self {
        TestError(e.to_string())
    }
}

/// One test failover being served.
pub(crate) struct Running {
    pub vm: String,
    pub point: u64,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub tcp_host: Option<String>,
    pub created_at: u64,
    pub overlays: Vec<Arc<Overlay>>,
    server: Arc<Server>,
    pool: Arc<pool::Pool>,
    /// Holds the point (also in memory, besides the state's pin).
    _view: Arc<PointView>,
}

impl Running {
    pub fn disks(&self) -> Vec<String> {
        self.overlays.iter().map(|o| o.name().to_string()).collect()
    }

    /// `nbd+unix:///DISK?socket=PATH`.
    pub fn unix_uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.socket.display())
    }

    /// `nbds://HOST:PORT/DISK`, when served on TCP.
    pub fn tcp_uri(&self, disk: &str) -> Option<String> {
        let a = self.tcp?;
        let host = match self.tcp_host.as_deref() {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => a.ip().to_string(),
        };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        Some(format!("nbds://{host}:{}/{disk}", a.port()))
    }

    /// Stops serving: new connections are refused, connected clients are cut.
    pub fn shutdown(&self) {
        self.server.shutdown();
        self.pool.close();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The test failovers this applier serves.
#[derive(Default)]
pub struct TestFailovers {
    running: Mutex<BTreeMap<(String, u64), Arc<Running>>>,
    /// Starts and stops one at a time (they save the replica's state and bind sockets).
    busy: Mutex<()>,
}

impl TestFailovers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u64), Arc<Running>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn serialize(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, vm: &str, point: u64) -> Option<Arc<Running>> {
        self.lock().get(&(vm.to_string(), point)).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Running>> {
        self.lock().values().cloned().collect()
    }

    fn insert(&self, r: Arc<Running>) {
        self.lock().insert((r.vm.clone(), r.point), r);
    }

    pub(crate) fn remove(&self, vm: &str, point: u64) -> Option<Arc<Running>> {
        self.lock().remove(&(vm.to_string(), point))
    }

    /// Stops serving every test failover (the applier stops; the pins stay, so the next
    /// applier serves them again). Test VMs keep running.
    pub fn shutdown_all(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.lock()).into_values().collect();
        for r in all {
            r.shutdown();
        }
    }
}

/// The directory of the test failover of `point` of the VM in `vm_dir`.
pub fn test_dir(vm_dir: &Path, point: u64) -> PathBuf {
    vm_dir.join("tests").join(point.to_string())
}

/// Bytes free for the store's owner on the file system of `path`.
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter that statvfs fills; the path is
    // NUL-terminated and lives across the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Serves the test failover `pin` of the VM whose views share `shared`: its scratch files
/// made anew (`create`) or as they are (after a restart), its exports on the unix socket and,
/// if the pin says so, on TCP with TLS (`identity`'s certificate, clients from its CA named on
/// the pin's allow-list).
pub(crate) fn serve(
    shared: &Arc<VmShared>,
    pin: &TestPin,
    create: bool,
    limit: u64,
    identity: &Identity,
) -> Result<Running, TestError> {
    let vm = shared.vm().to_string();
    // Absolute: the URIs name the socket for clients anywhere.
    let dir = std::path::absolute(test_dir(&shared.dir, pin.point))?;
    crate::undo::log::create_dirs(&dir)
        .map_err(|e| TestError(format!("{}: {e}", dir.display())))?;
    let view = Arc::new(PointView::open(shared, pin.point)?);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8)
        * 2;
    let pool = pool::Pool::new(&format!("testfo-{}", pin.point), threads)?;
    let mut overlays = Vec::new();
    for i in 0..view.disks().len() {
        overlays.push(Arc::new(Overlay::open(
            Arc::clone(&view),
            i,
            &dir,
            create,
            limit,
            Some(Arc::clone(&pool)),
        )?));
    }
    // The disks the primary serves but does not replicate: blank, as a failover makes them.
    let excluded = shared.state().excluded.clone();
    for d in excluded {
        if view.disks().iter().any(|(n, _)| *n == d.name) {
            continue;
        }
        overlays.push(Arc::new(Overlay::open_blank(
            Arc::clone(&view),
            &d.name,
            d.size,
            &dir,
            create,
            limit,
            Some(Arc::clone(&pool)),
        )?));
    }
    let exports = overlays
        .iter()
        .map(|o| Export {
            name: o.name().to_string(),
            description: format!("VM {vm}, recovery point {}, test failover", pin.point),
            device: Arc::clone(o) as Arc<dyn vmreplica_nbd::BlockDevice>,
            read_only: false,
        })
        .collect();
    let server = Server::new(ServerConfig::default(), exports);
    let socket = dir.join("nbd.sock");
    let perms = SocketPerms {
        mode: 0o666 & !unixsock::umask(),
        owner: None,
        group: None,
    };
    let listener = unixsock::bind(&socket, &perms).map_err(|e| {
        TestError(format!(
            "VM {vm} point {}: NBD socket {}: {e} (a store path this long cannot hold a unix \
             socket: use a shorter store path)",
            pin.point,
            socket.display()
        ))
    })?;
    server.listen_unix(listener)?;
    let mut running = Running {
        vm: vm.clone(),
        point: pin.point,
        dir,
        socket,
        tcp: None,
        tcp_host: None,
        created_at: pin.created_at,
        overlays,
        server,
        pool,
        _view: view,
    };
    if let Some(addr) = &pin.tcp {
        let r = listen_tcp(&running.server, addr, &pin.tls_allow, identity);
        match r {
            Ok(a) => {
                running.tcp = Some(a);
                running.tcp_host = addr
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string());
            }
            Err(e) => {
                running.shutdown();
                return Err(e);
            }
        }
    }
    Ok(running)
}

/// Checks a TCP export's address and client names; returns the address.
pub(crate) fn check_tcp(addr: &str, allow: &[String]) -> Result<SocketAddr, TestError> {
    if allow.is_empty() {
        return Err(TestError(
            "a TCP export needs TLS clients named: give --tls-allow NAME (a certificate name \
             from this applier's CA, as `vmreplica certs x509-dir` issues them)"
                .into(),
        ));
    }
    addr.parse().map_err(|e| {
        TestError(format!(
            "--tcp {addr}: {e} (give IP:PORT, e.g. 192.0.2.10:10809; port 0 picks one)"
        ))
    })
}

fn listen_tcp(
    server: &Arc<Server>,
    addr: &str,
    allow: &[String],
    identity: &Identity,
) -> Result<SocketAddr, TestError> {
    let a = check_tcp(addr, allow)?;
    let l = TcpListener::bind(a).map_err(|e| TestError(format!("--tcp {addr}: {e}")))?;
    let bound = l.local_addr()?;
    let tls = TlsConfig::new(identity, AllowList::new(allow))
        .map_err(|e| TestError(format!("TLS for --tcp {addr}: {e}")))?;
    server.listen_tcp(l, Some(Arc::new(tls)))?;
    Ok(bound)
}

/// Seconds since the epoch.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Removes the test failover directories of `vm_dir` that `pins` do not name (left by a
/// crash between forgetting a pin and removing its files, or before a pin was saved).
pub(crate) fn remove_orphans(vm: &str, vm_dir: &Path, pins: &[TestPin]) {
    let Ok(entries) = std::fs::read_dir(vm_dir.join("tests")) else {
        return;
    };
    for e in entries.flatten() {
        let keep = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|p| pins.iter().any(|t| t.point == p));
        if !keep {
            tracing::info!(vm, dir = %e.path().display(), "removing the files of a test failover that was stopped");
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(vm, dir = %e.path().display(), "cannot remove: {err}");
            }
        }
    }
}

pub(crate) fn register(tests: &TestFailovers, r: Running) -> Arc<Running> {
    let r = Arc::new(r);
    tests.insert(Arc::clone(&r));
    r
}
