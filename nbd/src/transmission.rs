//! The transmission phase of one connection: the reader loop that decodes requests and hands
//! them to the device, the writer thread that sends replies as they complete (out of order),
//! and a byte budget that bounds the memory of requests in flight.

use std::cell::RefCell;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use crate::consts::{errno_to_nbd, CMD_READ, ESHUTDOWN};
use crate::device::{BlockDevice, Zero};
use crate::handshake::Negotiated;
use crate::reply::ReplyWriter;
use crate::request::{decode_header, header_len, validate, Command};
use crate::server::Export;
use crate::stream::Stream;

/// Reads exactly `n` bytes of a request's payload into a new buffer without zero-filling it
/// first: `read_to_end` appends into the reserved capacity (the standard library keeps count
/// of what it has initialised), where `vec![0; n]` and `read_exact` write every byte twice. A
/// freed buffer reused from the heap is not known to be zero, so that fill was a real memset
/// of up to 32 MiB per write request.
fn read_payload<R: Read + ?Sized>(r: &mut R, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    // At the limit `Take` answers 0 without reading `r`: no wait for bytes of the next request.
    r.take(n as u64).read_to_end(&mut buf)?;
    if buf.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "connection closed after {} of a {n}-byte write payload",
                buf.len()
            ),
        ));
    }
    Ok(buf)
}

/// Bytes of requests and replies in flight per connection before the reader waits.
const BUDGET: u64 = 64 << 20;
/// Fixed cost charged per request, so tiny requests are bounded in number too.
const REQUEST_COST: u64 = 4096;
/// Most block-status descriptors in one reply chunk.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Replies held back by the reader before it hands them to the writer in one message.
const MAX_BATCH: usize = 8;

struct Outgoing {
    head: Vec<u8>,
    data: Vec<u8>,
    cost: u64,
}

/// What the writer thread is handed: one reply (from a device's completion thread) or a
/// batch of them (completed on the reader's thread).
enum Msg {
    One(Outgoing),
    Many(Vec<Outgoing>),
}

/// Replies completed on a connection's reader thread itself (a device that finished a request
/// inline, such as a read from the page cache), held until the reader would block (on the
/// socket or the budget) or holds [`MAX_BATCH`] of them, then handed to the writer in one
/// message: one writer wakeup and one socket write per batch instead of per reply.
struct Batch {
    conn: u64,
    replies: Vec<Outgoing>,
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// The reader thread's batch while a connection runs; handed over (and the thread's batching
/// ended) when dropped, whatever way the reader loop ends.
struct Batching {
    tx: mpsc::Sender<Msg>,
}

impl Batching {
    fn start(conn: u64, tx: mpsc::Sender<Msg>) -> Batching {
        BATCH.with(|b| {
            *b.borrow_mut() = Some(Batch {
                conn,
                replies: Vec::new(),
            })
        });
        Batching { tx }
    }

    fn len(&self) -> usize {
        BATCH.with(|b| b.borrow().as_ref().map_or(0, |b| b.replies.len()))
    }

