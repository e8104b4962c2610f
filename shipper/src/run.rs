//! The shipper's driver: the async loop around a [`ShipperSession`]. It carries out the
//! session's actions (tracker requests on a blocking thread, QUIC connections, control
//! messages, planning and sending on tasks of their own) and feeds their outcomes back as
//! events; the session decides everything else. The guest is never held up: only the
//! tracker's freeze pauses writes, for the time it takes to drain the ones in flight.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use quinn::{Connection, RecvStream, SendStream};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::link::{self, Client, LinkError};
use vmreplica_common::tls::{self, Identity};
use vmreplica_common::wire::{CycleKind, DiskInfo, LineagePoint, Message, PROTOCOL_VERSION};
use vmreplica_tracker::control::{self, Applied, Request};
use vmreplica_tracker::Generation;

use vmreplica_ops::status::VmStatus;

use crate::appfreeze::Outcome;
use crate::config::ShipperConfig;
use crate::control::Command;
use crate::ops::{Ops, Settings};
use crate::progress::{Progress, Snapshot};
use crate::session::{self, Action, Event, Frozen, ShipperSession, TrackerOp, TrackerView};
use crate::ship::{open_readers, plan_with_progress, send_data, SendStats, ShipError, ShipOptions};

/// Calls the tracker's control socket off the async threads. Its failures name the tracker
/// and its socket: the primary's side, not the applier's.
async fn tracker(socket: &Path, req: Request) -> Result<Value, ShipError> {
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
async fn tracker_op(
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

pub fn resolve(addr: &str) -> Result<SocketAddr, ShipError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ShipError::Local(format!("cannot resolve replica address {addr:?}")))
}

pub fn endpoint(cfg: &ShipperConfig) -> Result<Client, ShipError> {
    let id = Identity::load(&cfg.cert, &cfg.key, &cfg.ca).map_err(LinkError::from)?;
    let remote = resolve(&cfg.replica)?;
    let bind: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    Ok(link::client(bind, &id, &cfg.tuning)?)
}

/// One QUIC connection to the applier and its control stream; a certificate either side
/// refuses is reported in plain words: which side refused whose certificate, and why.
pub(crate) async fn open(
    ep: &Client,
    cfg: &ShipperConfig,
) -> Result<(Connection, (SendStream, RecvStream)), ShipError> {
    let remote = resolve(&cfg.replica)?;
    let refused = |reason: String| LinkError::Connect {
        peer: cfg.replica.clone(),
        reason: tls::describe_refusal(&reason, "primary", "replica"),
    };
    let conn = ep
        .connect(remote, &cfg.server_name)
        .map_err(|e| refused(e.to_string()))?
        .await
        .map_err(|e| refused(e.to_string()))?;
    let ctl = conn.open_bi().await.map_err(|e| refused(e.to_string()))?;
    Ok((conn, ctl))
}

