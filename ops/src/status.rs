//! `vmreplica status`: the documented, versioned JSON schema (`vmreplica-status`, version 1)
//! and the health rules, shared by both sites (the shipper reports the primary's view of a
//! VM, the applier the replica's; the command line gathers them).
//!
//! Compatibility: within version 1 fields are only ever added (readers ignore fields they do
//! not know); a field removed or changed in meaning makes version 2. Times are seconds since
//! the epoch (UTC), durations seconds, sizes bytes; a value a site cannot know is `null`
//! (the replica does not know the primary's backlog; the primary does not hold points). The
//! README ("Status and health") documents each field; `ops/tests/schema.rs` pins the schema.

use serde::{Deserialize, Serialize};

use crate::history::LastHour;

pub const SCHEMA: &str = "vmreplica-status";
pub const SCHEMA_VERSION: u32 = 1;
/// The RPO limit when none is configured: past it health is Critical.
pub const DEFAULT_RPO_LIMIT: u64 = 3600;

/// Everything `vmreplica status --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema: String,
    pub version: u32,
    pub host: String,
    /// When it was made.
    pub time: u64,
    pub vms: Vec<VmStatus>,
}

impl Report {
    pub fn new(host: String, time: u64, vms: Vec<VmStatus>) -> Report {
        Report {
            schema: SCHEMA.into(),
            version: SCHEMA_VERSION,
            host,
            time,
            vms,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Normal,
    Warning,
    Critical,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub level: Level,
    /// Why, most serious first (empty when normal).
    pub reasons: Vec<String>,
}

/// Which side of the replication this report is from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Site {
    Primary,
    Replica,
}

/// What replication of the VM is doing. `failed-over` and `test-failover` come from the
/// replica state's role and test pins (failover: F1/F2).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The first full copy is under way (progress says how far).
    InitialCopy,
    Replicating,
    Paused,
    /// A checksum resync is under way.
    Resynchronizing,
    /// Tracking was lost; the next cycle is a checksum resync.
    ResyncRequired,
    FailedOver,
    TestFailover,
    /// Replication does not run (no shipper, or it stopped on an error that needs an
    /// operator).
    Stopped,
}

/// The cycle being shipped or received.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub cycle: u64,
    /// `initial`, `delta`, `resync`.
    pub kind: String,
    /// `comparing` (a resync's checksum pass) or `sending`.
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_second: f64,
    pub eta_seconds: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub cycle: u64,
    /// When it was applied.
    pub time: u64,
    pub age_seconds: u64,
    /// `initial`, `delta`, `resync`, `seed`.
    pub kind: String,
    pub app_consistent: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    /// Served by the tracker but neither tracked nor shipped (swap, scratch): failover
    /// recreates it blank.
    pub excluded: bool,
    /// Changed and not yet frozen (primary only).
    pub dirty_bytes: Option<u64>,
    pub resync_required: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AppConsistent {
    /// How often an application-consistent point is made (None: never).
    pub every_seconds: Option<u64>,
    /// The newest application-consistent point (replica) or freeze (primary).
    pub last_time: Option<u64>,
    pub last_cycle: Option<u64>,
    /// How long the guest's filesystems were frozen for it.
    pub last_frozen_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// A process serving the VM on this host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Process {
    pub role: String,
    pub pid: u32,
    pub socket: Option<String>,
}

