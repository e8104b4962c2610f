//! Data streams: chunks of the cycle being received. A reader task receives chunks while the
//! ones before them are checked and verified; the chunks that arrived meanwhile are verified
//! together in one hop to a blocking thread (decompressed into reused aligned buffers and
//! checksummed, so streams verify in parallel) and handed to the VM's receive pipeline. A
//! chunk's payload is read into a buffer of the connection's pool and goes back to it once
//! verified, so receiving allocates nothing per chunk. As the pipeline makes them durable,
//! the stream answers `Acked` with the bytes of its chunks durably applied so far; once the
//! shipper finishes the stream, a last `Acked` follows when all of them are, and the stream
//! ends.

use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use vmreplica_common::link::{self, LinkError};
use vmreplica_common::pool::BufferPool;
use vmreplica_common::stages::Stages;
use vmreplica_common::wire::{code, Chunk, Message};

use super::{reply_error, VmEntry};
use crate::store::{Failure, Job};

/// Bytes of chunk payloads a connection's data streams may hold received but not yet
/// verified (besides what QUIC's windows hold).
const QUEUED_BYTES: usize = 32 << 20;

/// Chunks of one data stream verified together in one hop to a blocking thread, at most.
const BATCH: usize = 8;

/// A data stream's stages, timed at debug level (see [`Stages`]): its reader waiting for the
/// next chunk from the link, for room in the connection's budget of unverified bytes (the
/// pipeline behind is slower), and for room in the stream's queue to its verifier; the
/// verifier's hops (whole), unpacking and checksums, and hand-overs to the VM's pipeline
/// (they wait while its queue is full); sending `Acked`.
const STAGES: &[&str] = &["recv", "budget", "queue", "hop", "verify", "submit", "ack"];
const RECV: usize = 0;
const BUDGET: usize = 1;
const QUEUE: usize = 2;
const HOP: usize = 3;
const VERIFY: usize = 4;
const SUBMIT: usize = 5;
const ACK: usize = 6;

/// A connection's budget of received, not yet verified chunk bytes, and its spare payload
/// buffers (a stream's reader and its verifier pass them back and forth, so a few suffice).
#[derive(Clone)]
pub(crate) struct Queue(Arc<Semaphore>, Arc<BufferPool<16>>);

impl Queue {
    pub fn new() -> Queue {
        Queue(Arc::new(Semaphore::new(QUEUED_BYTES)), Arc::default())
    }
}

/// How a data stream's reader stopped, when not at a clean end.
enum ReaderEnd {
    Link(LinkError),
    Protocol(String),
}

