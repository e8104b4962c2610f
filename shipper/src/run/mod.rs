//! The shipper's driver: the async loop around a [`ShipperSession`]. It carries out the
//! session's actions (tracker requests on a blocking thread, QUIC connections, control
//! messages, planning and sending on tasks of their own) and feeds their outcomes back as
//! events; the session decides everything else. The guest is never held up: only the
//! tracker's freeze pauses writes, for the time it takes to drain the ones in flight.
//!
//! Beside the loop: `tracker` (calls to the tracker), `connect` (connections to the
//! applier), `operator` (control commands and reloads), `app_consistent` (freezes through
//! the guest agent) and `verify` (the checksum comparison of both sites).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use quinn::Connection;
use serde_json::Value;
use tokio::sync::mpsc;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::wire::{CycleKind, LineagePoint, Message};
use vmreplica_tracker::Generation;

use vmreplica_ops::status::VmStatus;

use crate::config::ShipperConfig;
use crate::control::Command;
use crate::ops::Ops;
use crate::progress::{Progress, Snapshot};
use crate::session::{self, Action, Event, ShipperSession, TrackerOp, TrackerView};
use crate::ship::{open_readers, plan_with_progress, send_data, SendStats, ShipError, ShipOptions};

mod app_consistent;
mod connect;
mod operator;
mod tracker;
mod verify;

use app_consistent::{app_freeze, note_app};
use connect::connect;
pub use connect::{endpoint, greet, resolve};
pub(crate) use connect::{hello, open};
use operator::{control_command, reload_config, status_job};
pub use tracker::tracker_error;
use tracker::{mark_resync, still_frozen, tracker, tracker_op};
pub use verify::verify;

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
            resumed_at: operator::resumed_at(&ops),
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
