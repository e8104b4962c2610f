//! Prometheus metrics: the status of each VM a role serves, as `vmreplica_` metrics with
//! units in their names and labels `vm`, `site` (and `disk` for disks), made at each scrape
//! from the same status `vmreplica status` prints, in Prometheus' text format (0.0.4) with
//! the `prometheus` crate, and served by a minimal HTTP listener (`GET /metrics`), optional
//! on the shipper (`metrics = "ADDR"`) and the applier (`--metrics ADDR`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Encoder, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::status::{Level, Site, State, VmStatus};

/// Where the statuses come from at each scrape.
pub type Source = Arc<dyn Fn() -> Vec<VmStatus> + Send + Sync>;

const VM: &[&str] = &["vm", "site"];
const DISK: &[&str] = &["vm", "site", "disk"];

struct Families {
    registry: Registry,
}

impl Families {
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
        self.registry
            .register(Box::new(g.clone()))
            .expect("registered once");
        g
    }

    fn counter(&self, name: &str, help: &str) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), VM).expect("a valid metric");
        self.registry
            .register(Box::new(c.clone()))
            .expect("registered once");
        c
    }
}

fn site(s: Site) -> &'static str {
    match s {
        Site::Primary => "primary",
        Site::Replica => "replica",
    }
}

fn state_name(s: State) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The metrics of `vms`, in Prometheus' text format.
pub fn encode(vms: &[VmStatus]) -> String {
    let f = Families {
        registry: Registry::new(),
    };
    let health = f.gauge(
        "vmreplica_health_level",
        "Health of the VM's replication: 0 normal, 1 warning, 2 critical.",
        VM,
    );
    let state = f.gauge(
        "vmreplica_state",
        "1 for the replication state the VM is in (label state).",
        &["vm", "site", "state"],
    );
    let paused = f.gauge("vmreplica_paused", "1 while replication is paused.", VM);
    let rpo = f.gauge(
        "vmreplica_rpo_seconds",
        "Age of the freeze of the last cycle applied on the replica: what a disaster now would lose.",
        VM,
    );
    let rpo_limit = f.gauge(
        "vmreplica_rpo_limit_seconds",
        "The RPO past which health is critical.",
        VM,
    );
    let interval = f.gauge(
        "vmreplica_interval_seconds",
        "Replication interval (0: continuous).",
        VM,
    );
    let point_age = f.gauge(
        "vmreplica_latest_point_age_seconds",
        "Age of the newest recovery point.",
        VM,
    );
    let last_cycle = f.gauge(
        "vmreplica_last_cycle",
        "Number of the last cycle applied on the replica.",
        VM,
    );
    let points = f.gauge("vmreplica_points", "Recovery points the replica holds.", VM);
    let backlog = f.gauge(
        "vmreplica_backlog_bytes",
        "Bytes changed on the primary and not yet applied on the replica.",
        VM,
    );
    let done = f.gauge(
        "vmreplica_last_hour_cycles_done",
        "Cycles applied in the last hour.",
        VM,
    );
    let missed = f.gauge(
        "vmreplica_last_hour_cycles_missed",
        "Cycles the interval asked for in the last hour and not applied.",
        VM,
    );
    let avg_bytes = f.gauge(
        "vmreplica_last_hour_avg_cycle_bytes",
        "Average size of the last hour's cycles.",
        VM,
    );
    let peak_bytes = f.gauge(
        "vmreplica_last_hour_peak_cycle_bytes",
        "Largest cycle of the last hour.",
        VM,
    );
    let avg_secs = f.gauge(
        "vmreplica_last_hour_avg_cycle_duration_seconds",
        "Average duration of the last hour's cycles.",
        VM,
    );
    let peak_secs = f.gauge(
        "vmreplica_last_hour_peak_cycle_duration_seconds",
        "Longest cycle of the last hour.",
        VM,
    );
    let cycles = f.counter(
        "vmreplica_cycles_total",
        "Cycles applied since protection began.",
    );
    let data = f.counter(
        "vmreplica_cycle_data_bytes_total",
        "Data bytes (uncompressed) of the cycles applied since protection began.",
    );
    let wire = f.counter(
        "vmreplica_wire_bytes_total",
        "Bytes of data frames sent on the link since protection began (primary).",
    );
    let ratio = f.gauge(
        "vmreplica_compression_ratio",
        "Data bytes over bytes on the link, last hour.",
        VM,
    );
    let link = f.gauge(
        "vmreplica_link_rate_bytes_per_second",
        "Rate on the link during the last cycle's transfer.",
        VM,
    );
    let limit = f.gauge(
        "vmreplica_bandwidth_limit_bytes_per_second",
        "The bandwidth limit in force (absent: none).",
        VM,
    );
    let progress = f.gauge(
        "vmreplica_progress_ratio",
        "How far the cycle under way is, 0 to 1.",
        VM,
    );
    let remaining = f.gauge(
        "vmreplica_progress_remaining_bytes",
        "Bytes of the cycle under way still to go.",
        VM,
    );
    let frozen = f.gauge(
        "vmreplica_app_consistent_frozen_seconds",
        "How long the guest was frozen for the last application-consistent point.",
        VM,
    );
    let app_time = f.gauge(
        "vmreplica_app_consistent_last_timestamp_seconds",
        "When the last application-consistent point was made (Unix time).",
        VM,
    );
    let disk_size = f.gauge("vmreplica_disk_size_bytes", "Size of a disk.", DISK);
    let disk_dirty = f.gauge(
        "vmreplica_disk_dirty_bytes",
        "Bytes of a disk changed and not yet frozen (primary).",
        DISK,
    );
    let disk_excluded = f.gauge(
        "vmreplica_disk_excluded",
        "1 for a disk served but not replicated.",
        DISK,
    );
    let disk_resync = f.gauge(
        "vmreplica_disk_resync_required",
        "1 for a disk whose tracking was lost.",
        DISK,
    );
    for v in vms {
        let l = [v.vm.as_str(), site(v.site)];
        let set = |g: &GaugeVec, x: Option<f64>| {
            if let Some(x) = x {
                g.with_label_values(&l).set(x);
            }
        };
        set(
            &health,
            Some(match v.health.level {
                Level::Normal => 0.0,
                Level::Warning => 1.0,
                Level::Critical => 2.0,
            }),
        );
        state
            .with_label_values(&[l[0], l[1], &state_name(v.state)])
            .set(1.0);
        set(&paused, Some(f64::from(u8::from(v.state == State::Paused))));
        set(&rpo, v.rpo_seconds.map(|x| x as f64));
        set(&rpo_limit, Some(v.rpo_limit_seconds as f64));
        set(&interval, Some(v.interval_seconds.unwrap_or(0) as f64));
        set(
            &point_age,
            v.latest_point.as_ref().map(|p| p.age_seconds as f64),
        );
        set(&last_cycle, v.last_cycle.map(|x| x as f64));
        set(&points, v.points.map(|x| x as f64));
        set(&backlog, v.backlog_bytes.map(|x| x as f64));
        let h = &v.last_hour;
        set(&done, Some(h.cycles_done as f64));
        set(&missed, Some(h.cycles_missed as f64));
        set(&avg_bytes, Some(h.avg_cycle_bytes as f64));
        set(&peak_bytes, Some(h.peak_cycle_bytes as f64));
        set(&avg_secs, Some(h.avg_cycle_seconds));
        set(&peak_secs, Some(h.peak_cycle_seconds));
        cycles.with_label_values(&l).inc_by(v.total_cycles);
        data.with_label_values(&l).inc_by(v.total_bytes);
        if v.site == Site::Primary {
            wire.with_label_values(&l).inc_by(v.total_wire_bytes);
        }
        set(&ratio, v.compression_ratio);
        set(&link, v.link_rate_bytes_per_second);
        set(&limit, v.bandwidth_limit_bytes_per_second.map(|x| x as f64));
        if let Some(p) = &v.progress {
            set(&progress, Some(p.percent / 100.0));
            set(
                &remaining,
                Some(p.total_bytes.saturating_sub(p.done_bytes) as f64),
            );
        }
        set(
            &frozen,
            v.app_consistent.last_frozen_ms.map(|ms| ms as f64 / 1000.0),
        );
        set(&app_time, v.app_consistent.last_time.map(|t| t as f64));
        for d in &v.disks {
            let dl = [l[0], l[1], d.name.as_str()];
            disk_size.with_label_values(&dl).set(d.size as f64);
            disk_excluded
                .with_label_values(&dl)
                .set(f64::from(u8::from(d.excluded)));
            disk_resync
                .with_label_values(&dl)
                .set(f64::from(u8::from(d.resync_required)));
            if let Some(b) = d.dirty_bytes {
                disk_dirty.with_label_values(&dl).set(b as f64);
            }
        }
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&f.registry.gather(), &mut out)
        .expect("encoding into memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// Serves `GET /metrics` on `addr` (port 0: any free one) until the runtime stops; returns
/// the address bound.
pub async fn serve(addr: SocketAddr, source: Source) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("metrics listener {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (mut s, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    vmreplica_common::warn_limited!(
                        Duration::from_secs(60),
                        "metrics listener {bound}: accept: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), respond(&mut s, source)).await;
            });
        }
    });
    tracing::info!(%bound, "metrics listener ready (GET /metrics)");
    Ok(bound)
}

async fn respond(s: &mut tokio::net::TcpStream, source: Source) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        let vms = tokio::task::spawn_blocking(move || source())
            .await
            .unwrap_or_default();
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            encode(&vms),
        )
    } else {
        ("404 Not Found", "text/plain", "see /metrics\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
