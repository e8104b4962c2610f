//! A careless admin: a configuration given by a relative path, pause twice, resume what is
//! not paused, a resync asked for while paused, `set` with a bad value beside a good one or
//! on another VM's file, SIGHUP with a broken file, another VM's name or keys that need a
//! restart. Each is told what happened, and nothing is left half done.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::site::*;
use common::*;
use serde_json::Value;

fn vmr(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn says(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The primary's entries in `status vm1 --json` (run from the test's own directory, not the
/// shipper's).
fn primaries() -> Vec<Value> {
    let o = vmr(&["status", "vm1", "--json"]);
    let r: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", says(&o)));
    r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["site"] == "primary")
        .cloned()
        .collect()
}

fn wait_primary(what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let p = primaries();
        if p.len() == 1 && cond(&p[0]) {
            return p[0].clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "waited for {what}: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn hup(shipper: &Guard) {
    // SAFETY: kill(2) on the shipper this test started.
    unsafe { libc::kill(shipper.0.id() as i32, libc::SIGHUP) };
}

fn shipper_log_has(dir: &Path, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("shipper.log")).unwrap_or_default();
        if log.contains(what) {
            return log;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no {what:?} in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_careless_admin_is_told_what_happened_and_nothing_is_left_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::env::set_var("VMREPLICA_RUN_DIR", &run);
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 16 * MIB);
    fill_random(&img, 2);
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    // The configuration as an admin writes it beside the tracker: relative paths, and the
    // shipper started from that directory with `--config shipper.toml`.
    let config = site.config(&tracker);
    let text = std::fs::read_to_string(&config).unwrap();
    let prefix = format!("{}/", dir.path().display());
    std::fs::write(&config, text.replace(&prefix, "")).unwrap();
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("tracker = \"state/control.sock\""));
    let _applier = site.applier();
    let log = std::fs::File::create(dir.path().join("shipper.log")).unwrap();
    let shipper = Guard(
        Command::new(bin())
            .args(["shipper", "--config", "shipper.toml"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    site.wait_cycles(0, 2, Duration::from_secs(60));

    // Found from another directory, once (it used to be listed twice, once "stopped": its
    // registry entry named its sockets relative to the shipper's directory).
    let p = wait_primary("replicating", |p| p["state"] == "replicating");
    assert_eq!(p["health"]["level"], "normal", "{p}");

    // Pause twice, resume twice.
    assert!(says(&vmr(&["pause", "vm1"])).contains("replication paused"));
    assert!(says(&vmr(&["pause", "vm1"])).contains("was paused already"));
    // A resync asked for while paused: said to wait for the resume, and `--wait` does not
    // hang; the status calls it requested (a warning), not lost tracking (critical).
    let o = vmr(&["resync", "vm1"]);
    assert!(
        o.status.success() && says(&o).contains("runs when replication resumes"),
        "{}",
        says(&o)
    );
    let mut c = Command::new(bin())
        .args(["resync", "vm1", "--wait"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(!wait_timeout(&mut c, Duration::from_secs(20)).success());
    let p = wait_primary("paused, resync requested", |p| p["state"] == "paused");
    assert_eq!(p["health"]["level"], "warning", "{p}");
    let reasons = p["health"]["reasons"].to_string();
    assert!(
        reasons.contains("resync was requested") && !reasons.contains("tracking was lost"),
        "{p}"
    );

    // Paused, the primary holds no connection: the replica can be removed (to reseed it)
    // without stopping the shipper (the connection used to stay up between cycles).
    let t0 = Instant::now();
    loop {
        let o = vmr(&["remove", "vm1", "--replica", "--yes"]);
        if o.status.success() {
            break;
        }
        assert!(
            says(&o).contains("its primary is connected") && t0.elapsed() < Duration::from_secs(10),
            "{}",
            says(&o)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!site.store.join("vm1").exists());

    // `set`: a bad value beside a good one changes nothing; nor does another VM's file.
    let before = std::fs::read_to_string(&config).unwrap();
    let o = vmr(&["set", "vm1", "interval=4s", "bandwidth_limit=lots"]);
    assert!(
        !o.status.success() && says(&o).contains("bandwidth_limit"),
        "{}",
        says(&o)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
    // An RPO limit no longer than the interval (always critical) is refused.
    let o = vmr(&["set", "vm1", "rpo_limit=1s"]);
    assert!(
        !o.status.success() && says(&o).contains("must be longer than the interval"),
        "{}",
        says(&o)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
    let other = dir.path().join("vm2.toml");
    std::fs::write(&other, before.replace("vm = \"vm1\"", "vm = \"vm2\"")).unwrap();
    let o = vmr(&[
        "set",
        "vm1",
        "interval=4s",
        "--config",
        other.to_str().unwrap(),
    ]);
    assert!(
        says(&o).contains("configures VM vm2, not vm1"),
        "{}",
        says(&o)
    );
    assert!(!std::fs::read_to_string(&other).unwrap().contains("4s"));

    // Resume twice: a new initial copy into the emptied replica, which also ends the
    // requested resync.
    assert!(says(&vmr(&["resume", "vm1"])).contains("replication resumed"));
    assert!(says(&vmr(&["resume", "vm1"])).contains("was not paused"));
    let p = wait_primary("the new initial copy applied", |p| {
        p["state"] == "replicating" && p["health"]["level"] == "normal"
    });
    assert_eq!(p["last_cycle"], p["latest_point"]["cycle"]);
    site.assert_equal(&config, &img);

    // SIGHUP with a broken file: the settings in force stay, the file is named.
    std::fs::write(&config, format!("{before}interval = [\n")).unwrap();
    hup(&shipper);
    let log = shipper_log_has(dir.path(), "the settings in force stay");
    assert!(log.contains(&config.display().to_string()), "{log}");
    // Another VM's name: refused as a whole (the interval beside it is not taken).
    std::fs::write(
        &config,
        before
            .replace("vm = \"vm1\"", "vm = \"vm9\"")
            .replace("interval = \"1s\"", "interval = \"3s\""),
    )
    .unwrap();
    hup(&shipper);
    shipper_log_has(dir.path(), "now configures VM vm9");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(primaries()[0]["interval_seconds"], 1);
    // A key that needs a restart: said so; the rest is taken.
    std::fs::write(
        &config,
        before
            .replace("streams = 2", "streams = 3")
            .replace("interval = \"1s\"", "interval = \"3s\""),
    )
    .unwrap();
    hup(&shipper);
    let log = shipper_log_has(dir.path(), "a running shipper keeps them until it restarts");
    assert!(log.contains("reload: streams changed in"), "{log}");
    wait_primary("the new interval", |p| p["interval_seconds"] == 3);

    // Stopped on an error that needs an operator (the tracker set to another lineage),
    // fixed, then resumed: said to go on (it used to say "was not paused"), and it does.
    assert!(says(&vmr(&["pause", "vm1"])).contains("replication paused"));
    let st = tracker.ctl(&["status"]);
    let lineage = st["lineage"].as_str().unwrap().to_string();
    if let Some(g) = st["frozen"]["generation"].as_u64() {
        tracker.ctl(&["merge", &g.to_string()]);
    }
    tracker.ctl(&["set-lineage", "0123456789abcdef0123456789abcdef", "--force"]);
    assert!(says(&vmr(&["resume", "vm1"])).contains("replication resumed"));
    wait_primary("stopped on two lineages", |p| p["state"] == "stopped");
    tracker.ctl(&["set-lineage", &lineage, "--force"]);
    let o = vmr(&["resume", "vm1"]);
    assert!(says(&o).contains("replication resumed"), "{}", says(&o));
    wait_primary("going on", |p| p["state"] == "replicating");

    // A guest agent socket that is not there (a typo): the points go on, crash-consistent,
    // and status says why, naming the socket.
    std::fs::write(
        &config,
        format!("{before}guest_agent = \"no-such-qga.sock\"\napp_consistent_every = \"1s\"\n"),
    )
    .unwrap();
    hup(&shipper);
    let p = wait_primary("a failed app-consistent freeze", |p| {
        p["app_consistent"]["last_error"].is_string()
    });
    assert!(
        p["app_consistent"]["last_error"]
            .as_str()
            .unwrap()
            .contains("no-such-qga.sock"),
        "{p}"
    );
    let since = site.applied();
    site.wait_cycles(since, 2, Duration::from_secs(30));

    // A bandwidth schedule whose window holds every time of day: its limit is in force at
    // once, over the configured one; shown in status and announced.
    std::fs::write(
        &config,
        format!(
            "{before}bandwidth_limit = \"20M\"\n[[bandwidth_schedule]]\nfrom = \"00:00\"\n\
             to = \"24:00\"\nlimit = \"3M\"\n"
        ),
    )
    .unwrap();
    hup(&shipper);
    wait_primary("the scheduled limit", |p| {
        p["bandwidth_limit_bytes_per_second"] == 3 << 20
    });
    let events = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    assert!(
        events.lines().any(|l| l.contains("\"bandwidth-changed\"")
            && l.contains("\"limit_bytes_per_second\":3145728")),
        "{events}"
    );

    tracker.stop();
}

/// Junk datagrams at the applier's port (a scanner, a misdirected client; some shaped like
/// QUIC v1 Initials): neither a log line each nor a stalled replication.
#[test]
fn junk_datagrams_neither_flood_the_log_nor_stop_replication() {
    let (dir, site, _img, tracker) = small_site(1);
    std::env::set_var("VMREPLICA_RUN_DIR", dir.path().join("run"));
    let (_config, _applier, _shipper) = site.start(&tracker, &[]);
    site.wait_cycles(0, 2, Duration::from_secs(60));
    let quiet = |log: String| log.lines().filter(|l| !l.contains("cycle")).count();
    let before = quiet(site.log("applier"));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..5000u32 {
        let mut b = vec![0u8; if i % 2 == 0 { 1200 } else { 37 }];
        for byte in b.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
        if i % 3 == 0 {
            // Long header, QUIC version 1, an 8-byte destination connection id.
            b[0] = 0xc0 | (b[0] & 0x0f);
            b[1..5].copy_from_slice(&1u32.to_be_bytes());
            b[5] = 8;
        }
        sock.send_to(&b, ("127.0.0.1", site.port)).unwrap();
    }
    let since = site.applied();
    site.wait_cycles(since, 2, Duration::from_secs(30));
    let after = quiet(site.log("applier"));
    assert!(
        after - before <= 3,
        "{} log lines for junk:\n{}",
        after - before,
        tail(&site.log("applier"))
    );
    tracker.stop();
}

/// `vmreplica … | head -1`: a reader that leaves before the output is written ends the
/// command quietly, with the status of a writer killed by SIGPIPE, never a panic.
#[test]
fn output_to_a_reader_that_went_away_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(bin())
        .args(["certs", "init-ca", "--dir"])
        .arg(dir.path().join("ca"))
        .env("RUST_BACKTRACE", "0")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(141), "{:?} {err}", o.status.signal());
    // The command's work is done before it speaks: the CA exists.
    assert!(dir.path().join("ca/ca.pem").exists());
}

/// An ordinary error (an image that does not exist) is said as its message and causes on
/// one line, also with `RUST_BACKTRACE` set: never a backtrace, which is for panics.
#[test]
fn a_users_error_is_its_message_never_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let o = Command::new(bin())
        .arg("tracker")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--disk")
        .arg(format!("a={}", missing.display()))
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env("VMREPLICA_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "error: cannot start the tracker: disk a: image {}: No such file or directory (os \
             error 2)",
            missing.display()
        ),
        "{err}"
    );
}
