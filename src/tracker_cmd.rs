//! `vmreplica tracker`: serve a VM's disks over NBD (unix socket, TCP with TLS) and track
//! every changed block.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use vmreplica_common::tls::{AllowList, Identity};
use vmreplica_common::unixsock::{self, SocketPerms};
use vmreplica_nbd::{Server, ServerConfig, TlsConfig};
use vmreplica_tracker::control;
use vmreplica_tracker::{CowLimit, Tracker, TrackerConfig};

#[derive(clap::Args)]
pub struct TrackerArgs {
    /// Directory for bitmaps, logs and state (created if missing).
    #[arg(long)]
    state_dir: PathBuf,
    /// A disk to serve, as NAME=PATH (the NBD export name and its raw image). Repeatable.
    #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
    disks: Vec<String>,
    /// Serve this disk read-only (writes refused with EPERM). Repeatable.
    #[arg(long = "read-only", value_name = "NAME")]
    read_only: Vec<String>,
    /// Serve this disk but neither track nor ship it (swap, scratch); failover recreates it
    /// blank and sparse. Repeatable.
    #[arg(long = "exclude", value_name = "NAME")]
    exclude: Vec<String>,
    /// Unix socket to serve NBD on (default: STATE_DIR/nbd.sock unless --listen is given).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Owner of the NBD unix socket (user name or id; default: this process's user).
    #[arg(long)]
    socket_owner: Option<String>,
    /// Group of the NBD unix socket (group name or id).
    #[arg(long)]
    socket_group: Option<String>,
    /// Permissions of the NBD unix socket (connecting needs write permission), e.g. 0660.
    /// Default: what the process's umask leaves of 0666.
    #[arg(long, value_parser = unixsock::parse_mode)]
    socket_mode: Option<u32>,
    /// TCP address to serve NBD on, e.g. 192.0.2.1:10809. Needs TLS (--tls-*) or
    /// --insecure-plaintext.
    #[arg(long)]
    listen: Option<String>,
    /// The tracker's certificate for NBD over TLS (from `vmreplica certs issue`).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The CA that issued the clients' certificates.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Clients admitted over TLS: certificate names, exact or *.suffix. Repeatable.
    #[arg(long = "tls-allow", value_name = "NAME")]
    tls_allow: Vec<String>,
    /// Serve NBD over TCP without TLS: anyone who reaches the port reads and writes the
    /// disks. Only for a trusted, isolated network.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_plaintext: bool,
    /// Most connections one disk serves at once.
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
    /// Tracking granularity: a power of two from 4K to 1M.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    granularity: u64,
    /// Control socket (default: STATE_DIR/control.sock; owner only).
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

/// The TLS settings asked for, checked before anything is started.
fn tls(a: &TrackerArgs) -> Result<Option<Arc<TlsConfig>>> {
    let (Some(cert), Some(key), Some(ca)) = (&a.tls_cert, &a.tls_key, &a.tls_ca) else {
        if !a.tls_allow.is_empty() {
            bail!("--tls-allow needs --tls-cert, --tls-key and --tls-ca");
        }
        if a.listen.is_some() && !a.insecure_plaintext {
            bail!(
                "--listen serves the disks over the network: give --tls-cert, --tls-key, \
                 --tls-ca and --tls-allow (certificates from `vmreplica certs`), or \
                 --insecure-plaintext for a trusted, isolated network"
            );
        }
        return Ok(None);
    };
    if a.listen.is_none() {
        bail!("--tls-cert is for --listen (the unix socket is local and plaintext)");
    }
    if a.tls_allow.is_empty() {
        bail!("--tls-cert needs --tls-allow: the client certificate names to admit");
    }
    let id = Identity::load(cert, key, ca)?;
    Ok(Some(Arc::new(TlsConfig::new(
        &id,
        AllowList::new(&a.tls_allow),
    )?)))
}

fn socket_perms(a: &TrackerArgs) -> Result<SocketPerms> {
    Ok(SocketPerms {
        mode: a.socket_mode.unwrap_or_else(|| 0o666 & !unixsock::umask()),
        owner: a
            .socket_owner
            .as_deref()
            .map(unixsock::user_id)
            .transpose()
            .context("--socket-owner")?,
        group: a
            .socket_group
            .as_deref()
            .map(unixsock::group_id)
            .transpose()
            .context("--socket-group")?,
    })
}

/// Keeps request buffers of up to 4 MiB on the heap (glibc malloc only).
///
/// By default glibc serves an allocation of 128 KiB or more with its own mmap and gives it back
/// with munmap when freed (the threshold adapts upwards only after such a block is freed, and
/// a heap's top is trimmed back to the kernel past twice that threshold). A 1 MiB NBD request
/// then costs an mmap, a munmap and a fresh page fault for every page it touches, every time.
/// With a fixed mmap threshold of 4 MiB (above the 1 MiB requests guests and fio usually send;
/// the rarer larger ones, up to NBD's 32 MiB, still get their own mapping) and a trim threshold
/// of 64 MiB, freed buffers stay in the heap and the next request reuses their pages. What this holds back is bounded by the requests in
/// flight (the per-connection budget), not by the workload.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_request_buffers_on_heap() {
    const MMAP_THRESHOLD: libc::c_int = 4 << 20;
    const TRIM_THRESHOLD: libc::c_int = 64 << 20;
    // SAFETY: mallopt takes two integers and no pointers; it only changes glibc malloc's
    // tuning parameters, under malloc's own lock, so it is sound on any thread at any time;
    // both values are within the ranges glibc accepts (the mmap threshold at most 32 MiB on
    // 64-bit), and a refusal is reported by its return value (0), not by undefined behaviour.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    };
    if !ok {
        tracing::warn!("mallopt refused the malloc thresholds; large requests are served with mmap and munmap each time");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_request_buffers_on_heap() {}

pub fn run(a: TrackerArgs) -> Result<()> {
    keep_request_buffers_on_heap();
    // Before anything is served: a SIGTERM that comes as soon as the sockets answer is an
    // orderly stop, not the default action's sudden death.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let mut disks = Vec::new();
    for d in &a.disks {
        let Some((name, path)) = d.split_once('=') else {
            bail!("--disk {d:?}: expected NAME=PATH");
        };
        disks.push((name.to_string(), PathBuf::from(path)));
    }
    for ro in &a.read_only {
        if !disks.iter().any(|(n, _)| n == ro) {
            bail!("--read-only {ro}: no --disk of that name");
        }
    }
    let tls = tls(&a)?;
    let perms = socket_perms(&a)?;
    let granularity = u32::try_from(a.granularity).unwrap_or(u32::MAX);
    let mut cfg = TrackerConfig::new(a.state_dir.clone(), disks);
    cfg.granularity = granularity;
    cfg.tracking = !a.no_tracking;
    cfg.force_thread_pool = a.io_engine == "thread-pool";
    cfg.al_extents = a.al_extents;
    cfg.cow_limit = a.cow_limit;
    cfg.excluded = a.exclude.clone();
    let tracker = Arc::new(Tracker::open(cfg).context("cannot start the tracker")?);
    if a.io_engine == "io_uring" && tracker.engine_name() != "io_uring" {
        bail!("--io-engine io_uring was asked for, but io_uring is not available here");
    }
    let mut exports = tracker.nbd_exports();
    for e in &mut exports {
        e.read_only = a.read_only.contains(&e.name);
    }
    let server = Server::new(
        ServerConfig {
            max_connections: a.max_connections.max(1),
            ..ServerConfig::default()
        },
        exports,
    );
    {
        let server = Arc::downgrade(&server);
        tracker.set_connections(Box::new(move |name| {
            server.upgrade().map_or(0, |s| s.connections(name))
        }));
    }
    let socket = match (&a.socket, &a.listen) {
        (Some(s), _) => Some(s.clone()),
        (None, None) => Some(a.state_dir.join("nbd.sock")),
        (None, Some(_)) => None,
    };
    if let Some(path) = &socket {
        server.listen_unix(unixsock::bind(path, &perms)?)?;
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
        let scheme = if tls.is_some() { "nbds" } else { "nbd" };
        if tls.is_none() {
            tracing::warn!("serving NBD over TCP on {local} WITHOUT TLS (--insecure-plaintext): anyone who reaches it reads and writes the disks");
        }
        server.listen_tcp(l, tls)?;
        for d in tracker.disks() {
            tracing::info!("serving {} at {scheme}://{local}/{}", d.name, d.name);
        }
    }
    let control_path = a
        .control
        .unwrap_or_else(|| a.state_dir.join("control.sock"));
    let control_listener = unixsock::bind(&control_path, &SocketPerms::owner_only())?;
    {
        let t = Arc::clone(&tracker);
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || control::serve(t, control_listener))?;
    }
    tracing::info!(control = %control_path.display(), engine = tracker.engine_name(), "tracker ready");
    let mut entry = vmreplica_ops::registry::Entry::me(vmreplica_ops::registry::TRACKER);
    entry.control = Some(std::path::absolute(&control_path).unwrap_or(control_path.clone()));
    entry.state = Some(std::path::absolute(&a.state_dir).unwrap_or(a.state_dir.clone()));
    let _registration = vmreplica_ops::registry::register(entry);

    let sig = signals.forever().next();
    tracing::info!(?sig, "stopping: finishing requests in flight");
    server.shutdown();
    tracker.close().context("flushing tracker state")?;
    for p in socket.iter().chain(std::iter::once(&control_path)) {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
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
