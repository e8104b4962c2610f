//! Failover as a careless administrator runs it, with the real processes on two sites:
//! the same command twice at once and twice in a row, commands in the wrong order or on
//! the wrong site, and a test failover asked of a VM that is failed over.

mod common;

use std::process::{Command, Output};

use common::site::tail;
use common::sites::*;
use common::*;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `vmreplica ARGS --store STORE` on site `s`, started now (not waited for).
fn spawn(s: &SiteDir, args: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(args)
        .arg("--store")
        .arg(&s.store)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn failover_commands_twice_at_once_in_the_wrong_order_and_on_the_wrong_site() {
    let mut p = Pair::replicating(4, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    p.write_replicated(&uri_a, 41, 2 * MIB, MIB);
    // On the wrong site (the primary's own store holds no replica of vm1), and before any
    // failover: refused, naming the VM, nothing changes.
    let out = p.a.cli(&["failover", "unplanned", "vm1"]);
    assert!(
        !out.status.success() && stderr(&out).contains("vm1"),
        "{}",
        stderr(&out)
    );
    // (A cancel with nothing to cancel succeeds: it is how a cancel crashed after its last
    // step is finished.)
    let out = p.b.cli_ok(&["failover", "cancel", "vm1"]);
    assert!(out.contains("no failover"), "{out}");
    for cmd in ["commit", "abandon"] {
        let out = p.b.cli(&["failover", cmd, "vm1"]);
        assert!(
            !out.status.success() && stderr(&out).contains("vm1"),
            "failover {cmd} before any failover: {}",
            stderr(&out)
        );
        assert_eq!(p.b.role(), "replica", "failover {cmd} changed the record");
    }
    p.kill_primary();
    let replica = std::fs::read(p.b.image("sys")).unwrap();
    // Two unplanned failovers at once: one failover, both report it (the second finds the
    // first in progress, to the same point), one tracker serves the disks.
    let (c1, c2) = (
        spawn(&p.b, &["failover", "unplanned", "vm1"]),
        spawn(&p.b, &["failover", "unplanned", "vm1"]),
    );
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    assert!(
        o1.status.success() && o2.status.success(),
        "{}\n{}\n{}",
        stderr(&o1),
        stderr(&o2),
        tail(&p.b.log("applier"))
    );
    assert_eq!(p.b.role(), "failed-over");
    let lineage = p.b.record()["role"]["lineage"].clone();
    assert!(p.nbd_read(&p.b.uri("sys")) == replica);
    // Twice in a row, and to another point while one is in progress.
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    assert_eq!(
        p.b.record()["role"]["lineage"],
        lineage,
        "a second failover was made"
    );
    let out = p.b.cli(&["failover", "unplanned", "vm1", "--point", "1"]);
    assert!(
        !out.status.success() && stderr(&out).contains("commit or cancel"),
        "{}",
        stderr(&out)
    );
    // A test failover of a VM failed over here: its images are the running VM's disks.
    let out = p.b.cli(&["failover", "test", "vm1", "--point", "1"]);
    assert!(
        !out.status.success() && stderr(&out).contains("failover cancel vm1"),
        "a test failover of a failed-over VM: {}",
        stderr(&out)
    );
    // Abandon of an uncommitted failover cancels it, and says so; then the failover again.
    Pair::nbd_write(&p.b.uri("sys"), 43, 0, MIB);
    let out = p.b.cli_ok(&["failover", "abandon", "vm1"]);
    assert!(out.contains("it was cancelled"), "{out}");
    assert_eq!(p.b.role(), "replica");
    assert!(std::fs::read(p.b.image("sys")).unwrap() == replica);
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    // Commit twice at once, then again: committed once, the rest report it.
    Pair::nbd_write(&p.b.uri("sys"), 42, 0, MIB);
    let (c1, c2) = (
        spawn(&p.b, &["failover", "commit", "vm1"]),
        spawn(&p.b, &["failover", "commit", "vm1"]),
    );
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    assert!(
        o1.status.success() && o2.status.success(),
        "{}\n{}",
        stderr(&o1),
        stderr(&o2)
    );
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    assert_eq!(p.b.role(), "primary");
    // Cancel after commit: refused, the VM's writes stay.
    let out = p.b.cli(&["failover", "cancel", "vm1"]);
    assert!(
        !out.status.success() && stderr(&out).contains("vm1"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        &p.nbd_read(&p.b.uri("sys"))[..MIB as usize],
        &[42u8; MIB as usize][..]
    );
}

/// The replica site's record backed up before a failover, then restored over the
/// failover's (the applier restarted on it): the record says replica, while the
/// failed-over VM's tracker serves the images. (Over a committed failover the record is
/// refused anyway: the undo logs it names are gone.) The old primary's next cycles must not land
/// in the running VM's disks; they are refused, naming the tracker and the record.
#[test]
fn a_replica_record_restored_over_a_failover_takes_no_cycle_into_the_running_vms_disks() {
    let mut p = Pair::replicating(4, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    p.write_replicated(&uri_a, 51, 2 * MIB, MIB);
    let state = p.b.store.join("vm1/state.json");
    let backup = std::fs::read(&state).unwrap();
    p.kill_primary();
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    Pair::nbd_write(&p.b.uri("sys"), 52, 0, MIB);
    // The backup goes back, the applier restarts on it.
    p.kill_applier('b');
    std::fs::write(&state, &backup).unwrap();
    p.start_applier('b', &[]);
    // The old primary comes back and writes.
    p.start_tracker(&[]);
    p.write_config("");
    p.start_shipper();
    Pair::nbd_write(&p.tracker.as_ref().unwrap().uri("sys"), 53, 0, 2 * MIB);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !p.b.log("applier").contains("serves this site's images") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal; applier log:\n{}",
            tail(&p.b.log("applier"))
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    let served = p.nbd_read(&p.b.uri("sys"));
    assert_eq!(
        &served[..MIB as usize],
        &[52u8; MIB as usize][..],
        "the old primary's cycle landed in the running VM's disk"
    );
}

/// Two planned failovers of one VM at once on the primary (two admins, or a plan run twice):
/// one fails over, the other finishes with it or is refused clearly; no write is lost and
/// the replica site ends primary with the shutdown disks; then the same command again.
#[test]
fn two_planned_failovers_at_once_fail_over_once_and_lose_nothing() {
    let p = Pair::replicating(4, None);
    let uri_a = p.tracker.as_ref().unwrap().uri("sys");
    Pair::nbd_write(&uri_a, 61, 3 * MIB, 2 * MIB);
    let shutdown = sha(&p.img);
    let cfg = p.config.to_str().unwrap().to_string();
    let args = ["failover", "planned", "vm1", "--config", &cfg, "--no-start"];
    let (c1, c2) = (spawn(&p.a, &args), spawn(&p.a, &args));
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    let ok = [&o1, &o2].iter().filter(|o| o.status.success()).count();
    for o in [&o1, &o2] {
        if !o.status.success() {
            let e = stderr(o);
            assert!(e.contains("vm1"), "an unclear refusal: {e}");
        }
    }
    assert!(
        ok >= 1,
        "neither planned failover finished:\n{}\n{}\napplier B:\n{}",
        stderr(&o1),
        stderr(&o2),
        tail(&p.b.log("applier"))
    );
    assert_eq!(p.b.role(), "primary");
    let at_start = p.dir.path().join("b-at-start");
    std::fs::write(&at_start, p.nbd_read(&p.b.uri("sys"))).unwrap();
    assert_eq!(sha(&at_start), shutdown, "the planned failover lost writes");
    // Again, once done: refused (this site is not the primary any more) or a no-op.
    let out = p.a.cli(&args);
    if !out.status.success() {
        let e = stderr(&out);
        assert!(
            e.contains("VM vm1: this site is its") && e.contains("To fail back"),
            "{e}"
        );
    }
    assert_eq!(p.b.role(), "primary");
}
