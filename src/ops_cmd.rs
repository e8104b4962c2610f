//! Operations commands: `status`, `events`, `pause`, `resume`, `resync`, `set`, `remove`.
//! They find the roles running on this host through the runtime registry
//! (`/run/vmreplica`, or `$VMREPLICA_RUN_DIR`), and read state files where a role is not
//! running (`--store`, `--config`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use vmreplica_ops::registry::{self, Entry};
use vmreplica_ops::status::{Level, Process, Report, Site, State, VmStatus};
use vmreplica_shipper::control::{self as shipper_ctl, Request as Ship};

use crate::human_bytes;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Only this VM.
    pub vm: Option<String>,
    /// The documented JSON (schema `vmreplica-status`, version 1) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also a replica store no applier runs on. Repeatable.
    #[arg(long)]
    pub store: Vec<PathBuf>,
    /// Also a VM whose shipper does not run (its configuration). Repeatable.
    #[arg(long)]
    pub config: Vec<PathBuf>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn process(e: &Entry) -> Process {
    Process {
        role: e.role.clone(),
        pid: e.pid,
        socket: e.control.as_ref().map(|p| p.display().to_string()),
    }
}

/// The primary's view of a VM whose shipper does not run: its state file and its tracker.
fn offline_primary(
    vm: &str,
    tracker_socket: &Path,
    interval: Option<u64>,
    rpo_limit: u64,
    processes: Vec<Process>,
) -> Option<VmStatus> {
    let state_path = vmreplica_shipper::state::path_for(tracker_socket);
    let state = vmreplica_shipper::state::ShipperState::load(&state_path)
        .ok()
        .flatten()
        .unwrap_or_else(|| vmreplica_shipper::state::ShipperState {
            vm: vm.to_string(),
            ..Default::default()
        });
    if state.vm.is_empty() {
        return None;
    }
    let t = vmreplica_tracker::control::call(
        tracker_socket,
        &vmreplica_tracker::control::Request::Status,
    )
    .map_err(|e| vmreplica_shipper::run::tracker_error(tracker_socket, &e).to_string());
    Some(vmreplica_shipper::status::primary(
        vmreplica_shipper::status::Inputs {
            vm: &state.vm.clone(),
            now_ms: now_ms(),
            state: &state,
            interval,
            rpo_limit,
            tracker: t.as_ref().map_err(|e| e.clone()),
            live: None,
            processes,
        },
    ))
}