/// Says hello on a control stream and returns the welcome. The replica checks this
/// primary's certificate after the handshake completed here: a refusal arrives as the
/// connection's end, on this first exchange.
pub(crate) async fn hello(
    cfg: &ShipperConfig,
    ctl: &mut (SendStream, RecvStream),
    lineage: Option<Lineage>,
) -> Result<Message, ShipError> {
    let refused = |reason: String| LinkError::Connect {
        peer: cfg.replica.clone(),
        reason: tls::describe_refusal(&reason, "primary", "replica"),
    };
    let r = async {
        link::send(
            &mut ctl.0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                vm: cfg.vm.clone(),
                lineage,
            },
        )
        .await?;
        link::expect(&mut ctl.1).await
    }
    .await;
    match r {
        Ok(m) => Ok(m),
        Err(LinkError::Peer(reason)) => Err(ShipError::Refused { cycle: 0, reason }),
        Err(LinkError::Connection(c)) => Err(refused(c.to_string()).into()),
        Err(LinkError::Truncated) => Err(ShipError::Protocol(
            "the applier closed the control stream at hello: it may run an older vmreplica \
             (replication protocol 1); upgrade it"
                .into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Connects and says hello for the configured VM only: the replica's lineage and last
/// cycle (a certificate refused either way is said in plain words).
pub async fn greet(cfg: &ShipperConfig) -> Result<(Option<Lineage>, u64), ShipError> {
    let ep = endpoint(cfg)?;
    let (conn, mut ctl) = open(&ep, cfg).await?;
    let r = match hello(cfg, &mut ctl, None).await? {
        Message::Welcome {
            lineage,
            last_cycle,
            ..
        } => Ok((lineage, last_cycle)),
        other => Err(ShipError::Protocol(other.name().into())),
    };
    conn.close(0u32.into(), b"hello only");
    ep.endpoint.wait_idle().await;
    r
}

/// A connected attempt: its connections, and where control messages go.
struct Link {
    attempt: u64,
    conns: Vec<Connection>,
    ctl: mpsc::UnboundedSender<Message>,
}

/// What the driver's tasks report back.
enum Report {
    Session(Event),
    Tracker(Result<(TrackerView, Option<Generation>, Excluded), String>),
    Connected(u64, Link),
    Sent(u64, Result<SendStats, String>),
    /// An application-consistent freeze happened (freeze id, generation, frozen ms), or
    /// could not (the error).
    App(Result<(u64, u64, u64), String>),
    /// The tracker marked every disk for a resync (or could not): answer the operator.
    ResyncMarked(
        Result<(), String>,
        std::sync::mpsc::Sender<Result<Value, String>>,
    ),
    /// A status was made (for health events).
    Health(Box<VmStatus>),
    /// Read the configuration again (SIGHUP).
    Reload,
}

/// Disks the tracker serves without tracking them: (name, size).
type Excluded = Vec<(String, u64)>;

/// How often the bandwidth schedule and health are looked at.
const OPS_TICK: Duration = Duration::from_secs(5);

/// Runs replication until `stop` resolves (or an error that needs an operator).
pub async fn run(
    cfg: ShipperConfig,
    progress: Arc<dyn Progress>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ShipError> {
    run_with(cfg, progress, stop, None, None).await.map(|_| ())
}

/// Adopts this site's images as the replica waiting for the reverse cycle continuing the
/// point given (a planned failover's step between its last cycle and the promote).
pub type Adopt = Arc<dyn Fn(LineagePoint) -> Result<(), String> + Send + Sync>;

/// A planned failover, as [`run_with`] carries it out.
pub struct PlannedRun {
    pub planned: session::Planned,
    pub adopt: Adopt,
}

/// What a planned failover did: the last cycle (`parent`), and the replica's new lineage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished {
    pub parent: LineagePoint,
    pub lineage: Lineage,
}

/// [`run`], reading the configuration again whenever `reload` yields (SIGHUP): the
/// interval, bandwidth limit and schedule, compression, RPO limit and application-consistent
/// settings change at once; other keys need a restart (logged). With `planned`, the last
/// cycle of a sealed tracker, then the promote: returns once the replica is the primary.
pub async fn run_with(
    cfg: ShipperConfig,
    progress: Arc<dyn Progress>,
    stop: impl std::future::Future<Output = ()>,
    mut reload: Option<mpsc::UnboundedReceiver<()>>,
    planned: Option<PlannedRun>,
) -> Result<Option<Finished>, ShipError> {
    let _lock = crate::lock::lock(&cfg.tracker).map_err(|e| ShipError::Local(e.to_string()))?;
    let mut ops = Ops::new(&cfg).map_err(ShipError::Local)?;
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Command>();
    // A planned failover is a one-off command run where the VM's shipper was just stopped
    // (its control socket may still answer for a moment): no control socket of its own.
    let _no_control = if planned.is_none() {
        crate::control::start(&ops.socket, control_tx).map_err(|e| {
            ShipError::Local(format!("control socket {}: {e}", ops.socket.display()))
        })?;
        None
    } else {
        Some(control_tx)
    };
    if let Some(addr) = cfg.metrics {
        let socket = ops.socket.clone();
        let source: vmreplica_ops::metrics::Source = Arc::new(move || {
            crate::control::call(&socket, &crate::control::Request::Status)
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_value::<VmStatus>(v).ok())
                .into_iter()
                .collect()
        });
        let bound = vmreplica_ops::metrics::serve(addr, source)
            .await
            .map_err(|e| ShipError::Local(e.to_string()))?;
        ops.registration
            .update(|e| e.metrics = Some(bound.to_string()));
    }
    let ep = endpoint(&cfg)?;
    let packers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    let progress = ops.progress(progress);
    let streams = cfg.streams;
    let engine = vmreplica_common::engine::probe(false);
    let make_opts = |ops: &Ops| {
        Arc::new(ShipOptions {
            compression: ops.settings.compression,
            streams,
            limit: Some(Arc::clone(&ops.limit)),
            engine: Arc::clone(&engine),
            progress: Arc::clone(&progress),
            packers,
        })
    };
    let mut opts = make_opts(&ops);
    let now = Instant::now();
    let initial_sync_at = cfg
        .initial_sync_at
        .map(|at| now + at.duration_since(SystemTime::now()).unwrap_or_default());
    if let Some(at) = initial_sync_at.filter(|at| *at > now) {
        tracing::info!(
            vm = cfg.vm,
            "initial sync scheduled in {}",
            humantime::format_duration(Duration::from_secs((at - now).as_secs()))
        );
    }
    let paused = ops.state.history.paused_since();
    if paused.is_some() {
        tracing::info!(
            vm = cfg.vm,
            "replication is paused (`vmreplica resume {}` goes on)",
            cfg.vm
        );
    }
    let mut s = ShipperSession::new(
        session::Config {
            vm: cfg.vm.clone(),
            interval: ops.settings.interval(),
            initial_sync_at,
            planned: planned.as_ref().map(|p| p.planned.clone()),
            paused,
            resumed_at: resumed_at(&ops),
        },
        now,
    );
    s.set_definition(crate::definition::load(&ops.definition));
    let adopt = planned.map(|p| p.adopt);
    let cfg = Arc::new(cfg);
    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let hashes: Arc<Mutex<Option<mpsc::UnboundedSender<Message>>>> = Arc::default();
    let mut link: Option<Link> = None;
    let mut frozen: Option<Generation> = None;
    let mut cycle_started = Instant::now();
    let mut last_sent = SendStats::default();
    let mut ops_tick = tokio::time::interval(OPS_TICK);
    tokio::pin!(stop);
    loop {
        while let Some(a) = s.poll_action() {
            match a {
                Action::Tracker(TrackerOp::Freeze { full }) if ops.app_due() => {
                    s.set_definition(crate::definition::load(&ops.definition));
                    let (tx, socket) = (tx.clone(), cfg.tracker.clone());
                    let agent = ops.settings.guest_agent.clone().unwrap_or_default();
                    tokio::spawn(async move {
                        let r = app_freeze(&agent, &socket, full, &tx).await;
                        let _ = tx.send(Report::Tracker(r));
                    });
                }
                Action::Tracker(op) => {
                    if matches!(op, TrackerOp::Freeze { .. }) {
                        // An edited definition goes with the cycle this freeze starts.
                        s.set_definition(crate::definition::load(&ops.definition));
                    }
                    let (tx, socket) = (tx.clone(), cfg.tracker.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Report::Tracker(tracker_op(&socket, op).await));
                    });
                }
                Action::Connect { attempt } => {
                    s.set_definition(crate::definition::load(&ops.definition));
                    let (tx, ep, cfg, hashes) = (
                        tx.clone(),
                        ep.clone(),
                        Arc::clone(&cfg),
                        Arc::clone(&hashes),
                    );
                    tokio::spawn(async move {
                        match connect(&ep, &cfg, attempt, tx.clone(), hashes).await {
                            Ok(l) => {
                                let _ = tx.send(Report::Connected(attempt, l));
                            }
                            Err(e) => {
                                let _ = tx.send(Report::Session(Event::Disconnected {
                                    attempt,
                                    reason: e.to_string(),
                                }));
                            }
                        }
                    });
                }
                Action::Close { attempt } => {
                    if let Some(l) = link.take_if(|l| l.attempt == attempt) {
                        for c in &l.conns {
                            c.close(0u32.into(), b"attempt over");
                        }
                    }
                }
                Action::Send { attempt, mut msg } => {
                    if matches!(msg, Message::BeginCycle { .. }) {
                        cycle_started = Instant::now();
                        ops.begin(&mut msg, frozen.as_ref());
                    }
                    if let Some(l) = link.as_ref().filter(|l| l.attempt == attempt) {
                        let _ = l.ctl.send(msg);
                    }
                }
                Action::Plan {
                    attempt,
                    generation,
                    freeze,
                    kind,
                } => {
                    let (Some(l), Some(g)) = (
                        link.as_ref().filter(|l| l.attempt == attempt),
                        frozen
                            .clone()
                            .filter(|g| g.generation == generation && g.id == freeze),
                    ) else {
                        let _ = tx.send(Report::Session(Event::Planned {
                            attempt,
                            result: Err(format!("generation {generation} is not frozen any more")),
                        }));
                        continue;
                    };
                    let (tx, ctl, hashes, engine) = (
                        tx.clone(),
                        l.ctl.clone(),
                        Arc::clone(&hashes),
                        Arc::clone(&opts.engine),
                    );
                    let socket = cfg.tracker.clone();
                    // A reverse cycle ships what is frozen, or (full: a side lost its
                    // tracking) what differs by checksums.
                    let kind = match kind {
                        CycleKind::Reverse if g.full => CycleKind::Resync,
                        CycleKind::Reverse => CycleKind::Delta,
                        k => k,
                    };
                    let live = Arc::clone(&ops.live);
                    tokio::spawn(async move {
                        let result = async {
                            still_frozen(&socket, freeze).await?;
                            plan_cycle(&g, kind, &engine, ctl, hashes, live)
                                .await
                                .map_err(|e| e.to_string())
                        }
                        .await;
                        let _ = tx.send(Report::Session(Event::Planned { attempt, result }));
                    });
                }
                Action::SendData {
                    attempt,
                    tag,
                    freeze,
                    ranges,
                } => {
                    let (Some(l), Some(g)) = (
                        link.as_ref().filter(|l| l.attempt == attempt),
                        frozen
                            .clone()
                            .filter(|g| g.generation == tag.cycle && g.id == freeze),
                    ) else {
                        let _ = tx.send(Report::Sent(attempt, Err("the attempt is over".into())));
                        continue;
                    };
                    let (tx, conns, opts) = (tx.clone(), l.conns.clone(), Arc::clone(&opts));
                    let kind = s.current().map_or(CycleKind::Delta, |c| c.1);
                    let socket = cfg.tracker.clone();
                    tokio::spawn(async move {
                        let r = async {
                            let readers = open_readers(&g).map_err(|e| e.to_string())?;
                            let st = send_data(&conns, &readers, tag, kind, &ranges, &opts)
                                .await
                                .map_err(|e| e.to_string())?;
                            // What was read is that freeze's only if it is still frozen.
                            still_frozen(&socket, freeze).await?;
                            Ok(st)
                        }
                        .await;
                        let _ = tx.send(Report::Sent(attempt, r));
                    });
                }
                Action::Done {
                    cycle,
                    kind,
                    bytes,
                    skipped,
                } => {
                    opts.progress.end(true);
                    tracing::info!(
                        vm = cfg.vm,
                        cycle,
                        ?kind,
                        chunks = last_sent.chunks,
                        resumed_skipped = skipped,
                        cycle_mib = format!("{:.1}", bytes as f64 / 1048576.0),
                        data_mib = format!("{:.1}", last_sent.data_bytes as f64 / 1048576.0),
                        wire_mib = format!("{:.1}", last_sent.wire_bytes as f64 / 1048576.0),
                        secs = format!("{:.2}", cycle_started.elapsed().as_secs_f64()),
                        "cycle applied on the replica"
                    );
                    ops.done(cycle, kind, bytes, last_sent.wire_bytes, frozen.as_ref());
                    last_sent = SendStats::default();
                }
                Action::Retry { error, after } => {
                    opts.progress.end(false);
                    vmreplica_common::warn_limited!(
                        Duration::from_secs(300),
                        key = &error,
                        vm = cfg.vm,
                        "replication interrupted: {error}; retrying in {}s (the frozen generation is kept)",
                        after.as_secs()
                    );
                    ops.failed(&error, after);
                }
                Action::Definition { hash, result } => match result {
                    Ok(()) => {
                        tracing::info!(vm = cfg.vm, %hash, "the replica holds the VM definition")
                    }
                    Err(e) => tracing::error!(
                        vm = cfg.vm,
                        %hash,
                        "the replica refused the VM definition: {e}; it keeps the one it had \
                         (replication goes on): correct the definition"
                    ),
                },
                Action::Stop { error } if adopt.is_some() => {
                    // A planned failover is a command: it ends, saying why.
                    opts.progress.end(false);
                    tracing::error!(vm = cfg.vm, "planned failover stopped: {error}");
                    ep.endpoint.close(0u32.into(), b"planned failover stopped");
                    return Err(ShipError::Protocol(error));
                }
                Action::Stop { error } => {
                    opts.progress.end(false);
                    tracing::error!(
                        vm = cfg.vm,
                        "replication stopped: {error} (`vmreplica resume {}` tries again once it is fixed)",
                        cfg.vm
                    );
                    ops.stopped(&error);
                }
                Action::Adopt { parent } => {
                    let (tx, adopt) = (tx.clone(), adopt.clone());
                    tokio::task::spawn_blocking(move || {
                        let r = match adopt {
                            Some(a) => a(parent),
                            None => Err("no adoption step was given".into()),
                        };
                        let _ = tx.send(Report::Session(Event::Adopted(r)));
                    });
                }
                Action::PauseTold { since } => match since {
                    Some(since) => {
                        tracing::info!(vm = cfg.vm, since, "the replica site records the pause")
                    }
                    None => tracing::info!(
                        vm = cfg.vm,
                        "the replica site holds nothing a pause concerns (an empty replica, or \
                         the VM failed over to it): not told"
                    ),
                },
                Action::PauseUntold { error, after } => {
                    vmreplica_common::warn_limited!(
                        Duration::from_secs(300),
                        key = &error,
                        vm = cfg.vm,
                        "the replica site is not told of the pause yet (its status counts \
                         missed cycles meanwhile): {error}; trying again in {}s",
                        after.as_secs()
                    );
                }
                Action::Finished { parent, lineage } => {
                    tracing::info!(vm = cfg.vm, %parent, new_lineage = %lineage, "the replica is the VM's primary now");
                    ep.endpoint.close(0u32.into(), b"planned failover done");
                    return Ok(Some(Finished { parent, lineage }));
                }
            }
        }
        let wake = s.poll_timeout();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let reloaded = async {
            match reload.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        let report = tokio::select! {
            r = rx.recv() => r,
            _ = sleep => {
                s.handle(Event::Tick, Instant::now());
                continue;
            }
            Some(cmd) = control_rx.recv() => {
                let old = ops.settings.compression;
                control_command(cmd, &mut s, &mut ops, &tx);
                if ops.settings.compression != old {
                    opts = make_opts(&ops);
                }
                continue;
            }
            Some(()) = reloaded => Some(Report::Reload),
            _ = ops_tick.tick() => {
                ops.schedule_tick();
                let tx = tx.clone();
                let f = status_job(&ops);
                tokio::spawn(async move {
                    if let Ok(st) = tokio::task::spawn_blocking(f).await {
                        let _ = tx.send(Report::Health(Box::new(st)));
                    }
                });
                continue;
            }
            _ = &mut stop => {
                ep.endpoint.close(0u32.into(), b"shipper stopping");
                return Ok(None);
            }
        };
        let Some(report) = report else { continue };
        let ev = match report {
            Report::Session(ev) => ev,
            Report::Tracker(r) => Event::Tracker(r.map(|(view, g, excluded)| {
                frozen = g;
                ops.excluded = excluded;
                view
            })),
            Report::Connected(attempt, l) => {
                if link.as_ref().is_some_and(|cur| cur.attempt > attempt) {
                    // An earlier attempt's connection, made after the session moved on (a
                    // pause while connecting starts a new attempt at once): it must not
                    // replace the current one.
                    for c in &l.conns {
                        c.close(0u32.into(), b"attempt over");
                    }
                    continue;
                }
                tracing::info!(
                    vm = cfg.vm,
                    replica = cfg.replica,
                    "connected to the applier"
                );
                link = Some(l);
                Event::Connected { attempt }
            }
            Report::Sent(attempt, r) => Event::Sent {
                attempt,
                result: r.map(|st| {
                    last_sent = st;
                }),
            },
            Report::App(r) => {
                note_app(&mut ops, r);
                continue;
            }
            Report::ResyncMarked(r, reply) => {
                if r.is_ok() {
                    ops.resync_requested();
                    s.handle(Event::ResyncRequested, Instant::now());
                    tracing::info!(vm = cfg.vm, "checksum resync requested");
                }
                let _ = reply.send(r.map(|()| Value::Null));
                continue;
            }
            Report::Health(st) => {
                ops.note_health(&st);
                continue;
            }
            Report::Reload => {
                let _ = reload_config(&mut s, &mut ops, "sighup");
                opts = make_opts(&ops);
                continue;
            }
        };
        s.handle(ev, Instant::now());
    }
}

/// Reads the configuration file again and applies what may change at run time.
fn reload_config(s: &mut ShipperSession, ops: &mut Ops, by: &str) -> Result<Value, String> {
    let new = ShipperConfig::load(&ops.config_path).map_err(|e| {
        tracing::error!("reload: {e}; the settings in force stay");
        e.to_string()
    })?;
    if new.vm != ops.started.vm {
        let e = format!(
            "reload: {} now configures VM {}, but this shipper ships VM {}: nothing was \
             reloaded (put the VM's name back; another VM needs its own shipper)",
            ops.config_path.display(),
            new.vm,
            ops.started.vm
        );
        tracing::error!("{e}");
        return Err(e);
    }
    let restart = ops.started.restart_only_changes(&new);
    if !restart.is_empty() {
        tracing::warn!(
            vm = ops.vm,
            "reload: {} changed in {}: a running shipper keeps them until it restarts; the \
             other settings are in force now",
            restart.join(", "),
            ops.config_path.display()
        );
    }
    let settings = Settings::of(&new);
    let interval = settings.interval();
    let mut changed = ops.apply(settings, by);
    // A definition named, changed or dropped goes with the next cycle.
    ops.definition = crate::definition::Source::of(&new);
    s.set_definition(crate::definition::load(&ops.definition));
    if s.interval() != interval {
        s.handle(Event::SetInterval(interval), Instant::now());
    }
    if !restart.is_empty() {
        changed["restart_needed"] = serde_json::json!(restart);
    }
    Ok(changed)
}

/// Carries out an operator's request from the control socket.
fn control_command(
    cmd: Command,
    s: &mut ShipperSession,
    ops: &mut Ops,
    tx: &mpsc::UnboundedSender<Report>,
) {
    use crate::control::Request as C;
    let Command { req, reply } = cmd;
    let r = match req {
        C::Status => {
            let f = status_job(ops);
            tokio::spawn(async move {
                let r = tokio::task::spawn_blocking(f)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|st| serde_json::to_value(st).map_err(|e| e.to_string()));
                let _ = reply.send(r);
            });
            return;
        }
        C::Pause => ops.set_paused(true).map(|changed| {
            let since = ops
                .state
                .history
                .paused_since()
                .unwrap_or_else(|| crate::ops::now_ms() / 1000);
            s.handle(Event::Pause { since }, Instant::now());
            json!({ "changed": changed })
        }),
        C::Resume => ops.set_paused(false).map(|changed| {
            s.handle(
                Event::Resume {
                    at: resumed_at(ops),
                },
                Instant::now(),
            );
            json!({ "changed": changed })
        }),
        C::Resync => {
            let (tx, socket) = (tx.clone(), ops.tracker.clone());
            tokio::spawn(async move {
                let r = mark_resync(&socket).await;
                let _ = tx.send(Report::ResyncMarked(r, reply));
            });
            return;
        }
        C::Set { key, value } => {
            let mut new = ops.settings.clone();
            new.set(&key, &value).map(|()| {
                let interval = new.interval();
                let changed = ops.apply(new, "set");
                if s.interval() != interval {
                    s.handle(Event::SetInterval(interval), Instant::now());
                }
                changed
            })
        }
        C::Reload => reload_config(s, ops, "reload"),
    };
    let _ = reply.send(r);
}

