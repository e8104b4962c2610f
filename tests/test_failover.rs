//! Test failover with the real processes (tracker, shipper, applier) and real NBD clients
//! (qemu-img, qemu-io, nbdcopy, nbdinfo): a served point is exactly its export while cycles
//! land, its writes never reach the replica, several run at once, test-stop discards and
//! unpins, an applier restart serves one again with its writes (TCP with TLS too), and
//! careless requests get clear errors.

mod common;

use std::process::Command;
use std::time::Duration;

use common::site::*;
use common::testfo::*;
use common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// A replica fed by `fio` random writes, cycles every `interval`: site, image, tracker,
/// shipper config, applier, shipper, fio.
struct Bed {
    dir: tempfile::TempDir,
    site: Site,
    img: std::path::PathBuf,
    _tracker: TrackerProc,
    config: std::path::PathBuf,
    applier: Guard,
    _shipper: Guard,
    fio: Option<Guard>,
}

fn bed(interval: &str, applier_args: &[&str]) -> Bed {
    let (dir, site, img, tracker) = small_site(4);
    let config = site.config_with(&tracker, interval, "");
    let applier = site.applier_with(applier_args);
    let shipper = site.shipper(&config, &[]);
    site.wait_cycles(0, 1, LIMIT);
    let fio = Some(fio(&tracker.uri("sys"), 300));
    let b = Bed {
        dir,
        site,
        img,
        _tracker: tracker,
        config,
        applier,
        _shipper: shipper,
        fio,
    };
    b.wait_points(3);
    b
}

impl Bed {
    fn store(&self) -> &std::path::Path {
        &self.site.store
    }

    fn wait_points(&self, n: usize) {
        let deadline = std::time::Instant::now() + LIMIT;
        while points(self.store(), "vm1").len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {n} points; applier log:\n{}",
                tail(&self.site.log("applier"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the guest's writes and lets replication catch up: the replica must then equal
    /// the primary (`verify`, and the images byte for byte).
    fn settle_and_verify(&mut self) {
        if let Some(mut f) = self.fio.take() {
            f.kill();
        }
        let n = self.site.applied();
        self.site.wait_cycles(n, 2, LIMIT);
        self.site.assert_equal(&self.config, &self.img);
    }
}

#[test]
fn a_served_point_is_its_export_while_20_cycles_land_and_its_writes_never_reach_the_replica() {
    let mut b = bed("300ms", &[]);
    let t = start_test(b.store(), "vm1", &[]);
    let point = t["point"].as_u64().unwrap();
    let uri = disk_uri(&t, "sys");
    assert!(uri.starts_with("nbd+unix:///sys?socket=/"), "{uri}");
    let copy = export_point(b.store(), "vm1", point, &b.dir.path().join("copy"), "sys");

    // Readers against the export while 20 cycles land.
    let since = b.site.applied();
    let mut reads = 0;
    while b.site.applied() < since + 20 {
        let same = if reads % 2 == 0 {
            same_as_served(&copy, &uri)
        } else {
            nbdcopy_equals(&uri, &copy)
        };
        assert!(
            same,
            "the served point {point} differs from its export (read {reads})"
        );
        reads += 1;
    }
    eprintln!("{reads} full reads of point {point} while 20 cycles landed");
    assert!(reads >= 2);
    assert!(points(b.store(), "vm1").contains(&point));
    // Block status covers the disk and says where data is.
    let map = parse_map(&stdout(Command::new("nbdinfo").args(["--map", &uri])));
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 16 * MIB);
    assert!(map.iter().any(|e| e.2 & 1 == 0), "no data at all: {map:?}");

    // The test VM writes everywhere: it reads its writes back; the replica never sees them.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 171 0 16M",
        "-c",
        "discard 4M 1M",
        "-c",
        "read -P 171 0 4M",
        "-c",
        "read -P 0 4M 1M",
        "-c",
        "read -P 171 5M 11M",
    ]));
    b.settle_and_verify();
    let again = export_point(b.store(), "vm1", point, &b.dir.path().join("again"), "sys");
    assert!(
        std::fs::read(&again).unwrap() == std::fs::read(&copy).unwrap(),
        "point {point} changed under the test failover"
    );

    let out = stdout(
        Command::new(bin())
            .args(["failover", "test-stop", "vm1", "--store"])
            .arg(b.store()),
    );
    assert!(out.contains("discarded"), "{out}");
    assert!(!b.store().join(format!("vm1/tests/{point}")).exists());
    assert!(tests_listed(b.store()).is_empty());
}