/// Every VM this host protects or holds.
pub fn gather(a: &StatusArgs) -> Result<Report> {
    let entries = registry::list();
    let mut vms: Vec<VmStatus> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let trackers: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.role == registry::TRACKER)
        .collect();
    let tracker_of = |socket: &Option<PathBuf>| {
        trackers
            .iter()
            .find(|t| t.control.is_some() && t.control == *socket)
            .map(|t| process(t))
    };
    for e in entries.iter().filter(|e| e.role == registry::SHIPPER) {
        let Some(socket) = &e.control else { continue };
        match shipper_ctl::call(socket, &Ship::Status) {
            Ok(Some(v)) => {
                let mut st: VmStatus = serde_json::from_value(v)
                    .with_context(|| format!("status from {}", socket.display()))?;
                st.processes.extend(tracker_of(&e.tracker));
                vms.push(st);
            }
            Ok(None) | Err(_) => notes.push(format!(
                "the shipper of {} (PID {}) does not answer at {}",
                e.vm.as_deref().unwrap_or("?"),
                e.pid,
                socket.display()
            )),
        }
    }
    // Trackers of VMs whose shipper does not run.
    for t in &trackers {
        let Some(control) = &t.control else { continue };
        if entries
            .iter()
            .any(|e| e.role == registry::SHIPPER && e.tracker.as_ref() == Some(control))
        {
            continue;
        }
        let sp = vmreplica_shipper::state::path_for(control);
        if !sp.exists() {
            notes.push(format!(
                "a tracker (PID {}, state {}) serves disks that no shipper on this host \
                 ships (no shipper state there)",
                t.pid,
                t.state
                    .as_ref()
                    .map_or("?".into(), |p| p.display().to_string())
            ));
            continue;
        }
        if let Some(st) = offline_primary(
            "",
            control,
            None,
            vmreplica_ops::status::DEFAULT_RPO_LIMIT,
            vec![process(t)],
        ) {
            vms.push(st);
        }
    }
    for cfg in &a.config {
        let c = vmreplica_shipper::ShipperConfig::load(cfg)?;
        if vms.iter().any(|v| v.vm == c.vm && v.site == Site::Primary) {
            continue;
        }
        let interval = match c.interval {
            vmreplica_shipper::config::Interval::Every(d) => Some(d.as_secs().max(1)),
            vmreplica_shipper::config::Interval::Continuous => None,
        };
        if let Some(mut st) = offline_primary(
            &c.vm,
            &c.tracker,
            interval,
            c.rpo_limit.as_secs(),
            Vec::new(),
        ) {
            st.vm = c.vm.clone();
            vms.push(st);
        }
    }
    for e in entries.iter().filter(|e| e.role == registry::APPLIER) {
        let Some(socket) = &e.control else { continue };
        match vmreplica_applier::admin::call(socket, &vmreplica_applier::admin::Request::Report) {
            Ok(Some(v)) => vms.extend(serde_json::from_value::<Vec<VmStatus>>(v)?),
            Ok(None) | Err(_) => notes.push(format!(
                "the applier (PID {}) does not answer at {}",
                e.pid,
                socket.display()
            )),
        }
    }
    for s in &a.store {
        let served = entries.iter().any(|e| {
            e.role == registry::APPLIER
                && e.state
                    .as_deref()
                    .map(std::fs::canonicalize)
                    .and_then(Result::ok)
                    == std::fs::canonicalize(s).ok()
        });
        if !served {
            let store = vmreplica_applier::Store::new(s, Default::default())?;
            vms.extend(vmreplica_applier::ops::store_report(&store));
        }
    }
    if let Some(vm) = &a.vm {
        vms.retain(|v| &v.vm == vm);
    }
    vms.sort_by(|a, b| (a.vm.as_str(), a.site as u8).cmp(&(b.vm.as_str(), b.site as u8)));
    for n in notes {
        eprintln!("note: {n}");
    }
    Ok(Report::new(hostname(), now_ms() / 1000, vms))
}

pub fn status(a: StatusArgs) -> Result<()> {
    let r = gather(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if r.vms.is_empty() && a.vm.is_none() {
        println!(
            "no VM is protected or held on this host{} (roles register in {})",
            a.vm.as_deref()
                .map(|v| format!(" by the name {v}"))
                .unwrap_or_default(),
            registry::run_dir().display()
        );
    } else {
        for v in &r.vms {
            print!("{}", render(v));
        }
    }
    if let Some(vm) = &a.vm {
        if r.vms.is_empty() {
            bail!(
                "VM {vm}: nothing on this host protects or holds it (roles register in {}; \
                 a replica store or a shipper configuration whose role does not run: --store, \
                 --config)",
                registry::run_dir().display()
            );
        }
    }
    Ok(())
}

fn ago(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn time(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

fn state_name(s: State) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(|s| s.replace('-', " ")))
        .unwrap_or_default()
}

/// What this site is to the VM, for the heading: the replica site's record says it (a VM
/// failed over to this site runs here: that site is no replica any more).
fn site_label(v: &VmStatus) -> &'static str {
    match (v.site, v.role.as_str()) {
        (Site::Primary, _) => "primary site",
        (Site::Replica, "failed-over") => "failover site",
        (Site::Replica, "primary") => "new primary site",
        (Site::Replica, "reverse-pending") => "old primary site",
        (Site::Replica, _) => "replica site",
    }
}

