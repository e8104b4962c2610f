//! Failover with a real guest (TCG): each kind brings the test guest up on the other site
//! and its checker finds every file the writer reported durable. Four boots:
//!
//! 1. site A: the writer, replicated to site B;
//! 2. planned failover A → B through the guest's QMP (power button): site B's applier starts
//!    the checker, which finds every file (the journal clean); the disks are identical;
//! 3. planned failback B → A: the disks are identical again; the writer starts on site A,
//!    on the tracker site A's applier runs, and goes on numbering its files (replicated to
//!    site B);
//! 4. kill -9 of every site A process mid-cycle (QEMU, tracker, shipper, applier), unplanned
//!    failover on site B with the checker: the journal recovers, every file reported durable
//!    before the last cycle that landed is there.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::guest::*;
use common::sites::*;
use vmreplica_vm::{Instance, Network, VmDefinition};

const BOOT: Duration = Duration::from_secs(240);

/// The test guest's definition in `mode`, its disk named `sys`.
fn definition(dir: &Path, mode: &str, args: &str) -> std::path::PathBuf {
    let p = guest_definition(dir, &format!("vm1-{mode}"), mode, args);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("disk0", "sys")
        .replace(&format!("name = \"vm1-{mode}\""), "name = \"vm1\"");
    std::fs::write(&p, text).unwrap();
    p
}

/// Waits until the console shows `line`.
fn wait_line(log: &Path, line: &str, limit: Duration) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let lines = console_lines(log);
        if lines.iter().any(|l| l == line) {
            return lines;
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("VMR-GUEST-FAIL")),
            "the guest failed:\n{}",
            lines.join("\n")
        );
        assert!(
            t0.elapsed() < limit,
            "no {line} after {limit:?}; console {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_files(check: &[String], written: &std::collections::BTreeMap<String, String>) {
    assert!(
        check.iter().any(|l| l == "VMR-FSCK 0"),
        "{}",
        check.join("\n")
    );
    let present = files_present(check);
    for (name, sum) in written {
        assert_eq!(
            present.get(name),
            Some(sum),
            "{name}, reported durable by the writer, is missing or differs"
        );
    }
}

#[test]
fn planned_failover_failback_and_unplanned_failover_of_a_writing_guest() {
    let mut p = Pair::sized(128, 0, None);
    let writer = definition(p.dir.path(), "writer", "vmr.max_kib=32 vmr.pause_ms=100");
    let checker = definition(p.dir.path(), "check-files", "");
    // Boot 1: the writer on site A.
    p.start_shipper();
    p.wait_cycles(0, 1);
    let vm_a = Instance::new(p.a.dir.join("run"));
    let _k1 = KillOnDrop(vm_a.clone());
    let uris = [("sys".to_string(), p.tracker.as_ref().unwrap().uri("sys"))].into();
    vm_a.start_definition(
        &VmDefinition::load(&writer).unwrap(),
        uris,
        Network::Test,
        Duration::from_secs(60),
    )
    .unwrap();
    wait_files(&vm_a.console_log(), 8, BOOT);
    // 2. Planned failover A → B: the power button through QMP; site B starts the checker.
    let cfg = p.config.to_str().unwrap().to_string();
    let qmp = vm_a.qmp_socket();
    p.a.cli_ok(&[
        "failover",
        "planned",
        "vm1",
        "--config",
        &cfg,
        "--qmp",
        qmp.to_str().unwrap(),
        "--definition",
        checker.to_str().unwrap(),
    ]);
    let boot1 = console_lines(&vm_a.console_log());
    assert!(
        boot1.iter().any(|l| l == "VMR-UMOUNT ok"),
        "{}",
        boot1.join("\n")
    );
    let mut written = files_written(&boot1);
    let vm_b = Instance::new(p.b.primary_dir().join("run"));
    let _k2 = KillOnDrop(vm_b.clone());
    let check = wait_line(&vm_b.console_log(), "VMR-GUEST-DONE", BOOT);
    assert!(check.iter().any(|l| l == "VMR-JOURNAL clean"));
    assert_files(&check, &written);
    assert!(vm_b.wait_stopped(Duration::from_secs(60)).unwrap());
    assert_eq!(
        sha(&p.img),
        sha(&p.b.image("sys")),
        "the disks differ after the planned failover"
    );
    p.a.wait_role("replica", Duration::from_secs(90));
    // 3. Failback B → A (the checker is off): identical disks, then the writer on site A.
    p.b.fail_back_planned();
    assert_eq!(
        sha(&p.img),
        sha(&p.b.image("sys")),
        "the disks differ after the failback"
    );
    let uris = [("sys".to_string(), p.a.uri("sys"))].into();
    vm_a.start_definition(
        &VmDefinition::load(&writer).unwrap(),
        uris,
        Network::Test,
        Duration::from_secs(60),
    )
    .unwrap();
    let boot3 = wait_files(&vm_a.console_log(), 4, BOOT);
    assert!(
        !boot3.iter().any(|l| l == "VMR-MKFS"),
        "boot 3 made a new filesystem"
    );
    let first: u64 = tagged(&boot3, "VMR-FILE")[0][0].parse().unwrap();
    assert_eq!(
        first,
        highest_seq(&boot1) + 1,
        "boot 3 did not go on numbering"
    );
    // The files reported so far are in the replica once two more cycles landed (the second
    // one was frozen after this instant).
    let durable = files_written(&console_lines(&vm_a.console_log()));
    let shipped = applied_in(&p.a.primary_log("shipper"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while applied_in(&p.a.primary_log("shipper")) < shipped + 2 {
        assert!(
            Instant::now() < deadline,
            "site A's shipper does not replicate:\n{}",
            common::site::tail(&p.a.primary_log("shipper"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // 4. Site A is gone: kill -9 of QEMU, its tracker and shipper, its applier.
    let pa = p.a.primary_dir();
    kill_holder(&pa.join("tracker/shipper.lock"));
    if let Some(pid) = vm_a.pid().unwrap() {
        // SAFETY: kill(2) on the QEMU this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    kill_holder(&pa.join("tracker/lock"));
    p.kill_applier('a');
    written.extend(durable);
    p.b.cli_ok(&[
        "failover",
        "unplanned",
        "vm1",
        "--start",
        "--definition",
        checker.to_str().unwrap(),
    ]);
    let check = wait_line(&vm_b.console_log(), "VMR-GUEST-DONE", BOOT);
    assert!(
        check.iter().any(|l| l == "VMR-JOURNAL needs-recovery"),
        "the journal was clean after kill -9:\n{}",
        check.join("\n")
    );
    assert_files(&check, &written);
    eprintln!(
        "{} files checked on site B after the unplanned failover",
        written.len()
    );
}
