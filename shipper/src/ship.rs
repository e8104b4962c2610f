//! Shipping one frozen generation as a cycle: plan the chunks, skip what the applier already
//! staged, read (io_uring) and pack the rest over parallel QUIC streams within the bandwidth
//! limit, then close the cycle with a manifest and wait until it is applied.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use thiserror::Error;
use vmreplica_common::engine::Engine;
use vmreplica_common::link::{self, LinkError};
use vmreplica_common::wire::{
    self, Chunk, ChunkId, CycleKind, DiskInfo, Message, StagedChunk, MAX_CHUNK,
};
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
}

/// What a cycle moved.
#[derive(Clone, Debug, Default)]
pub struct CycleStats {
    pub cycle: u64,
    pub chunks_sent: u64,
    pub chunks_skipped: u64,
    /// Uncompressed bytes covered by the chunks sent.
    pub data_bytes: u64,
    /// Bytes of chunk frames written to the link.
    pub wire_bytes: u64,
    pub elapsed: Duration,
}

/// Chunks read and packed ahead of each stream's sender.
const READ_AHEAD_PER_STREAM: usize = 4;

/// Read buffers kept for reuse (more than the read-ahead of the usual stream counts).
const BUFFERS_KEPT: usize = 64;

/// How often a cycle's progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Knobs of one cycle.
pub struct ShipOptions {
    pub compression: bool,
    pub streams: usize,
    pub limit: Option<Arc<RateLimit>>,
    pub engine: Arc<dyn Engine>,
    pub progress: Arc<dyn Progress>,
}

/// Tells the progress sink how a cycle ended, on every way out of it.
struct Ending<'a> {
    progress: &'a dyn Progress,
    applied: bool,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.progress.end(self.applied);
    }
}

#[derive(Clone, Copy, Debug)]
struct Work {
    disk: u16,
    offset: u64,
    len: u64,
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

/// Reads `len` bytes of the frozen view at `offset`: the buffer, and where in it they start
/// (an aligned start for a direct read).
async fn read_frozen(
    engine: &Arc<dyn Engine>,
    r: &Arc<FrozenReader>,
    offset: u64,
    len: u64,
) -> io::Result<(Vec<u8>, usize)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (op, at) = r.read_op(offset, len as usize, Vec::new());
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

/// A run read and packed for a sender (one chunk per stretch of zero or non-zero blocks); it
/// holds one of the cycle's read-ahead slots.
struct Packed {
    work: Work,
    chunks: Vec<Chunk>,
    slot: tokio::sync::OwnedSemaphorePermit,
}

/// Read buffers of a cycle, reused: fresh ones would be zeroed and faulted in for every chunk.
#[derive(Default)]
struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// A buffer to read into (its contents are whatever the last read left).
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Keeps `b` for reuse, at most `max` buffers.
    fn put(&self, b: Vec<u8>, max: usize) {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < max {
            free.push(b);
        }
    }
}

/// Reads chunks from the frozen view and packs them for the senders.
struct Packer {
    engine: Arc<dyn Engine>,
    buffers: Arc<Buffers>,
    cycle: u64,
    compress: bool,
    tx: tokio::sync::mpsc::UnboundedSender<Result<Packed, ShipError>>,
}

