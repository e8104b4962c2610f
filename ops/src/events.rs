//! The event stream, for scripts and alerting (like DRBD's `events2`): every role, and the
//! commands that change a VM's replication (pause, failover, seeding, ...), append one JSON
//! object per line to `RUN_DIR/events.jsonl` (see [`crate::registry::run_dir`]);
//! `vmreplica events [--follow]` prints them, and follows the file as it grows.
//!
//! Each line: `{"time":"2026-12-04T10:15:02.123Z","ts_ms":..,"event":"cycle-applied",
//! "vm":"vm1","source":"shipper","pid":1234, ...fields of the event}`. Event names are
//! the constants below; fields are documented in the README ("Events"). Lines are written
//! whole with one `write` under an exclusive lock of the file, so lines of several processes
//! never interleave; past 16 MiB the file is renamed to `events.jsonl.1` (one old file is
//! kept) and a new one begun. Emitting never fails the caller: a run directory that cannot
//! be written is logged (rate-limited).
//!
//! For failover (F2 and the lead): `events::emit(Event::new(events::FAILOVER_STEP)
//! .vm("vm1").field("step", "tracker-started").field("point", 42))`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const EVENTS_FILE: &str = "events.jsonl";
/// Size past which the file is rotated.
const ROTATE_AT: u64 = 16 << 20;

// Event names.
/// A cycle was applied on the replica (shipper: `cycle`, `kind`, `bytes`, `wire_bytes`,
/// `seconds`, `app_consistent`; applier: `cycle`, `kind`, `bytes`, `point`).
pub const CYCLE_APPLIED: &str = "cycle-applied";
/// A cycle attempt failed and is retried (`error`, `retry_in_s`).
pub const CYCLE_FAILED: &str = "cycle-failed";
/// A VM's health level changed (`site`, `from`, `to`, `reasons`).
pub const HEALTH_CHANGED: &str = "health-changed";
/// An initial copy started (`cycle`).
pub const INITIAL_COPY_STARTED: &str = "initial-copy-started";
/// A checksum resync started (`cycle`, `requested`: asked for by an operator).
pub const RESYNC_STARTED: &str = "resync-started";
pub const PAUSED: &str = "paused";
pub const RESUMED: &str = "resumed";
/// Settings changed at run time (`changed`: {key: value}, `by`: "set" | "sighup").
pub const SETTINGS_CHANGED: &str = "settings-changed";
/// The bandwidth schedule moved to another limit (`limit_bytes_per_second`, null: none).
pub const BANDWIDTH_CHANGED: &str = "bandwidth-changed";
/// An application-consistent freeze (`generation`, `frozen_ms`, `filesystems`) or its
/// failure (`error`: the point is crash-consistent).
pub const APP_CONSISTENT_FREEZE: &str = "app-consistent-freeze";
/// Replication stopped and needs an operator (`error`).
pub const REPLICATION_STOPPED: &str = "replication-stopped";
/// A seed was written (`dir`, `generation`) or installed (`dir`, `cycle`).
pub const SEED_EXPORTED: &str = "seed-exported";
pub const SEED_IMPORTED: &str = "seed-imported";
/// A VM's replication state was removed on this site (`site`).
pub const REMOVED: &str = "removed";
/// A step of a failover (F2: `step`, and what it concerns: `point`, `lineage`, ...).
pub const FAILOVER_STEP: &str = "failover-step";

/// One event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// Milliseconds since the epoch.
    pub ts_ms: u64,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Who emitted it: `tracker`, `shipper`, `applier`, `cli`, ...
    pub source: String,
    pub pid: u32,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

static SOURCE: OnceLock<String> = OnceLock::new();

/// Names this process's events' `source` (once, at start; default `cli`).
pub fn set_source(source: &str) {
    let _ = SOURCE.set(source.to_string());
}

impl Event {
    pub fn new(event: &str) -> Event {
        let now = SystemTime::now();
        let ts_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Event {
            time: humantime::format_rfc3339_millis(now).to_string(),
            ts_ms,
            event: event.to_string(),
            vm: None,
            source: SOURCE.get().cloned().unwrap_or_else(|| "cli".into()),
            pid: std::process::id(),
            fields: Map::new(),
        }
    }

    pub fn vm(mut self, vm: &str) -> Event {
        self.vm = Some(vm.to_string());
        self
    }

