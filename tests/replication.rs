//! Replication end to end with real parts: the tracker (NBD, fio writing through it), the
//! applier's QUIC server, the shipper's cycles, mutual TLS on loopback.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use std::sync::Mutex;
use vmreplica_applier::server::{Applier, ApplierConfig};
use vmreplica_applier::store::{Retention, Store};
use vmreplica_applier::PointView;
use vmreplica_common::tls::{self, AllowList, Identity, Validity};
use vmreplica_common::wire::CycleKind;
use vmreplica_nbd::{Server, ServerConfig};
use vmreplica_shipper::progress::{Progress, Snapshot};
use vmreplica_shipper::run;
use vmreplica_shipper::ShipperConfig;
use vmreplica_tracker::control::{self, Request};
use vmreplica_tracker::{Tracker, TrackerConfig};

const MIB: u64 = 1 << 20;

/// A CA with certificates for primary-1 and replica-1 in `dir/ca`.
fn certs(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    tls::init_ca(&ca, "test CA", 30).unwrap();
    tls::issue(&ca, "primary-1", &[], Validity::days(30), &ca).unwrap();
    tls::issue(
        &ca,
        "replica-1",
        &["127.0.0.1".parse().unwrap()],
        Validity::days(30),
        &ca,
    )
    .unwrap();
    ca
}

fn shipper_toml(
    dir: &Path,
    ca: &Path,
    who: &str,
    replica: &str,
    tracker: &Path,
    extra: &str,
) -> PathBuf {
    let p = dir.join(format!("shipper-{who}.toml"));
    std::fs::write(
        &p,
        format!(
            "vm = \"vm1\"\ntracker = \"{}\"\nreplica = \"{replica}\"\nserver_name = \"replica-1\"\nca = \"{}/ca.pem\"\ncert = \"{}/{who}.pem\"\nkey = \"{}/{who}.key\"\n{extra}",
            tracker.display(),
            ca.display(),
            ca.display(),
            ca.display()
        ),
    )
    .unwrap();
    p
}

