//! Failover, as the site's applier carries it out (admin requests from the `vmreplica
//! failover ...` commands, and `Promote`/`Reverse` from the other site's shipper): the
//! record's role and images (`store`), and the processes that serve a VM this site is the
//! primary of ([`procs`]).
//!
//! - [`unplanned`]: role saved first, images rolled back to the point (behind a redo log),
//!   a tracker started on them in a new lineage with a baseline frozen (so a cancel can undo
//!   the failed-over VM's writes), the ranges of discarded points marked dirty (reverse
//!   replication ships them back), the VM started. Rerun after a crash, it finishes.
//! - [`commit`], [`cancel`], [`abandon`];
//! - [`promote`] (planned failover) and [`reverse`] (replicate back after an unplanned one),
//!   which start the shipper towards the old primary with this applier's own certificate;
//! - [`adopt_new`] and [`adopt_own`] (undone by `admin::adopt_undo`): the old primary's
//!   images become the replica that waits for the reverse cycle;
//! - [`supervise`]: after a restart of the applier, the processes of every VM it is primary
//!   for are found again (and started if they are gone).
//!
//! F1's recovery plans call [`unplanned`] through the admin socket, and the planned
//! failover through `vmreplica_shipper::failover::planned` (see the README).

pub mod admin;
pub mod lost;
pub mod procs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmreplica_common::ranges::RangeSet;
use vmreplica_common::wire::LineagePoint;
use vmreplica_tracker::control::Request;
use vmreplica_tracker::Parent;
use vmreplica_vm::{Network, VmDefinition};

use crate::session::{PromoteRequest, ReverseRequest};
use crate::store::{
    AdoptedDisk, FailoverStep, Primary, ReverseTarget, Role, SpanParent, Store, StoreError, VmStore,
};
pub use procs::Procs;

/// The files of this applier's certificate: the shipper it starts to replicate back to an
/// old primary presents it.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// What failover needs to know of the site.
#[derive(Clone, Debug)]
pub struct Site {
    pub root: PathBuf,
    pub identity: Option<IdentityFiles>,
}

/// How long a started VM may take to answer on QMP.
const VM_START: Duration = Duration::from_secs(120);

fn err(vm: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Role(format!("VM {vm}: {what}: {e}"))
}

/// Disks as (name, image).
type Images = Vec<(String, PathBuf)>;

/// The disks the VM's tracker serves on this site (name, image): the replicated ones, then
/// the excluded ones, made blank and sparse in `primary/excluded/` (kept if there: a rerun,
/// or the running VM's), and the names of the excluded ones.
fn disks_of(vs: &VmStore, procs: &Procs) -> Result<(Images, Vec<String>), StoreError> {
    let mut disks: Vec<(String, PathBuf)> = vs
        .disk_names()
        .into_iter()
        .map(|n| {
            let p = vs.image_path(&n);
            (n, p)
        })
        .collect();
    let excluded = vs.create_excluded_images(&procs.excluded_dir())?;
    let names = excluded.iter().map(|(n, _)| n.clone()).collect();
    disks.extend(excluded);
    Ok((disks, names))
}

/// Every disk the VM sees (replicated, then excluded), for its NBD URIs.
fn all_disk_names(vs: &VmStore) -> Vec<String> {
    let mut names = vs.disk_names();
    names.extend(vs.excluded_disks().into_iter().map(|(n, _)| n));
    names
}

/// The VM definition to start: `definition` if given, else the one shipped with the disks
/// (`STORE/VM/definition.toml`).
pub fn load_definition(
    vs: &VmStore,
    definition: Option<&Path>,
) -> Result<VmDefinition, StoreError> {
    let shipped = vs.vm_dir().join("definition.toml");
    let path = definition.unwrap_or(&shipped);
    if !path.exists() {
        return Err(StoreError::Role(format!(
            "VM {}: no VM definition to start it from: none was shipped ({} is missing) and \
             none was given (--definition FILE)",
            vs.vm(),
            shipped.display()
        )));
    }
    VmDefinition::load(path).map_err(|e| err(vs.vm(), "VM definition", e))
}

