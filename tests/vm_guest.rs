//! The vm crate against a real guest: the test guest (Debian kernel, busybox, qemu-ga) boots
//! under `qemu-system-x86_64 -accel tcg` from a VM definition, through the launcher, with its
//! disk on the tracker. One run of three boots checks what phase 2 (failover, app-consistent
//! points) builds on:
//!
//! 1. writer + guest agent: freeze through qemu-ga while the guest writes (status frozen,
//!    no file completes while frozen), thaw (status thawed, writing resumes), `freeze_then`;
//!    then QMP `system_powerdown` ends it cleanly (`PoweredDown`, the guest unmounted).
//! 2. writer again: it finds its filesystem and goes on numbering; then kill -9 of QEMU.
//! 3. checker (boot.sh, foreground): the journal needs recovery, every file the writer
//!    reported durable in boots 1 and 2 is there with its checksum, fsck is clean.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::guest::*;
use common::*;
use vmreplica_vm::{
    FreezeStatus, FreezeTimeouts, Instance, Network, RunState, StopOutcome, StopPolicy,
    VmDefinition,
};

const MIB: u64 = 1 << 20;
const BOOT: Duration = Duration::from_secs(120);

fn files_in(log: &std::path::Path) -> usize {
    files_written(&console_lines(log)).len()
}

/// The console log is read while QEMU writes it a few bytes at a time: a report still being
/// written must wait for the next read, and a line a kernel message broke into is no report
/// (CI once read `VMR-FILE 3 f3` without its checksum and the helper indexed past it).
#[test]
fn console_reports_are_read_only_when_whole() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let sha = "ab".repeat(32);
    std::fs::write(
        &log,
        format!("VMR-FILE 1 f1 {sha}\r\nVMR-FILE 2 f2 [  3.1] ata1: link up\nVMR-FILE 3 f3"),
    )
    .unwrap();
    let lines = console_lines(&log);
    assert_eq!(
        lines.len(),
        2,
        "the unterminated line is not read: {lines:?}"
    );
    let written = files_written(&lines);
    assert_eq!(written, [("f1".to_string(), sha.clone())].into());
    // The writer numbered two files although one report is broken: the next boot goes on
    // from 3, not from the count of reports plus one.
    assert_eq!(highest_seq(&lines), 2);

    std::fs::write(
        &log,
        format!("VMR-HAVE f1 {sha}\nVMR-HAVE f2\nVMR-HAVE f3 {sha}"),
    )
    .unwrap();
    assert_eq!(files_present(&console_lines(&log)), written);
    std::fs::write(&log, "VMR-FILE 1 f1").unwrap();
    assert!(console_lines(&log).is_empty());
}