/// One VM as one site sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    pub vm: String,
    pub site: Site,
    /// `primary`, `replica`, or a failover role (`failed-over`, ...) from the replica state.
    pub role: String,
    pub state: State,
    pub health: Health,
    pub progress: Option<Progress>,
    pub lineage: Option<String>,
    /// None: continuous.
    pub interval_seconds: Option<u64>,
    pub rpo_limit_seconds: u64,
    /// Data since the freeze of the last applied cycle would be lost now.
    pub rpo_seconds: Option<u64>,
    pub last_cycle: Option<u64>,
    pub latest_point: Option<Point>,
    /// Recovery points held (replica).
    pub points: Option<u64>,
    /// Bytes changed and not yet applied on the replica: dirty, frozen and in flight
    /// (primary).
    pub backlog_bytes: Option<u64>,
    pub last_hour: LastHour,
    /// Since protection began (kept across restarts): cycles, data bytes, wire bytes.
    pub total_cycles: u64,
    pub total_bytes: u64,
    pub total_wire_bytes: u64,
    /// Data bytes over bytes on the wire, last hour (primary).
    pub compression_ratio: Option<f64>,
    /// Wire bytes per second of the newest cycle that carried data (primary).
    pub link_rate_bytes_per_second: Option<f64>,
    /// The limit in force now (configured or from the schedule), bytes per second.
    pub bandwidth_limit_bytes_per_second: Option<u64>,
    pub compression: Option<bool>,
    pub last_error: Option<String>,
    pub last_error_time: Option<u64>,
    pub app_consistent: AppConsistent,
    pub disks: Vec<DiskStatus>,
    pub processes: Vec<Process>,
    /// The failover this site is part of (replica site; added in version 1).
    #[serde(default)]
    pub failover: Option<FailoverStatus>,
    /// Test failovers served on this site (replica site; added in version 1).
    #[serde(default)]
    pub test_failovers: Vec<TestFailoverStatus>,
    /// Since when replication is paused (added in version 1): the primary's pause, on the
    /// replica site as the primary told it (the primary's clock).
    #[serde(default)]
    pub paused_since: Option<u64>,
}

/// A failover of the VM that involves this site (the replica site's view, from its replica
/// state's role; None while the site is a plain replica).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverStatus {
    /// `rolling-back` (an unplanned failover to an older point is undoing later cycles),
    /// `awaiting-commit` (the disks are served; `failover commit` or `cancel`), `cancelling`,
    /// `committed` (this site is the VM's primary; nothing replicates back yet), `reversing`
    /// (this site is the primary and replicates back to the old primary), `awaiting-reverse`
    /// (the old primary's site: its images wait for the new primary's reverse cycle).
    pub sub_state: String,
    /// The point failed over to (a cycle of the old lineage), or the one the reverse cycle
    /// continues.
    pub point: u64,
    /// When the failover (or the wait for the reverse cycle) began, seconds since the epoch.
    pub since: u64,
    /// The new primary's lineage (None on the old primary's site).
    pub lineage: Option<String>,
}

/// A test failover of one point of the VM (replica site), served while replication goes on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestFailoverStatus {
    pub point: u64,
    /// When it started, seconds since the epoch.
    pub since: u64,
    /// Each disk's NBD URIs: `uri` on the applier's unix socket, `tcp_uri` when also served
    /// on TCP with TLS. Empty when the test is recorded but not served (see `error`).
    pub disks: Vec<TestDisk>,
    /// The PID of the test VM booted from the shipped definition, if one runs.
    pub vm_pid: Option<u32>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestDisk {
    pub disk: String,
    pub uri: String,
    pub tcp_uri: Option<String>,
}

/// What the health rules look at.
#[derive(Clone, Debug, Default)]
pub struct HealthInput {
    /// Replication does not run, and why (no shipper, an error that needs an operator).
    pub stopped: Option<String>,
    /// Disks whose tracking was lost (a resync is needed and not under way).
    pub tracking_lost: Vec<String>,
    /// An operator asked for a checksum resync; it has not started yet.
    pub resync_requested: bool,
    pub resyncing: bool,
    pub paused: bool,
    /// No recovery point yet (the initial copy has not finished).
    pub no_point: bool,
    pub interval: Option<u64>,
    pub rpo_limit: u64,
    pub rpo: Option<u64>,
    pub last_hour: LastHour,
}

fn dur(s: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
}

