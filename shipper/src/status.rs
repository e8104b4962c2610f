//! A VM as its primary site sees it (the status schema's `VmStatus`, site `primary`): made
//! by the running shipper for its control socket, its metrics and its health events, and by
//! `vmreplica status` from the shipper's state file when no shipper runs.

use serde_json::Value;
use vmreplica_common::wire::CycleKind;
use vmreplica_ops::status::{
    health, AppConsistent, DiskStatus, HealthInput, Point, Process, Progress, Site, State, VmStatus,
};

use crate::progress::{kind_label, Snapshot};
use crate::state::ShipperState;

/// What a running shipper adds to its state file.
#[derive(Clone, Debug)]
pub struct Live {
    pub pid: u32,
    pub socket: String,
    /// The cycle under way: its kind, and its transfer (or a resync's checksum pass).
    pub cycle: Option<(u64, CycleKind)>,
    pub progress: Option<(Snapshot, &'static str)>,
    /// The bandwidth limit in force.
    pub limit: Option<u64>,
    pub compression: bool,
    pub app_every: Option<u64>,
    /// Bytes of the frozen generation not yet applied (known once planned).
    pub frozen_remaining: Option<u64>,
}

pub struct Inputs<'a> {
    pub vm: &'a str,
    pub now_ms: u64,
    pub state: &'a ShipperState,
    /// Seconds (None: continuous).
    pub interval: Option<u64>,
    pub rpo_limit: u64,
    /// The tracker's status, or why it could not be had.
    pub tracker: Result<&'a Value, String>,
    /// None: no shipper runs for the VM.
    pub live: Option<&'a Live>,
    /// Other processes of the VM on this host (its tracker).
    pub processes: Vec<Process>,
}

fn bytes_of_blocks(blocks: &Value, granularity: u64) -> Option<u64> {
    blocks.as_u64().map(|b| b * granularity)
}

