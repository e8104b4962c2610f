//! The shipper's main loop: keep a connection to the applier, decide what the next cycle is
//! (resume a frozen generation, initial sync, resync, or the next delta at the interval), ship
//! it, release it in the tracker once applied. Any failure keeps the generation frozen and
//! retries with backoff; the guest is never held up (only the tracker's freeze pauses writes,
//! for the time it takes to drain the ones in flight).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use serde_json::Value;
use vmreplica_common::link::{self, LinkError};
use vmreplica_common::tls::{self, Identity};
use vmreplica_common::wire::{CycleKind, Message, PROTOCOL_VERSION};
use vmreplica_tracker::control::{self, Request};
use vmreplica_tracker::Generation;

use crate::config::{Interval, ShipperConfig};
use crate::progress::Progress;
use crate::ratelimit::RateLimit;
use crate::ship::{ship_cycle, CycleStats, ShipError, ShipOptions};

/// Calls the tracker's control socket off the async threads.
async fn tracker(socket: &Path, req: Request) -> Result<Value, ShipError> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || control::call(&socket, &req))
        .await
        .map_err(|e| ShipError::Protocol(e.to_string()))?
        .map_err(|e| ShipError::Protocol(format!("tracker: {e}")))
}

fn generation(v: Value) -> Result<Generation, ShipError> {
    serde_json::from_value(v).map_err(|e| ShipError::Protocol(format!("tracker answer: {e}")))
}

/// A connected, greeted session with the applier.
pub struct Session {
    pub conn: Connection,
    pub ctl: (SendStream, RecvStream),
    pub last_cycle: u64,
    /// Further connections for data streams (`connections` in the config), each greeted for
    /// the same VM; their control streams stay open and idle.
    pub extra: Vec<(Connection, (SendStream, RecvStream))>,
}

impl Session {
    /// Every connection data streams may use, the first one first.
    pub fn conns(&self) -> Vec<Connection> {
        std::iter::once(self.conn.clone())
            .chain(self.extra.iter().map(|(c, _)| c.clone()))
            .collect()
    }
}

/// Connects `cfg.connections` times for the configured VM.
pub async fn connect_all(ep: &Endpoint, cfg: &ShipperConfig) -> Result<Session, ShipError> {
    let mut s = connect(ep, cfg).await?;
    for _ in 1..cfg.connections {
        let more = connect(ep, cfg).await?;
        s.extra.push((more.conn, more.ctl));
    }
    Ok(s)
}

pub fn resolve(addr: &str) -> Result<SocketAddr, ShipError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ShipError::Protocol(format!("cannot resolve replica address {addr:?}")))
}

pub fn endpoint(cfg: &ShipperConfig) -> Result<Endpoint, ShipError> {
    let id = Identity::load(&cfg.cert, &cfg.key, &cfg.ca).map_err(LinkError::from)?;
    let remote = resolve(&cfg.replica)?;
    let bind: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    Ok(link::client(bind, &id, &cfg.tuning)?)
}

