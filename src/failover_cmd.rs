//! `vmreplica failover {unplanned,commit,cancel,abandon,planned}` and `vmreplica reverse`.
//!
//! For recovery plans (and anyone scripting failovers), one VM at a time:
//! - [`fail_over_unplanned`]: on the replica site, through its applier's admin socket;
//! - [`fail_over_planned`]: on the primary, with its shipper configuration.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vmreplica_applier::admin::{self, Request as Admin};
use vmreplica_applier::failover::admin::{Adopt, Unplanned, Vm};
use vmreplica_common::wire::{Endpoint, LineagePoint, Role};
use vmreplica_shipper::failover::{ReverseAsk, Welcome};
use vmreplica_shipper::run::{Finished, PlannedRun};
use vmreplica_shipper::session::Planned;
use vmreplica_shipper::ShipperConfig;
use vmreplica_tracker::control::{self, Request};

use crate::site::Site;

#[derive(clap::Subcommand)]
pub enum FailoverOp {
    /// The primary site is gone: bring the VM up here from a recovery point (replica site).
    Unplanned {
        vm: String,
        /// The recovery point (its cycle, see `applier points`), or `latest`.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Start the VM (from its shipped definition, or --definition) once its disks are
        /// served.
        #[arg(long)]
        start: bool,
        /// A VM definition to start it from instead of the shipped one.
        #[arg(long)]
        definition: Option<PathBuf>,
        #[command(flatten)]
        site: Site,
    },
    /// Keep the failed-over VM: the other points go, cancel is no longer possible.
    Commit {
        vm: String,
        #[command(flatten)]
        site: Site,
    },
    /// Undo an uncommitted failover: the VM stops, its writes are discarded, replication
    /// from the old primary goes on.
    Cancel {
        vm: String,
        #[command(flatten)]
        site: Site,
    },
    /// Split brain resolved for the old primary: this site's writes since the failover are
    /// overwritten by the old primary's next cycle (kept as a recovery point here).
    Abandon {
        vm: String,
        #[command(flatten)]
        site: Site,
    },
    /// Move the VM to the replica site without losing a write (run on the primary): shut it
    /// down, seal its disks, ship the last cycle, promote the replica site, and replicate
    /// back to this site from there.
    Planned {
        vm: String,
        /// The VM's shipper configuration (names the tracker, the replica and, in
        /// `[reverse]`, this site's applier).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        opts: PlannedOptions,
        #[command(flatten)]
        site: Site,
    },
}

#[derive(clap::Args, Clone, Default)]
pub struct PlannedOptions {
    /// The VM's QMP socket (default: `qmp` in the configuration); without one, the command
    /// waits until the VM has been shut down (its disks have no NBD connection).
    #[arg(long)]
    pub qmp: Option<PathBuf>,
    /// How long the VM may take to shut down.
    #[arg(long, default_value = "5m")]
    pub shutdown_timeout: humantime::Duration,
    /// Do not start the VM on the replica site (only its disks are served).
    #[arg(long)]
    pub no_start: bool,
    /// The VM definition the replica site starts it from (default: the shipped one).
    #[arg(long)]
    pub definition: Option<PathBuf>,
    /// How long shipping the last cycle and the promote may take in all (default 30m);
    /// then the command stops and says where the failover stands.
    #[arg(long)]
    pub timeout: Option<humantime::Duration>,
}

/// [`PlannedOptions::timeout`]'s default: the last cycle holds only the writes since the
/// cycle before, so this is long even over a slow link.
const PLANNED_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(clap::Args)]
pub struct ReverseArgs {
    vm: String,
    /// This (old primary) site's shipper configuration: its `replica` is the new primary,
    /// `[reverse]` this site's applier.
    #[arg(long)]
    config: PathBuf,
    /// Split brain: overwrite this site's writes since the failover with the new primary's
    /// (they stay readable as a recovery point here).
    #[arg(long)]
    discard_local_changes: bool,
    #[command(flatten)]
    site: Site,
}

