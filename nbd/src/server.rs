//! The NBD I/O driver: accepts connections, runs the handshake state machine over the socket
//! (with TLS on TCP listeners that have it), then hands the connection to the transmission
//! phase ([`crate::transmission`]).
//!
//! Limits: at most [`ServerConfig::max_connections`] connections per export in transmission
//! (a client asking for a full export gets `NBD_REP_ERR_POLICY`), and a bound on connections
//! still handshaking. Running out of descriptors or threads refuses the connection at hand,
//! logs once per interval and backs off: the accept loop never spins.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vmreplica_common::warn_limited;

use crate::device::BlockDevice;
use crate::handshake::{ExportInfo, Handshake, HandshakeStatus};
use crate::stream::Stream;
use crate::tls::TlsConfig;
use crate::transmission;

/// One export: a device under a name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Served read-only whatever the device allows (writes refused with EPERM).
    pub read_only: bool,
}

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// A client that has not finished its handshake in this time is disconnected.
    pub handshake_timeout: Duration,
    /// Most connections one export serves at once.
    pub max_connections: usize,
    /// Most connections still negotiating (before they name an export).
    pub max_handshakes: usize,
    /// On [`Server::shutdown`], how long connections may take to send the replies of their
    /// requests in flight; a client that does not read them by then is disconnected (its
    /// requests still complete on the device), so it cannot hold the shutdown up forever.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(30),
            max_connections: 16,
            max_handshakes: 64,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// An export and the connections it serves now.
struct Served {
    export: Export,
    active: AtomicUsize,
}

impl Served {
    fn info(&self, max: usize) -> ExportInfo {
        let d = &self.export.device;
        let mut flags = d.flags();
        flags.read_only |= self.export.read_only;
        let busy = self.active.load(Ordering::SeqCst) >= max;
        ExportInfo {
            name: self.export.name.clone(),
            description: self.export.description.clone(),
            size: d.size(),
            flags,
            contexts: d.contexts(),
            refusal: busy.then(|| {
                format!(
                    "export {} already serves {max} connections, its limit",
                    self.export.name
                )
            }),
        }
    }

    /// Counts one more connection if under `max`.
    fn acquire(&self, max: usize) -> bool {
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Releases an export's connection slot when the connection ends.
struct Slot(Arc<Served>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Server {
    config: ServerConfig,
    exports: RwLock<Vec<Arc<Served>>>,
    stop: AtomicBool,
    next_id: AtomicU64,
    handshaking: AtomicUsize,
    conns: Mutex<HashMap<u64, Stream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    listeners: Mutex<Vec<i32>>,
}

/// A descriptor kept in reserve: when accept fails for want of descriptors, giving it up lets
/// the pending connection be accepted and closed (refused) instead of waiting in the backlog
/// while accept fails again at once.
struct Reserve(Option<File>);

impl Reserve {
    fn new() -> Reserve {
        Reserve(File::open("/dev/null").ok())
    }

    /// Gives the descriptor up for a moment.
    fn release(&mut self) {
        drop(self.0.take());
    }

    /// Takes one again (if one is free by now).
    fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok();
        }
    }
}

fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl Server {
    pub fn new(config: ServerConfig, exports: Vec<Export>) -> Arc<Server> {
        Arc::new(Server {
            config,
            exports: RwLock::new(
                exports
                    .into_iter()
                    .map(|export| {
                        Arc::new(Served {
                            export,
                            active: AtomicUsize::new(0),
                        })
                    })
                    .collect(),
            ),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            handshaking: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// Adds an export (replacing one of the same name); new connections see it at once.
    pub fn add_export(&self, export: Export) {
        let mut ex = self.exports.write().unwrap_or_else(|e| e.into_inner());
        ex.retain(|e| e.export.name != export.name);
        ex.push(Arc::new(Served {
            export,
            active: AtomicUsize::new(0),
        }));
    }

    /// Removes an export; connections already using it keep their device until they close.
    pub fn remove_export(&self, name: &str) -> bool {
        let mut ex = self.exports.write().unwrap_or_else(|e| e.into_inner());
        let before = ex.len();
        ex.retain(|e| e.export.name != name);
        ex.len() != before
    }

    /// Connections an export serves now.
    pub fn connections(&self, name: &str) -> usize {
        self.exports()
            .iter()
            .find(|e| e.export.name == name)
            .map_or(0, |e| e.active.load(Ordering::SeqCst))
    }

    fn exports(&self) -> Vec<Arc<Served>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let h = std::thread::Builder::new().name(name).spawn(f)?;
        let mut t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|h| !h.is_finished());
        t.push(h);
        Ok(())
    }

    /// Serves NBD on a unix socket (plaintext: it is local, and its permissions decide who
    /// may connect).
    pub fn listen_unix(self: &Arc<Self>, l: UnixListener) -> io::Result<()> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l.as_raw_fd());
        let me = Arc::clone(self);
        self.spawn("nbd-accept-unix".into(), move || {
            me.accept_loop("unix", || {
                l.accept().map(|(s, _)| (Stream::Unix(s), "unix".into()))
            })
        })
    }

