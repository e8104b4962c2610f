//! Append-only log files (the undo logs), written with direct I/O where the filesystem allows
//! it.
//!
//! A cycle's undo log is written once and read back rarely (a rollback, an export, a test
//! failover); through the page cache each 4 KiB would also cost a freshly allocated page and
//! evict what the host caches for others. The writer therefore gathers appended records in an
//! aligned buffer and writes whole aligned blocks with `O_DIRECT`; [`LogWriter::flush`] writes
//! the partial last block too, zero-padded, and leaves the padding in the file: a scan stops at
//! it as at any torn tail (records carry a magic and a checksum, and zeroes are neither), and
//! [`LogWriter::trim`] cuts the file back to the log's length when the log is finished, so a
//! finished log ends at its footer. (Trimming at every flush cost a size change, undone by the
//! next flush's write, per batch of a receiving cycle: about a quarter of the receive
//! pipeline's time in a 1 GiB cycle.) The block holding the end of the log is kept in memory
//! and rewritten with the records that follow it: its flushed prefix is rewritten byte for
//! byte, so a torn rewrite cannot damage a flushed record.
//!
//! A failed write (a full disk) leaves the log's end unknown (a record may be half in the
//! file), so the writer refuses everything after it: callers reopen the log, whose scan keeps
//! what reached the file. (Writing only the full blocks on a thread of their own measured no
//! faster on a 1 GiB cycle; the write-behind mode below moves the blocks, the last block's
//! flushes and the syncs together: `benches/results/cycle-writebehind-2026-12-05.md`.)
//!
//! Where direct I/O is refused (tmpfs, some FUSE filesystems) records are written as they are
//! appended, through the page cache.
//!
//! In write-behind mode ([`LogWriter::write_behind`], a receiving cycle's undo log) the blocks'
//! writes and the syncs run on a thread of their own, in the order they were asked for, so the
//! appender goes on (reading and compressing the next batch's old contents) while the disk
//! takes the last batch's log: [`LogWriter::sync_later`] answers once everything appended
//! before it is durable. Syncs that queue up while one runs are answered by one fdatasync
//! (group commit). Each write owns a copy of its bytes; up to [`SPARE`] of the copies' buffers
//! come back to be reused, and the queue is bounded, so at most [`BEHIND_QUEUE`] blocks wait.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use vmreplica_common::direct::{self, ALIGN};

/// Bytes gathered before a direct write: large writes keep the disk streaming.
const BLOCK: usize = 4 << 20;
/// Writes (each at most a [`BLOCK`]) and syncs queued for the write-behind thread, at most:
/// the appender waits beyond.
const BEHIND_QUEUE: usize = 8;
/// Queued items the write-behind thread takes in one round, at most.
const GROUP: usize = 64;
/// Written buffers kept for reuse, at most (each up to a [`BLOCK`]).
const SPARE: usize = 3;

/// What the write-behind thread is asked to do, in order.
enum Work {
    /// Write `buf[at..]` at `offset`.
    Write {
        buf: Vec<u8>,
        at: usize,
        offset: u64,
    },
    /// Answer once everything written before is durable.
    Sync(mpsc::Sender<io::Result<()>>),
}