    pub fn field(mut self, key: &str, value: impl Serialize) -> Event {
        self.fields.insert(
            key.to_string(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
        self
    }
}

/// Appends `e` to the host's event stream; never fails the caller.
pub fn emit(e: Event) {
    let r = crate::registry::ensure_run_dir().and_then(|d| emit_in(&d, &e));
    if let Err(err) = r {
        vmreplica_common::warn_limited!(
            Duration::from_secs(60),
            "event stream {}: {err}; event {} not recorded",
            crate::registry::run_dir().join(EVENTS_FILE).display(),
            e.event
        );
    }
}

/// Appends `e` to `dir/events.jsonl`.
pub fn emit_in(dir: &Path, e: &Event) -> io::Result<()> {
    let path = dir.join(EVENTS_FILE);
    let mut line = serde_json::to_vec(e).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut f = loop {
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        // SAFETY: flock on a descriptor this function owns; released when it is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Another writer may have rotated the file while this one waited for the lock.
        if std::fs::metadata(&path).map(|m| m.ino()).ok() == Some(f.metadata()?.ino()) {
            break f;
        }
    };
    if f.metadata()?.len() >= ROTATE_AT {
        std::fs::rename(&path, dir.join(format!("{EVENTS_FILE}.1")))?;
        // Still holding the old file's lock: writers waiting for it find it rotated and
        // open the new one.
        let mut new = OpenOptions::new().create(true).append(true).open(&path)?;
        new.write_all(&line)?;
        drop(f);
        return Ok(());
    }
    f.write_all(&line)
}

/// The events in `dir` (the rotated file first), oldest first; lines that do not parse are
/// skipped.
pub fn read_all(dir: &Path) -> Vec<Event> {
    let mut out = Vec::new();
    for p in [dir.join(format!("{EVENTS_FILE}.1")), dir.join(EVENTS_FILE)] {
        let Ok(f) = File::open(&p) else { continue };
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if let Ok(e) = serde_json::from_str(&line) {
                out.push(e);
            }
        }
    }
    out
}

/// Reads lines appended to the event file from where it was when made, across rotations.
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    pos: u64,
    partial: String,
}

impl Follower {
    /// Follows `dir/events.jsonl`: from its end now (`from_start`: from its beginning).
    pub fn new(dir: &Path, from_start: bool) -> Follower {
        let mut f = Follower {
            path: dir.join(EVENTS_FILE),
            file: None,
            ino: 0,
            pos: 0,
            partial: String::new(),
        };
        f.reopen();
        if !from_start {
            f.pos = f
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len());
        }
        f
    }

    fn reopen(&mut self) {
        self.file = File::open(&self.path).ok();
        self.ino = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.ino());
        self.pos = 0;
    }

    /// Complete lines appended since the last call.
    pub fn poll(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        self.read_rest(&mut lines);
        // Rotated (or created) since: finish the old file above, then start the new one.
        let now = std::fs::metadata(&self.path).map_or(0, |m| m.ino());
        if now != 0 && now != self.ino {
            self.reopen();
            self.partial.clear();
            self.read_rest(&mut lines);
        }
        lines
    }

    fn read_rest(&mut self, lines: &mut Vec<String>) {
        let Some(f) = self.file.as_mut() else { return };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = String::new();
        let n = f.take(64 << 20).read_to_string(&mut buf).unwrap_or(0);
        self.pos += n as u64;
        self.partial.push_str(&buf);
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            lines.push(line.trim_end().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_appended_read_and_followed_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut follow = Follower::new(dir.path(), false);
        assert!(follow.poll().is_empty());
        set_source("test");
        emit_in(
            dir.path(),
            &Event::new(CYCLE_APPLIED).vm("vm1").field("cycle", 7),
        )
        .unwrap();
        emit_in(dir.path(), &Event::new(PAUSED).vm("vm1")).unwrap();
        let all = read_all(dir.path());
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].event, CYCLE_APPLIED);
        assert_eq!(all[0].vm.as_deref(), Some("vm1"));
        assert_eq!(all[0].fields["cycle"], 7);
        assert_eq!(all[0].source, "test");
        let lines = follow.poll();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let e: Event = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(e.event, PAUSED);

        // Past the size limit the file rotates; the follower finishes the old file, then
        // reads the new one.
        let big = "x".repeat(1 << 20);
        for _ in 0..17 {
            emit_in(dir.path(), &Event::new("filler").field("pad", &big)).unwrap();
        }
        emit_in(dir.path(), &Event::new(RESUMED).vm("vm1")).unwrap();
        assert!(dir.path().join("events.jsonl.1").exists());
        let lines = follow.poll();
        assert_eq!(lines.len(), 18);
        assert!(lines.last().unwrap().contains("\"resumed\""));
        assert_eq!(read_all(dir.path()).last().unwrap().event, RESUMED);
    }
}