/// Unplanned failover of `vm` on this (replica) site: `point` None is the newest. Returns
/// the applier's answer: `lineage`, `point`, `disks` (name → NBD URI), `served_ms`, `qemu`.
pub fn fail_over_unplanned(
    admin_socket: &Path,
    vm: &str,
    point: Option<u64>,
    start: bool,
    definition: Option<&Path>,
) -> Result<Value> {
    let req = Admin::FailoverUnplanned(Unplanned {
        vm: vm.to_string(),
        point,
        start,
        definition: definition.map(std::path::absolute).transpose()?,
    });
    admin::call(admin_socket, &req)?.with_context(|| {
        format!(
            "no applier answers on {}: start this site's applier",
            admin_socket.display()
        )
    })
}

pub fn run(op: FailoverOp) -> Result<()> {
    match op {
        FailoverOp::Unplanned {
            vm,
            point,
            start,
            definition,
            site,
        } => {
            let point = match point.as_str() {
                "latest" => None,
                p => Some(p.parse().with_context(|| {
                    format!("--point {p:?}: a cycle number (see `applier points`) or latest")
                })?),
            };
            let t0 = Instant::now();
            let v = fail_over_unplanned(&site.socket(), &vm, point, start, definition.as_deref())?;
            println!(
                "VM {vm} failed over to point {} (new lineage {}), disks served after {:.2} s:",
                v["point"],
                v["lineage"].as_str().unwrap_or("?"),
                v["served_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
            );
            for (d, uri) in v["disks"].as_object().cloned().unwrap_or_default() {
                println!("  {d}: {}", uri.as_str().unwrap_or_default());
            }
            if !v["qemu"].is_null() {
                println!("  VM started: {}", v["qemu"]);
            }
            println!(
                "Commit it with `vmreplica failover commit {vm}`, or cancel it (`vmreplica \
                 failover cancel {vm}`). ({:.2} s)",
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        FailoverOp::Commit { vm, site } => {
            let v = site.call(&Admin::FailoverCommit(Vm { vm: vm.clone() }), "a failover")?;
            println!(
                "VM {vm}: failover committed; this site is its primary (lineage {})",
                v["lineage"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        FailoverOp::Cancel { vm, site } => {
            let v = site.call(&Admin::FailoverCancel(Vm { vm: vm.clone() }), "a failover")?;
            if v["cancelled"] == json!(true) {
                println!(
                    "VM {vm}: failover cancelled; the replica is at point {} again",
                    v["point"]
                );
            } else {
                println!("VM {vm}: no failover in progress; nothing to cancel");
            }
            Ok(())
        }
        FailoverOp::Abandon { vm, site } => {
            let v = site.call(&Admin::FailoverAbandon(Vm { vm: vm.clone() }), "a failover")?;
            if v["cancelled"] == json!(true) {
                // An uncommitted failover is abandoned by cancelling it.
                println!(
                    "VM {vm}: failover abandoned (it was not committed, so it was cancelled: \
                     the writes made here since the failover are discarded and the replica is \
                     at point {} again). Start the old primary's shipper again.",
                    v["point"]
                );
                return Ok(());
            }
            println!(
                "VM {vm}: failover abandoned; this site waits for the old primary's next cycle \
                 ({} bytes written here since the failover will be overwritten; the state \
                 before stays a recovery point). Start the old primary's shipper again.",
                v["divergent_bytes"].as_u64().unwrap_or(0)
            );
            Ok(())
        }
        FailoverOp::Planned {
            vm,
            config,
            opts,
            site,
        } => {
            let f = fail_over_planned(&config, &vm, &opts, &site.socket())?;
            println!(
                "VM {vm}: planned failover done. Its last cycle here, {}, is the replica site's \
                 starting point; the replica site is the primary now (lineage {}) and \
                 replicates back to this site.",
                f.parent, f.lineage
            );
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn tracker(cfg: &ShipperConfig, req: &Request) -> Result<Value> {
    Ok(control::call(&cfg.tracker, req)?)
}

/// NBD connections to the tracker's disks (0 once the VM is gone).
fn connections(cfg: &ShipperConfig) -> Result<u64> {
    let st = tracker(cfg, &Request::Status)?;
    Ok(st["disks"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| d["connections"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0))
}

/// Shuts the VM down: the power button through QMP if there is a socket, then waits until
/// its disks have no NBD connection.
fn shut_down(vm: &str, cfg: &ShipperConfig, qmp: Option<&Path>, within: Duration) -> Result<()> {
    if connections(cfg)? == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + within;
    match qmp.filter(|q| q.exists()) {
        Some(q) => {
            let mut c = vmreplica_vm::Qmp::connect(q, Duration::from_secs(10))
                .with_context(|| format!("VM {vm}: QMP socket {}", q.display()))?;
            c.execute("system_powerdown", None)
                .with_context(|| format!("VM {vm}: system_powerdown"))?;
            eprintln!("VM {vm}: power button pressed; waiting for it to shut down");
        }
        None => eprintln!(
            "VM {vm}: no QMP socket given: waiting for the VM to be shut down (its disks \
             still have NBD connections)"
        ),
    }
    while connections(cfg)? > 0 {
        if Instant::now() >= deadline {
            bail!(
                "VM {vm} did not shut down within {}: its disks still have NBD connections. \
                 Nothing was changed; shut it down, then run the command again",
                humantime::format_duration(within)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// How long the replica site may take to answer the first hello (QUIC's idle timeout
/// ends a connection to a site that is down well before).
const WELCOME: Duration = Duration::from_secs(60);

/// The PID holding `lockfile` (it wrote it there), stopped (SIGTERM, then SIGKILL).
fn stop_holder(lockfile: &Path, what: &str) -> Result<()> {
    vmreplica_applier::failover::procs::stop_holder(lockfile, what, Duration::from_secs(30))
        .map_err(anyhow::Error::msg)
}

/// The VM's role on this site when it is a replica here (`replica`, `reverse-pending`): a
/// planned failover away from this site, or a reverse, was done.
fn replica_here(admin_socket: &Path, vm: &str) -> Result<Option<String>> {
    Ok(admin::call(admin_socket, &Admin::Status)?
        .and_then(|v| {
            v["vms"]
                .as_array()?
                .iter()
                .find(|r| r["vm"] == vm)
                .map(|r| r["role"]["kind"].as_str().unwrap_or("").to_string())
        })
        .filter(|k| k == "replica" || k == "reverse-pending"))
}

/// One planned failover or reverse of a VM at a time on this site: a flock on
/// `failover.lock` beside the tracker's control socket, held until the command ends. A
/// second one, started meanwhile, decided from what the first had not yet changed (the
/// replica not yet promoted) and then shipped a last cycle to a replica the first had
/// promoted, retrying for ever. None when that directory is gone (the command then fails on
/// the missing tracker).
fn command_lock(cfg: &ShipperConfig, vm: &str) -> Result<Option<std::fs::File>> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let path = vmreplica_shipper::lock::dir_of(&cfg.tracker).join("failover.lock");
    let mut f = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    };
    // SAFETY: flock on a descriptor this function owns; released when the file is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "VM {vm}: another planned failover or reverse of it runs on this site (PID {}, \
             lock {}): wait until it ends; run this command again only if that one failed. \
             Nothing was changed",
            pid.trim(),
            path.display()
        );
    }
    f.set_len(0)?;
    write!(f, "{}", std::process::id())?;
    Ok(Some(f))
}

/// Planned failover of the VM of `config` (run on its primary): shut the VM down, seal its
/// disks, stop its shipper, ship the last cycle, adopt this site's images as the replica
/// (this site's applier, `admin_socket`), promote the replica site, stop the tracker. Rerun
/// after an interruption, it finishes.
pub fn fail_over_planned(
    config: &Path,
    vm: &str,
    opts: &PlannedOptions,
    admin_socket: &Path,
) -> Result<Finished> {
    let cfg = ShipperConfig::load(config)?;
    if cfg.vm != vm {
        bail!(
            "{} protects VM {}, not {vm}: give the configuration of {vm}'s shipper",
            config.display(),
            cfg.vm
        );
    }
    let Some(back) = cfg.reverse.clone() else {
        bail!(
            "{}: a planned failover needs `[reverse]` (replica, server_name): this site's \
             applier, which the replica site replicates back to",
            config.display()
        );
    };
    let _one_at_a_time = command_lock(&cfg, vm)?;
    if admin::call(admin_socket, &Admin::Status)?.is_none() {
        bail!(
            "no applier answers on {} on this site: start it first (it receives the \
             replication back); nothing was changed",
            admin_socket.display()
        );
    }
    let st = match tracker(&cfg, &Request::Status) {
        Ok(st) => st,
        Err(e) => {
            // After a planned failover away from this site its tracker is gone and its
            // applier holds the VM as the new primary's replica: say so, not only the socket.
            if let Some(kind) = replica_here(admin_socket, vm)? {
                bail!(
                    "VM {vm}: this site is its {kind} now (its tracker, {}, is gone): the \
                     planned failover away from this site was done. To fail back, run \
                     `vmreplica failover planned {vm} --config ...` on the site that is its \
                     primary now; nothing was changed",
                    cfg.tracker.display()
                );
            }
            bail!(
                "VM {vm}: its tracker does not answer ({e}): start it (the planned failover \
                 seals it and ships its last cycle); nothing was changed"
            );
        }
    };
    let state_dir = PathBuf::from(st["state_dir"].as_str().unwrap_or_default());
    let Some(lineage) = st["lineage"].as_str().map(str::to_string) else {
        bail!("VM {vm}: the tracker has no lineage yet (no initial copy): nothing to fail over");
    };
    let rt = runtime()?;
    let w: Welcome = rt
        .block_on(async {
            match tokio::time::timeout(WELCOME, vmreplica_shipper::failover::welcome(&cfg)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {WELCOME:?}")),
            }
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "VM {vm}: the replica site ({}, {}) does not answer: {e}. A planned failover \
                 ships the last cycle there and promotes it, so it needs that site's applier \
                 running. Nothing was changed: the VM, its tracker and its shipper run here as \
                 before; start the replica site's applier, then run the command again",
                cfg.replica,
                cfg.server_name
            )
        })?;
    let promoted =
        matches!(w.role, Role::Primary { parent, .. } if parent.lineage.to_string() == lineage);
    match w.role {
        Role::Replica if w.lineage.map(|l| l.to_string()) == Some(lineage.clone()) => {}
        _ if promoted => {}
        other => bail!(
            "{}",
            not_this_trackers_replica(vm, &cfg, other, w.lineage, &lineage)
        ),
    }
    if !promoted {
        let qmp = opts.qmp.clone().or(cfg.qmp.clone());
        shut_down(vm, &cfg, qmp.as_deref(), opts.shutdown_timeout.into())?;
        tracker(&cfg, &Request::Seal)?;
        eprintln!("VM {vm}: shut down; its disks are sealed");
        stop_holder(&vmreplica_shipper::lock::path_of(&cfg.tracker), "shipper")?;
    }
    let definition = match &opts.definition {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("--definition {}", p.display()))?,
        ),
        None => None,
    };
    let planned = Planned {
        back: Endpoint {
            addr: back.replica.clone(),
            name: back.server_name.clone(),
        },
        here: Endpoint {
            addr: cfg.replica.clone(),
            name: cfg.server_name.clone(),
        },
        interval: cfg.interval_text.clone(),
        start: !opts.no_start,
        definition,
    };
    let adopted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let adopt = {
        let (socket, owner, tracker, vm, adopted) = (
            admin_socket.to_path_buf(),
            cfg.server_name.clone(),
            std::path::absolute(&cfg.tracker)?,
            vm.to_string(),
            std::sync::Arc::clone(&adopted),
        );
        std::sync::Arc::new(move |p: LineagePoint| -> Result<(), String> {
            let req = Admin::AdoptPrimary(Adopt {
                vm: vm.clone(),
                owner: owner.clone(),
                tracker: tracker.clone(),
                lineage: p.lineage,
                cycle: p.cycle,
            });
            adopted.store(true, std::sync::atomic::Ordering::SeqCst);
            match admin::call(&socket, &req) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(format!("no applier answers on {}", socket.display())),
                Err(e) => Err(e.to_string()),
            }
        })
    };
    let progress: std::sync::Arc<dyn vmreplica_shipper::progress::Progress> =
        std::sync::Arc::new(vmreplica_shipper::progress::LogProgress::default());
    let limit = opts.timeout.map_or(PLANNED_TIMEOUT, Into::into);
    let r = rt.block_on(async {
        // The session retries a lost replica for ever, as a shipper does; a command ends.
        let run = vmreplica_shipper::run::run_with(
            cfg.clone(),
            progress,
            std::future::pending(),
            None,
            Some(PlannedRun { planned, adopt }),
        );
        match tokio::time::timeout(limit, run).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "it did not finish within {} (--timeout)",
                humantime::format_duration(limit)
            )),
        }
    });
    let finished = match r {
        Ok(Some(f)) => f,
        other => {
            let why = match other {
                Err(e) => e,
                _ => "the session ended without promoting the replica".to_string(),
            };
            // Back to where it was: this site is the primary, sealed until the user says. The
            // adoption is withdrawn (its record kept, taking no cycle), not removed: the
            // command run again adopts the images anew.
            if adopted.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = admin::call(
                    admin_socket,
                    &Admin::AdoptPrimaryUndo(Vm { vm: vm.to_string() }),
                );
                // The promote may have been made on the replica site, its answer lost: the
                // VM must not run on both sites.
                bail!(
                    "VM {vm}: the planned failover did not complete: {why}. This site's images \
                     were handed over (that adoption is now withdrawn: kept, taking no \
                     cycle) and the promote may have been asked, so the replica site \
                     ({}) may be the VM's primary already: do not unseal or start the VM here \
                     until you know. Run the command again once the replica site answers (it \
                     says whether that site was promoted, and finishes if it can)",
                    cfg.replica
                );
            }
            bail!(
                "VM {vm}: the planned failover did not complete: {why}. This site is still the \
                 VM's primary, its disks sealed (no write was lost): fix the cause and run the \
                 command again, or take the VM back here with `vmreplica ctl --socket {} \
                 unseal` and start it and its shipper again",
                cfg.tracker.display()
            );
        }
    };
    stop_holder(&state_dir.join("lock"), "tracker")?;
    Ok(finished)
}

/// `vmreplica reverse`: after an unplanned failover, this (old primary) site asks the new
/// primary to replicate back; its images become the replica.
/// Why the replica site cannot take a planned failover from this tracker (lineage `ours`):
/// what it is now, and what the admin can do about it.
fn not_this_trackers_replica(
    vm: &str,
    cfg: &ShipperConfig,
    role: Role,
    theirs: Option<vmreplica_common::lineage::Lineage>,
    ours: &str,
) -> String {
    let site = format!("the replica site ({}, {})", cfg.replica, cfg.server_name);
    let what = match role {
        Role::FailedOver { parent, .. } => format!(
            "{site} failed over already: VM {vm} runs there from {parent}, not committed yet. \
             To go on replicating from here, cancel that failover on the replica site \
             (`vmreplica failover cancel {vm}`: the writes made there since are undone), then run \
             this command again; to keep it, commit it there (`vmreplica failover commit {vm}`) \
             and replicate back with `vmreplica reverse {vm} --config ...` here"
        ),
        Role::Primary { lineage, parent } => format!(
            "{site} is VM {vm}'s primary (lineage {lineage}, since its failover at {parent}): to \
             replicate back to this site run `vmreplica reverse {vm} --config ...` here; a \
             planned failover back is run on that site"
        ),
        Role::ReversePending { parent } => format!(
            "{site} waits to replicate VM {vm} back from {parent} (a failover was committed \
             there): it takes no planned failover until that reverse cycle has landed"
        ),
        Role::Replica => format!(
            "{site} holds VM {vm} in lineage {}, this tracker in {ours}: it is not this \
             tracker's replica (another primary's, or a replica whose history was reset); check \
             `vmreplica status` on both sites",
            vmreplica_common::lineage::show(theirs)
        ),
    };
    format!("VM {vm}: {what}. A planned failover needs a replica that receives this tracker's cycles; nothing was changed")
}

pub fn reverse(a: ReverseArgs) -> Result<()> {
    let cfg = ShipperConfig::load(&a.config)?;
    let vm = a.vm.as_str();
    if cfg.vm != vm {
        bail!("{} protects VM {}, not {vm}", a.config.display(), cfg.vm);
    }
    let Some(back) = cfg.reverse.clone() else {
        bail!(
            "{}: `[reverse]` (replica, server_name) must name this site's applier, which the \
             new primary replicates back to",
            a.config.display()
        );
    };
    let _one_at_a_time = command_lock(&cfg, vm)?;
    if admin::call(&a.site.socket(), &Admin::Status)?.is_none() {
        bail!(
            "no applier answers on {}: start this site's applier first",
            a.site.socket().display()
        );
    }
    let st = match tracker(&cfg, &Request::Status) {
        Ok(st) => st,
        Err(e) => {
            if let Some(kind) = replica_here(&a.site.socket(), vm)? {
                bail!(
                    "VM {vm}: this site is its {kind} already (its tracker, {}, is gone): the \
                     reverse was done; nothing was changed",
                    cfg.tracker.display()
                );
            }
            bail!(
                "VM {vm}: the old primary's tracker does not answer ({e}): it must run (it \
                 knows which blocks this site wrote that the new primary lacks): start it, \
                 without the VM; nothing was changed"
            );
        }
    };
    let lineage = st["lineage"].as_str().unwrap_or_default().to_string();
    let state_dir = PathBuf::from(st["state_dir"].as_str().unwrap_or_default());
    let untrusted: Vec<&str> = st["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["resync_required"] == json!(true) && d["excluded"] != json!(true))
        .filter_map(|d| d["name"].as_str())
        .collect();
    if !untrusted.is_empty() && !a.discard_local_changes {
        // Its last write's time may be as old as the state: a split brain could not be told.
        bail!(
            "VM {vm}: this site's tracker ({}) cannot say what it wrote on disk(s) {}: they \
             are marked for a checksum resync (its state was restored from an older copy, \
             lost, or its tracking failed), so neither whether the VM wrote here after the \
             failover. Run `vmreplica reverse {vm} --discard-local-changes --config ...` to \
             have each such disk overwritten whole by the new primary's (this site's state \
             before stays a recovery point here); nothing was changed",
            state_dir.display(),
            untrusted.join(", ")
        );
    }
    let conns = connections(&cfg)?;
    let ask = |start| ReverseAsk {
        start,
        discard_local: a.discard_local_changes,
        last_write_at: st["last_write_at"].as_u64().unwrap_or(0),
        back: Endpoint {
            addr: back.replica.clone(),
            name: back.server_name.clone(),
        },
    };
    let rt = runtime()?;
    let ok = rt
        .block_on(vmreplica_shipper::failover::reverse(&cfg, &ask(false)))
        .map_err(|e| anyhow::anyhow!("the new primary refused: {e}"))?;
    if ok.parent.lineage.to_string() != lineage {
        bail!(
            "VM {vm}: the new primary continues {}, but this site's tracker is in lineage \
             {lineage}: this site's disks are not the ones it failed over from; nothing was \
             changed",
            ok.parent
        );
    }
    if conns > 0 {
        bail!(
            "VM {vm}: its disks still have {conns} NBD connection(s) on this site: shut the VM \
             down first; nothing was changed"
        );
    }
    // Only now that every check passed: a refused reverse leaves the old shipper running
    // (it retries its replica as before), so "nothing was changed" holds.
    stop_holder(&vmreplica_shipper::lock::path_of(&cfg.tracker), "shipper")?;
    let v = a.site.call(
        &Admin::AdoptPrimary(Adopt {
            vm: vm.to_string(),
            owner: cfg.server_name.clone(),
            tracker: std::path::absolute(&cfg.tracker)?,
            lineage: ok.parent.lineage,
            cycle: ok.parent.cycle,
        }),
        "reverse replication",
    )?;
    stop_holder(&state_dir.join("lock"), "tracker")?;
    rt.block_on(vmreplica_shipper::failover::reverse(&cfg, &ask(true)))
        .map_err(|e| anyhow::anyhow!("the new primary refused: {e}"))?;
    if !untrusted.is_empty() {
        eprintln!(
            "VM {vm}: this site's tracker cannot say what it wrote on disk(s) {} (its state was \
             restored from an older copy, lost, or its tracking failed): each is overwritten \
             whole by the new primary's reverse cycle",
            untrusted.join(", ")
        );
    }
    println!(
        "VM {vm}: the new primary (lineage {}) replicates back to this site from {}; {} bytes \
         written here that it lacks are overwritten (this site's state before stays a recovery \
         point)",
        ok.lineage,
        ok.parent,
        v["divergent_bytes"].as_u64().unwrap_or(0)
    );
    Ok(())
}