/// A write-behind thread and its queue.
struct Behind {
    tx: Option<SyncSender<Work>>,
    /// Buffers the thread has written, for reuse.
    spare: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Behind {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `data` at `offset`, direct while the filesystem takes it, else through the page
/// cache (from then on).
fn write_either(
    file: &File,
    direct: &mut Option<File>,
    data: &[u8],
    offset: u64,
) -> io::Result<()> {
    if let Some(d) = direct {
        match d.write_all_at(data, offset) {
            Err(e) if direct::is_refusal(&e) => {
                tracing::debug!("direct writes refused ({e}); log written buffered");
                *direct = None;
            }
            r => return r,
        }
    }
    file.write_all_at(data, offset)
}

/// The write-behind thread: writes and syncs in the order asked. Each round takes everything
/// queued (up to [`GROUP`] items): the writes ahead of the last sync among them, then one
/// fdatasync answers every sync of the round; writes behind that sync wait for the next
/// round, so they never delay its answer. After a failed write or sync (the log's end
/// unknown) it writes nothing more; a sync asked for before the failure is still answered by
/// its own fdatasync, every later one with the failure.
fn behind(file: File, mut direct: Option<File>, rx: Receiver<Work>, spare: SyncSender<Vec<u8>>) {
    let mut failed: Option<(io::ErrorKind, String)> = None;
    let mut queued = VecDeque::new();
    loop {
        if queued.is_empty() {
            match rx.recv() {
                Ok(w) => queued.push_back(w),
                Err(_) => return,
            }
        }
        while queued.len() < GROUP {
            match rx.try_recv() {
                Ok(w) => queued.push_back(w),
                Err(_) => break,
            }
        }
        let round = queued
            .iter()
            .rposition(|w| matches!(w, Work::Sync(_)))
            .map_or(queued.len(), |last| last + 1);
        // Each sync's answer, and the failure that came before it (if any).
        let mut replies = Vec::new();
        for w in queued.drain(..round) {
            match w {
                Work::Write { buf, at, offset } => {
                    if failed.is_none() {
                        if let Err(e) = write_either(&file, &mut direct, &buf[at..], offset) {
                            failed = Some((e.kind(), format!("writing at {offset}: {e}")));
                        }
                    }
                    let _ = spare.try_send(buf);
                }
                Work::Sync(reply) => replies.push((reply, failed.clone())),
            }
        }
        if replies.is_empty() {
            continue;
        }
        let synced = if replies.iter().any(|(_, before)| before.is_none()) {
            file.sync_data()
        } else {
            Ok(())
        };
        if let Err(e) = &synced {
            failed = failed.or(Some((e.kind(), format!("fdatasync: {e}"))));
        }
        for (reply, before) in replies {
            let _ = reply.send(match (before, &synced) {
                (Some((kind, msg)), _) => Err(io::Error::new(
                    kind,
                    format!("an earlier write or sync failed: {msg}"),
                )),
                (None, Err(e)) => Err(io::Error::new(e.kind(), format!("fdatasync: {e}"))),
                (None, Ok(())) => Ok(()),
            });
        }
    }
}

pub(crate) struct LogWriter {
    file: File,
    direct: Option<File>,
    /// Direct mode: the log's bytes from `base` on, from `buf[at]`.
    buf: Vec<u8>,
    at: usize,
    /// Aligned file offset of `buf[at]`.
    base: u64,
    /// Bytes of the log held in `buf`, and how many of them are in the file already.
    fill: usize,
    flushed: usize,
    /// A write failed: the log's end is unknown, so the writer refuses everything after
    /// (callers reopen the log, whose scan finds what reached the file).
    failed: Option<(io::ErrorKind, String)>,
    /// Bytes written to the file so far (padding and rewritten blocks included).
    written: u64,
    /// Write-behind mode: the thread that writes and syncs.
    behind: Option<Behind>,
}

fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

impl LogWriter {
    /// A writer appending at `len` (the end of the log's intact frames) of `file`, which is
    /// open read-write at `path`.
    pub fn open(file: File, path: &Path, len: u64) -> io::Result<LogWriter> {
        let direct = direct::open(path, true)?;
        let mut w = LogWriter {
            file,
            direct,
            buf: Vec::new(),
            at: 0,
            base: len,
            fill: 0,
            flushed: 0,
            failed: None,
            written: 0,
            behind: None,
        };
        if w.direct.is_some() {
            w.at = direct::aligned(&mut w.buf, BLOCK + ALIGN);
            w.base = len - len % ALIGN as u64;
            w.fill = (len - w.base) as usize;
            w.flushed = w.fill;
            let (at, fill) = (w.at, w.fill);
            w.file.read_exact_at(&mut w.buf[at..at + fill], w.base)?;
        }
        Ok(w)
    }

    /// The log's length: everything appended so far.
    pub fn len(&self) -> u64 {
        self.base + self.fill as u64
    }

    /// Appends `parts` as one piece of the log; returns its length. After an error the writer
    /// is unusable (see `failed`).
    pub fn append(&mut self, parts: &[&[u8]]) -> io::Result<u64> {
        self.check()?;
        for p in parts {
            let r = self.put(p);
            self.poison_on(r)?;
        }
        Ok(parts.iter().map(|p| p.len() as u64).sum())
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(io::Error::new(
                *kind,
                format!("an earlier write failed: {msg}"),
            )),
            None => Ok(()),
        }
    }

    fn poison_on<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.failed = Some((e.kind(), e.to_string()));
        }
        r
    }

    fn put(&mut self, mut p: &[u8]) -> io::Result<()> {
        while !p.is_empty() {
            if self.direct.is_none() {
                self.file.write_all_at(p, self.base)?;
                self.base += p.len() as u64;
                self.written += p.len() as u64;
                return Ok(());
            }
            let n = p.len().min(BLOCK - self.fill);
            let dst = self.at + self.fill;
            self.buf[dst..dst + n].copy_from_slice(&p[..n]);
            self.fill += n;
            p = &p[n..];
            if self.fill == BLOCK {
                self.write_full()?;
            }
        }
        Ok(())
    }

    /// Writes the full buffer direct and continues with an empty one.
    fn write_full(&mut self) -> io::Result<()> {
        if self.write_buf(BLOCK)? {
            self.base += BLOCK as u64;
            self.fill = 0;
            self.flushed = 0;
        }
        Ok(())
    }

    /// Writes the first `n` (aligned) bytes of the buffer direct at `base`, from the aligned
    /// block holding the first byte not flushed yet (those before it are in the file
    /// already: rewriting them at every flush cost up to a whole buffer per undo sync);
    /// true if they went direct. If the filesystem refuses, what the buffer holds is written
    /// through the page cache instead, and so is the rest of the log (false). In write-behind
    /// mode a copy is queued for the writer thread instead (which falls back alike).
    fn write_buf(&mut self, n: usize) -> io::Result<bool> {
        let from = (self.flushed - self.flushed % ALIGN).min(n);
        let data = &self.buf[self.at + from..self.at + n];
        let offset = self.base + from as u64;
        let r = match &self.behind {
            Some(b) => {
                let mut buf = b.spare.try_recv().unwrap_or_default();
                let at = direct::aligned(&mut buf, data.len());
                buf[at..].copy_from_slice(data);
                self.send(Work::Write { buf, at, offset })
            }
            None => {
                let f = self.direct.as_ref().expect("direct mode");
                f.write_all_at(data, offset)
            }
        };
        if r.is_ok() {
            self.written += (n - from) as u64;
        }
        match r {
            Err(e) if direct::is_refusal(&e) => {
                tracing::debug!("direct writes refused ({e}); log written buffered");
                self.direct = None;
                let data = &self.buf[self.at..self.at + self.fill];
                self.file.write_all_at(data, self.base)?;
                self.written += data.len() as u64;
                self.base += self.fill as u64;
                self.fill = 0;
                self.flushed = 0;
                Ok(false)
            }
            r => r.map(|()| true),
        }
    }

    /// Writes everything appended so far to the file (not yet durable: see
    /// [`LogWriter::sync`]).
    pub fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        let r = self.flush_inner();
        self.poison_on(r)
    }

    fn flush_inner(&mut self) -> io::Result<()> {
        if self.direct.is_none() || self.fill == self.flushed {
            return Ok(());
        }
        let n = round_up(self.fill);
        let tail = self.at + self.fill;
        self.buf[tail..self.at + n].fill(0);
        if self.write_buf(n)? {
            self.flushed = self.fill;
        }
        Ok(())
    }

    /// Writes everything appended and cuts the file back to the log's length (the padding of
    /// the last block is not part of the log): for a log that is finished.
    pub fn trim(&mut self) -> io::Result<()> {
        if self.behind.is_some() {
            // The writes queued must land first, or one would grow the file again.
            self.sync()?;
        }
        self.flush()?;
        let r = self.file.set_len(self.len());
        self.poison_on(r)
    }

    /// A sync asked for with [`LogWriter::sync_later`] failed: what reached the disk is
    /// unknown, so the writer refuses everything after, as after a failed [`LogWriter::sync`].
    pub fn poison(&mut self, e: &io::Error) {
        if self.failed.is_none() {
            self.failed = Some((e.kind(), e.to_string()));
        }
    }

    /// Bytes written to the file so far: what was appended, plus the padding of partial
    /// blocks and the block holding the end of what was flushed, rewritten.
    #[cfg(test)]
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        let r = match self.sync_later() {
            Ok(rx) => rx.recv().unwrap_or_else(|_| Err(stopped())),
            Err(e) => Err(e),
        };
        self.poison_on(r)
    }

    /// Switches to write-behind mode (see the module doc); nothing if it is on already.
    pub fn write_behind(&mut self) -> io::Result<()> {
        if self.behind.is_some() {
            return Ok(());
        }
        self.check()?;
        let file = self.file.try_clone()?;
        let direct = match &self.direct {
            Some(d) => Some(d.try_clone()?),
            None => None,
        };
        let (tx, rx) = mpsc::sync_channel(BEHIND_QUEUE);
        let (spare_tx, spare) = mpsc::sync_channel(SPARE);
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || behind(file, direct, rx, spare_tx))?;
        self.behind = Some(Behind {
            tx: Some(tx),
            spare,
            thread: Some(thread),
        });
        Ok(())
    }

    fn send(&self, w: Work) -> io::Result<()> {
        let tx = self.behind.as_ref().and_then(|b| b.tx.as_ref());
        tx.ok_or_else(stopped)?.send(w).map_err(|_| stopped())
    }

    /// Makes everything appended so far durable: in write-behind mode on its thread, and the
    /// answer comes on the returned channel (the caller [`LogWriter::poison`]s the writer if
    /// it is a failure); otherwise here, the answer already in the channel.
    pub fn sync_later(&mut self) -> io::Result<Receiver<io::Result<()>>> {
        self.flush()?;
        let (tx, rx) = mpsc::channel();
        if self.behind.is_some() {
            // Buffered appends were written already: the sync covers them too.
            let r = self.send(Work::Sync(tx));
            self.poison_on(r)?;
        } else {
            let r = self.file.sync_data();
            let r = self.poison_on(r);
            let _ = tx.send(r);
        }
        Ok(rx)
    }
}

