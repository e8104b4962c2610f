//! Failover with the real processes, two sites on loopback (and one test in two network
//! namespaces): unplanned failover at the latest or an older point, commit and cancel,
//! reverse replication and failback, planned failover with zero loss, split brain and its
//! two resolutions, and crashes at each step of each (`VMREPLICA_CRASH_AT`), after which the
//! same command finishes.

mod common;

use std::time::Duration;

use common::sites::*;
use common::*;

/// An unplanned failover at the latest point serves the replica's point at once; the VM's
/// writes there are undone by a cancel, after which the old primary's cycles land again.
#[test]
fn unplanned_failover_serves_the_latest_point_and_cancel_returns_to_replicating() {
    let mut p = Pair::replicating(8, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    p.write_replicated(&uri_a, 7, 20 * MIB, MIB);
    // The primary site is gone.
    p.kill_primary();
    let replica = std::fs::read(p.b.image("sys")).unwrap();
    let out = p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    assert!(out.contains("failed over to point"), "{out}");
    assert_eq!(p.b.role(), "failed-over");
    // `vmreplica status` says so.
    let st: serde_json::Value =
        serde_json::from_str(&p.b.cli_ok(&["status", "vm1", "--json"])).unwrap();
    let v = &st["vms"][0];
    assert_eq!(
        (v["role"].as_str(), v["state"].as_str()),
        (Some("failed-over"), Some("failed-over")),
        "{st}"
    );
    let served = p.nbd_read(&p.b.uri("sys"));
    assert!(
        served == replica,
        "the failed-over disk is not the replica's latest point"
    );
    assert_eq!(
        &served[20 * MIB as usize..21 * MIB as usize],
        &[7u8; MIB as usize][..]
    );
    // The failed-over VM writes.
    Pair::nbd_write(&p.b.uri("sys"), 9, 0, 3 * MIB);
    Pair::nbd_write(&p.b.uri("sys"), 0, 30 * MIB, MIB);
    // Cancel: its writes are gone, the replica is as it was.
    let out = p.b.cli_ok(&["failover", "cancel", "vm1"]);
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(p.b.role(), "replica");
    assert!(
        std::fs::read(p.b.image("sys")).unwrap() == replica,
        "cancel did not restore the replica"
    );
    assert!(
        !p.b.primary_dir().exists(),
        "the failover's tracker state is left"
    );
    // The old primary comes back: its next cycles land.
    p.start_tracker(&[]);
    p.write_config("");
    p.start_shipper();
    p.write_replicated(&p.tracker.as_ref().unwrap().uri("sys"), 3, MIB, MIB);
    let out = run(std::process::Command::new(bin())
        .args(["verify", "vm1", "--config"])
        .arg(&p.config));
    assert!(String::from_utf8_lossy(&out.stdout).contains("replica equal to primary"));
}

/// Failing over to a point before the newest rolls the images back from the undo logs of
/// the cycles after it, behind a redo log: the served disk is exactly that point (as an
/// export of it shows), the rollback costs the changes rolled back, and a cancel returns to
/// the newest point.
#[test]
fn failover_to_an_older_point_serves_it_exactly_and_cancel_returns_to_the_newest() {
    let mut p = Pair::replicating(4, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    // Three more points, each with a write of its own. Two cycles after each write: the
    // first may have been frozen before the write (under load it was, and two writes then
    // shared one point); the second was frozen after it, so each write has a point alone.
    for (i, byte) in [(0u64, 11u8), (1, 12), (2, 13)] {
        p.write_replicated(&uri_a, byte, (8 + 4 * i) * MIB, 2 * MIB);
    }
    p.kill_primary();
    let points: Vec<u64> = {
        let out = p.b.cli_ok(&["applier", "points", "vm1"]);
        out.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    };
    assert!(points.len() >= 4, "{points:?}");
    let older = points[points.len() - 3];
    let export = p.dir.path().join("export");
    p.b.cli_ok(&[
        "applier",
        "export",
        "vm1",
        "--point",
        &older.to_string(),
        "--out",
        export.to_str().unwrap(),
    ]);
    let want = std::fs::read(export.join("sys.img")).unwrap();
    let newest = std::fs::read(p.b.image("sys")).unwrap();
    assert!(want != newest, "the older point is not older");
    let out = p.b.cli_ok(&[
        "failover",
        "unplanned",
        "vm1",
        "--point",
        &older.to_string(),
    ]);
    assert!(out.contains(&format!("point {older}")), "{out}");
    assert!(
        p.nbd_read(&p.b.uri("sys")) == want,
        "the served disk is not point {older}"
    );
    let redo = p.b.store.join("vm1/failover/redo.log");
    let redo_len = std::fs::metadata(&redo).unwrap().len();
    assert!(
        redo_len < 6 * MIB,
        "the redo log holds {redo_len} bytes: more than the changes rolled back"
    );
    Pair::nbd_write(&p.b.uri("sys"), 99, 9 * MIB, 5 * MIB);
    p.b.cli_ok(&["failover", "cancel", "vm1"]);
    assert!(std::fs::read(p.b.image("sys")).unwrap() == newest);
    assert!(!redo.exists());
    // The points are all there again.
    let out = p.b.cli_ok(&["applier", "points", "vm1"]);
    assert_eq!(out.lines().count() - 1, points.len());
}

/// Unplanned failover, commit, the old primary comes back and is replicated back to (only
/// the divergent ranges: the failed-over VM's writes, the rolled-back points' ranges, the old
/// primary's unreplicated writes), then a planned failback makes it the primary again with
/// identical disks, and replication goes on in the original direction.
#[test]
fn commit_reverse_then_planned_failback_with_identical_disks() {
    let mut p = Pair::replicating(8, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    p.write_replicated(&uri_a, 21, 12 * MIB, MIB);
    p.write_replicated(&uri_a, 22, 14 * MIB, MIB);
    // The shipper dies first: a last write stays unreplicated on site A.
    p.shipper.take().unwrap().kill();
    Pair::nbd_write(&uri_a, 23, 16 * MIB, MIB);
    p.kill_primary();
    // Site B fails over one point back (the 22s are rolled back), the VM writes, commit.
    let pts = p.b.cli_ok(&["applier", "points", "vm1"]);
    let cycles: Vec<u64> = pts
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let point = cycles[cycles.len() - 2];
    p.b.cli_ok(&[
        "failover",
        "unplanned",
        "vm1",
        "--point",
        &point.to_string(),
    ]);
    Pair::nbd_write(&p.b.uri("sys"), 31, 2 * MIB, MIB);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    assert_eq!(p.b.role(), "primary");
    assert_eq!(p.b.record()["points"], 0, "commit keeps no point");
    // Site A returns: its tracker runs (no VM); reverse.
    p.start_tracker(&[]);
    p.write_config("");
    let out =
        p.a.cli_ok(&["reverse", "vm1", "--config", p.config.to_str().unwrap()]);
    assert!(out.contains("replicates back to this site"), "{out}");
    // The reverse cycle lands: site A's images equal site B's.
    p.a.wait_role("replica", Duration::from_secs(90));
    let b_disk = p.nbd_read(&p.b.uri("sys"));
    let a_disk = std::fs::read(&p.img).unwrap();
    assert!(
        a_disk == b_disk,
        "site A's disk differs from site B's after the reverse cycle"
    );
    assert_eq!(
        a_disk[16 * MIB as usize],
        0,
        "site A's unreplicated write survived"
    );
    assert_eq!(
        a_disk[14 * MIB as usize],
        0,
        "a rolled-back point's write survived"
    );
    assert_eq!(a_disk[2 * MIB as usize], 31);
    // Only the divergent ranges travelled: a reverse cycle of a few MiB, not the disk (the
    // old primary's tracker was killed: its unreplicated write counts as the whole 4 MiB
    // extent its activity log recorded).
    let line =
        p.b.primary_log("shipper")
            .lines()
            .find(|l| l.contains("cycle applied on the replica") && l.contains("Reverse"))
            .map(str::to_string)
            .expect("no reverse cycle in site B's shipper log");
    let mib: f64 = field(&line, "cycle_mib");
    // (A cycle landing between the writes before the kill can add an extent: 7 MiB seen.)
    assert!(mib <= 8.0, "the reverse cycle moved {mib} MiB: {line}");
    // Site A's state before the reverse is a recovery point there.
    let pts = p.a.cli_ok(&["applier", "points", "vm1"]);
    assert!(pts.contains("local"), "{pts}");
    // Its old tracker, started again by mistake, cannot take the images the applier holds.
    let out = std::process::Command::new(bin())
        .args(["tracker", "--state-dir"])
        .arg(p.a.dir.join("state"))
        .arg("--disk")
        .arg(format!("sys={}", p.img.display()))
        .arg("--socket")
        .arg(p.a.dir.join("again.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another vmreplica tracker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Planned failback: site B's VM is not running; its disks are sealed, shipped, site A
    // promoted (no VM started: no definition).
    let out = p.b.fail_back_planned();
    assert!(out.contains("planned failover done"), "{out}");
    assert_eq!(p.a.role(), "primary");
    let a_served = p.nbd_read(&p.a.uri("sys"));
    assert!(a_served == b_disk, "the failback lost or changed data");
    assert!(std::fs::read(p.b.image("sys")).unwrap() == b_disk);
    // Site A's applier runs its tracker on its own image and replicates to site B.
    Pair::nbd_write(&p.a.uri("sys"), 41, 5 * MIB, MIB);
    p.b.wait_role("replica", Duration::from_secs(90));
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::fs::read(p.b.image("sys")).unwrap()[5 * MIB as usize] != 41 {
        assert!(
            std::time::Instant::now() < deadline,
            "site A's writes never reached site B; site A's shipper log:\n{}",
            common::site::tail(&p.a.primary_log("shipper"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A split brain: site B failed over and its VM wrote, while site A's VM kept writing after
/// the failover (a partition). Both sides refuse replication, naming the VM, the last common
/// point and the two commands; `reverse --discard-local-changes` keeps site B's changes
/// (site A's state before stays a recovery point there).
#[test]
fn split_brain_is_refused_on_both_sides_and_discard_local_changes_resolves_it() {
    let mut p = split_brain();
    let parent = p.b.record()["role"]["parent"].clone();
    let common = format!(
        "cycle {} of lineage {}",
        parent["cycle"],
        parent["lineage"].as_str().unwrap()
    );
    // Site A's shipper comes back: site B refuses it, and it stops replicating saying why
    // (it stays up, stopped, for `vmreplica status` and `resume`).
    p.start_shipper();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.a.log("shipper").contains("replication stopped") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            p.a.log("shipper")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = p.a.log("shipper");
    for want in [
        "VM vm1 failed over to this site at",
        &common,
        "split brain",
        "vmreplica reverse vm1",
        "--discard-local-changes",
        "vmreplica failover abandon vm1",
    ] {
        assert!(log.contains(want), "{want}: {}", common::site::tail(&log));
    }
    // Site A refuses to become a replica.
    let out =
        p.a.cli(&["reverse", "vm1", "--config", p.config.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    for want in [
        "VM vm1: split brain",
        &common,
        "vmreplica reverse vm1 --discard-local-changes",
        "vmreplica failover abandon vm1",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    assert_eq!(
        p.a.role(),
        "none",
        "site A adopted its images despite the split brain"
    );
    assert!(p.b.log("applier").contains("split brain"));
    // Keep site B's changes.
    p.a.cli_ok(&[
        "reverse",
        "vm1",
        "--config",
        p.config.to_str().unwrap(),
        "--discard-local-changes",
    ]);
    p.a.wait_role("replica", Duration::from_secs(90));
    let b_disk = p.nbd_read(&p.b.uri("sys"));
    assert!(std::fs::read(&p.img).unwrap() == b_disk);
    let pts = p.a.cli_ok(&["applier", "points", "vm1"]);
    assert!(
        pts.contains("local"),
        "site A's state before is no recovery point: {pts}"
    );
}

/// The other way out of a split brain: `failover abandon` on site B keeps site A's changes;
/// site B's writes since the failover are overwritten by site A's next cycle (its state
/// before stays a recovery point), and replication goes on from site A.
#[test]
fn split_brain_resolved_by_abandoning_the_failover() {
    let mut p = split_brain();
    let out = p.b.cli_ok(&["failover", "abandon", "vm1"]);
    assert!(out.contains("abandoned"), "{out}");
    assert_eq!(p.b.role(), "reverse-pending");
    assert!(!p.b.primary_dir().exists());
    p.start_shipper();
    p.b.wait_role("replica", Duration::from_secs(90));
    let a_disk = p.nbd_read(&p.tracker.as_ref().unwrap().uri("sys"));
    assert!(
        std::fs::read(p.b.image("sys")).unwrap() == a_disk,
        "site B does not hold site A's disk after the abandon"
    );
    let pts = p.b.cli_ok(&["applier", "points", "vm1"]);
    assert!(pts.contains("local"), "{pts}");
    p.write_replicated(&p.tracker.as_ref().unwrap().uri("sys"), 77, 6 * MIB, MIB);
    assert_eq!(
        std::fs::read(p.b.image("sys")).unwrap()[6 * MIB as usize],
        77
    );
}

/// `failover abandon` crashed (kill -9 of the applier) between saving the abandon and
/// removing site B's tracker state: run again, it removes the leftover state and succeeds,
/// and site A's next cycle lands.
#[test]
fn an_abandon_run_again_after_a_crash_removes_the_leftover_tracker_state() {
    let mut p = split_brain();
    crash_b(&mut p, "abandon.saved", &["failover", "abandon", "vm1"]);
    assert_eq!(p.b.role(), "reverse-pending");
    assert!(
        p.b.primary_dir().exists(),
        "the crash point is not between the save and the removal"
    );
    let out = p.b.cli_ok(&["failover", "abandon", "vm1"]);
    assert!(out.contains("abandoned"), "{out}");
    assert!(
        !p.b.primary_dir().exists(),
        "the rerun left the tracker state behind"
    );
    p.start_shipper();
    p.b.wait_role("replica", Duration::from_secs(90));
    let a_disk = p.nbd_read(&p.tracker.as_ref().unwrap().uri("sys"));
    assert!(std::fs::read(p.b.image("sys")).unwrap() == a_disk);
}

/// Site B failed over (committed) and wrote; site A's shipper died first and its VM went on
/// writing after the failover.
fn split_brain() -> Pair {
    let mut p = Pair::replicating(4, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    p.write_replicated(&uri_a, 5, 4 * MIB, MIB);
    p.shipper.take().unwrap().kill();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 8, 10 * MIB, 2 * MIB);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    // After the failover (its time is in seconds), site A's VM writes.
    std::thread::sleep(Duration::from_millis(1100));
    Pair::nbd_write(&uri_a, 6, 20 * MIB, MIB);
    p
}

/// A planned failover run on the primary, whose shipper runs and whose VM is connected: it
/// waits for the VM to be gone (refusing cleanly, sealing nothing, if it stays), seals the
/// disks, ships the last cycle, promotes site B; no write is lost (the disks' checksums at
/// the shutdown are site B's at the start); site A's tracker stops and site B replicates back.
#[test]
fn planned_failover_loses_no_write_and_replicates_back() {
    let mut p = Pair::replicating(8, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    // A "VM" holds the disk open.
    let mut vm = common::Guard(
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", &uri_a])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let cfg = p.config.to_str().unwrap().to_string();
    let out = p.a.cli(&[
        "failover",
        "planned",
        "vm1",
        "--config",
        &cfg,
        "--shutdown-timeout",
        "2s",
        "--no-start",
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("did not shut down within 2s"), "{e}");
    let st = p.tracker.as_ref().unwrap().ctl(&["status"]);
    assert_eq!(
        st["sealed"], false,
        "a refused planned failover sealed the disks"
    );
    vm.kill();
    // The last writes, unshipped, as the VM shuts down.
    Pair::nbd_write(&uri_a, 17, 3 * MIB, 5 * MIB);
    let shutdown = sha(&p.img);
    p.a.cli_ok(&["failover", "planned", "vm1", "--config", &cfg, "--no-start"]);
    assert_eq!(p.b.role(), "primary");
    let b_disk = p.nbd_read(&p.b.uri("sys"));
    let at_start = p.dir.path().join("b-at-start");
    std::fs::write(&at_start, &b_disk).unwrap();
    assert_eq!(sha(&at_start), shutdown, "the planned failover lost writes");
    // Site A's tracker stopped (its shipper too), sealed; its images wait for site B.
    let t = p.tracker.take().unwrap();
    assert!(t.wait_exit().success());
    assert!(std::os::unix::net::UnixStream::connect(p.a.dir.join("state/control.sock")).is_err());
    p.a.wait_role("replica", Duration::from_secs(90));
    Pair::nbd_write(&p.b.uri("sys"), 18, 0, MIB);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::fs::read(&p.img).unwrap()[0] != 18 {
        assert!(
            std::time::Instant::now() < deadline,
            "site B's writes never reached site A"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The points of vm1 on a site, oldest first.
fn points(s: &SiteDir) -> Vec<u64> {
    s.cli_ok(&["applier", "points", "vm1"])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Runs `args` on site B while its applier is set to crash at `point`: the command fails
/// (the applier is gone), then the applier starts again.
fn crash_b(p: &mut Pair, point: &str, args: &[&str]) {
    p.start_applier('b', &[("VMREPLICA_CRASH_AT", point)]);
    let out = p.b.cli(args);
    assert!(
        !out.status.success(),
        "{args:?} did not reach crash point {point}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let g = p.b.applier.as_mut().unwrap();
    let st = wait_timeout(&mut g.0, Duration::from_secs(30));
    assert!(!st.success(), "the applier did not crash at {point}");
    assert!(
        p.b.log("applier")
            .contains(&format!("VMREPLICA_CRASH_AT={point}")),
        "{point} was not reached"
    );
    p.start_applier('b', &[]);
}

/// kill -9 (a crash point) of the replica site's applier at each step of an unplanned
/// failover, of its cancel and of its commit: the same command run again after the applier
/// restarts finishes, and no point is lost (each cancel gives back the newest point exactly,
/// each failover serves exactly its point).
#[test]
fn a_crash_at_each_step_of_failover_cancel_and_commit_is_finished_by_the_same_command() {
    let mut p = Pair::replicating(4, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    for (i, byte) in [(0u64, 51u8), (1, 52)] {
        p.write_replicated(&uri_a, byte, (8 + 4 * i) * MIB, 2 * MIB);
    }
    p.kill_primary();
    let pts = points(&p.b);
    let (older, latest) = (pts[pts.len() - 2], pts[pts.len() - 1]);
    let newest = std::fs::read(p.b.image("sys")).unwrap();
    let export = p.dir.path().join("older");
    p.b.cli_ok(&[
        "applier",
        "export",
        "vm1",
        "--point",
        &older.to_string(),
        "--out",
        export.to_str().unwrap(),
    ]);
    let want_older = std::fs::read(export.join("sys.img")).unwrap();
    let steps = [
        ("failover.partial-rolled-back", older, "cancel.begun"),
        ("failover.redo-written", older, "cancel.stopped"),
        ("failover.rolled-back", older, "cancel.baseline-restored"),
        ("failover.tracker-started", latest, "cancel.images-restored"),
        ("failover.baseline-frozen", older, "cancel.begun"),
    ];
    for (crash, point, cancel_crash) in steps {
        let pt = point.to_string();
        let args = ["failover", "unplanned", "vm1", "--point", &pt];
        crash_b(&mut p, crash, &args);
        p.b.cli_ok(&args);
        let want = if point == older { &want_older } else { &newest };
        assert!(
            p.nbd_read(&p.b.uri("sys")) == *want,
            "after a crash at {crash}, the failover does not serve point {point}"
        );
        Pair::nbd_write(&p.b.uri("sys"), 60, 9 * MIB, 4 * MIB);
        crash_b(&mut p, cancel_crash, &["failover", "cancel", "vm1"]);
        p.b.cli_ok(&["failover", "cancel", "vm1"]);
        assert_eq!(p.b.role(), "replica");
        assert!(
            std::fs::read(p.b.image("sys")).unwrap() == newest,
            "after a crash at {cancel_crash}, the cancel did not give back the newest point"
        );
        assert_eq!(points(&p.b), pts, "a point was lost");
    }
    // Commit, crashed after its record was saved: the baseline is released when the
    // applier restarts (or by the commit again).
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    crash_b(&mut p, "commit.saved", &["failover", "commit", "vm1"]);
    assert_eq!(p.b.role(), "primary");
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    let st = vmreplica_tracker::control::call(
        &p.b.primary_dir().join("tracker/control.sock"),
        &vmreplica_tracker::control::Request::Status,
    )
    .unwrap();
    assert!(
        st["frozen"].is_null(),
        "the baseline outlived the commit: {st}"
    );
    // A failed over and committed site refuses what only a replica does.
    let out = p.b.cli(&["failover", "cancel", "vm1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be cancelled"));
    let out = p.b.cli(&["failover", "unplanned", "vm1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a replica"));
}

/// The replica site's applier crashes right after it saved the promote of a planned
/// failover, before it started anything: the old primary's command, still running, sees the
/// replica promoted once the applier is back (which starts the tracker and the shipper back)
/// and finishes.
#[test]
fn a_planned_failover_finishes_through_a_crash_of_the_promoting_applier() {
    let mut p = Pair::replicating(4, None);
    Pair::nbd_write(&p.tracker.as_ref().unwrap().uri("sys"), 19, 0, MIB);
    let shutdown = sha(&p.img);
    p.start_applier('b', &[("VMREPLICA_CRASH_AT", "promote.saved")]);
    let mut cmd = common::Guard(
        std::process::Command::new(bin())
            .args(["failover", "planned", "vm1", "--no-start", "--config"])
            .arg(&p.config)
            .arg("--store")
            .arg(&p.a.store)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let g = p.b.applier.as_mut().unwrap();
    let st = wait_timeout(&mut g.0, Duration::from_secs(60));
    assert!(!st.success(), "the applier did not crash at promote.saved");
    p.start_applier('b', &[]);
    let st = wait_timeout(&mut cmd.0, Duration::from_secs(120));
    let mut err = String::new();
    use std::io::Read;
    let _ = cmd.0.stderr.take().unwrap().read_to_string(&mut err);
    assert!(st.success(), "the planned failover did not finish: {err}");
    assert_eq!(p.b.role(), "primary");
    let served = p.dir.path().join("served");
    std::fs::write(&served, p.nbd_read(&p.b.uri("sys"))).unwrap();
    assert_eq!(sha(&served), shutdown);
    p.a.wait_role("replica", Duration::from_secs(90));
}

/// A failed-over VM's processes run detached from the applier: kill -9 of the applier
/// leaves its disks served; the applier, restarted, finds its tracker again, and starts one
/// that died while it was down (the baseline, durable, still allows a cancel).
#[test]
fn a_failed_over_vms_tracker_outlives_the_applier_and_is_found_again() {
    let mut p = Pair::replicating(4, None);
    p.kill_primary();
    let replica = std::fs::read(p.b.image("sys")).unwrap();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    let lock = p.b.primary_dir().join("tracker/lock");
    let pid = vmreplica_applier::store::lock_holder(&lock).unwrap();
    p.kill_applier('b');
    Pair::nbd_write(&p.b.uri("sys"), 71, MIB, MIB);
    assert_eq!(
        p.nbd_read(&p.b.uri("sys"))[MIB as usize],
        71,
        "the disk went with the applier"
    );
    p.start_applier('b', &[]);
    assert_eq!(p.b.role(), "failed-over");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vmreplica_applier::store::lock_holder(&lock), Some(pid));
    // The tracker dies while the applier is down: the applier starts it again.
    p.kill_applier('b');
    kill_holder(&lock);
    std::thread::sleep(Duration::from_millis(200));
    p.start_applier('b', &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = vmreplica_applier::store::lock_holder(&lock);
        if now.is_some_and(|n| n != pid)
            && std::os::unix::net::UnixStream::connect(p.b.primary_dir().join("nbd.sock")).is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tracker was not started again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(p.nbd_read(&p.b.uri("sys"))[MIB as usize], 71);
    p.b.cli_ok(&["failover", "cancel", "vm1"]);
    assert!(std::fs::read(p.b.image("sys")).unwrap() == replica);
}

/// The two sites in two network namespaces joined by a veth pair: a planned failover from
/// site A and the failback from site B, each losing nothing.
#[test]
fn planned_failover_and_failback_between_two_network_namespaces() {
    let ns = TwoNamespaces::new();
    let p = Pair::replicating(6, ns.placement());
    Pair::nbd_write(
        &p.tracker.as_ref().unwrap().uri("sys"),
        81,
        7 * MIB,
        2 * MIB,
    );
    let shutdown = sha(&p.img);
    let cfg = p.config.to_str().unwrap().to_string();
    p.a.cli_ok(&["failover", "planned", "vm1", "--config", &cfg, "--no-start"]);
    let at_b = p.dir.path().join("at-b");
    std::fs::write(&at_b, p.nbd_read(&p.b.uri("sys"))).unwrap();
    assert_eq!(sha(&at_b), shutdown);
    p.a.wait_role("replica", Duration::from_secs(90));
    Pair::nbd_write(&p.b.uri("sys"), 82, 0, MIB);
    let at_shutdown_b = p.nbd_read(&p.b.uri("sys"));
    p.b.fail_back_planned();
    assert!(
        p.nbd_read(&p.a.uri("sys")) == at_shutdown_b,
        "the failback lost writes"
    );
    assert!(std::fs::read(&p.img).unwrap() == at_shutdown_b);
    assert!(
        p.b.log("applier")
            .contains("primary connected remote=10.234.0.1:"),
        "site A did not come from its namespace"
    );
    assert!(
        p.a.log("applier")
            .contains("primary connected remote=10.234.0.2:"),
        "site B did not come from its namespace"
    );
    p.b.wait_role("replica", Duration::from_secs(90));
}
