//! QMP corner cases against a scripted fake server over a socketpair (real QEMU is tested in
//! `tests/qemu.rs`; here are the replies QEMU does not send on demand).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

pub(crate) struct FakeServer {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl FakeServer {
    pub(crate) fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).unwrap();
        self.w.write_all(b"\r\n").unwrap();
    }
    pub(crate) fn recv(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("client sent {l:?}: {e}"))
    }
    /// Waits for the client to hang up.
    pub(crate) fn until_closed(mut self) {
        let mut l = String::new();
        while self.r.read_line(&mut l).unwrap_or(0) > 0 {}
    }
    /// Reads a command, checks its name, returns its id.
    pub(crate) fn expect(&mut self, cmd: &str) -> Value {
        let v = self.recv();
        assert_eq!(v["execute"], cmd, "{v}");
        v["id"].clone()
    }
}

fn fake(script: impl FnOnce(FakeServer) + Send + 'static) -> (LineConn, JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let peer = FakeServer {
        r: BufReader::new(b.try_clone().unwrap()),
        w: b,
    };
    let h = std::thread::spawn(move || script(peer));
    (
        LineConn::from_stream(a, Peer::qmp(Path::new("/run/vm1/qmp.sock"))),
        h,
    )
}

fn negotiated(mut p: FakeServer) -> FakeServer {
    p.send(GREETING);
    let id = p.expect("qmp_capabilities");
    p.send(&format!(r#"{{"return": {{}}, "id": {id}}}"#));
    p
}

const T: Duration = Duration::from_secs(5);

#[test]
fn executes_with_arguments_and_buffers_events_that_arrive_first() {
    let (c, h) = fake(|p| {
        let mut p = negotiated(p);
        let v = p.recv();
        assert_eq!(v["execute"], "human-monitor-command");
        assert_eq!(v["arguments"]["command-line"], "info block");
        p.send(r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}"#);
        p.send(r#"{"event": "BLOCK_IO_ERROR", "data": {"device": "sys", "operation": "write", "action": "stop"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#);
        p.send(&format!(r#"{{"return": "ok", "id": {}}}"#, v["id"]));
        p.send(r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}, "timestamp": {"seconds": 3, "microseconds": 4}}"#);
        let id = p.expect("query-status");
        p.send(&format!(
            r#"{{"return": {{"status": "running", "running": true}}, "id": {id}}}"#
        ));
        p.until_closed();
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    assert_eq!(q.qemu_version().as_deref(), Some("10.0.2"));
    let r = q
        .execute(
            "human-monitor-command",
            Some(json!({"command-line": "info block"})),
        )
        .unwrap();
    assert_eq!(r, "ok");
    let e = q.wait_event("BLOCK_IO_ERROR", T).unwrap();
    assert_eq!(e.data["device"], "sys");
    assert_eq!(e.timestamp, Some((1, 2)));
    assert_eq!(
        q.wait_event("SHUTDOWN", T).unwrap().data["reason"],
        "guest-shutdown"
    );
    assert_eq!(q.query_status().unwrap(), "running");
    let left = q.take_events(Duration::ZERO).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].name, "STOP");
    assert_eq!(left[0].timestamp, Some((1_700_000_000, 5)));
    drop(q);
    h.join().unwrap();
}

#[test]
fn error_replies_are_typed_and_name_socket_and_command() {
    let (c, h) = fake(|p| {
        let mut p = negotiated(p);
        let id = p.expect("blockdev-del");
        p.send(&format!(
            r#"{{"error": {{"class": "GenericError", "desc": "Node 'x' is busy"}}, "id": {id}}}"#
        ));
        // Errors found before the id was parsed carry none: still this command's.
        p.expect("bogus");
        p.send(r#"{"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}}"#);
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let e = q
        .execute("blockdev-del", Some(json!({"node-name": "x"})))
        .unwrap_err();
    assert_eq!(e.class(), Some("GenericError"));
    let m = e.to_string();
    assert!(
        m.contains("/run/vm1/qmp.sock") && m.contains("blockdev-del") && m.contains("busy"),
        "{m}"
    );
    let e = q.execute("bogus", None).unwrap_err();
    assert_eq!(e.class(), Some("CommandNotFound"));
    h.join().unwrap();
}

#[test]
fn a_late_reply_after_a_timeout_is_dropped_by_its_id() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (c, h) = fake(move |p| {
        let mut p = negotiated(p);
        let slow = p.expect("query-block");
        rx.recv().unwrap(); // the client has given up on it
        let fast = p.expect("query-status");
        p.send(&format!(
            r#"{{"return": [{{"device": "late"}}], "id": {slow}}}"#
        ));
        p.send(&format!(
            r#"{{"return": {{"status": "paused"}}, "id": {fast}}}"#
        ));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let t0 = Instant::now();
    let e = q
        .execute_within("query-block", None, Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("running query-block"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    tx.send(()).unwrap();
    assert_eq!(q.query_status().unwrap(), "paused");
    h.join().unwrap();
}

#[test]
fn malformed_input_is_refused_with_an_excerpt() {
    // Not a QMP socket at all (the guest agent says nothing; an HTTP server says this).
    let (c, h) = fake(|mut p| p.send("HTTP/1.1 400 Bad Request"));
    let e = Qmp::handshake(c, T).err().unwrap().to_string();
    assert!(
        e.contains("not a QMP greeting") && e.contains("HTTP/1.1"),
        "{e}"
    );
    h.join().unwrap();

    for bad in [
        "{\"return\": {}, \"id\": ",
        "[1, 2]",
        "{\"hello\": 1}",
        "{\"event\": 5}",
        "{\"return\": {}}",
    ] {
        let (c, h) = fake(move |p| {
            let mut p = negotiated(p);
            p.expect("query-status");
            p.send(bad);
        });
        let mut q = Qmp::handshake(c, T).unwrap();
        let e = q.query_status().unwrap_err();
        assert!(matches!(e, QmpError::Malformed { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("/run/vm1/qmp.sock"), "{e}");
        h.join().unwrap();
    }
}

#[test]
fn silence_and_hangups_end_in_bounded_errors() {
    let (c, h) = fake(|p| {
        std::thread::sleep(Duration::from_millis(600));
        drop(p);
    });
    let t0 = Instant::now();
    let e = Qmp::handshake(c, Duration::from_millis(200)).err().unwrap();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_millis(550));
    h.join().unwrap();

    let (c, h) = fake(|p| {
        let mut p = negotiated(p);
        p.expect("quit");
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let e = q.execute("quit", None).unwrap_err();
    assert!(matches!(e, QmpError::Closed { .. }), "{e}");
    h.join().unwrap();

    let (c, h) = fake(|p| drop(negotiated(p)));
    let mut q = Qmp::handshake(c, T).unwrap();
    h.join().unwrap();
    let e = q.wait_event("SHUTDOWN", T).unwrap_err();
    assert!(matches!(e, QmpError::Closed { .. }), "{e}");
}

#[test]
fn waiting_for_an_event_that_never_comes_times_out() {
    let (c, h) = fake(|p| {
        let mut p = negotiated(p);
        p.send(r#"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}}"#);
        std::thread::sleep(Duration::from_millis(800));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let e = q
        .wait_event("SHUTDOWN", Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert_eq!(q.wait_event("RESUME", T).unwrap().data, Value::Null);
    h.join().unwrap();
}
