//! The shipper's control socket: `shipper.sock` beside its lock (in the tracker's state
//! directory), the owner's only; one JSON request per line, one JSON response per line
//! (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`), like the tracker's.
//!
//! Requests: `{"op":"status"}` (the VM as the primary sees it: the status schema's
//! `VmStatus`), `{"op":"pause"}`, `{"op":"resume"}`, `{"op":"resync"}` (a checksum resync
//! now), `{"op":"set","key":K,"value":V}` (interval, bandwidth_limit, compression,
//! rpo_limit, app_consistent_every, at run time), `{"op":"reload"}` (read the configuration
//! file again, as SIGHUP does).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub const SOCKET: &str = "shipper.sock";
const MAX_LINE: u64 = 64 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Resync,
    Set { key: String, value: String },
    Reload,
}

/// A request for the shipper's driver, and where its answer goes.
pub struct Command {
    pub req: Request,
    pub reply: std::sync::mpsc::Sender<Result<Value, String>>,
}

/// Where the control socket of the shipper of the tracker at `control_socket` is.
pub fn socket_for(tracker_control: &Path) -> PathBuf {
    crate::lock::dir_of(tracker_control).join(SOCKET)
}

/// Binds the control socket (owner only; a stale one is replaced) and serves it on threads,
/// handing requests to `tx`.
pub fn start(path: &Path, tx: mpsc::UnboundedSender<Command>) -> io::Result<()> {
    let listener = vmreplica_common::unixsock::bind(
        path,
        &vmreplica_common::unixsock::SocketPerms::owner_only(),
    )?;
    std::thread::Builder::new()
        .name("shipper-control".into())
        .spawn(move || serve(listener, tx))?;
    Ok(())
}

fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<Command>) {
    for s in listener.incoming() {
        let Ok(s) = s else { return };
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("shipper-control-client".into())
            .spawn(move || {
                if let Err(e) = client(s, &tx) {
                    tracing::debug!("shipper control client: {e}");
                }
            });
    }
}

fn client(s: UnixStream, tx: &mpsc::UnboundedSender<Command>) -> io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        let n = (&mut r).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            writeln!(
                w,
                "{}",
                json!({"ok": false, "error": "request line too long"})
            )?;
            return Ok(());
        }
        let v = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            Ok(req) => {
                let (reply, answer) = std::sync::mpsc::channel();
                if tx.send(Command { req, reply }).is_err() {
                    json!({"ok": false, "error": "the shipper is stopping"})
                } else {
                    match answer.recv_timeout(Duration::from_secs(60)) {
                        Ok(Ok(v)) => json!({"ok": true, "result": v}),
                        Ok(Err(e)) => json!({"ok": false, "error": e}),
                        Err(_) => json!({"ok": false, "error": "the shipper did not answer"}),
                    }
                }
            }
        };
        writeln!(w, "{v}")?;
    }
}

/// Sends one request to a shipper's control socket; its result, or its error as Err.
/// `Ok(None)`: no shipper answers there.
pub fn call(socket: &Path, req: &Request) -> io::Result<Option<Value>> {
    vmreplica_common::jsonline::call_if_running(
        socket,
        "shipper control socket",
        req,
        Duration::from_secs(90),
    )
}
