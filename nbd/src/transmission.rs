//! The transmission phase of one connection: the reader loop that decodes requests and hands
//! them to the device, the writer thread that sends replies as they complete (out of order),
//! and a byte budget that bounds the memory of requests in flight.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use crate::consts::{errno_to_nbd, CMD_READ, ESHUTDOWN};
use crate::device::{BlockDevice, Zero};
use crate::handshake::Negotiated;
use crate::reply::ReplyWriter;
use crate::request::{decode_header, header_len, validate, Command};
use crate::server::Export;
use crate::stream::Stream;

/// Bytes of requests and replies in flight per connection before the reader waits.
const BUDGET: u64 = 64 << 20;
/// Fixed cost charged per request, so tiny requests are bounded in number too.
const REQUEST_COST: u64 = 4096;
/// Most block-status descriptors in one reply chunk.
const MAX_DESCRIPTORS: usize = 1 << 16;

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

/// Serves one connection that negotiated `neg` for `export` until the client disconnects or
/// breaks the protocol; requests in flight finish first.
pub(crate) fn run(
    s: Stream,
    leftover: Vec<u8>,
    export: &Export,
    neg: Negotiated,
    peer: &str,
    stop: &AtomicBool,
) -> io::Result<()> {
    let disk = &export.device;
    let size = disk.size();
    let mut flags = disk.flags();
    flags.read_only |= export.read_only;
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
        if stop.load(Ordering::Acquire) && !matches!(cmd, Command::Disc) {
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