pub(crate) async fn data_stream(
    vm: Arc<VmEntry>,
    first: Chunk,
    mut send: SendStream,
    mut recv: RecvStream,
    queued: Queue,
) -> Result<(), LinkError> {
    let (cycle, epoch) = (first.tag.cycle, first.tag.epoch);
    let (tx, mut rx) = mpsc::channel::<(Chunk, OwnedSemaphorePermit)>(BATCH);
    let payloads = Arc::clone(&queued.1);
    let stages = Arc::new(Stages::new(
        STAGES,
        tracing::enabled!(tracing::Level::DEBUG),
    ));
    let st = Arc::clone(&stages);
    let reader = tokio::spawn(async move {
        let mut next = Some(first);
        while let Some(c) = next {
            let cost = c.payload.len().clamp(1, QUEUED_BYTES) as u32;
            let t = st.begin();
            let Ok(permit) = Arc::clone(&queued.0).acquire_many_owned(cost).await else {
                return Ok(());
            };
            st.add(BUDGET, t);
            let t = st.begin();
            if tx.send((c, permit)).await.is_err() {
                return Ok(()); // the stream stopped taking chunks
            }
            st.add(QUEUE, t);
            let spare = queued.1.take();
            let t = st.begin();
            let got = link::recv_reusing(&mut recv, spare).await;
            st.add(RECV, t);
            next = match got.map_err(ReaderEnd::Link)? {
                Some(Message::Chunk(c)) => Some(c),
                None => None,
                Some(other) => {
                    return Err(ReaderEnd::Protocol(format!(
                        "unexpected {} on a data stream",
                        other.name()
                    )))
                }
            };
        }
        Ok(())
    });
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Result<u64, Failure>>();
    let mut handed = 0u64; // chunks handed to the pipeline
    let mut answered = 0u64; // of which the pipeline answered
    let mut acked = 0u64; // bytes durably applied
    let mut sender = None;
    let mut batch = Vec::with_capacity(BATCH);
    let mut reading = true;
    let failure: Option<(u16, String)> = loop {
        if !reading && answered == handed {
            break None;
        }
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH), if reading => {
                if n == 0 {
                    reading = false;
                    // Everything handed over: have it made durable, so the last answers come.
                    if let Some(s) = sender.clone() {
                        let s: crate::store::JobSender = s;
                        let _ = tokio::task::spawn_blocking(move || s.flush()).await;
                    }
                    continue;
                }
                let chunks = std::mem::take(&mut batch);
                let (vm2, acks, pool) = (Arc::clone(&vm), ack_tx.clone(), Arc::clone(&payloads));
                let st = Arc::clone(&stages);
                let t = stages.begin();
                let r = tokio::task::spawn_blocking(move || hand_over(&vm2, chunks, &acks, &pool, &st))
                    .await;
                stages.add(HOP, t);
                match r {
                    Ok(Ok((s, n))) => {
                        sender = Some(s);
                        handed += n;
                    }
                    Ok(Err(f)) => break Some(f),
                    Err(e) => break Some((code::INTERNAL, e.to_string())),
                }
            }
            a = ack_rx.recv() => {
                let Some(a) = a else { break None };
                let mut news = vec![a];
                while let Ok(more) = ack_rx.try_recv() {
                    news.push(more);
                }
                let mut failed = None;
                for a in news {
                    answered += 1;
                    match a {
                        Ok(bytes) => acked += bytes,
                        Err(f) => failed = failed.or(Some((f.code, f.message))),
                    }
                }
                if let Some(f) = failed {
                    break Some(f);
                }
                let t = stages.begin();
                link::send(&mut send, &Message::Acked { cycle, epoch, bytes: acked }).await?;
                stages.add(ACK, t);
            }
        }
    };
    if let Some((c, m)) = failure {
        reader.abort();
        tracing::warn!(vm = %vm.name, "refused a chunk: {m}");
        return reply_error(&mut send, c, m).await;
    }
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(ReaderEnd::Link(e))) => return Err(e),
        Ok(Err(ReaderEnd::Protocol(m))) => return reply_error(&mut send, code::PROTOCOL, m).await,
        Err(e) => return reply_error(&mut send, code::INTERNAL, e.to_string()).await,
    }
    link::send(
        &mut send,
        &Message::Acked {
            cycle,
            epoch,
            bytes: acked,
        },
    )
    .await?;
    send.finish()?;
    if stages.on() {
        tracing::debug!(vm = %vm.name, cycle, ms = stages.elapsed_ms(), bytes = acked, stages = %stages.summary(), "data stream ended");
    }
    Ok(())
}

/// Checks, verifies and hands `chunks` to the VM's pipeline (on a blocking thread); each
/// one's outcome comes on `acks`, its payload buffer goes back to `payloads`. Returns the
/// pipeline's handle and how many were handed.
fn hand_over(
    vm: &VmEntry,
    chunks: Vec<(Chunk, OwnedSemaphorePermit)>,
    acks: &mpsc::UnboundedSender<Result<u64, Failure>>,
    payloads: &BufferPool<16>,
    stages: &Stages,
) -> Result<(crate::store::JobSender, u64), (u16, String)> {
    let mut sender = None;
    let mut n = 0;
    let disks = vm.shared.state().disks.clone();
    for (mut c, _permit) in chunks {
        let s = vm.admit(&c.tag)?;
        let bad = |reason: String| {
            (
                code::BAD_DATA,
                format!("VM {}: bad chunk: {reason}", vm.name),
            )
        };
        let Some(d) = disks.get(c.disk as usize) else {
            return Err(bad(format!("disk index {} out of range", c.disk)));
        };
        if c.offset
            .checked_add(u64::from(c.len))
            .is_none_or(|e| e > d.size)
        {
            return Err(bad(format!(
                "{}+{} is beyond the end of disk {} ({} bytes)",
                c.offset, c.len, d.name, d.size
            )));
        }
        let t = stages.begin();
        let mut buf = vm.buffers.take();
        let unpacked = c.unpack_aligned(&mut buf);
        stages.add(VERIFY, t);
        payloads.put(std::mem::take(&mut c.payload));
        let data = match unpacked {
            Ok(Some(at)) => Some((buf, at)),
            Ok(None) => {
                vm.buffers.put(buf);
                None
            }
            Err(e) => {
                vm.buffers.put(buf);
                return Err(bad(e.to_string()));
            }
        };
        let (acks, len) = (acks.clone(), c.len);
        let t = stages.begin();
        s.submit(Job {
            tag: c.tag,
            disk: c.disk,
            offset: c.offset,
            len: c.len,
            data,
            done: Box::new(move |r| {
                let _ = acks.send(r.map(|()| u64::from(len)));
            }),
        });
        stages.add(SUBMIT, t);
        n += 1;
        sender = Some(s);
    }
    Ok((sender.expect("a batch holds a chunk"), n))
}