fn start_vm(vs: &VmStore, procs: &Procs, definition: Option<&Path>) -> Result<Value, StoreError> {
    let inst = procs.instance();
    if let Some(pid) = inst.pid().map_err(|e| err(vs.vm(), "QEMU", e))? {
        return Ok(json!({"pid": pid, "run_dir": inst.dir()}));
    }
    let def = load_definition(vs, definition)?;
    let s = inst
        .start_definition(
            &def,
            procs.uris(&all_disk_names(vs)),
            Network::Production,
            VM_START,
        )
        .map_err(|e| err(vs.vm(), "starting the VM", e))?;
    tracing::info!(vm = %vs.vm(), pid = s.pid, "VM started on this site");
    Ok(json!({"pid": s.pid, "run_dir": inst.dir(), "qmp": inst.qmp_socket()}))
}

/// The tracker's state as its status reports it (starting it if it is not running).
fn tracker_status(vs: &VmStore, procs: &Procs) -> Result<Value, StoreError> {
    tracker_status_of(vs, procs, false)
}

/// [`tracker_status`]; `fresh`: the record was made by this very request (a promote), so
/// its tracker has no state yet. A tracker state lost under a record that had one ends in
/// a checksum resync of every disk (see [`lost`]).
fn tracker_status_of(vs: &VmStore, procs: &Procs, fresh: bool) -> Result<Value, StoreError> {
    let lost = lost::check_before_start(vs, procs, fresh)?;
    let (disks, excluded) = disks_of(vs, procs)?;
    procs
        .start_tracker(&disks, &excluded)
        .map_err(|e| err(vs.vm(), "tracker", e))?;
    let st = procs
        .tracker(&Request::Status)
        .map_err(|e| err(vs.vm(), "tracker", e))?;
    if lost {
        return lost::mark_resync(vs, procs, &st);
    }
    Ok(st)
}

/// Puts the tracker in lineage `lineage` continuing `parent` (a fresh state dir has none).
fn set_lineage(
    vs: &VmStore,
    procs: &Procs,
    st: &Value,
    lineage: vmreplica_common::lineage::Lineage,
    parent: SpanParent,
) -> Result<(), StoreError> {
    if st["lineage"].as_str() == Some(lineage.to_string().as_str()) {
        return Ok(());
    }
    procs
        .tracker(&Request::SetLineage {
            lineage,
            next_generation: parent.cycle + 1,
            force: false,
            parent: Some(Parent {
                lineage: parent.lineage,
                cycle: parent.cycle,
            }),
        })
        .map(|_| ())
        .map_err(|e| err(vs.vm(), "setting the tracker's lineage", e))
}

/// Marks `set` (ranges by disk index) dirty in the tracker.
fn mark_dirty(vs: &VmStore, procs: &Procs, set: &RangeSet) -> Result<(), StoreError> {
    for (i, name) in vs.disk_names().into_iter().enumerate() {
        let ranges: Vec<(u64, u64)> = set
            .iter()
            .filter(|r| usize::from(r.disk) == i)
            .map(|r| (r.offset, r.len))
            .collect();
        if ranges.is_empty() {
            continue;
        }
        procs
            .tracker(&Request::MarkDirty { disk: name, ranges })
            .map_err(|e| err(vs.vm(), "marking divergent ranges dirty", e))?;
    }
    Ok(())
}

/// The tracker's dirty ranges as a set by disk index (in the record's disk order).
fn dirty_ranges(vs: &VmStore, procs: &Procs) -> Result<RangeSet, StoreError> {
    let v = procs
        .tracker(&Request::DirtyRanges)
        .map_err(|e| err(vs.vm(), "tracker dirty-ranges", e))?;
    ranges_by_index(&vs.disk_names(), &v)
}

