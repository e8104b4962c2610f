//! Replication end to end with real parts: the tracker (NBD, fio writing through it), the
//! applier's QUIC server, the shipper's cycles, mutual TLS on loopback.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use vmreplica_applier::server::{Applier, ApplierConfig};
use vmreplica_applier::store::{Retention, Store};
use vmreplica_common::tls::{self, AllowList, Identity, Validity};
use vmreplica_common::wire::CycleKind;
use vmreplica_nbd::{Server, ServerConfig};
use vmreplica_shipper::progress::{Progress, Snapshot};
use vmreplica_shipper::run;
use vmreplica_shipper::ship::{ship_cycle, ShipOptions};
use vmreplica_shipper::ShipperConfig;
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

/// What a cycle reported to its progress sink, in order.
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
    /// The cycle just shipped reported its total, a rising count, all of it sent, and
    /// success (then forgets it, for the next cycle).
    fn assert_whole(&self, cycle: u64, kind: CycleKind, bytes: u64) {
        let r = std::mem::take(&mut *self.0.lock().unwrap());
        assert_eq!(r.first(), Some(&Report::Begin(cycle, kind, bytes)), "{r:?}");
        assert_eq!(
            r[r.len() - 2..],
            [Report::Sent(bytes, bytes), Report::End(true)]
        );
        let done: Vec<u64> = r
            .iter()
            .filter_map(|e| match e {
                Report::Update(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert!(
            done.windows(2).all(|w| w[0] <= w[1] && w[1] <= bytes),
            "{r:?}"
        );
    }
}

/// Every recovery point, rebuilt from undo logs, equals the primary as frozen at its cycle,
/// while the guest keeps writing; the replica ends equal to the primary.
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
        })
        .unwrap(),
    );
    let server = Server::new(ServerConfig::default(), tracker.nbd_exports());
    let sock = dir.path().join("nbd.sock");
    server
        .listen_unix(std::os::unix::net::UnixListener::bind(&sock).unwrap())
        .unwrap();
    let store_dir = dir.path().join("store");
    let applier = Applier::start(ApplierConfig {
        store: store_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: Identity::load(
            &ca.join("replica-1.pem"),
            &ca.join("replica-1.key"),
            &ca.join("ca.pem"),
        )
        .unwrap(),
        allow: AllowList::new(&["primary-1".into()]),
        // Every cycle stays a point, however many the machine's speed fits into fio's run.
        retention: Retention {
            keep: 1000,
            hourly_after: None,
        },
        tuning: Default::default(),
    })
    .unwrap();
    let addr = applier.local_addr().unwrap().to_string();
    let cfg = ShipperConfig::load(&shipper_toml(
        dir.path(),
        &ca,
        "primary-1",
        &addr,
        &dir.path().join("unused.sock"),
        "",
    ))
    .unwrap();
    let ep = run::endpoint(&cfg).unwrap();
    let mut session = run::connect(&ep, &cfg).await.unwrap();
    assert_eq!(session.last_cycle, 0);
    let progress = Arc::new(Recorder::default());
    let opts = ShipOptions {
        compression: true,
        streams: 3,
        limit: None,
        engine: vmreplica_common::engine::probe(false),
        progress: Arc::clone(&progress) as Arc<dyn Progress>,
    };
    let uri = |n: &str| format!("nbd+unix:///{n}?socket={}", sock.display());
    let mut writers = vec![
        fio(&uri("sys"), 8, 32 * MIB, 1),
        fio(&uri("data"), 8, 32 * MIB, 2),
    ];
    let mut copies: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut shipped_deltas = 0;
    let mut k = 0u64;
    loop {
        k += 1;
        // Cycle while the guest writes; one last cycle after it stopped.
        let writing = writers.iter_mut().any(|w| w.try_wait().is_none());
        if !writing {
            for w in &mut writers {
                assert!(w.wait().success(), "fio failed");
            }
        }
        let t = Arc::clone(&tracker);
        let paths: Vec<PathBuf> = disks.iter().map(|d| d.1.clone()).collect();
        let (g, copy) = tokio::task::spawn_blocking(move || {
            let mut copy = Vec::new();
            let g = t
                .freeze_with(k == 1, || {
                    copy = paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
                })
                .unwrap();
            (g, copy)
        })
        .await
        .unwrap();
        copies.insert(g.generation, copy);
        let kind = if k == 1 {
            CycleKind::Initial
        } else {
            CycleKind::Delta
        };
        let stats = ship_cycle(
            std::slice::from_ref(&session.conn),
            &mut session.ctl,
            &g,
            kind,
            &opts,
        )
        .await
        .unwrap();
        progress.assert_whole(g.generation, kind, stats.data_bytes);
        if k > 1 && stats.chunks_sent > 0 {
            shipped_deltas += 1;
        }
        tracker.release(g.generation).unwrap();
        if !writing {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    assert!(
        shipped_deltas >= 2,
        "only {shipped_deltas} delta cycles carried changes"
    );
    // The applier lets go of the replica, so this process may open it.
    session.conn.close(0u32.into(), b"done");
    applier.shutdown().await;
    // The replica equals the primary (writes stopped before the last freeze).
    let store = Store::new(&store_dir, Retention::default()).unwrap();
    let vs = store.open_existing("vm1").unwrap();
    for (name, path) in &disks {
        assert!(
            std::fs::read(vs.image_path(name)).unwrap() == std::fs::read(path).unwrap(),
            "replica of {name} differs"
        );
    }
    // Every point rebuilt from undo logs equals the primary as frozen at that cycle.
    let points: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
    assert_eq!(points, copies.keys().copied().collect::<Vec<_>>());
    for (cycle, copy) in &copies {
        let out = dir.path().join(format!("point-{cycle}"));
        let files = vs.export_point(*cycle, &out).unwrap();
        for (i, f) in files.iter().enumerate() {
            assert!(
                std::fs::read(f).unwrap() == copy[i],
                "point {cycle} disk {i} differs from the primary at freeze"
            );
        }
    }
    server.shutdown();
    tracker.close().unwrap();
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
    let applier = Applier::start(ApplierConfig {
        store: store_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: Identity::load(
            &ca.join("replica-1.pem"),
            &ca.join("replica-1.key"),
            &ca.join("ca.pem"),
        )
        .unwrap(),
        allow: AllowList::new(&["primary-1".into(), "*.dc1.example".into()]),
        retention: Retention::default(),
        tuning: Default::default(),
    })
    .unwrap();
    let addr = applier.local_addr().unwrap().to_string();
    let tracker_sock = dir.path().join("t.sock");
    let attempt = |toml: PathBuf| async move {
        let cfg = ShipperConfig::load(&toml).unwrap();
        let ep = run::endpoint(&cfg).unwrap();
        let r = run::connect(&ep, &cfg).await.map(|s| s.last_cycle);
        r.map_err(|e| e.to_string())
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