    /// Serves NBD on TCP: with `tls`, clients must negotiate TLS (NBD_OPT_STARTTLS) before
    /// anything else; without, the connection is plaintext (callers insist on an explicit
    /// choice).
    pub fn listen_tcp(
        self: &Arc<Self>,
        l: TcpListener,
        tls: Option<Arc<TlsConfig>>,
    ) -> io::Result<()> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l.as_raw_fd());
        let me = Arc::clone(self);
        let tls2 = tls.clone();
        self.spawn("nbd-accept-tcp".into(), move || {
            me.accept_loop_tls("tcp", tls2, || {
                l.accept().map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    (Stream::Tcp(s), peer.to_string())
                })
            })
        })
    }

    fn accept_loop(
        self: &Arc<Self>,
        what: &str,
        accept: impl FnMut() -> io::Result<(Stream, String)>,
    ) {
        self.accept_loop_tls(what, None, accept)
    }

    fn accept_loop_tls(
        self: &Arc<Self>,
        what: &str,
        tls: Option<Arc<TlsConfig>>,
        mut accept: impl FnMut() -> io::Result<(Stream, String)>,
    ) {
        let mut reserve = Reserve::new();
        let mut backoff = Duration::from_millis(5);
        while !self.stop.load(Ordering::Acquire) {
            match accept() {
                Ok((s, peer)) => {
                    backoff = Duration::from_millis(5);
                    if self.stop.load(Ordering::Acquire) {
                        break;
                    }
                    self.accept(s, peer, tls.clone());
                }
                Err(e) if self.stop.load(Ordering::Acquire) => {
                    tracing::debug!("{what} listener closed: {e}");
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    if out_of_resources(&e) {
                        warn_limited!(Duration::from_secs(10), key = what, "cannot accept an NBD connection on the {what} socket: {e}; refusing connections until descriptors are free again");
                        // Let one pending connection in, only to close it: refused, not
                        // left to make accept fail again at once.
                        reserve.release();
                        if let Ok((s, _)) = accept() {
                            s.shutdown(Shutdown::Both);
                        }
                        reserve.restore();
                    } else {
                        warn_limited!(
                            Duration::from_secs(10),
                            key = what,
                            "accept on the {what} socket failed: {e}"
                        );
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn accept(self: &Arc<Self>, s: Stream, peer: String, tls: Option<Arc<TlsConfig>>) {
        let in_handshake = self.handshaking.fetch_add(1, Ordering::SeqCst) + 1;
        let per_export = self.config.max_connections;
        let exports = self.exports.read().map(|e| e.len()).unwrap_or(1).max(1);
        if in_handshake > self.config.max_handshakes
            || self.conns.lock().map(|c| c.len()).unwrap_or(0)
                >= per_export * exports + self.config.max_handshakes
        {
            self.handshaking.fetch_sub(1, Ordering::SeqCst);
            warn_limited!(
                Duration::from_secs(10),
                "too many NBD connections; refusing one from {peer}"
            );
            s.shutdown(Shutdown::Both);
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match s.try_clone() {
            Ok(c) => {
                self.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, c);
            }
            Err(e) => {
                self.handshaking.fetch_sub(1, Ordering::SeqCst);
                warn_limited!(
                    Duration::from_secs(10),
                    "refusing an NBD connection from {peer}: {e}"
                );
                s.shutdown(Shutdown::Both);
                return;
            }
        }
        let me = Arc::clone(self);
        let spawned = self.spawn(format!("nbd-conn-{id}"), move || {
            let mut counted = true;
            if let Err(e) = me.connection(s, &peer, tls, &mut counted) {
                tracing::debug!(peer, "connection ended: {e}");
            }
            if counted {
                me.handshaking.fetch_sub(1, Ordering::SeqCst);
            }
            me.forget(id);
        });
        if let Err(e) = spawned {
            // The closure (and the stream in it) is gone: the connection is closed.
            self.handshaking.fetch_sub(1, Ordering::SeqCst);
            self.forget(id);
            warn_limited!(
                Duration::from_secs(10),
                "cannot start a thread for an NBD connection: {e}; refusing it"
            );
        }
    }

    fn forget(&self, id: u64) {
        if let Some(c) = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        {
            c.shutdown(Shutdown::Both);
        }
    }

    /// Stops accepting, lets every connection finish what is in flight, and waits for them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for fd in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: shutting down our own listening socket (still open: its accept loop
            // owns it until the loop ends) wakes its blocked accept().
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            c.shutdown(Shutdown::Read);
        }
        // Connections end once their replies are out; one whose client does not read them
        // (its writer blocked on a full socket, its reader waiting for the byte budget) would
        // never end: past the drain timeout the rest are cut off.
        let deadline = std::time::Instant::now() + self.config.drain_timeout;
        loop {
            let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            if conns.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    connections = conns.len(),
                    "NBD clients did not read their replies within {:?} of the shutdown; \
                     disconnecting them (their requests in flight still complete)",
                    self.config.drain_timeout
                );
                for c in conns.values() {
                    c.shutdown(Shutdown::Both);
                }
                break;
            }
            drop(conns);
            std::thread::sleep(Duration::from_millis(10));
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// The handshake phase, then transmission. `counted` says the connection still counts as
    /// handshaking (cleared once it holds an export's slot).
    fn connection(
        self: &Arc<Self>,
        mut s: Stream,
        peer: &str,
        tls: Option<Arc<TlsConfig>>,
        counted: &mut bool,
    ) -> io::Result<()> {
        let mut out = Vec::new();
        Handshake::greeting(&mut out);
        s.write_all(&out)?;
        s.set_read_timeout(Some(self.config.handshake_timeout))?;
        let exports = self.exports();
        let max = self.config.max_connections;
        let mut hs = Handshake::new(exports.iter().map(|e| e.info(max)).collect());
        if tls.is_some() {
            hs = hs.require_tls();
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut client: Option<String> = None;
        let neg = 'negotiation: loop {
            // Everything pending may hold several options; STARTTLS changes the stream.
            loop {
                out.clear();
                let (used, status) = match hs.advance(&pending, &mut out) {
                    Ok(r) => r,
                    Err(e) => {
                        warn_limited!(
                            Duration::from_secs(10),
                            key = peer,
                            peer,
                            "NBD handshake refused: {e}"
                        );
                        return Ok(());
                    }
                };
                pending.drain(..used);
                s.write_all(&out)?;
                match status {
                    HandshakeStatus::NeedMore => break,
                    HandshakeStatus::Close => return Ok(()),
                    HandshakeStatus::Transmission(n) => break 'negotiation n,
                    HandshakeStatus::StartTls => {
                        let (Stream::Tcp(tcp), Some(cfg)) = (&s, &tls) else {
                            return Err(io::Error::other("STARTTLS accepted without TLS"));
                        };
                        match cfg.accept(tcp.try_clone()?, &pending) {
                            Ok((t, name)) => {
                                tracing::debug!(peer, client = name, "TLS established");
                                pending.clear();
                                s = Stream::Tls(t);
                                hs.tls_started();
                                client = Some(name);
                            }
                            Err(e) => {
                                warn_limited!(
                                    Duration::from_secs(10),
                                    key = peer,
                                    peer,
                                    "NBD over TLS refused: {e}"
                                );
                                return Ok(());
                            }
                        }
                    }
                }
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&chunk[..n]);
        };
        let served = Arc::clone(&exports[neg.export]);
        if !served.acquire(max) {
            warn_limited!(
                Duration::from_secs(10),
                key = &served.export.name,
                peer,
                "export {} already serves {max} connections, its limit; refusing another",
                served.export.name
            );
            return Ok(());
        }
        let _slot = Slot(Arc::clone(&served));
        self.handshaking.fetch_sub(1, Ordering::SeqCst);
        *counted = false;
        s.set_read_timeout(None)?;
        tracing::debug!(peer, export = %served.export.name, client = ?client, ?neg, "client entered transmission");
        transmission::run(s, pending, &served.export, neg, peer, &self.stop)
    }
}