/// When replication was last resumed (seconds since the epoch; 0: unknown).
fn resumed_at(ops: &Ops) -> u64 {
    ops.state
        .history
        .pauses
        .last()
        .and_then(|p| p.to)
        .unwrap_or(0)
}

/// Marks every tracked disk of the tracker for a checksum resync.
async fn mark_resync(socket: &Path) -> Result<(), String> {
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

/// A job that makes the primary's status of the VM (it asks the tracker: run it on a
/// blocking thread).
fn status_job(ops: &Ops) -> impl FnOnce() -> VmStatus + Send + 'static {
    let (vm, state, live, socket) = (
        ops.vm.clone(),
        ops.state.clone(),
        ops.live(),
        ops.tracker.clone(),
    );
    let (interval, rpo_limit) = (
        ops.settings.interval_secs(),
        ops.settings.rpo_limit.as_secs(),
    );
    move || {
        let t = control::call(&socket, &Request::Status).map_err(|e| tracker_error(&socket, &e));
        crate::status::primary(crate::status::Inputs {
            vm: &vm,
            now_ms: crate::ops::now_ms(),
            state: &state,
            interval,
            rpo_limit,
            tracker: t.as_ref().map_err(|e| e.to_string()),
            live: Some(&live),
            processes: Vec::new(),
        })
    }
}

