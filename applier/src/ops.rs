//! Operations on the replica site: each VM's status as the replica sees it (the status
//! schema's `VmStatus`, site `replica`: for `vmreplica status`, metrics and health events),
//! removing a VM's replica, and the admin socket's requests for them (`report`, `remove`;
//! `seed-import` and `adopt` are in [`crate::seed`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vmreplica_ops::events::{self, Event};
use vmreplica_ops::status::{
    health, AppConsistent, DiskStatus, FailoverStatus, Health, HealthInput, Level, Point, Process,
    Site, State, TestDisk, TestFailoverStatus, VmStatus, DEFAULT_RPO_LIMIT,
};

use crate::server::App;
use crate::store::state::{Role, VmState};
use crate::store::{lock_vm, vm_dir, StoreError};
use crate::testfo::Running;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The role the replica state records (see [`Role`]): `replica`, `failed-over` (not yet
/// committed), `primary` (committed, or promoted by a planned failover: this site runs the
/// VM, its shipper reports replication), `reverse-pending` (an old primary waiting for the
/// reverse cycle).
fn role_of(s: &VmState) -> String {
    match s.role {
        Role::Replica => "replica",
        Role::FailedOver(_) => "failed-over",
        Role::Primary(_) => "primary",
        Role::ReversePending(_) => "reverse-pending",
    }
    .into()
}

fn state_of(s: &VmState, tests: bool) -> State {
    if matches!(s.role, Role::FailedOver(_) | Role::Primary(_)) {
        return State::FailedOver;
    }
    // Paused by the primary's operator (it told this site): as the primary shows it, also
    // in the middle of an initial copy or a resync.
    if s.ops.history.paused() {
        return State::Paused;
    }
    match s.receiving.as_ref().map(|r| r.kind.as_str()) {
        Some("initial") => State::InitialCopy,
        Some("resync") => State::Resynchronizing,
        _ if s.points.is_empty() => State::InitialCopy,
        _ if tests => State::TestFailover,
        _ => State::Replicating,
    }
}

/// The failover this record is part of, from its role (None: a plain replica).
fn failover_of(s: &VmState) -> Option<FailoverStatus> {
    use crate::store::state::FailoverStep as Step;
    let (sub_state, point, since, lineage) = match &s.role {
        Role::Replica => return None,
        Role::FailedOver(f) => (
            match f.step {
                Step::Begun => "rolling-back",
                Step::RolledBack | Step::Serving => "awaiting-commit",
                Step::Cancelling => "cancelling",
            },
            f.point,
            f.since,
            Some(f.lineage),
        ),
        Role::Primary(p) => (
            if p.reverse.is_some() {
                "reversing"
            } else {
                "committed"
            },
            // The point failed over to, as before the commit.
            p.point.unwrap_or(p.parent.cycle),
            p.since,
            Some(p.lineage),
        ),
        Role::ReversePending(r) => match r.withdrawn {
            Some(at) => ("adoption-withdrawn", r.parent.cycle, at, None),
            None => ("awaiting-reverse", r.parent.cycle, r.since, None),
        },
    };
    Some(FailoverStatus {
        sub_state: sub_state.into(),
        point,
        since,
        lineage: lineage.map(|l| l.to_string()),
    })
}

/// The health of a record in a failover: its cycles come from no one any more (or not
/// yet), so neither its RPO nor its missed cycles say anything; what is left to do does.
fn failover_health(vm: &str, f: &FailoverStatus) -> Health {
    let reason = match f.sub_state.as_str() {
        "rolling-back" => Some(format!(
            "failing over to point {}: the images are being rolled back (rerun `vmreplica \
             failover unplanned {vm}` if it stopped)",
            f.point
        )),
        "awaiting-commit" => Some(format!(
            "failed over to point {}, not committed: `vmreplica failover commit {vm}` (or \
             cancel)",
            f.point
        )),
        "cancelling" => Some(format!(
            "a failover cancel is under way (rerun `vmreplica failover cancel {vm}` if it \
             stopped)"
        )),
        "committed" => Some(format!(
            "failed over and committed: the VM is not protected until it replicates back \
             (`vmreplica reverse {vm}` on the old primary)"
        )),
        "awaiting-reverse" => Some(format!(
            "waiting for the new primary's reverse cycle continuing point {}",
            f.point
        )),
        _ => None,
    };
    Health {
        level: if reason.is_some() {
            Level::Warning
        } else {
            Level::Normal
        },
        reasons: reason.into_iter().collect(),
    }
}

/// A VM as the replica sees it.
pub(crate) fn replica_status(
    vm: &str,
    s: &VmState,
    now_ms: u64,
    processes: Vec<Process>,
    test_failovers: Vec<TestFailoverStatus>,
) -> VmStatus {
    let now = now_ms / 1000;
    let interval = s.ops.interval.filter(|i| *i != u64::MAX);
    let rpo_limit = s.ops.rpo_limit.unwrap_or(DEFAULT_RPO_LIMIT);
    let h = &s.ops.history;
    let failover = failover_of(s);
    // A failed-over record expects no cycles: none are counted missed.
    let last_hour = h.last_hour(now_ms, interval.filter(|_| failover.is_none()));
    let rpo = match s.ops.last_frozen_at {
        0 => h.last().map(|c| now.saturating_sub(c.applied_ms / 1000)),
        t => Some(now.saturating_sub(t)),
    }
    .or_else(|| s.points.last().map(|p| now.saturating_sub(p.applied_at)));
    let state = state_of(s, !test_failovers.is_empty());
    // The primary's pause, as it told this site (see `session::pause`).
    let paused_since = h.paused_since();
    let hl = match &failover {
        Some(f) => failover_health(vm, f),
        None => health(&HealthInput {
            stopped: None,
            tracking_lost: Vec::new(),
            resync_requested: false,
            resyncing: state == State::Resynchronizing,
            paused: paused_since.is_some(),
            no_point: s.points.is_empty(),
            interval,
            rpo_limit,
            rpo,
            last_hour: last_hour.clone(),
        }),
    };
    // Its RPO is the new primary's now (its shipper's status says it).
    let rpo = rpo.filter(|_| failover.is_none());
    let app = s.points.iter().rev().find(|p| p.app_consistent);
    let mut disks: Vec<DiskStatus> = s
        .disks
        .iter()
        .map(|d| DiskStatus {
            name: d.name.clone(),
            size: d.size,
            excluded: false,
            dirty_bytes: None,
            resync_required: false,
        })
        .collect();
    disks.extend(s.excluded.iter().map(|d| DiskStatus {
        name: d.name.clone(),
        size: d.size,
        excluded: true,
        dirty_bytes: None,
        resync_required: false,
    }));
    VmStatus {
        vm: vm.to_string(),
        site: Site::Replica,
        role: role_of(s),
        state,
        health: hl,
        progress: None,
        lineage: s.lineage.map(|l| l.to_string()),
        interval_seconds: interval,
        rpo_limit_seconds: rpo_limit,
        rpo_seconds: rpo,
        last_cycle: (s.last_cycle > 0).then_some(s.last_cycle),
        latest_point: s.points.last().map(|p| Point {
            cycle: p.cycle,
            time: p.applied_at,
            age_seconds: now.saturating_sub(p.applied_at),
            kind: p.kind.clone(),
            app_consistent: p.app_consistent,
        }),
        points: Some(s.points.len() as u64),
        backlog_bytes: None,
        last_hour,
        total_cycles: h.totals.cycles,
        total_bytes: h.totals.bytes,
        total_wire_bytes: 0,
        compression_ratio: None,
        link_rate_bytes_per_second: None,
        bandwidth_limit_bytes_per_second: None,
        compression: None,
        last_error: h.last_error.as_ref().map(|e| e.message.clone()),
        last_error_time: h.last_error.as_ref().map(|e| e.at),
        app_consistent: AppConsistent {
            every_seconds: None,
            last_time: app.map(|p| p.applied_at),
            last_cycle: app.map(|p| p.cycle),
            last_frozen_ms: None,
            last_error: None,
        },
        disks,
        processes,
        failover,
        test_failovers,
        paused_since,
    }
}

/// The test failovers a record holds, as status shows them: the served ones (`served`),
/// and those recorded but not served (an applier down, or one that could not serve them).
fn test_failovers_of(s: &VmState, served: &[Arc<Running>]) -> Vec<TestFailoverStatus> {
    let mut out: Vec<TestFailoverStatus> = served
        .iter()
        .map(|r| TestFailoverStatus {
            point: r.point,
            since: r.created_at,
            disks: r
                .disks()
                .iter()
                .map(|d| TestDisk {
                    disk: d.clone(),
                    uri: r.unix_uri(d),
                    tcp_uri: r.tcp_uri(d),
                })
                .collect(),
            vm_pid: crate::testfo::launch::running(&r.dir.join("vm")).map(|p| p as u32),
            error: None,
        })
        .collect();
    for t in &s.tests {
        if !served.iter().any(|r| r.point == t.point) {
            out.push(TestFailoverStatus {
                point: t.point,
                since: t.created_at,
                disks: Vec::new(),
                vm_pid: None,
                error: Some("recorded but not served: see the applier's log".into()),
            });
        }
    }
    out.sort_by_key(|t| t.point);
    out
}

/// Every VM of a store no applier runs on, read from the state files.
pub fn store_report(store: &crate::Store) -> Vec<VmStatus> {
    store
        .vms()
        .into_iter()
        .filter_map(|name| {
            let s = store.peek_state(&name).ok()?;
            let tests = test_failovers_of(&s, &[]);
            Some(replica_status(&name, &s, now_ms(), Vec::new(), tests))
        })
        .collect()
}

/// Every VM of the running applier's store.
pub(crate) fn report(app: &Arc<App>, admin: &Path) -> Vec<VmStatus> {
    let open = app.open_vms();
    let tests = app.tests.all();
    let me = Process {
        role: "applier".into(),
        pid: std::process::id(),
        socket: Some(admin.display().to_string()),
    };
    app.store
        .vms()
        .into_iter()
        .filter_map(|name| {
            let state = match open.iter().find(|e| e.name == name) {
                Some(e) => Some((*e.shared.state()).clone()),
                None => app.store.peek_state(&name).ok(),
            }?;
            let served: Vec<Arc<Running>> =
                tests.iter().filter(|r| r.vm == name).cloned().collect();
            let tests = test_failovers_of(&state, &served);
            Some(replica_status(
                &name,
                &state,
                now_ms(),
                vec![me.clone()],
                tests,
            ))
        })
        .collect()
}

/// Health levels seen last, per VM, for health-changed events.
#[derive(Default)]
pub(crate) struct HealthWatch(std::collections::HashMap<String, Level>);

impl HealthWatch {
    pub fn note(&mut self, st: &VmStatus) {
        let level = st.health.level;
        match self.0.insert(st.vm.clone(), level) {
            Some(from) if from != level => {
                tracing::info!(
                    vm = st.vm,
                    "replica health {} -> {}: {}",
                    from.name(),
                    level.name(),
                    st.health.reasons.join("; ")
                );
                events::emit(
                    Event::new(events::HEALTH_CHANGED)
                        .vm(&st.vm)
                        .field("site", "replica")
                        .field("from", from.name())
                        .field("to", level.name())
                        .field("reasons", &st.health.reasons),
                );
            }
            _ => {}
        }
    }
}

/// Watches the health of every replica every few seconds (events on changes).
pub(crate) fn watch_health(app: Arc<App>, admin: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = HealthWatch::default();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (a, p) = (Arc::clone(&app), admin.clone());
            let Ok(all) = tokio::task::spawn_blocking(move || report(&a, &p)).await else {
                continue;
            };
            for st in &all {
                w.note(st);
            }
        }
    })
}