fn stopped() -> io::Error {
    io::Error::other("the log's writer thread stopped")
}

impl Drop for LogWriter {
    /// What was appended reaches the file (not durably), as unbuffered appends would have.
    fn drop(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.trim() {
                tracing::warn!("log file: the last appends were not written: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn rw(p: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap()
    }

    fn pieces(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                (0..(i % 7 + 1) * 37_000)
                    .map(|j| (j * i % 253) as u8)
                    .collect()
            })
            .collect()
    }

    /// The file at `p` is the log `expect`, then at most the zero padding of its last
    /// aligned block (a flushed, untrimmed log).
    fn assert_log_then_padding(p: &Path, expect: &[u8]) {
        let got = std::fs::read(p).unwrap();
        assert!(
            got.len() >= expect.len(),
            "the file is shorter than the log"
        );
        assert!(
            got.len() <= round_up(expect.len()),
            "{} bytes of padding",
            got.len() - expect.len()
        );
        assert!(got[..expect.len()] == *expect, "the file is not the log");
        assert!(
            got[expect.len()..].iter().all(|&b| b == 0),
            "the padding is not zeroes"
        );
    }

    /// On /var/tmp (a disk filesystem: direct I/O) and on the tmpfs-or-not /tmp alike, written
    /// here or behind, the log is the pieces back to back, whatever was flushed when.
    #[test]
    fn appended_pieces_read_back_and_the_file_ends_at_the_log() {
        for (root, behind) in [
            ("/var/tmp", false),
            ("/tmp", false),
            ("/var/tmp", true),
            ("/tmp", true),
        ] {
            let dir = tempfile::tempdir_in(root).unwrap();
            let p = dir.path().join("log");
            let mut expect = Vec::new();
            let mut w = LogWriter::open(rw(&p), &p, 0).unwrap();
            if behind {
                w.write_behind().unwrap();
            }
            for (i, piece) in pieces(300).iter().enumerate() {
                expect.extend_from_slice(piece);
                w.append(&[&piece[..10], &piece[10..]]).unwrap();
                if i % 37 == 0 {
                    // Behind, what a sync answered for is in the file.
                    if behind {
                        w.sync_later().unwrap().recv().unwrap().unwrap();
                    } else {
                        w.flush().unwrap();
                    }
                    assert_log_then_padding(&p, &expect);
                }
                if i == 150 {
                    // Reopened mid-log (as after a restart): appends continue at the end.
                    w.sync().unwrap();
                    let len = w.len();
                    drop(w);
                    w = LogWriter::open(rw(&p), &p, len).unwrap();
                    if behind {
                        w.write_behind().unwrap();
                    }
                }
            }
            w.sync().unwrap();
            assert_eq!(w.len(), expect.len() as u64);
            assert_log_then_padding(&p, &expect);
            // Trimmed (a finished log), the file ends at the log.
            w.trim().unwrap();
            assert!(std::fs::read(&p).unwrap() == expect, "{root}");
        }
    }

