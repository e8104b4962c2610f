//! Prometheus metrics of the shipper and the applier: their text passes `promtool check
//! metrics` (Debian's prometheus package), and a real Prometheus server scrapes both.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::site::*;
use common::*;
use serde_json::Value;

/// GET `path` from `addr` over plain HTTP/1.1: the body.
fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The metrics address a role registered (role `shipper` or `applier`).
fn metrics_addr(run: &Path, role: &str) -> String {
    let t0 = Instant::now();
    loop {
        for e in std::fs::read_dir(run).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{role}-")) && name.ends_with(".json") {
                let v: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
                if let Some(m) = v["metrics"].as_str() {
                    return m.to_string();
                }
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no {role} metrics");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn promtool_check(text: &str) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-deps.sh installs the prometheus package)");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the first result of an instant query, once there is one.
fn query(prom: &str, q: &str) -> Option<(Value, f64)> {
    let path = format!(
        "/api/v1/query?query={}",
        q.replace('{', "%7B")
            .replace('}', "%7D")
            .replace('"', "%22")
            .replace('=', "%3D")
    );
    let v: Value = serde_json::from_str(&get(prom, &path)).ok()?;
    let r = v["data"]["result"].as_array()?.first()?.clone();
    let x = r["value"][1].as_str()?.parse().ok()?;
    Some((r["metric"].clone(), x))
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_scrapes_both_sites() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::env::set_var("VMREPLICA_RUN_DIR", &run);
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 16 * MIB);
    fill_random(&img, 2);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let config = site.config_via(
        &tracker,
        &format!("127.0.0.1:{}", site.port),
        "metrics = \"127.0.0.1:0\"\n",
    );
    let _applier = site.applier_with(&["--metrics", "127.0.0.1:0"]);
    let _shipper = site.shipper(&config, &[]);
    site.wait_cycles(0, 2, Duration::from_secs(60));
    let (ship, apply) = (metrics_addr(&run, "shipper"), metrics_addr(&run, "applier"));

    let text = get(&ship, "/metrics");
    for m in [
        "vmreplica_health_level{site=\"primary\",vm=\"vm1\"} 0",
        "vmreplica_rpo_seconds{",
        "vmreplica_cycles_total{",
        "vmreplica_wire_bytes_total{",
        "vmreplica_disk_size_bytes{disk=\"sys\",site=\"primary\",vm=\"vm1\"} 16777216",
        "vmreplica_disk_dirty_bytes{disk=\"sys\"",
        "vmreplica_state{site=\"primary\",state=\"replicating\",vm=\"vm1\"} 1",
    ] {
        assert!(text.contains(m), "no {m} in:\n{text}");
    }
    promtool_check(&text);
    let text = get(&apply, "/metrics");
    assert!(
        text.contains("vmreplica_points{site=\"replica\",vm=\"vm1\"}"),
        "{text}"
    );
    promtool_check(&text);
    // Anything but GET /metrics is refused.
    let mut s = TcpStream::connect(&ship).unwrap();
    write!(s, "GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    // A real Prometheus scrapes both, every second.
    let port = free_tcp_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: vmreplica\n    static_configs:\n      - targets: ['{ship}', '{apply}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Guard)
        .expect("prometheus (scripts/install-deps.sh installs it)");
    let prom = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        let up = (TcpStream::connect(&prom).is_ok())
            .then(|| query(&prom, "sum(up)"))
            .flatten();
        let cycles = up
            .as_ref()
            .and_then(|_| query(&prom, "vmreplica_last_cycle{site=\"replica\"}"));
        if let (Some((_, u)), Some((labels, c))) = (up, cycles) {
            if u == 2.0 && c >= 1.0 {
                assert_eq!(labels["vm"], "vm1");
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "Prometheus did not scrape both targets; its log:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    tracker.stop();
}