#[test]
fn two_test_failovers_at_once_test_stop_unpins_and_careless_requests_get_clear_errors() {
    let mut b = bed("300ms", &["--keep", "3"]);
    let store = b.store().to_path_buf();
    let pts = points(&store, "vm1");
    let (p1, p2) = (pts[0], *pts.last().unwrap());
    assert_ne!(p1, p2);
    let t1 = start_test(&store, "vm1", &["--point", &p1.to_string()]);
    let t2 = start_test(&store, "vm1", &["--point", &p2.to_string()]);
    let (u1, u2) = (disk_uri(&t1, "sys"), disk_uri(&t2, "sys"));
    let c1 = export_point(&store, "vm1", p1, &b.dir.path().join("c1"), "sys");
    let c2 = export_point(&store, "vm1", p2, &b.dir.path().join("c2"), "sys");
    assert!(std::fs::read(&c1).unwrap() != std::fs::read(&c2).unwrap());
    assert!(same_as_served(&c1, &u1) && same_as_served(&c2, &u2));
    // Writes into one do not show in the other.
    run(Command::new("qemu-io").args(["-f", "raw", &u1, "-c", "write -P 7 0 1M"]));
    assert!(!same_as_served(&c1, &u1) && same_as_served(&c2, &u2));
    assert_eq!(tests_listed(&store).len(), 2);

    // Careless requests.
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "failover".into(),
                "test".into(),
                "vm1".into(),
                "--point".into(),
                p1.to_string(),
            ],
            "already under test",
        ),
        (
            vec![
                "failover".into(),
                "test".into(),
                "vm1".into(),
                "--point".into(),
                "99999".into(),
            ],
            "no recovery point 99999",
        ),
        (
            vec!["failover".into(), "test".into(), "vm9".into()],
            "vm9 has no replica",
        ),
        (
            vec![
                "failover".into(),
                "test".into(),
                "vm1".into(),
                "--point".into(),
                "soon".into(),
            ],
            "is not a point",
        ),
        (
            vec!["failover".into(), "test-stop".into(), "vm1".into()],
            "give --point N or --all",
        ),
        (
            vec![
                "failover".into(),
                "test-stop".into(),
                "vm1".into(),
                "--point".into(),
                "99999".into(),
            ],
            "no test failover of point 99999",
        ),
        (
            vec!["failover".into(), "test-stop".into(), "vm9".into()],
            "vm9 has no replica",
        ),
        (
            vec!["failover".into(), "tests".into(), "vm9".into()],
            "vm9 has no replica",
        ),
        (
            vec![
                "failover".into(),
                "test".into(),
                "vm1".into(),
                "--tls-allow".into(),
                "x".into(),
            ],
            "give --tcp",
        ),
    ];
    for (args, want) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = refused(&store, &a);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // A new point under test, with --start but no definition shipped, or TCP without names.
    for (args, want) in [
        (&["--start"][..], "no VM definition"),
        (&["--tcp", "127.0.0.1:0"][..], "--tls-allow"),
        (
            &["--tcp", "nowhere", "--tls-allow", "c"][..],
            "--tcp nowhere",
        ),
    ] {
        let mut a = vec!["failover", "test", "vm1"];
        a.extend_from_slice(args);
        let e = refused(&store, &a);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert_eq!(
        tests_listed(&store).len(),
        2,
        "a refused start left nothing behind"
    );
    let dirs = std::fs::read_dir(store.join("vm1/tests")).unwrap().count();
    assert_eq!(dirs, 2, "a refused start left its files behind");
    // No applier on a store: said so.
    let other = b.dir.path().join("nowhere");
    let e = refused(&other, &["failover", "tests"]);
    assert!(e.contains("no applier answers"), "{e}");

    // Pinned: retention (3 points) keeps both while cycles land.
    let n = b.site.applied();
    b.site.wait_cycles(n, 6, LIMIT);
    let now = points(&store, "vm1");
    assert!(now.contains(&p1) && now.contains(&p2), "{now:?}");

    // Stopping one discards its scratch files and unpins its point: retention drops it.
    let out = stdout(
        Command::new(bin())
            .args([
                "failover",
                "test-stop",
                "vm1",
                "--point",
                &p1.to_string(),
                "--store",
            ])
            .arg(&store),
    );
    assert!(out.contains(&format!("point {p1}")), "{out}");
    assert!(!store.join(format!("vm1/tests/{p1}")).exists());
    assert!(store.join(format!("vm1/tests/{p2}/sys.scratch")).exists());
    let listed = tests_listed(&store);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["point"].as_u64(), Some(p2));
    let deadline = std::time::Instant::now() + LIMIT;
    while points(&store, "vm1").contains(&p1) {
        assert!(
            std::time::Instant::now() < deadline,
            "point {p1} is still kept"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(same_as_served(&c2, &u2));
    run(Command::new(bin())
        .args(["failover", "test-stop", "vm1", "--all", "--store"])
        .arg(&store));
    let e = refused(&store, &["failover", "test-stop", "vm1"]);
    assert!(e.contains("no test failover to stop"), "{e}");
    let out = stdout(
        Command::new(bin())
            .args(["failover", "tests", "--store"])
            .arg(&store),
    );
    assert!(out.contains("no test failover is running"), "{out}");
    b.settle_and_verify();
}

#[test]
fn an_applier_restart_serves_a_test_failover_again_with_its_writes_and_on_tcp_with_tls() {
    let mut b = bed("500ms", &[]);
    let store = b.store().to_path_buf();
    let creds = b.dir.path().join("client-1");
    run(Command::new(bin())
        .args(["certs", "x509-dir", "--ca"])
        .arg(&b.site.ca)
        .args(["--name", "client-1", "--out"])
        .arg(&creds));
    let t = start_test(
        &store,
        "vm1",
        &["--tcp", "127.0.0.1:0", "--tls-allow", "client-1"],
    );
    let point = t["point"].as_u64().unwrap();
    let uri = disk_uri(&t, "sys");
    let tcp = t["disks"][0]["tcp_uri"].as_str().unwrap().to_string();
    assert!(tcp.starts_with("nbds://127.0.0.1:"), "{tcp}");
    let with_creds = format!("{tcp}?tls-certificates={}", creds.display());
    run(Command::new("nbdinfo").arg(&with_creds));
    let out = Command::new("nbdinfo").arg(&tcp).output().unwrap();
    assert!(
        !out.status.success(),
        "served over TCP without TLS credentials"
    );

    // The test VM writes, trims and zeroes.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 90 1M 64K",
        "-c",
        "write -P 91 100 3000",
        "-c",
        "discard 4M 1M",
        "-c",
        "write -z 6M 512K",
    ]));
    let before = std::fs::read(export_point(
        &store,
        "vm1",
        point,
        &b.dir.path().join("c"),
        "sys",
    ))
    .unwrap();

    // kill -9 of the applier, then a new one: the test failover is served again.
    b.applier.kill();
    b.applier = b.site.applier();
    let listed = wait_tests_served(&store, 1, LIMIT);
    assert_eq!(listed[0]["point"].as_u64(), Some(point));
    // Every byte: the point, with the test VM's writes, trims and zeroes.
    let mut want = before;
    want[1 << 20..(1 << 20) + 65536].fill(90);
    want[100..3100].fill(91);
    want[4 << 20..5 << 20].fill(0);
    want[6 << 20..(6 << 20) + (512 << 10)].fill(0);
    let served = b.dir.path().join("served.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&served));
    assert!(
        std::fs::read(&served).unwrap() == want,
        "the test failover served after the restart is not the point with its writes"
    );
    run(Command::new("nbdinfo").arg(&with_creds));
    // Replication goes on with the new applier.
    let n = b.site.applied();
    b.site.wait_cycles(n, 2, LIMIT);
    run(Command::new(bin())
        .args(["failover", "test-stop", "vm1", "--store"])
        .arg(&store));
    b.settle_and_verify();
}

