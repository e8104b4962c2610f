//! The NBD I/O driver: accepts connections, runs the handshake state machine over the socket,
//! then reads requests, hands them to the export's device, and writes replies as they
//! complete (out of order). Per connection: one reader thread, one writer thread, and a byte
//! budget that bounds the memory of requests in flight.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::consts::{errno_to_nbd, CMD_READ, ESHUTDOWN};
use crate::device::{BlockDevice, Zero};
use crate::handshake::{ExportInfo, Handshake, HandshakeStatus, Negotiated};
use crate::reply::ReplyWriter;
use crate::request::{decode_header, header_len, validate, Command};
use crate::stream::Stream;

/// Bytes of requests and replies in flight per connection before the reader waits.
const BUDGET: u64 = 64 << 20;
/// Fixed cost charged per request, so tiny requests are bounded in number too.
const REQUEST_COST: u64 = 4096;
/// Most block-status descriptors in one reply chunk.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// One export: a device under a name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

impl Export {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.device.size(),
            flags: self.device.flags(),
            contexts: self.device.contexts(),
        }
    }
}

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// A client that has not finished its handshake in this time is disconnected.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

pub struct Server {
    config: ServerConfig,
    exports: RwLock<Vec<Arc<Export>>>,
    stop: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Stream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    listeners: Mutex<Vec<i32>>,
}

struct Outgoing {
    head: Vec<u8>,
    data: Vec<u8>,
    cost: u64,
}

