//! The runtime registry: every running vmreplica role (tracker, shipper, applier, and what
//! failover starts) leaves a small JSON file in the run directory naming its process and its
//! sockets, so that `vmreplica status` finds every role on the host without being told where
//! each keeps its state.
//!
//! The run directory is `/run/vmreplica` (a tmpfs: entries vanish with a reboot, as the
//! processes do), or `$VMREPLICA_RUN_DIR` (tests set it). Each process writes
//! `ROLE-PID.json` atomically when it starts serving and removes it when it stops; an entry
//! left by a process that died (kill -9) is recognised by its PID no longer running the same
//! process (its start time in `/proc/PID/stat` differs) and is removed by the next reader.
//! Registering never stops a role: a run directory that cannot be written is logged, and the
//! role runs on unlisted.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The environment variable that moves the run directory (tests, unprivileged users).
pub const RUN_DIR_ENV: &str = "VMREPLICA_RUN_DIR";
/// The run directory by default.
pub const DEFAULT_RUN_DIR: &str = "/run/vmreplica";

pub const TRACKER: &str = "tracker";
pub const SHIPPER: &str = "shipper";
pub const APPLIER: &str = "applier";

/// Where entries (and the event log) live.
pub fn run_dir() -> PathBuf {
    std::env::var_os(RUN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// One running role.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// `tracker`, `shipper`, `applier`, or a role failover adds.
    pub role: String,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`, field 22): a
    /// PID reused by another process has another.
    pub start_ticks: u64,
    /// Seconds since the epoch when it registered.
    pub since: u64,
    /// The VM it serves (a shipper's; a tracker knows its disks, not their VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Its own local socket: a tracker's control socket, a shipper's control socket, an
    /// applier's admin socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<PathBuf>,
    /// A shipper's tracker (its control socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<PathBuf>,
    /// A tracker's state directory, an applier's store, a shipper's state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PathBuf>,
    /// A shipper's configuration file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// Its Prometheus listener, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

impl Entry {
    /// An entry for this process in `role`.
    pub fn me(role: &str) -> Entry {
        let pid = std::process::id();
        Entry {
            role: role.to_string(),
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
            since: now(),
            ..Entry::default()
        }
    }

    /// Whether the process that registered is still the one running under its PID.
    pub fn alive(&self) -> bool {
        start_ticks(self.pid).is_some_and(|t| t == self.start_ticks)
    }

    fn file_name(&self) -> String {
        format!("{}-{}.json", self.role, self.pid)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Field 22 of `/proc/PID/stat` (after the parenthesised command, which may hold spaces);
/// None for a process that is gone, or has exited and waits to be reaped (a zombie).
fn start_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = s[s.rfind(')')? + 1..].split_whitespace();
    // Fields after the command start at field 3 (state): 22 is the 20th of them.
    if matches!(rest.next(), Some("Z" | "X")) {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

/// This process's entry, removed when dropped.
#[derive(Debug)]
pub struct Registration {
    path: Option<PathBuf>,
    entry: Entry,
}

impl Registration {
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Rewrites the entry (a listener bound later, a VM learnt).
    pub fn update(&mut self, f: impl FnOnce(&mut Entry)) {
        f(&mut self.entry);
        if let Some(p) = &self.path {
            if let Err(e) = write(p, &self.entry) {
                tracing::warn!("runtime registry {}: {e}", p.display());
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn write(path: &Path, e: &Entry) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(e).map_err(io::Error::other)?;
    vmreplica_common::write_atomic(path, &data)
}

/// Makes the run directory (mode 0755: every user may read what runs; only root writes
/// under /run).
pub fn ensure_run_dir() -> io::Result<PathBuf> {
    let dir = run_dir();
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    }
    Ok(dir)
}

/// Registers `entry` (see [`Entry::me`]). Never fails: a run directory that cannot be
/// written is logged once, and the returned registration is a no-op.
pub fn register(entry: Entry) -> Registration {
    let r = ensure_run_dir().and_then(|dir| {
        let p = dir.join(entry.file_name());
        write(&p, &entry)
            .map(|()| p.clone())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    });
    match r {
        Ok(p) => Registration {
            path: Some(p),
            entry,
        },
        Err(e) => {
            tracing::warn!(
                "runtime registry: {e}; `vmreplica status` will not list this {} (set {RUN_DIR_ENV} to a writable directory)",
                entry.role
            );
            Registration { path: None, entry }
        }
    }
}

/// The live entries of the run directory (oldest first); entries of processes gone are
/// removed on the way (best effort).
pub fn list() -> Vec<Entry> {
    list_in(&run_dir())
}

pub fn list_in(dir: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.starts_with('.') {
            continue;
        }
        let Ok(text) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(entry) = serde_json::from_slice::<Entry>(&text) else {
            continue;
        };
        if entry.alive() {
            out.push(entry);
        } else {
            let _ = std::fs::remove_file(e.path());
        }
    }
    out.sort_by_key(|e| (e.since, e.pid));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_appear_update_and_go_and_dead_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Entry::me(SHIPPER);
        assert!(e.alive(), "this process is alive");
        e.vm = Some("vm1".into());
        let p = dir.path().join(e.file_name());
        write(&p, &e).unwrap();
        let mut r = Registration {
            path: Some(p.clone()),
            entry: e.clone(),
        };
        assert_eq!(list_in(dir.path()), vec![e.clone()]);
        r.update(|e| e.metrics = Some("127.0.0.1:9464".into()));
        assert_eq!(
            list_in(dir.path())[0].metrics.as_deref(),
            Some("127.0.0.1:9464")
        );
        drop(r);
        assert!(list_in(dir.path()).is_empty() && !p.exists());

        // A process that died (or a PID now used by another process): removed when read.
        let mut dead = Entry::me(TRACKER);
        dead.start_ticks += 1;
        let p = dir.path().join(dead.file_name());
        write(&p, &dead).unwrap();
        std::fs::write(dir.path().join("junk.json"), b"not json").unwrap();
        assert!(list_in(dir.path()).is_empty());
        assert!(!p.exists(), "the dead entry is removed");
    }
}
