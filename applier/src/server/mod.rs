//! The applier's QUIC server: the async driver of one [`ApplierSession`] per VM. It admits
//! only primaries whose certificate names are on the allow-list, and lets each write only
//! the replicas it created.
//!
//! Per connection, the first bidirectional stream opened with `Hello` is the control stream
//! (cycle begin and resume, manifest, checksum requests): its messages go to the VM's
//! session, and the session's actions are carried out here (messages sent, store operations
//! run on blocking threads, their results fed back). Every other stream starts with a chunk
//! and carries chunks (see [`data`]).
//!
//! Opening a replica (which may scan the undo log of a cycle held in part) runs on a blocking
//! thread, outside the table of VMs' lock: one slow VM never holds up another VM's hello.

mod data;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, OnceCell};
use vmreplica_common::link::{self, LinkError, Tuning};
use vmreplica_common::tls::{self, AllowList, Identity};
use vmreplica_common::validate_name;
use vmreplica_common::wire::{code, Message};

use crate::pointview::VmShared;
use crate::session::{Action, ApplierSession, ConnId, Event};
use crate::store::{JobSender, Retention, Store, StoreError, VmStore};

pub struct ApplierConfig {
    pub store: PathBuf,
    pub listen: SocketAddr,
    pub identity: Identity,
    pub allow: AllowList,
    pub retention: Retention,
    pub tuning: Tuning,
    /// The local admin socket (default `STORE/applier.sock`).
    pub admin_socket: Option<PathBuf>,
    /// Test hook: opening this VM takes this long (a slow store).
    pub open_delay: Option<(String, Duration)>,
    /// The files of `identity` (the shipper that replicates back after a failover presents
    /// this applier's certificate).
    pub identity_files: Option<crate::failover::IdentityFiles>,
}

/// One replica served by this applier: its session, its store (for blocking operations, on
/// blocking threads only), and the writers of the control streams talking to it.
pub(crate) struct VmEntry {
    pub name: String,
    pub shared: Arc<VmShared>,
    session: Mutex<ApplierSession>,
    pub store: Arc<Mutex<VmStore>>,
    /// Where data streams hand chunks of the cycle being received.
    sender: Mutex<Option<JobSender>>,
    /// Buffers chunks are verified into.
    pub buffers: Arc<crate::image::Buffers>,
    conns: Mutex<HashMap<ConnId, mpsc::UnboundedSender<Message>>>,
    site: Arc<crate::failover::Site>,
}

type Slot = Arc<OnceCell<Arc<VmEntry>>>;

pub(crate) struct App {
    pub store: Store,
    /// This applier's certificate (also what test failovers' NBD over TLS presents).
    pub identity: Arc<Identity>,
    pub tests: crate::testfo::TestFailovers,
    pub site: Arc<crate::failover::Site>,
    /// The admin socket (for status: where this applier answers).
    pub admin_path: PathBuf,
    allow: AllowList,
    vms: Mutex<HashMap<String, Slot>>,
    next_conn: AtomicU64,
    open_delay: Option<(String, Duration)>,
    /// Most VMs open at once ([`MAX_VMS`]; tests lower it).
    max_vms: usize,
    /// Every replica this applier opened, until [`Applier::shutdown`] closes them.
    held: Mutex<Held>,
}

/// The replicas an applier holds open (each holds its VM's store lock until its last user
/// lets go): what [`Applier::shutdown`] waits for.
#[derive(Default)]
struct Held {
    /// Shutting down: no replica opens any more.
    closed: bool,
    /// Opens running on blocking threads (a replica each, soon).
    opening: usize,
    /// The replicas opened (dead ones are swept as new ones come).
    entries: Vec<(String, Weak<VmEntry>)>,
}

impl Held {
    /// The VMs whose replica is still open, and how many are being opened ("N being
    /// opened").
    fn still_open(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, w)| w.strong_count() > 0)
            .map(|(n, _)| n.clone())
            .collect();
        if self.opening > 0 {
            v.push(format!("{} being opened", self.opening));
        }
        v
    }
}