fn ranges_by_index(names: &[String], v: &Value) -> Result<RangeSet, StoreError> {
    let mut set = RangeSet::new();
    for d in v.as_array().cloned().unwrap_or_default() {
        let name = d["name"].as_str().unwrap_or_default();
        let Some(i) = names.iter().position(|n| n == name) else {
            continue;
        };
        let ranges: Vec<(u64, u64)> =
            serde_json::from_value(d["ranges"].clone()).unwrap_or_default();
        for (o, l) in ranges {
            set.insert(i as u16, o, o + l);
        }
    }
    Ok(set)
}

/// An unplanned failover to `point` (None: the newest), from wherever an earlier run of it
/// stopped. Returns what a user needs: the new lineage, the point, the NBD URIs, the time
/// the disks took to be served.
pub fn unplanned(
    vs: &mut VmStore,
    point: Option<u64>,
    start: bool,
    definition: Option<PathBuf>,
) -> Result<Value, StoreError> {
    let t0 = Instant::now();
    let vm = vs.vm().to_string();
    if start {
        // Before anything changes: the VM can be started from something.
        load_definition(vs, definition.as_deref())?;
    }
    vs.begin_failover(point, start, definition)?;
    let f = vs.roll_back_to_point()?;
    let procs = Procs::new(vs.vm_dir(), &vm);
    if f.step == FailoverStep::RolledBack {
        if procs.tracker_pid().is_none() {
            // A tracker state of another failover (one cancelled by a crash) goes.
            let dir = procs.tracker_dir();
            if let Ok(Some(st)) = vmreplica_tracker::failover::state_offline(&dir) {
                if st.lineage != Some(f.lineage) {
                    procs
                        .stop_all_and_remove()
                        .map_err(|e| err(&vm, "removing an old tracker state", e))?;
                }
            }
        }
        let st = tracker_status(vs, &procs)?;
        vmreplica_tracker::crashpoint::crash_point("failover.tracker-started");
        set_lineage(vs, &procs, &st, f.lineage, f.parent)?;
        if st["frozen"].is_null() {
            procs
                .tracker(&Request::Freeze {
                    full: true,
                    baseline: true,
                })
                .map_err(|e| err(&vm, "freezing the baseline", e))?;
        }
        mark_dirty(vs, &procs, &vs.discarded_ranges()?)?;
        vmreplica_tracker::crashpoint::crash_point("failover.baseline-frozen");
        vs.set_failover_step(FailoverStep::Serving)?;
    } else {
        // Serving already: make sure the tracker runs.
        tracker_status(vs, &procs)?;
    }
    let served = t0.elapsed();
    tracing::warn!(vm, point = f.point, lineage = %f.lineage, ms = served.as_millis() as u64, "failover: the disks are served");
    let qemu = if f.start {
        Some(start_vm(vs, &procs, f.definition.as_deref())?)
    } else {
        None
    };
    Ok(json!({
        "vm": vm,
        "point": f.point,
        "from": f.from,
        "lineage": f.lineage,
        "parent": f.parent,
        "disks": procs.uris(&all_disk_names(vs)),
        "served_ms": served.as_millis() as u64,
        "qemu": qemu,
    }))
}

/// Commits a failover: the record is the primary's; the baseline is released.
pub fn commit(vs: &mut VmStore) -> Result<Value, StoreError> {
    let p = vs.commit_failover()?;
    vmreplica_tracker::crashpoint::crash_point("commit.saved");
    let procs = Procs::new(vs.vm_dir(), vs.vm());
    release_baseline(vs, &procs)?;
    Ok(json!({"vm": vs.vm(), "lineage": p.lineage, "parent": p.parent}))
}

fn release_baseline(vs: &VmStore, procs: &Procs) -> Result<(), StoreError> {
    let st = tracker_status(vs, procs)?;
    if st["frozen"]["baseline"] == json!(true) {
        let generation = st["frozen"]["generation"].as_u64().unwrap_or(0);
        procs
            .tracker(&Request::Release {
                generation,
                applied: None,
                force: false,
            })
            .map_err(|e| err(vs.vm(), "releasing the baseline", e))?;
        tracing::info!(vm = %vs.vm(), generation, "the failover's baseline is released");
    }
    Ok(())
}

