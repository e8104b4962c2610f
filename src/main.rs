//! `vmreplica`: one command line for every role.

mod progress;
mod vm_cmd;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmreplica_nbd::{Server, ServerConfig};
use vmreplica_tracker::control::{self, Request};
use vmreplica_tracker::{CowLimit, Tracker, TrackerConfig};

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
    Tracker(TrackerArgs),
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
struct TrackerArgs {
    /// Directory for bitmaps, logs and state (created if missing).
    #[arg(long)]
    state_dir: PathBuf,
    /// A disk to serve, as NAME=PATH (the NBD export name and its raw image). Repeatable.
    #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
    disks: Vec<String>,
    /// Unix socket to serve NBD on (default: STATE_DIR/nbd.sock unless --listen is given).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// TCP address to serve NBD on, e.g. 127.0.0.1:10809.
    #[arg(long)]
    listen: Option<String>,
    /// Tracking granularity: a power of two from 4K to 1M.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    granularity: u64,
    /// Control socket (default: STATE_DIR/control.sock).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve without dirty tracking (for benchmarks: shows what tracking costs).
    #[arg(long)]
    no_tracking: bool,
    /// Activity-log capacity in 4 MiB extents (smaller: more frequent bitmap checkpoints).
    #[arg(long, default_value_t = vmreplica_tracker::activity_log::CAPACITY, hide = true)]
    al_extents: usize,
    /// Image I/O engine.
    #[arg(long, default_value = "auto", value_parser = ["auto", "io_uring", "thread-pool"])]
    io_engine: String,
    /// Most the copy-on-write stores may hold for one frozen generation (all disks): a size
    /// (64G) or a share of the state dir's free space at the freeze (50%). Past it the
    /// generation is abandoned and the disks resynchronised by checksums.
    #[arg(long, default_value = "50%", value_parser = CowLimit::parse)]
    cow_limit: CowLimit,
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

/// Parses sizes like 4096, 64K, 1M.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (examples: 4096, 64K, 1M)"))
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        // A stale socket from an earlier run: only remove it if nobody answers on it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another server", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

fn run_tracker(a: TrackerArgs) -> Result<()> {
    let mut disks = Vec::new();
    for d in &a.disks {
        let Some((name, path)) = d.split_once('=') else {
            bail!("--disk {d:?}: expected NAME=PATH");
        };
        disks.push((name.to_string(), PathBuf::from(path)));
    }
    let granularity = u32::try_from(a.granularity).unwrap_or(u32::MAX);
    let tracker = Arc::new(
        Tracker::open(TrackerConfig {
            state_dir: a.state_dir.clone(),
            disks,
            granularity,
            tracking: !a.no_tracking,
            force_thread_pool: a.io_engine == "thread-pool",
            al_extents: a.al_extents,
            cow_limit: a.cow_limit,
            engine: None,
        })
        .context("cannot start the tracker")?,
    );
    if a.io_engine == "io_uring" && tracker.engine_name() != "io_uring" {
        bail!("--io-engine io_uring was asked for, but io_uring is not available here");
    }
    let server = Server::new(ServerConfig::default(), tracker.nbd_exports());
    let socket = match (&a.socket, &a.listen) {
        (Some(s), _) => Some(s.clone()),
        (None, None) => Some(a.state_dir.join("nbd.sock")),
        (None, Some(_)) => None,
    };
    if let Some(path) = &socket {
        server.listen_unix(bind_unix(path)?);
        for d in tracker.disks() {
            tracing::info!(
                "serving {} ({} bytes) at nbd+unix:///{}?socket={}",
                d.name,
                d.size,
                d.name,
                path.display()
            );
        }
    }
    if let Some(addr) = &a.listen {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let local = l.local_addr()?;
        server.listen_tcp(l);
        for d in tracker.disks() {
            tracing::info!("serving {} at nbd://{local}/{}", d.name, d.name);
        }
    }
    let control_path = a
        .control
        .unwrap_or_else(|| a.state_dir.join("control.sock"));
    let control_listener = bind_unix(&control_path)?;
    {
        let t = Arc::clone(&tracker);
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || control::serve(t, control_listener))?;
    }
    tracing::info!(control = %control_path.display(), engine = tracker.engine_name(), "tracker ready");

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let sig = signals.forever().next();
    tracing::info!(?sig, "stopping: finishing requests in flight");
    server.shutdown();
    tracker.close().context("flushing tracker state")?;
    for p in socket.iter().chain(std::iter::once(&control_path)) {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
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
    }
    Ok(())
}

fn main() -> Result<()> {
    let bar = progress::Bar::default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMREPLICA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(bar.clone())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Tracker(a) => run_tracker(a),
        Cmd::Ctl { socket, op } => run_ctl(&socket, op),
        Cmd::Shipper { config } => run_shipper(&config, bar),
        Cmd::Applier(a) => run_applier(a),
        Cmd::Verify { vm, config } => run_verify(vm.as_deref(), &config),
        Cmd::Certs { op } => run_certs(op),
        Cmd::Vm { op } => vm_cmd::run(op),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