/// Counts bytes in flight; the reader waits when over budget.
#[derive(Default)]
struct Budget {
    used: Mutex<u64>,
    cv: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *u > 0 && *u + n > BUDGET {
            u = self.cv.wait(u).unwrap_or_else(|e| e.into_inner());
        }
        *u += n;
    }
    fn release(&self, n: u64) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *u -= n;
        self.cv.notify_all();
    }
    fn wait_idle(&self) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *u > 0 {
            u = self.cv.wait(u).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Server {
    pub fn new(config: ServerConfig, exports: Vec<Export>) -> Arc<Server> {
        Arc::new(Server {
            config,
            exports: RwLock::new(exports.into_iter().map(Arc::new).collect()),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// Adds an export (replacing one of the same name); new connections see it at once.
    pub fn add_export(&self, export: Export) {
        let mut ex = self.exports.write().unwrap_or_else(|e| e.into_inner());
        ex.retain(|e| e.name != export.name);
        ex.push(Arc::new(export));
    }

    /// Removes an export; connections already using it keep their device until they close.
    pub fn remove_export(&self, name: &str) -> bool {
        let mut ex = self.exports.write().unwrap_or_else(|e| e.into_inner());
        let before = ex.len();
        ex.retain(|e| e.name != name);
        ex.len() != before
    }

    fn exports(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) {
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(f)
            .expect("spawning a server thread");
        let mut t = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|h| !h.is_finished());
        t.push(h);
    }

    pub fn listen_unix(self: &Arc<Self>, l: UnixListener) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l.as_raw_fd());
        let me = Arc::clone(self);
        self.spawn("nbd-accept-unix".into(), move || {
            for s in l.incoming() {
                if me.stop.load(Ordering::Acquire) {
                    break;
                }
                match s {
                    Ok(s) => me.accept(Stream::Unix(s), "unix".into()),
                    Err(e) => tracing::warn!("accept on unix socket failed: {e}"),
                }
            }
        });
    }

    pub fn listen_tcp(self: &Arc<Self>, l: TcpListener) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l.as_raw_fd());
        let me = Arc::clone(self);
        self.spawn("nbd-accept-tcp".into(), move || {
            for s in l.incoming() {
                if me.stop.load(Ordering::Acquire) {
                    break;
                }
                match s {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        me.accept(Stream::Tcp(s), peer)
                    }
                    Err(e) => tracing::warn!("accept on TCP socket failed: {e}"),
                }
            }
        });
    }

    fn accept(self: &Arc<Self>, s: Stream, peer: String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = s.try_clone() {
            self.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, c);
        }
        let me = Arc::clone(self);
        self.spawn(format!("nbd-conn-{id}"), move || {
            if let Err(e) = me.connection(s, &peer) {
                tracing::debug!(peer, "connection ended: {e}");
            }
            me.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
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
            // SAFETY: shutting down our own listening socket wakes its blocked accept().
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

    fn connection(self: &Arc<Self>, mut s: Stream, peer: &str) -> io::Result<()> {
        let mut out = Vec::new();
        Handshake::greeting(&mut out);
        s.write_all(&out)?;
        s.set_read_timeout(Some(self.config.handshake_timeout))?;
        let exports = self.exports();
        let mut hs = Handshake::new(exports.iter().map(|e| e.info()).collect());
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let neg = loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&chunk[..n]);
            out.clear();
            let (used, status) = match hs.advance(&pending, &mut out) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(peer, "NBD handshake refused: {e}");
                    return Ok(());
                }
            };
            pending.drain(..used);
            s.write_all(&out)?;
            match status {
                HandshakeStatus::NeedMore => {}
                HandshakeStatus::Close => return Ok(()),
                HandshakeStatus::Transmission(n) => break n,
            }
        };
        s.set_read_timeout(None)?;
        let export = Arc::clone(&exports[neg.export]);
        tracing::debug!(peer, export = %export.name, ?neg, "client entered transmission");
        self.transmission(s, pending, &export, neg, peer)
    }

    fn transmission(
        &self,
        s: Stream,
        leftover: Vec<u8>,
        export: &Export,
        neg: Negotiated,
        peer: &str,
    ) -> io::Result<()> {
        let disk = &export.device;
        let (size, flags) = (disk.size(), disk.flags());
        let writer = ReplyWriter::new(&neg);
        let budget = Arc::new(Budget::default());
        let (tx, rx) = mpsc::channel::<Outgoing>();
        let wsock = s.try_clone()?;
        let wbudget = Arc::clone(&budget);
        let writer_thread = std::thread::Builder::new()
            .name("nbd-writer".into())
            .spawn(move || write_replies(wsock, rx, &wbudget))?;
        let rsock = s.try_clone()?;
        let mut r = BufReader::with_capacity(256 * 1024, io::Cursor::new(leftover).chain(rsock));
        let hlen = header_len(neg.extended);
        let mut hbuf = vec![0u8; hlen];
        let result = loop {
            if let Err(e) = r.read_exact(&mut hbuf) {
                break if e.kind() == io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            let h = match decode_header(&hbuf, neg.extended) {
                Ok(Some(h)) => h,
                Ok(None) => unreachable!("a full header was read"),
                Err(e) => {
                    tracing::warn!(peer, export = %export.name, "protocol violation, disconnecting: {e}");
                    break Ok(());
                }
            };
            let cost = REQUEST_COST
                + u64::from(h.payload)
                + if h.typ == CMD_READ {
                    h.length.min(1 << 25)
                } else {
                    0
                };
            budget.acquire(cost);
            let mut payload = vec![0u8; h.payload as usize];
            if let Err(e) = r.read_exact(&mut payload) {
                budget.release(cost);
                break Err(e);
            }
            let reply = Replier {
                tx: tx.clone(),
                writer,
                cookie: h.cookie,
                offset: h.offset,
                cost,
            };
            let cmd = match validate(&h, size, &flags, &neg) {
                Ok(c) => c,
                Err(refusal) => {
                    reply.error(refusal.errno, refusal.message);
                    continue;
                }
            };
            if self.stop.load(Ordering::Acquire) && !matches!(cmd, Command::Disc) {
                reply.error(ESHUTDOWN, "server is shutting down");
                continue;
            }
            match cmd {
                Command::Disc => {
                    budget.release(cost);
                    break Ok(());
                }
                Command::Read { offset, len } => disk.read(
                    offset,
                    len,
                    Box::new(move |res| match res {
                        Ok(buf) => reply.data(buf),
                        Err(e) => reply.io_error(&e),
                    }),
                ),
                Command::Write { offset, fua, .. } => {
                    disk.write(offset, payload, fua, Box::new(move |res| reply.done(res)))
                }
                Command::Flush => disk.flush(Box::new(move |res| reply.done(res))),
                Command::Trim { offset, len, fua } => {
                    disk.trim(offset, len, fua, Box::new(move |res| reply.done(res)))
                }
                Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole,
                    fast_zero,
                } => disk.write_zeroes(
                    offset,
                    len,
                    Zero {
                        fua,
                        no_hole,
                        fast: fast_zero,
                    },
                    Box::new(move |res| reply.done(res)),
                ),
                Command::Cache { offset, len } => reply.done(disk.cache(offset, len)),
                Command::BlockStatus {
                    offset,
                    len,
                    req_one,
                } => match block_status(&**disk, &neg, &writer, h.cookie, offset, len, req_one) {
                    Ok(bytes) => reply.raw(bytes),
                    Err(e) => reply.io_error(&e),
                },
            }
        };
        // Let every request in flight complete and its reply go out before closing.
        budget.wait_idle();
        drop(tx);
        let _ = writer_thread.join();
        s.shutdown(Shutdown::Both);
        result
    }
}

