//! Test failovers through the real command line (`vmreplica failover ...`, the applier's
//! admin socket), and reading what they serve with real NBD clients.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// `vmreplica ARGS --store STORE`, whatever its outcome.
pub fn vmr_store(store: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap()
}

/// Starts a test failover of `vm` (extra `args`: `--point N`, `--start`, ...); returns the
/// applier's description of it. Fails the test if it is refused.
pub fn start_test(store: &Path, vm: &str, args: &[&str]) -> Value {
    let mut a = vec!["failover", "test", vm, "--json"];
    a.extend_from_slice(args);
    let out = vmr_store(store, &a);
    assert!(
        out.status.success(),
        "failover test {vm} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The error a refused `vmreplica ARGS --store STORE` prints (it must fail).
pub fn refused(store: &Path, args: &[&str]) -> String {
    let out = vmr_store(store, args);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The unix NBD URI of `disk` in a test failover's description.
pub fn disk_uri(t: &Value, disk: &str) -> String {
    t["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == disk)
        .and_then(|d| d["uri"].as_str())
        .unwrap_or_else(|| panic!("no disk {disk} in {t}"))
        .to_string()
}

/// The test failovers the applier of `store` lists.
pub fn tests_listed(store: &Path) -> Vec<Value> {
    let out = run(Command::new(bin())
        .args(["failover", "tests", "--json", "--store"])
        .arg(store));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the applier of `store` answers and serves `n` test failovers.
pub fn wait_tests_served(store: &Path, n: usize, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let out = Command::new(bin())
            .args(["failover", "tests", "--json", "--store"])
            .arg(store)
            .output()
            .unwrap();
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let all = v.as_array().cloned().unwrap_or_default();
            if all.iter().filter(|t| t["disks"].is_array()).count() >= n {
                return all;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the applier of {} did not serve {n} test failovers within {limit:?}",
            store.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes point `point` of `vm` out with `vmreplica applier export` into `out`; returns
/// the image of `disk`.
pub fn export_point(store: &Path, vm: &str, point: u64, out: &Path, disk: &str) -> PathBuf {
    run(Command::new(bin())
        .args([
            "applier",
            "export",
            vm,
            "--point",
            &point.to_string(),
            "--out",
        ])
        .arg(out)
        .arg("--store")
        .arg(store));
    out.join(format!("{disk}.img"))
}

/// The recovery points of `vm`.
pub fn points(store: &Path, vm: &str) -> Vec<u64> {
    let out = stdout(
        Command::new(bin())
            .args(["applier", "points", vm, "--store"])
            .arg(store),
    );
    out.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Whether the image at `img` equals what `uri` serves (`qemu-img compare`).
pub fn same_as_served(img: &Path, uri: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(img)
        .arg(uri)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {uri}: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Whether `nbdcopy` of `uri` (libnbd) gives exactly the bytes of `img`.
pub fn nbdcopy_equals(uri: &str, img: &Path) -> bool {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("nbdcopy '{uri}' - | cmp -s - '{}'", img.display()))
        .output()
        .unwrap();
    out.status.success()
}
