//! Operations with the real processes: `vmreplica status` on both sites through the runtime
//! registry (initial copy, replicating, paused, after missed cycles), pause and resume
//! (across a shipper restart), the replica site told of a pause, `set` and SIGHUP,
//! `resync --wait`, events, `remove`, and errors that name the side at fault.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::site::*;
use common::*;
use serde_json::Value;
use vmreplica_common::wire::{Message, PROTOCOL_VERSION};

/// Every test here has its own run directory (registry and events).
fn run_dir(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("run");
    std::fs::create_dir_all(&d).unwrap();
    // Inherited by every process the test starts (nextest runs each test alone in a process).
    std::env::set_var("VMREPLICA_RUN_DIR", &d);
    d
}

fn status(vm: &str) -> Value {
    let out = Command::new(bin())
        .args(["status", vm, "--json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn status_text(vm: &str) -> String {
    stdout(Command::new(bin()).args(["status", vm]))
}

fn side<'a>(report: &'a Value, site: &str) -> Option<&'a Value> {
    report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["site"] == site)
}

/// Waits until `cond` holds on the primary's status; returns that status.
fn wait_status(what: &str, limit: Duration, cond: impl Fn(&Value) -> bool) -> Value {
    wait_side("primary", what, limit, cond)
}

/// Waits until `cond` holds on `site`'s status of vm1; returns the whole status.
fn wait_side(site: &str, what: &str, limit: Duration, cond: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let r = status("vm1");
        if let Some(p) = side(&r, site) {
            if cond(p) {
                return r;
            }
        }
        assert!(
            t0.elapsed() < limit,
            "waited {limit:?} for {what}; status:\n{}",
            serde_json::to_string_pretty(&r).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn events(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn count(run: &Path, name: &str) -> usize {
    events(run).iter().filter(|e| e["event"] == name).count()
}

fn vmr(args: &[&str]) -> String {
    stdout(Command::new(bin()).args(args))
}

/// The status of a VM through its life: initial copy, replicating, paused (across a
/// shipper restart), resumed (one cycle of everything), missed cycles while the replica
/// site is down; settings at run time (`set`, SIGHUP); events for each.
#[test]
fn status_through_initial_copy_replication_pause_and_missed_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_dir(dir.path());
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 64 * MIB);
    fill_random(&img, 24);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let config = site.config_via(
        &tracker,
        &format!("127.0.0.1:{}", site.port),
        // A dead applier is noticed within 3 s (the default is 30).
        "bandwidth_limit = \"6M\"\nrpo_limit = \"40s\"\n[tuning]\nidle_timeout_s = 3\n",
    );
    let mut applier = site.applier();
    let mut shipper = site.shipper(&config, &[]);

    // Initial copy: 24 MiB at 6 MiB/s.
    let r = wait_status("the initial copy under way", Duration::from_secs(60), |p| {
        p["state"] == "initial-copy" && p["progress"]["done_bytes"].as_u64() > Some(0)
    });
    let p = side(&r, "primary").unwrap();
    assert_eq!(p["progress"]["kind"], "initial");
    assert_eq!(p["health"]["level"], "warning", "{p}");
    assert!(p["health"]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("initial copy"));
    assert!(p["backlog_bytes"].as_u64().unwrap() > 0);
    assert_eq!(p["bandwidth_limit_bytes_per_second"], 6 << 20);
    eprintln!(
        "--- status during the initial copy:\n{}",
        status_text("vm1")
    );

    // Replicating: both sites report.
    site.wait_cycles(0, 1, Duration::from_secs(60));
    vmr(&["set", "vm1", "bandwidth_limit=unlimited"]);
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("bandwidth_limit = \"unlimited\""));
    site.wait_cycles(site.applied(), 3, Duration::from_secs(30));
    let r = wait_status("replicating", Duration::from_secs(20), |p| {
        p["state"] == "replicating" && p["health"]["level"] == "normal"
    });
    let p = side(&r, "primary").unwrap();
    let rep = side(&r, "replica").expect("the replica site's view (same host)");
    assert_eq!(rep["state"], "replicating");
    assert_eq!(rep["interval_seconds"], 1, "learnt from the cycles: {rep}");
    assert!(rep["points"].as_u64().unwrap() >= 1);
    assert_eq!(p["lineage"], rep["lineage"]);
    assert!(p["rpo_seconds"].as_u64().unwrap() <= 5, "{p}");
    assert!(p["total_bytes"].as_u64().unwrap() >= 24 << 20);
    assert!(p["compression_ratio"].as_f64().unwrap() > 0.9);
    assert_eq!(p["bandwidth_limit_bytes_per_second"], Value::Null);
    let roles: Vec<&str> = p["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["role"].as_str().unwrap())
        .collect();
    assert!(
        roles.contains(&"tracker") && roles.contains(&"shipper"),
        "{roles:?}"
    );
    eprintln!("--- status while replicating:\n{}", status_text("vm1"));

    // Paused: the tracker keeps tracking, nothing is shipped; the pause survives a restart.
    vmr(&["pause", "vm1"]);
    wait_status("paused", Duration::from_secs(10), |p| {
        p["state"] == "paused"
    });
    let before = site.applied();
    qemu_write_nbd(&tracker.uri("sys"), 0x5a, "40M", "3M");
    std::thread::sleep(Duration::from_secs(3));
    shipper.kill();
    let shipper = site.shipper(&config, &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(site.applied(), before, "a paused VM shipped a cycle");
    let r = wait_status("paused after a restart", Duration::from_secs(20), |p| {
        p["state"] == "paused"
    });
    let p = side(&r, "primary").unwrap();
    assert_eq!(p["health"]["level"], "warning");
    assert!(p["backlog_bytes"].as_u64().unwrap() >= 3 << 20, "{p}");
    eprintln!("--- status while paused:\n{}", status_text("vm1"));

    // Resumed: one cycle of everything that changed.
    vmr(&["resume", "vm1"]);
    site.wait_cycles(before, 1, Duration::from_secs(30));
    let after_resume: Vec<Value> = events(&run)
        .into_iter()
        .skip_while(|e| e["event"] != "resumed")
        .filter(|e| e["event"] == "cycle-applied" && e["source"] == "shipper")
        .collect();
    assert!(
        after_resume[0]["bytes"].as_u64().unwrap() >= 3 << 20,
        "the first cycle after resume carries all that changed: {}",
        after_resume[0]
    );

    // Settings at run time: SIGHUP reads the file again.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("interval = \"1s\"", "interval = \"2s\""),
    )
    .unwrap();
    // SAFETY: kill(2) on the shipper this test started.
    unsafe { libc::kill(shipper.0.id() as i32, libc::SIGHUP) };
    wait_status("the new interval", Duration::from_secs(10), |p| {
        p["interval_seconds"] == 2
    });
    vmr(&["set", "vm1", "interval=1s", "rpo_limit=6s"]);
    wait_status("interval 1s again", Duration::from_secs(10), |p| {
        p["interval_seconds"] == 1 && p["rpo_limit_seconds"] == 6
    });

    // The replica site goes away for a while: cycles are missed, the RPO grows past its
    // limit (critical), and the missed cycles stay visible once it is back.
    applier.kill();
    let r = wait_status(
        "critical: RPO over its limit",
        Duration::from_secs(30),
        |p| p["health"]["level"] == "critical" && p["last_error"].is_string(),
    );
    let p = side(&r, "primary").unwrap();
    assert!(
        p["health"]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("over the RPO limit"),
        "{p}"
    );
    std::thread::sleep(Duration::from_secs(6));
    let since = site.applied();
    let _applier = site.applier();
    site.wait_cycles(since, 2, Duration::from_secs(60));
    let r = wait_status(
        "recovered, with missed cycles",
        Duration::from_secs(20),
        |p| {
            p["last_hour"]["cycles_missed"].as_u64() >= Some(5)
                && p["rpo_seconds"].as_u64() < Some(6)
        },
    );
    let p = side(&r, "primary").unwrap();
    assert_eq!(p["health"]["level"], "warning", "{p}");
    assert!(
        p["health"]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("cycles of the last hour were missed"),
        "{p}"
    );
    // The link's rate is still known (from the last cycle that carried data).
    assert!(p["link_rate_bytes_per_second"].as_f64() > Some(0.0), "{p}");
    eprintln!(
        "--- status after a missed-cycle period:\n{}",
        status_text("vm1")
    );
    eprintln!(
        "--- status --json after a missed-cycle period:\n{}",
        serde_json::to_string_pretty(&status("vm1")).unwrap()
    );

    for e in [
        "initial-copy-started",
        "cycle-applied",
        "paused",
        "resumed",
        "settings-changed",
        "cycle-failed",
        "health-changed",
    ] {
        assert!(count(&run, e) > 0, "no {e} event: {:?}", events(&run));
    }
    let hup: Vec<Value> = events(&run)
        .into_iter()
        .filter(|e| e["event"] == "settings-changed" && e["by"] == "sighup")
        .collect();
    assert_eq!(hup.len(), 1, "{hup:?}");
    // `events` prints them; the applier's and the shipper's both.
    let printed = vmr(&["events", "--vm", "vm1"]);
    assert!(
        printed.contains("\"source\":\"applier\"") && printed.contains("\"source\":\"shipper\"")
    );
    drop(shipper);
    tracker.stop();
}

/// A pause reaches the replica site: its status shows the VM paused since the primary's
/// pause, Warning at most however long the pause lasts (past the RPO limit, every interval
/// missed), also after its applier restarts; resumed, it replicates again and the paused
/// time was not counted as missed cycles. (The replica site used to count the pause as
/// missed cycles and age the latest point into Critical.)
#[test]
fn the_replica_site_shows_a_pause_and_counts_no_missed_cycles_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_dir(dir.path());
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 16 * MIB);
    fill_random(&img, 4);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let config = site.config_via(
        &tracker,
        &format!("127.0.0.1:{}", site.port),
        "rpo_limit = \"5s\"\n",
    );
    let mut applier = site.applier();
    let _shipper = site.shipper(&config, &[]);
    site.wait_cycles(0, 3, Duration::from_secs(60));
    wait_side("replica", "replicating", Duration::from_secs(20), |r| {
        r["state"] == "replicating" && r["health"]["level"] == "normal"
    });
    let expected = |r: &Value| side(r, "replica").unwrap()["last_hour"]["cycles_expected"].as_u64();
    let (t0, expected0) = (Instant::now(), expected(&status("vm1")).unwrap());

    vmr(&["pause", "vm1"]);
    let r = wait_side("replica", "the pause told", Duration::from_secs(20), |r| {
        r["state"] == "paused"
    });
    let since = side(&r, "replica").unwrap()["paused_since"].clone();
    assert!(since.is_u64(), "{r}");
    assert_eq!(side(&r, "primary").unwrap()["paused_since"], since, "{r}");
    let applied = site.applied();
    // Past the RPO limit, and past 20% of the hour's cycles: neither counts while paused.
    std::thread::sleep(Duration::from_secs(8));
    let check_paused = |r: &Value| {
        let rep = side(r, "replica").expect("the replica site's view");
        assert_eq!(rep["state"], "paused", "{rep}");
        assert_eq!(rep["paused_since"], since, "{rep}");
        assert_eq!(rep["health"]["level"], "warning", "{rep}");
        let reasons = rep["health"]["reasons"].to_string();
        assert!(
            reasons.contains("paused") && !reasons.contains("missed") && !reasons.contains("RPO"),
            "{rep}"
        );
    };
    check_paused(&status("vm1"));
    eprintln!("--- replica site while paused:\n{}", status_text("vm1"));
    // The applier restarts: the pause was saved with the replica.
    applier.kill();
    let _applier = site.applier();
    let r = wait_side(
        "replica",
        "the replica after a restart",
        Duration::from_secs(20),
        |r| r["state"] == "paused",
    );
    check_paused(&r);
    assert_eq!(site.applied(), applied, "a paused VM shipped a cycle");
    // Over real QUIC: the welcome carries the pause; a shipper of protocol 3 is refused,
    // the message naming both versions and the site to upgrade.
    match site.talk_as_primary(PROTOCOL_VERSION, &[]).remove(0) {
        Message::Welcome { paused, .. } => assert_eq!(paused, since.as_u64()),
        other => panic!("{other:?}"),
    }
    match site.talk_as_primary(3, &[]).remove(0) {
        Message::Error { message, .. } => assert!(
            message.contains("version 3")
                && message.contains(&format!("version {PROTOCOL_VERSION}"))
                && message.contains("upgrade vmreplica on the primary site"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let told: Vec<Value> = events(&run)
        .into_iter()
        .filter(|e| e["event"] == "paused" && e["source"] == "applier")
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0]["since"], since);

    vmr(&["resume", "vm1"]);
    site.wait_cycles(applied, 2, Duration::from_secs(60));
    let r = wait_side(
        "replica",
        "replicating again",
        Duration::from_secs(20),
        |r| r["state"] == "replicating" && r["health"]["level"] == "normal",
    );
    let rep = side(&r, "replica").unwrap();
    assert_eq!(rep["paused_since"], Value::Null, "{rep}");
    // The cycles expected grew by the time replication was on, not by the 8 s paused.
    let on = t0.elapsed().as_secs().saturating_sub(8);
    assert!(
        expected(&r).unwrap() <= expected0 + on + 2,
        "the pause counted as expected (missed) cycles: {expected0} before, {on} s on: {rep}"
    );
    assert_eq!(
        count(&run, "resumed"),
        2,
        "the shipper's and the applier's: {:?}",
        events(&run)
    );
    eprintln!("--- replica site resumed:\n{}", status_text("vm1"));
    tracker.stop();
}