/// Connects and says hello for the configured VM. A certificate either side refuses is
/// reported in plain words: which side refused whose certificate, and why.
pub async fn connect(ep: &Endpoint, cfg: &ShipperConfig) -> Result<Session, ShipError> {
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
    // The replica checks this primary's certificate after the handshake completed here: a
    // refusal arrives as the connection's end, on the first exchange.
    let hello = async {
        let mut ctl = conn.open_bi().await.map_err(LinkError::from)?;
        link::send(
            &mut ctl.0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                vm: cfg.vm.clone(),
            },
        )
        .await?;
        let answer = link::expect(&mut ctl.1).await?;
        Ok::<_, LinkError>((ctl, answer))
    };
    match hello.await {
        Ok((ctl, Message::Welcome { last_cycle, .. })) => Ok(Session {
            conn,
            ctl,
            last_cycle,
            extra: Vec::new(),
        }),
        Ok((_, other)) => Err(ShipError::Protocol(format!("{other:?}"))),
        Err(LinkError::Peer(reason)) => Err(ShipError::Refused { cycle: 0, reason }),
        Err(LinkError::Connection(c)) => Err(refused(c.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}

/// What to ship next, given the tracker's state and the replica's last cycle.
async fn next_cycle(
    cfg: &ShipperConfig,
    last_cycle: u64,
    last_freeze: Option<Instant>,
) -> Result<(Generation, CycleKind), ShipError> {
    let st = tracker(&cfg.tracker, Request::Status).await?;
    if !st["frozen"].is_null() {
        let g = generation(st["frozen"].clone())?;
        let kind = match (g.full, last_cycle) {
            (true, 0) => CycleKind::Initial,
            (true, _) => CycleKind::Resync,
            (false, _) => CycleKind::Delta,
        };
        return Ok((g, kind));
    }
    let resync = st["disks"]
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["resync_required"] == Value::Bool(true)));
    let kind = if last_cycle == 0 {
        if let Some(at) = cfg.initial_sync_at {
            if let Ok(wait) = at.duration_since(SystemTime::now()) {
                tracing::info!(
                    vm = cfg.vm,
                    "initial sync scheduled in {}",
                    humantime::format_duration(Duration::from_secs(wait.as_secs()))
                );
                tokio::time::sleep(wait).await;
            }
        }
        CycleKind::Initial
    } else if resync {
        tracing::warn!(
            vm = cfg.vm,
            "tracking was lost on the primary: resynchronising by checksum comparison"
        );
        CycleKind::Resync
    } else {
        if let (Interval::Every(d), Some(t)) = (&cfg.interval, last_freeze) {
            let due = t + *d;
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        CycleKind::Delta
    };
    let full = kind != CycleKind::Delta;
    let g = generation(tracker(&cfg.tracker, Request::Freeze { full }).await?)?;
    Ok((g, kind))
}

/// Runs cycles forever (until `stop` resolves).
pub async fn run(
    cfg: ShipperConfig,
    progress: Arc<dyn Progress>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ShipError> {
    let ep = endpoint(&cfg)?;
    let opts = ShipOptions {
        compression: cfg.compression,
        streams: cfg.streams,
        limit: cfg.bandwidth_limit.map(|b| Arc::new(RateLimit::new(b))),
        engine: vmreplica_common::engine::probe(false),
        progress,
    };
    tokio::pin!(stop);
    let mut backoff = Duration::from_secs(1);
    let mut last_freeze: Option<Instant> = None;
    loop {
        let attempt = async {
            let mut s = connect_all(&ep, &cfg).await?;
            tracing::info!(
                vm = cfg.vm,
                replica = cfg.replica,
                last_cycle = s.last_cycle,
                "connected to the applier"
            );
            loop {
                let (g, kind) = next_cycle(&cfg, s.last_cycle, last_freeze).await?;
                if g.generation <= s.last_cycle {
                    // Applied before an earlier acknowledgement got lost: just release it.
                    tracker(
                        &cfg.tracker,
                        Request::Release {
                            generation: g.generation,
                        },
                    )
                    .await?;
                    continue;
                }
                last_freeze.get_or_insert_with(Instant::now);
                let conns = s.conns();
                let stats = ship_cycle(&conns, &mut s.ctl, &g, kind, &opts).await?;
                tracker(
                    &cfg.tracker,
                    Request::Release {
                        generation: g.generation,
                    },
                )
                .await?;
                if kind != CycleKind::Delta {
                    for d in &g.disks {
                        tracker(
                            &cfg.tracker,
                            Request::ClearResync {
                                disk: d.name.clone(),
                            },
                        )
                        .await?;
                    }
                }
                last_freeze = Some(Instant::now());
                s.last_cycle = g.generation;
                log_stats(&cfg.vm, kind, &stats);
                backoff = Duration::from_secs(1);
            }
            #[allow(unreachable_code)]
            Ok::<(), ShipError>(())
        };
        tokio::select! {
            r = attempt => {
                if let Err(e) = r {
                    tracing::warn!(vm = cfg.vm, "replication interrupted: {e}; retrying in {}s (the frozen generation is kept)", backoff.as_secs());
                }
            }
            _ = &mut stop => {
                ep.close(0u32.into(), b"shipper stopping");
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => {
                ep.close(0u32.into(), b"shipper stopping");
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

fn log_stats(vm: &str, kind: CycleKind, s: &CycleStats) {
    tracing::info!(
        vm,
        cycle = s.cycle,
        ?kind,
        chunks = s.chunks_sent,
        resumed_skipped = s.chunks_skipped,
        data_mib = format!("{:.1}", s.data_bytes as f64 / 1048576.0),
        wire_mib = format!("{:.1}", s.wire_bytes as f64 / 1048576.0),
        secs = format!("{:.2}", s.elapsed.as_secs_f64()),
        "cycle applied on the replica"
    );
}

/// Compares every block of the VM's disks on both sites by checksum; returns, per disk, the
/// differing byte ranges. Only checksums cross the link.
pub async fn verify(cfg: &ShipperConfig) -> Result<Vec<(String, Vec<(u64, u64)>)>, ShipError> {
    const BATCH: u32 = 1024;
    let ep = endpoint(cfg)?;
    let mut s = connect(&ep, cfg).await?;
    let st = tracker(&cfg.tracker, Request::Status).await?;
    let granularity = st["granularity"].as_u64().unwrap_or(65536);
    let mut out = Vec::new();
    for d in st["disks"].as_array().cloned().unwrap_or_default() {
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
                &mut s.ctl.0,
                &Message::HashRequest {
                    disk: name.clone(),
                    offset,
                    block: granularity as u32,
                    count: BATCH,
                },
            )
            .await?;
            let remote = match link::expect(&mut s.ctl.1).await {
                Ok(Message::Hashes { hashes, .. }) => hashes,
                Ok(other) => return Err(ShipError::Protocol(format!("{other:?}"))),
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
    s.conn.close(0u32.into(), b"verify done");
    ep.wait_idle().await;
    Ok(out)
}
