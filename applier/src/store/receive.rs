//! Receiving a cycle: chunks are applied in place as they arrive, behind the cycle's
//! write-ahead undo log.
//!
//! Per batch of verified chunks (gathered across streams): the parts of their ranges that
//! this cycle has not captured yet are looked up in the log's coverage; their old contents
//! are read (many reads in flight; a hole is recorded as a hole without reading, known from
//! what the pipeline learns of the images' holes once per extent: see `holes`) and
//! appended to the undo log; one fdatasync makes the batch's entries durable, and they are
//! indexed for point views; only then are the new data written into the images (`O_DIRECT`,
//! many writes in flight; zero runs punched). The log's writes and syncs run on its own
//! thread (write-behind, with group commit), so the next batches are captured while a batch
//! waits for its sync; at most [`SYNCING`] batches wait. What is written is recorded as
//! applied once the images are fdatasynced (every 64 MiB, every second, when a stream ends,
//! when a resume or the manifest asks), in the undo log too, so a resume is answered with
//! what is durably applied.
//!
//! A byte is captured at most once per cycle: a resent chunk, a chunk resent after a restart
//! (the log's coverage is rebuilt from the log) or after a reconnect finds its range covered
//! and only writes. Each receive attempt has an epoch; a chunk of another epoch (a stale
//! stream of an earlier attempt) is refused before it captures or writes anything.
//!
//! The work runs on one thread per receiving VM (the pipeline), fed through a bounded
//! channel, so data streams never hold the VM's lock and the disk sees one stream of batched
//! log writes and a full queue of image writes.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver as Rx, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmreplica_common::direct;
use vmreplica_common::engine::{Engine, IoBuf, Op};
use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::{Range, RangeSet};
use vmreplica_common::stages::Stages;
use vmreplica_common::wire::{code, CycleKind, Tag};

use super::holes::Holes;
use crate::image::{shared_engine, Buffers, Image, ImageWriter};
use crate::undo::{Entry, LogIndex, UndoLog};

/// The cycle held in part, when no pipeline runs it.
pub(crate) struct Partial {
    pub lineage: Lineage,
    pub cycle: u64,
    pub kind: CycleKind,
    pub epoch: u64,
    /// Whether old contents are captured (not for an initial copy into an empty replica).
    pub capture: bool,
    pub log: UndoLog,
    /// Ranges durably applied.
    pub applied: RangeSet,
    /// The log's entries, for point views.
    pub index: Arc<LogIndex>,
}

impl Partial {
    fn tag(&self) -> Tag {
        Tag {
            lineage: self.lineage,
            cycle: self.cycle,
            epoch: self.epoch,
        }
    }
}

/// Why a chunk or a receive operation failed, for the peer (a wire error code and message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: u16,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    fn io(vm: &str, what: &str, e: &io::Error) -> Failure {
        let full = e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull;
        Failure {
            code: if full { code::NO_SPACE } else { code::INTERNAL },
            message: if full {
                format!("no space left for VM {vm}: {what}: {e}")
            } else {
                format!("VM {vm}: {what}: {e}")
            },
        }
    }

    pub(crate) fn stopped(vm: &str) -> Failure {
        Failure {
            code: code::STALE,
            message: format!(
                "VM {vm}: no cycle is being received (it was committed, rolled back or restarted)"
            ),
        }
    }
}

/// One verified chunk to apply.
pub struct Job {
    pub tag: Tag,
    pub disk: u16,
    pub offset: u64,
    pub len: u32,
    /// The bytes at `buf[at..]` (an aligned start), or None for zeroes (a hole).
    pub data: Option<(IoBuf, usize)>,
    /// Called once: when the chunk is durably applied, or failed.
    pub done: Box<dyn FnOnce(Result<(), Failure>) + Send>,
}

impl Job {
    fn range(&self) -> Range {
        Range {
            disk: self.disk,
            offset: self.offset,
            len: u64::from(self.len),
        }
    }
}