/// The primary's view of the VM.
pub fn primary(i: Inputs<'_>) -> VmStatus {
    let now = i.now_ms / 1000;
    let h = &i.state.history;
    let last_hour = h.last_hour(i.now_ms, i.interval);
    let last = h.last();
    let rpo = last.map(|c| now.saturating_sub(c.frozen_at));
    let (tracker, tracker_err) = match i.tracker {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    let granularity = tracker
        .and_then(|t| t["granularity"].as_u64())
        .unwrap_or(65536);
    let mut disks: Vec<DiskStatus> = tracker
        .and_then(|t| t["disks"].as_array())
        .map(|ds| {
            ds.iter()
                .map(|d| DiskStatus {
                    name: d["name"].as_str().unwrap_or_default().to_string(),
                    size: d["size"].as_u64().unwrap_or(0),
                    excluded: d["excluded"] == Value::Bool(true),
                    dirty_bytes: bytes_of_blocks(&d["dirty_blocks"], granularity),
                    resync_required: d["resync_required"] == Value::Bool(true),
                })
                .collect()
        })
        .unwrap_or_default();
    disks.sort_by_key(|d| d.excluded);
    // A resync the operator asked for is not lost tracking.
    let resync_requested = i.state.resync_requested.is_some();
    let tracking_lost: Vec<String> = disks
        .iter()
        .filter(|d| d.resync_required && !resync_requested)
        .map(|d| d.name.clone())
        .collect();
    // Backlog: what is dirty, plus the frozen generation not yet applied.
    let frozen_bytes = tracker.and_then(|t| {
        let f = &t["frozen"];
        f["disks"]
            .as_array()
            .map(|ds| ds.iter().filter_map(|d| d["blocks"].as_u64()).sum::<u64>() * granularity)
    });
    let backlog = tracker.map(|_| {
        let dirty: u64 = disks.iter().filter_map(|d| d.dirty_bytes).sum();
        let frozen = i
            .live
            .and_then(|l| l.frozen_remaining)
            .or(frozen_bytes)
            .unwrap_or(0);
        dirty + frozen
    });
    let live = i.live;
    let cycle_kind = live.and_then(|l| l.cycle).map(|c| c.1);
    let paused = i.state.paused();
    let stopped = match (live, &i.state.stopped, tracker_err) {
        (_, _, Some(e)) => Some(e.clone()),
        (_, Some(why), _) => Some(why.clone()),
        (None, None, None) => Some("no shipper runs for this VM".into()),
        _ => None,
    };
    let no_point = h.totals.cycles == 0;
    let resyncing = cycle_kind == Some(CycleKind::Resync);
    let state = if stopped.is_some() {
        State::Stopped
    } else if paused {
        State::Paused
    } else if cycle_kind == Some(CycleKind::Initial) || no_point {
        State::InitialCopy
    } else if resyncing {
        State::Resynchronizing
    } else if !tracking_lost.is_empty() || resync_requested {
        State::ResyncRequired
    } else {
        State::Replicating
    };
    let hl = health(&HealthInput {
        stopped: stopped.clone(),
        tracking_lost,
        resync_requested: resync_requested && !resyncing,
        resyncing,
        paused,
        no_point,
        interval: i.interval,
        rpo_limit: i.rpo_limit,
        rpo,
        last_hour: last_hour.clone(),
    });
    let progress = live
        .and_then(|l| l.progress.as_ref())
        .map(|(s, phase)| Progress {
            cycle: s.cycle,
            kind: s.kind.name().to_string(),
            phase: phase.to_string(),
            done_bytes: s.done,
            total_bytes: s.total,
            percent: (s.percent() * 10.0).round() / 10.0,
            rate_bytes_per_second: s.rate().round(),
            eta_seconds: s.eta().map(|d| d.as_secs()),
        });
    let ratio = if last_hour.wire_bytes > 0 {
        Some(last_hour.bytes as f64 / last_hour.wire_bytes as f64)
    } else if h.totals.wire_bytes > 0 {
        Some(h.totals.bytes as f64 / h.totals.wire_bytes as f64)
    } else {
        None
    };
    // The newest cycle that carried enough to measure the link (an idle VM's empty cycles
    // say nothing of it): 1 MiB, else any.
    let rate_of = |min: u64| {
        h.cycles
            .iter()
            .rev()
            .find(|c| c.seconds() > 0.0 && c.wire_bytes >= min.max(1))
            .map(|c| (c.wire_bytes as f64 / c.seconds()).round())
    };
    let link_rate = rate_of(1 << 20).or_else(|| rate_of(1));
    let app = &i.state.app;
    let mut processes = i.processes;
    if let Some(l) = live {
        processes.push(Process {
            role: "shipper".into(),
            pid: l.pid,
            socket: Some(l.socket.clone()),
        });
    }
    VmStatus {
        vm: i.vm.to_string(),
        site: Site::Primary,
        role: "primary".into(),
        state,
        health: hl,
        progress,
        lineage: tracker.and_then(|t| t["lineage"].as_str().map(str::to_string)),
        interval_seconds: i.interval,
        rpo_limit_seconds: i.rpo_limit,
        rpo_seconds: rpo,
        last_cycle: last.map(|c| c.cycle),
        latest_point: last.map(|c| Point {
            cycle: c.cycle,
            time: c.applied_ms / 1000,
            age_seconds: now.saturating_sub(c.applied_ms / 1000),
            kind: c.kind.clone(),
            app_consistent: c.app_consistent,
        }),
        points: None,
        backlog_bytes: backlog,
        last_hour,
        total_cycles: h.totals.cycles,
        total_bytes: h.totals.bytes,
        total_wire_bytes: h.totals.wire_bytes,
        compression_ratio: ratio.map(|r| (r * 100.0).round() / 100.0),
        link_rate_bytes_per_second: link_rate,
        bandwidth_limit_bytes_per_second: live.and_then(|l| l.limit),
        compression: live.map(|l| l.compression),
        last_error: h.last_error.as_ref().map(|e| e.message.clone()),
        last_error_time: h.last_error.as_ref().map(|e| e.at),
        app_consistent: AppConsistent {
            every_seconds: live.and_then(|l| l.app_every),
            last_time: app.last_at,
            last_cycle: app.last_generation,
            last_frozen_ms: app.last_frozen_ms,
            last_error: app.last_error.clone(),
        },
        disks,
        processes,
        failover: None,
        test_failovers: Vec::new(),
        paused_since: h.pauses.last().filter(|p| p.to.is_none()).map(|p| p.from),
    }
}

/// The label of a cycle kind in progress lines (re-exported for the command line).
pub fn kind(kind: CycleKind) -> &'static str {
    kind_label(kind)
}