/// Cancels an uncommitted failover: the VM and tracker stop, the failed-over VM's writes are
/// undone from the baseline, the redo log returns the images to the newest point, and the
/// record is a replica again (the old primary's next cycle lands).
pub fn cancel(vs: &mut VmStore) -> Result<Value, StoreError> {
    let vm = vs.vm().to_string();
    if *vs.role() == Role::Replica {
        return Ok(json!({"vm": vm, "cancelled": false, "note": "no failover in progress"}));
    }
    let procs = Procs::new(vs.vm_dir(), &vm);
    let Role::FailedOver(f) = vs.role().clone() else {
        return Err(StoreError::Role(format!(
            "VM {vm}: the failover was committed (this site is its {}): it cannot be cancelled \
             any more; to give way to the old primary, `vmreplica failover abandon {vm}`",
            vs.role().name()
        )));
    };
    if f.step == FailoverStep::Serving {
        // Before stopping anything: can the failed-over VM's writes be undone?
        let (baseline, wrote, lost) = match procs.tracker_pid() {
            Some(_) => {
                let st = procs
                    .tracker(&Request::Status)
                    .map_err(|e| err(&vm, "tracker", e))?;
                (
                    st["frozen"]["baseline"] == json!(true),
                    st["last_write_at"].as_u64().unwrap_or(1) > 0,
                    lost::untrusted(&st),
                )
            }
            None => {
                let st = vmreplica_tracker::failover::state_offline(&procs.tracker_dir())
                    .map_err(|e| err(&vm, "tracker state", e))?;
                (
                    vmreplica_tracker::failover::frozen_offline(&procs.tracker_dir())
                        .map_err(|e| err(&vm, "tracker state", e))?
                        .is_some_and(|g| g.baseline),
                    vmreplica_tracker::failover::read_stamp(&procs.tracker_dir()) > 0,
                    st.is_none_or(|s| s.disks.iter().any(|d| d.resync_required)),
                )
            }
        };
        let lost = lost || lost::marker(&procs).exists();
        if lost {
            return Err(StoreError::Role(format!(
                "VM {vm}: the failover's tracker state ({}) was lost or its tracking failed: \
                 where the failed-over VM wrote is unknown, so its writes cannot be undone and \
                 cancel is no longer possible. Commit the failover (`vmreplica failover commit \
                 {vm}`): replicating back to the old primary then resynchronises it by \
                 checksums. Nothing was changed",
                procs.tracker_dir().display()
            )));
        }
        if !baseline && wrote {
            return Err(StoreError::Role(format!(
                "VM {vm}: the failover's baseline was dropped (its copy-on-write passed the \
                 tracker's --cow-limit or failed), so the failed-over VM's writes cannot be \
                 undone: cancel is no longer possible. Commit the failover (`vmreplica failover \
                 commit {vm}`); nothing was changed"
            )));
        }
    }
    vs.begin_cancel()?;
    vmreplica_tracker::crashpoint::crash_point("cancel.begun");
    procs
        .kill_vm()
        .map_err(|e| err(&vm, "stopping the VM", e))?;
    procs
        .stop_shipper()
        .map_err(|e| err(&vm, "stopping the shipper", e))?;
    procs
        .stop_tracker()
        .map_err(|e| err(&vm, "stopping the tracker", e))?;
    vmreplica_tracker::crashpoint::crash_point("cancel.stopped");
    let baseline = vmreplica_tracker::failover::frozen_offline(&procs.tracker_dir())
        .map_err(|e| err(&vm, "tracker state", e))?
        .filter(|g| g.baseline);
    vs.finish_cancel(baseline.as_ref())?;
    procs
        .stop_all_and_remove()
        .map_err(|e| err(&vm, "removing the failover's tracker state", e))?;
    Ok(json!({"vm": vm, "cancelled": true, "point": f.from}))
}