/// Hyper-V Replica's rules as a base:
/// - Critical: replication has stopped; tracking was lost (and no resync runs); the latest
///   point is older than the RPO limit.
/// - Warning: more than 20% of the last hour's expected cycles were missed; the latest
///   point is older than twice the interval; paused; resynchronizing; the initial copy has
///   not finished.
/// - Paused (Hyper-V's "Replication paused"): Warning at most from the pause; the age and
///   missed-cycle rules wait for the resume (a stop or lost tracking is still Critical).
pub fn health(i: &HealthInput) -> Health {
    let mut critical = Vec::new();
    let mut warning = Vec::new();
    if let Some(why) = &i.stopped {
        critical.push(format!("replication has stopped: {why}"));
    }
    if !i.tracking_lost.is_empty() && !i.resyncing {
        critical.push(format!(
            "tracking was lost on disk {}: the next cycle is a checksum resync",
            i.tracking_lost.join(", ")
        ));
    }
    match i.rpo {
        // Paused by an operator: the age of the latest point is what a pause means, not a
        // failure (Hyper-V: "Replication paused", health Warning).
        Some(_) if i.paused => {}
        Some(rpo) if rpo > i.rpo_limit => critical.push(format!(
            "the latest point is {} old, over the RPO limit of {}",
            dur(rpo),
            dur(i.rpo_limit)
        )),
        Some(rpo) if i.interval.is_some_and(|iv| rpo > 2 * iv) => warning.push(format!(
            "the latest point is {} old, more than twice the interval ({})",
            dur(rpo),
            dur(i.interval.unwrap_or(0))
        )),
        _ => {}
    }
    let h = &i.last_hour;
    if let Some(expected) = h.cycles_expected.filter(|e| *e > 0 && !i.paused) {
        if h.cycles_missed * 5 > expected {
            warning.push(format!(
                "{} of the {expected} cycles of the last hour were missed",
                h.cycles_missed
            ));
        }
    }
    if i.paused {
        warning.push("replication is paused (`vmreplica resume VM`)".into());
    }
    if i.resyncing {
        warning.push("a checksum resync is under way".into());
    }
    if i.resync_requested {
        warning.push(if i.paused {
            "a checksum resync was requested: it runs when replication resumes".into()
        } else {
            "a checksum resync was requested: the next cycle compares every block".into()
        });
    }
    if i.no_point && i.stopped.is_none() {
        warning.push("the initial copy has not finished: no recovery point yet".into());
    }
    let level = if !critical.is_empty() {
        Level::Critical
    } else if !warning.is_empty() {
        Level::Warning
    } else {
        Level::Normal
    };
    critical.extend(warning);
    Health {
        level,
        reasons: critical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HealthInput {
        HealthInput {
            interval: Some(300),
            rpo_limit: 3600,
            rpo: Some(100),
            last_hour: LastHour {
                cycles_done: 11,
                cycles_expected: Some(11),
                ..LastHour::default()
            },
            ..HealthInput::default()
        }
    }

    #[test]
    fn hyper_v_rules() {
        assert_eq!(health(&base()).level, Level::Normal);
        assert!(health(&base()).reasons.is_empty());
        let mut i = base();
        i.last_hour.cycles_missed = 2; // 18%
        assert_eq!(health(&i).level, Level::Normal);
        i.last_hour.cycles_missed = 3; // 27%
        let h = health(&i);
        assert_eq!(h.level, Level::Warning);
        assert!(h.reasons[0].contains("3 of the 11 cycles"), "{h:?}");
        let mut i = base();
        i.rpo = Some(601);
        assert!(health(&i).reasons[0].contains("twice the interval"));
        i.rpo = Some(3601);
        let h = health(&i);
        assert_eq!(h.level, Level::Critical);
        assert!(h.reasons[0].contains("RPO limit of 1h"), "{h:?}");
        let mut i = base();
        i.paused = true;
        i.rpo = Some(1000);
        let h = health(&i);
        assert_eq!(
            (h.level, h.reasons.len()),
            (Level::Warning, 1),
            "paused: the age rule waits for the RPO limit: {h:?}"
        );
        // Paused past the RPO limit, cycles missed before the pause: still Warning only.
        i.rpo = Some(7200);
        i.last_hour.cycles_missed = 5;
        let h = health(&i);
        assert_eq!((h.level, h.reasons.len()), (Level::Warning, 1), "{h:?}");
        assert!(h.reasons[0].contains("paused"), "{h:?}");
        let mut i = base();
        i.tracking_lost = vec!["sys".into()];
        assert_eq!(health(&i).level, Level::Critical);
        i.resyncing = true;
        assert_eq!(health(&i).level, Level::Warning);
        let mut i = base();
        i.resync_requested = true;
        let h = health(&i);
        assert_eq!(h.level, Level::Warning);
        assert!(h.reasons[0].contains("resync was requested"), "{h:?}");
        let mut i = base();
        i.stopped = Some("no shipper runs".into());
        i.no_point = true;
        let h = health(&i);
        assert_eq!((h.level, h.reasons.len()), (Level::Critical, 1), "{h:?}");
        let mut i = base();
        i.no_point = true;
        i.rpo = None;
        assert_eq!(health(&i).level, Level::Warning);
    }
}
