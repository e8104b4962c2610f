//! Application-consistent points with a real guest (Debian kernel, busybox, qemu-ga over
//! virtio-serial, under `qemu-system-x86_64 -accel tcg`) writing files on its disk served by
//! the tracker: the shipper freezes the guest's filesystems through the agent for its first
//! freeze (`app_consistent_every`), and later cycles are crash-consistent. The exported
//! application-consistent point mounts without journal recovery; a crash-consistent point
//! taken while the guest writes needs it. The guest is frozen for milliseconds, and status,
//! `points` and the events say so.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::guest::*;
use common::site::*;
use common::*;
use serde_json::Value;
use vmreplica_vm::{Instance, Network, VmDefinition};

const BOOT: Duration = Duration::from_secs(180);

/// Boots the checker on `img` (served by a tracker of its own): its console lines.
fn check_files(dir: &Path, img: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let t = TrackerProc::start(dir, &[("disk0", img)], &[]);
    let gdir = guest_dir();
    let out = dir.join("guest");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["bzImage", "initramfs.cpio.gz"] {
        std::os::unix::fs::symlink(gdir.join(f), out.join(f)).unwrap();
    }
    run(Command::new("bash")
        .arg("scripts/guest/boot.sh")
        .arg(&out)
        .arg(t.uri("disk0"))
        .args(["check-files", "150"])
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    t.stop();
    console_lines(&out.join("console-check-files.log"))
}

#[test]
fn an_app_consistent_point_mounts_without_journal_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run-registry");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::env::set_var("VMREPLICA_RUN_DIR", &run_dir);
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "vm1-disk0.img", 128 * MIB);
    let t = TrackerProc::start(dir.path(), &[("disk0", &img)], &[]);
    let disks: BTreeMap<String, String> = [("disk0".to_string(), t.uri("disk0"))].into();
    let def = VmDefinition::load(&guest_definition(
        dir.path(),
        "vm1",
        "writer",
        "vmr.max_kib=16 vmr.pause_ms=100",
    ))
    .unwrap();
    let vm = Instance::new(dir.path().join("vm"));
    let _guard = KillOnDrop(vm.clone());
    vm.start_definition(&def, disks, Network::Test, Duration::from_secs(60))
        .unwrap();
    // The agent answers and the writer has its filesystem: replication starts.
    vm.agent(BOOT).unwrap().ping().unwrap();
    wait_files(&vm.console_log(), 3, BOOT);
    let config = site.config_via(
        &t,
        &format!("127.0.0.1:{}", site.port),
        &format!(
            "guest_agent = \"{}\"\napp_consistent_every = \"1h\"\n",
            vm.agent_socket().display()
        ),
    );
    let _applier = site.applier();
    let _shipper = site.shipper(&config, &[]);
    // The initial copy (app-consistent), then deltas while the guest writes.
    site.wait_cycles(0, 4, BOOT);
    let points = stdout(
        Command::new(bin())
            .args(["applier", "points", "vm1", "--store"])
            .arg(&site.store),
    );
    let rows: Vec<Vec<&str>> = points
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][0], "1", "{points}");
    assert_eq!(rows[0][5], "application", "{points}");
    let crash = rows
        .iter()
        .skip(1)
        .find(|r| r[5] == "crash")
        .unwrap_or_else(|| panic!("no crash-consistent point while writing:\n{points}"));
    let crash_point = crash[0].to_string();

    // Status: the guest was frozen for a few milliseconds.
    let out = Command::new(bin())
        .args(["status", "vm1", "--json"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["site"] == "primary")
        .unwrap();
    let frozen_ms = p["app_consistent"]["last_frozen_ms"].as_u64().unwrap();
    assert!(frozen_ms < 5000, "frozen {frozen_ms} ms");
    assert_eq!(p["app_consistent"]["every_seconds"], 3600);
    let rep = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["site"] == "replica")
        .unwrap();
    assert_eq!(rep["app_consistent"]["last_cycle"], 1, "{rep}");
    eprintln!("the guest was frozen for {frozen_ms} ms for the application-consistent point");
    let ev = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap();
    assert!(ev.contains("\"app-consistent-freeze\""), "{ev}");

    // Export both points while cycles go on landing, and check them in the guest.
    for (point, want) in [("1", "clean"), (crash_point.as_str(), "needs-recovery")] {
        let out = dir.path().join(format!("export-{point}"));
        run(Command::new(bin())
            .args(["applier", "export", "vm1", "--store"])
            .arg(&site.store)
            .args(["--point", point, "--out"])
            .arg(&out));
        let lines = check_files(
            &dir.path().join(format!("check-{point}")),
            &out.join("disk0.img"),
        );
        assert!(
            lines.iter().any(|l| l == &format!("VMR-JOURNAL {want}")),
            "point {point} should be {want}:\n{}",
            lines.join("\n")
        );
        assert!(
            lines.iter().any(|l| l == "VMR-FSCK 0"),
            "{}",
            lines.join("\n")
        );
    }
    t.stop();
}
