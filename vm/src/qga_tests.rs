//! Guest-agent corner cases against a scripted fake agent over a socketpair (the real
//! qemu-ga inside the test guest is exercised in the workspace's `tests/vm_guest.rs`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::*;

type Log = Arc<Mutex<Vec<String>>>;

/// What the fake agent does with a command: reply (after an optional delay) or stay silent.
enum Act {
    Reply(&'static str),
    Late(u64, &'static str),
    Silent,
    /// The usual sync reply (0xFF, then the id).
    Sync,
}

/// A fake agent: writes `prelude` (stale output of an earlier client), then answers each
/// command line as `on` says; logs every command and every 0xFF it receives.
fn fake(
    prelude: &'static [u8],
    mut on: impl FnMut(&str) -> Act + Send + 'static,
) -> (GuestAgent, Log, JoinHandle<()>) {
    let (a, mut b) = UnixStream::pair().unwrap();
    let log: Log = Arc::default();
    let l = Arc::clone(&log);
    let h = std::thread::spawn(move || {
        b.write_all(prelude).unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8];
        while let Ok(1) = b.read(&mut byte) {
            match byte[0] {
                0xff => {
                    line.clear();
                    l.lock().unwrap().push("<FF>".into());
                }
                b'\n' => {
                    let v: Value = serde_json::from_slice(&line).unwrap();
                    line.clear();
                    let cmd = v["execute"].as_str().unwrap().to_string();
                    l.lock().unwrap().push(cmd.clone());
                    let (delay, reply) = match on(&cmd) {
                        Act::Sync => {
                            let mut out = vec![0xff];
                            out.extend(
                                format!("{{\"return\": {}}}\n", v["arguments"]["id"]).bytes(),
                            );
                            let _ = b.write_all(&out);
                            continue;
                        }
                        Act::Reply(r) => (0, r),
                        Act::Late(ms, r) => (ms, r),
                        Act::Silent => continue,
                    };
                    std::thread::sleep(Duration::from_millis(delay));
                    let _ = b.write_all(format!("{reply}\n").as_bytes());
                }
                c => line.push(c),
            }
        }
    });
    let conn = LineConn::from_stream(a, Peer::agent(Path::new("/run/vm1/qga.sock")));
    (GuestAgent::over(conn, Duration::from_secs(5)), log, h)
}

/// Syncs normally; everything else as `rest` says.
fn agent(
    mut rest: impl FnMut(&str) -> Act + Send + 'static,
) -> impl FnMut(&str) -> Act + Send + 'static {
    move |cmd| match cmd {
        "guest-sync-delimited" => Act::Sync,
        c => rest(c),
    }
}

