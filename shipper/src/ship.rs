//! The data path of a cycle: planning the ranges of a frozen generation, then reading
//! (io_uring), packing (lz4 and checksums, on a pool of threads) and sending them over
//! parallel QUIC streams within the bandwidth limit, until the applier acknowledges every
//! byte as durably applied.
//!
//! Progress counts bytes the applier acknowledged (each data stream carries `Acked` back as
//! its chunks become durable), not bytes handed to the link.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use thiserror::Error;
use tokio::sync::mpsc;
use vmreplica_common::engine::{Engine, IoBuf};
use vmreplica_common::link::{self, LinkError};
use vmreplica_common::ranges::{Range, RangeSet};
use vmreplica_common::stages::Stages;
use vmreplica_common::wire::{self, Chunk, CycleKind, DiskInfo, Message, Tag, MAX_CHUNK};
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::Generation;

use crate::progress::{Progress, Snapshot};
use crate::ratelimit::RateLimit;

#[derive(Debug, Error)]
pub enum ShipError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("reading disk {disk}: {source}")]
    Read { disk: String, source: io::Error },
    #[error("the applier refused cycle {cycle}: {reason}")]
    Refused { cycle: u64, reason: String },
    #[error("unexpected answer from the applier: {0}")]
    Protocol(String),
    /// The primary's own tracker failed the shipper (not the applier, not the link).
    #[error("{0}")]
    Tracker(String),
    /// Something on this host (a lock, an address, a configuration).
    #[error("{0}")]
    Local(String),
}

/// What sending a cycle moved.
#[derive(Clone, Debug, Default)]
pub struct SendStats {
    pub chunks: u64,
    /// Uncompressed bytes covered by the chunks sent.
    pub data_bytes: u64,
    /// Bytes of chunk frames written to the link.
    pub wire_bytes: u64,
}

/// Chunks read and packed ahead of each stream's sender.
const READ_AHEAD_PER_STREAM: usize = 4;

/// A cycle's data path stages, timed at debug level (see [`Stages`]): the reader waiting for a
/// read-ahead slot (the senders are behind), reads (submission to completion), a read run
/// waiting for a packing thread, packing (lz4, checksums), senders waiting for packed chunks
/// (reading or packing is behind), the bandwidth limit, opening streams, chunk writes into
/// QUIC streams (they wait for flow-control credit), and each stream's last `Acked` after
/// its finish (the applier's last durable writes).
const STAGES: &[&str] = &[
    "slot",
    "read",
    "pack_wait",
    "pack",
    "starved",
    "limit",
    "open",
    "send",
    "last_ack",
];
const SLOT: usize = 0;
const READ: usize = 1;
const PACK_WAIT: usize = 2;
const PACK: usize = 3;
const STARVED: usize = 4;
const LIMIT: usize = 5;
const OPEN: usize = 6;
const SEND: usize = 7;
const LAST_ACK: usize = 8;

/// How often a cycle's progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Knobs of the data path.
pub struct ShipOptions {
    pub compression: bool,
    pub streams: usize,
    pub limit: Option<Arc<RateLimit>>,
    pub engine: Arc<dyn Engine>,
    pub progress: Arc<dyn Progress>,
    /// Threads packing (compressing, checksumming) chunks.
    pub packers: usize,
}

/// Test hook: corrupt this many chunks after packing, as a damaged transfer would.
static CORRUPT: AtomicU64 = AtomicU64::new(u64::MAX);

fn corrupt_budget() -> &'static AtomicU64 {
    if CORRUPT.load(Ordering::Relaxed) == u64::MAX {
        let n = std::env::var("VMREPLICA_FAULT_CORRUPT_CHUNKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let _ = CORRUPT.compare_exchange(u64::MAX, n, Ordering::Relaxed, Ordering::Relaxed);
    }
    &CORRUPT
}