/// One VM as text.
pub fn render(v: &VmStatus) -> String {
    let mut o = String::new();
    let site = site_label(v);
    let level = match v.health.level {
        Level::Normal => "Normal",
        Level::Warning => "Warning",
        Level::Critical => "Critical",
    };
    o += &format!(
        "{} ({site}): {}, health {level}\n",
        v.vm,
        state_name(v.state)
    );
    for r in &v.health.reasons {
        o += &format!("  ! {r}\n");
    }
    if let Some(f) = &v.failover {
        o += &format!(
            "  failover: {} (point {}, since {}{})\n",
            f.sub_state.replace('-', " "),
            f.point,
            time(f.since),
            f.lineage
                .as_deref()
                .map(|l| format!(", new lineage {l}"))
                .unwrap_or_default()
        );
    }
    if let Some(t) = v.paused_since {
        o += &format!("  paused since {}\n", time(t));
    }
    for t in &v.test_failovers {
        o += &format!(
            "  test failover of point {} since {}",
            t.point,
            time(t.since)
        );
        if let Some(pid) = t.vm_pid {
            o += &format!(", test VM PID {pid}");
        }
        if let Some(e) = &t.error {
            o += &format!(": {e}");
        }
        o += "\n";
        for d in &t.disks {
            o += &format!(
                "    {}: {}{}\n",
                d.disk,
                d.uri,
                d.tcp_uri
                    .as_deref()
                    .map(|u| format!(" and {u}"))
                    .unwrap_or_default()
            );
        }
    }
    let interval = v.interval_seconds.map_or("continuous".to_string(), ago);
    o += &format!(
        "  role {}, interval {interval}, RPO limit {}{}\n",
        v.role,
        ago(v.rpo_limit_seconds),
        v.lineage
            .as_deref()
            .map(|l| format!(", lineage {l}"))
            .unwrap_or_default()
    );
    if let Some(p) = &v.progress {
        o += &format!(
            "  {} cycle {} ({}): {:.0}%, {} of {}, {:.1} MB/s, ETA {}\n",
            p.phase,
            p.cycle,
            p.kind,
            p.percent,
            human_bytes(p.done_bytes),
            human_bytes(p.total_bytes),
            p.rate_bytes_per_second / 1e6,
            p.eta_seconds.map_or("unknown".into(), ago)
        );
    }
    match &v.latest_point {
        Some(p) => {
            o += &format!(
                "  latest point: cycle {} ({}{}), {} ({} ago)",
                p.cycle,
                p.kind,
                if p.app_consistent {
                    ", app-consistent"
                } else {
                    ""
                },
                time(p.time),
                ago(p.age_seconds)
            );
            if let Some(n) = v.points {
                o += &format!("; {n} points held");
            }
            o += "\n";
        }
        None => o += "  latest point: none yet\n",
    }
    o += &format!(
        "  RPO now: {}{}\n",
        v.rpo_seconds.map_or("unknown".into(), ago),
        v.backlog_bytes
            .map(|b| format!(", backlog {}", human_bytes(b)))
            .unwrap_or_default()
    );
    let h = &v.last_hour;
    o += &format!(
        "  last hour: {} cycles done, {} missed{}; size avg {} peak {}; duration avg {:.1} s peak {:.1} s\n",
        h.cycles_done,
        h.cycles_missed,
        h.cycles_expected
            .map(|e| format!(" (of {e} expected)"))
            .unwrap_or_default(),
        human_bytes(h.avg_cycle_bytes),
        human_bytes(h.peak_cycle_bytes),
        h.avg_cycle_seconds,
        h.peak_cycle_seconds
    );
    let mut sent = format!(
        "  since protection began: {} cycles, {} of data",
        v.total_cycles,
        human_bytes(v.total_bytes)
    );
    if v.site == Site::Primary {
        sent += &format!(", {} on the wire", human_bytes(v.total_wire_bytes));
    }
    if let Some(r) = v.compression_ratio {
        sent += &format!(", compression {r:.2}x");
    }
    if let Some(r) = v.link_rate_bytes_per_second {
        sent += &format!(", link {}/s", human_bytes(r as u64));
    }
    if v.site == Site::Primary {
        sent += &format!(
            ", limit {}",
            v.bandwidth_limit_bytes_per_second
                .map_or("none".to_string(), |b| format!("{}/s", human_bytes(b)))
        );
    }
    o += &sent;
    o += "\n";
    let a = &v.app_consistent;
    if a.every_seconds.is_some() || a.last_time.is_some() || a.last_error.is_some() {
        o += &format!(
            "  app-consistent: {}{}{}\n",
            a.every_seconds
                .map_or("".into(), |e| format!("every {}, ", ago(e))),
            a.last_time.map_or("none yet".into(), |t| format!(
                "last {}{}",
                time(t),
                a.last_frozen_ms
                    .map(|ms| format!(" (guest frozen {ms} ms)"))
                    .unwrap_or_default()
            )),
            a.last_error
                .as_deref()
                .map(|e| format!("; last failure: {e}"))
                .unwrap_or_default()
        );
    }
    let disks: Vec<String> = v
        .disks
        .iter()
        .map(|d| {
            let mut s = format!("{} {}", d.name, human_bytes(d.size));
            if d.excluded {
                s += " (excluded)";
            } else if let Some(b) = d.dirty_bytes {
                s += &format!(" (dirty {})", human_bytes(b));
            }
            if d.resync_required {
                s += " (resync required)";
            }
            s
        })
        .collect();
    if !disks.is_empty() {
        o += &format!("  disks: {}\n", disks.join(", "));
    }
    if let (Some(e), Some(t)) = (&v.last_error, v.last_error_time) {
        o += &format!("  last error ({}): {e}\n", time(t));
    }
    o
}