/// How long [`Applier::shutdown`] waits for the operations still using a replica (a store
/// operation on a blocking thread, an export) to end, at most.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// Most replicas one applier keeps open: a peer naming ever new VMs is refused past it.
pub const MAX_VMS: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    /// The VM's entry, opening its replica on first use (for `peer`: creating it if new; for
    /// an administrator: only if it exists). The table's lock is held only to find the slot.
    pub async fn vm(
        self: &Arc<Self>,
        name: &str,
        peer: Option<&str>,
    ) -> Result<Arc<VmEntry>, StoreError> {
        validate_name(name).map_err(|source| StoreError::Name {
            name: name.to_string(),
            source,
        })?;
        let slot = {
            let mut vms = lock(&self.vms);
            if !vms.contains_key(name) && vms.len() >= self.max_vms {
                return Err(StoreError::Receive(crate::store::Failure {
                    code: code::BUSY,
                    message: format!(
                        "VM {name}: this applier has {} replicas open, its limit; refused",
                        vms.len()
                    ),
                }));
            }
            Arc::clone(vms.entry(name.to_string()).or_default())
        };
        let app = Arc::clone(self);
        let (key, name, peer) = (name, name.to_string(), peer.map(str::to_string));
        let entry = slot
            .get_or_try_init(|| async move {
                let app2 = Arc::clone(&app);
                tokio::task::spawn_blocking(move || app2.open(&name, peer.as_deref()))
                    .await
                    .map_err(|e| {
                        StoreError::Receive(crate::store::Failure {
                            code: code::INTERNAL,
                            message: e.to_string(),
                        })
                    })?
            })
            .await;
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A failed open leaves no slot behind (a peer naming ever new VMs that cannot
                // be opened would grow the table), unless another caller opened it since.
                let mut vms = lock(&self.vms);
                if vms
                    .get(key)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot) && s.get().is_none())
                {
                    vms.remove(key);
                }
                return Err(e);
            }
        };
        Ok(Arc::clone(entry))
    }

    /// Closes the VM's entry (its store lock goes with the last user of the entry).
    pub fn forget(&self, name: &str) {
        lock(&self.vms).remove(name);
    }

    /// Takes VM `name`'s entry out of the table (to remove its replica): Ok(None) if it is
    /// not open here.
    pub fn take_vm(&self, name: &str) -> Result<Option<Arc<VmEntry>>, StoreError> {
        validate_name(name).map_err(|source| StoreError::Name {
            name: name.to_string(),
            source,
        })?;
        let slot = lock(&self.vms).remove(name);
        Ok(slot.and_then(|s| s.get().cloned()))
    }

    /// Puts an entry taken with [`App::take_vm`] back (unless the applier is shutting down:
    /// then it closes with its last user).
    pub fn put_back(&self, name: &str, entry: Arc<VmEntry>) {
        if lock(&self.held).closed {
            return;
        }
        let cell = OnceCell::new();
        let _ = cell.set(entry);
        lock(&self.vms).insert(name.to_string(), Arc::new(cell));
    }

    /// The VMs this applier has open.
    pub fn open_vms(&self) -> Vec<Arc<VmEntry>> {
        lock(&self.vms)
            .values()
            .filter_map(|s| s.get().cloned())
            .collect()
    }

    /// Opens VM `name`'s replica (its lock) and registers it for [`Applier::shutdown`]; once
    /// the applier shuts down, refused.
    fn open(&self, name: &str, peer: Option<&str>) -> Result<Arc<VmEntry>, StoreError> {
        let shutting_down = || {
            StoreError::Receive(crate::store::Failure {
                code: code::BUSY,
                message: format!("VM {name}: the applier is shutting down; try again once it runs"),
            })
        };
        {
            let mut held = lock(&self.held);
            if held.closed {
                return Err(shutting_down());
            }
            held.opening += 1;
        }
        // Counted down however the open ends (also a panic): shutdown waits for it.
        struct Opening<'a>(&'a Mutex<Held>);
        impl Drop for Opening<'_> {
            fn drop(&mut self) {
                lock(self.0).opening -= 1;
            }
        }
        let opening = Opening(&self.held);
        let entry = self.open_entry(name, peer)?;
        let mut held = lock(&self.held);
        if held.closed {
            // Closed before `opening` counts down: shutdown sees either this open or no lock.
            drop(entry);
            drop(held);
            drop(opening);
            return Err(shutting_down());
        }
        held.entries.retain(|(_, w)| w.strong_count() > 0);
        held.entries
            .push((name.to_string(), Arc::downgrade(&entry)));
        drop(held);
        drop(opening);
        Ok(entry)
    }

    fn open_entry(&self, name: &str, peer: Option<&str>) -> Result<Arc<VmEntry>, StoreError> {
        if let Some((slow, d)) = &self.open_delay {
            if slow == name {
                std::thread::sleep(*d);
            }
        }
        let vs = match peer {
            Some(p) => self.store.open_vm(name, p)?,
            None => self.store.open_existing(name)?,
        };
        let mut session = ApplierSession::new(name, vs.replica());
        session.set_definition(vs.definition_hash());
        let buffers = vs.buffers();
        Ok(Arc::new(VmEntry {
            name: name.to_string(),
            shared: Arc::clone(vs.shared()),
            session: Mutex::new(session),
            store: Arc::new(Mutex::new(vs)),
            sender: Mutex::new(None),
            buffers,
            conns: Mutex::new(HashMap::new()),
            site: Arc::clone(&self.site),
        }))
    }
}