/// The applier these tests start: replica-1's identity from `ca`, the names `allow`ed,
/// the store at `store`, everything else as by default.
fn applier_config(store: &Path, ca: &Path, allow: &[&str]) -> ApplierConfig {
    ApplierConfig {
        store: store.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: Identity::load(
            &ca.join("replica-1.pem"),
            &ca.join("replica-1.key"),
            &ca.join("ca.pem"),
        )
        .unwrap(),
        allow: AllowList::new(&allow.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
        retention: Retention::default(),
        tuning: Default::default(),
        admin_socket: None,
        open_delay: None,
        identity_files: None,
    }
}

/// A shipper configuration of VM `vm` for primary-1, replicating to the applier at `addr`.
fn vm_config(dir: &Path, ca: &Path, addr: &str, vm: &str) -> ShipperConfig {
    let p = shipper_toml(dir, ca, "primary-1", addr, &dir.join("t.sock"), "");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("vm = \"vm1\"", &format!("vm = \"{vm}\""));
    let q = dir.join(format!("{vm}.toml"));
    std::fs::write(&q, text).unwrap();
    ShipperConfig::load(&q).unwrap()
}

fn fio(uri: &str, seconds: u32, size: u64, seed: u32) -> Guard {
    Command::new("fio")
        .args([
            "--name=guest",
            "--ioengine=nbd",
            "--thread",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--iodepth=8",
            "--time_based",
            &format!("--runtime={seconds}"),
            &format!("--randseed={seed}"),
            "--refill_buffers",
            "--buffer_compress_percentage=40",
            &format!("--size={size}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Guard)
        .expect("running fio")
}

/// What cycles reported to their progress sink, in order.
#[derive(Debug, PartialEq)]
enum Report {
    Begin(u64, CycleKind, u64),
    Update(u64),
    Sent(u64, u64),
    End(bool),
}

#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Report>>);

impl Progress for Recorder {
    fn begin(&self, cycle: u64, kind: CycleKind, total: u64) {
        self.0
            .lock()
            .unwrap()
            .push(Report::Begin(cycle, kind, total));
    }
    fn update(&self, now: &Snapshot) {
        self.0.lock().unwrap().push(Report::Update(now.done));
    }
    fn sent(&self, now: &Snapshot) {
        self.0
            .lock()
            .unwrap()
            .push(Report::Sent(now.done, now.total));
    }
    fn end(&self, applied: bool) {
        self.0.lock().unwrap().push(Report::End(applied));
    }
}

impl Recorder {
    /// Cycles applied so far.
    fn applied(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| **r == Report::End(true))
            .count()
    }

    /// Every applied cycle reported its total, a count of acknowledged bytes that never
    /// falls nor passes it, then all of it acknowledged, then success.
    fn assert_whole(&self) {
        let r = self.0.lock().unwrap();
        let mut i = 0;
        let mut whole = 0;
        while i < r.len() {
            let Report::Begin(_, _, total) = r[i] else {
                i += 1;
                continue;
            };
            let end = r[i..]
                .iter()
                .position(|x| matches!(x, Report::End(_)))
                .map_or(r.len(), |e| i + e);
            let part = &r[i..end.min(r.len())];
            if r.get(end) == Some(&Report::End(true)) {
                assert_eq!(part.last(), Some(&Report::Sent(total, total)), "{part:?}");
                let done: Vec<u64> = part
                    .iter()
                    .filter_map(|e| match e {
                        Report::Update(d) => Some(*d),
                        _ => None,
                    })
                    .collect();
                assert!(
                    done.windows(2).all(|w| w[0] <= w[1]) && done.iter().all(|d| *d <= total),
                    "{part:?}"
                );
                whole += 1;
            }
            i = end + 1;
        }
        assert!(whole >= 3, "{r:?}");
    }
}

/// A proxy in front of the tracker's control socket at `path`: freezes copy the images at
/// the freeze instant into `copies` (by generation); every other request goes through.
fn control_proxy(
    tracker: Arc<Tracker>,
    path: &Path,
    images: Vec<PathBuf>,
    copies: Arc<Mutex<BTreeMap<u64, Vec<Vec<u8>>>>>,
) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let (t, images, copies) = (Arc::clone(&tracker), images.clone(), Arc::clone(&copies));
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { return };
                    let v = match serde_json::from_str::<Request>(&line) {
                        Ok(Request::Freeze { full, .. }) => {
                            let mut copy = Vec::new();
                            match t.freeze_with(full, || {
                                copy = images.iter().map(|p| std::fs::read(p).unwrap()).collect()
                            }) {
                                Ok(g) => {
                                    copies.lock().unwrap().insert(g.generation, copy);
                                    serde_json::json!({"ok": true, "result": g})
                                }
                                Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                            }
                        }
                        _ => control::handle(&t, &line),
                    };
                    if writeln!(w, "{v}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Every recovery point, read through its undo logs, equals the primary as frozen at its
/// cycle, while the guest keeps writing and the shipper (its real loop, in this process)
/// cycles every 400 ms; the replica ends equal to the primary; each cycle's progress rises
/// to all of its bytes acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_points_equal_the_primary_as_frozen_at_each_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(dir.path());
    let disks: Vec<(String, PathBuf)> = ["sys", "data"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                image(dir.path(), &format!("{n}.img"), 32 * MIB),
            )
        })
        .collect();
    let tracker = Arc::new(
        Tracker::open(TrackerConfig {
            state_dir: dir.path().join("state"),
            disks: disks.clone(),
            granularity: 64 * 1024,
            tracking: true,
            force_thread_pool: false,
            al_extents: 1000,
            cow_limit: Default::default(),
            engine: None,
            excluded: Vec::new(),
        })
        .unwrap(),
    );
    let server = Server::new(ServerConfig::default(), tracker.nbd_exports());
    let sock = dir.path().join("nbd.sock");
    server
        .listen_unix(std::os::unix::net::UnixListener::bind(&sock).unwrap())
        .unwrap();
    let copies = Arc::new(Mutex::new(BTreeMap::new()));
    let control_sock = dir.path().join("state").join("control.sock");
    control_proxy(
        Arc::clone(&tracker),
        &control_sock,
        disks.iter().map(|d| d.1.clone()).collect(),
        Arc::clone(&copies),
    );
    let store_dir = dir.path().join("store");
    let applier = Applier::start(ApplierConfig {
        // Every cycle stays a point, however many the machine's speed fits into fio's run.
        retention: Retention::keep_all(),
        ..applier_config(&store_dir, &ca, &["primary-1"])
    })
    .unwrap();
    let addr = applier.local_addr().unwrap().to_string();
    let cfg = ShipperConfig::load(&shipper_toml(
        dir.path(),
        &ca,
        "primary-1",
        &addr,
        &control_sock,
        "interval = \"400ms\"\nstreams = 3\n",
    ))
    .unwrap();
    let progress = Arc::new(Recorder::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shipper = tokio::spawn(run::run(
        cfg,
        Arc::clone(&progress) as Arc<dyn Progress>,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let uri = |n: &str| format!("nbd+unix:///{n}?socket={}", sock.display());
    let mut writers = vec![
        fio(&uri("sys"), 8, 32 * MIB, 1),
        fio(&uri("data"), 8, 32 * MIB, 2),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while writers.iter_mut().any(|w| w.try_wait().is_none()) {
        assert!(std::time::Instant::now() < deadline, "fio did not stop");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for w in &mut writers {
        assert!(w.wait().success(), "fio failed");
    }
    // Writes have stopped: two more cycles and the replica holds all of them.
    let n = progress.applied();
    while progress.applied() < n + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "replication did not converge"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(());
    shipper.await.unwrap().unwrap();
    applier.shutdown().await;
    progress.assert_whole();
    // The replica equals the primary; every point, read through the undo logs, equals the
    // primary as frozen at that cycle.
    let store = Store::new(&store_dir, Retention::default()).unwrap();
    // `shutdown` returned: the replica is closed (see the test after this one).
    let vs = store.open_existing("vm1").unwrap();
    for (name, path) in &disks {
        assert!(
            std::fs::read(vs.image_path(name)).unwrap() == std::fs::read(path).unwrap(),
            "replica of {name} differs"
        );
    }
    let copies = copies.lock().unwrap();
    let points: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
    assert!(points.len() >= 3, "only points {points:?}");
    for cycle in &points {
        let copy = copies
            .get(cycle)
            .unwrap_or_else(|| panic!("point {cycle} was never frozen"));
        let view = PointView::open(vs.shared(), *cycle).unwrap();
        for (i, want) in copy.iter().enumerate() {
            let mut got = vec![0u8; want.len()];
            view.read_at(i, 0, &mut got).unwrap();
            assert!(
                got == *want,
                "point {cycle} disk {i} differs from the primary at freeze"
            );
        }
    }
    server.shutdown();
    tracker.close().unwrap();
}

/// Once `shutdown` has returned, every replica the applier had open is closed: the store
/// opens at once (before, it was Busy while anything still held the applier's table of
/// VMs: a connection's tasks not yet run after the close, an aborted task not yet dropped,
/// the metrics endpoint, an admin client still connected; seen in CI). After the shutdown
/// the admin client's requests are refused, and open no replica again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_opens_as_soon_as_the_applier_has_shut_down() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(dir.path());
    let store_dir = dir.path().join("store");
    let mut applier = Applier::start(applier_config(&store_dir, &ca, &["primary-1"])).unwrap();
    applier
        .serve_metrics("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = applier.local_addr().unwrap();
    // Two primaries' VMs: one said hello and went, one stays connected through the
    // shutdown.
    let config = |vm: &str| vm_config(dir.path(), &ca, &addr.to_string(), vm);
    assert_eq!(run::greet(&config("vm1")).await.unwrap().1, 0);
    let ep = run::endpoint(&config("vm2")).unwrap();
    let conn = ep.connect(addr, "replica-1").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    vmreplica_common::link::send(
        &mut send,
        &vmreplica_common::wire::Message::Hello {
            version: vmreplica_common::wire::PROTOCOL_VERSION,
            vm: "vm2".into(),
            lineage: None,
        },
    )
    .await
    .unwrap();
    let welcome = vmreplica_common::link::expect(&mut recv).await.unwrap();
    assert_eq!(welcome.name(), "Welcome");
    // The applier has both replicas open: another opener finds them Busy.
    let store = Store::new(&store_dir, Retention::default()).unwrap();
    for vm in ["vm1", "vm2"] {
        assert!(
            matches!(
                store.open_vm(vm, "primary-1"),
                Err(vmreplica_applier::store::StoreError::Busy { .. })
            ),
            "{vm} is not held open by the applier"
        );
    }
    // An admin client that stays connected.
    let admin = std::os::unix::net::UnixStream::connect(store_dir.join("applier.sock")).unwrap();
    let mut lines = BufReader::new(admin.try_clone().unwrap()).lines();
    let mut ask = |req: &str| {
        writeln!(&admin, "{req}").unwrap();
        serde_json::from_str::<serde_json::Value>(&lines.next().unwrap().unwrap()).unwrap()
    };
    assert_eq!(ask(r#"{"op":"status"}"#)["ok"], true);
    applier.shutdown().await;
    // What the next applier does first: open the replicas.
    for vm in ["vm1", "vm2"] {
        let vs = store
            .open_vm(vm, "primary-1")
            .unwrap_or_else(|e| panic!("{vm} right after shutdown: {e}"));
        drop(vs);
    }
    // The applier that shut down opens no replica again for the client still connected.
    let r = ask(r#"{"op":"export","vm":"vm1","point":1,"dir":"/nonexistent"}"#);
    assert!(
        r["error"].as_str().unwrap().contains("shutting down"),
        "{r}"
    );
    let _held = store.open_vm("vm1", "primary-1").unwrap();
    drop(conn);
}

/// Certificates: another CA, a name not on the allow-list, an expired certificate, and a
/// primary touching another primary's replica are all refused, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_unknown_or_expired_certificates_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(dir.path());
    let other = dir.path().join("other-ca");
    tls::init_ca(&other, "someone else's CA", 30).unwrap();
    tls::issue(&other, "primary-1", &[], Validity::days(30), &other).unwrap();
    tls::issue(&ca, "intruder", &[], Validity::days(30), &ca).unwrap();
    tls::issue(&ca, "h2.dc1.example", &[], Validity::days(30), &ca).unwrap();
    let expired = dir.path().join("expired");
    issue_expired(&ca, "primary-1", &expired);
    let store_dir = dir.path().join("store");
    let applier = Applier::start(applier_config(
        &store_dir,
        &ca,
        &["primary-1", "*.dc1.example"],
    ))
    .unwrap();
    let addr = applier.local_addr().unwrap().to_string();
    let tracker_sock = dir.path().join("t.sock");
    let attempt = |toml: PathBuf| async move {
        let cfg = ShipperConfig::load(&toml).unwrap();
        run::greet(&cfg)
            .await
            .map(|(_, last)| last)
            .map_err(|e| e.to_string())
    };
    // A certificate from another CA: the TLS handshake fails.
    let mut c = shipper_toml(dir.path(), &other, "primary-1", &addr, &tracker_sock, "");
    std::fs::write(
        &c,
        std::fs::read_to_string(&c).unwrap().replace(
            &format!("{}/ca.pem", other.display()),
            &format!("{}/ca.pem", ca.display()),
        ),
    )
    .unwrap();
    let e = attempt(c.clone()).await.unwrap_err();
    assert!(
        e.contains("the replica refused the primary's certificate: it was not issued by the CA"),
        "{e}"
    );
    // A valid certificate whose name is not allowed.
    c = shipper_toml(dir.path(), &ca, "intruder", &addr, &tracker_sock, "");
    let e = attempt(c).await.unwrap_err();
    assert!(e.contains("allow-list"), "{e}");
    // An expired certificate.
    let ex = shipper_toml(dir.path(), &ca, "primary-1", &addr, &tracker_sock, "");
    std::fs::write(
        &ex,
        std::fs::read_to_string(&ex).unwrap().replace(
            &format!("{}/primary-1", ca.display()),
            &format!("{}/primary-1", expired.display()),
        ),
    )
    .unwrap();
    let e = attempt(ex).await.unwrap_err();
    assert!(
        e.contains("the replica refused the primary's certificate: it has expired"),
        "{e}"
    );
    assert!(
        !store_dir.join("vm1").exists(),
        "a refused primary created a replica"
    );
    // primary-1 creates vm1; h2.dc1.example (allowed by pattern) may not write it.
    let ok = shipper_toml(dir.path(), &ca, "primary-1", &addr, &tracker_sock, "");
    assert_eq!(attempt(ok).await.unwrap(), 0);
    let h2 = shipper_toml(dir.path(), &ca, "h2.dc1.example", &addr, &tracker_sock, "");
    let e = attempt(h2).await.unwrap_err();
    assert!(
        e.contains("belongs to primary") && e.contains("primary-1"),
        "{e}"
    );
    applier.shutdown().await;
}

/// Opening one VM's replica is slow (a test hook stands for a store that takes long to
/// open): another VM's hello is answered meanwhile, since opening happens on a blocking
/// thread, outside the table of VMs' lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_vm_does_not_hold_up_another_vms_hello() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(dir.path());
    let applier = Applier::start(ApplierConfig {
        open_delay: Some(("slow".into(), std::time::Duration::from_secs(8))),
        ..applier_config(&dir.path().join("store"), &ca, &["primary-1"])
    })
    .unwrap();
    let addr = applier.local_addr().unwrap().to_string();
    let config = |vm: &str| vm_config(dir.path(), &ca, &addr, vm);
    let (slow, fast) = (config("slow"), config("fast"));
    let slow_hello = tokio::spawn(async move { run::greet(&slow).await.map(|r| r.1) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    assert_eq!(run::greet(&fast).await.unwrap().1, 0);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "another VM's hello waited {:?} for the slow one",
        t.elapsed()
    );
    assert!(!slow_hello.is_finished(), "the slow VM was not slow");
    assert_eq!(slow_hello.await.unwrap().unwrap(), 0);
    applier.shutdown().await;
}