/// An application-consistent freeze, then the tracker's status; a guest that could not be
/// frozen makes a crash-consistent freeze instead.
async fn app_freeze(
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
fn note_app(ops: &mut Ops, r: Result<(u64, u64, u64), String>) {
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

/// Connects `cfg.connections` times: the first connection's control stream carries the
/// session's messages (its reader feeds them back as events; checksums go to the planner);
/// the others say hello for the VM only, so data streams may use them.
async fn connect(
    ep: &Client,
    cfg: &ShipperConfig,
    attempt: u64,
    tx: mpsc::UnboundedSender<Report>,
    hashes: Arc<Mutex<Option<mpsc::UnboundedSender<Message>>>>,
) -> Result<Link, ShipError> {
    let (first, (mut send, mut recv)) = open(ep, cfg).await?;
    let mut conns = vec![first.clone()];
    for _ in 1..cfg.connections {
        let (c, mut ctl) = open(ep, cfg).await?;
        match hello(cfg, &mut ctl, None).await? {
            Message::Welcome { .. } => {}
            other => return Err(ShipError::Protocol(other.name().to_string())),
        }
        conns.push(c);
    }
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            if link::send(&mut send, &m).await.is_err() {
                return;
            }
        }
    });
    let reason = |e: LinkError| match e {
        LinkError::Connection(c) => tls::describe_refusal(&c.to_string(), "primary", "replica"),
        LinkError::Truncated => "the applier closed the control stream (it may run an older \
                                 vmreplica, replication protocol 1: upgrade it)"
            .to_string(),
        e => e.to_string(),
    };
    tokio::spawn(async move {
        loop {
            match link::recv(&mut recv).await {
                Ok(Some(m @ Message::Hashes { .. })) => {
                    let h = hashes.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(h) = h {
                        let _ = h.send(m);
                    }
                }
                Ok(Some(msg)) => {
                    let _ = tx.send(Report::Session(Event::Message { attempt, msg }));
                }
                Ok(None) => {
                    let _ = tx.send(Report::Session(Event::Disconnected {
                        attempt,
                        reason: reason(LinkError::Truncated),
                    }));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Report::Session(Event::Disconnected {
                        attempt,
                        reason: reason(e),
                    }));
                    return;
                }
            }
        }
    });
    let _ = first;
    Ok(Link {
        attempt,
        conns,
        ctl: ctl_tx,
    })
}