/// Removes VM `vm`'s replica from the store at `root`: its images, undo logs, points and
/// state. The caller holds the VM's lock (`VM.lock`). The directory is first renamed out of
/// the way (atomic: a crash leaves either the replica whole or a `.removing-` directory that
/// the next start clears), then deleted.
pub(crate) fn remove_dir(root: &Path, vm: &str) -> Result<PathBuf, StoreError> {
    let dir = vm_dir(root, vm)?;
    if !dir.join("state.json").exists() {
        return Err(StoreError::NoReplica(vm.to_string()));
    }
    // A state that does not read is no reason to keep a replica its admin removes.
    let state = VmState::load(&dir.join("state.json")).ok().flatten();
    // A site the VM failed over to serves the running VM from these images: removing them
    // would destroy the only live copy.
    if let Some(state) = &state {
        let live = match &state.role {
            Role::FailedOver(_) => Some("failed over to this site (not committed)"),
            Role::Primary(_) => Some("the primary on this site (it failed over here)"),
            Role::Replica | Role::ReversePending(_) => None,
        };
        if let Some(what) = live {
            return Err(StoreError::Refused(format!(
                "VM {vm} is {what}: {} holds the running VM's disks, not a replica; cancel \
                 the failover (vmreplica failover cancel {vm}) or fail back (vmreplica failover \
                 planned) first; nothing was removed",
                dir.display()
            )));
        }
    }
    // Test failovers recorded (served or not: an applier may be down) have VMs that may
    // still run on their exports: they end first.
    let tests = state.map(|s| s.tests).unwrap_or_default();
    if !tests.is_empty() {
        let points: Vec<String> = tests.iter().map(|t| t.point.to_string()).collect();
        return Err(StoreError::Refused(format!(
            "VM {vm}: test failovers of points {} are recorded: stop them first (vmreplica \
             failover test-stop {vm} --all); the replica was not removed",
            points.join(", ")
        )));
    }
    let gone = root.join(format!(".removing-{vm}-{}", std::process::id()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io { path: p, source }
    };
    std::fs::rename(&dir, &gone).map_err(io(&dir))?;
    std::fs::File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io(root))?;
    std::fs::remove_dir_all(&gone).map_err(io(&gone))?;
    tracing::warn!(vm, dir = %dir.display(), "replica removed");
    events::emit(
        Event::new(events::REMOVED)
            .vm(vm)
            .field("site", "replica")
            .field("dir", &dir),
    );
    Ok(dir)
}