/// Writes through the tracker's NBD socket (as the guest would).
fn qemu_write_nbd(uri: &str, byte: u8, offset: &str, len: &str) {
    run(Command::new("qemu-io")
        .args(["-f", "raw", uri])
        .args(["-c", &format!("write -P {byte} {offset} {len}")]));
}

/// A shipper whose tracker is not running says so, naming the socket and the primary's
/// side (it used to say "unexpected answer from the applier"), once: the retries are
/// counted, not logged each time.
#[test]
fn a_missing_tracker_is_named_as_the_primarys_fault_and_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_dir(dir.path());
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 16 * MIB);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let config = site.config(&tracker);
    let control = tracker.control.clone();
    tracker.stop();
    let _applier = site.applier();
    let _shipper = site.shipper(&config, &[]);
    let t0 = Instant::now();
    while count(&run, "cycle-failed") < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            site.log("shipper")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = site.log("shipper");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("replication interrupted"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("the tracker on this (primary) host does not answer")
            && lines[0].contains(&control.display().to_string())
            && !lines[0].contains("from the applier"),
        "{}",
        lines[0]
    );
    let r = status("vm1");
    let p = site_of(&r);
    assert_eq!(p["state"], "stopped");
    assert_eq!(p["health"]["level"], "critical");
    assert!(p["last_error"]
        .as_str()
        .unwrap()
        .contains("does not answer at its control socket"));
}