/// The shipper of `vm` on this host (from the registry).
fn shipper_of(vm: &str) -> Result<Entry> {
    registry::list()
        .into_iter()
        .find(|e| e.role == registry::SHIPPER && e.vm.as_deref() == Some(vm))
        .with_context(|| {
            format!(
                "no shipper of VM {vm} runs on this host (roles register in {}); start it, or \
                 run this on the VM's primary host",
                registry::run_dir().display()
            )
        })
}

fn ask(socket: &Path, req: &Ship) -> Result<Value> {
    shipper_ctl::call(socket, req)?
        .with_context(|| format!("no shipper answers at {}", socket.display()))
}

pub fn pause(vm: &str, resume: bool) -> Result<()> {
    let e = shipper_of(vm)?;
    let socket = e.control.context("the shipper's entry names no socket")?;
    let v = ask(&socket, if resume { &Ship::Resume } else { &Ship::Pause })?;
    if v["changed"] == Value::Bool(false) {
        if resume {
            println!("VM {vm}: replication was not paused: nothing to resume");
        } else {
            println!("VM {vm}: replication was paused already");
        }
    } else if resume {
        println!("VM {vm}: replication resumed: one cycle ships what changed meanwhile");
    } else {
        println!(
            "VM {vm}: replication paused (the tracker keeps tracking; the replica site is \
             told; the pause survives a restart of the shipper; `vmreplica resume {vm}` goes \
             on)"
        );
    }
    Ok(())
}