    /// A flush writes what was appended since the last one (from the aligned block holding
    /// its start), not the whole buffer again: a cycle's undo log is flushed once per batch,
    /// and batches of hole entries append a few hundred bytes each.
    #[test]
    fn a_flush_writes_only_what_is_new() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("log");
        let mut w = LogWriter::open(rw(&p), &p, 0).unwrap();
        if w.direct.is_none() {
            direct::unavailable("the page-cache path writes each append once anyway");
            return;
        }
        let big = vec![7u8; 3 << 20];
        w.append(&[&big]).unwrap();
        w.flush().unwrap();
        let after_big = w.written();
        assert!(after_big >= big.len() as u64);
        let mut expect = big.clone();
        for i in 0..100u32 {
            let small = [i.to_le_bytes(), [9; 4]].concat();
            w.append(&[&small]).unwrap();
            expect.extend_from_slice(&small);
            w.flush().unwrap();
        }
        // Each flush rewrites at most the block (or two) holding the new bytes.
        let more = w.written() - after_big;
        assert!(
            more <= 100 * 2 * ALIGN as u64,
            "100 flushes of 8 bytes wrote {more} bytes"
        );
        w.sync().unwrap();
        assert_log_then_padding(&p, &expect);
        // And across a full block: the log is still the pieces back to back.
        let tail = vec![3u8; 2 << 20];
        w.append(&[&tail]).unwrap();
        expect.extend_from_slice(&tail);
        w.sync().unwrap();
        assert_log_then_padding(&p, &expect);
        w.trim().unwrap();
        assert!(std::fs::read(&p).unwrap() == expect);
    }

    /// A crash (the writer vanishes without flushing) keeps everything synced before it and
    /// whole blocks written since: the file is a prefix of the log. Written here or behind.
    #[test]
    fn a_crash_keeps_a_prefix_of_the_log() {
        for behind in [false, true] {
            crash_keeps_a_prefix(behind);
        }
    }

    fn crash_keeps_a_prefix(behind: bool) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("log");
        let all = pieces(200);
        let mut w = LogWriter::open(rw(&p), &p, 0).unwrap();
        if behind {
            w.write_behind().unwrap();
        }
        let mut expect = Vec::new();
        for piece in &all[..50] {
            w.append(&[piece]).unwrap();
            expect.extend_from_slice(piece);
        }
        w.sync().unwrap();
        let synced = expect.len();
        for piece in &all[50..] {
            w.append(&[piece]).unwrap();
            expect.extend_from_slice(piece);
        }
        std::mem::forget(w);
        let got = std::fs::read(&p).unwrap();
        assert!(got.len() >= synced && got.len() < expect.len());
        assert!(got[..] == expect[..got.len()]);
    }

    /// A write that fails (here: /dev/full, as a full disk) leaves the writer refusing every
    /// later append and flush with the same kind of error, never a log with a hole in it.
    #[test]
    fn after_a_failed_write_the_writer_refuses_everything() {
        let p = Path::new("/dev/full");
        let mut w = LogWriter::open(rw(p), p, 0).unwrap();
        let big = vec![7u8; BLOCK + 100];
        let e = w.append(&[&big]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        let e = w.append(&[b"more"]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        assert!(e.to_string().contains("earlier write failed"), "{e}");
        assert_eq!(w.flush().unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert!(w.sync().is_err());
    }

    /// Behind, each sync is answered only once everything appended before it is in the file,
    /// whether it is waited for at once or among many asked for in a row; dropping the
    /// writer waits for what is queued.
    #[test]
    fn syncs_behind_answer_for_everything_appended_before_them() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("log");
        let mut w = LogWriter::open(rw(&p), &p, 0).unwrap();
        w.write_behind().unwrap();
        let mut expect = Vec::new();
        let check = |expect: &[u8]| {
            let got = std::fs::read(&p).unwrap();
            assert!(got.len() >= expect.len() && got[..expect.len()] == *expect);
        };
        for piece in pieces(40) {
            w.append(&[&piece]).unwrap();
            expect.extend_from_slice(&piece);
            w.sync_later().unwrap().recv().unwrap().unwrap();
            check(&expect);
        }
        let mut asked = Vec::new();
        for piece in pieces(120) {
            w.append(&[&piece]).unwrap();
            expect.extend_from_slice(&piece);
            asked.push((w.sync_later().unwrap(), expect.len()));
        }
        for (rx, len) in asked {
            rx.recv().unwrap().unwrap();
            check(&expect[..len]);
        }
        let tail = vec![5u8; BLOCK + 3];
        w.append(&[&tail]).unwrap();
        expect.extend_from_slice(&tail);
        drop(w);
        assert!(std::fs::read(&p).unwrap() == expect);
    }

    /// A tmpfs of `size` at a new directory under `dir`, unmounted when dropped (needs root,
    /// as the suite's FUSE tests do). Its files take direct I/O on this kernel, and it fills
    /// up for real.
    struct SmallFs(std::path::PathBuf);

    impl SmallFs {
        fn mount(dir: &Path, size: &str) -> SmallFs {
            let mnt = dir.join("small");
            std::fs::create_dir(&mnt).unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "logfile-test"])
                .arg(&mnt)
                .status()
                .unwrap();
            assert!(st.success(), "mounting a small tmpfs (needs root)");
            SmallFs(mnt)
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// Behind, a write that fails on the writer's thread (a full tmpfs of 2 MiB: the failure
    /// comes from the thread, not from the append) is answered to the sync that covers it,
    /// and the writer poisoned with it refuses every later append, flush and sync.
    #[test]
    fn a_write_that_fails_behind_fails_its_sync_and_everything_after() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let fs = SmallFs::mount(dir.path(), "2m");
        let p = fs.0.join("log");
        let mut w = LogWriter::open(rw(&p), &p, 0).unwrap();
        assert!(w.direct.is_some(), "tmpfs takes direct I/O on this kernel");
        w.write_behind().unwrap();
        let big = vec![7u8; BLOCK + 100];
        w.append(&[&big]).unwrap();
        let rx = w.sync_later().unwrap();
        let e = rx.recv().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        w.poison(&e);
        let e = w.append(&[b"more"]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        assert!(w.flush().is_err());
        assert!(w.sync().is_err());
        assert!(w.sync_later().is_err());
        drop(w);
    }

    /// One round of the write-behind thread: a sync is answered for what was queued before
    /// it, not failed by a write queued behind it, even when both are taken in one round;
    /// a sync behind the failed write gets the failure.
    #[test]
    fn a_sync_answers_for_the_writes_before_it_only() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let fs = SmallFs::mount(dir.path(), "2m");
        let p = fs.0.join("log");
        let file = rw(&p);
        let direct = direct::open(&p, true).unwrap();
        let block = |len: usize, byte: u8| {
            let mut buf = Vec::new();
            let at = direct::aligned(&mut buf, len);
            buf[at..].fill(byte);
            (buf, at)
        };
        let (tx, rx) = mpsc::sync_channel(8);
        let (spare_tx, _spare) = mpsc::sync_channel(8);
        let (s1, a1) = mpsc::channel();
        let (s2, a2) = mpsc::channel();
        let (buf, at) = block(1 << 20, 1);
        tx.send(Work::Write { buf, at, offset: 0 }).unwrap();
        tx.send(Work::Sync(s1)).unwrap();
        let (buf, at) = block(BLOCK, 2);
        tx.send(Work::Write {
            buf,
            at,
            offset: 1 << 20,
        })
        .unwrap();
        tx.send(Work::Sync(s2)).unwrap();
        drop(tx);
        // Everything is queued before the thread starts: it takes all four in one round.
        behind(file, direct, rx, spare_tx);
        a1.recv().unwrap().unwrap();
        let e = a2.recv().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        let got = std::fs::read(&p).unwrap();
        assert!(got.len() >= 1 << 20 && got[..1 << 20].iter().all(|&b| b == 1));
    }
}