impl VmEntry {
    /// Whether no primary's control stream talks to this replica.
    pub fn conns_empty(&self) -> bool {
        lock(&self.conns).is_empty()
    }

    /// Feeds `ev` to the session and carries out what it asks, until it asks nothing.
    /// Messages are handed to their streams' writers under the session's lock, so they keep
    /// the session's order; store operations run on a blocking thread, and their results go
    /// back to the session.
    async fn drive(self: &Arc<Self>, ev: Event) {
        let mut next = Some(ev);
        while let Some(ev) = next.take() {
            let op = {
                let mut s = lock(&self.session);
                s.handle(ev);
                let conns = lock(&self.conns);
                let mut op = None;
                while let Some(a) = s.poll_action() {
                    match a {
                        Action::Send { conn, msg } => {
                            if let Some(tx) = conns.get(&conn) {
                                let _ = tx.send(msg);
                            }
                        }
                        other => op = Some(other),
                    }
                }
                op
            };
            if let Some(op) = op {
                next = Some(self.run(op).await);
            }
        }
    }

    /// Runs a store operation on a blocking thread; the event that reports it.
    async fn run(self: &Arc<Self>, op: Action) -> Event {
        let me = Arc::clone(self);
        let failed = Failed::of(&op);
        let r = tokio::task::spawn_blocking(move || {
            let mut vs = lock(&me.store);
            let fail = |e: StoreError| (e.code(), e.to_string());
            match op {
                Action::Start {
                    lineage,
                    cycle,
                    kind,
                    freeze,
                    disks,
                    parent,
                    meta,
                } => {
                    let r =
                        vs.start_cycle_with(lineage, cycle, kind, freeze, &disks, parent, &meta);
                    *lock(&me.sender) = vs.sender();
                    if let Err(e) = &r {
                        tracing::warn!(vm = %me.name, cycle, "cycle not started: {e}");
                    }
                    Event::Started(r.map(|s| (s.epoch, s.applied)).map_err(fail), vs.replica())
                }
                Action::Commit {
                    lineage,
                    cycle,
                    epoch,
                    ranges,
                    bytes,
                    digest,
                } => {
                    let r = vs.commit(lineage, cycle, epoch, ranges, bytes, digest);
                    match &r {
                        Err(e) => tracing::warn!(vm = %me.name, cycle, "cycle not applied: {e}"),
                        Ok(c) => {
                            *lock(&me.sender) = None;
                            let point = *c == crate::store::Committed::Point;
                            vmreplica_ops::events::emit(
                                vmreplica_ops::events::Event::new(
                                    vmreplica_ops::events::CYCLE_APPLIED,
                                )
                                .vm(&me.name)
                                .field("cycle", cycle)
                                .field("bytes", bytes)
                                .field("point", point),
                            );
                        }
                    }
                    Event::Committed(r.map(|_| ()).map_err(fail), vs.replica())
                }
                Action::Hashes {
                    conn,
                    disk,
                    offset,
                    block,
                    count,
                } => {
                    let result = vs.hashes(&disk, offset, block, count).map_err(fail);
                    Event::Hashes {
                        conn,
                        disk,
                        offset,
                        result,
                    }
                }
                Action::StoreDefinition {
                    conn,
                    hash,
                    definition,
                    reverse,
                } => {
                    let result = vs.store_definition(hash, &definition, reverse);
                    if let Err(e) = &result {
                        tracing::warn!(vm = %me.name, %hash, "refused the VM definition the primary sent: {e}");
                    }
                    Event::DefinitionStored {
                        conn,
                        hash,
                        result: result.map_err(|e| e.to_string()),
                    }
                }
                Action::LoadDivergent { conn } => Event::Divergent {
                    conn,
                    result: vs.divergent().map_err(fail),
                },
                Action::Promote { conn, request } => {
                    let r = crate::failover::promote(&me.site, &mut vs, &request);
                    *lock(&me.sender) = None;
                    match &r {
                        Ok(p) => tracing::warn!(vm = %me.name, lineage = %p.lineage, "promoted (planned failover)"),
                        Err(e) => tracing::warn!(vm = %me.name, "promote refused: {e}"),
                    }
                    Event::Promoted {
                        conn,
                        result: r.map(|p| p.lineage).map_err(fail),
                        replica: vs.replica(),
                    }
                }
                Action::Reverse { conn, request } => {
                    let r = crate::failover::reverse(&me.site, &mut vs, &request);
                    if let Err(e) = &r {
                        tracing::warn!(vm = %me.name, "reverse refused: {e}");
                    }
                    Event::Reversed {
                        conn,
                        result: r.map_err(fail),
                        replica: vs.replica(),
                    }
                }
                Action::RecordPause { conn, change } => {
                    let r = vs.record_pause(change);
                    match &r {
                        Ok(true) => emit_pause(&me.name, change),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(vm = %me.name, ?change, "the primary's pause not recorded: {e}"),
                    }
                    Event::PauseRecorded {
                        conn,
                        result: r.map(|_| ()).map_err(fail),
                        replica: vs.replica(),
                    }
                }
                Action::Send { .. } => unreachable!("sends are carried out under the session lock"),
            }
        })
        .await;
        r.unwrap_or_else(|e| {
            tracing::error!(vm = %self.name, "store operation failed: {e}; the replica is re-read from disk before its next use");
            // What the panic left in memory is not trusted: the next operation re-reads the
            // replica from disk, as a restart would.
            lock(&self.store).reload();
            let replica = lock(&self.session).replica().to_owned();
            failed.event(replica, e.to_string())
        })
    }

