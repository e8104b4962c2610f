//! `vmreplica`: one command line for every role.

mod progress;
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
    /// Talk to a running tracker's control socket.
    Ctl {
        /// The tracker's control socket (default: STATE_DIR/control.sock).
        #[arg(long)]
        socket: PathBuf,
        #[command(subcommand)]
        op: CtlOp,
    },
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
    /// Recovery points kept per VM.
    #[arg(long, default_value_t = 24)]
    keep: usize,
    /// Thin points older than this to one per hour (e.g. 24h).
    #[arg(long)]
    hourly_after: Option<humantime::Duration>,
}

#[derive(Subcommand)]
enum ApplierOp {
    /// List a VM's recovery points.
    Points {
        vm: String,
        #[arg(long)]
        store: PathBuf,
    },
    /// Write the disk images of a recovery point into a directory.
    Export {
        vm: String,
        #[arg(long)]
        store: PathBuf,
        /// The point's cycle number (see `points`).
        #[arg(long)]
        point: u64,
        #[arg(long)]
        out: PathBuf,
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
    /// Forget a frozen generation (it reached the replica).
    Release { generation: u64 },
    /// Put a frozen generation's blocks back into the dirty set.
    Merge { generation: u64 },
}

fn run_ctl(socket: &Path, op: CtlOp) -> Result<()> {
    let req = match op {
        CtlOp::Status => Request::Status,
        CtlOp::Freeze { full } => Request::Freeze { full },
        CtlOp::Release { generation } => Request::Release { generation },
        CtlOp::Merge { generation } => Request::Merge { generation },
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
    let cfg = vmreplica_shipper::ShipperConfig::load(config)?;
    runtime()?.block_on(vmreplica_shipper::run::run(
        cfg,
        progress::sink(bar),
        stop_signal(),
    ))?;
    Ok(())
}

fn run_applier(a: ApplierArgs) -> Result<()> {
    use vmreplica_applier::server::{Applier, ApplierConfig};
    use vmreplica_applier::store::{Retention, Store};
    match (a.op, a.serve) {
        (Some(ApplierOp::Points { vm, store }), _) => {
            let s = Store::new(&store, Retention::default())?;
            let points = s.points(&vm)?;
            println!(
                "{:>8}  {:<25}  {:<8}  {:>12}",
                "cycle", "applied (UTC)", "kind", "size"
            );
            for p in points {
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(p.applied_at);
                println!(
                    "{:>8}  {:<25}  {:<8}  {:>12}",
                    p.cycle,
                    humantime::format_rfc3339_seconds(t).to_string(),
                    p.kind,
                    p.bytes
                );
            }
            Ok(())
        }
        (
            Some(ApplierOp::Export {
                vm,
                store,
                point,
                out,
            }),
            _,
        ) => {
            let s = Store::new(&store, Retention::default())?;
            let v = s.open_existing(&vm)?;
            for p in v.export_point(point, &out)? {
                println!("{}", p.display());
            }
            Ok(())
        }
        (None, Some(sv)) => {
            let id = vmreplica_common::tls::Identity::load(&sv.cert, &sv.key, &sv.ca)?;
            let listen: std::net::SocketAddr = sv
                .listen
                .parse()
                .with_context(|| format!("--listen {}", sv.listen))?;
            let cfg = ApplierConfig {
                store: sv.store,
                listen,
                identity: id,
                allow: vmreplica_common::tls::AllowList::new(&sv.allow),
                retention: Retention {
                    keep: sv.keep.max(1),
                    hourly_after: sv.hourly_after.map(|d| d.as_secs()),
                },
                tuning: Default::default(),
            };
            runtime()?.block_on(async move {
                let a = Applier::start(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
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

fn main() -> Result<()> {
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
    match cli.cmd {
        Cmd::Tracker(a) => tracker_cmd::run(a),
        Cmd::Ctl { socket, op } => run_ctl(&socket, op),
        Cmd::Shipper { config } => run_shipper(&config, bar),
        Cmd::Applier(a) => run_applier(a),
        Cmd::Verify { vm, config } => run_verify(vm.as_deref(), &config),
        Cmd::Certs { op } => run_certs(op),
        Cmd::Vm { op } => vm_cmd::run(op),
    }
}