impl Packer {
    /// Reads `w` and sends it packed to the senders. Fixing up and packing run in the I/O
    /// engine's completion callback, on its completion thread: that saves two thread hops per
    /// chunk (to a blocking thread and back), and the engine serves only this shipper's reads.
    fn read(&self, r: Arc<FrozenReader>, w: Work, slot: tokio::sync::OwnedSemaphorePermit) {
        let (buffers, tx) = (Arc::clone(&self.buffers), self.tx.clone());
        let (cycle, compress) = (self.cycle, self.compress);
        let block = r.geometry().granularity;
        // Every byte is overwritten: a short read is finished or zero-filled past the end.
        let (op, at) = r.read_op(w.offset, w.len as usize, buffers.take());
        self.engine.submit(
            op,
            Box::new(move |c| {
                let mut data = c.buf;
                let packed = c
                    .result
                    .and_then(|()| r.fix_up(w.offset, &mut data[at..]))
                    .map(|()| Packed {
                        work: w,
                        chunks: Chunk::pack_blocks(
                            cycle,
                            w.disk,
                            w.offset,
                            &data[at..],
                            block,
                            compress,
                        ),
                        slot,
                    })
                    .map_err(|source| ShipError::Read {
                        disk: r.name.clone(),
                        source,
                    });
                buffers.put(data, BUFFERS_KEPT);
                let _ = tx.send(packed);
            }),
        );
    }
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

/// Blocks of a resync that differ from the replica: compares checksums of the frozen view
/// with the applier's, range by range; only checksums cross the link.
async fn resync_runs(
    ctl: &mut (SendStream, RecvStream),
    r: &Arc<FrozenReader>,
    opts: &ShipOptions,
    disk: u16,
) -> Result<Vec<(u64, u64)>, ShipError> {
    const BATCH: u32 = 1024;
    let geo = r.geometry();
    let g = u64::from(geo.granularity);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0u64;
    while offset < geo.disk_size {
        link::send(
            &mut ctl.0,
            &Message::HashRequest {
                disk: r.name.clone(),
                offset,
                block: geo.granularity,
                count: BATCH,
            },
        )
        .await?;
        let remote = match link::expect(&mut ctl.1).await? {
            Message::Hashes { hashes, .. } => hashes,
            other => return Err(ShipError::Protocol(format!("{other:?}"))),
        };
        let span = (u64::from(BATCH) * g).min(geo.disk_size - offset);
        let (local, at) = read_frozen(&opts.engine, r, offset, span)
            .await
            .map_err(|source| ShipError::Read {
                disk: r.name.clone(),
                source,
            })?;
        for (i, block) in local[at..].chunks(g as usize).enumerate() {
            let off = offset + i as u64 * g;
            if remote.get(i) == Some(&wire::checksum(block)) {
                continue;
            }
            let len = block.len() as u64;
            match runs.last_mut() {
                Some((o, l)) if *o + *l == off && *l + len <= u64::from(MAX_CHUNK) => *l += len,
                _ => runs.push((off, len)),
            }
        }
        offset += span;
    }
    let _ = disk;
    Ok(runs)
}

/// How many of the `staged` chunks tile `len` bytes at `offset` of `disk` exactly, end to end
/// (a run is packed as one chunk per stretch of zero or non-zero blocks, so a run the applier
/// holds whole may be several chunks); None if they do not, and the run is sent again.
fn staged_tiling(
    staged: &HashMap<ChunkId, (u32, u64)>,
    disk: u16,
    offset: u64,
    len: u64,
) -> Option<u64> {
    let (mut pos, mut n) = (offset, 0u64);
    while pos < offset + len {
        let (l, _) = staged.get(&ChunkId { disk, offset: pos })?;
        pos += u64::from(*l).max(1);
        n += 1;
    }
    (pos == offset + len).then_some(n)
}

/// Ships generation `g` as cycle `g.generation` of kind `kind` over `conns` (data streams
/// spread over them, at least one each), using the open control stream `ctl` of the first.
/// Returns once the applier reports the cycle applied.
pub async fn ship_cycle(
    conns: &[Connection],
    ctl: &mut (SendStream, RecvStream),
    g: &Generation,
    kind: CycleKind,
    opts: &ShipOptions,
) -> Result<CycleStats, ShipError> {
    if conns.is_empty() {
        return Err(ShipError::Protocol("no connection to ship over".into()));
    }
    let start = Instant::now();
    let cycle = g.generation;
    let readers = open_readers(g)?;
    link::send(
        &mut ctl.0,
        &Message::BeginCycle {
            cycle,
            kind,
            disks: disk_infos(g),
        },
    )
    .await?;
    let staged = match link::expect(&mut ctl.1).await {
        Ok(Message::Staged { chunks, .. }) => chunks,
        Ok(other) => return Err(ShipError::Protocol(format!("{other:?}"))),
        Err(LinkError::Peer(reason)) => return Err(ShipError::Refused { cycle, reason }),
        Err(e) => return Err(e.into()),
    };
    let mut manifest: HashMap<ChunkId, (u32, u64)> =
        staged.iter().map(|s| (s.id, (s.len, s.checksum))).collect();

    // Plan.
    let mut work = VecDeque::new();
    let mut total = 0u64;
    let mut skipped = 0u64;
    for (i, r) in readers.iter().enumerate() {
        let runs = match kind {
            CycleKind::Resync => resync_runs(ctl, r, opts, i as u16).await?,
            _ => {
                let r2 = Arc::clone(r);
                let skip_holes = kind == CycleKind::Initial;
                tokio::task::spawn_blocking(move || r2.runs(u64::from(MAX_CHUNK), skip_holes))
                    .await
                    .map_err(|e| ShipError::Protocol(e.to_string()))?
                    .map_err(|source| ShipError::Read {
                        disk: r.name.clone(),
                        source,
                    })?
            }
        };
        for (offset, len) in runs {
            if let Some(n) = staged_tiling(&manifest, i as u16, offset, len) {
                skipped += n;
                continue;
            }
            total += len;
            work.push_back(Work {
                disk: i as u16,
                offset,
                len,
            });
        }
    }
    tracing::info!(
        vm_cycle = cycle,
        ?kind,
        chunks = work.len(),
        skipped,
        bytes = total,
        direct_reads = readers.iter().all(|r| r.reads_direct()),
        "cycle planned"
    );

    // Send over parallel streams.
    let queue = Arc::new(Mutex::new(work));
    let done = Arc::new(AtomicU64::new(0));
    let wire_bytes = Arc::new(AtomicU64::new(0));
    opts.progress.begin(cycle, kind, total);
    let mut ending = Ending {
        progress: &*opts.progress,
        applied: false,
    };
    let sending = Instant::now();
    let snapshot = {
        let done = Arc::clone(&done);
        move || Snapshot {
            cycle,
            kind,
            done: done.load(Ordering::Relaxed),
            total,
            elapsed: sending.elapsed(),
        }
    };
    // Ticks until the chunks are sent, or this future is dropped (the sender goes with it).
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
    // Read and pack ahead of the senders, a bounded number of chunks at a time, so disk reads,
    // compression and the link overlap; memory stays within `depth` chunks (a chunk holds its
    // slot until a sender has handed it to the link).
    let depth = opts.streams.max(1) * READ_AHEAD_PER_STREAM;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Packed, ShipError>>();
    let producer = {
        let packer = Packer {
            engine: Arc::clone(&opts.engine),
            buffers: Arc::default(),
            cycle,
            compress: opts.compression,
            tx,
        };
        let (queue, readers) = (queue, readers.clone());
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(depth));
            loop {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(w) = next else { return };
                if packer.tx.is_closed() {
                    return;
                }
                packer.read(Arc::clone(&readers[w.disk as usize]), w, slot);
            }
        })
    };
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut tasks = Vec::new();
    for i in 0..opts.streams.max(conns.len()).max(1) {
        let conn = conns[i % conns.len()].clone();
        let (rx, limit) = (Arc::clone(&rx), opts.limit.clone());
        let (done, wire_bytes) = (Arc::clone(&done), Arc::clone(&wire_bytes));
        tasks.push(tokio::spawn(async move {
            let mut stream: Option<(SendStream, RecvStream)> = None;
            let mut sent: Vec<StagedChunk> = Vec::new();
            loop {
                let next = rx.lock().await.recv().await;
                let Some(packed) = next else { break };
                let Packed {
                    work: w,
                    chunks,
                    slot,
                } = packed?;
                for mut chunk in chunks {
                    let entry = StagedChunk {
                        id: chunk.id(),
                        len: chunk.len,
                        checksum: chunk.checksum,
                    };
                    let budget = corrupt_budget();
                    if budget.load(Ordering::Relaxed) > 0
                        && budget.fetch_sub(1, Ordering::Relaxed) > 0
                    {
                        tracing::warn!("test hook: corrupting chunk at {}", chunk.offset);
                        match chunk.payload.first_mut() {
                            Some(b) => *b ^= 0x5a,
                            None => chunk.checksum ^= 1,
                        }
                    }
                    let frame = chunk.payload.len() as u64 + 48;
                    if let Some(l) = &limit {
                        l.acquire(frame).await;
                    }
                    if stream.is_none() {
                        stream = Some(conn.open_bi().await.map_err(LinkError::from)?);
                    }
                    let (s, r) = stream.as_mut().expect("opened above");
                    if let Err(e) = link::send_chunk(s, chunk).await {
                        // The applier stops a stream it refuses; its answer says why.
                        return match tokio::time::timeout(Duration::from_secs(5), link::expect(r))
                            .await
                        {
                            Ok(Err(LinkError::Peer(reason))) => {
                                Err(ShipError::Refused { cycle, reason })
                            }
                            _ => Err(e.into()),
                        };
                    }
                    wire_bytes.fetch_add(frame, Ordering::Relaxed);
                    sent.push(entry);
                }
                drop(slot);
                done.fetch_add(w.len, Ordering::Relaxed);
            }
            if let Some((mut s, mut r)) = stream {
                s.finish().map_err(LinkError::from)?;
                match link::expect(&mut r).await {
                    Ok(Message::Staged { .. }) => {}
                    Ok(other) => return Err(ShipError::Protocol(format!("{other:?}"))),
                    Err(LinkError::Peer(reason)) => {
                        return Err(ShipError::Refused { cycle, reason })
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok::<_, ShipError>(sent)
        }));
    }
    // Only the senders may keep the receiver: once they are gone, the packers' sends fail.
    drop(rx);
    let mut result = Ok(());
    let mut sent_count = 0u64;
    let stop_producer = producer.abort_handle();
    for t in tasks {
        match t.await {
            Ok(Ok(sent)) => {
                sent_count += sent.len() as u64;
                for s in sent {
                    manifest.insert(s.id, (s.len, s.checksum));
                }
            }
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => {
                if result.is_ok() {
                    result = Err(ShipError::Protocol(e.to_string()));
                }
            }
        }
    }
    drop(stop_ticks);
    let _ = ticker.await;
    stop_producer.abort();
    result?;
    opts.progress.sent(&snapshot());

    let digest = wire::digest(manifest.iter().map(|(id, (_, sum))| (*id, *sum)));
    link::send(
        &mut ctl.0,
        &Message::Manifest {
            cycle,
            chunks: manifest.len() as u64,
            digest,
        },
    )
    .await?;
    match link::expect(&mut ctl.1).await {
        Ok(Message::Applied { cycle: c }) if c == cycle => {}
        Ok(other) => return Err(ShipError::Protocol(format!("{other:?}"))),
        Err(LinkError::Peer(reason)) => return Err(ShipError::Refused { cycle, reason }),
        Err(e) => return Err(e.into()),
    }
    ending.applied = true;
    Ok(CycleStats {
        cycle,
        chunks_sent: sent_count,
        chunks_skipped: skipped,
        data_bytes: done.load(Ordering::Relaxed),
        wire_bytes: wire_bytes.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_counts_as_staged_only_when_its_chunks_tile_it_exactly() {
        let staged: HashMap<ChunkId, (u32, u64)> =
            [(0, 0, 64), (0, 64, 128), (0, 192, 64), (1, 0, 256)]
                .into_iter()
                .map(|(disk, offset, len)| (ChunkId { disk, offset }, (len, 0)))
                .collect();
        assert_eq!(staged_tiling(&staged, 0, 0, 256), Some(3));
        assert_eq!(staged_tiling(&staged, 0, 64, 192), Some(2));
        assert_eq!(staged_tiling(&staged, 1, 0, 256), Some(1));
        // A run longer than what is staged, one the chunks overshoot, one with a gap.
        assert_eq!(staged_tiling(&staged, 0, 0, 320), None);
        assert_eq!(staged_tiling(&staged, 0, 0, 100), None);
        assert_eq!(staged_tiling(&staged, 0, 32, 224), None);
        assert_eq!(staged_tiling(&staged, 1, 0, 128), None);
        // A zero-length entry cannot stall the walk.
        let stuck: HashMap<ChunkId, (u32, u64)> = [(ChunkId { disk: 0, offset: 0 }, (0, 0))]
            .into_iter()
            .collect();
        assert_eq!(staged_tiling(&stuck, 0, 0, 64), None);
    }
}