    /// After an operation outside the session changed the replica (a failover): no chunk
    /// of the attempt before goes anywhere, and the session learns the replica's state.
    pub async fn replica_changed(self: &Arc<Self>, replica: crate::rules::Replica) {
        *lock(&self.sender) = None;
        self.drive(Event::Replica(replica)).await;
    }

    /// Whether a chunk of `tag` is of the attempt being received (see the session).
    pub fn admit(&self, tag: &vmreplica_common::wire::Tag) -> Result<JobSender, (u16, String)> {
        lock(&self.session).admit(tag)?;
        lock(&self.sender).clone().ok_or_else(|| {
            (
                code::STALE,
                format!("VM {}: no cycle is being received", self.name),
            )
        })
    }
}

/// The primary's pause or resume, recorded here: logged and in the event stream (as the
/// shipper emits its own), with the site, so a script tells the two apart.
fn emit_pause(vm: &str, change: crate::session::PauseChange) {
    use crate::session::PauseChange;
    use vmreplica_ops::events::{self, Event as Ev};
    let e = match change {
        PauseChange::Paused(since) => {
            tracing::info!(vm, since, "the primary paused replication: recorded");
            Ev::new(events::PAUSED).field("since", since)
        }
        PauseChange::Resumed(at) => {
            tracing::info!(vm, at, "the primary resumed replication: recorded");
            Ev::new(events::RESUMED).field("at", at)
        }
    };
    events::emit(e.vm(vm).field("site", "replica"));
}

/// What a store operation that panicked reports to the session: the result of the kind it
/// waits for (a start, a commit, checksums or a pause), so it never waits for ever.
#[derive(Debug)]
enum Failed {
    Start,
    Commit,
    Hashes {
        conn: crate::session::ConnId,
        disk: String,
        offset: u64,
    },
    Pause {
        conn: crate::session::ConnId,
    },
}

impl Failed {
    fn of(op: &Action) -> Failed {
        match op {
            Action::Commit { .. } => Failed::Commit,
            Action::Hashes {
                conn, disk, offset, ..
            } => Failed::Hashes {
                conn: *conn,
                disk: disk.clone(),
                offset: *offset,
            },
            Action::RecordPause { conn, .. } => Failed::Pause { conn: *conn },
            _ => Failed::Start,
        }
    }