/// Abandons a failover (split brain resolved for the old primary): an uncommitted one is
/// cancelled; a committed one stops the VM, shipper and tracker, and the record waits for
/// the old primary's next cycle over the ranges written here.
pub fn abandon(vs: &mut VmStore) -> Result<Value, StoreError> {
    let vm = vs.vm().to_string();
    match vs.role().clone() {
        Role::FailedOver(_) => {
            let mut v = cancel(vs)?;
            v["abandoned"] = json!(true);
            Ok(v)
        }
        Role::Primary(_) => {
            let procs = Procs::new(vs.vm_dir(), &vm);
            let st = tracker_status(vs, &procs)?;
            procs
                .kill_vm()
                .map_err(|e| err(&vm, "stopping the VM", e))?;
            procs
                .stop_shipper()
                .map_err(|e| err(&vm, "stopping the shipper", e))?;
            let mut set = dirty_ranges(vs, &procs)?;
            if lost::untrusted(&st) {
                // Where this site wrote is unknown (its tracking was lost): all of each disk
                // is overwritten by the old primary's next cycle.
                for (i, d) in vs.disks().iter().enumerate() {
                    set.insert(i as u16, 0, d.size);
                }
            }
            procs
                .stop_tracker()
                .map_err(|e| err(&vm, "stopping the tracker", e))?;
            let parent = vs.abandon(&set)?;
            vmreplica_tracker::crashpoint::crash_point("abandon.saved");
            procs
                .stop_all_and_remove()
                .map_err(|e| err(&vm, "removing the tracker state", e))?;
            Ok(json!({
                "vm": vm,
                "abandoned": true,
                "parent": parent,
                "divergent_bytes": set.bytes(),
            }))
        }
        Role::ReversePending(r) => {
            // Run again after a crash between saving the abandon and removing this site's
            // tracker state: finish the removal. (An abandon's record names no tracker and
            // no previous primary; an adoption's, or a primary's that gave way, keeps its
            // tracker state.)
            if r.tracker.is_none() && r.previous.is_none() {
                Procs::new(vs.vm_dir(), &vm)
                    .stop_all_and_remove()
                    .map_err(|e| err(&vm, "removing the tracker state", e))?;
            }
            Ok(json!({"vm": vm, "abandoned": true, "parent": r.parent}))
        }
        Role::Replica => Err(StoreError::Role(format!(
            "VM {vm}: this site is a replica: there is no failover to abandon"
        ))),
    }
}

/// Writes the shipper configuration that replicates back to the old primary, with this
/// applier's certificate.
fn write_shipper_config(
    site: &Site,
    vs: &VmStore,
    procs: &Procs,
    t: &ReverseTarget,
) -> Result<(), StoreError> {
    let vm = vs.vm();
    let Some(id) = &site.identity else {
        return Err(StoreError::Role(format!(
            "VM {vm}: this applier does not know its certificate's files, so it cannot start \
             a shipper towards the old primary"
        )));
    };
    let q = |p: &Path| toml_string(&p.display().to_string());
    let mut text = format!(
        "# Written by the applier: replicates VM {vm} back to the old primary.\n\
         vm = {}\ntracker = {}\nreplica = {}\nserver_name = {}\nca = {}\ncert = {}\nkey = {}\n\
         qmp = {}\n",
        toml_string(vm),
        q(&procs.control()),
        toml_string(&t.back.addr),
        toml_string(&t.back.name),
        q(&id.ca),
        q(&id.cert),
        q(&id.key),
        q(&procs.instance().qmp_socket()),
    );
    // What an admin changed in the file (`vmreplica set VM interval=...` on this site writes
    // it) stays: rewriting it (every applier start, a new reverse target) must not undo it.
    let previous = std::fs::read_to_string(procs.shipper_config()).unwrap_or_default();
    text += &admin_settings(&previous, &t.interval);
    text += &format!(
        "\n[reverse]\nreplica = {}\nserver_name = {}\n",
        toml_string(&t.here.addr),
        toml_string(&t.here.name),
    );
    std::fs::create_dir_all(&procs.dir).map_err(|e| err(vm, "primary dir", e))?;
    vmreplica_common::statefile::write_atomic(&procs.shipper_config(), text.as_bytes())
        .map_err(|e| err(vm, "writing the shipper configuration", e))
}

