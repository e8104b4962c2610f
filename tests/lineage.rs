//! Identity and lineage with the real processes: a tracker whose state directory was lost
//! and recreated, or restored from an older copy, and a replica store restored from an
//! older copy are all caught up by a checksum resync, never by releasing generations the
//! replica does not hold; the tracker's lineage controls (set-lineage, the proven release,
//! status, the version 1 migration); one shipper per tracker.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::site::*;
use common::*;
use serde_json::Value;

/// The generations the running tracker released (not merged), from its log since it
/// started.
fn released(t: &TrackerProc) -> Vec<u64> {
    let log = t.log_text();
    let since = log.rfind("tracker ready").unwrap_or(0);
    log[since..]
        .lines()
        .filter(|l| l.contains("generation ended") && l.contains("merge=false"))
        .map(|l| field(l, "generation"))
        .collect()
}

/// Copies directory `from` to `to` (a backup), preserving holes.
fn copy_dir(from: &Path, to: &Path) {
    run(Command::new("cp")
        .arg("-a")
        .arg("--sparse=always")
        .arg(from)
        .arg(to));
}

fn applier_status(site: &Site) -> Value {
    let out = stdout(
        Command::new(bin())
            .args(["applier", "status", "--store"])
            .arg(&site.store),
    );
    serde_json::from_str(&out).unwrap()
}