/// Fails unless the tracker's frozen generation is still freeze `id` (a tracker restarted on
/// a restored state directory may hold another freeze of the same number).
async fn still_frozen(socket: &Path, id: u64) -> Result<(), String> {
    let (view, _, _) = tracker_op(socket, TrackerOp::Status).await?;
    match view.frozen {
        Some(f) if f.id == id => Ok(()),
        other => Err(format!(
            "the tracker's frozen generation changed under the cycle (now {:?}): it is shipped anew",
            other.map(|f| f.generation)
        )),
    }
}

/// Plans generation `g`: for a resync, checksums are asked over the control stream and come
/// back through `hashes`.
async fn plan_cycle(
    g: &Generation,
    kind: CycleKind,
    engine: &Arc<dyn vmreplica_common::engine::Engine>,
    ctl: mpsc::UnboundedSender<Message>,
    hashes: Arc<Mutex<Option<mpsc::UnboundedSender<Message>>>>,
    live: Arc<Mutex<Option<(Snapshot, &'static str)>>>,
) -> Result<vmreplica_common::ranges::RangeSet, ShipError> {
    let readers = open_readers(g)?;
    let started = Instant::now();
    let (cycle, total) = (g.generation, g.disks.iter().map(|d| d.size).sum::<u64>());
    let on_progress = move |done: u64| {
        // A resync's checksum pass, as progress for status.
        *live.lock().unwrap_or_else(|e| e.into_inner()) = Some((
            Snapshot {
                cycle,
                kind,
                done,
                total,
                elapsed: started.elapsed(),
            },
            "comparing",
        ));
    };
    let (htx, hrx) = mpsc::unbounded_channel::<Message>();
    *hashes.lock().unwrap_or_else(|e| e.into_inner()) = Some(htx);
    let hrx = Arc::new(tokio::sync::Mutex::new(hrx));
    let r = plan_with_progress(
        &readers,
        kind,
        engine,
        &on_progress,
        |disk, offset, block, count| {
            let (ctl, hrx) = (ctl.clone(), Arc::clone(&hrx));
            async move {
                ctl.send(Message::HashRequest {
                    disk,
                    offset,
                    block,
                    count,
                })
                .map_err(|_| ShipError::Protocol("the connection is gone".into()))?;
                match tokio::time::timeout(Duration::from_secs(120), hrx.lock().await.recv()).await
                {
                    Ok(Some(Message::Hashes { hashes, .. })) => Ok(hashes),
                    _ => Err(ShipError::Protocol("no checksums from the applier".into())),
                }
            }
        },
    )
    .await;
    *hashes.lock().unwrap_or_else(|e| e.into_inner()) = None;
    r
}

/// Compares every block of the VM's disks on both sites by checksum; returns, per disk, the
/// differing byte ranges. Only checksums cross the link.
pub async fn verify(cfg: &ShipperConfig) -> Result<Vec<(String, Vec<(u64, u64)>)>, ShipError> {
    const BATCH: u32 = 1024;
    let ep = endpoint(cfg)?;
    let (conn, mut ctl) = open(&ep, cfg).await?;
    match hello(cfg, &mut ctl, None).await? {
        Message::Welcome { .. } => {}
        other => return Err(ShipError::Protocol(other.name().into())),
    }
    let st = tracker(&cfg.tracker, Request::Status).await?;
    let granularity = st["granularity"].as_u64().unwrap_or(65536);
    let mut out = Vec::new();
    for d in st["disks"].as_array().cloned().unwrap_or_default() {
        if d["excluded"] == Value::Bool(true) {
            continue; // not replicated: nothing to compare
        }
        let name = d["name"].as_str().unwrap_or_default().to_string();
        let size = d["size"].as_u64().unwrap_or(0);
        let image =
            std::fs::File::open(d["image"].as_str().unwrap_or_default()).map_err(|source| {
                ShipError::Read {
                    disk: name.clone(),
                    source,
                }
            })?;
        let mut diffs: Vec<(u64, u64)> = Vec::new();
        let mut offset = 0u64;
        let mut buf = vec![0u8; granularity as usize];
        while offset < size {
            link::send(
                &mut ctl.0,
                &Message::HashRequest {
                    disk: name.clone(),
                    offset,
                    block: granularity as u32,
                    count: BATCH,
                },
            )
            .await?;
            let remote = match link::expect(&mut ctl.1).await {
                Ok(Message::Hashes { hashes, .. }) => hashes,
                Ok(other) => return Err(ShipError::Protocol(other.name().into())),
                Err(LinkError::Peer(reason)) => {
                    return Err(ShipError::Refused { cycle: 0, reason })
                }
                Err(e) => return Err(e.into()),
            };
            for i in 0..u64::from(BATCH) {
                let off = offset + i * granularity;
                if off >= size {
                    break;
                }
                let n = granularity.min(size - off) as usize;
                use std::os::unix::fs::FileExt;
                image
                    .read_exact_at(&mut buf[..n], off)
                    .map_err(|source| ShipError::Read {
                        disk: name.clone(),
                        source,
                    })?;
                if remote.get(i as usize) != Some(&vmreplica_common::wire::checksum(&buf[..n])) {
                    match diffs.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += n as u64,
                        _ => diffs.push((off, n as u64)),
                    }
                }
            }
            offset += u64::from(BATCH) * granularity;
        }
        out.push((name, diffs));
    }
    conn.close(0u32.into(), b"verify done");
    ep.endpoint.wait_idle().await;
    Ok(out)
}