    fn event(self, replica: crate::rules::Replica, why: String) -> Event {
        let e = (code::INTERNAL, why);
        match self {
            Failed::Start => Event::Started(Err(e), replica),
            Failed::Commit => Event::Committed(Err(e), replica),
            Failed::Hashes { conn, disk, offset } => Event::Hashes {
                conn,
                disk,
                offset,
                result: Err(e),
            },
            Failed::Pause { conn } => Event::PauseRecorded {
                conn,
                result: Err(e),
                replica,
            },
        }
    }
}

/// A running applier.
pub struct Applier {
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
    admin: Option<crate::admin::AdminServer>,
    app: Arc<App>,
    registration: vmreplica_ops::registry::Registration,
    health: tokio::task::JoinHandle<()>,
}

impl Applier {
    /// Binds and starts serving.
    pub fn start(cfg: ApplierConfig) -> Result<Applier, Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::new(&cfg.store, cfg.retention)?;
        let reset_key = vmreplica_common::resetkey::load_or_create(&cfg.store.join("reset.key"))?;
        let endpoint = link::server(cfg.listen, &cfg.identity, &cfg.tuning, Some(&reset_key))?;
        // Absolute: the paths a failover writes (shipper.toml, NBD URIs) are read by other
        // processes, and relative ones in shipper.toml are taken from its own directory.
        let site = Arc::new(crate::failover::Site {
            root: std::path::absolute(&cfg.store)?,
            identity: cfg.identity_files,
        });
        let admin_path = cfg
            .admin_socket
            .clone()
            .unwrap_or_else(|| cfg.store.join("applier.sock"));
        let app = Arc::new(App {
            store,
            identity: Arc::new(cfg.identity),
            tests: Default::default(),
            site,
            admin_path: admin_path.clone(),
            allow: cfg.allow,
            vms: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            open_delay: cfg.open_delay,
            max_vms: MAX_VMS,
            held: Default::default(),
        });
        let admin = crate::admin::AdminServer::start(Arc::clone(&app), &admin_path)?;
        // Test failovers the store records are served again (their points stay pinned
        // meanwhile: retention reads the pins from the state).
        tokio::spawn(crate::testfo::admin::restore(Arc::clone(&app)));
        // The VMs this site is primary for: their processes are found again (or started).
        {
            let app = Arc::clone(&app);
            tokio::spawn(async move { crate::admin::supervise(&app).await });
        }
        let ep = endpoint.clone();
        let accepting = Arc::clone(&app);
        let task = tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let app = Arc::clone(&accepting);
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => connection(app, conn).await,
                        // A peer retrying with a wrong certificate: once a minute per
                        // peer and reason, counted (a new reason is said at once).
                        Err(e) => {
                            let why = tls::describe_refusal(&e.to_string(), "replica", "primary");
                            vmreplica_common::warn_limited!(
                                Duration::from_secs(60),
                                key = &format!("{} {why}", remote.ip()),
                                %remote,
                                "refused a connection: {why}"
                            )
                        }
                    }
                });
            }
        });
        let mut entry = vmreplica_ops::registry::Entry::me(vmreplica_ops::registry::APPLIER);
        entry.control = Some(std::path::absolute(&admin_path).unwrap_or(admin_path.clone()));
        entry.state = Some(std::path::absolute(&cfg.store).unwrap_or(cfg.store.clone()));
        let registration = vmreplica_ops::registry::register(entry);
        let health = crate::ops::watch_health(Arc::clone(&app), admin_path);
        Ok(Applier {
            endpoint,
            task,
            admin: Some(admin),
            app,
            registration,
            health,
        })
    }

    /// Serves Prometheus metrics of every replica at `addr` (`GET /metrics`); returns the
    /// address bound.
    pub async fn serve_metrics(&mut self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let (app, admin) = (Arc::clone(&self.app), self.app.admin_path.clone());
        let source: vmreplica_ops::metrics::Source =
            Arc::new(move || crate::ops::report(&app, &admin));
        let bound = vmreplica_ops::metrics::serve(addr, source).await?;
        self.registration
            .update(|e| e.metrics = Some(bound.to_string()));
        Ok(bound)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Stops accepting, closes connections, and returns once every replica it had open is
    /// closed (its store lock released: a store opened next is not Busy), or after
    /// [`SHUTDOWN_WAIT`] if an operation still uses one (said in the log).
    pub async fn shutdown(mut self) {
        self.endpoint
            .close(VarInt::from_u32(0), b"applier shutting down");
        self.endpoint.wait_idle().await;
        self.task.abort();
        self.health.abort();
        // An aborted task is dropped (with its hold of the App) when the runtime next runs
        // it: wait for that.
        let _ = (&mut self.task).await;
        let _ = (&mut self.health).await;
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        // Test failovers stop being served (their VMs keep running, detached); the next
        // applier serves them again.
        let app = Arc::clone(&self.app);
        let _ = tokio::task::spawn_blocking(move || app.tests.shutdown_all()).await;
        // No replica opens any more, and the table lets go of those open: whatever still
        // holds the App (an admin client, the metrics endpoint) holds no replica. Dropping
        // a replica may wait for its receive pipeline: on a blocking thread.
        let app = Arc::clone(&self.app);
        let _ = tokio::task::spawn_blocking(move || {
            lock(&app.held).closed = true;
            let table = std::mem::take(&mut *lock(&app.vms));
            drop(table);
        })
        .await;
        // The connections' tasks and the operations they started end on their own (their
        // connections are closed): each lets go of its replica as it ends.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        loop {
            let still = lock(&self.app.held).still_open();
            if still.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    ?still,
                    "shutting down: replicas still in use after {SHUTDOWN_WAIT:?} (an operation \
                     still runs); each closes when it ends"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What the streams of one connection share: the VM its hello named.
struct ConnState {
    id: ConnId,
    peer: String,
    vm: OnceLock<Arc<VmEntry>>,
}

async fn connection(app: Arc<App>, conn: Connection) {
    let remote = conn.remote_address();
    let names = link::peer_names(&conn);
    let Some(peer) = app.allow.admit(&names) else {
        vmreplica_common::warn_limited!(
            Duration::from_secs(60),
            key = &remote.ip().to_string(),
            %remote,
            ?names,
            "refused primary: its certificate name is not in the allow-list"
        );
        conn.close(
            VarInt::from_u32(u32::from(code::NOT_ALLOWED)),
            b"not allowed: certificate name is not in the applier's allow-list",
        );
        return;
    };
    tracing::info!(%remote, peer, "primary connected");
    let st = Arc::new(ConnState {
        id: app.next_conn.fetch_add(1, Ordering::Relaxed),
        peer: peer.clone(),
        vm: OnceLock::new(),
    });
    let queued = data::Queue::new();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%remote, peer, "primary disconnected: {e}");
                if let Some(vm) = st.vm.get() {
                    lock(&vm.conns).remove(&st.id);
                }
                return;
            }
        };
        let (app, st, queued) = (Arc::clone(&app), Arc::clone(&st), queued.clone());
        tokio::spawn(async move {
            if let Err(e) = stream(app, st, queued, send, recv).await {
                tracing::warn!("stream ended: {e}");
            }
        });
    }
}