fn log_of(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

const QUICK: FreezeTimeouts = FreezeTimeouts {
    freeze: Duration::from_millis(300),
    thaw: Duration::from_millis(800),
};

#[test]
fn sync_sends_ff_first_and_skips_stale_output() {
    // An earlier client's unread reply, and an old sync reply with another id.
    let (mut a, log, h) = fake(
        b"{\"return\": {}}\n\xff{\"return\": 77}\n{\"ret",
        agent(|c| match c {
            "guest-ping" => Act::Reply("{\"return\": {}}"),
            _ => Act::Silent,
        }),
    );
    a.ping().unwrap();
    assert_eq!(log_of(&log), ["<FF>", "guest-sync-delimited", "guest-ping"]);
    drop(a);
    h.join().unwrap();
}

#[test]
fn status_and_counts_are_typed() {
    let mut frozen = false;
    let (mut a, _log, h) = fake(
        b"",
        agent(move |c| match c {
            "guest-fsfreeze-status" if frozen => Act::Reply("{\"return\": \"frozen\"}"),
            "guest-fsfreeze-status" => Act::Reply("{\"return\": \"thawed\"}"),
            "guest-fsfreeze-freeze" => {
                frozen = true;
                Act::Reply("{\"return\": 2}")
            }
            "guest-fsfreeze-thaw" => {
                frozen = false;
                Act::Reply("{\"return\": 2}")
            }
            _ => Act::Reply("{\"return\": \"many\"}"),
        }),
    );
    assert_eq!(a.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
    assert_eq!(a.fsfreeze_freeze(Duration::from_secs(5)).unwrap(), 2);
    assert_eq!(a.fsfreeze_status().unwrap(), FreezeStatus::Frozen);
    assert_eq!(a.fsfreeze_thaw(Duration::from_secs(5)).unwrap(), 2);
    let e = a.count("guest-other", Duration::from_secs(5)).unwrap_err();
    assert!(
        e.to_string().contains("not a count") && e.to_string().contains("/run/vm1/qga.sock"),
        "{e}"
    );
    drop(a);
    h.join().unwrap();
}

#[test]
fn freeze_then_runs_the_closure_frozen_and_thaws() {
    let (mut a, log, h) = fake(
        b"",
        agent(|c| match c {
            "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => Act::Reply("{\"return\": 1}"),
            _ => Act::Silent,
        }),
    );
    let l = Arc::clone(&log);
    let r = a
        .freeze_then(FreezeTimeouts::default(), move || {
            assert_eq!(log_of(&l).last().unwrap(), "guest-fsfreeze-freeze");
            42
        })
        .unwrap();
    assert_eq!((r.value, r.filesystems), (42, 1));
    assert!(r.frozen_for < Duration::from_secs(5));
    assert_eq!(log_of(&log).last().unwrap(), "guest-fsfreeze-thaw");
    drop(a);
    h.join().unwrap();
}

#[test]
fn a_panic_in_the_closure_still_thaws() {
    let (mut a, log, h) = fake(b"", agent(|_| Act::Reply("{\"return\": 1}")));
    let r = catch_unwind(AssertUnwindSafe(|| {
        a.freeze_then(FreezeTimeouts::default(), || panic!("the tracker exploded"))
    }));
    assert!(r.is_err());
    assert_eq!(log_of(&log).last().unwrap(), "guest-fsfreeze-thaw");
    drop(a);
    h.join().unwrap();
}

#[test]
fn a_freeze_that_times_out_is_thawed_after_a_resync() {
    // The agent answers the freeze too late (the guest froze anyway): the late answer is
    // skipped by the resync and the guest is thawed.
    let (mut a, log, h) = fake(
        b"",
        agent(|c| match c {
            "guest-fsfreeze-freeze" => Act::Late(500, "{\"return\": 1}"),
            _ => Act::Reply("{\"return\": 1}"),
        }),
    );
    let mut ran = false;
    let e = a.freeze_then(QUICK, || ran = true).unwrap_err();
    assert!(!ran, "the closure ran without a frozen guest");
    let m = e.to_string();
    assert!(
        m.contains("guest-fsfreeze-freeze failed")
            && m.contains("the guest is thawed")
            && m.contains("qga.sock"),
        "{m}"
    );
    let l = log_of(&log);
    let freeze = l.iter().position(|c| c == "guest-fsfreeze-freeze").unwrap();
    assert_eq!(
        l[freeze + 1..],
        ["<FF>", "guest-sync-delimited", "guest-fsfreeze-thaw"]
    );
    drop(a);
    h.join().unwrap();
}

#[test]
fn a_refused_freeze_is_not_thawed() {
    // Someone else froze the guest: their freeze must stay.
    let (mut a, log, h) = fake(
        b"",
        agent(|c| {
            match c {
        "guest-fsfreeze-freeze" => Act::Reply("{\"error\": {\"class\": \"GenericError\", \"desc\": \"Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state\"}}"),
        _ => Act::Reply("{\"return\": 1}"),
    }
        }),
    );
    let e = a.freeze_then(QUICK, || ()).unwrap_err();
    assert!(
        matches!(&e, AgentError::Protocol(p) if p.class() == Some("GenericError")),
        "{e}"
    );
    assert!(!log_of(&log).iter().any(|c| c == "guest-fsfreeze-thaw"));
    drop(a);
    h.join().unwrap();
}

#[test]
fn a_failing_thaw_is_retried_then_reported_as_still_frozen() {
    let (mut a, log, h) = fake(
        b"",
        agent(|c| {
            match c {
        "guest-fsfreeze-freeze" => Act::Reply("{\"return\": 1}"),
        _ => Act::Reply("{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed to thaw /mnt: Input/output error\"}}"),
    }
        }),
    );
    let e = a.freeze_then(QUICK, || ()).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("may still be frozen") && m.contains("Input/output error"),
        "{m}"
    );
    let thaws = log_of(&log)
        .iter()
        .filter(|c| *c == "guest-fsfreeze-thaw")
        .count();
    assert!(thaws >= 2, "thaw was tried {thaws} times");
    drop(a);
    h.join().unwrap();
}

#[test]
fn malformed_replies_and_silence_are_bounded_errors_and_resync() {
    let mut n = 0;
    let (mut a, log, h) = fake(
        b"",
        agent(move |_| {
            n += 1;
            match n {
                1 => Act::Reply("not json at all"),
                2 => Act::Silent,
                _ => Act::Reply("{\"return\": {}}"),
            }
        }),
    );
    let e = a.ping().unwrap_err();
    assert!(
        matches!(e, ProtocolError::Malformed { .. }) && e.to_string().contains("not json"),
        "{e}"
    );
    a.set_timeout(Duration::from_millis(300));
    let t0 = Instant::now();
    let e = a.ping().unwrap_err();
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    a.ping().unwrap();
    let syncs = log_of(&log)
        .iter()
        .filter(|c| *c == "guest-sync-delimited")
        .count();
    assert_eq!(syncs, 3, "{:?}", log_of(&log));
    drop(a);
    h.join().unwrap();
}

#[test]
fn no_agent_in_the_guest_times_out_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Accepts and never answers, like QEMU's chardev with no agent in the guest.
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        l.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(2500) {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        held.len()
    });
    let t0 = Instant::now();
    let e = GuestAgent::wait_ready(&sock, Duration::from_millis(1200))
        .err()
        .unwrap();
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
    assert!(
        t0.elapsed() < Duration::from_millis(2400),
        "{:?}",
        t0.elapsed()
    );
    assert!(h.join().unwrap() >= 1);
    let e = GuestAgent::connect(&dir.path().join("none.sock"), Duration::from_secs(1))
        .err()
        .unwrap();
    assert!(
        matches!(e, ProtocolError::Connect { .. }) && e.to_string().contains("none.sock"),
        "{e}"
    );
}
