//! Failover against a hostile environment and a careless admin, with the real processes on
//! two sites: a tracker state directory lost on the new primary or restored from a backup on
//! the old one, two `reverse` at once, a planned failover while the replica site is down or
//! never answers again, and a replica record restored over a committed failover.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::site::tail;
use common::sites::*;
use common::*;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Site B's failover tracker state is lost: its applier, tracker and shipper die, the
/// directory `STORE/vm1/primary/tracker` is removed, and the applier starts again (which
/// starts a tracker on the images again).
fn lose_b_tracker_state(p: &mut Pair) {
    p.kill_applier('b');
    let dir = p.b.primary_dir().join("tracker");
    for lock in [dir.join("shipper.lock"), dir.join("lock")] {
        kill_holder(&lock);
        let deadline = Instant::now() + Duration::from_secs(10);
        while vmreplica_applier::store::lock_holder(&lock).is_some() {
            assert!(Instant::now() < deadline, "{} still held", lock.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    p.start_applier('b', &[]);
    wait_served(&p.b);
}

/// Waits until the applier of `s` serves vm1's disks (it starts the tracker at its start).
fn wait_served(s: &SiteDir) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(s.primary_dir().join("nbd.sock")).is_err() {
        assert!(
            Instant::now() < deadline,
            "site {}'s applier did not serve vm1; its log:\n{}",
            s.name,
            tail(&s.log("applier"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The tracker status of site B's failover tracker.
fn b_tracker_status(p: &Pair) -> serde_json::Value {
    vmreplica_tracker::control::call(
        &p.b.primary_dir().join("tracker/control.sock"),
        &vmreplica_tracker::control::Request::Status,
    )
    .unwrap()
}

/// Site A comes back after site B's committed failover: its tracker runs (no VM), `reverse`;
/// waits until site A is a replica again and holds site B's disk.
fn reverse_and_wait_equal(p: &mut Pair, extra: &[&str]) {
    if p.tracker.is_none() {
        p.start_tracker(&[]);
        p.write_config("");
    }
    let cfg = p.config.to_str().unwrap().to_string();
    let mut args = vec!["reverse", "vm1", "--config", &cfg];
    args.extend(extra);
    let out = p.a.cli_ok(&args);
    assert!(out.contains("replicates back to this site"), "{out}");
    p.a.wait_role("replica", Duration::from_secs(120));
    let b_disk = p.nbd_read(&p.b.uri("sys"));
    let a_disk = std::fs::read(&p.img).unwrap();
    let differ = a_disk
        .chunks(MIB as usize)
        .zip(b_disk.chunks(MIB as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect::<Vec<_>>();
    assert!(
        differ.is_empty(),
        "site A's disk differs from site B's after the reverse cycle, in MiB {differ:?}; site \
         B's shipper log:\n{}",
        tail(&p.b.primary_log("shipper"))
    );
}

/// Case 1: the new primary's tracker state is lost after the failover was committed and the
/// failed-over VM wrote. A fresh tracker there knows no write, so the reverse cycle shipped
/// only the old primary's divergent ranges: site A kept its old data where site B's VM had
/// written, and called itself a replica of site B. Now every disk is marked for a checksum
/// resync, and the reverse cycle is one.
#[test]
fn a_lost_tracker_state_on_the_new_primary_ends_in_a_checksum_resync_back() {
    let mut p = Pair::replicating(8, None);
    p.kill_primary();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 31, 2 * MIB, MIB);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    lose_b_tracker_state(&mut p);
    // The applier marks the new tracker's disks once it answers (up to 30 s here).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut st = b_tracker_status(&p);
    while st["disks"][0]["resync_required"] != true && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        st = b_tracker_status(&p);
    }
    reverse_and_wait_equal(&mut p, &[]);
    assert_eq!(std::fs::read(&p.img).unwrap()[2 * MIB as usize], 31);
    assert_eq!(
        st["disks"][0]["resync_required"], true,
        "the lost state was not noticed: {st}"
    );
    assert!(p.b.log("applier").contains("was lost"));
}

/// Case 1, before the commit: the baseline that a cancel undoes the VM's writes from is in
/// the lost state. A cancel then kept the failed-over VM's writes in images the record
/// called point M again (the old primary's next cycles landed on them). Now the cancel is
/// refused, saying why and that commit is the way on; the commit works.
#[test]
fn cancel_is_refused_once_the_failovers_tracker_state_is_lost() {
    let mut p = Pair::replicating(8, None);
    p.kill_primary();
    let replica = std::fs::read(p.b.image("sys")).unwrap();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 32, 4 * MIB, MIB);
    lose_b_tracker_state(&mut p);
    let out = p.b.cli(&["failover", "cancel", "vm1"]);
    let e = stderr(&out);
    assert!(
        !out.status.success(),
        "the cancel went on without the baseline (the images {} point M again)",
        if std::fs::read(p.b.image("sys")).unwrap() == replica {
            "are"
        } else {
            "are NOT"
        }
    );
    assert!(
        e.contains("vm1")
            && e.contains("was lost")
            && e.contains("cancel is no longer possible")
            && e.contains("vmreplica failover commit vm1"),
        "{e}"
    );
    assert_eq!(p.b.role(), "failed-over");
    assert_eq!(p.nbd_read(&p.b.uri("sys"))[4 * MIB as usize], 32);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    assert_eq!(p.b.role(), "primary");
}

/// Case 2: the old primary's tracker state directory is restored from a backup taken before
/// its last cycles, then `reverse`. Its bitmaps miss the write made after the backup that
/// was never shipped, so the reverse cycle did not overwrite it: site A kept a block site B
/// never had. Now the tracker's epoch check marks the disk for a resync; `reverse` is refused
/// unless `--discard-local-changes` (whether site A wrote after the failover is unknown too),
/// and then adoption takes such a disk as divergent whole.
#[test]
fn an_old_primary_tracker_state_restored_from_a_backup_is_not_trusted_by_reverse() {
    let mut p = Pair::replicating(8, None);
    let state = p.a.dir.join("state");
    let backup = p.a.dir.join("state-backup");
    run(Command::new("cp").arg("-a").arg(&state).arg(&backup));
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    p.write_replicated(&uri_a, 21, 12 * MIB, MIB);
    // The shipper dies; a last write stays on site A only; then site A is gone.
    p.shipper.take().unwrap().kill();
    Pair::nbd_write(&uri_a, 23, 16 * MIB, MIB);
    p.kill_primary();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 33, 6 * MIB, MIB);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    // Site A's host is rebuilt, its tracker state restored from the backup.
    std::fs::remove_dir_all(&state).unwrap();
    run(Command::new("cp").arg("-a").arg(&backup).arg(&state));
    p.start_tracker(&[]);
    p.write_config("");
    let st = p.tracker.as_ref().unwrap().ctl(&["status"]);
    assert_eq!(
        st["disks"][0]["resync_required"], true,
        "the restored state was not noticed: {st}"
    );
    // Whether site A's VM wrote after the failover cannot be told from that state: refused
    // unless its changes are given up, saying so.
    let cfg = p.config.to_str().unwrap().to_string();
    let out = p.a.cli(&["reverse", "vm1", "--config", &cfg]);
    let e = stderr(&out);
    if out.status.success() {
        // What it did before: the restored bitmaps were trusted.
        p.a.wait_role("replica", Duration::from_secs(120));
        let a = std::fs::read(&p.img).unwrap();
        panic!(
            "reverse trusted the restored tracker state; site A's unshipped write after the \
             backup {} (byte {} at 16 MiB, site B's is 0)",
            if a[16 * MIB as usize] == 23 {
                "survived the reverse cycle: silent divergence"
            } else {
                "was overwritten"
            },
            a[16 * MIB as usize]
        );
    }
    assert!(
        e.contains("VM vm1") && e.contains("restored") && e.contains("--discard-local-changes"),
        "{e}"
    );
    assert_eq!(p.a.role(), "none", "refused, yet site A adopted its images");
    reverse_and_wait_equal(&mut p, &["--discard-local-changes"]);
    let a = std::fs::read(&p.img).unwrap();
    assert_eq!(a[16 * MIB as usize], 0, "site A's unshipped write survived");
    assert_eq!(a[6 * MIB as usize], 33);
}

/// Case 3: two `reverse` of one VM at once on the old primary: one replicates back, the
/// other is refused by the command lock (or finds it done); site A ends the replica, equal
/// to site B.
#[test]
fn two_reverses_at_once_replicate_back_once() {
    let mut p = Pair::replicating(4, None);
    p.kill_primary();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 34, MIB, MIB);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    p.start_tracker(&[]);
    p.write_config("");
    let cfg = p.config.to_str().unwrap().to_string();
    let spawn = || {
        Command::new(bin())
            .args(["reverse", "vm1", "--config", &cfg, "--store"])
            .arg(&p.a.store)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (c1, c2) = (spawn(), spawn());
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    let ok = [&o1, &o2].iter().filter(|o| o.status.success()).count();
    for o in [&o1, &o2] {
        if !o.status.success() {
            let e = stderr(o);
            assert!(
                e.contains("VM vm1") && e.to_lowercase().contains("nothing was changed"),
                "an unclear refusal: {e}"
            );
        }
    }
    assert!(
        ok >= 1,
        "neither reverse went through:\n{}\n{}",
        stderr(&o1),
        stderr(&o2)
    );
    p.a.wait_role("replica", Duration::from_secs(120));
    let b_disk = p.nbd_read(&p.b.uri("sys"));
    assert!(
        std::fs::read(&p.img).unwrap() == b_disk,
        "site A differs from site B"
    );
}

/// Case 4: a planned failover while the replica site's applier is down: a clear error in
/// bounded time, naming the VM and the replica site, and nothing changed: the disks are not
/// sealed, the shipper still runs and replicates once the replica site is back.
#[test]
fn a_planned_failover_while_the_replica_site_is_down_changes_nothing() {
    let mut p = Pair::replicating(4, None);
    p.kill_applier('b');
    let t0 = Instant::now();
    let cfg = p.config.to_str().unwrap().to_string();
    let out =
        p.a.cli(&["failover", "planned", "vm1", "--config", &cfg, "--no-start"]);
    let took = t0.elapsed();
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    assert!(
        e.contains("VM vm1")
            && e.contains(&p.b.addr())
            && e.contains("does not answer")
            && e.contains("Nothing was changed"),
        "{e}"
    );
    let st = p.tracker.as_ref().unwrap().ctl(&["status"]);
    assert_eq!(st["sealed"], false, "the disks were sealed: {st}");
    let shipper = p.shipper.as_mut().unwrap();
    assert!(
        shipper.0.try_wait().unwrap().is_none(),
        "the shipper was stopped"
    );
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    Pair::nbd_write(&uri_a, 35, 0, MIB);
    p.start_applier('b', &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read(p.b.image("sys")).unwrap()[0] != 35 {
        assert!(
            Instant::now() < deadline,
            "replication did not go on; shipper log:\n{}",
            tail(&p.a.log("shipper"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Case 8: the replica site's applier dies right after saving the promote and does not
/// come back: the command retried for ever. Now it ends at `--timeout`, saying the replica
/// site may be the primary already and not to start the VM here; the disks stay sealed.
#[test]
fn a_planned_failover_whose_replica_site_never_answers_again_ends_at_its_timeout() {
    let mut p = Pair::replicating(4, None);
    Pair::nbd_write(&p.tracker.as_ref().unwrap().uri("sys"), 36, 0, MIB);
    let shutdown = sha(&p.img);
    p.start_applier('b', &[("VMREPLICA_CRASH_AT", "promote.saved")]);
    let cfg = p.config.to_str().unwrap().to_string();
    let t0 = Instant::now();
    let mut cmd = Guard(
        Command::new(bin())
            .args(["failover", "planned", "vm1", "--config", &cfg, "--no-start"])
            .args(["--timeout", "15s", "--store"])
            .arg(&p.a.store)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // (Before, the command retried for ever: killed here after 90 s.)
    let st = wait_timeout(&mut cmd.0, Duration::from_secs(90));
    let took = t0.elapsed();
    let mut e = String::new();
    use std::io::Read;
    let _ = cmd.0.stderr.take().unwrap().read_to_string(&mut e);
    assert!(!st.success(), "{e}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(
        e.contains("VM vm1")
            && e.contains("within 15s")
            && e.contains("do not unseal")
            && e.contains("Run the command again once the replica site answers"),
        "{e}"
    );
    // Site A's disks stay sealed.
    let st = p.tracker.as_ref().unwrap().ctl(&["status"]);
    assert_eq!(st["sealed"], true, "{st}");
    // The adoption the command made is withdrawn, not removed: the record stays (it takes
    // no cycle), so the promoted site's shipper finds it and cannot make a new replica in
    // its place, and the command run again adopts the images anew.
    let rec = p.a.record();
    assert_eq!(rec["role"]["kind"], "reverse-pending", "{rec}");
    assert!(
        rec["role"]["withdrawn"].is_u64(),
        "not marked withdrawn: {rec}"
    );
    // The replica site, back, is the primary with the disks as they were at the shutdown.
    p.start_applier('b', &[]);
    assert_eq!(p.b.role(), "primary");
    wait_served(&p.b);
    let served = p.dir.path().join("served");
    std::fs::write(&served, p.nbd_read(&p.b.uri("sys"))).unwrap();
    assert_eq!(sha(&served), shutdown);
    // The command run again finds the replica site promoted and finishes: site A becomes
    // its replica and takes its writes.
    p.a.cli_ok(&["failover", "planned", "vm1", "--config", &cfg, "--no-start"]);
    let t = p.tracker.take().unwrap();
    assert!(t.wait_exit().success());
    p.a.wait_role("replica", Duration::from_secs(90));
    Pair::nbd_write(&p.b.uri("sys"), 39, 0, MIB);
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::fs::read(&p.img).unwrap()[0] != 39 {
        assert!(
            Instant::now() < deadline,
            "site B's writes never reached site A; applier log:\n{}",
            tail(&p.a.log("applier"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Case 7: the replica site's record backed up before a failover, restored over the
/// committed failover: refused (its undo logs are gone), and the message says what happened
/// and what to do, not only "undo log …: No such file".
#[test]
fn a_replica_record_restored_over_a_committed_failover_says_what_happened() {
    let mut p = Pair::replicating(4, None);
    // The record must name an undo log (a second point), or there is nothing missing to
    // detect.
    p.write_replicated(&p.tracker.as_ref().unwrap().uri("sys"), 37, 0, MIB);
    let state = p.b.store.join("vm1/state.json");
    let backup = std::fs::read(&state).unwrap();
    p.kill_primary();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    p.kill_applier('b');
    std::fs::write(&state, &backup).unwrap();
    p.start_applier('b', &[]);
    // (An admin finding the VM a replica again tries to commit the failover once more.)
    let out = p.b.cli(&["failover", "commit", "vm1"]);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("VM vm1")
            && e.contains("state.json")
            && e.contains("restored from a backup")
            && e.contains("failed over VM vm1")
            && e.contains("Do not remove"),
        "{e}"
    );
    // The failed-over VM's disks are still served.
    assert_eq!(p.nbd_read(&p.b.uri("sys"))[0], 37);
}

/// Case 5: the old VM runs again on the old primary (its tracker serves it) when that site
/// asks to be replicated back: refused, nothing adopted; once the VM is down, reverse works.
/// Then the old VM started on the images directly (not through a tracker) cannot open them
/// for writing: the applier holds them as the new primary's replica (QEMU's own locks). The
/// failback then moves site B's disk exactly.
#[test]
fn the_old_vm_running_again_on_the_old_primary_is_refused_and_never_merged() {
    let mut p = Pair::replicating(4, None);
    p.kill_primary();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 38, MIB, MIB);
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    // Site A returns and its VM is started again by mistake (it holds the disk open).
    p.start_tracker(&[]);
    p.write_config("");
    // Its shipper too (refused by the new primary, it retries): a refused reverse must
    // leave it running.
    p.start_shipper();
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    let mut vm = Guard(
        Command::new("qemu-io")
            .args(["-f", "raw", &uri_a])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let cfg = p.config.to_str().unwrap().to_string();
    let out = p.a.cli(&["reverse", "vm1", "--config", &cfg]);
    let e = stderr(&out);
    assert!(
        !out.status.success(),
        "reverse with the old VM running: {e}"
    );
    assert!(
        e.contains("VM vm1") && e.contains("NBD connection") && e.contains("shut the VM down"),
        "{e}"
    );
    assert_eq!(
        p.a.role(),
        "none",
        "site A adopted its images under a running VM"
    );
    assert!(
        p.shipper.as_mut().unwrap().0.try_wait().unwrap().is_none(),
        "a refused reverse stopped the old shipper"
    );
    assert_eq!(p.b.role(), "primary");
    vm.kill();
    std::thread::sleep(Duration::from_millis(500));
    reverse_and_wait_equal(&mut p, &[]);
    // The old VM started on the image itself.
    let before = std::fs::read(&p.img).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 39 0 1M"])
        .arg(&p.img)
        .output()
        .unwrap();
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("lock"),
        "qemu-io wrote the replica's image: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        std::fs::read(&p.img).unwrap() == before,
        "the old VM wrote into the replica"
    );
    Pair::nbd_write(&p.b.uri("sys"), 40, 2 * MIB, MIB);
    let out = p.b.fail_back_planned();
    assert!(out.contains("planned failover done"), "{out}");
    let b_disk = std::fs::read(p.b.image("sys")).unwrap();
    assert!(
        p.nbd_read(&p.a.uri("sys")) == b_disk,
        "the failback lost or changed data"
    );
}

/// A planned failover run on the old primary after the replica site already failed over
/// (unplanned, not committed, its VM writing): refused, naming the failover on site B;
/// site A's disks are not left sealed, and site B's point and writes are untouched.
#[test]
fn a_planned_failover_against_a_replica_that_already_failed_over_is_refused() {
    let p = Pair::replicating(4, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    p.write_replicated(&uri_a, 61, 0, MIB);
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 62, 2 * MIB, MIB);
    let b_before = p.nbd_read(&p.b.uri("sys"));
    let cfg = p.config.to_str().unwrap().to_string();
    let out = p.a.cli(&[
        "failover",
        "planned",
        "vm1",
        "--config",
        &cfg,
        "--no-start",
        "--timeout",
        "30s",
    ]);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("VM vm1")
            && e.contains("failed over already")
            && e.contains("not committed")
            && e.contains("vmreplica failover cancel vm1")
            && e.contains("nothing was changed")
            && !e.contains("FailedOver {"),
        "{e}"
    );
    let st = p.tracker.as_ref().unwrap().ctl(&["status"]);
    assert_eq!(st["sealed"], false, "site A's disks were left sealed: {st}");
    assert_eq!(p.b.role(), "failed-over");
    assert_eq!(
        p.nbd_read(&p.b.uri("sys")),
        b_before,
        "site B's disk changed"
    );
    // Cancelled there, the same command then fails over as planned, with site A's disks.
    p.b.cli_ok(&["failover", "cancel", "vm1"]);
    p.a.cli_ok(&["failover", "planned", "vm1", "--config", &cfg, "--no-start"]);
    assert_eq!(p.b.role(), "primary");
    assert!(
        p.nbd_read(&p.b.uri("sys")) == std::fs::read(&p.img).unwrap(),
        "site B does not start from site A's disks"
    );
}