enum Msg {
    Job(Job),
    /// Make everything written durable and answer with the whole applied set.
    Sync(mpsc::Sender<Result<RangeSet, Failure>>),
    /// Make everything written durable (a stream ended).
    Flush(mpsc::Sender<Result<(), Failure>>),
    /// A new receive attempt: from now on only its chunks are taken.
    Epoch(u64, mpsc::Sender<Result<RangeSet, Failure>>),
    Stop(mpsc::Sender<Result<Partial, Failure>>),
}

/// Where data streams hand verified chunks to a receiving cycle (cheap to clone).
#[derive(Clone)]
pub struct JobSender {
    tx: SyncSender<Msg>,
    vm: String,
}

impl JobSender {
    /// Hands `job` over (waits while the pipeline is full); if no cycle receives any more,
    /// the job fails at once.
    pub fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(Msg::Job(j))) = self.tx.send(Msg::Job(job)) {
            (j.done)(Err(Failure::stopped(&self.vm)));
        }
    }

    /// Waits until everything handed over is durably applied (or failed).
    pub fn flush(&self) -> Result<(), Failure> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| Failure::stopped(&self.vm))?;
        rx.recv()
            .unwrap_or_else(|_| Err(Failure::stopped(&self.vm)))
    }
}

/// A running pipeline.
pub(crate) struct Running {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
    vm: String,
}

/// Chunks queued ahead of the pipeline, at most.
const QUEUE: usize = 64;
/// A batch: at most this many chunks, or bytes.
const BATCH_JOBS: usize = 64;
const BATCH_BYTES: u64 = 32 << 20;
/// Batches waiting for their undo syncs, at most; and more than one only while they hold at
/// most this many bytes (so large chunks keep the memory of one batch waiting).
const SYNCING: usize = 2;
const SYNCING_BYTES: u64 = BATCH_BYTES;
/// What is written becomes durably applied at least this often.
const MARK_BYTES: u64 = 64 << 20;
const MARK_EVERY: Duration = Duration::from_secs(1);

/// The pipeline's stages, timed at debug level (see [`Stages`]): waiting for chunks, a whole
/// batch, and within it the hole checks, old-content reads, undo appends (lz4, and the log's
/// full blocks copied for its writer), flushes (its last block copied, the sync asked for)
/// and the waits for syncs, image
/// write submissions (they wait while the writer's queue is full), and the marks' image
/// syncs and log records; draining writes in flight.
const STAGES: &[&str] = &[
    "idle",
    "batch",
    "holes",
    "old_read",
    "undo_write",
    "undo_sync",
    "img_write",
    "img_sync",
    "mark_log",
    "drain",
    "undo_flush",
];
const IDLE: usize = 0;
const BATCH: usize = 1;
const HOLES: usize = 2;
const OLD_READ: usize = 3;
const UNDO_WRITE: usize = 4;
const UNDO_SYNC: usize = 5;
const IMG_WRITE: usize = 6;
const IMG_SYNC: usize = 7;
const MARK_LOG: usize = 8;
const DRAIN: usize = 9;
const UNDO_FLUSH: usize = 10;

impl Running {
    pub fn start(
        vm: &str,
        dir: PathBuf,
        p: Partial,
        images: Arc<Vec<Image>>,
        buffers: Arc<Buffers>,
    ) -> Running {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer = ImageWriter::new(Arc::clone(&images), buffers);
        let sizes: Vec<u64> = images
            .iter()
            .map(|i| i.file.metadata().map(|m| m.len()).unwrap_or(0))
            .collect();
        #[cfg(test)]
        let durable = p.log.coverage().clone();
        let mut pl = Pipeline {
            holes: sizes.iter().map(|&size| Holes::new(size)).collect(),
            sizes,
            vm: vm.to_string(),
            dir,
            p: Some(p),
            images,
            writer,
            engine: shared_engine(),
            next_token: 0,
            in_flight: HashMap::new(),
            written: RangeSet::new(),
            written_jobs: Vec::new(),
            unmarked: 0,
            last_mark: Instant::now(),
            failed: None,
            pending: None,
            syncing: VecDeque::new(),
            syncing_bytes: 0,
            #[cfg(test)]
            durable,
            stages: Stages::new(STAGES, tracing::enabled!(tracing::Level::DEBUG)),
        };
        let thread = std::thread::Builder::new()
            .name(format!("receive-{vm}"))
            .spawn(move || pl.run(rx))
            .expect("spawning a receive thread");
        Running {
            tx,
            thread: Some(thread),
            vm: vm.to_string(),
        }
    }

