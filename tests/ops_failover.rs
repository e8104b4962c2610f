//! Where operations meet failover, with the two-site fixture (`common::sites`): an excluded
//! disk on a real failover (unplanned, reverse, planned failback), and `vmreplica status` of
//! a failed-over VM.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::sites::*;
use common::*;
use serde_json::Value;

const SWAP_MIB: u64 = 6;

/// Site A's tracker serves `sys` and an excluded `swap` (written full of 0x5a).
fn pair_with_swap() -> (Pair, std::path::PathBuf) {
    let mut p = Pair::new(4, None);
    p.tracker.take().unwrap().stop();
    // Nothing was shipped yet: a tracker state for the two disks afresh.
    std::fs::remove_dir_all(p.a.dir.join("state")).unwrap();
    let swap = image(&p.a.dir, "vm1-swap.img", SWAP_MIB * MIB);
    std::fs::write(&swap, vec![0x5a; (SWAP_MIB * MIB) as usize]).unwrap();
    p.tracker = Some(TrackerProc::start(
        &p.a.dir,
        &[("sys", &p.img), ("swap", &swap)],
        &["--exclude", "swap"],
    ));
    p.write_config("");
    (p, swap)
}

/// `vmreplica status vm1 --json` on a site: vm1's entries (one per role on that host).
fn status(s: &SiteDir) -> Vec<Value> {
    let v: Value = serde_json::from_str(&s.cli_ok(&["status", "vm1", "--json"])).unwrap();
    v["vms"].as_array().cloned().unwrap_or_default()
}

/// The excluded disk `swap` as a site's applier serves it after a failover: the size of the
/// primary's, all zeroes, and its image sparse (no block allocated).
fn assert_swap_blank(p: &Pair, s: &SiteDir, when: &str) {
    let uri = s.uri("swap");
    let data = p.nbd_read(&uri);
    assert_eq!(
        data.len() as u64,
        SWAP_MIB * MIB,
        "{when}: swap served at the wrong size"
    );
    assert!(
        data.iter().all(|b| *b == 0),
        "{when}: swap is not served blank"
    );
    let img = s.primary_dir().join("excluded/swap.img");
    let m = std::fs::metadata(&img).unwrap();
    assert_eq!(m.len(), SWAP_MIB * MIB, "{when}: {}", img.display());
    assert_eq!(m.blocks(), 0, "{when}: {} is not sparse", img.display());
}

/// An excluded disk is recreated blank, sparse and of its size on a real failover, so the
/// VM boots: an unplanned failover serves it (and the VM's definition gets its URI); the
/// shipper that replicates back excludes it (the reverse cycle carries none of it, and the
/// old primary's copy is left alone); a planned failback serves it blank on the old
/// primary too.
#[test]
fn an_excluded_disk_is_served_blank_on_failover_and_never_shipped_back() {
    let (mut p, swap) = pair_with_swap();
    p.start_shipper();
    p.wait_cycles(0, 2);
    p.kill_primary();
    let out = p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    assert!(
        out.contains(&format!("  swap: {}", p.b.uri("swap"))),
        "the excluded disk's URI is not given: {out}"
    );
    assert_swap_blank(&p, &p.b, "unplanned failover");
    // The failed-over VM uses its swap; the tracker serves it without tracking it.
    Pair::nbd_write(&p.b.uri("swap"), 0x77, MIB, 2 * MIB);
    Pair::nbd_write(&p.b.uri("sys"), 0x31, 2 * MIB, MIB);
    let st = status(&p.b);
    let disks = &st[0]["disks"];
    assert!(
        disks
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "swap" && d["excluded"] == true),
        "{st:?}"
    );
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    // Site A returns: reverse. Its record holds only the replicated disk, and its swap image
    // is not touched by the reverse cycle.
    p.tracker = Some(TrackerProc::start(
        &p.a.dir,
        &[("sys", &p.img), ("swap", &swap)],
        &["--exclude", "swap"],
    ));
    p.write_config("");
    p.a.cli_ok(&["reverse", "vm1", "--config", p.config.to_str().unwrap()]);
    p.a.wait_role("replica", Duration::from_secs(90));
    let rec = p.a.record();
    assert!(!p.a.cli_ok(&["applier", "points", "vm1"]).contains("swap"));
    let a_status = status(&p.a);
    let replica = a_status
        .iter()
        .find(|v| v["site"] == "replica")
        .unwrap_or_else(|| panic!("{a_status:?}"));
    let names: Vec<(String, bool)> = replica["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["excluded"] == true,
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![("sys".to_string(), false), ("swap".to_string(), true)],
        "site A's record after the reverse cycle: {rec}"
    );
    let a_swap = std::fs::read(&swap).unwrap();
    assert!(
        a_swap.iter().all(|b| *b == 0x5a),
        "the reverse cycle wrote site A's excluded disk"
    );
    assert!(
        p.b.primary_log("shipper")
            .contains("cycle applied on the replica"),
        "{}",
        p.b.primary_log("shipper")
    );
    // `vmreplica set` of the interval on the site replicating back writes the shipper's
    // file, which the applier rewrites at its start: what was set stays.
    let cfg_b = p.b.primary_dir().join("shipper.toml");
    run(std::process::Command::new(bin())
        .args(["set", "vm1", "interval=7s", "--config"])
        .arg(&cfg_b));
    let ino = std::fs::metadata(&cfg_b).unwrap().ino();
    p.start_applier('b', &[]);
    // Rewritten (atomically: a new inode) once the applier has found its processes again.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&cfg_b).map(|m| m.ino()).unwrap_or(ino) == ino {
        assert!(
            std::time::Instant::now() < deadline,
            "site B's applier never rewrote {}",
            cfg_b.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&cfg_b).unwrap();
    assert!(
        text.contains("interval = \"7s\""),
        "the applier's rewrite lost the interval set: {text}"
    );
    // Planned failback: site A is the primary again; its swap is recreated blank.
    p.b.fail_back_planned();
    assert_eq!(p.a.role(), "primary");
    assert_swap_blank(&p, &p.a, "planned failback");
    assert_eq!(p.nbd_read(&p.a.uri("sys"))[2 * MIB as usize], 0x31);
}