fn site_of(r: &Value) -> &Value {
    side(r, "primary").unwrap_or_else(|| panic!("no primary in {r}"))
}

/// `resync --wait` shows the checksum pass and ends when the resync is applied; only the
/// differing blocks travel. `remove` asks first, refuses while the primary is connected,
/// and removes on each side asked.
#[test]
fn resync_with_progress_then_remove_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_dir(dir.path());
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 32 * MIB);
    fill_random(&img, 8);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let (config, _applier, _shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 2, Duration::from_secs(60));
    let out = vmr(&["resync", "vm1", "--wait"]);
    assert!(out.contains("resync applied"), "{out}");
    assert_eq!(count(&run, "resync-started"), 1);
    site.assert_equal(&config, &img);
    let resync = events(&run)
        .into_iter()
        .find(|e| {
            e["event"] == "cycle-applied" && e["kind"] == "resync" && e["source"] == "shipper"
        })
        .unwrap();
    assert_eq!(resync["bytes"], 0, "nothing differed: {resync}");

    // remove: no side chosen, no confirmation, primary connected: refused, nothing gone.
    let no = Command::new(bin())
        .args(["remove", "vm1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&no.stderr).contains("--replica"));
    let no = Command::new(bin())
        .args(["remove", "vm1", "--replica"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!no.status.success());
    assert!(String::from_utf8_lossy(&no.stderr).contains("--yes"));
    let no = Command::new(bin())
        .args(["remove", "vm1", "--replica", "--yes"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&no.stderr).contains("its primary is connected"),
        "{}",
        String::from_utf8_lossy(&no.stderr)
    );
    assert!(site.store.join("vm1/state.json").exists());
    // Typed confirmation, on the primary: the shipper stops, its state goes.
    let mut c = Command::new(bin())
        .args(["remove", "vm1", "--primary"])
        .env("VMREPLICA_CONFIRM_FROM_STDIN", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(b"vm1\n").unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!tracker.state.join("shipper.json").exists());
    vmr(&["remove", "vm1", "--replica", "--yes"]);
    assert!(!site.store.join("vm1").exists());
    let r = status("vm1");
    assert!(r["vms"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(count(&run, "removed"), 2);
    tracker.stop();
}

/// An excluded disk (swap) is served by the tracker as usual but neither tracked nor
/// shipped; the replica records its name and size (failover recreates it blank), and status
/// shows it on both sites.
#[test]
fn an_excluded_disk_is_served_not_tracked_not_shipped_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    run_dir(dir.path());
    let site = Site::new(dir.path(), dir.path().join("store"));
    let sys = image(dir.path(), "sys.img", 16 * MIB);
    let swap = image(dir.path(), "swap.img", 8 * MIB);
    fill_random(&sys, 2);
    let bad = Command::new(bin())
        .args(["tracker", "--state-dir"])
        .arg(dir.path().join("s2"))
        .arg("--disk")
        .arg(format!("sys={}", sys.display()))
        .args(["--exclude", "nope"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--exclude nope"));
    let tracker = TrackerProc::start(
        dir.path(),
        &[("sys", &sys), ("swap", &swap)],
        &["--exclude", "swap"],
    );
    qemu_write_nbd(&tracker.uri("swap"), 0x33, "1M", "2M");
    let (config, _applier, _shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 2, Duration::from_secs(60));
    // Served: what was written reads back through the tracker.
    run(Command::new("qemu-io")
        .args(["-f", "raw", &tracker.uri("swap")])
        .args(["-c", "read -P 0x33 1M 2M"]));
    assert!(!tracker.state.join("swap.bitmap").exists());
    assert!(!site.store.join("vm1/disks/swap.img").exists());
    let state: Value =
        serde_json::from_slice(&std::fs::read(site.store.join("vm1/state.json")).unwrap()).unwrap();
    assert_eq!(
        state["state"]["excluded"],
        serde_json::json!([{"name": "swap", "size": 8 * MIB}])
    );
    site.assert_equal(&config, &sys);
    let r = status("vm1");
    for s in ["primary", "replica"] {
        let v = side(&r, s).unwrap();
        let d: Vec<&Value> = v["disks"].as_array().unwrap().iter().collect();
        assert!(
            d.iter()
                .any(|d| d["name"] == "swap" && d["excluded"] == true && d["size"] == 8 * MIB),
            "{s}: {v}"
        );
    }
    assert!(status_text("vm1").contains("swap 8.0 MiB (excluded)"));
    tracker.stop();
}
