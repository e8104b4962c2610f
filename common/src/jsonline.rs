//! The client side of the local control sockets (the tracker's control socket, the
//! shipper's control socket, the applier's admin socket): one JSON request per line, one
//! JSON answer per line, `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

/// The largest answer read (a status of many VMs stays far below it); a longer line is
/// cut there and then fails to parse, naming the socket.
const MAX_ANSWER: u64 = 64 << 20;

/// Sends `req` to the socket at `socket` (`what` names it in errors, e.g. "tracker control
/// socket") and returns the answer's result, or its error as Err. A connect error keeps
/// its kind (NotFound: nothing there; ConnectionRefused: nobody listening).
pub fn call(
    socket: &Path,
    what: &str,
    req: &impl Serialize,
    timeout: Duration,
) -> io::Result<Value> {
    let s = UnixStream::connect(socket)
        .map_err(|e| io::Error::new(e.kind(), format!("{what} {}: {e}", socket.display())))?;
    exchange(s, socket, what, req, timeout)
}

/// [`call`] for a process that may not be running: `Ok(None)` when nothing listens at
/// `socket` (no socket file, or a stale one).
pub fn call_if_running(
    socket: &Path,
    what: &str,
    req: &impl Serialize,
    timeout: Duration,
) -> io::Result<Option<Value>> {
    match call(socket, what, req, timeout) {
        Err(e) if nobody_listens(&e) => Ok(None),
        r => r.map(Some),
    }
}

/// Whether a [`call`] error says that no process listens at the socket (as opposed to an
/// error of the exchange or an answer that is an error).
pub fn nobody_listens(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

fn exchange(
    mut s: UnixStream,
    socket: &Path,
    what: &str,
    req: &impl Serialize,
    timeout: Duration,
) -> io::Result<Value> {
    let at = |e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", socket.display()));
    s.set_read_timeout(Some(timeout)).map_err(at)?;
    let line = serde_json::to_string(req).map_err(io::Error::other)?;
    writeln!(s, "{line}").map_err(at)?;
    let mut answer = String::new();
    BufReader::new(s)
        .take(MAX_ANSWER)
        .read_line(&mut answer)
        .map_err(at)?;
    let v: Value = serde_json::from_str(&answer).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} {}: bad answer: {e}", socket.display()),
        )
    })?;
    if v["ok"] == json!(true) {
        Ok(v["result"].clone())
    } else {
        // Kind Other, never NotFound/ConnectionRefused: a refusal is not an absent process.
        Err(io::Error::other(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(dir: &Path, answer: &'static str) -> std::path::PathBuf {
        let p = dir.join("s.sock");
        let l = UnixListener::bind(&p).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"op\":\"status\"}\n");
            (&s).write_all(answer.as_bytes()).unwrap();
        });
        p
    }

    const REQ: &str = "status";

    #[derive(Serialize)]
    struct Op {
        op: &'static str,
    }

    #[test]
    fn results_errors_and_absent_processes() {
        let dir = tempfile::tempdir().unwrap();
        let t = Duration::from_secs(5);
        let p = serve_once(dir.path(), "{\"ok\":true,\"result\":{\"a\":1}}\n");
        assert_eq!(
            call(&p, "x socket", &Op { op: REQ }, t).unwrap(),
            json!({"a": 1})
        );
        std::fs::remove_file(&p).unwrap();
        let p = serve_once(dir.path(), "{\"ok\":false,\"error\":\"no such VM vm9\"}\n");
        let e = call_if_running(&p, "x socket", &Op { op: REQ }, t).unwrap_err();
        assert_eq!(e.to_string(), "no such VM vm9");
        assert!(!nobody_listens(&e));
        std::fs::remove_file(&p).unwrap();
        let p = serve_once(dir.path(), "not json\n");
        let e = call(&p, "x socket", &Op { op: REQ }, t).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("x socket {}: bad answer", p.display())),
            "{e}"
        );
        // No socket file; a stale socket file nobody listens on.
        let gone = dir.path().join("gone.sock");
        assert!(call_if_running(&gone, "x socket", &Op { op: REQ }, t)
            .unwrap()
            .is_none());
        let e = call(&gone, "tracker control socket", &Op { op: REQ }, t).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("tracker control socket"), "{e}");
        drop(UnixListener::bind(&gone).unwrap());
        assert!(call_if_running(&gone, "x socket", &Op { op: REQ }, t)
            .unwrap()
            .is_none());
    }
}
