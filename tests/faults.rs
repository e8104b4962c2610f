//! Faults with the real processes: kill -9 of the shipper, the applier and the tracker at
//! random instants while a guest writes; chunks corrupted in flight; a full replica disk; a
//! link cut mid-cycle (through scripts/wan-relay.py); and the two sites in two network
//! namespaces joined by a veth pair. Each ends with a replica equal to the primary (checked
//! with `vmreplica verify` and cmp). Also the shipper's progress bar, on a terminal, and
//! zero blocks amid data staying holes on the replica.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::site::*;
use common::*;
use rand::{Rng, SeedableRng};
use vmreplica_common::tls::{self, Validity};

#[test]
fn kill9_of_shipper_applier_and_tracker_loses_nothing() {
    let seed: u64 = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("FAULT_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 64 * MIB);
    qemu_write(&img, 3, "0", "16M");
    let mut tracker = Some(TrackerProc::start(dir.path(), &[("sys", &img)], &[]));
    let config = site.config(tracker.as_ref().unwrap());
    let mut applier = site.applier();
    let mut shipper = site.shipper(&config, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    let uri = tracker.as_ref().unwrap().uri("sys");
    let mut guest = fio(&uri, 30);
    // Each process is killed three times, in a random order, at random instants.
    let mut victims = [0, 0, 0, 1, 1, 1, 2, 2, 2];
    rand::seq::SliceRandom::shuffle(&mut victims[..], &mut rng);
    eprintln!("victims (0 shipper, 1 applier, 2 tracker): {victims:?}");
    for victim in victims {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        match victim {
            0 => {
                kill9(&mut shipper);
                shipper = site.shipper(&config, &[]);
            }
            1 => {
                kill9(&mut applier);
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
                applier = site.applier();
            }
            _ => {
                tracker.take().unwrap().kill9();
                kill9(&mut guest);
                tracker = Some(TrackerProc::start(dir.path(), &[("sys", &img)], &[]));
                guest = fio(&uri, 30);
            }
        }
    }
    kill9(&mut guest);
    // Writes have stopped: two more cycles and the replica must be the primary.
    let n = site.applied();
    site.wait_cycles(n, 2, Duration::from_secs(90));
    site.assert_equal(&config, &img);
    // Every applier start reopened the replica (a kill may land mid-apply: then it was
    // finished before anything else) and served the primary again.
    let connected = site.log("applier").matches("primary connected").count();
    assert!(connected >= 4, "{}", tail(&site.log("applier")));
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.take().unwrap().stop();
}

/// The tracker's activity log is lost while the disk is written behind its back (the
/// tracker down, qemu-io on the raw image): the tracker cannot prove its bitmap complete, so
/// the shipper resyncs by comparing block checksums with the replica and ships only the
/// blocks that differ, never a blind full copy.
#[test]
fn lost_tracking_is_resynced_by_checksums_shipping_only_the_differences() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 64 * MIB);
    fill_random(&img, 32);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let (config, mut applier, mut shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    kill9(&mut shipper);
    let state = tracker.state.clone();
    tracker.kill9();
    let al = state.join("sys.al");
    std::fs::remove_file(&al).unwrap_or_else(|e| panic!("{}: {e}", al.display()));
    // 4 MiB changed where nothing tracks it: 1 MiB inside the random data, 3 MiB in a hole.
    qemu_write(&img, 51, "8M", "1M");
    qemu_write(&img, 68, "40M", "3M");
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    assert!(
        tracker
            .log_text()
            .contains("disk marked for checksum resync"),
        "{}",
        tail(&tracker.log_text())
    );
    let n = site.applied();
    let mut shipper = site.shipper(&config, &[]);
    site.wait_cycles(n, 1, Duration::from_secs(60));
    let resync = site
        .applied_lines()
        .into_iter()
        .find(|l| l.contains("kind=Resync"))
        .unwrap_or_else(|| panic!("no resync cycle:\n{}", tail(&site.log("shipper"))));
    // Exactly the 64 KiB blocks that differ: 4 MiB, of a 64 MiB disk with 32 MiB allocated.
    assert_eq!(field::<f64>(&resync, "data_mib"), 4.0, "{resync}");
    site.assert_equal(&config, &img);
    let other = Command::new(bin())
        .args(["verify", "vm2", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("protects VM vm1, not vm2"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    // Resynchronised: the next cycle is an ordinary delta again.
    site.wait_cycles(n + 1, 1, Duration::from_secs(60));
    let last = site.applied_lines().pop().unwrap();
    assert_eq!(field::<String>(&last, "kind"), "Delta", "{last}");
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

#[test]
fn corrupted_chunks_are_refused_and_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 32 * MIB);
    qemu_write(&img, 7, "0", "8M");
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let (config, mut applier, mut shipper) =
        site.start(&tracker, &[("VMREPLICA_FAULT_CORRUPT_CHUNKS", "3")]);
    site.wait_cycles(0, 2, Duration::from_secs(90));
    let alog = site.log("applier");
    // Caught by the lz4 decoder or the checksum, depending on where the damage fell.
    assert!(
        alog.contains("refused a chunk") && alog.contains("bad chunk"),
        "{}",
        tail(&alog)
    );
    assert!(
        site.log("shipper").contains("the applier refused cycle 1"),
        "{}",
        tail(&site.log("shipper"))
    );
    site.assert_equal(&config, &img);
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

/// On a terminal, the shipper draws the initial copy as a progress bar that fills up (with
/// the log lines above it) and ends applied at 100%; it runs under `script`, for a tty.
#[test]
fn the_initial_copy_draws_a_progress_bar_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 64 * MIB);
    fill_random(&img, 48);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let mut applier = site.applier();
    // About 4 s for the 48 MiB: the bar is drawn many times on the way.
    let config = site.config_via(
        &tracker,
        &format!("127.0.0.1:{}", site.port),
        "bandwidth_limit = \"12M\"\n",
    );
    let typescript = dir.path().join("typescript");
    // `script` runs the shipper in a session of its own, on its terminal; the shipper takes
    // the hangup that killing `script` sends it as "read the configuration again" (SIGHUP),
    // so the terminal's session is killed too, or the shipper outlives the test.
    let shipper = Command::new("script")
        .args(["-qfe", "-c"])
        .arg(format!(
            "'{}' shipper --config '{}'",
            bin(),
            config.display()
        ))
        .arg(&typescript)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map(|c| Terminal(Guard(c)))
        .unwrap();
    let screen = || std::fs::read_to_string(&typescript).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !screen().contains(", applied") {
        assert!(Instant::now() < deadline, "no finished bar:\n{}", screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    let session = shipper.session();
    drop(shipper);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(pid) = live_in_session(session) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} of the shipper's terminal session outlived the test's kill"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = screen();
    // Each redraw starts at a carriage return; the percentages drawn must rise to 100.
    let percents: Vec<u32> = out
        .split(['\r', '\n'])
        .filter(|l| l.contains("cycle 1, initial copy"))
        .filter_map(|l| l.split("] ").nth(1)?.split('%').next()?.trim().parse().ok())
        .collect();
    assert!(
        percents.iter().filter(|p| (1..100).contains(*p)).count() >= 3,
        "{percents:?}\n{out}"
    );
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert_eq!(percents.last(), Some(&100));
    assert!(out.contains("connected to the applier"), "{out}");
    site.assert_equal(&config, &img);
    kill9(&mut applier);
    tracker.stop();
}

/// `script` and the session it runs its command in, killed together when dropped.
struct Terminal(Guard);

impl Terminal {
    /// The session of the command on the terminal: `script`'s child leads it.
    fn session(&self) -> i32 {
        let pid = self.0 .0.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("`script` (pid {pid}) runs no command"))
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let pid = self.0 .0.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) touches no memory of ours. What it signals: the process group
            // that `script`'s child, listed a moment ago, leads (`script` starts its command
            // in a session of its own). Had `script` reaped that child since, the id could
            // name another group only after the kernel reused the pid within that moment.
            unsafe { libc::kill(-child, libc::SIGKILL) };
        }
        self.0.kill();
    }
}