pub(crate) async fn reply_error(
    send: &mut SendStream,
    code: u16,
    message: String,
) -> Result<(), LinkError> {
    link::send(send, &Message::Error { code, message }).await?;
    let _ = send.finish();
    Ok(())
}

async fn stream(
    app: Arc<App>,
    st: Arc<ConnState>,
    queued: data::Queue,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), LinkError> {
    match link::recv(&mut recv).await? {
        Some(Message::Hello {
            version,
            vm,
            lineage,
        }) => {
            let entry = match app.vm(&vm, Some(&st.peer)).await {
                // The owner as last saved: a failover's adoption changes it.
                Ok(e) if e.shared.state().owner == st.peer => e,
                Ok(e) => {
                    let err = StoreError::NotOwner {
                        vm: vm.clone(),
                        owner: e.shared.state().owner.clone(),
                        peer: st.peer.clone(),
                    };
                    tracing::warn!(peer = st.peer, "refused VM {vm}: {err}");
                    return reply_error(&mut send, err.code(), err.to_string()).await;
                }
                Err(e) => {
                    tracing::warn!(peer = st.peer, "refused VM {vm}: {e}");
                    return reply_error(&mut send, e.code(), e.to_string()).await;
                }
            };
            let _ = st.vm.set(Arc::clone(&entry));
            control(entry, st.id, version, lineage, send, recv).await
        }
        Some(Message::Chunk(first)) => {
            let Some(entry) = st.vm.get().cloned() else {
                return reply_error(&mut send, code::PROTOCOL, "chunks before Hello".into()).await;
            };
            data::data_stream(entry, first, send, recv, queued).await
        }
        Some(other) => {
            let m = format!("unexpected first message {}", other.name());
            reply_error(&mut send, code::PROTOCOL, m).await
        }
        None => Ok(()),
    }
}