    pub fn sender(&self) -> JobSender {
        JobSender {
            tx: self.tx.clone(),
            vm: self.vm.clone(),
        }
    }

    fn ask<T>(
        &self,
        msg: impl FnOnce(mpsc::Sender<Result<T, Failure>>) -> Msg,
    ) -> Result<T, Failure> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(msg(tx))
            .map_err(|_| Failure::stopped(&self.vm))?;
        rx.recv()
            .unwrap_or_else(|_| Err(Failure::stopped(&self.vm)))
    }

    /// Makes everything written durable; the whole applied set.
    pub fn sync(&self) -> Result<RangeSet, Failure> {
        self.ask(Msg::Sync)
    }

    /// Switches to receive attempt `epoch`; the applied set.
    pub fn epoch(&self, epoch: u64) -> Result<RangeSet, Failure> {
        self.ask(|tx| Msg::Epoch(epoch, tx))
    }

    /// Stops the pipeline once everything handed over is written and durable.
    pub fn stop(mut self) -> Result<Partial, Failure> {
        let r = self.ask(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        r
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let (tx, _rx) = mpsc::channel();
            let _ = self.tx.send(Msg::Stop(tx));
            let _ = t.join();
        }
    }
}

type Done = Box<dyn FnOnce(Result<(), Failure>) + Send>;

struct Pipeline {
    /// Each image's size: chunks must fall inside.
    sizes: Vec<u64>,
    /// What is known of each image's holes, for the capture: learnt as this pipeline asks,
    /// and true for what it asks while it runs (see `holes`). A new pipeline (a restart, a
    /// new cycle, an attempt after a failure or a rollback) knows nothing.
    holes: Vec<Holes>,
    vm: String,
    dir: PathBuf,
    /// Always Some until stopped.
    p: Option<Partial>,
    images: Arc<Vec<Image>>,
    writer: ImageWriter,
    engine: Arc<dyn Engine>,
    next_token: u64,
    in_flight: HashMap<u64, (Range, Done)>,
    /// Written (the writes finished), not yet durable.
    written: RangeSet,
    written_jobs: Vec<Done>,
    unmarked: u64,
    last_mark: Instant,
    /// A write or sync failed: everything after gets this, until the cycle is reopened.
    failed: Option<Failure>,
    /// A message taken while gathering a batch, handled next.
    pending: Option<Msg>,
    /// Batches whose undo entries are being made durable (oldest first, as the log's
    /// write-behind thread answers): each one's image writes are issued once they are, while
    /// the next batches are captured.
    syncing: VecDeque<Syncing>,
    /// The chunk bytes those batches hold.
    syncing_bytes: u64,
    /// Test builds: the ranges whose undo entries are durable, which an image write must
    /// fall in (the write-ahead order).
    #[cfg(test)]
    durable: RangeSet,
    stages: Stages,
}

/// Reads of old contents in flight: each answers with its index, outcome, buffer and where
/// in it the bytes start (the channel ends when all have answered).
type ReadsInFlight = mpsc::Receiver<(usize, io::Result<()>, Vec<u8>, usize)>;

/// A batch waiting for its undo log sync.
struct Syncing {
    done: mpsc::Receiver<io::Result<()>>,
    jobs: Vec<Job>,
    entries: Vec<Entry>,
    bytes: u64,
}

impl Pipeline {
    fn p(&mut self) -> &mut Partial {
        self.p
            .as_mut()
            .expect("the pipeline holds its cycle until stopped")
    }

    fn run(&mut self, rx: Rx<Msg>) {
        if self.p().capture {
            // The log's blocks are written and synced behind the capture of the next batches.
            if let Err(e) = self.p().log.write_behind() {
                tracing::debug!(vm = %self.vm, "undo log written inline ({e})");
            }
        }
        self.run_loop(rx);
    }