/// Opens the frozen disks of a generation.
pub fn open_readers(g: &Generation) -> Result<Vec<Arc<FrozenReader>>, ShipError> {
    g.disks
        .iter()
        .map(|d| {
            FrozenReader::open(d)
                .map(Arc::new)
                .map_err(|source| ShipError::Read {
                    disk: d.name.clone(),
                    source,
                })
        })
        .collect()
}

pub fn disk_infos(g: &Generation) -> Vec<DiskInfo> {
    g.disks
        .iter()
        .map(|d| DiskInfo {
            name: d.name.clone(),
            size: d.size,
            granularity: d.granularity,
        })
        .collect()
}

/// Reads `len` bytes of the frozen view at `offset`: the buffer, and where in it they start.
async fn read_frozen(
    engine: &Arc<dyn Engine>,
    r: &Arc<FrozenReader>,
    offset: u64,
    len: u64,
) -> io::Result<(IoBuf, usize)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (op, at) = r.read_op(offset, len as usize, IoBuf::default());
    engine.submit(
        op,
        Box::new(move |c| {
            let _ = tx.send(c);
        }),
    );
    let c = rx
        .await
        .map_err(|_| io::Error::other("I/O engine stopped"))?;
    c.result?;
    let mut buf = c.buf;
    r.fix_up(offset, &mut buf[at..])?;
    Ok((buf, at))
}

/// The ranges of a frozen generation to ship. An initial copy skips holes; a delta takes
/// the frozen dirty blocks; a resync compares checksums with the applier's (only checksums
/// cross the link: `hash` asks the applier for them) and takes the blocks that differ.
pub async fn plan<F, Fut>(
    readers: &[Arc<FrozenReader>],
    kind: CycleKind,
    engine: &Arc<dyn Engine>,
    hash: F,
) -> Result<RangeSet, ShipError>
where
    F: FnMut(String, u64, u32, u32) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u64>, ShipError>>,
{
    plan_with_progress(readers, kind, engine, &|_| {}, hash).await
}

/// [`plan`], telling `progress` how many bytes of the disks a resync has compared so far.
pub async fn plan_with_progress<F, Fut>(
    readers: &[Arc<FrozenReader>],
    kind: CycleKind,
    engine: &Arc<dyn Engine>,
    progress: &(dyn Fn(u64) + Send + Sync),
    mut hash: F,
) -> Result<RangeSet, ShipError>
where
    F: FnMut(String, u64, u32, u32) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u64>, ShipError>>,
{
    let mut compared = 0u64;
    let mut plan = RangeSet::new();
    for (i, r) in readers.iter().enumerate() {
        let disk = i as u16;
        if kind != CycleKind::Resync {
            let r2 = Arc::clone(r);
            let skip_holes = kind == CycleKind::Initial;
            let runs =
                tokio::task::spawn_blocking(move || r2.runs(u64::from(MAX_CHUNK), skip_holes))
                    .await
                    .map_err(|e| ShipError::Protocol(e.to_string()))?
                    .map_err(|source| ShipError::Read {
                        disk: r.name.clone(),
                        source,
                    })?;
            for (o, l) in runs {
                plan.insert(disk, o, o + l);
            }
            continue;
        }
        const BATCH: u32 = 1024;
        let geo = r.geometry();
        let g = u64::from(geo.granularity);
        let mut offset = 0u64;
        while offset < geo.disk_size {
            let remote = hash(r.name.clone(), offset, geo.granularity, BATCH).await?;
            let span = (u64::from(BATCH) * g).min(geo.disk_size - offset);
            let (local, at) = read_frozen(engine, r, offset, span)
                .await
                .map_err(|source| ShipError::Read {
                    disk: r.name.clone(),
                    source,
                })?;
            for (i, block) in local[at..].chunks(g as usize).enumerate() {
                if remote.get(i) != Some(&wire::checksum(block)) {
                    let off = offset + i as u64 * g;
                    plan.insert(disk, off, off + block.len() as u64);
                }
            }
            offset += span;
            compared += span;
            progress(compared);
        }
    }
    Ok(plan)
}