/// `resync VM [--wait]`: asks for a checksum resync; with --wait, shows its progress (the
/// checksum pass, then the transfer) until the shipper reports it applied (its event).
pub fn resync(vm: &str, wait: bool) -> Result<()> {
    let e = shipper_of(vm)?;
    let socket = e.control.context("the shipper's entry names no socket")?;
    let mut follow = vmreplica_ops::events::Follower::new(&registry::run_dir(), false);
    ask(&socket, &Ship::Resync)?;
    let st: VmStatus = serde_json::from_value(ask(&socket, &Ship::Status)?)?;
    if st.state == State::Paused {
        println!(
            "VM {vm}: checksum resync requested; replication is paused: it runs when \
             replication resumes (`vmreplica resume {vm}`)"
        );
        if wait {
            bail!("VM {vm}: paused: not waiting for a resync that cannot start; resume it first");
        }
        return Ok(());
    }
    println!("VM {vm}: checksum resync requested: the next cycle compares every block");
    if !wait {
        return Ok(());
    }
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        for line in follow.poll() {
            let Ok(ev) = serde_json::from_str::<vmreplica_ops::events::Event>(&line) else {
                continue;
            };
            if ev.vm.as_deref() == Some(vm)
                && ev.source == "shipper"
                && ev.event == vmreplica_ops::events::CYCLE_APPLIED
                && ev.fields.get("kind") == Some(&Value::from("resync"))
            {
                println!(
                    "VM {vm}: resync applied (cycle {}, {} differed)",
                    ev.fields.get("cycle").cloned().unwrap_or_default(),
                    human_bytes(ev.fields.get("bytes").and_then(Value::as_u64).unwrap_or(0))
                );
                return Ok(());
            }
        }
        let st: VmStatus = serde_json::from_value(ask(&socket, &Ship::Status)?)?;
        if let Some(p) = st.progress.as_ref().filter(|p| p.kind == "resync") {
            if last_line.elapsed() >= Duration::from_secs(2) {
                last_line = Instant::now();
                println!(
                    "  {} (cycle {}): {:.0}%, {} of {}, {:.1} MB/s",
                    p.phase,
                    p.cycle,
                    p.percent,
                    human_bytes(p.done_bytes),
                    human_bytes(p.total_bytes),
                    p.rate_bytes_per_second / 1e6
                );
            }
        }
        if st.state == State::Paused {
            bail!("VM {vm}: replication was paused: the resync goes on when it resumes");
        }
        if st.state == State::Stopped {
            bail!(
                "VM {vm}: replication stopped: {}",
                st.health.reasons.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `set VM key=value...`: in the configuration file (kept readable, comments and all) and,
/// if the shipper runs, at once.
pub fn set(vm: &str, pairs: &[String], config: Option<&Path>) -> Result<()> {
    let entry = shipper_of(vm).ok();
    let config = match (config, entry.as_ref().and_then(|e| e.config.clone())) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(c)) => c,
        (None, None) => {
            bail!("VM {vm}: its shipper does not run here: give its configuration with --config")
        }
    };
    let mut kv = Vec::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            bail!(
                "{p:?}: expected key=value (keys: {})",
                vmreplica_shipper::config::SETTABLE.join(", ")
            );
        };
        kv.push((k.trim().to_string(), v.trim().to_string()));
    }
    // All pairs at once: one bad pair, or a file of another VM, changes nothing.
    let refs: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    vmreplica_shipper::ShipperConfig::set_in_file(&config, vm, &refs)?;
    println!("{}: {}", config.display(), pairs.join(", "));
    let same = |a: &Path, b: &Path| std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok();
    if let Some(e) = entry
        .as_ref()
        .filter(|e| e.config.as_deref().is_some_and(|c| !same(c, &config)))
    {
        bail!(
            "VM {vm}: its running shipper (PID {}) reads {}, not {}: that file was changed, \
             the running shipper was not",
            e.pid,
            e.config.as_deref().unwrap_or(Path::new("?")).display(),
            config.display()
        );
    }
    if let Some(socket) = entry.and_then(|e| e.control) {
        // The running shipper reads the file just written (its defaults included).
        let changed = ask(&socket, &Ship::Reload)?;
        println!("VM {vm}: the running shipper uses the new settings now");
        if let Some(keys) = changed["restart_needed"].as_array() {
            let keys: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
            eprintln!(
                "note: {} changed in the file earlier and take effect when the shipper restarts",
                keys.join(", ")
            );
        }
    }
    Ok(())
}

