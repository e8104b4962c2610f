//! The transmission phase of one connection: the reader loop that decodes requests and hands
//! them to the device, the reply [`Sink`] that sends replies as they complete (out of order;
//! by the thread that has them when the socket takes them at once, else by the connection's
//! writer thread), and a byte budget that bounds the memory of requests in flight.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, BufWriter, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::buffers::{self, PoolGuard};
use crate::consts::{errno_to_nbd, CMD_READ, ESHUTDOWN};
use crate::device::{BlockDevice, Zero};
use crate::handshake::Negotiated;
use crate::reply::{ReplyBuf, ReplyWriter, MAX_FIXED_HEADER};
use crate::request::{decode_header, header_len, validate, Command};
use crate::server::Export;
use crate::stream::Stream;

/// Bytes a connection reads from its socket at once (when that many have arrived).
const READ_BUFFER: usize = 256 << 10;

/// A connection's incoming bytes: read from the socket in large chunks into a buffer (zeroed
/// once, when the connection starts), from which request headers are decoded in place and
/// payloads copied into buffers from the connection's pool ([`buffers::take`]). Several
/// requests that arrive together cost one `recv`. (A `BufReader` over the socket cost a few
/// hundred instructions per request more: the standard library zero-fills the part of the
/// buffer a read may fill, and reads into a payload's spare capacity, every time.)
struct Incoming<R> {
    src: R,
    buf: Vec<u8>,
    /// `buf[pos..end]` is read and not yet used.
    pos: usize,
    end: usize,
}

impl<R: Read> Incoming<R> {
    /// Starts with `early`, the bytes read past the handshake.
    fn new(src: R, early: Vec<u8>) -> Incoming<R> {
        let end = early.len();
        let mut buf = early;
        buf.resize(end.max(READ_BUFFER), 0);
        Incoming {
            src,
            buf,
            pos: 0,
            end,
        }
    }

    /// Bytes read and not yet used.
    fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// Reads until at least `n` bytes (at most the buffer's size) are buffered; false if the
    /// connection ended first.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        if self.buffered() >= n {
            return Ok(true);
        }
        if self.pos + n > self.buf.len() || self.pos == self.end {
            // Room for what is missing, and as much as possible after it.
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        while self.buffered() < n {
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The next `hlen` bytes (a request header); None if the connection ended cleanly before
    /// them.
    fn header(&mut self, hlen: usize) -> io::Result<Option<&[u8]>> {
        if !self.fill(hlen)? {
            if self.buffered() == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a request header",
            ));
        }
        let at = self.pos;
        self.pos += hlen;
        Ok(Some(&self.buf[at..at + hlen]))
    }

    /// Exactly `n` bytes of a request's payload: where they are all read already, borrowed
    /// from the buffer (no copy); else in a buffer from the connection's pool.
    fn payload(&mut self, n: usize) -> io::Result<Payload<'_>> {
        if self.buffered() >= n {
            let at = self.pos;
            self.pos += n;
            return Ok(Payload::Buffered(&self.buf[at..at + n]));
        }
        self.payload_owned(n).map(Payload::Owned)
    }

    /// Exactly `n` bytes of a request's payload, in a buffer from the connection's pool.
    fn payload_owned(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = buffers::take(n);
        while out.len() < n {
            if self.buffered() == 0 && !self.fill(1)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of a {n}-byte write payload",
                        out.len()
                    ),
                ));
            }
            let k = (n - out.len()).min(self.buffered());
            out.extend_from_slice(&self.buf[self.pos..self.pos + k]);
            self.pos += k;
        }
        Ok(out)
    }
}