/// A tracker's state directory is lost and recreated (the tracker starts again at
/// generation 1, without a lineage) while the disk is written behind its back: the shipper
/// sets the tracker to the replica's lineage after the replica's last cycle and resyncs by
/// checksums; it never releases generations 1.. as if the replica held them.
#[test]
fn a_recreated_tracker_state_is_resynced_and_nothing_unshipped_is_released() {
    let (_dir, site, img, tracker) = small_site(4);
    let (config, mut applier, mut shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    for byte in [0x31u8, 0x32, 0x33] {
        let n = site.applied();
        run(Command::new("qemu-io")
            .args(["-f", "raw", &tracker.uri("sys")])
            .args(["-c", &format!("write -P {byte} 5M 64k")]));
        site.wait_cycles(n, 2, Duration::from_secs(60));
    }
    kill9(&mut shipper);
    let st = applier_status(&site);
    let lineage = st["vms"][0]["lineage"].as_str().unwrap().to_string();
    let last = st["vms"][0]["last_cycle"].as_u64().unwrap();
    assert!(last >= 4, "{st}");
    let state = tracker.state.clone();
    tracker.stop();
    std::fs::remove_dir_all(&state).unwrap();
    // Written while nothing tracks it, then through the new tracker.
    qemu_write(&img, 0x44, "7M", "128k");
    let tracker = TrackerProc::start(site.dir.as_path(), &[("sys", &img)], &[]);
    assert!(tracker.ctl(&["status"])["lineage"].is_null());
    run(Command::new("qemu-io")
        .args(["-f", "raw", &tracker.uri("sys")])
        .args(["-c", "write -P 0x45 9M 64k"]));
    let n = site.applied();
    let mut shipper = site.shipper(&config, &[]);
    site.wait_cycles(n, 1, Duration::from_secs(60));
    let line = site.applied_lines().swap_remove(n);
    assert_eq!(field::<String>(&line, "kind"), "Resync", "{line}");
    let cycle: u64 = field(&line, "cycle");
    assert!(
        cycle > last,
        "the resync reused cycle {cycle} (the replica was at {last})"
    );
    // Only the blocks that differ crossed the link: 128 KiB + 64 KiB.
    assert_eq!(field::<f64>(&line, "data_mib"), 0.2, "{line}");
    let rel = released(&tracker);
    assert!(
        rel.iter().all(|g| *g >= cycle),
        "the new tracker released generations {rel:?} before the resync {cycle}: unshipped changes lost\n{}",
        tracker.log_text()
    );
    let status = tracker.ctl(&["status"]);
    assert_eq!(
        status["lineage"].as_str(),
        Some(lineage.as_str()),
        "{status}"
    );
    site.assert_equal(&config, &img);
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

/// The replica store is restored from an older copy (the applier at cycle N again while the
/// tracker is well past it): the shipper resyncs by checksums instead of sending the next
/// delta (which the applier would refuse: it accepts a delta only as N + 1), and the replica
/// ends equal to the primary.
#[test]
fn a_restored_older_replica_store_is_resynced_not_silently_diverged() {
    let (dir, site, img, tracker) = small_site(4);
    let (config, mut applier, mut shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    kill9(&mut applier);
    let backup = dir.path().join("store-backup");
    copy_dir(&site.store, &backup);
    let old = applier_status_of(&backup);
    let mut applier = site.applier();
    for byte in [0x51u8, 0x52, 0x53] {
        let n = site.applied();
        run(Command::new("qemu-io")
            .args(["-f", "raw", &tracker.uri("sys")])
            .args(["-c", &format!("write -P {byte} {}M 64k", byte - 0x50)]));
        site.wait_cycles(n, 2, Duration::from_secs(60));
    }
    kill9(&mut shipper);
    kill9(&mut applier);
    std::fs::remove_dir_all(&site.store).unwrap();
    copy_dir(&backup, &site.store);
    let mut applier = site.applier();
    let n = site.applied();
    let mut shipper = site.shipper(&config, &[]);
    site.wait_cycles(n, 1, Duration::from_secs(60));
    let line = site.applied_lines().swap_remove(n);
    assert_eq!(
        field::<String>(&line, "kind"),
        "Resync",
        "restored from cycle {old}: {line}"
    );
    site.assert_equal(&config, &img);
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

fn applier_status_of(store: &Path) -> u64 {
    let out = stdout(
        Command::new(bin())
            .args(["applier", "status", "--store"])
            .arg(store),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["vms"][0]["last_cycle"].as_u64().unwrap()
}

/// The tracker's lineage controls: status reports lineage and next generation; a release by
/// hand needs --force (and says why); a release needs the replica's proof for exactly the
/// frozen generation; set-lineage is refused while a generation is frozen and over another
/// lineage unless forced, and forcing it marks every disk for resync.
#[test]
fn the_trackers_lineage_controls_refuse_what_would_lose_changes() {
    let (dir, _site, img, tracker) = small_site(1);
    let st = tracker.ctl(&["status"]);
    assert!(
        st["lineage"].is_null() && st["next_generation"] == 1,
        "{st}"
    );
    let a = "0123456789abcdef0123456789abcdef";
    let b = "fedcba9876543210fedcba9876543210";
    tracker.ctl(&["set-lineage", a, "--next-generation", "5"]);
    let st = tracker.ctl(&["status"]);
    assert!(st["lineage"] == a && st["next_generation"] == 5, "{st}");
    let g = tracker.ctl(&["freeze"]);
    assert_eq!(g["generation"], 5);
    let ctl = |args: &[&str]| {
        Command::new(bin())
            .arg("ctl")
            .arg("--socket")
            .arg(&tracker.control)
            .args(args)
            .output()
            .unwrap()
    };
    let refused = |args: &[&str], says: &str| {
        let out = ctl(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    };
    refused(&["set-lineage", a], "is frozen");
    refused(&["release", "5"], "merge 5");
    // The proof must name this lineage, this generation and this freeze.
    let call = |req: serde_json::Value| {
        vmreplica_tracker::control::call(&tracker.control, &serde_json::from_value(req).unwrap())
    };
    let id = g["id"].as_u64().unwrap();
    for (proof, says) in [
        (
            serde_json::json!({"lineage": b, "cycle": 5}),
            "not for generation 5",
        ),
        (
            serde_json::json!({"lineage": a, "cycle": 4}),
            "not for generation 5",
        ),
        (
            serde_json::json!({"lineage": a, "cycle": 5, "freeze": id ^ 1}),
            "another freeze",
        ),
        (
            serde_json::json!({"lineage": a, "cycle": 5}),
            "names no freeze",
        ),
    ] {
        let e = call(serde_json::json!({"op": "release", "generation": 5, "applied": proof}))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says) && e.contains("merge"), "{e}");
    }
    assert!(call(serde_json::json!({"op": "release", "generation": 5})).is_err());
    call(serde_json::json!({"op": "release", "generation": 5,
        "applied": {"lineage": a, "cycle": 5, "freeze": id}}))
    .unwrap();
    // Another lineage: refused, then forced (every disk then needs a resync).
    refused(&["set-lineage", b], "belongs to lineage");
    tracker.ctl(&["set-lineage", b, "--force"]);
    let st = tracker.ctl(&["status"]);
    assert_eq!(st["lineage"], b);
    assert_eq!(st["disks"][0]["resync_required"], true, "{st}");
    // A forced release by hand works (and is said in the log).
    let g = tracker.ctl(&["freeze"]);
    tracker.ctl(&["release", &g["generation"].to_string(), "--force"]);
    assert!(tracker
        .log_text()
        .contains("released without the replica's proof"));
    // Version 1 state files are migrated: no lineage, written back as version 2.
    let state = tracker.state.clone();
    tracker.stop();
    let p = state.join("tracker.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["version"] = 1.into();
    v["state"].as_object_mut().unwrap().remove("lineage");
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    assert!(tracker.ctl(&["status"])["lineage"].is_null());
    let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    assert_eq!(v["version"], 2);
    assert!(tracker.log_text().contains("migrated to version 2"));
    // An unknown version is refused.
    let tracker_state = tracker.state.clone();
    tracker.stop();
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["version"] = 9.into();
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = Command::new(bin())
        .args(["tracker", "--state-dir"])
        .arg(&tracker_state)
        .arg("--disk")
        .arg(format!("sys={}", img.display()))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("version 9"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two shippers on one tracker: the second is refused, naming the first's PID, and changes
/// nothing.
#[test]
fn a_second_shipper_on_one_tracker_is_refused() {
    let (_dir, site, _img, tracker) = small_site(1);
    let (config, mut applier, mut shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    let out = Command::new(bin())
        .args(["shipper", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!("PID {}", shipper.0.id()))
            && err.contains("one shipper per tracker"),
        "{err}"
    );
    let n = site.applied();
    site.wait_cycles(n, 1, Duration::from_secs(30));
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}