/// A disk the primary serves but does not replicate (`--exclude swap`) is served blank by a
/// test failover, as a failover recreates it: zeroes and a hole where the primary has data,
/// its own writes kept in scratch. The VM definition may name it (it used to be refused as
/// "not replicated here", so `--start` could not boot such a VM).
#[test]
fn an_excluded_disk_is_served_blank_beside_the_point() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let sys = image(dir.path(), "sys.img", 16 * MIB);
    let swap = image(dir.path(), "swap.img", 8 * MIB);
    fill_random(&sys, 2);
    let tracker = TrackerProc::start(
        dir.path(),
        &[("sys", &sys), ("swap", &swap)],
        &["--exclude", "swap"],
    );
    run(Command::new("qemu-io")
        .args(["-f", "raw", &tracker.uri("swap")])
        .args(["-c", "write -P 51 1M 2M"]));
    let (_config, _applier, _shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 2, LIMIT);
    let t = start_test(&site.store, "vm1", &[]);
    let point = t["point"].as_u64().unwrap();
    let sys_uri = disk_uri(&t, "sys");
    let swap_uri = disk_uri(&t, "swap");
    let copy = export_point(&site.store, "vm1", point, &dir.path().join("copy"), "sys");
    assert!(nbdcopy_equals(&sys_uri, &copy));
    let info = stdout(Command::new("nbdinfo").args(["--size", &swap_uri]));
    assert_eq!(info.trim(), (8 * MIB).to_string());
    let map = parse_map(&stdout(Command::new("nbdinfo").args(["--map", &swap_uri])));
    assert!(map.iter().all(|e| e.2 & 1 == 1), "blank is a hole: {map:?}");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &swap_uri,
        "-c",
        "read -P 0 0 8M",
        "-c",
        "write -P 68 2M 1M",
        "-c",
        "read -P 68 2M 1M",
        "-c",
        "read -P 0 3M 5M",
    ]));
    // The primary's swap is untouched by the test's writes.
    run(Command::new("qemu-io")
        .args(["-f", "raw", &tracker.uri("swap")])
        .args(["-c", "read -P 51 1M 2M"]));
    // A definition naming the excluded disk passes the check --start makes first (then the
    // point is found under test already).
    let def = "version = 1\nname = \"vm1\"\ndisks = [\"sys\", \"swap\"]\n\
               qemu = [\"qemu-system-x86_64-not-here\", \"-drive\", \"file=${disk:sys}\", \
               \"-drive\", \"file=${disk:swap}\", \"-qmp\", \"unix:${qmp},server=on,wait=off\", \"${net}\"]\n\
               net = []\n";
    std::fs::write(site.store.join("vm1/definition.toml"), def).unwrap();
    let out = Command::new(bin())
        .args(["failover", "test", "vm1", "--point", &point.to_string()])
        .args(["--start", "--store"])
        .arg(&site.store)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("already under test"), "{err}");
    tracker.stop();
}

/// A replica with a test failover recorded is not removed, even with its applier down (the
/// pin is then only in the state, and the test VM may still run): test-stop comes first.
#[test]
fn remove_refuses_a_replica_under_test_even_with_the_applier_down() {
    let (dir, site, _img, tracker) = small_site(2);
    let (_config, mut applier, shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 1, LIMIT);
    let t = start_test(&site.store, "vm1", &[]);
    let point = t["point"].as_u64().unwrap();
    drop(shipper);
    applier.kill();
    let remove = || {
        Command::new(bin())
            .args(["remove", "vm1", "--replica", "--yes", "--store"])
            .arg(&site.store)
            .output()
            .unwrap()
    };
    let out = remove();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "removed under test: {err}");
    assert!(
        err.contains(&format!("test failovers of points {point}")) && err.contains("test-stop"),
        "{err}"
    );
    assert!(site.store.join("vm1/state.json").exists());
    // With no applier, test-stop works on the store and the removal goes through.
    run(Command::new(bin())
        .args(["failover", "test-stop", "vm1", "--all", "--store"])
        .arg(&site.store));
    let out = remove();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!site.store.join("vm1").exists());
    tracker.stop();
    drop(dir);
}