/// The keys of the shipper configuration the applier writes itself (the rest are the
/// admin's).
const OWNED_KEYS: [&str; 8] = [
    "vm",
    "tracker",
    "replica",
    "server_name",
    "ca",
    "cert",
    "key",
    "qmp",
];

/// The top-level settings of a shipper configuration the applier wrote before (`previous`)
/// that are not its own: the interval the failover was given (`interval`) unless the file
/// says otherwise, then whatever an admin set there (`vmreplica set`, an edit). A file that
/// does not parse keeps nothing but the interval (the shipper would refuse it anyway).
fn admin_settings(previous: &str, interval: &str) -> String {
    let mut keep = toml::Table::new();
    keep.insert("interval".into(), toml::Value::String(interval.into()));
    if let Ok(old) = previous.parse::<toml::Table>() {
        for (k, v) in old {
            if !OWNED_KEYS.contains(&k.as_str()) && !v.is_table() {
                keep.insert(k, v);
            }
        }
    }
    toml::to_string(&keep).unwrap_or_default()
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Serves a VM this site is the primary of: its tracker (in the primary's lineage), the VM
/// if asked, and the shipper back to the old primary once that is set up.
/// `fresh`: the record was just promoted (its tracker never ran).
fn serve_primary(
    site: &Site,
    vs: &VmStore,
    p: &Primary,
    start: bool,
    fresh: bool,
) -> Result<Value, StoreError> {
    let procs = Procs::new(vs.vm_dir(), vs.vm());
    let st = tracker_status_of(vs, &procs, fresh)?;
    set_lineage(vs, &procs, &st, p.lineage, p.parent)?;
    if st["frozen"]["baseline"] == json!(true) {
        release_baseline(vs, &procs)?;
    }
    let qemu = if start {
        Some(start_vm(vs, &procs, p.definition.as_deref())?)
    } else {
        None
    };
    if let Some(t) = &p.reverse {
        write_shipper_config(site, vs, &procs, t)?;
        procs
            .start_shipper()
            .map_err(|e| err(vs.vm(), "shipper", e))?;
    }
    Ok(json!({"disks": procs.uris(&all_disk_names(vs)), "qemu": qemu}))
}

/// A planned failover's promote on this (replica) site: see `VmStore::promote`; then the
/// tracker, the VM and the shipper back to the old primary start.
pub fn promote(site: &Site, vs: &mut VmStore, req: &PromoteRequest) -> Result<Primary, StoreError> {
    let vm = vs.vm().to_string();
    if let Some(text) = &req.definition {
        let path = vs.vm_dir().join("definition.toml");
        VmDefinition::parse(text, &path).map_err(|e| err(&vm, "the VM definition sent", e))?;
        vmreplica_common::statefile::write_atomic(&path, text.as_bytes())
            .map_err(|e| err(&vm, "saving the VM definition", e))?;
    }
    if req.start {
        load_definition(vs, None)?;
    }
    let target = ReverseTarget {
        back: req.back.clone(),
        here: req.here.clone(),
        interval: req.interval.clone(),
    };
    let fresh = *vs.role() == Role::Replica;
    let p = vs.promote(req.lineage, req.cycle, target, req.start, None)?;
    vmreplica_tracker::crashpoint::crash_point("promote.saved");
    serve_primary(site, vs, &p, req.start, fresh)?;
    Ok(p)
}

/// An old primary asks to be replicated back to (after an unplanned failover): refused while
/// the failover is not committed, and for a split brain (both sites wrote since the
/// failover point) unless the old primary discards its changes; with `start`, the shipper
/// back starts.
pub fn reverse(
    site: &Site,
    vs: &mut VmStore,
    req: &ReverseRequest,
) -> Result<(vmreplica_common::lineage::Lineage, LineagePoint, u64), StoreError> {
    let vm = vs.vm().to_string();
    let p = match vs.role().clone() {
        Role::Primary(p) => p,
        Role::FailedOver(f) => {
            return Err(StoreError::Role(format!(
                "VM {vm}: the failover to {} is not committed: commit it on this site first \
                 (`vmreplica failover commit {vm}`), or cancel it",
                f.parent.point()
            )))
        }
        other => {
            return Err(StoreError::Role(format!(
                "VM {vm}: this site is its {}, not its primary: there is nothing to replicate \
                 back",
                other.name()
            )))
        }
    };
    let procs = Procs::new(vs.vm_dir(), &vm);
    let st = tracker_status(vs, &procs)?;
    // Tracking lost or failed here: where this site wrote is unknown, so it may have.
    let here_wrote = st["last_write_at"].as_u64().unwrap_or(0) > 0 || lost::untrusted(&st);
    let there_wrote = req.last_write_at > p.since;
    if here_wrote && there_wrote && !req.discard_local {
        let m = split_brain_message(&vm, &p, req.last_write_at);
        tracing::error!(vm, "{m}");
        return Err(StoreError::SplitBrain(m));
    }
    if req.start {
        let t = ReverseTarget {
            back: req.back.clone(),
            here: req.here.clone(),
            interval: req.interval.clone(),
        };
        let p = vs.set_reverse(t)?;
        serve_primary(site, vs, &p, false, false)?;
        tracing::info!(vm, back = %req.back.addr, "replicating back to the old primary");
    }
    Ok((p.lineage, p.parent.point(), p.since))
}

/// Both sites wrote since their last common point: what happened, and the two ways out.
pub fn split_brain_message(vm: &str, p: &Primary, old_last_write: u64) -> String {
    format!(
        "VM {vm}: split brain: both sites wrote since their last common point, {} (the old \
         primary last wrote at {}, after the failover at {}; this site wrote since the \
         failover too). Replication is refused in either direction until you choose: keep \
         this site's changes with `vmreplica reverse {vm} --discard-local-changes` on the old \
         primary (shut its VM down first), or keep the old primary's with `vmreplica failover \
         abandon {vm}` on this site. The site overwritten keeps its state as a recovery point",
        p.parent.point(),
        rfc3339(old_last_write),
        rfc3339(p.since)
    )
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Adoption (on the old primary's site): its images, served by the tracker at `control`,
/// become the replica of `owner` waiting for the reverse cycle continuing `parent`, with the
/// tracker's dirty ranges as divergent. For a record that is this site's own primary (a
/// failback of a failback), the record gives way instead.
pub fn adopt_new(
    store: &Store,
    vm: &str,
    owner: &str,
    control: &Path,
    parent: SpanParent,
) -> Result<Value, StoreError> {
    let call = |req: &Request| {
        vmreplica_tracker::control::call(control, req).map_err(|e| err(vm, "tracker", e))
    };
    let st = call(&Request::Status)?;
    if st["lineage"].as_str() != Some(parent.lineage.to_string().as_str()) {
        return Err(StoreError::Role(format!(
            "VM {vm}: the tracker at {} is in lineage {}, not {}: its images are not the ones \
             the new primary continues",
            control.display(),
            st["lineage"],
            parent.lineage
        )));
    }
    let granularity = st["granularity"].as_u64().unwrap_or(65536) as u32;
    let mut disks = Vec::new();
    for d in st["disks"].as_array().cloned().unwrap_or_default() {
        let name = d["name"].as_str().unwrap_or_default().to_string();
        if let Some(n) = d["connections"].as_u64().filter(|n| *n > 0) {
            return Err(StoreError::Role(format!(
                "VM {vm}: its disk {name} still has {n} NBD connection(s) on this site (is the \
                 VM still running?): shut it down first; nothing was changed"
            )));
        }
        // An excluded disk (swap) is not replicated back: not part of the replica either.
        if d["excluded"] == json!(true) {
            continue;
        }
        disks.push(AdoptedDisk {
            name,
            image: PathBuf::from(d["image"].as_str().unwrap_or_default()),
            size: d["size"].as_u64().unwrap_or(0),
            granularity,
        });
    }
    let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
    let mut divergent = ranges_by_index(&names, &call(&Request::DirtyRanges)?)?;
    // A disk whose tracking cannot be trusted (its state restored from an older copy, or
    // lost, or its tracking failed: the tracker marked it for a checksum resync) may hold
    // writes its bitmap does not know: the whole disk is divergent, so the reverse cycle
    // overwrites all of it rather than leave those writes in a replica that claims to equal
    // the new primary.
    let untrusted = untrusted_disks(&st);
    for (i, d) in disks.iter().enumerate() {
        if untrusted.contains(&d.name) {
            tracing::error!(vm, disk = %d.name, "this site's tracking of the disk cannot be trusted (marked for a checksum resync): the whole disk is overwritten by the reverse cycle");
            divergent.insert(i as u16, 0, d.size);
        }
    }
    let state_dir = st["state_dir"].as_str().map(PathBuf::from);
    store.create_adopted(vm, owner, &disks, parent, &divergent, state_dir)?;
    Ok(json!({
        "vm": vm,
        "owner": owner,
        "parent": parent,
        "divergent_bytes": divergent.bytes(),
        "untrusted": untrusted,
    }))
}

/// The disks a tracker's status says need a checksum resync.
fn untrusted_disks(st: &Value) -> Vec<String> {
    st["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["resync_required"] == json!(true))
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect()
}

/// Adoption of this site's own primary record (it gives way at `parent`).
pub fn adopt_own(vs: &mut VmStore, owner: &str, parent: SpanParent) -> Result<Value, StoreError> {
    let procs = Procs::new(vs.vm_dir(), vs.vm());
    vs.yield_primary(owner, parent, procs.tracker_dir())?;
    Ok(json!({"vm": vs.vm(), "owner": owner, "parent": parent, "divergent_bytes": 0}))
}

/// After an applier restart: the trackers and shippers of the VMs this site is primary for
/// run again (QEMU is not restarted: a VM someone stopped stays stopped).
pub fn supervise(site: &Site, vs: &VmStore) {
    let r = match vs.role().clone() {
        Role::FailedOver(f) if f.step == FailoverStep::Serving => {
            tracker_status(vs, &Procs::new(vs.vm_dir(), vs.vm())).map(|_| ())
        }
        Role::Primary(p) => serve_primary(site, vs, &p, false, false).map(|_| ()),
        _ => Ok(()),
    };
    if let Err(e) = r {
        tracing::error!(vm = %vs.vm(), "the processes of a VM this site is primary for: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::admin_settings;

    /// `vmreplica set VM interval=...` on the site replicating back writes the shipper's
    /// file; the applier rewriting the file (at its next start) keeps what was set.
    #[test]
    fn the_shipper_file_rewritten_keeps_what_an_admin_set() {
        let fresh = admin_settings("", "5m");
        assert_eq!(fresh.trim(), "interval = \"5m\"");
        let set = "vm = \"vm1\"\nreplica = \"old:1\"\ninterval = \"30s\"\n\
                   bandwidth_limit = \"20M\"\n\n[reverse]\nreplica = \"x:2\"\n";
        let kept: toml::Table = admin_settings(set, "5m").parse().unwrap();
        assert_eq!(kept["interval"].as_str(), Some("30s"));
        assert_eq!(kept["bandwidth_limit"].as_str(), Some("20M"));
        assert!(!kept.contains_key("replica") && !kept.contains_key("reverse"));
        assert_eq!(
            admin_settings("not toml [", "5m").trim(),
            "interval = \"5m\""
        );
    }
}