#[test]
fn guest_agent_freezes_a_writing_guest_the_power_button_stops_it_and_every_synced_file_survives_kill_9(
) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "vm1-disk0.img", 256 * MIB);
    let t = TrackerProc::start(dir.path(), &[("disk0", &img)], &[]);
    let disks: BTreeMap<String, String> = [("disk0".to_string(), t.uri("disk0"))].into();
    let def = VmDefinition::load(&guest_definition(
        dir.path(),
        "vm1",
        "writer",
        "vmr.max_kib=32 vmr.pause_ms=50",
    ))
    .unwrap();
    let vm = Instance::new(dir.path().join("run"));
    let _guard = KillOnDrop(vm.clone());
    let console = vm.console_log();

    // Boot 1: the writer makes its filesystem and writes; the agent freezes it.
    let started = vm
        .start_definition(&def, disks.clone(), Network::Test, Duration::from_secs(60))
        .unwrap();
    assert_eq!(started.status, "running");
    let mut agent = vm.agent(BOOT).unwrap();
    agent.ping().unwrap();
    wait_files(&console, 5, BOOT);
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
    // Unfrozen, files complete in any 3 s: that is what the frozen window is compared with.
    let before = files_in(&console);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        files_in(&console) >= before + 3,
        "the writer is too slow to show a freeze"
    );

    let frozen = agent.fsfreeze_freeze(Duration::from_secs(60)).unwrap();
    assert!(frozen >= 1, "the agent froze {frozen} filesystems");
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Frozen);
    // A file in flight may finish its line; after that nothing completes while frozen.
    let at_freeze = files_in(&console);
    std::thread::sleep(Duration::from_secs(3));
    let while_frozen = files_in(&console);
    assert!(
        while_frozen <= at_freeze + 1,
        "{} files completed on a frozen filesystem",
        while_frozen - at_freeze
    );
    assert!(agent.fsfreeze_thaw(Duration::from_secs(30)).unwrap() >= 1);
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
    wait_files(&console, while_frozen + 3, BOOT);

    // The helper: frozen while the closure runs, thawed after.
    let r = agent
        .freeze_then(FreezeTimeouts::default(), || files_in(&console))
        .unwrap();
    assert!(r.filesystems >= 1);
    eprintln!(
        "freeze_then: {} filesystems frozen for at most {:?}",
        r.filesystems, r.frozen_for
    );
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
    wait_files(&console, r.value + 3, BOOT);
    drop(agent);

    let out = vm
        .stop(StopPolicy {
            powerdown: Duration::from_secs(90),
            ..StopPolicy::default()
        })
        .unwrap();
    assert!(matches!(out, StopOutcome::PoweredDown { .. }), "{out:?}");
    let boot1 = console_lines(&console);
    for want in [
        "VMR-MKFS",
        "VMR-POWERDOWN",
        "VMR-UMOUNT ok",
        "VMR-GUEST-DONE",
    ] {
        assert!(
            boot1.iter().any(|l| l == want),
            "boot 1 did not print {want}:\n{}",
            boot1.join("\n")
        );
    }
    let mut written = files_written(&boot1);
    assert_eq!(
        vm.state(Duration::from_secs(2)).unwrap(),
        RunState::NotRunning
    );

    // Boot 2: the writer continues on the same filesystem, then QEMU is killed.
    let started = vm
        .start_definition(&def, disks, Network::Test, Duration::from_secs(60))
        .unwrap();
    let boot2 = wait_files(&console, 5, BOOT);
    assert!(
        !boot2.iter().any(|l| l == "VMR-MKFS"),
        "boot 2 made a new filesystem"
    );
    let first2: u64 = tagged(&boot2, "VMR-FILE")[0][0].parse().unwrap();
    assert_eq!(
        first2,
        highest_seq(&boot1) + 1,
        "boot 2 did not continue the numbering"
    );
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(started.pid, libc::SIGKILL) };
    assert!(
        vm.wait_stopped(Duration::from_secs(10)).unwrap(),
        "QEMU survived SIGKILL"
    );
    let boot2 = console_lines(&console);
    written.extend(files_written(&boot2));

    // Boot 3: the checker, in the foreground through boot.sh.
    let gdir = guest_dir();
    run(Command::new("bash")
        .arg("scripts/guest/boot.sh")
        .arg(&gdir)
        .arg(t.uri("disk0"))
        .args(["check-files", "120"])
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    let check = console_lines(&gdir.join("console-check-files.log"));
    assert!(
        check.iter().any(|l| l == "VMR-JOURNAL needs-recovery"),
        "the journal was clean after kill -9:\n{}",
        check.join("\n")
    );
    assert!(
        check.iter().any(|l| l == "VMR-FSCK 0"),
        "{}",
        check.join("\n")
    );
    let present = files_present(&check);
    for (name, sum) in &written {
        assert_eq!(
            present.get(name),
            Some(sum),
            "{name}, reported durable by the writer, is missing or differs after kill -9"
        );
    }
    // At most the one file in flight at the kill is there beyond what the writer numbered
    // (counted by sequence number: a report a kernel message broke is skipped above).
    assert!(present.len() as u64 <= highest_seq(&boot2) + 1);
    eprintln!(
        "{} files written and checked ({} in boot 1)",
        written.len(),
        files_written(&boot1).len()
    );

    // The tracker has every byte the guest flushed: the image itself is a clean ext4.
    run(Command::new("e2fsck").arg("-fn").arg(&img));
    t.stop();
}