    /// The next message, waiting for it at most [`MARK_EVERY`] (timed as idle).
    fn wait(&self, rx: &Rx<Msg>) -> Result<Msg, RecvTimeoutError> {
        let t = self.stages.begin();
        let r = rx.recv_timeout(MARK_EVERY);
        self.stages.add(IDLE, t);
        r
    }

    fn run_loop(&mut self, rx: Rx<Msg>) {
        loop {
            // Batches waiting for their syncs are written before waiting for more work.
            let next = match (self.pending.take(), self.syncing.is_empty()) {
                (Some(m), _) => Some(m),
                (None, false) => match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => {
                        self.write_oldest();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => None,
                },
                (None, true) => None,
            };
            let msg = match next {
                Some(m) => m,
                None => match self.wait(&rx) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = self.flush();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = self.flush();
                        return;
                    }
                },
            };
            match msg {
                Msg::Job(j) => {
                    let mut bytes = u64::from(j.len);
                    let mut batch = vec![j];
                    while batch.len() < BATCH_JOBS && bytes < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(Msg::Job(j)) => {
                                bytes += u64::from(j.len);
                                batch.push(j);
                            }
                            Ok(other) => {
                                self.pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let t = self.stages.begin();
                    self.stages.depth(BATCH, batch.len() as u64);
                    self.batch(batch);
                    self.stages.add(BATCH, t);
                }
                Msg::Sync(reply) => {
                    let r = self.flush().map(|()| self.p().applied.clone());
                    let _ = reply.send(r);
                }
                Msg::Flush(reply) => {
                    let _ = reply.send(self.flush());
                }
                Msg::Epoch(e, reply) => {
                    let r = self.flush().map(|()| {
                        self.p().epoch = e;
                        self.p().applied.clone()
                    });
                    let _ = reply.send(r);
                }
                Msg::Stop(reply) => {
                    let r = self.flush();
                    if self.stages.on() {
                        let hole_seeks: u64 = self.holes.iter().map(Holes::seeks).sum();
                        tracing::debug!(vm = %self.vm, ms = self.stages.elapsed_ms(), hole_seeks, stages = %self.stages.summary(), "receive pipeline stopped");
                    }
                    let p = self.p.take().expect("stopped once");
                    let _ = reply.send(r.map(|()| p));
                    // Anything still queued was handed over after the stop.
                    while let Ok(m) = rx.try_recv() {
                        if let Msg::Job(j) = m {
                            (j.done)(Err(Failure::stopped(&self.vm)));
                        }
                    }
                    return;
                }
            }
        }
    }

    fn fail(&mut self, f: Failure) {
        if self.failed.is_none() {
            tracing::warn!(vm = %self.vm, "the cycle being received stops after an error ({f}); it resumes from what is durable");
            self.failed = Some(f);
        }
    }

    fn batch(&mut self, jobs: Vec<Job>) {
        let tag = self.p().tag();
        let mut accepted = Vec::with_capacity(jobs.len());
        for j in jobs {
            if let Some(f) = &self.failed {
                (j.done)(Err(f.clone()));
            } else if j.len == 0 {
                // Nothing to write: a write of nothing would fail (EINVAL) and with it the
                // whole cycle.
                let f = Failure {
                    code: code::BAD_DATA,
                    message: format!(
                        "VM {}: chunk at {} of disk {} has no bytes",
                        self.vm, j.offset, j.disk
                    ),
                };
                (j.done)(Err(f));
            } else if self.sizes.get(j.disk as usize).is_none_or(|size| {
                j.offset
                    .checked_add(u64::from(j.len))
                    .is_none_or(|e| e > *size)
            }) {
                let f = Failure {
                    code: code::BAD_DATA,
                    message: format!(
                        "VM {}: chunk {}+{} of disk {} is outside the replica",
                        self.vm, j.offset, j.len, j.disk
                    ),
                };
                (j.done)(Err(f));
            } else if j.tag != tag {
                let f = Failure {
                    code: code::STALE,
                    message: format!(
                        "VM {}: chunk of cycle {} attempt {} is stale: the replica receives cycle {} attempt {} now",
                        self.vm, j.tag.cycle, j.tag.epoch, tag.cycle, tag.epoch
                    ),
                };
                (j.done)(Err(f));
            } else {
                accepted.push(j);
            }
        }
        if accepted.is_empty() {
            return;
        }
        let captured = if self.p().capture {
            // Batches before are written while this one's old contents are read, as their
            // syncs answer: they write only ranges captured already, which this capture does
            // not read.
            match self.capture(&accepted, Self::write_ready) {
                Ok(c) => c,
                Err(f) => {
                    self.fail(f.clone());
                    for j in accepted {
                        (j.done)(Err(f.clone()));
                    }
                    return;
                }
            }
        } else {
            None
        };
        match captured {
            // Entries queued for writing, their sync asked for: this batch is written once
            // that sync answered. At most SYNCING batches (and one past SYNCING_BYTES) wait.
            Some((done, entries)) => {
                let bytes = accepted.iter().map(|j| u64::from(j.len)).sum();
                self.syncing.push_back(Syncing {
                    done,
                    jobs: accepted,
                    entries,
                    bytes,
                });
                self.syncing_bytes += bytes;
                while self.syncing.len() > SYNCING
                    || (self.syncing.len() > 1 && self.syncing_bytes > SYNCING_BYTES)
                {
                    self.write_oldest();
                }
                self.write_ready();
            }
            // Nothing to capture: the ranges are covered, maybe by entries not durable yet.
            None => {
                self.write_all_synced();
                self.write_jobs(accepted);
            }
        }
        let done = self.writer.take_done();
        self.finished(done);
        if self.unmarked >= MARK_BYTES || self.last_mark.elapsed() >= MARK_EVERY {
            let _ = self.mark();
        }
    }

    /// Issues the image writes of `jobs` (their undo entries are durable).
    fn write_jobs(&mut self, jobs: Vec<Job>) {
        let t = self.stages.begin();
        for j in jobs {
            if let Some(f) = &self.failed {
                (j.done)(Err(f.clone()));
                continue;
            }
            #[cfg(test)]
            assert!(
                !self.p.as_ref().is_some_and(|p| p.capture)
                    || self.durable.contains(j.disk, j.offset, j.range().end()),
                "an image write of {:?} before its undo entries are durable",
                j.range()
            );
            let token = self.next_token;
            self.next_token += 1;
            self.in_flight.insert(token, (j.range(), j.done));
            self.writer.write(token, j.disk, j.offset, j.len, j.data);
        }
        self.stages.add(IMG_WRITE, t);
    }

    /// Waits for the undo sync of the oldest batch waiting for one, if any; then writes it
    /// (see [`Pipeline::write_batch`]).
    fn write_oldest(&mut self) {
        let Some(s) = self.syncing.pop_front() else {
            return;
        };
        let t = self.stages.begin();
        let r = s
            .done
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the undo log's writer stopped")));
        self.stages.add(UNDO_SYNC, t);
        self.write_batch(s, r);
    }

    /// Writes every batch whose undo sync has answered already (oldest first), without
    /// waiting.
    fn write_ready(&mut self) {
        while let Some(r) = self.syncing.front().and_then(|s| match s.done.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                Some(Err(io::Error::other("the undo log's writer stopped")))
            }
        }) {
            let s = self.syncing.pop_front().expect("front");
            self.write_batch(s, r);
        }
    }

    /// Waits for every batch's undo sync and writes them.
    fn write_all_synced(&mut self) {
        while !self.syncing.is_empty() {
            self.write_oldest();
        }
    }

    /// A batch's undo sync answered `r`: indexes its entries for point views and issues its
    /// image writes (or fails it, if the sync failed).
    fn write_batch(&mut self, s: Syncing, r: io::Result<()>) {
        self.syncing_bytes -= s.bytes;
        if let Err(e) = r {
            let vm = self.vm.clone();
            let p = self.p();
            p.log.poison(&e);
            let path = p.log.path().display().to_string();
            let f = Failure::io(&vm, &format!("syncing the undo log {path}"), &e);
            self.fail(f.clone());
            for j in s.jobs {
                (j.done)(Err(f.clone()));
            }
            return;
        }
        self.p().index.insert(&s.entries);
        #[cfg(test)]
        for e in &s.entries {
            self.durable.insert(e.disk, e.offset, e.end());
        }
        self.write_jobs(s.jobs);
    }

    /// Captures the old contents of the parts of `jobs`' ranges not captured yet: appends
    /// them to the undo log, whose writer writes and syncs them behind. If there were any,
    /// returns their entries and where the sync that makes them durable will answer (made
    /// here if the log has no writer thread): the jobs' image writes wait for that answer,
    /// and the entries are indexed for point views once it comes.
    /// `meanwhile` runs once the reads are in flight (or when nothing is read).
    #[allow(clippy::type_complexity)]
    fn capture(
        &mut self,
        jobs: &[Job],
        meanwhile: impl FnOnce(&mut Self),
    ) -> Result<Option<(mpsc::Receiver<io::Result<()>>, Vec<Entry>)>, Failure> {
        let vm = self.vm.clone();
        let mut planned = RangeSet::new();
        let mut holes = Vec::new();
        let mut reads = Vec::new();
        let t = self.stages.begin();
        for j in jobs {
            let r = j.range();
            for (s, e) in self.p().log.coverage().uncovered(r.disk, r.offset, r.end()) {
                for (s, e) in planned.uncovered(r.disk, s, e) {
                    planned.insert(r.disk, s, e);
                    // Uncovered, so not written since the cycle started: what the image's
                    // layout said of it then still holds (see `holes`).
                    let img = &self.images[r.disk as usize];
                    let hole = self.holes[r.disk as usize]
                        .is_hole(&img.file, s, e)
                        .map_err(|x| {
                            Failure::io(&vm, "checking for holes in the replica image", &x)
                        })?;
                    if hole {
                        holes.push((r.disk, s, e));
                    } else {
                        reads.push((r.disk, s, e));
                    }
                }
            }
        }
        self.stages.add(HOLES, t);
        if holes.is_empty() && reads.is_empty() {
            meanwhile(self);
            return Ok(None);
        }
        let in_flight = self.submit_reads(&reads);
        meanwhile(self);
        let t = self.stages.begin();
        let old = self.collect_reads(&reads, in_flight)?;
        self.stages.add(OLD_READ, t);
        let t = self.stages.begin();
        let mut entries: Vec<Entry> = Vec::with_capacity(holes.len() + reads.len());
        let p = self.p.as_mut().expect("running");
        let log_err = |x: io::Error| Failure::io(&vm, "writing the undo log", &x);
        for (d, s, e) in holes {
            entries.push(p.log.append(d, s, (e - s) as u32, None).map_err(log_err)?);
        }
        for ((d, s, e), (buf, at)) in reads.iter().zip(&old) {
            entries.push(
                p.log
                    .append(*d, *s, (e - s) as u32, Some(&buf[*at..]))
                    .map_err(log_err)?,
            );
        }
        self.stages.add(UNDO_WRITE, t);
        // Queued for the log's writer (or written here, if it has none), then synced behind.
        let t = self.stages.begin();
        let done = p.log.sync_later().map_err(log_err)?;
        self.stages.add(UNDO_FLUSH, t);
        Ok(Some((done, entries)))
    }

    /// Starts reading the ranges `(disk, start, end)` of the images, all in flight at once
    /// (direct where aligned); [`Pipeline::collect_reads`] waits for them.
    fn submit_reads(&self, ranges: &[(u16, u64, u64)]) -> ReadsInFlight {
        let (tx, rx) = mpsc::channel();
        for (i, &(d, s, e)) in ranges.iter().enumerate() {
            let img = &self.images[d as usize];
            let len = (e - s) as usize;
            let mut buf = Vec::new();
            let (fd, at) = match &img.direct {
                Some(f) if direct::fits(s, len) => (f.as_raw_fd(), direct::aligned(&mut buf, len)),
                _ => {
                    buf.resize(len, 0);
                    (img.file.as_raw_fd(), 0)
                }
            };
            let tx = tx.clone();
            self.engine.submit(
                Op::Read {
                    fd,
                    offset: s,
                    buf: buf.into(),
                    at,
                },
                Box::new(move |c| {
                    let _ = tx.send((i, c.result, c.buf.into_vec(), at));
                }),
            );
        }
        rx
    }

    /// Waits for the reads [`Pipeline::submit_reads`] started; each range comes back as a
    /// buffer and where in it the bytes start.
    fn collect_reads(
        &self,
        ranges: &[(u16, u64, u64)],
        rx: ReadsInFlight,
    ) -> Result<Vec<(Vec<u8>, usize)>, Failure> {
        let mut out: Vec<Option<(Vec<u8>, usize)>> = vec![None; ranges.len()];
        let mut first_err = None;
        for (i, r, buf, at) in rx {
            match r {
                Ok(()) => out[i] = Some((buf, at)),
                Err(e) if direct::is_refusal(&e) => {
                    // The filesystem refused it direct: read it through the page cache.
                    let (d, s, e2) = ranges[i];
                    let mut b = vec![0u8; (e2 - s) as usize];
                    match std::os::unix::fs::FileExt::read_exact_at(
                        &self.images[d as usize].file,
                        &mut b,
                        s,
                    ) {
                        Ok(()) => out[i] = Some((b, 0)),
                        Err(x) => first_err = first_err.or(Some(x)),
                    }
                }
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(e) = first_err {
            return Err(Failure::io(
                &self.vm,
                "reading old contents for the undo log",
                &e,
            ));
        }
        out.into_iter()
            .map(|o| {
                o.ok_or_else(|| {
                    Failure::io(
                        &self.vm,
                        "reading old contents",
                        &io::Error::other("I/O engine stopped"),
                    )
                })
            })
            .collect()
    }

    fn finished(&mut self, done: Vec<(u64, Result<(), crate::image::WriteError>)>) {
        for (token, r) in done {
            let Some((range, cb)) = self.in_flight.remove(&token) else {
                continue;
            };
            match r {
                Ok(()) => {
                    self.written.insert_range(range);
                    self.unmarked += range.len;
                    self.written_jobs.push(cb);
                }
                Err(e) => {
                    let name = self.image_name(e.disk);
                    let f = Failure::io(&self.vm, &format!("writing {name}"), &e.source);
                    self.fail(f.clone());
                    cb(Err(f));
                }
            }
        }
    }

    fn image_name(&self, disk: u16) -> String {
        format!("{}/disks (disk {disk})", self.dir.display())
    }

    /// Makes what is written durable and records it as applied.
    fn mark(&mut self) -> Result<(), Failure> {
        self.last_mark = Instant::now();
        if let Some(f) = &self.failed {
            let f = f.clone();
            for cb in self.written_jobs.drain(..) {
                cb(Err(f.clone()));
            }
            return Err(f);
        }
        if self.written.is_empty() {
            return Ok(());
        }
        let vm = self.vm.clone();
        let t = self.stages.begin();
        for img in self.images.iter() {
            if let Err(e) = img.file.sync_data() {
                let f = Failure::io(&vm, "syncing the replica images", &e);
                self.fail(f.clone());
                return self.mark();
            }
        }
        self.stages.add(IMG_SYNC, t);
        let t = self.stages.begin();
        let written = std::mem::take(&mut self.written);
        let p = self.p.as_mut().expect("running");
        let r = p.log.mark_applied(&written).and_then(|()| p.log.sync());
        self.stages.add(MARK_LOG, t);
        if let Err(e) = r {
            self.fail(Failure::io(&vm, "writing the undo log", &e));
            return self.mark();
        }
        p.applied.union(&written);
        if self.stages.on() {
            tracing::debug!(vm = %self.vm, at_ms = self.stages.elapsed_ms(), bytes = self.unmarked, stages = %self.stages.summary(), "receive pipeline: marked applied");
        }
        self.unmarked = 0;
        for cb in self.written_jobs.drain(..) {
            cb(Ok(()));
        }
        Ok(())
    }

    /// Waits for every write in flight, then makes them durable.
    fn flush(&mut self) -> Result<(), Failure> {
        self.write_all_synced();
        let t = self.stages.begin();
        let done = self.writer.drain();
        self.stages.add(DRAIN, t);
        self.finished(done);
        self.mark()
    }
}
