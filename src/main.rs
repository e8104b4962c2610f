//! `vmreplica`: one command line for every role.

#[macro_use]
mod stdout;
mod failover_cmd;
mod ops_cmd;
mod plan;
mod plan_cmd;
mod progress;
mod seed_cmd;
mod site;
mod testfo_cmd;
mod tracker_cmd;
mod vm_cmd;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmreplica_tracker::control::{self, Request};

#[derive(Parser)]
#[command(
    name = "vmreplica",
    version,
    about = "Asynchronous disaster-recovery replication of QEMU/KVM disks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a VM's disks over NBD and track every changed block.
    Tracker(tracker_cmd::TrackerArgs),
    /// Ship a VM's frozen generations to the replica site (primary host).
    Shipper {
        /// TOML configuration (see README).
        #[arg(long)]
        config: PathBuf,
    },
    /// Receive and apply cycles, keep replicas and recovery points (replica host).
    Applier(ApplierArgs),
    /// Compare primary and replica block checksums; print differing ranges.
    Verify {
        /// The VM to check; if given, it must be the one the configuration protects.
        vm: Option<String>,
        /// The shipper's configuration (names the VM, tracker and applier).
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a CA and node certificates for the link between sites.
    Certs {
        #[command(subcommand)]
        op: CertsOp,
    },
    /// VM definitions: check one by rendering it.
    Vm {
        #[command(subcommand)]
        op: vm_cmd::VmOp,
    },
    /// Bring a VM up on this site: test (replication goes on), unplanned (primary gone),
    /// commit, cancel, abandon, planned (no write lost).
    Failover {
        #[command(subcommand)]
        op: FailoverOp,
    },
    /// After an unplanned failover, replicate back to this (old primary) site.
    Reverse(failover_cmd::ReverseArgs),
    /// Recovery plans: many VMs failed over in order, with hooks and pauses.
    Plan {
        #[command(subcommand)]
        op: plan_cmd::PlanOp,
    },
    /// Every VM this host protects or holds: state, health, RPO, cycles, bytes, errors.
    Status(ops_cmd::StatusArgs),
    /// The event stream (JSON lines): cycles applied, health changes, resyncs, failover...
    Events {
        /// Keep printing events as they come.
        #[arg(long)]
        follow: bool,
        /// With --follow: the events so far first.
        #[arg(long)]
        all: bool,
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Pause a VM's replication (its tracker keeps tracking; survives a shipper restart).
    Pause { vm: String },
    /// Resume a VM's replication: one cycle ships everything that changed meanwhile.
    Resume { vm: String },
    /// Resynchronise a VM by comparing checksums (only differing blocks are sent).
    Resync {
        vm: String,
        /// Show its progress until it is applied.
        #[arg(long)]
        wait: bool,
    },
    /// Change a VM's interval, bandwidth_limit, compression, rpo_limit or
    /// app_consistent_every, in its configuration and in the running shipper.
    Set {
        vm: String,
        /// key=value, e.g. interval=30s bandwidth_limit=20M compression=false.
        #[arg(required = true)]
        settings: Vec<String>,
        /// The shipper's configuration (default: the one the running shipper read).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stop replicating a VM and remove its state on the chosen side(s), after a
    /// confirmation.
    Remove(ops_cmd::RemoveArgs),
    /// Initial replication by external media (export, import), or from a copy already on
    /// the replica site (adopt).
    Seed {
        #[command(subcommand)]
        op: seed_cmd::SeedOp,
    },
    /// Talk to a running tracker's control socket.
    Ctl {
        /// The tracker's control socket (default: STATE_DIR/control.sock).
        #[arg(long)]
        socket: PathBuf,
        #[command(subcommand)]
        op: CtlOp,
    },
}

/// Each failover kind's subcommands come from its own file.
#[derive(Subcommand)]
enum FailoverOp {
    #[command(flatten)]
    Test(testfo_cmd::TestOp),
    #[command(flatten)]
    Other(failover_cmd::FailoverOp),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ApplierArgs {
    #[command(subcommand)]
    op: Option<ApplierOp>,
    #[command(flatten)]
    serve: Option<ApplierServe>,
}

#[derive(clap::Args)]
struct ApplierServe {
    /// Directory holding the replicas.
    #[arg(long)]
    store: PathBuf,
    /// UDP address to listen on, e.g. 0.0.0.0:7443.
    #[arg(long)]
    listen: String,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// CA certificate that signed the primaries' certificates.
    #[arg(long)]
    ca: PathBuf,
    /// Primaries admitted: exact certificate names or *.suffix patterns. Repeatable.
    #[arg(long = "allow", required = true)]
    allow: Vec<String>,
    /// Keep every recovery point younger than this.
    #[arg(long, default_value = "1h")]
    keep_all_for: humantime::Duration,
    /// Then keep the newest point of each hour, for points younger than this.
    #[arg(long, default_value = "24h")]
    hourly_for: humantime::Duration,
    /// Then keep the newest point of each day, for points younger than this (older ones go).
    #[arg(long, default_value = "7d")]
    daily_for: humantime::Duration,
    /// At most this many points per VM (the oldest go first; the newest always stays).
    #[arg(long)]
    keep: Option<usize>,
    /// Deprecated: the old name of --keep-all-for.
    #[arg(long, hide = true)]
    hourly_after: Option<humantime::Duration>,
    /// The local admin socket (default: STORE/applier.sock).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at this address (GET /metrics), e.g. 127.0.0.1:9465.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum ApplierOp {
    /// What the applier knows of each replica (JSON): lineage and history, last cycle, the
    /// cycle held in part, points.
    Status {
        #[arg(long)]
        store: PathBuf,
        /// The applier's admin socket (default: STORE/applier.sock).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// List a VM's recovery points (through the running applier, or from the store).
    Points {
        vm: String,
        #[arg(long)]
        store: PathBuf,
        /// The applier's admin socket (default: STORE/applier.sock).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Write the disk images of a recovery point into a directory (through the running
    /// applier, which goes on applying cycles meanwhile, or from the store).
    Export {
        vm: String,
        #[arg(long)]
        store: PathBuf,
        /// The point's cycle number (see `points`).
        #[arg(long)]
        point: u64,
        /// A directory outside the store; images there are never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// The applier's admin socket (default: STORE/applier.sock).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsOp {
    /// Create a CA in DIR (ca.pem, and ca.key readable by the owner only).
    InitCa {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "vmreplica CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a node certificate NAME.pem/NAME.key signed by the CA in --ca.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        /// IP addresses to include. Repeatable.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 825)]
        days: i64,
        /// Output directory (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue a certificate into a directory laid out for QEMU (`--object
    /// tls-creds-x509,dir=DIR,endpoint=client`) and libnbd (`nbds://...?tls-certificates=DIR`):
    /// ca-cert.pem and client-cert.pem/client-key.pem (server-* with --server).
    X509Dir {
        #[arg(long)]
        ca: PathBuf,
        /// The certificate's name (what the tracker's --tls-allow admits).
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// A server's credentials instead of a client's.
        #[arg(long)]
        server: bool,
        /// IP addresses to include (servers). Repeatable.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum CtlOp {
    /// Disks, dirty block counts, frozen generation.
    Status,
    /// Freeze all disks at one instant; prints the generation.
    Freeze {
        /// Freeze every block, not just the changed ones (initial sync, resync).
        #[arg(long)]
        full: bool,
    },
    /// Forget a frozen generation without the replica's proof that it holds it (the shipper
    /// releases with that proof by itself): needs --force, as its changes are lost if the
    /// replica does not hold them (use merge instead).
    Release {
        generation: u64,
        #[arg(long)]
        force: bool,
    },
    /// Set the tracker's lineage (a replica's, to resync against it) and raise its next
    /// generation; refused if another lineage is set, unless --force.
    SetLineage {
        lineage: String,
        #[arg(long, default_value_t = 1)]
        next_generation: u64,
        #[arg(long)]
        force: bool,
    },
    /// Put a frozen generation's blocks back into the dirty set.
    Merge { generation: u64 },
    /// Refuse every write (EPERM) from now on, reads still served: a planned failover seals
    /// the disks once the VM is shut down. Kept across restarts.
    Seal,
    /// Take writes again after a seal.
    Unseal,
    /// Mark byte ranges of a disk dirty (the next cycle ships them): OFFSET+LEN ...
    MarkDirty {
        disk: String,
        #[arg(value_name = "OFFSET+LEN", required = true)]
        ranges: Vec<String>,
    },
    /// Per disk, the byte ranges changed and not yet replicated.
    DirtyRanges,
}

/// Parses `OFFSET+LEN` (bytes).
fn parse_range(s: &str) -> Result<(u64, u64)> {
    let (o, l) = s
        .split_once('+')
        .with_context(|| format!("{s:?}: expected OFFSET+LEN, in bytes"))?;
    Ok((
        o.trim().parse().with_context(|| format!("{s:?}: offset"))?,
        l.trim().parse().with_context(|| format!("{s:?}: length"))?,
    ))
}

fn run_ctl(socket: &Path, op: CtlOp) -> Result<()> {
    let req = match op {
        CtlOp::Status => Request::Status,
        CtlOp::Freeze { full } => Request::Freeze {
            full,
            baseline: false,
        },
        CtlOp::Release { generation, force } => {
            if !force {
                bail!(
                    "releasing generation {generation} by hand loses its changes unless the \
                     replica holds them: the shipper releases generations with the replica's \
                     proof by itself. Use `merge {generation}` to keep the changes, or \
                     `release {generation} --force` if you know the replica holds them"
                );
            }
            Request::Release {
                generation,
                applied: None,
                force,
            }
        }
        CtlOp::SetLineage {
            lineage,
            next_generation,
            force,
        } => Request::SetLineage {
            lineage: vmreplica_common::lineage::Lineage::parse(&lineage)?,
            next_generation,
            force,
            parent: None,
        },
        CtlOp::Merge { generation } => Request::Merge { generation },
        CtlOp::Seal => Request::Seal,
        CtlOp::Unseal => Request::Unseal,
        CtlOp::MarkDirty { disk, ranges } => Request::MarkDirty {
            disk,
            ranges: ranges
                .iter()
                .map(|r| parse_range(r))
                .collect::<Result<_>>()?,
        },
        CtlOp::DirtyRanges => Request::DirtyRanges,
    };
    let v = control::call(socket, &req)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn run_shipper(config: &Path, bar: progress::Bar) -> Result<()> {
    vmreplica_ops::events::set_source("shipper");
    let cfg = vmreplica_shipper::ShipperConfig::load(config)?;
    runtime()?.block_on(async move {
        // SIGHUP: read the configuration again.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        vmreplica_shipper::run::run_with(cfg, progress::sink(bar), stop_signal(), Some(rx), None)
            .await?;
        Ok::<(), anyhow::Error>(())
    })
}

/// Bytes as people read them: 0 B, 64.0 KiB, 1.5 GiB.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_points(points: &[vmreplica_applier::PointInfo]) {
    println!(
        "{:>8}  {:<25}  {:<8}  {:>12}  consistency",
        "cycle", "applied (UTC)", "kind", "size"
    );
    for p in points {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(p.applied_at);
        println!(
            "{:>8}  {:<25}  {:<8}  {:>12}  {}",
            p.cycle,
            humantime::format_rfc3339_seconds(t).to_string(),
            p.kind,
            human_bytes(p.bytes),
            if p.app_consistent {
                "application"
            } else {
                "crash"
            }
        );
    }
}

fn run_applier(a: ApplierArgs) -> Result<()> {
    use vmreplica_applier::admin::{self, Request as Admin};
    use vmreplica_applier::server::{Applier, ApplierConfig};
    use vmreplica_applier::store::{check_export_dir, export, Retention, Store};
    let socket = |store: &Path, given: &Option<PathBuf>| {
        given.clone().unwrap_or_else(|| store.join("applier.sock"))
    };
    match (a.op, a.serve) {
        (
            Some(ApplierOp::Status {
                store,
                admin_socket,
            }),
            _,
        ) => {
            let v = match admin::call(&socket(&store, &admin_socket), &Admin::Status)? {
                Some(v) => v,
                None => Store::new(&store, Retention::default())?.status(),
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        (
            Some(ApplierOp::Points {
                vm,
                store,
                admin_socket,
            }),
            _,
        ) => {
            let req = Admin::Points { vm: vm.clone() };
            let points = match admin::call(&socket(&store, &admin_socket), &req)? {
                Some(v) => serde_json::from_value(v)?,
                None => Store::new(&store, Retention::default())?.points(&vm)?,
            };
            print_points(&points);
            Ok(())
        }
        (
            Some(ApplierOp::Export {
                vm,
                store,
                point,
                out,
                admin_socket,
            }),
            _,
        ) => {
            let out = std::path::absolute(&out).with_context(|| format!("{}", out.display()))?;
            let req = Admin::Export {
                vm: vm.clone(),
                point,
                dir: out.clone(),
            };
            let files: Vec<PathBuf> = match admin::call(&socket(&store, &admin_socket), &req)? {
                Some(v) => serde_json::from_value(v["files"].clone())?,
                None => {
                    // No applier runs: open the replica here (under its lock).
                    let s = Store::new(&store, Retention::default())?;
                    let v = s.open_existing(&vm)?;
                    check_export_dir(s.root(), &out, &v.disk_names())?;
                    let view = vmreplica_applier::PointView::open(v.shared(), point)?;
                    export(&view, &out)?
                }
            };
            for p in files {
                println!("{}", p.display());
            }
            Ok(())
        }
        (None, Some(sv)) => {
            if sv.keep == Some(0) {
                bail!("--keep 0 would keep no recovery point: give at least 1 (the newest point is always kept)");
            }
            let id = vmreplica_common::tls::Identity::load(&sv.cert, &sv.key, &sv.ca)?;
            let listen: std::net::SocketAddr = sv
                .listen
                .parse()
                .with_context(|| format!("--listen {}", sv.listen))?;
            let mut all_for = sv.keep_all_for;
            if let Some(d) = sv.hourly_after {
                tracing::warn!("--hourly-after is deprecated: it is --keep-all-for now");
                all_for = d;
            }
            let cfg = ApplierConfig {
                store: sv.store,
                listen,
                identity: id,
                allow: vmreplica_common::tls::AllowList::new(&sv.allow),
                retention: Retention {
                    all_for: all_for.as_secs(),
                    hourly_for: sv.hourly_for.as_secs(),
                    daily_for: sv.daily_for.as_secs(),
                    keep: sv.keep,
                },
                tuning: Default::default(),
                admin_socket: sv.admin_socket,
                open_delay: None,
                identity_files: Some(vmreplica_applier::failover::IdentityFiles {
                    cert: std::path::absolute(&sv.cert)?,
                    key: std::path::absolute(&sv.key)?,
                    ca: std::path::absolute(&sv.ca)?,
                }),
            };
            vmreplica_ops::events::set_source("applier");
            let metrics = sv.metrics;
            runtime()?.block_on(async move {
                let mut a = Applier::start(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Some(m) = metrics {
                    a.serve_metrics(m).await?;
                }
                tracing::info!(addr = %a.local_addr()?, "applier listening");
                stop_signal().await;
                tracing::info!("applier stopping");
                a.shutdown().await;
                Ok(())
            })
        }
        (None, None) => {
            bail!("give --store/--listen/... to serve, or a subcommand (points, export)")
        }
    }
}

fn run_verify(vm: Option<&str>, config: &Path) -> Result<()> {
    let cfg = vmreplica_shipper::ShipperConfig::load(config)?;
    if let Some(vm) = vm.filter(|vm| *vm != cfg.vm) {
        bail!(
            "{} protects VM {}, not {vm}: give the configuration of {vm}'s shipper",
            config.display(),
            cfg.vm
        );
    }
    let diffs = runtime()?.block_on(vmreplica_shipper::run::verify(&cfg))?;
    let mut equal = true;
    for (disk, ranges) in diffs {
        if ranges.is_empty() {
            println!("{disk}: replica equal to primary");
        } else {
            equal = false;
            let bytes: u64 = ranges.iter().map(|r| r.1).sum();
            println!("{disk}: {} differing ranges, {bytes} bytes", ranges.len());
            for (o, l) in ranges.iter().take(50) {
                println!("  {o}+{l}");
            }
        }
    }
    if !equal {
        bail!("replica differs from primary for VM {}", cfg.vm);
    }
    Ok(())
}

fn run_certs(op: CertsOp) -> Result<()> {
    use vmreplica_common::tls;
    match op {
        CertsOp::InitCa { dir, name, days } => {
            let p = tls::init_ca(&dir, &name, days)?;
            println!("{}", p.display());
        }
        CertsOp::Issue {
            ca,
            name,
            ip,
            days,
            out,
        } => {
            vmreplica_common::validate_name(&name)?;
            let out = out.unwrap_or_else(|| ca.clone());
            let (c, k) = tls::issue(&ca, &name, &ip, tls::Validity::days(days), &out)?;
            println!("{}\n{}", c.display(), k.display());
        }
        CertsOp::X509Dir {
            ca,
            name,
            out,
            server,
            ip,
            days,
        } => {
            vmreplica_common::validate_name(&name)?;
            let role = if server {
                tls::X509Role::Server
            } else {
                tls::X509Role::Client
            };
            let dir = tls::issue_x509_dir(&ca, &name, &ip, tls::Validity::days(days), &out, role)?;
            println!("{}", dir.display());
        }
    }
    Ok(())
}

/// Errors are said as their message and its causes on one line (`error: what: why`), never
/// with a backtrace, also when `RUST_BACKTRACE` is set: an error here is for a user to act
/// on (backtraces stay for panics).
fn main() -> std::process::ExitCode {
    let bar = progress::Bar::default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMREPLICA_LOG")
                // rustls warns at every TLS client that connects by IP address (an SNI it
                // ignores): noise for NBD clients, which QEMU and libnbd are.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,rustls::msgs::handshake=error")
                }),
        )
        .with_writer(bar.clone())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli, bar) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes, joined with ": ", leaving out a cause the text before already
/// says (our errors often name their source in their own message as well).
fn message_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Runs the command line's command.
fn run(cli: Cli, bar: progress::Bar) -> Result<()> {
    match cli.cmd {
        Cmd::Tracker(a) => tracker_cmd::run(a),
        Cmd::Ctl { socket, op } => run_ctl(&socket, op),
        Cmd::Shipper { config } => run_shipper(&config, bar),
        Cmd::Applier(a) => run_applier(a),
        Cmd::Verify { vm, config } => run_verify(vm.as_deref(), &config),
        Cmd::Certs { op } => run_certs(op),
        Cmd::Vm { op } => vm_cmd::run(op),
        Cmd::Failover {
            op: FailoverOp::Test(op),
        } => testfo_cmd::run(op),
        Cmd::Failover {
            op: FailoverOp::Other(op),
        } => failover_cmd::run(op),
        Cmd::Reverse(a) => failover_cmd::reverse(a),
        Cmd::Plan { op } => plan_cmd::run(op),
        Cmd::Status(a) => ops_cmd::status(a),
        Cmd::Events { follow, all, vm } => ops_cmd::events(follow, all, vm.as_deref()),
        Cmd::Pause { vm } => ops_cmd::pause(&vm, false),
        Cmd::Resume { vm } => ops_cmd::pause(&vm, true),
        Cmd::Resync { vm, wait } => ops_cmd::resync(&vm, wait),
        Cmd::Set {
            vm,
            settings,
            config,
        } => ops_cmd::set(&vm, &settings, config.as_deref()),
        Cmd::Remove(a) => ops_cmd::remove(a),
        Cmd::Seed { op } => seed_cmd::run(op),
    }
}

#[cfg(test)]
mod tests {
    /// Each cause once: one that its outer message already quotes is not said again.
    #[test]
    fn an_error_is_said_with_each_cause_once() {
        /// Like our thiserror errors: says its source, and gives it as its source.
        #[derive(Debug)]
        struct Quoting(std::io::Error);
        impl std::fmt::Display for Quoting {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "image a.img: {}", self.0)
            }
        }
        impl std::error::Error for Quoting {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let quoted = anyhow::Error::new(Quoting(io())).context("cannot start the tracker");
        assert_eq!(
            super::message_chain(&quoted),
            "cannot start the tracker: image a.img: No such file or directory (os error 2)"
        );
        let chained = anyhow::Error::new(io()).context("reading a.img");
        assert_eq!(
            super::message_chain(&chained),
            "reading a.img: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn byte_counts_read_with_units() {
        assert_eq!(super::human_bytes(0), "0 B");
        assert_eq!(super::human_bytes(1023), "1023 B");
        assert_eq!(super::human_bytes(65536), "64.0 KiB");
        assert_eq!(super::human_bytes(3 << 29), "1.5 GiB");
    }
}
