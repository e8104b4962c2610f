//! The local control socket: one JSON request per line, one JSON response per line.
//!
//! Requests: `{"op":"status"}`, `{"op":"freeze","full":false}`,
//! `{"op":"release","generation":N,"applied":{"lineage":L,"cycle":N,"freeze":ID},"force":false}`
//! (refused without the replica's proof, naming the freeze, unless forced),
//! `{"op":"merge","generation":N}`,
//! `{"op":"clear-resync","disk":"NAME"}`,
//! `{"op":"set-lineage","lineage":L,"next_generation":N,"force":false,"parent":{"lineage":P,"cycle":C}}`
//! (`parent` optional: where a failover's new lineage continues from),
//! `{"op":"mark-resync","disk":"NAME"}` (an operator's explicit checksum resync);
//! failover's: `{"op":"seal"}` and `{"op":"unseal"}` (writes refused with EPERM while
//! sealed), `{"op":"freeze","baseline":true}` (a failover's baseline: never shipped),
//! `{"op":"mark-dirty","disk":"NAME","ranges":[[OFFSET,LEN],...]}`, `{"op":"dirty-ranges"}`.
//! Responses: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::tracker::{Parent, Tracker};
use vmreplica_common::lineage::Lineage;

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Freeze {
        #[serde(default)]
        full: bool,
        /// A failover's baseline (see `failover`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        baseline: bool,
    },
    Release {
        generation: u64,
        /// The replica's proof that it applied the generation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applied: Option<Applied>,
        #[serde(default)]
        force: bool,
    },
    Merge {
        generation: u64,
    },
    ClearResync {
        disk: String,
    },
    SetLineage {
        lineage: Lineage,
        next_generation: u64,
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<Parent>,
    },
    Seal,
    Unseal,
    MarkDirty {
        disk: String,
        ranges: Vec<(u64, u64)>,
    },
    DirtyRanges,
    MarkResync {
        disk: String,
    },
}

/// The replica's proof that it applied a generation: its lineage and cycle (and the
/// freeze's id, when the replica knows it).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Applied {
    pub lineage: Lineage,
    pub cycle: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<u64>,
}

/// The response to one request line (a test can put a proxy in front of the socket).
pub fn handle(tracker: &Tracker, line: &str) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let result = match req {
        Request::Status => {
            let st = tracker.state();
            let disks: Vec<Value> = tracker
                .disks()
                .iter()
                .zip(&st.disks)
                .map(|(d, ds)| {
                    let t = d.tracking();
                    json!({
                        "name": d.name,
                        "image": d.path,
                        "size": d.size,
                        "dirty_blocks": t.map(|t| t.bitmap().count(t.slots().active)),
                        "resync_required": ds.resync_required,
                        "connections": tracker.connections(&d.name),
                        "excluded": ds.excluded,
                    })
                })
                .collect();
            let (cow_used, cow_limit) = tracker.cow_usage();
            Ok(json!({
                "engine": tracker.engine_name(),
                "lineage": st.lineage,
                "parent": st.parent,
                "sealed": st.sealed,
                "last_write_at": tracker.last_write_at(),
                "pid": std::process::id(),
                "state_dir": tracker.state_dir(),
                "next_generation": st.next_generation,
                "granularity": st.granularity,
                "frozen": tracker.frozen(),
                "disks": disks,
                "cow_used_bytes": cow_used,
                "cow_limit_bytes": cow_limit,
            }))
        }
        Request::Freeze {
            full: _,
            baseline: true,
        } => tracker.freeze_baseline().map(|g| json!(g)),
        Request::Freeze { full, .. } => tracker.freeze_with(full, || {}).map(|g| json!(g)),
        Request::Release {
            generation,
            applied,
            force,
        } => tracker
            .release_proven(
                generation,
                applied.map(|a| (a.lineage, a.cycle, a.freeze)),
                force,
            )
            .map(|_| json!(null)),
        Request::SetLineage {
            next_generation, ..
        } if next_generation > vmreplica_common::wire::MAX_CYCLE => {
            let e = format!(
                "next_generation {next_generation} is out of range (at most {})",
                vmreplica_common::wire::MAX_CYCLE
            );
            return json!({"ok": false, "error": e});
        }
        Request::SetLineage {
            lineage,
            next_generation,
            force,
            parent,
        } => tracker
            .set_lineage_from(lineage, next_generation, parent, force)
            .map(|_| json!(null)),
        Request::Seal => tracker.seal(true).map(|_| json!(null)),
        Request::Unseal => tracker.seal(false).map(|_| json!(null)),
        Request::MarkDirty { disk, ranges } => {
            tracker.mark_dirty(&disk, &ranges).map(|_| json!(null))
        }
        Request::DirtyRanges => tracker.dirty_ranges().map(|v| {
            json!(v
                .into_iter()
                .map(|(name, ranges)| json!({"name": name, "ranges": ranges}))
                .collect::<Vec<_>>())
        }),
        Request::Merge { generation } => tracker.merge(generation).map(|_| json!(null)),
        Request::ClearResync { disk } => tracker.clear_resync(&disk).map(|_| json!(null)),
        Request::MarkResync { disk } => tracker.mark_resync(&disk).map(|_| json!(null)),
    };
    match result {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

fn serve_client(tracker: &Tracker, s: UnixStream) -> io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        let n = (&mut r).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            let v = json!({"ok": false, "error": "request line too long"});
            writeln!(w, "{v}")?;
            return Ok(());
        }
        let v = handle(tracker, line.trim());
        writeln!(w, "{v}")?;
    }
}

/// Serves the control socket until the listener is shut down.
pub fn serve(tracker: Arc<Tracker>, listener: UnixListener) {
    for s in listener.incoming() {
        match s {
            Ok(s) => {
                let t = Arc::clone(&tracker);
                let _ = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(&t, s) {
                            tracing::debug!("control client: {e}");
                        }
                    });
            }
            Err(_) => return,
        }
    }
}

/// Sends one request to a control socket and returns its result (or its error as Err).
pub fn call(socket: &Path, req: &Request) -> io::Result<Value> {
    vmreplica_common::jsonline::call(
        socket,
        "tracker control socket",
        req,
        Duration::from_secs(600),
    )
}
