//! A real guest (TCG) through a test failover: on the primary, the test guest's writer makes
//! ext4 files on its disk (served by the tracker) and reports each one once fsynced, while
//! the shipper replicates and ships the VM's definition (which boots the checker). Then, with
//! the writer still running, `vmreplica failover test vm1 --start` boots the definition on the
//! replica site from the newest point: the checker replays the journal and finds every file
//! the writer reported before that point, with its checksum. Its writes (the journal replay)
//! go to the scratch overlay: replication went on, and the replica still equals the primary.
//! The applier is killed (-9) and restarted while the test VM boots: the VM, detached, keeps
//! running, the new applier finds it, and its disk reconnects.

mod common;

use std::time::Duration;

use common::guest::*;
use common::site::*;
use common::testfo::*;
use common::*;
use vmreplica_vm::{Instance, Network, VmDefinition};

const BOOT: Duration = Duration::from_secs(180);
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_guest_boots_from_a_test_failover_and_finds_every_file_synced_before_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "vm1-disk0.img", 256 * MIB);
    let tracker = TrackerProc::start(dir.path(), &[("disk0", &img)], &[]);
    for d in ["primary", "shipped"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let writer = VmDefinition::load(&guest_definition(
        &dir.path().join("primary"),
        "vm1",
        "writer",
        "vmr.max_kib=32 vmr.pause_ms=50",
    ))
    .unwrap();
    // What the replica site starts: the same VM, booting the checker (its disk reconnects
    // when the NBD server restarts, as dist/vm1.toml's do).
    let shipped = guest_definition(&dir.path().join("shipped"), "vm1", "check-files", "");
    let text = std::fs::read_to_string(&shipped).unwrap().replace(
        "file=${disk:disk0},",
        "file=${disk:disk0},file.reconnect-delay=30,",
    );
    std::fs::write(&shipped, text).unwrap();
    let config = site.config_with(
        &tracker,
        "1s",
        &format!("definition = \"{}\"\n", shipped.display()),
    );
    let mut applier = site.applier();
    let _shipper = site.shipper(&config, &[]);

    let vm = Instance::new(dir.path().join("run"));
    let _vm_guard = KillOnDrop(vm.clone());
    let disks = [("disk0".to_string(), tracker.uri("disk0"))].into();
    vm.start_definition(&writer, disks, Network::Test, Duration::from_secs(60))
        .unwrap();
    wait_files(&vm.console_log(), 8, BOOT);
    let written = files_written(&console_lines(&vm.console_log()));
    // Two cycles after: the second one's freeze came after every file reported so far.
    let n = site.applied();
    site.wait_cycles(n, 2, LIMIT);

    let t = start_test(&site.store, "vm1", &["--start"]);
    let point = t["point"].as_u64().unwrap();
    assert!(t["qemu"]["pid"].as_i64().is_some(), "{t}");
    let run_dir = site.store.join(format!("vm1/tests/{point}/vm"));
    let _test_guard = KillOnDrop(Instance::new(&run_dir));
    let pid = t["qemu"]["pid"].as_i64().unwrap();
    // The applier dies and comes back while the test VM boots: the VM stays, and is found.
    applier.kill();
    applier = site.applier();
    let listed = wait_tests_served(&site.store, 1, LIMIT);
    assert_eq!(listed[0]["qemu"]["pid"].as_i64(), Some(pid), "{listed:?}");
    let console = run_dir.join("console.log");
    let deadline = std::time::Instant::now() + BOOT;
    let lines = loop {
        let lines = console_lines(&console);
        if lines.iter().any(|l| l.starts_with("VMR-FSCK")) {
            break lines;
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("VMR-GUEST-FAIL")),
            "the test VM failed:\n{}",
            lines.join("\n")
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the test VM did not check its files within {BOOT:?}:\n{}",
            lines.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        lines.iter().any(|l| l == "VMR-FSCK 0"),
        "{}",
        lines.join("\n")
    );
    let present = files_present(&lines);
    for (name, sum) in &written {
        assert_eq!(
            present.get(name),
            Some(sum),
            "{name}, synced on the primary before point {point}, is missing or differs in the \
             test failover"
        );
    }
    eprintln!(
        "point {point}: {} files present, {} reported before it; journal: {:?}",
        present.len(),
        written.len(),
        lines.iter().find(|l| l.starts_with("VMR-JOURNAL"))
    );
    // The writer went on meanwhile, and so did replication.
    let more = files_written(&console_lines(&vm.console_log())).len();
    assert!(more > written.len(), "the primary's guest stopped writing");

    run(std::process::Command::new(bin())
        .args(["failover", "test-stop", "vm1", "--store"])
        .arg(&site.store));
    assert!(!run_dir.exists());
    // The primary's guest stops; the replica catches up and equals it: the test VM's journal
    // replay never reached it.
    if let Ok(Some(pid)) = vm.pid() {
        // SAFETY: kill(2) on the QEMU this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(vm.wait_stopped(Duration::from_secs(10)).unwrap());
    let n = site.applied();
    site.wait_cycles(n, 2, LIMIT);
    site.assert_equal_disk(&config, &img, "disk0");
    drop(applier);
}