/// One piece of work: a range of at most [`MAX_CHUNK`] bytes, not crossing a multiple of it.
#[derive(Clone, Copy, Debug)]
struct Work {
    disk: u16,
    offset: u64,
    len: u64,
}

fn split(ranges: &[Range]) -> VecDeque<Work> {
    let m = u64::from(MAX_CHUNK);
    let mut out = VecDeque::new();
    for r in ranges {
        let mut pos = r.offset;
        while pos < r.end() {
            let next = ((pos / m + 1) * m).min(r.end());
            out.push_back(Work {
                disk: r.disk,
                offset: pos,
                len: next - pos,
            });
            pos = next;
        }
    }
    out
}

/// A run read and packed for a sender; it holds one of the read-ahead slots.
struct Packed {
    chunks: Vec<Chunk>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Read buffers, reused: fresh ones would be zeroed and faulted in for every chunk.
type Buffers = vmreplica_common::pool::BufferPool<64, IoBuf>;

type PackJob = Box<dyn FnOnce() + Send>;

/// Threads that pack read runs into chunks (lz4 and xxh3 are the CPU of a cycle): the I/O
/// engine's completion thread only hands them the buffers.
struct PackPool {
    tx: Option<std_mpsc::Sender<PackJob>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PackPool {
    fn new(n: usize) -> PackPool {
        let (tx, rx) = std_mpsc::channel::<PackJob>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n.max(1))
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("pack-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(j) => j(),
                            Err(_) => return,
                        }
                    })
                    .expect("spawning a packing thread")
            })
            .collect();
        PackPool {
            tx: Some(tx),
            threads,
        }
    }

    fn sender(&self) -> std_mpsc::Sender<PackJob> {
        self.tx.clone().expect("open until dropped")
    }
}