/// Removes what a crash left half removed, or half installed (a seed's staging directory).
pub(crate) fn clear_removing(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".removing-") || name.starts_with(".seed-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes a replica with no applier running (under its lock).
pub fn remove_offline(root: &Path, vm: &str) -> Result<PathBuf, StoreError> {
    let _lock = lock_vm(root, vm)?;
    remove_dir(root, vm)
}

/// The admin socket's `remove`: refused while the primary is connected (pause or stop its
/// shipper first) or a point is held open (an export, a test failover).
pub(crate) fn remove(app: &Arc<App>, vm: &str) -> Result<Value, StoreError> {
    let entry = app.take_vm(vm)?;
    let Some(entry) = entry else {
        let dir = remove_offline(app.store.root(), vm)?;
        return Ok(json!({ "removed": dir }));
    };
    let refuse =
        |why: String| StoreError::Refused(format!("VM {vm}: {why}; the replica was not removed"));
    if !entry.conns_empty() {
        app.put_back(vm, entry);
        return Err(refuse(
            "its primary is connected: pause or stop its shipper first (`vmreplica pause VM` \
             on the primary)"
                .into(),
        ));
    }
    let pinned = entry.shared.pinned();
    if let Some(p) = pinned.iter().next() {
        app.put_back(vm, entry);
        return Err(refuse(format!(
            "point {p} is held open (an export or a test failover): end that first"
        )));
    }
    // Holding the replica's store (its lock) while its directory goes.
    let vs = Arc::clone(&entry.store);
    let guard = vs.lock().unwrap_or_else(|e| e.into_inner());
    let r = remove_dir(app.store.root(), vm);
    drop(guard);
    drop(entry);
    r.map(|dir| json!({ "removed": dir }))
}

/// Makes room for installing VM `vm` from outside the link (a seed, an adopted copy): a
/// replica the applier has open only because its primary said hello (nothing received yet)
/// is closed; one that holds anything, or whose primary is connected, is refused.
pub(crate) fn make_room(app: &Arc<App>, vm: &str) -> Result<(), StoreError> {
    let Some(entry) = app.take_vm(vm)? else {
        return Ok(());
    };
    if !entry.conns_empty() {
        app.put_back(vm, entry);
        return Err(StoreError::Refused(format!(
            "VM {vm}: its primary is connected: stop its shipper until the replica is installed"
        )));
    }
    drop(entry);
    Ok(())
}

/// The admin socket's `seed-import`.
pub(crate) fn seed_import(
    app: &Arc<App>,
    vm: &str,
    dir: &Path,
    owner: Option<&str>,
) -> Result<Value, StoreError> {
    make_room(app, vm)?;
    let r = crate::seed::import(app.store.root(), vm, dir, owner)?;
    Ok(json!(r))
}

/// The admin socket's `adopt`.
pub(crate) fn adopt(
    app: &Arc<App>,
    vm: &str,
    owner: &str,
    disks: &[(String, PathBuf)],
    granularity: u32,
) -> Result<Value, StoreError> {
    make_room(app, vm)?;
    let r = crate::seed::adopt(app.store.root(), vm, owner, disks, granularity)?;
    Ok(json!(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state::{Primary, SpanParent};
    use vmreplica_common::lineage::Lineage;

    /// `remove --replica` on the site a VM failed over to is refused: those images are the
    /// running VM's disks. A replica (or a former primary waiting for its reverse cycle) goes.
    #[test]
    fn a_failed_over_vms_disks_are_not_removed_as_a_replica() {
        let root = tempfile::tempdir().unwrap();
        for (vm, primary) in [("vm1", true), ("vm2", false)] {
            let dir = root.path().join(vm);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("sys.img"), b"the running VM's disk").unwrap();
            let mut state = VmState::new("primary-1");
            if primary {
                let lineage = Lineage::random();
                state.role = Role::Primary(Primary {
                    lineage,
                    parent: SpanParent { lineage, cycle: 3 },
                    point: None,
                    since: 1,
                    reverse: None,
                    start: true,
                    definition: None,
                });
            }
            state.save(&dir.join("state.json")).unwrap();
        }
        let e = remove_offline(root.path(), "vm1").unwrap_err().to_string();
        assert!(e.contains("VM vm1 is the primary on this site"), "{e}");
        assert!(e.contains("nothing was removed"), "{e}");
        assert!(root.path().join("vm1/sys.img").exists());
        remove_offline(root.path(), "vm2").unwrap();
        assert!(!root.path().join("vm2").exists());
    }
}