/// A control stream: its messages go to the session; the session's messages for it go out
/// through a writer task, in order.
async fn control(
    vm: Arc<VmEntry>,
    conn: ConnId,
    version: u16,
    lineage: Option<vmreplica_common::lineage::Lineage>,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), LinkError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    lock(&vm.conns).insert(conn, tx);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            link::send(&mut send, &m).await?;
        }
        let _ = send.finish();
        Ok::<(), LinkError>(())
    });
    vm.drive(Event::Hello {
        conn,
        version,
        lineage,
    })
    .await;
    let r = async {
        while let Some(msg) = link::recv(&mut recv).await? {
            vm.drive(Event::Message { conn, msg }).await;
        }
        Ok::<(), LinkError>(())
    }
    .await;
    lock(&vm.conns).remove(&conn);
    let _ = writer.await;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmreplica_common::lineage::Lineage;

    /// A store operation that panicked reports the result its session waits for (before, every
    /// panic was reported as a failed start: a session waiting for a commit or checksums
    /// waited for ever, and every later request of the VM with it).
    #[test]
    fn a_panicked_operation_reports_the_result_its_session_waits_for() {
        let replica = crate::rules::Replica {
            lineage: None,
            last_cycle: 0,
            last_freeze: 0,
            has_points: false,
            receiving: None,
            role: vmreplica_common::wire::Role::Replica,
            paused: None,
        };
        let commit = Action::Commit {
            lineage: Lineage([1; 16]),
            cycle: 3,
            epoch: 1,
            ranges: 0,
            bytes: 0,
            digest: 0,
        };
        assert!(matches!(
            Failed::of(&commit).event(replica, "boom".into()),
            Event::Committed(Err((code::INTERNAL, ref m)), _) if m == "boom"
        ));
        let hashes = Action::Hashes {
            conn: 7,
            disk: "sys".into(),
            offset: 4096,
            block: 65536,
            count: 2,
        };
        assert!(matches!(
            Failed::of(&hashes).event(replica, "boom".into()),
            Event::Hashes { conn: 7, ref disk, offset: 4096, result: Err(_) } if disk == "sys"
        ));
    }

    /// A peer naming ever new VMs cannot grow the applier's table: a failed open leaves no
    /// entry, and past the limit a new VM is refused (BUSY) while open ones go on.
    #[tokio::test]
    async fn the_table_of_open_vms_is_bounded() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = Store::new(dir.path(), crate::store::Retention::keep_all()).unwrap();
        let ca = dir.path().join("ca");
        vmreplica_common::tls::init_ca(&ca, "test CA", 30).unwrap();
        vmreplica_common::tls::issue(
            &ca,
            "replica-1",
            &[],
            vmreplica_common::tls::Validity::days(30),
            &ca,
        )
        .unwrap();
        let identity = Identity::load(
            &ca.join("replica-1.pem"),
            &ca.join("replica-1.key"),
            &ca.join("ca.pem"),
        )
        .unwrap();
        let app = Arc::new(App {
            store,
            identity: Arc::new(identity),
            tests: Default::default(),
            admin_path: dir.path().join("applier.sock"),
            allow: AllowList::new(&[]),
            vms: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            open_delay: None,
            max_vms: 2,
            held: Default::default(),
            site: Arc::new(crate::failover::Site {
                root: dir.path().to_path_buf(),
                identity: None,
            }),
        });
        // Replicas that cannot be opened (state lost, data left): no entry stays.
        for i in 0..5 {
            let undo = dir.path().join(format!("bad{i}/undo"));
            std::fs::create_dir_all(&undo).unwrap();
            std::fs::write(undo.join("3.undo"), b"x").unwrap();
            assert!(app.vm(&format!("bad{i}"), Some("p")).await.is_err());
        }
        assert_eq!(lock(&app.vms).len(), 0);
        app.vm("vm1", Some("p")).await.unwrap();
        app.vm("vm2", Some("p")).await.unwrap();
        let e = app
            .vm("vm3", Some("p"))
            .await
            .err()
            .expect("past the limit");
        assert_eq!(e.code(), code::BUSY, "{e}");
        assert!(e.to_string().contains("vm3"), "{e}");
        app.vm("vm1", Some("p")).await.expect("an open VM goes on");
        assert_eq!(lock(&app.vms).len(), 2);
    }
}