/// A process of `session` that is still alive (not a zombie), if any.
fn live_in_session(session: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // After the command name: state, ppid, pgrp, session.
        let mut f = stat.rsplit_once(')')?.1.split_whitespace();
        let state = f.next()?;
        let sid: i32 = f.nth(2)?.parse().ok()?;
        (sid == session && state != "Z").then_some(pid)
    })
}

struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_replica_disk_is_reported_and_replication_resumes_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&store));
    let _mount = Tmpfs(store.clone());
    let site = Site::new(dir.path(), store.clone());
    let img = image(dir.path(), "sys.img", 64 * MIB);
    // 40 MiB of incompressible data: does not fit in 24 MiB.
    fill_random(&img, 40);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let (config, mut applier, mut shipper) = site.start(&tracker, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !site.log("shipper").contains("no space") {
        assert!(
            Instant::now() < deadline,
            "no 'no space' error; shipper log:\n{}",
            tail(&site.log("shipper"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        site.log("applier").contains("no space"),
        "{}",
        tail(&site.log("applier"))
    );
    assert_eq!(site.applied(), 0);
    // Space comes back: the same cycle resumes and lands.
    run(Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&store));
    site.wait_cycles(0, 1, Duration::from_secs(90));
    site.wait_cycles(1, 1, Duration::from_secs(30));
    site.assert_equal(&config, &img);
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

/// Zero blocks amid rewritten data (written zeroes, WRITE_ZEROES, a trim) reach the replica
/// as holes: it stays as sparse as the primary, so a guest's fstrim does not fill it up.
#[test]
fn zero_blocks_and_trims_amid_data_stay_holes_on_the_replica() {
    let (_dir, site, img, tracker) = small_site(8);
    let store = site.store.clone();
    let (config, mut applier, mut shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    // One dirty 1 MiB stretch (one run of the bitmap): data, with a 64 KiB block of zeroes
    // written as data, one zeroed with WRITE_ZEROES and one trimmed, all inside the data.
    run(Command::new("qemu-io")
        .args(["-f", "raw", &tracker.uri("sys")])
        .args(["-c", "write -P 0x11 1M 1M"])
        .args(["-c", "write -P 0 1152k 64k"])
        .args(["-c", "write -z 1344k 64k"])
        .args(["-c", "discard 1536k 64k"]));
    let n = site.applied();
    // Two more cycles: the first one may have frozen before the writes.
    site.wait_cycles(n, 2, Duration::from_secs(60));
    site.assert_equal(&config, &img);
    let replica_path = store.join("vm1/disks/sys.img");
    let replica = std::fs::File::open(&replica_path).unwrap();
    for off in [1152u64 << 10, 1344 << 10, 1536 << 10] {
        assert!(
            vmreplica_common::sparse::is_hole(&replica, off, 64 << 10).unwrap(),
            "the zero block at {off} was written into the replica as data"
        );
    }
    assert!(
        allocated(&replica_path) <= allocated(&img),
        "replica allocates {} bytes, primary {}",
        allocated(&replica_path),
        allocated(&img)
    );
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

/// `vmreplica applier points` lists every cycle that changed something as a recovery point
/// (an idle cycle consumes none), the initial copy first, while the applier runs, with sizes
/// in units; `vmreplica verify` finds a damaged range of the replica, names it and fails;
/// `applier export` works while the applier runs (through its admin socket), and a second
/// process never opens the replica beside it.
#[test]
fn points_lists_each_applied_cycle_and_verify_names_a_damaged_range() {
    let (dir, site, _img, tracker) = small_site(4);
    let store = site.store.clone();
    let (config, mut applier, mut shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    // Two cycles that change something (written between them), and idle ones.
    for byte in [0x41u8, 0x42] {
        let n = site.applied();
        run(Command::new("qemu-io")
            .args(["-f", "raw", &tracker.uri("sys")])
            .args(["-c", &format!("write -P {byte} 2M 64k")]));
        site.wait_cycles(n, 2, Duration::from_secs(60));
    }
    kill9(&mut shipper);
    let changed: Vec<u64> = site
        .applied_lines()
        .iter()
        .filter(|l| field::<f64>(l, "cycle_mib") > 0.0)
        .map(|l| field(l, "cycle"))
        .collect();
    let out = stdout(
        Command::new(bin())
            .args(["applier", "points", "vm1", "--store"])
            .arg(&store),
    );
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["cycle", "applied", "(UTC)", "kind", "size", "consistency"],
        "{out}"
    );
    let points: Vec<(u64, String, String, String)> = lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 6, "{l}");
            assert_eq!(f[5], "crash", "{l}");
            (
                f[0].parse().unwrap(),
                f[1].to_string(),
                f[2].to_string(),
                format!("{} {}", f[3], f[4]),
            )
        })
        .collect();
    let cycles: Vec<u64> = points.iter().map(|p| p.0).collect();
    // The shipper may have been killed after a cycle was applied but before it logged it.
    assert!(
        cycles.starts_with(&changed) && cycles.len() <= changed.len() + 1 && cycles.len() >= 3,
        "points {cycles:?}, cycles that changed something {changed:?}"
    );
    assert_eq!(points[0].2, "initial", "{out}");
    assert!(points[1..].iter().all(|p| p.2 == "delta"), "{out}");
    assert!(
        points.windows(2).all(|w| w[0].1 <= w[1].1) && points[0].1.ends_with('Z'),
        "times not in order: {out}"
    );
    assert!(
        points
            .iter()
            .all(|p| ["B", "KiB", "MiB", "GiB"].iter().any(|u| p.3.ends_with(u))),
        "sizes without units: {out}"
    );
    // Damage 64 KiB of the replica at 2 MiB + 64 KiB.
    let replica = std::fs::OpenOptions::new()
        .write(true)
        .open(store.join("vm1/disks/sys.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&replica, &[0x5a; 65536], 2 * MIB + 65536).unwrap();
    replica.sync_all().unwrap();
    let out = Command::new(bin())
        .args(["verify", "vm1", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "verify passed a damaged replica: {so}"
    );
    assert!(
        so.contains("sys: 1 differing ranges, 65536 bytes") && so.contains("  2162688+65536"),
        "{so}"
    );
    assert!(
        se.contains("replica differs from primary for VM vm1"),
        "{se}"
    );
    // Exporting the newest point works while the applier runs (the newest point is the
    // replica image, damage included); a second process opening the replica itself (here:
    // no admin socket to go through) is refused while the applier has it.
    let newest = cycles.last().unwrap().to_string();
    let export = |out: &str, socket: Option<&Path>| {
        let mut c = Command::new(bin());
        c.args(["applier", "export", "vm1", "--point", &newest, "--store"])
            .arg(&store)
            .arg("--out")
            .arg(dir.path().join(out));
        if let Some(s) = socket {
            c.arg("--admin-socket").arg(s);
        }
        c.output().unwrap()
    };
    let live = export("live", None);
    assert!(
        live.status.success(),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let busy = export("direct", Some(&dir.path().join("no-such.sock")));
    let said = String::from_utf8_lossy(&busy.stderr);
    assert!(
        !busy.status.success() && said.contains("open in another process"),
        "{said}"
    );
    // Into the store, or over an image: refused.
    let again = export("live", None);
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("exists already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    kill9(&mut applier);
    let done = export("stopped", None);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    for d in ["live", "stopped"] {
        assert!(
            std::fs::read(dir.path().join(d).join("sys.img")).unwrap()
                == std::fs::read(store.join("vm1/disks/sys.img")).unwrap(),
            "the newest point ({d}) differs from the replica image"
        );
    }
    let inside = Command::new(bin())
        .args(["applier", "export", "vm1", "--point", &newest, "--store"])
        .arg(&store)
        .arg("--out")
        .arg(store.join("vm1/disks"))
        .output()
        .unwrap();
    assert!(
        !inside.status.success()
            && String::from_utf8_lossy(&inside.stderr).contains("inside the replica store"),
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    tracker.stop();
}

/// A primary whose certificate has expired, or comes from another CA, is refused, and both
/// sides' logs say so in plain words (who refused whose certificate, and why); the replica
/// gets nothing.
#[test]
fn certificate_refusals_are_explained_in_both_logs() {
    let (dir, site, _img, tracker) = small_site(0);
    let store = site.store.clone();
    let mut applier = site.applier();
    let expired = dir.path().join("expired");
    issue_expired(&site.ca, "primary-1", &expired);
    // Another CA, named otherwise or (as two `certs init-ca` with the defaults are) alike.
    let other = dir.path().join("other-ca");
    tls::init_ca(&other, "someone else's CA", 30).unwrap();
    tls::issue(&other, "primary-1", &[], Validity::days(30), &other).unwrap();
    let twin = dir.path().join("twin-ca");
    tls::init_ca(&twin, "test CA", 30).unwrap();
    tls::issue(&twin, "primary-1", &[], Validity::days(30), &twin).unwrap();
    let not_ours = "it was not issued by the CA the other side trusts";
    let cases = [
        (&expired, "it has expired"),
        (&other, not_ours),
        (&twin, not_ours),
    ];
    for (certs, why) in cases {
        let config = site.config(&tracker);
        let toml = std::fs::read_to_string(&config).unwrap().replace(
            &format!("{}/primary-1", site.ca.display()),
            &format!("{}/primary-1", certs.display()),
        );
        std::fs::write(&config, toml).unwrap();
        let said = format!("the replica refused the primary's certificate: {why}");
        // Lines of `log` holding all of `what`: each case must add its own.
        let lines_with = |log: &str, what: &[&str]| {
            log.lines()
                .filter(|l| what.iter().all(|w| l.contains(w)))
                .count()
        };
        let shipper_says = [&*said, "replication interrupted"];
        let applier_says = [&*said, "refused a connection"];
        let before = (
            lines_with(&site.log("shipper"), &shipper_says),
            lines_with(&site.log("applier"), &applier_says),
        );
        let mut shipper = site.shipper(&config, &[]);
        wait_log(&site, "shipper", &said, Duration::from_secs(30), |log| {
            lines_with(log, &shipper_says) > before.0
        });
        wait_log(&site, "applier", &said, Duration::from_secs(30), |log| {
            lines_with(log, &applier_says) > before.1
        });
        kill9(&mut shipper);
    }
    assert!(
        !store.join("vm1").exists(),
        "a refused primary created a replica"
    );
    kill9(&mut applier);
    tracker.stop();
}

/// `initial_sync_at`: the shipper connects, says when the initial copy will start and copies
/// nothing before then; with `interval = "continuous"` each cycle then follows the last one's
/// acknowledgement.
#[test]
fn a_scheduled_initial_sync_waits_for_its_time_and_continuous_cycles_follow() {
    let (_dir, site, img, tracker) = small_site(4);
    let at = std::time::SystemTime::now() + Duration::from_secs(4);
    let at = humantime::format_rfc3339_seconds(at).to_string();
    let config = site.config_via(
        &tracker,
        &format!("{}:{}", site.replica_ip, site.port),
        &format!("initial_sync_at = \"{at}\"\n"),
    );
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("interval = \"1s\"", "interval = \"continuous\"");
    std::fs::write(&config, toml).unwrap();
    let mut applier = site.applier();
    let mut shipper = site.shipper(&config, &[]);
    wait_log(
        &site,
        "shipper",
        "the schedule",
        Duration::from_secs(20),
        |l| l.contains("initial sync scheduled in"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(site.applied(), 0, "{}", site.log("shipper"));
    assert!(
        !site.log("applier").contains("cycle started"),
        "{}",
        site.log("applier")
    );
    site.wait_cycles(0, 6, Duration::from_secs(60));
    let lines = site.applied_lines();
    // Log lines start with an RFC 3339 time: the initial copy was applied at `at` or later.
    assert!(
        lines[0].contains("kind=Initial") && lines[0][..19] >= at[..19],
        "scheduled for {at}: {}",
        lines[0]
    );
    // Continuous: five more cycles came right after it, not one per interval.
    let secs = |l: &str| {
        humantime::parse_rfc3339_weak(&l[..19])
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert!(
        secs(&lines[5]) - secs(&lines[0]) <= 3,
        "cycles were not continuous:\n{}",
        lines.join("\n")
    );
    site.assert_equal(&config, &img);
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

#[test]
fn a_link_cut_mid_cycle_resumes_without_resending_what_was_staged() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 64 * MIB);
    // 48 MiB of incompressible data: about 5 s through a 80 Mbit/s link.
    fill_random(&img, 48);
    let relay_port = free_udp_port();
    let relay = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/wan-relay.py"))
        .args([
            "--listen",
            &format!("127.0.0.1:{relay_port}"),
            "--to",
            &format!("127.0.0.1:{}", site.port),
            "--delay-ms",
            "5",
            "--rate",
            "80M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Guard)
        .expect("running scripts/wan-relay.py");
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    // A 2 s idle timeout, so a cut longer than that drops the connection.
    let config = site.config_via(
        &tracker,
        &format!("127.0.0.1:{relay_port}"),
        "[tuning]\nidle_timeout_s = 2\n",
    );
    let mut applier = site.applier();
    let mut shipper = site.shipper(&config, &[]);
    wait_log(
        &site,
        "shipper",
        "the initial cycle",
        Duration::from_secs(30),
        |l| l.contains("cycle planned"),
    );
    // Cut once the replica holds part of the cycle durably: its undo log has an applied
    // record past the header (an initial copy into an empty replica captures nothing else).
    let log = site.store.join("vm1/undo/1.undo");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&log).map_or(0, |m| m.len()) <= 4096 + 32 {
        assert!(
            Instant::now() < deadline,
            "nothing of the cycle became durable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cut = |on: &str| {
        eprintln!("link {on}");
        run(Command::new("kill")
            .arg("-USR1")
            .arg(relay.0.id().to_string()));
    };
    cut("down");
    wait_log(
        &site,
        "shipper",
        "the connection to drop",
        Duration::from_secs(30),
        |l| l.contains("replication interrupted"),
    );
    assert_eq!(
        site.applied(),
        0,
        "the cycle cannot have landed during the cut"
    );
    cut("up");
    site.wait_cycles(0, 1, Duration::from_secs(90));
    let line = site.applied_lines().swap_remove(0);
    let skipped: u64 = field(&line, "resumed_skipped");
    assert!(skipped > 0, "the resumed cycle resent everything: {line}");
    site.assert_equal(&config, &img);
    kill9(&mut shipper);
    kill9(&mut applier);
    drop(relay);
    tracker.stop();
}

/// Two network namespaces joined by a veth pair; removed on drop.
struct TwoSites {
    primary: String,
    replica: String,
}

impl TwoSites {
    fn new() -> TwoSites {
        let id = std::process::id() % 100_000;
        let t = TwoSites {
            primary: format!("vmr-p{id}"),
            replica: format!("vmr-r{id}"),
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["netns", "add", &t.primary]);
        ip(&["netns", "add", &t.replica]);
        let (a, b) = (format!("vp{id}"), format!("vr{id}"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ip(&["link", "set", &a, "netns", &t.primary]);
        ip(&["link", "set", &b, "netns", &t.replica]);
        for (ns, dev, addr) in [
            (&t.primary, &a, "10.233.0.1/30"),
            (&t.replica, &b, "10.233.0.2/30"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        t
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        for ns in [&self.primary, &self.replica] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn replication_between_two_network_namespaces() {
    let sites = TwoSites::new();
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::new(dir.path(), dir.path().join("store"));
    site.replica_ip = "10.233.0.2".into();
    site.replica_ns = Some(sites.replica.clone());
    site.primary_ns = Some(sites.primary.clone());
    let img = image(dir.path(), "sys.img", 64 * MIB);
    qemu_write(&img, 5, "0", "12M");
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    // Data spread over three QUIC connections.
    let config = site.config_via(
        &tracker,
        &format!("{}:{}", site.replica_ip, site.port),
        "connections = 3\n",
    );
    let mut applier = site.applier();
    let mut shipper = site.shipper(&config, &[]);
    site.wait_cycles(0, 1, Duration::from_secs(60));
    // The guest writes while cycles run every second across the namespaces.
    let mut guest = fio(&tracker.uri("sys"), 4);
    guest.wait();
    let n = site.applied();
    site.wait_cycles(n, 2, Duration::from_secs(60));
    site.assert_equal(&config, &img);
    assert!(
        site.log("applier")
            .contains("primary connected remote=10.233.0.1:"),
        "the primary did not come from the other namespace:\n{}",
        tail(&site.log("applier"))
    );
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

/// kill -9 of the applier, then a restart: the shipper sees the new applier at once (its
/// next keep-alive gets a stateless reset from the restarted endpoint, which keeps its reset
/// key in the store) and reconnects within seconds, not after its 30 s idle timeout; both
/// while it waits between cycles and in the middle of a cycle.
#[test]
fn a_restarted_applier_is_seen_within_seconds() {
    let (_dir, site, img, tracker) = small_site(12);
    let config = site.config_via(
        &tracker,
        &format!("127.0.0.1:{}", site.port),
        "bandwidth_limit = \"4M\"\n",
    );
    let mut applier = site.applier();
    let mut shipper = site.shipper(&config, &[]);
    let reconnect = |applier: &mut Guard, what: &str| {
        kill9(applier);
        std::thread::sleep(Duration::from_millis(300));
        let before = site
            .log("shipper")
            .matches("connected to the applier")
            .count();
        *applier = site.applier();
        let restarted = Instant::now();
        while site
            .log("shipper")
            .matches("connected to the applier")
            .count()
            == before
        {
            assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "{what}: the shipper did not reconnect within 5 s of the restart:\n{}",
                tail(&site.log("shipper"))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{what}: reconnected {:?} after the restart",
            restarted.elapsed()
        );
    };
    // In the middle of the initial copy (12 MiB at 4 MiB/s).
    wait_log(
        &site,
        "shipper",
        "the initial copy",
        Duration::from_secs(30),
        |l| l.contains("cycle planned"),
    );
    std::thread::sleep(Duration::from_millis(1200));
    reconnect(&mut applier, "mid-cycle");
    site.wait_cycles(0, 2, Duration::from_secs(60));
    // Between cycles.
    std::thread::sleep(Duration::from_millis(300));
    reconnect(&mut applier, "between cycles");
    let n = site.applied();
    site.wait_cycles(n, 1, Duration::from_secs(30));
    site.assert_equal(&config, &img);
    kill9(&mut shipper);
    kill9(&mut applier);
    tracker.stop();
}

/// `--keep 0` would keep no recovery point: refused before anything starts.
#[test]
fn the_applier_refuses_to_keep_no_point() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["applier", "--store"])
        .arg(dir.path().join("store"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cert",
            "c",
            "--key",
            "k",
            "--ca",
            "a",
        ])
        .args(["--allow", "p", "--keep", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--keep 0"), "{err}");
    assert!(!dir.path().join("store").exists());
}