impl Drop for PackPool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends `ranges` of the frozen disks `readers` as chunks of `tag` over parallel streams of
/// `conns`, and returns once the applier acknowledged every byte as durably applied.
pub async fn send_data(
    conns: &[Connection],
    readers: &[Arc<FrozenReader>],
    tag: Tag,
    kind: CycleKind,
    ranges: &[Range],
    opts: &ShipOptions,
) -> Result<SendStats, ShipError> {
    if conns.is_empty() {
        return Err(ShipError::Protocol("no connection to ship over".into()));
    }
    let cycle = tag.cycle;
    let work = split(ranges);
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    tracing::info!(
        cycle,
        kind = kind.name(),
        pieces = work.len(),
        bytes = total,
        direct_reads = readers.iter().all(|r| r.reads_direct()),
        "cycle planned"
    );
    let acked = Arc::new(AtomicU64::new(0));
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let chunks = Arc::new(AtomicU64::new(0));
    opts.progress.begin(cycle, kind, total);
    let sending = Instant::now();
    let snapshot = {
        let acked = Arc::clone(&acked);
        move || Snapshot {
            cycle,
            kind,
            done: acked.load(Ordering::Relaxed),
            total,
            elapsed: sending.elapsed(),
        }
    };
    let (stop_ticks, mut ticks_stopped) = tokio::sync::oneshot::channel::<()>();
    let ticker = {
        let (progress, snapshot) = (Arc::clone(&opts.progress), snapshot.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(PROGRESS_EVERY) => progress.update(&snapshot()),
                    _ = &mut ticks_stopped => return,
                }
            }
        })
    };
    // Read and pack ahead of the senders, a bounded number of runs at a time, so disk reads,
    // compression and the link overlap; memory stays within `depth` runs.
    let depth = opts.streams.max(1) * READ_AHEAD_PER_STREAM;
    let stages = Arc::new(Stages::new(
        STAGES,
        tracing::enabled!(tracing::Level::DEBUG),
    ));
    let (tx, rx) = mpsc::unbounded_channel::<Result<Packed, ShipError>>();
    let pool = PackPool::new(opts.packers);
    let producer = {
        let (engine, pack, readers) = (Arc::clone(&opts.engine), pool.sender(), readers.to_vec());
        let compress = opts.compression;
        let buffers = Arc::new(Buffers::default());
        let mut work = work;
        let st = Arc::clone(&stages);
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(depth));
            while let Some(w) = work.pop_front() {
                let t = st.begin();
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                st.add(SLOT, t);
                if tx.is_closed() {
                    return;
                }
                let r = Arc::clone(&readers[w.disk as usize]);
                let (buffers, tx, pack) = (Arc::clone(&buffers), tx.clone(), pack.clone());
                let (op, at) = r.read_op(w.offset, w.len as usize, buffers.take());
                let (st, t) = (Arc::clone(&st), st.begin());
                engine.submit(
                    op,
                    Box::new(move |c| {
                        st.add(READ, t);
                        let t = st.begin();
                        let job: PackJob = Box::new(move || {
                            st.add(PACK_WAIT, t);
                            let t = st.begin();
                            let mut data = c.buf;
                            let block = r.geometry().granularity;
                            let packed = c
                                .result
                                .and_then(|()| r.fix_up(w.offset, &mut data[at..]))
                                .map(|()| Packed {
                                    chunks: Chunk::pack_blocks(
                                        tag,
                                        w.disk,
                                        w.offset,
                                        &data[at..],
                                        block,
                                        compress,
                                    ),
                                    _slot: slot,
                                })
                                .map_err(|source| ShipError::Read {
                                    disk: r.name.clone(),
                                    source,
                                });
                            buffers.put(data);
                            st.add(PACK, t);
                            let _ = tx.send(packed);
                        });
                        let _ = pack.send(job);
                    }),
                );
            }
        })
    };
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut tasks = Vec::new();
    for i in 0..opts.streams.max(conns.len()).max(1) {
        let conn = conns[i % conns.len()].clone();
        let (rx, limit, st) = (Arc::clone(&rx), opts.limit.clone(), Arc::clone(&stages));
        let (acked, wire_bytes, chunks) = (
            Arc::clone(&acked),
            Arc::clone(&wire_bytes),
            Arc::clone(&chunks),
        );
        tasks.push(tokio::spawn(async move {
            stream_task(conn, rx, limit, cycle, acked, wire_bytes, chunks, &st).await
        }));
    }
    drop(rx);
    let mut result = Ok(());
    let stop_producer = producer.abort_handle();
    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => Err(ShipError::Protocol(e.to_string())),
        };
        if let (Err(e), true) = (r, result.is_ok()) {
            result = Err(e);
        }
    }
    drop(stop_ticks);
    let _ = ticker.await;
    stop_producer.abort();
    drop(pool);
    if stages.on() {
        tracing::debug!(cycle, ms = stages.elapsed_ms(), stages = %stages.summary(), "cycle data path");
    }
    result?;
    opts.progress.sent(&snapshot());
    Ok(SendStats {
        chunks: chunks.load(Ordering::Relaxed),
        data_bytes: total,
        wire_bytes: wire_bytes.load(Ordering::Relaxed),
    })
}