/// Asks the operator to type `vm` to go on (or --yes).
fn confirm(prompt: &str, vm: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() && std::env::var_os("VMREPLICA_CONFIRM_FROM_STDIN").is_none() {
        bail!("{prompt}\nrefusing without a terminal to confirm on: give --yes");
    }
    eprint!("{prompt}\nType the VM's name ({vm}) to confirm: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    if line.trim() != vm {
        bail!("not confirmed: nothing was removed");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RemoveArgs {
    pub vm: String,
    /// Remove the VM's replica from this host's store (images, points, state).
    #[arg(long)]
    pub replica: bool,
    /// The store (default: the running applier's, or /var/lib/vmreplica-replicas).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Stop the VM's shipper on this host and remove its state (history, pause); the
    /// tracker keeps serving the disks.
    #[arg(long)]
    pub primary: bool,
    /// The shipper's configuration, when it does not run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

pub fn remove(a: RemoveArgs) -> Result<()> {
    if !a.replica && !a.primary {
        bail!(
            "say which side to remove {} from: --replica (this host's replica of it) and/or \
             --primary (its shipper here)",
            a.vm
        );
    }
    vmreplica_common::validate_name(&a.vm)?;
    if a.primary {
        remove_primary(&a)?;
    }
    if a.replica {
        remove_replica(&a)?;
    }
    Ok(())
}

fn remove_primary(a: &RemoveArgs) -> Result<()> {
    let vm = &a.vm;
    let running = shipper_of(vm).ok();
    let tracker = match (&running, &a.config) {
        (Some(e), _) => e
            .tracker
            .clone()
            .context("the shipper's entry names no tracker")?,
        (None, Some(c)) => vmreplica_shipper::ShipperConfig::load(c)?.tracker,
        (None, None) => {
            bail!("VM {vm}: no shipper of it runs here: give its configuration with --config")
        }
    };
    let state = vmreplica_shipper::state::path_for(&tracker);
    confirm(
        &format!(
            "Stop replicating VM {vm} from this host: its shipper{} is stopped and its state \
             {} (cycle history, pause) is deleted. The tracker keeps serving its disks; the \
             replica site keeps its replica until removed there.",
            running
                .as_ref()
                .map(|e| format!(" (PID {})", e.pid))
                .unwrap_or_default(),
            state.display()
        ),
        vm,
        a.yes,
    )?;
    if let Some(e) = running {
        // SAFETY: kill(2) with SIGTERM on the PID the registry names, checked to be the
        // process that registered (alive() compares its start time).
        if e.alive() && unsafe { libc::kill(e.pid as i32, libc::SIGTERM) } != 0 {
            bail!(
                "cannot stop the shipper (PID {}): {}",
                e.pid,
                std::io::Error::last_os_error()
            );
        }
        let t0 = Instant::now();
        while e.alive() {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("the shipper (PID {}) did not stop within 60 s", e.pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("VM {vm}: shipper (PID {}) stopped", e.pid);
        eprintln!(
            "note: a service manager may start it again: `systemctl disable --now vmreplica-shipper@{vm}`"
        );
    }
    match std::fs::remove_file(&state) {
        Ok(()) => println!("VM {vm}: removed {}", state.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("{}: {e}", state.display()),
    }
    vmreplica_ops::events::emit(
        vmreplica_ops::events::Event::new(vmreplica_ops::events::REMOVED)
            .vm(vm)
            .field("site", "primary"),
    );
    Ok(())
}

fn remove_replica(a: &RemoveArgs) -> Result<()> {
    let vm = &a.vm;
    let applier = registry::list().into_iter().find(|e| {
        e.role == registry::APPLIER
            && match &a.store {
                Some(s) => {
                    e.state
                        .as_deref()
                        .map(std::fs::canonicalize)
                        .and_then(Result::ok)
                        == std::fs::canonicalize(s).ok()
                }
                None => true,
            }
    });
    let store = match (&a.store, applier.as_ref().and_then(|e| e.state.clone())) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s,
        (None, None) => PathBuf::from("/var/lib/vmreplica-replicas"),
    };
    let vs = vmreplica_applier::Store::new(&store, Default::default())?;
    let points = vs
        .points(vm)
        .with_context(|| format!("VM {vm} in store {}", store.display()))?;
    confirm(
        &format!(
            "Remove the replica of VM {vm} from {}: its images and {} recovery points are \
             deleted. If its primary goes on shipping, it starts a new initial copy.",
            store.display(),
            points.len()
        ),
        vm,
        a.yes,
    )?;
    let socket = applier.and_then(|e| e.control);
    let removed = match socket {
        Some(s) => vmreplica_applier::admin::call(
            &s,
            &vmreplica_applier::admin::Request::Remove { vm: vm.clone() },
        )?
        .map(|v| v["removed"].as_str().unwrap_or_default().to_string()),
        None => None,
    };
    let dir = match removed {
        Some(d) => d,
        None => vmreplica_applier::ops::remove_offline(&store, vm)?
            .display()
            .to_string(),
    };
    println!("VM {vm}: replica removed ({dir})");
    Ok(())
}

/// `events [--follow] [--all]`.
pub fn events(follow: bool, all: bool, vm: Option<&str>) -> Result<()> {
    let dir = registry::run_dir();
    let show = |line: &str| {
        if let Some(vm) = vm {
            match serde_json::from_str::<vmreplica_ops::events::Event>(line) {
                Ok(e) if e.vm.as_deref() == Some(vm) => {}
                _ => return,
            }
        }
        println!("{line}");
    };
    if !follow || all {
        for e in vmreplica_ops::events::read_all(&dir) {
            show(&serde_json::to_string(&e)?);
        }
    }
    if !follow {
        return Ok(());
    }
    let mut f = vmreplica_ops::events::Follower::new(&dir, false);
    loop {
        for l in f.poll() {
            show(&l);
        }
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_millis(200));
    }
}