/// vm1's entry as the replica site's applier reports it.
fn replica_entry(s: &SiteDir) -> Value {
    let all = status(s);
    all.iter()
        .find(|v| v["site"] == "replica")
        .cloned()
        .unwrap_or_else(|| panic!("no replica entry: {all:?}"))
}

/// `vmreplica status` on the replica site shows a test failover (state, point, since, NBD
/// URIs), then a failover and its sub-state; a failed-over VM's health does not turn
/// Critical because no cycle arrives any more (its RPO is the new primary's).
#[test]
fn status_shows_test_failover_and_failover_and_a_failed_over_vm_is_not_critical() {
    let mut p = Pair::new(4, None);
    p.write_config("rpo_limit = \"2s\"\n");
    p.start_shipper();
    p.wait_cycles(0, 2);
    p.b.cli_ok(&["failover", "test", "vm1"]);
    let v = replica_entry(&p.b);
    assert_eq!(v["state"], "test-failover", "{v}");
    let t = &v["test_failovers"][0];
    assert!(t["point"].as_u64().unwrap() >= 1, "{v}");
    assert!(t["since"].as_u64().unwrap() > 0, "{v}");
    let uri = t["disks"][0]["uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("nbd+unix:///sys?socket="), "{v}");
    assert_eq!(
        p.nbd_read(&uri).len() as u64,
        32 * MIB,
        "the URI status gives is served"
    );
    let text = p.b.cli_ok(&["status", "vm1"]);
    eprintln!("--- status (replica site) during a test failover:\n{text}");
    assert!(text.contains("test failover of point"), "{text}");
    assert!(text.contains(&uri), "{text}");
    p.b.cli_ok(&["failover", "test-stop", "vm1", "--all"]);
    assert_eq!(replica_entry(&p.b)["test_failovers"], serde_json::json!([]));
    // The primary is lost; past the RPO limit the replica is Critical (replication stopped).
    p.kill_primary();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(replica_entry(&p.b)["health"]["level"], "critical");
    p.b.cli_ok(&["failover", "unplanned", "vm1"]);
    let v = replica_entry(&p.b);
    assert_eq!(v["state"], "failed-over", "{v}");
    assert_eq!(v["failover"]["sub_state"], "awaiting-commit", "{v}");
    assert!(v["failover"]["lineage"].is_string(), "{v}");
    assert_eq!(
        v["health"]["level"], "warning",
        "a failed-over VM is judged by what is left to do, not by the cycles it no longer \
         gets: {v}"
    );
    assert!(
        v["health"]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("not committed"),
        "{v}"
    );
    assert!(v["rpo_seconds"].is_null(), "{v}");
    // The point is the recovery point failed over to (the newest), before the commit and
    // after it, also when cycles after it were empty (they left the images as they were).
    let point = v["failover"]["point"].as_u64().unwrap();
    assert_eq!(Some(point), v["latest_point"]["cycle"].as_u64(), "{v}");
    let text = p.b.cli_ok(&["status", "vm1"]);
    eprintln!("--- status (replica site) failed over, not committed:\n{text}");
    assert!(
        text.contains(&format!("failover: awaiting commit (point {point},")),
        "{text}"
    );
    assert!(
        text.contains("vm1 (failover site): failed over") && !text.contains("(replica site)"),
        "the VM runs on this site: it is no replica site any more: {text}"
    );
    p.b.cli_ok(&["failover", "commit", "vm1"]);
    let v = replica_entry(&p.b);
    assert_eq!(
        (v["state"].as_str(), v["failover"]["sub_state"].as_str()),
        (Some("failed-over"), Some("committed")),
        "{v}"
    );
    assert_eq!(v["failover"]["point"], point, "{v}");
    assert_ne!(v["health"]["level"], "critical", "{v}");
    let text = p.b.cli_ok(&["status", "vm1"]);
    eprintln!("--- status (replica site) failed over, committed:\n{text}");
    assert!(
        text.contains(&format!("failover: committed (point {point},"))
            && text.contains("vm1 (new primary site): failed over")
            && text.contains("role primary")
            && !text.contains("(replica site)"),
        "{text}"
    );
    eprintln!(
        "--- status --json (replica site) failed over, committed:\n{}",
        p.b.cli_ok(&["status", "vm1", "--json"])
    );
}