struct Replier {
    tx: mpsc::Sender<Outgoing>,
    writer: ReplyWriter,
    cookie: u64,
    offset: u64,
    cost: u64,
}

impl Replier {
    fn send(self, head: Vec<u8>, data: Vec<u8>) {
        let _ = self.tx.send(Outgoing {
            head,
            data,
            cost: self.cost,
        });
    }
    fn raw(self, head: Vec<u8>) {
        self.send(head, Vec::new())
    }
    fn data(self, buf: Vec<u8>) {
        let mut head = Vec::with_capacity(40);
        self.writer
            .read_header(&mut head, self.cookie, self.offset, buf.len() as u32);
        self.send(head, buf)
    }
    fn error(self, errno: u32, msg: &str) {
        let mut head = Vec::with_capacity(64);
        self.writer
            .error(&mut head, self.cookie, self.offset, errno, msg);
        self.send(head, Vec::new())
    }
    fn io_error(self, e: &io::Error) {
        self.error(errno_to_nbd(e), &e.to_string())
    }
    fn done(self, r: io::Result<()>) {
        match r {
            Ok(()) => {
                let mut head = Vec::with_capacity(32);
                self.writer.ok(&mut head, self.cookie, self.offset);
                self.send(head, Vec::new())
            }
            Err(e) => self.io_error(&e),
        }
    }
}

fn write_replies(s: Stream, rx: mpsc::Receiver<Outgoing>, budget: &Budget) {
    let mut w = BufWriter::with_capacity(256 * 1024, s);
    let mut broken = false;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(m) = next {
            if !broken {
                let r = w.write_all(&m.head).and_then(|_| w.write_all(&m.data));
                if let Err(e) = r {
                    tracing::debug!("client went away while replying: {e}");
                    broken = true;
                    w.get_ref().shutdown(Shutdown::Both);
                }
            }
            budget.release(m.cost);
            next = rx.try_recv().ok();
        }
        if !broken && w.flush().is_err() {
            broken = true;
            w.get_ref().shutdown(Shutdown::Both);
        }
    }
}

fn block_status(
    disk: &dyn BlockDevice,
    neg: &Negotiated,
    writer: &ReplyWriter,
    cookie: u64,
    offset: u64,
    len: u64,
    req_one: bool,
) -> io::Result<Vec<u8>> {
    let max = if req_one { 1 } else { MAX_DESCRIPTORS };
    let cap = writer.max_extent();
    let len = len.min(cap);
    let mut out = Vec::new();
    for (i, (id, ctx)) in neg.contexts.iter().enumerate() {
        let extents = disk.block_status(*ctx, offset, len, max)?;
        writer.block_status(
            &mut out,
            cookie,
            offset,
            *id,
            &extents,
            i + 1 == neg.contexts.len(),
        );
    }
    Ok(out)
}