/// One data stream: sends packed chunks as they come, while a reader takes the applier's
/// `Acked` answers; when there is nothing left, finishes the stream and waits for the last
/// answer, which must cover every byte sent on it.
#[allow(clippy::too_many_arguments)]
async fn stream_task(
    conn: Connection,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<Packed, ShipError>>>>,
    limit: Option<Arc<RateLimit>>,
    cycle: u64,
    acked: Arc<AtomicU64>,
    wire_bytes: Arc<AtomicU64>,
    chunks: Arc<AtomicU64>,
    st: &Stages,
) -> Result<(), ShipError> {
    let mut stream: Option<(SendStream, tokio::task::JoinHandle<Result<u64, ShipError>>)> = None;
    let mut sent = 0u64;
    loop {
        let t = st.begin();
        let next = rx.lock().await.recv().await;
        st.add(STARVED, t);
        let Some(packed) = next else { break };
        for mut chunk in packed?.chunks {
            let budget = corrupt_budget();
            if budget.load(Ordering::Relaxed) > 0 && budget.fetch_sub(1, Ordering::Relaxed) > 0 {
                tracing::warn!("test hook: corrupting chunk at {}", chunk.offset);
                match chunk.payload.first_mut() {
                    Some(b) => *b ^= 0x5a,
                    None => chunk.checksum ^= 1,
                }
            }
            let frame = (chunk.payload.len() + wire::CHUNK_HEAD + 4) as u64;
            if let Some(l) = &limit {
                let t = st.begin();
                l.acquire(frame).await;
                st.add(LIMIT, t);
            }
            if stream.is_none() {
                let t = st.begin();
                let (s, r) = conn.open_bi().await.map_err(LinkError::from)?;
                st.add(OPEN, t);
                let acked = Arc::clone(&acked);
                stream = Some((s, tokio::spawn(read_acks(r, cycle, acked))));
            }
            let (s, _) = stream.as_mut().expect("opened above");
            let len = u64::from(chunk.len);
            let t = st.begin();
            let r = link::send_chunk(s, chunk).await;
            st.add(SEND, t);
            if let Err(e) = r {
                // The applier stops a stream it refuses; its answer says why.
                let (_, reader) = stream.take().expect("opened above");
                return match tokio::time::timeout(Duration::from_secs(5), reader).await {
                    Ok(Ok(Err(refused @ ShipError::Refused { .. }))) => Err(refused),
                    _ => Err(e.into()),
                };
            }
            sent += len;
            wire_bytes.fetch_add(frame, Ordering::Relaxed);
            chunks.fetch_add(1, Ordering::Relaxed);
        }
    }
    let Some((mut s, reader)) = stream else {
        return Ok(());
    };
    s.finish().map_err(LinkError::from)?;
    let t = st.begin();
    let got = reader
        .await
        .map_err(|e| ShipError::Protocol(e.to_string()))??;
    st.add(LAST_ACK, t);
    if got != sent {
        return Err(ShipError::Protocol(format!(
            "the applier acknowledged {got} of the {sent} bytes sent on a stream"
        )));
    }
    Ok(())
}

/// Reads a data stream's answers: `Acked` counts (added to `acked` as they rise), until the
/// stream ends; returns the last count. An `Error` is the applier's refusal.
async fn read_acks(mut r: RecvStream, cycle: u64, acked: Arc<AtomicU64>) -> Result<u64, ShipError> {
    let mut last = 0u64;
    loop {
        match link::recv(&mut r).await {
            Ok(Some(Message::Acked { bytes, .. })) => {
                if bytes > last {
                    acked.fetch_add(bytes - last, Ordering::Relaxed);
                    last = bytes;
                }
            }
            Ok(Some(Message::Error { code, message })) => {
                return Err(ShipError::Refused {
                    cycle,
                    reason: format!("{message} (code {code})"),
                })
            }
            Ok(Some(other)) => {
                return Err(ShipError::Protocol(format!(
                    "unexpected {} on a data stream",
                    other.name()
                )))
            }
            Ok(None) => return Ok(last),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_chunk_boundaries() {
        let m = u64::from(MAX_CHUNK);
        let w: Vec<(u16, u64, u64)> = split(&[
            Range {
                disk: 0,
                offset: m - 4096,
                len: m + 8192,
            },
            Range {
                disk: 1,
                offset: 0,
                len: 4096,
            },
        ])
        .into_iter()
        .map(|w| (w.disk, w.offset, w.len))
        .collect();
        assert_eq!(
            w,
            vec![
                (0, m - 4096, 4096),
                (0, m, m),
                (0, 2 * m, 4096),
                (1, 0, 4096)
            ]
        );
    }
}