    /// Hands the held replies to the writer.
    fn flush(&self) {
        let replies = BATCH.with(|b| {
            b.borrow_mut()
                .as_mut()
                .map(|b| std::mem::take(&mut b.replies))
                .unwrap_or_default()
        });
        if !replies.is_empty() {
            let _ = self.tx.send(Msg::Many(replies));
        }
    }
}

impl Drop for Batching {
    fn drop(&mut self) {
        self.flush();
        BATCH.with(|b| *b.borrow_mut() = None);
    }
}

/// Counts bytes in flight; the reader waits when over budget.
///
/// Releasing is on every reply's path, so it wakes only a thread that waits (a condition
/// variable's notify is a system call even with nobody waiting).
#[derive(Default)]
struct Budget {
    state: Mutex<BudgetState>,
    cv: Condvar,
}

#[derive(Default)]
struct BudgetState {
    used: u64,
    /// Threads waiting in `acquire` or `wait_idle`.
    waiters: u32,
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wait<'a>(
        &self,
        mut s: std::sync::MutexGuard<'a, BudgetState>,
        until: impl Fn(&BudgetState) -> bool,
    ) -> std::sync::MutexGuard<'a, BudgetState> {
        while !until(&s) {
            s.waiters += 1;
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiters -= 1;
        }
        s
    }
    /// Whether `n` more bytes could be taken now without waiting.
    fn fits(&self, n: u64) -> bool {
        let s = self.lock();
        s.used == 0 || s.used + n <= BUDGET
    }
    fn acquire(&self, n: u64) {
        let s = self.lock();
        let mut s = self.wait(s, |s| s.used == 0 || s.used + n <= BUDGET);
        s.used += n;
    }
    fn release(&self, n: u64) {
        let mut s = self.lock();
        s.used -= n;
        if s.waiters > 0 {
            self.cv.notify_all();
        }
    }
    fn wait_idle(&self) {
        let s = self.lock();
        drop(self.wait(s, |s| s.used == 0));
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
    let (tx, rx) = mpsc::channel::<Msg>();
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let batching = Batching::start(conn, tx.clone());
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
        if r.buffer().len() < hlen || batching.len() >= MAX_BATCH {
            // About to wait for the client (or holding many): send what is done.
            batching.flush();
        }
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
        if !budget.fits(cost) || r.buffer().len() < h.payload as usize {
            // About to wait for replies to go out, or for the client: send what is done.
            batching.flush();
        }
        budget.acquire(cost);
        let payload = match read_payload(&mut r, h.payload as usize) {
            Ok(p) => p,
            Err(e) => {
                budget.release(cost);
                break Err(e);
            }
        };
        let reply = Replier {
            tx: tx.clone(),
            conn,
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
    drop(batching);
    budget.wait_idle();
    drop(tx);
    let _ = writer_thread.join();
    s.shutdown(Shutdown::Both);
    result
}

struct Replier {
    tx: mpsc::Sender<Msg>,
    /// The connection (to tell its reader thread's batch).
    conn: u64,
    writer: ReplyWriter,
    cookie: u64,
    offset: u64,
    cost: u64,
}

impl Replier {
    fn send(self, head: Vec<u8>, data: Vec<u8>) {
        let out = Outgoing {
            head,
            data,
            cost: self.cost,
        };
        // On this connection's reader thread: into its batch. Anywhere else: to the writer.
        let out = BATCH.with(|b| match &mut *b.borrow_mut() {
            Some(batch) if batch.conn == self.conn => {
                batch.replies.push(out);
                None
            }
            _ => Some(out),
        });
        if let Some(out) = out {
            let _ = self.tx.send(Msg::One(out));
        }
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

fn write_replies(s: Stream, rx: mpsc::Receiver<Msg>, budget: &Budget) {
    let mut w = BufWriter::with_capacity(256 * 1024, s);
    let mut broken = false;
    let write = |m: Outgoing, w: &mut BufWriter<Stream>, broken: &mut bool| {
        if !*broken {
            let r = w.write_all(&m.head).and_then(|_| w.write_all(&m.data));
            if let Err(e) = r {
                tracing::debug!("client went away while replying: {e}");
                *broken = true;
                w.get_ref().shutdown(Shutdown::Both);
            }
        }
        budget.release(m.cost);
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(m) = next {
            match m {
                Msg::One(o) => write(o, &mut w, &mut broken),
                Msg::Many(v) => v.into_iter().for_each(|o| write(o, &mut w, &mut broken)),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_payload_takes_exactly_its_bytes() {
        // A payload split over the reader's buffer and the socket behind it, then the next
        // request's bytes, which must stay unread.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut r =
            BufReader::with_capacity(4096, io::Cursor::new(&data[..1000]).chain(&data[1000..]));
        let p = read_payload(&mut r, 200_000).unwrap();
        assert_eq!(p, &data[..200_000]);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &data[200_000..]);
        assert!(read_payload(&mut io::Cursor::new(&data[..0]), 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn read_payload_cut_short_is_unexpected_eof() {
        let e = read_payload(&mut io::Cursor::new(vec![7u8; 100]), 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("100 of a 4096-byte"), "{e}");
    }
}