/// A request's payload: still in the connection's read buffer, or copied out of it (a
/// payload larger than what one `recv` brought in).
#[derive(Debug)]
enum Payload<'a> {
    Buffered(&'a [u8]),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Payload<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Buffered(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

/// Bytes of requests and replies in flight per connection before the reader waits.
const BUDGET: u64 = 64 << 20;
/// Fixed cost charged per request, so tiny requests are bounded in number too.
const REQUEST_COST: u64 = 4096;
/// Most block-status descriptors in one reply chunk.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Replies held back by the reader before it sends them in one `sendmsg`.
const MAX_BATCH: usize = 8;

/// Replies completed off the reader thread of at most this many bytes are sent by the thread
/// that completed them when the socket takes them at once; larger ones go to the writer
/// thread, so a device's completion thread (shared by connections) never copies much into a
/// socket.
const DIRECT_MAX: usize = 64 << 10;
/// Most pieces (header or data) in one `sendmsg`.
const MAX_IOV: usize = 64;

/// A reply's header: the fixed-size ones (a write's or a read's) kept inline, so a reply
/// costs no allocation; errors and block status, whose length varies, on the heap.
enum Head {
    Fixed {
        len: u8,
        bytes: [u8; MAX_FIXED_HEADER],
    },
    Heap(Vec<u8>),
}

impl Head {
    fn fixed() -> Head {
        Head::Fixed {
            len: 0,
            bytes: [0; MAX_FIXED_HEADER],
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Head::Fixed { len, bytes } => &bytes[..usize::from(*len)],
            Head::Heap(v) => v,
        }
    }
}

impl ReplyBuf for Head {
    #[inline]
    fn put(&mut self, b: &[u8]) {
        match self {
            Head::Fixed { len, bytes } => {
                let at = usize::from(*len);
                match bytes.get_mut(at..at + b.len()) {
                    Some(dst) => {
                        dst.copy_from_slice(b);
                        *len += b.len() as u8;
                    }
                    None => {
                        // Never with the encoders used on it; kept correct all the same.
                        let mut v = bytes[..at].to_vec();
                        v.extend_from_slice(b);
                        *self = Head::Heap(v);
                    }
                }
            }
            Head::Heap(v) => v.extend_from_slice(b),
        }
    }
}

struct Outgoing {
    head: Head,
    data: Vec<u8>,
    cost: u64,
}

impl Outgoing {
    fn len(&self) -> usize {
        self.head.as_slice().len() + self.data.len()
    }

    /// The reply's bytes from byte `skip` on, as (part of) its header and its data.
    fn parts(&self, skip: usize) -> [&[u8]; 2] {
        let head = self.head.as_slice();
        if skip < head.len() {
            [&head[skip..], &self.data]
        } else {
            [&[], &self.data[skip - head.len()..]]
        }
    }
}

/// Replies completed on a connection's reader thread itself (a device that finished a request
/// inline, such as a read from the page cache or a small write), held until the reader would
/// block (on the socket or the budget) or holds [`MAX_BATCH`] of them, then sent in one
/// `sendmsg`: one system call per batch instead of per reply.
struct Batch {
    conn: u64,
    sink: Arc<Sink>,
    replies: Vec<Outgoing>,
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// The reader thread's batch while a connection runs; sent (and the thread's batching ended)
/// when dropped, whatever way the reader loop ends.
struct Batching {}

impl Batching {
    fn start(conn: u64, sink: Arc<Sink>) -> Batching {
        BATCH.with(|b| {
            *b.borrow_mut() = Some(Batch {
                conn,
                sink,
                replies: Vec::with_capacity(MAX_BATCH),
            })
        });
        Batching {}
    }

    fn len(&self) -> usize {
        BATCH.with(|b| b.borrow().as_ref().map_or(0, |b| b.replies.len()))
    }

    /// Sends the held replies (or queues them for the writer thread).
    fn flush(&self) {
        send_held_replies();
    }
}

/// Sends the replies this thread holds back (a connection's reader thread holds those of the
/// requests it completed itself, see [`Batch`]); nothing on any other thread.
///
/// For a device that is about to block on a connection's reader thread for a while (the
/// tracker's write gate, closed while a freeze drains writes): the requests that thread
/// already completed are answered first, rather than waiting for the block to end.
pub fn send_held_replies() {
    BATCH.with(|b| {
        // A reentrant call (from inside a send) finds the batch borrowed: nothing to do.
        let Ok(mut b) = b.try_borrow_mut() else {
            return;
        };
        if let Some(b) = b.as_mut() {
            if !b.replies.is_empty() {
                // Drains the batch in place: its capacity stays for the next one.
                b.sink.submit(&mut b.replies, true);
            }
        }
    });
}

impl Drop for Batching {
    fn drop(&mut self) {
        self.flush();
        BATCH.with(|b| *b.borrow_mut() = None);
    }
}

/// Where a connection's replies go.
///
/// Whichever thread has replies (the reader with its batch, a device's completion thread with
/// one) sends them itself when the socket takes them without blocking: one
/// `sendmsg(MSG_DONTWAIT)`, no hand-over to another thread and no wakeup (a futex to wake
/// the writer and another for it to sleep again, per batch, was most of the system calls of
/// a 4 KiB request besides its `pwrite`). What the socket does not take at once, replies
/// larger than [`DIRECT_MAX`] from other threads, and everything on TLS (whose encryption
/// state the writer owns) are queued for the writer thread, which sends them blocking.
/// Replies never overtake each other's bytes: while the queue holds anything or the writer
/// is sending, new replies join the queue's end. Neither the reader nor a completion thread
/// ever waits for the client to read.
struct Sink {
    state: Mutex<SinkState>,
    cv: Condvar,
    /// The connection's socket: for shutting it down, and its descriptor (None for TLS) for
    /// the non-blocking sends.
    sock: Stream,
    fd: Option<RawFd>,
    budget: Arc<Budget>,
}

#[derive(Default)]
struct SinkState {
    /// Replies not yet (fully) sent, in order.
    queue: VecDeque<Outgoing>,
    /// Bytes of the queue's first reply already sent.
    sent: usize,
    /// The writer thread has replies to send (queued or taken out of the queue): nobody else
    /// sends now.
    writer_busy: bool,
    /// The writer thread sleeps, waiting for replies.
    writer_waiting: bool,
    /// The socket failed: replies are dropped (their budget released).
    broken: bool,
    /// No more replies will come: the writer ends once it has sent what is queued.
    closed: bool,
}

impl Sink {
    fn new(sock: Stream, budget: Arc<Budget>) -> Sink {
        let fd = sock.raw_fd();
        Sink {
            state: Mutex::new(SinkState::default()),
            cv: Condvar::new(),
            sock,
            fd,
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes every reply out of `replies` (which keeps its capacity) and sends it: now, from
    /// this thread, as far as the socket takes it without blocking and `direct` allows; the
    /// rest through the writer thread.
    fn submit(&self, replies: &mut Vec<Outgoing>, direct: bool) {
        let mut st = self.lock();
        st.queue.extend(replies.drain(..));
        self.send_queued(st, direct);
    }

    /// One reply (from a thread other than the reader's).
    fn submit_one(&self, out: Outgoing) {
        let direct = out.len() <= DIRECT_MAX;
        let mut st = self.lock();
        st.queue.push_back(out);
        self.send_queued(st, direct);
    }

    /// Sends what was just queued, unless the writer thread is at it: this thread sends what
    /// the socket takes now (if `direct`), and wakes the writer for the rest.
    fn send_queued(&self, mut st: MutexGuard<'_, SinkState>, direct: bool) {
        let mut released = 0;
        if st.broken {
            // Nothing goes out any more (the writer drops what it had taken itself).
            released = st.queue.drain(..).map(|o| o.cost).sum();
            st.sent = 0;
        } else if !st.writer_busy {
            if let Some(fd) = self.fd.filter(|_| direct) {
                let (whole, part, failed) = send_now(fd, &st.queue, st.sent);
                released = st.queue.drain(..whole).map(|o| o.cost).sum();
                st.sent = part;
                if let Some(e) = failed {
                    tracing::debug!("client went away while replying: {e}");
                    st.broken = true;
                    released += st.queue.drain(..).map(|o| o.cost).sum::<u64>();
                    st.sent = 0;
                    self.sock.shutdown(Shutdown::Both);
                }
            }
            if !st.queue.is_empty() {
                st.writer_busy = true;
                if st.writer_waiting {
                    self.cv.notify_one();
                }
            }
        }
        drop(st);
        if released > 0 {
            self.budget.release(released);
        }
    }

    /// No more replies: the writer thread ends once the queue is sent.
    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        if st.writer_waiting {
            self.cv.notify_one();
        }
    }
}

/// Sends what the socket takes now of `queue` (from byte `sent` of its first reply) without
/// blocking. Returns the replies sent whole, the bytes sent of the next one, and the error
/// that broke the connection, if one did.
fn send_now(
    fd: RawFd,
    queue: &VecDeque<Outgoing>,
    mut sent: usize,
) -> (usize, usize, Option<io::Error>) {
    let mut whole = 0;
    while whole < queue.len() {
        // Not zero-filled (a kilobyte per call): only the first `n` are written and sent.
        let mut iov = [const { MaybeUninit::<libc::iovec>::uninit() }; MAX_IOV];
        let mut n = 0;
        let mut total = 0;
        'fill: for (i, o) in queue.iter().enumerate().skip(whole) {
            for p in o.parts(if i == whole { sent } else { 0 }) {
                if p.is_empty() {
                    continue;
                }
                if n == MAX_IOV {
                    break 'fill;
                }
                iov[n].write(libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                });
                n += 1;
                total += p.len();
            }
        }
        if n == 0 {
            break;
        }
        // SAFETY: an all-zero msghdr is valid (no address, no control data); it points at
        // `iov`, which lives to the end of this block.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr().cast::<libc::iovec>();
        msg.msg_iovlen = n as _;
        // SAFETY: `fd` is the connection's socket, kept open by the `Sink` that owns it for
        // as long as `submit` runs; the kernel reads the first `n` iovecs only, all written
        // above (MaybeUninit<iovec> has iovec's layout); each points at the bytes of a reply
        // the queue owns and that nothing changes while the lock is held; the kernel only
        // reads them.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => return (whole, sent, Some(e)),
            }
        }
        let mut r = r as usize;
        let short = r < total;
        while r > 0 {
            let left = queue[whole].len() - sent;
            if r >= left {
                r -= left;
                whole += 1;
                sent = 0;
            } else {
                sent += r;
                r = 0;
            }
        }
        if short {
            // The socket's buffer is full: the writer thread waits for room.
            break;
        }
    }
    (whole, sent, None)
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
    let wsock = s.try_clone()?;
    let rsock = s.try_clone()?;
    let sink = Arc::new(Sink::new(s, Arc::clone(&budget)));
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let wsink = Arc::clone(&sink);
    let writer_thread = std::thread::Builder::new()
        .name("nbd-writer".into())
        .spawn(move || write_replies(&wsink, wsock))?;
    let batching = Batching::start(conn, Arc::clone(&sink));
    let _pool = PoolGuard::start();
    let mut r = Incoming::new(rsock, leftover);
    let hlen = header_len(neg.extended);
    let result = loop {
        if r.buffered() < hlen || batching.len() >= MAX_BATCH {
            // About to wait for the client (or holding many): send what is done.
            batching.flush();
        }
        let head = match r.header(hlen) {
            Ok(Some(head)) => head,
            Ok(None) => break Ok(()),
            Err(e) => {
                break if e.kind() == io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        };
        let h = match decode_header(head, neg.extended) {
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
        if !budget.fits(cost) || r.buffered() < h.payload as usize {
            // About to wait for replies to go out, or for the client: send what is done.
            batching.flush();
        }
        budget.acquire(cost);
        let payload = match r.payload(h.payload as usize) {
            Ok(p) => p,
            Err(e) => {
                budget.release(cost);
                break Err(e);
            }
        };
        let reply = Replier {
            sink: Arc::clone(&sink),
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
                let done: crate::Done = Box::new(move |res| reply.done(res));
                match payload {
                    Payload::Buffered(data) => disk.write_from(offset, data, fua, done),
                    Payload::Owned(data) => disk.write(offset, data, fua, done),
                }
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
    sink.close();
    let _ = writer_thread.join();
    sink.sock.shutdown(Shutdown::Both);
    result
}

struct Replier {
    sink: Arc<Sink>,
    /// The connection (to tell its reader thread's batch).
    conn: u64,
    writer: ReplyWriter,
    cookie: u64,
    offset: u64,
    cost: u64,
}

impl Replier {
    fn send(self, head: Head, data: Vec<u8>) {
        let out = Outgoing {
            head,
            data,
            cost: self.cost,
        };
        // On this connection's reader thread: into its batch. Anywhere else: sent now.
        let out = BATCH.with(|b| match &mut *b.borrow_mut() {
            Some(batch) if batch.conn == self.conn => {
                batch.replies.push(out);
                None
            }
            _ => Some(out),
        });
        if let Some(out) = out {
            self.sink.submit_one(out);
        }
    }
    fn raw(self, head: Vec<u8>) {
        self.send(Head::Heap(head), Vec::new())
    }
    fn data(self, buf: Vec<u8>) {
        let mut head = Head::fixed();
        self.writer
            .read_header(&mut head, self.cookie, self.offset, buf.len() as u32);
        self.send(head, buf)
    }
    fn error(self, errno: u32, msg: &str) {
        let mut head = Vec::with_capacity(64);
        self.writer
            .error(&mut head, self.cookie, self.offset, errno, msg);
        self.send(Head::Heap(head), Vec::new())
    }
    fn io_error(self, e: &io::Error) {
        self.error(errno_to_nbd(e), &e.to_string())
    }
    fn done(self, r: io::Result<()>) {
        match r {
            Ok(()) => {
                let mut head = Head::fixed();
                self.writer.ok(&mut head, self.cookie, self.offset);
                self.send(head, Vec::new())
            }
            Err(e) => self.io_error(&e),
        }
    }
}

/// The writer thread: sends (blocking) what the socket did not take at once, and everything
/// on TLS, until the connection closes.
fn write_replies(sink: &Sink, s: Stream) {
    let mut w = BufWriter::with_capacity(256 * 1024, s);
    let mut taken = VecDeque::new();
    let mut st = sink.lock();
    loop {
        if st.queue.is_empty() {
            st.writer_busy = false;
            if st.closed {
                break;
            }
            st.writer_waiting = true;
            st = sink.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            st.writer_waiting = false;
            continue;
        }
        // Everything queued, sent outside the lock (others queue behind it meanwhile).
        std::mem::swap(&mut st.queue, &mut taken);
        let skip = std::mem::take(&mut st.sent);
        let broken = st.broken;
        drop(st);
        let mut failed = None;
        if !broken {
            let r = taken
                .iter()
                .enumerate()
                .try_for_each(|(i, o)| {
                    let [h, d] = o.parts(if i == 0 { skip } else { 0 });
                    w.write_all(h)?;
                    w.write_all(d)
                })
                .and_then(|_| w.flush());
            failed = r.err();
        }
        let released: u64 = taken.drain(..).map(|o| o.cost).sum();
        st = sink.lock();
        if let Some(e) = failed {
            tracing::debug!("client went away while replying: {e}");
            st.broken = true;
            sink.sock.shutdown(Shutdown::Both);
        }
        if st.broken {
            // Nothing more goes out: what is queued is dropped.
            let rest: u64 = st.queue.drain(..).map(|o| o.cost).sum();
            st.sent = 0;
            sink.budget.release(released + rest);
        } else {
            sink.budget.release(released);
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

    /// A reader that hands out at most `step` bytes per read, like a socket.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn payloads_take_exactly_their_bytes() {
        // Early bytes from the handshake, then a payload larger than the buffer, split over
        // the buffer and the socket behind it, then the next request's bytes.
        let data: Vec<u8> = (0..900_000u32).map(|i| (i % 251) as u8).collect();
        for step in [1000, 65536, 1 << 20] {
            let mut r = Incoming::new(Trickle(&data[1000..], step), data[..1000].to_vec());
            assert_eq!(r.header(28).unwrap().unwrap(), &data[..28]);
            let p = r.payload(300_000).unwrap();
            assert_eq!(&*p, &data[28..300_028]);
            assert!(matches!(p, Payload::Owned(_)), "larger than the buffer");
            assert!(r.payload(0).unwrap().is_empty());
            assert_eq!(r.header(4).unwrap().unwrap(), &data[300_028..300_032]);
            let p = r.payload(599_968).unwrap();
            assert_eq!(&*p, &data[300_032..]);
            assert!(
                r.header(28).unwrap().is_none(),
                "a clean end between requests"
            );
        }
    }

    #[test]
    fn small_payloads_read_already_are_borrowed_and_the_next_request_follows() {
        // Requests of a header and a 4 KiB payload, back to back, arriving in pieces of
        // various sizes: each payload is exactly its bytes, borrowed where one recv brought
        // it in whole, and the stream stays in step.
        let mut data = Vec::new();
        for i in 0..200u32 {
            data.extend_from_slice(&i.to_be_bytes());
            data.extend((0..4096u32).map(|k| (k.wrapping_mul(31) ^ i) as u8));
        }
        for step in [1, 100, 4100, 65536, 1 << 20] {
            let mut r = Incoming::new(Trickle(&data, step), Vec::new());
            let mut borrowed = 0;
            for i in 0..200u32 {
                let h = r.header(4).unwrap().unwrap();
                assert_eq!(h, &i.to_be_bytes());
                let at = i as usize * 4100 + 4;
                let p = r.payload(4096).unwrap();
                assert_eq!(&*p, &data[at..at + 4096], "step {step}, request {i}");
                borrowed += usize::from(matches!(p, Payload::Buffered(_)));
            }
            assert!(r.header(4).unwrap().is_none());
            if step >= 65536 {
                assert!(borrowed > 150, "step {step}: only {borrowed} borrowed");
            }
        }
    }

    #[test]
    fn a_request_cut_short_is_unexpected_eof() {
        let data = [7u8; 100];
        let e = Incoming::new(Trickle(&data, 10), Vec::new())
            .payload(4096)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("100 of a 4096-byte"), "{e}");
        let mut r = Incoming::new(Trickle(&data[..20], 10), Vec::new());
        let e = r.header(28).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn fixed_reply_headers_fit_inline_in_every_style() {
        use crate::reply::ReplyMode;
        for mode in [
            ReplyMode::Simple,
            ReplyMode::Structured,
            ReplyMode::Extended,
        ] {
            let w = ReplyWriter { mode };
            let (mut a, mut b) = (Head::fixed(), Vec::new());
            w.read_header(&mut a, 7, u64::MAX, u32::MAX);
            w.read_header(&mut b, 7, u64::MAX, u32::MAX);
            assert!(matches!(a, Head::Fixed { .. }), "{mode:?}");
            assert_eq!(a.as_slice(), &b[..]);
            let (mut a, mut b) = (Head::fixed(), Vec::new());
            w.ok(&mut a, 7, 4096);
            w.ok(&mut b, 7, 4096);
            assert!(matches!(a, Head::Fixed { .. }), "{mode:?}");
            assert_eq!(a.as_slice(), &b[..]);
        }
        // Anything longer moves to the heap, whole.
        let mut h = Head::fixed();
        h.put(&[1; 30]);
        h.put(&[2; 30]);
        assert!(matches!(h, Head::Heap(_)));
        assert_eq!(h.as_slice(), [[1u8; 30], [2; 30]].concat());
    }
}
