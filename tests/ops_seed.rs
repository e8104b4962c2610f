//! Initial replication without the WAN: a seed exported while the guest writes, imported on
//! the replica site, after which the first cycle is a delta of exactly the writes since the
//! seed was frozen; a damaged seed refused naming the file and the range; an existing copy
//! adopted and brought up to date by a checksum resync of only the blocks that differ.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::site::*;
use common::*;
use serde_json::Value;

fn run_dir(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("run");
    std::fs::create_dir_all(&d).unwrap();
    std::env::set_var("VMREPLICA_RUN_DIR", &d);
    d
}

fn events(run: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(run.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == name && e["source"] != "applier")
        .collect()
}

fn fails(args: &[&str], store: &Path) -> String {
    let out = Command::new(bin())
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_seed_exported_while_writing_carries_the_initial_copy_and_a_damaged_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = run_dir(dir.path());
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 64 * MIB);
    fill_random(&img, 16);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let config = site.config(&tracker);
    let seed = dir.path().join("seed");

    // Exported while a guest writes (fio through the tracker, for 4 s).
    let mut writer = fio(&tracker.uri("sys"), 4);
    std::thread::sleep(Duration::from_millis(500));
    let out = stdout(
        Command::new(bin())
            .args(["seed", "export", "vm1", "--out"])
            .arg(&seed)
            .arg("--config")
            .arg(&config),
    );
    assert!(out.contains("seed of generation 1"), "{out}");
    assert!(writer.wait().success());
    let m: Value =
        serde_json::from_slice(&std::fs::read(seed.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (m["format"].as_str(), m["vm"].as_str()),
        (Some("vmreplica-seed"), Some("vm1"))
    );
    assert_eq!(m["owner"], "primary-1");
    let st = tracker.ctl(&["status"]);
    assert!(
        st["frozen"].is_null(),
        "the seed's generation was released: {st}"
    );
    assert_eq!(st["lineage"], m["lineage"]);
    let dirty = st["disks"][0]["dirty_blocks"].as_u64().unwrap() * 65536;
    assert!(dirty > 0, "the writes after the freeze stay dirty");
    assert!(
        allocated(&seed.join("sys.img")) < 40 * MIB,
        "the seed is sparse"
    );

    // A damaged seed is refused, naming the file and the range; nothing is installed.
    let bad = dir.path().join("seed-bad");
    std::fs::create_dir(&bad).unwrap();
    for f in ["manifest.json", "sys.img", "sys.sums"] {
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(seed.join(f))
            .arg(bad.join(f)));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(bad.join("sys.img"))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, (1 << 20) + 100).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], (1 << 20) + 100).unwrap();
    }
    let e = fails(
        &["seed", "import", "vm1", "--from", bad.to_str().unwrap()],
        &site.store,
    );
    assert!(
        e.contains(&bad.join("sys.img").display().to_string())
            && e.contains("bytes 1048576..1114112")
            && e.contains("damaged"),
        "{e}"
    );
    assert!(!site.store.join("vm1").exists());
    std::fs::write(bad.join("sys.sums"), b"short").unwrap();
    let e = fails(
        &["seed", "import", "vm1", "--from", bad.to_str().unwrap()],
        &site.store,
    );
    assert!(e.contains("sys.sums"), "{e}");

    // A seed of another VM (the wrong disk from the shelf) is refused, naming both.
    let e = fails(
        &["seed", "import", "vm2", "--from", seed.to_str().unwrap()],
        &site.store,
    );
    assert!(e.contains("is of VM vm1"), "{e}");
    assert!(!site.store.join("vm2").exists());

    // The good seed; then replication ships only what changed since its freeze.
    let out = stdout(
        Command::new(bin())
            .args(["seed", "import", "vm1", "--from"])
            .arg(&seed)
            .arg("--store")
            .arg(&site.store),
    );
    assert!(out.contains("seed installed as point 1"), "{out}");
    let e = fails(
        &["seed", "import", "vm1", "--from", seed.to_str().unwrap()],
        &site.store,
    );
    assert!(e.contains("holds a replica of it already"), "{e}");
    let _applier = site.applier();
    let _shipper = site.shipper(&config, &[]);
    site.wait_cycles(0, 2, Duration::from_secs(60));
    let applied = events(&rundir, "cycle-applied");
    assert_eq!(applied[0]["kind"], "delta", "{applied:?}");
    assert_eq!(applied[0]["cycle"], 2);
    assert_eq!(
        applied[0]["bytes"].as_u64().unwrap(),
        dirty,
        "the first delta is exactly the writes since the seed"
    );
    assert!(events(&rundir, "initial-copy-started").is_empty());
    assert!(events(&rundir, "resync-started").is_empty());
    site.assert_equal(&config, &img);
    tracker.stop();
}

#[test]
fn an_existing_copy_is_adopted_and_only_the_differing_blocks_travel() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = run_dir(dir.path());
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 32 * MIB);
    fill_random(&img, 8);
    // A backup taken earlier; the primary moved on by 1 MiB since.
    let backup = dir.path().join("backup.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&backup));
    qemu_write(&img, 0x77, "4M", "1M");
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let out = stdout(
        Command::new(bin())
            .args(["seed", "adopt", "vm1", "--disk"])
            .arg(format!("sys={}", backup.display()))
            .args(["--owner", "primary-1", "--store"])
            .arg(&site.store),
    );
    assert!(out.contains("adopted"), "{out}");
    let (config, _applier, _shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 2, Duration::from_secs(60));
    let applied = events(&rundir, "cycle-applied");
    assert_eq!(applied[0]["kind"], "resync", "{applied:?}");
    assert_eq!(
        applied[0]["bytes"].as_u64().unwrap(),
        MIB,
        "only the blocks that differ travel"
    );
    site.assert_equal(&config, &img);
    tracker.stop();
}
