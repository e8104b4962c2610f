//! The replication protocol between shipper and applier, as a pure codec.
//!
//! Every message is a frame: `u32 length` (of what follows), `u8 type`, body; integers are
//! big-endian, strings are `u16 length` + UTF-8, lineages 16 bytes. Frames are bounded by
//! [`MAX_FRAME`] on both sides: the encoder refuses to make a larger one (so a list that could
//! grow with a cycle, such as the resume answer, is sent as pages: [`resume_pages`]), and the
//! decoder refuses to read one; counts and strings have their own limits, so a hostile peer
//! cannot make the decoder allocate without bound. Block data travels in [`Chunk`]s: all-zero
//! runs as a marker, the rest lz4 compressed (raw when that does not shrink it), each with an
//! xxh3 checksum of the uncompressed bytes.
//!
//! Version 2 (this one): every cycle message carries its lineage and cycle, and every data
//! frame the receive attempt's epoch; the resume answer is the durably applied set of ranges
//! (paged), and the manifest proves a cycle complete by the digest of its ranges. A version 1
//! peer is refused at hello with a message that says which side to upgrade: `Hello` and
//! `Welcome` decode in both versions' layouts for that.

use crate::direct;
use crate::lineage::Lineage;
use crate::ranges::{Range, RangeSet};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

pub const PROTOCOL_VERSION: u16 = 2;
/// Most uncompressed bytes in one chunk.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Largest frame (a chunk that did not compress, plus headers, fits easily).
pub const MAX_FRAME: u32 = 4 << 20;
/// Most entries in a list (disks, ranges, hashes).
pub const MAX_LIST: u32 = 1 << 20;
pub const MAX_STRING: u16 = 4096;
/// Ranges in one page of a resume answer (18 bytes each: 1.8 MB, well under [`MAX_FRAME`]).
pub const RESUME_PAGE: usize = 100_000;
/// Most checksums in one `Hashes` answer (8 bytes each, under [`MAX_FRAME`]).
pub const MAX_HASHES: u32 = 256 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(u64),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} trailing bytes in a frame")]
    Trailing(usize),
    #[error("list of {0} entries exceeds the limit")]
    ListTooLong(u32),
    #[error("string is not UTF-8 or too long")]
    BadString,
    #[error("unknown chunk encoding {0}")]
    BadEncoding(u8),
    #[error("unknown cycle kind {0}")]
    BadKind(u8),
    #[error("a flag byte is {0}, not 0 or 1")]
    BadFlag(u8),
    #[error("chunk of {0} bytes exceeds the {MAX_CHUNK}-byte limit")]
    ChunkTooLarge(u32),
    #[error("chunk at disk {disk} offset {offset}: {reason}")]
    BadChunk {
        disk: u16,
        offset: u64,
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CycleKind {
    /// Changed blocks since the previous cycle.
    Delta = 0,
    /// The initial full copy of every allocated region.
    Initial = 1,
    /// Differences found by comparing checksums (tracking was lost).
    Resync = 2,
}

impl CycleKind {
    pub fn name(self) -> &'static str {
        match self {
            CycleKind::Delta => "delta",
            CycleKind::Initial => "initial",
            CycleKind::Resync => "resync",
        }
    }

    pub fn from_name(s: &str) -> Option<CycleKind> {
        match s {
            "delta" => Some(CycleKind::Delta),
            "initial" => Some(CycleKind::Initial),
            "resync" => Some(CycleKind::Resync),
            _ => None,
        }
    }

    fn from_u8(k: u8) -> Result<CycleKind, WireError> {
        match k {
            0 => Ok(CycleKind::Delta),
            1 => Ok(CycleKind::Initial),
            2 => Ok(CycleKind::Resync),
            k => Err(WireError::BadKind(k)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    pub size: u64,
    pub granularity: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Zero = 0,
    Lz4 = 1,
    Raw = 2,
}

/// Which receive attempt of which cycle a data frame belongs to. The applier hands out a new
/// epoch for every `BeginCycle` it accepts and refuses data of any other: a stale stream of
/// an earlier attempt can neither capture nor write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    pub lineage: Lineage,
    pub cycle: u64,
    pub epoch: u64,
}

/// A cycle the replica holds in part (received, not yet a point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receiving {
    pub lineage: Lineage,
    pub cycle: u64,
    pub kind: CycleKind,
    /// The id of the freeze it is (the tracker's, random): one generation number can come
    /// again after a tracker's older state is restored, one freeze cannot.
    pub freeze: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub tag: Tag,
    pub disk: u16,
    pub offset: u64,
    /// Uncompressed length.
    pub len: u32,
    pub encoding: Encoding,
    /// xxh3-64 of the uncompressed bytes.
    pub checksum: u64,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Shipper → applier, first on the control stream: the VM, and the tracker's lineage.
    Hello {
        version: u16,
        vm: String,
        lineage: Option<Lineage>,
    },
    /// Applier → shipper: the replica's lineage, its last complete cycle (0: none) and the
    /// freeze id of that cycle (0: unknown), and the cycle it holds in part, if any.
    Welcome {
        version: u16,
        lineage: Option<Lineage>,
        last_cycle: u64,
        last_freeze: u64,
        receiving: Option<Receiving>,
    },
    /// Shipper → applier: a cycle starts (or resumes): the tracker's generation `cycle` of
    /// `lineage`, frozen as freeze `freeze`.
    BeginCycle {
        lineage: Lineage,
        cycle: u64,
        kind: CycleKind,
        freeze: u64,
        disks: Vec<DiskInfo>,
    },
    /// Applier → shipper, the answer to `BeginCycle`, in pages: the epoch of this attempt,
    /// and the ranges of the cycle already durably applied (the shipper skips them). `last`
    /// marks the final page.
    Resume {
        lineage: Lineage,
        cycle: u64,
        epoch: u64,
        ranges: Vec<Range>,
        last: bool,
    },
    /// Block data, on data streams.
    Chunk(Chunk),
    /// Applier → shipper, on a data stream: this many bytes of the stream's chunks are
    /// durably applied (sent as they become so, and once more after the stream finished).
    Acked { cycle: u64, epoch: u64, bytes: u64 },
    /// Shipper → applier: the cycle is complete. Its ranges (what was already applied when
    /// it resumed, and everything sent since) number `ranges`, hold `bytes`, and have
    /// [`RangeSet::digest`] `digest`.
    Manifest {
        lineage: Lineage,
        cycle: u64,
        epoch: u64,
        ranges: u64,
        bytes: u64,
        digest: u64,
    },
    /// Applier → shipper: the cycle is applied and durable (a recovery point, unless it
    /// changed nothing).
    Applied { lineage: Lineage, cycle: u64 },
    /// Either way: a refusal or failure, with a message for the log.
    Error { code: u16, message: String },
    /// Shipper → applier: checksums of `disk` from `offset`, `count` blocks of `block` bytes.
    HashRequest {
        disk: String,
        offset: u64,
        block: u32,
        count: u32,
    },
    /// Applier → shipper: the checksums (xxh3-64 of each block; zero blocks hash as zeroes).
    Hashes {
        disk: String,
        offset: u64,
        hashes: Vec<u64>,
    },
}

impl Message {
    /// The message's name, for errors and logs (never its payload).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::BeginCycle { .. } => "BeginCycle",
            Message::Resume { .. } => "Resume",
            Message::Chunk(_) => "Chunk",
            Message::Acked { .. } => "Acked",
            Message::Manifest { .. } => "Manifest",
            Message::Applied { .. } => "Applied",
            Message::Error { .. } => "Error",
            Message::HashRequest { .. } => "HashRequest",
            Message::Hashes { .. } => "Hashes",
        }
    }
}

/// Error codes in [`Message::Error`].
pub mod code {
    pub const PROTOCOL: u16 = 1;
    pub const NOT_ALLOWED: u16 = 2;
    pub const BAD_DATA: u16 = 3;
    pub const NO_SPACE: u16 = 4;
    pub const INTERNAL: u16 = 5;
    pub const INCOMPLETE: u16 = 6;
    /// The cycle does not belong to the replica's lineage, or leaves a gap.
    pub const LINEAGE: u16 = 7;
    /// Data of an earlier receive attempt (epoch).
    pub const STALE: u16 = 8;
    /// The replica is busy (another shipper's attempt, a store operation).
    pub const BUSY: u16 = 9;
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_BEGIN: u8 = 3;
const T_RESUME: u8 = 4;
const T_CHUNK: u8 = 5;
const T_MANIFEST: u8 = 6;
const T_APPLIED: u8 = 7;
const T_ERROR: u8 = 8;
const T_HASH_REQ: u8 = 9;
const T_HASHES: u8 = 10;
const T_ACKED: u8 = 11;

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        // Cut at a character boundary at most MAX_STRING bytes in.
        let mut n = s.len().min(MAX_STRING as usize);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.u16(n as u16);
        self.0.extend_from_slice(&s.as_bytes()[..n]);
    }
    fn lineage(&mut self, l: &Lineage) {
        self.0.extend_from_slice(&l.0);
    }
    fn opt_lineage(&mut self, l: &Option<Lineage>) {
        match l {
            Some(l) => {
                self.u8(1);
                self.lineage(l);
            }
            None => self.u8(0),
        }
    }
    fn bool(&mut self, b: bool) {
        self.u8(u8::from(b));
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let (h, t) = self
            .0
            .split_at_checked(n)
            .ok_or(WireError::Truncated(what))?;
        self.0 = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2, "u16")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4, "u32")?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()?;
        if n > MAX_STRING {
            return Err(WireError::BadString);
        }
        String::from_utf8(self.take(n as usize, "string")?.to_vec())
            .map_err(|_| WireError::BadString)
    }
    fn lineage(&mut self) -> Result<Lineage, WireError> {
        let b = self.take(16, "lineage")?;
        Ok(Lineage(b.try_into().expect("16 bytes")))
    }
    fn opt_lineage(&mut self) -> Result<Option<Lineage>, WireError> {
        Ok(match self.flag()? {
            false => None,
            true => Some(self.lineage()?),
        })
    }
    /// A 0/1 byte (anything else is refused: the encoding stays canonical).
    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(WireError::BadFlag(b)),
        }
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        self.flag()
    }
    fn count(&mut self, entry_size: usize) -> Result<usize, WireError> {
        let n = self.u32()?;
        if n > MAX_LIST || (n as usize).saturating_mul(entry_size) > self.0.len() {
            return Err(WireError::ListTooLong(n));
        }
        Ok(n as usize)
    }
}

/// Appends the frame for `m` to `out`; a frame that would exceed [`MAX_FRAME`] is refused
/// (and `out` left as it was).
pub fn encode(m: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    framed(out, |w| match m {
        Message::Hello {
            version,
            vm,
            lineage,
        } => {
            w.u8(T_HELLO);
            w.u16(*version);
            w.str(vm);
            w.opt_lineage(lineage);
        }
        Message::Welcome {
            version,
            lineage,
            last_cycle,
            last_freeze,
            receiving,
        } => {
            w.u8(T_WELCOME);
            w.u16(*version);
            w.u64(*last_cycle);
            w.opt_lineage(lineage);
            w.u64(*last_freeze);
            match receiving {
                Some(r) => {
                    w.u8(1);
                    w.lineage(&r.lineage);
                    w.u64(r.cycle);
                    w.u8(r.kind as u8);
                    w.u64(r.freeze);
                }
                None => w.u8(0),
            }
        }
        Message::BeginCycle {
            lineage,
            cycle,
            kind,
            freeze,
            disks,
        } => {
            w.u8(T_BEGIN);
            w.lineage(lineage);
            w.u64(*cycle);
            w.u8(*kind as u8);
            w.u64(*freeze);
            w.u32(disks.len() as u32);
            for d in disks {
                w.str(&d.name);
                w.u64(d.size);
                w.u32(d.granularity);
            }
        }
        Message::Resume {
            lineage,
            cycle,
            epoch,
            ranges,
            last,
        } => {
            w.u8(T_RESUME);
            w.lineage(lineage);
            w.u64(*cycle);
            w.u64(*epoch);
            w.bool(*last);
            w.u32(ranges.len() as u32);
            for r in ranges {
                w.u16(r.disk);
                w.u64(r.offset);
                w.u64(r.len);
            }
        }
        Message::Chunk(c) => chunk_body(w, c),
        Message::Acked {
            cycle,
            epoch,
            bytes,
        } => {
            w.u8(T_ACKED);
            w.u64(*cycle);
            w.u64(*epoch);
            w.u64(*bytes);
        }
        Message::Manifest {
            lineage,
            cycle,
            epoch,
            ranges,
            bytes,
            digest,
        } => {
            w.u8(T_MANIFEST);
            w.lineage(lineage);
            w.u64(*cycle);
            w.u64(*epoch);
            w.u64(*ranges);
            w.u64(*bytes);
            w.u64(*digest);
        }
        Message::Applied { lineage, cycle } => {
            w.u8(T_APPLIED);
            w.lineage(lineage);
            w.u64(*cycle);
        }
        Message::Error { code, message } => {
            w.u8(T_ERROR);
            w.u16(*code);
            w.str(message);
        }
        Message::HashRequest {
            disk,
            offset,
            block,
            count,
        } => {
            w.u8(T_HASH_REQ);
            w.str(disk);
            w.u64(*offset);
            w.u32(*block);
            w.u32(*count);
        }
        Message::Hashes {
            disk,
            offset,
            hashes,
        } => {
            w.u8(T_HASHES);
            w.str(disk);
            w.u64(*offset);
            w.u32(hashes.len() as u32);
            for h in hashes {
                w.u64(*h);
            }
        }
    })
}

/// Appends one frame to `out`: its 4-byte length, then the body `body` writes; refused (and
/// `out` restored) if it would exceed [`MAX_FRAME`].
fn framed(out: &mut Vec<u8>, body: impl FnOnce(&mut W<'_>)) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(&mut W(out));
    let len = (out.len() - start - 4) as u64;
    if len > u64::from(MAX_FRAME) {
        out.truncate(start);
        return Err(WireError::FrameTooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// The answer to a `BeginCycle`: the epoch, and `applied` split into pages that each fit a
/// frame (at least one page, the last one marked).
pub fn resume_pages(lineage: Lineage, cycle: u64, epoch: u64, applied: &RangeSet) -> Vec<Message> {
    let all: Vec<Range> = applied.iter().collect();
    let mut pages: Vec<Message> = all
        .chunks(RESUME_PAGE)
        .map(|ranges| Message::Resume {
            lineage,
            cycle,
            epoch,
            ranges: ranges.to_vec(),
            last: false,
        })
        .collect();
    if pages.is_empty() {
        pages.push(Message::Resume {
            lineage,
            cycle,
            epoch,
            ranges: Vec::new(),
            last: false,
        });
    }
    if let Some(Message::Resume { last, .. }) = pages.last_mut() {
        *last = true;
    }
    pages
}

/// Bytes of a chunk frame's body before its payload.
pub const CHUNK_HEAD: usize = 60;

/// A chunk frame's body up to its payload: type, fields, payload length.
fn chunk_head(w: &mut W<'_>, c: &Chunk) {
    w.u8(T_CHUNK);
    w.lineage(&c.tag.lineage);
    w.u64(c.tag.cycle);
    w.u64(c.tag.epoch);
    w.u16(c.disk);
    w.u64(c.offset);
    w.u32(c.len);
    w.u8(c.encoding as u8);
    w.u64(c.checksum);
    w.u32(c.payload.len() as u32);
}

fn chunk_body(w: &mut W<'_>, c: &Chunk) {
    chunk_head(w, c);
    w.0.extend_from_slice(&c.payload);
}

/// The frame of `Message::Chunk(c)` up to its payload, which follows it on the wire: a sender
/// can hand the payload to the link as it is instead of copying it into one frame.
pub fn chunk_frame_head(c: &Chunk) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + CHUNK_HEAD);
    out.extend_from_slice(&[0; 4]);
    chunk_head(&mut W(&mut out), c);
    let len = (CHUNK_HEAD + c.payload.len()) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Whether a frame body starting with `head` is a chunk (see [`decode_chunk_head`]).
pub fn is_chunk(head: &[u8]) -> bool {
    head.first() == Some(&T_CHUNK)
}

/// Decodes the first [`CHUNK_HEAD`] bytes of a chunk frame's body: the chunk without its
/// payload, and the payload's length, so a receiver can read the payload straight into the
/// chunk.
pub fn decode_chunk_head(head: &[u8; CHUNK_HEAD]) -> Result<(Chunk, usize), WireError> {
    let mut r = R(head);
    match r.u8()? {
        T_CHUNK => chunk_fields(&mut r),
        t => Err(WireError::UnknownType(t)),
    }
}

/// The fields of a chunk after its type byte, then its payload length.
fn chunk_fields(r: &mut R<'_>) -> Result<(Chunk, usize), WireError> {
    let tag = Tag {
        lineage: r.lineage()?,
        cycle: r.u64()?,
        epoch: r.u64()?,
    };
    let disk = r.u16()?;
    let offset = r.u64()?;
    let len = r.u32()?;
    if len > MAX_CHUNK {
        return Err(WireError::ChunkTooLarge(len));
    }
    let encoding = match r.u8()? {
        0 => Encoding::Zero,
        1 => Encoding::Lz4,
        2 => Encoding::Raw,
        e => return Err(WireError::BadEncoding(e)),
    };
    let checksum = r.u64()?;
    let plen = r.u32()? as usize;
    if plen > MAX_FRAME as usize {
        return Err(WireError::FrameTooLarge(plen as u64));
    }
    let chunk = Chunk {
        tag,
        disk,
        offset,
        len,
        encoding,
        checksum,
        payload: Vec::new(),
    };
    Ok((chunk, plen))
}

/// Length of the frame at the front of `buf`, once its 4-byte header is there.
pub fn frame_len(header: [u8; 4]) -> Result<u32, WireError> {
    let n = u32::from_be_bytes(header);
    if n > MAX_FRAME {
        return Err(WireError::FrameTooLarge(n.into()));
    }
    Ok(n)
}

/// Decodes one frame from the front of `buf`; `Ok(None)` if it is not complete yet.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    let Some(h) = buf.get(..4) else {
        return Ok(None);
    };
    let n = frame_len([h[0], h[1], h[2], h[3]])? as usize;
    let Some(body) = buf.get(4..4 + n) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, 4 + n)))
}

/// Decodes a frame body (everything after the length).
pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    let mut r = R(body);
    let m = match r.u8()? {
        T_HELLO => {
            let version = r.u16()?;
            let vm = r.str()?;
            // Version 1 ended here: such a hello decodes, so that it can be refused by version.
            let lineage = if r.0.is_empty() && version != PROTOCOL_VERSION {
                None
            } else {
                r.opt_lineage()?
            };
            Message::Hello {
                version,
                vm,
                lineage,
            }
        }
        T_WELCOME => {
            let version = r.u16()?;
            let last_cycle = r.u64()?;
            // Version 1 ended here (see Hello).
            let (lineage, last_freeze, receiving) = if r.0.is_empty() && version != PROTOCOL_VERSION
            {
                (None, 0, None)
            } else {
                let lineage = r.opt_lineage()?;
                let last_freeze = r.u64()?;
                let receiving = match r.flag()? {
                    false => None,
                    true => Some(Receiving {
                        lineage: r.lineage()?,
                        cycle: r.u64()?,
                        kind: CycleKind::from_u8(r.u8()?)?,
                        freeze: r.u64()?,
                    }),
                };
                (lineage, last_freeze, receiving)
            };
            Message::Welcome {
                version,
                lineage,
                last_cycle,
                last_freeze,
                receiving,
            }
        }
        T_BEGIN => {
            let lineage = r.lineage()?;
            let cycle = r.u64()?;
            let kind = CycleKind::from_u8(r.u8()?)?;
            let freeze = r.u64()?;
            let n = r.count(14)?;
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                disks.push(DiskInfo {
                    name: r.str()?,
                    size: r.u64()?,
                    granularity: r.u32()?,
                });
            }
            Message::BeginCycle {
                lineage,
                cycle,
                kind,
                freeze,
                disks,
            }
        }
        T_RESUME => {
            let lineage = r.lineage()?;
            let cycle = r.u64()?;
            let epoch = r.u64()?;
            let last = r.bool()?;
            let n = r.count(18)?;
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                ranges.push(Range {
                    disk: r.u16()?,
                    offset: r.u64()?,
                    len: r.u64()?,
                });
            }
            Message::Resume {
                lineage,
                cycle,
                epoch,
                ranges,
                last,
            }
        }
        T_CHUNK => {
            let (mut c, plen) = chunk_fields(&mut r)?;
            c.payload = r.take(plen, "chunk payload")?.to_vec();
            Message::Chunk(c)
        }
        T_ACKED => Message::Acked {
            cycle: r.u64()?,
            epoch: r.u64()?,
            bytes: r.u64()?,
        },
        T_MANIFEST => Message::Manifest {
            lineage: r.lineage()?,
            cycle: r.u64()?,
            epoch: r.u64()?,
            ranges: r.u64()?,
            bytes: r.u64()?,
            digest: r.u64()?,
        },
        T_APPLIED => Message::Applied {
            lineage: r.lineage()?,
            cycle: r.u64()?,
        },
        T_ERROR => Message::Error {
            code: r.u16()?,
            message: r.str()?,
        },
        T_HASH_REQ => Message::HashRequest {
            disk: r.str()?,
            offset: r.u64()?,
            block: r.u32()?,
            count: r.u32()?,
        },
        T_HASHES => {
            let disk = r.str()?;
            let offset = r.u64()?;
            let n = r.count(8)?;
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                hashes.push(r.u64()?);
            }
            Message::Hashes {
                disk,
                offset,
                hashes,
            }
        }
        t => return Err(WireError::UnknownType(t)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(m)
}

/// Checksum of a block as used by chunks and verification.
pub fn checksum(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// Whether every byte is zero. Folds 4 KiB at a time without an early exit inside, so the
/// compiler vectorises it; `iter().all()` goes byte by byte.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// MAX_CHUNK zero bytes, for checksums of zero runs without allocating them.
static ZEROES: [u8; MAX_CHUNK as usize] = [0; MAX_CHUNK as usize];

thread_local! {
    /// lz4's worst-case output for one chunk, reused by every chunk this thread packs.
    static LZ4_OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Chunk {
    /// A zero marker for `len` bytes at `offset` (what [`Chunk::pack`] makes of zeroes).
    pub fn zeroes(tag: Tag, disk: u16, offset: u64, len: u32) -> Chunk {
        assert!(len <= MAX_CHUNK);
        Chunk {
            tag,
            disk,
            offset,
            len,
            encoding: Encoding::Zero,
            checksum: checksum(&ZEROES[..len as usize]),
            payload: Vec::new(),
        }
    }

    /// Packs `data`: a zero marker if all zero, else lz4 if `compress` and it shrinks, else raw.
    pub fn pack(tag: Tag, disk: u16, offset: u64, data: &[u8], compress: bool) -> Chunk {
        assert!(data.len() <= MAX_CHUNK as usize);
        let checksum = checksum(data);
        let (encoding, payload) = if is_zero(data) {
            (Encoding::Zero, Vec::new())
        } else if compress {
            // Compressed into this thread's worst-case buffer, then copied out at its size: no
            // chunk zeroes a worst-case buffer of its own or keeps its spare capacity in flight.
            let c = LZ4_OUT.with_borrow_mut(|out| {
                out.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
                lz4_flex::block::compress_into(data, out)
                    .ok()
                    .filter(|&n| n < data.len())
                    .map(|n| out[..n].to_vec())
            });
            match c {
                Some(c) => (Encoding::Lz4, c),
                None => (Encoding::Raw, data.to_vec()),
            }
        } else {
            (Encoding::Raw, data.to_vec())
        };
        Chunk {
            tag,
            disk,
            offset,
            len: data.len() as u32,
            encoding,
            checksum,
            payload,
        }
    }

    /// Packs `data` (the disk's bytes from `offset`) as one chunk per run of `block`-sized
    /// blocks that are all zero or all not: every zero block travels as a zero marker (and
    /// becomes a hole on the replica) even amid data. Block boundaries are where the disk's
    /// offset is a multiple of `block` (a granularity; 0 packs `data` whole).
    pub fn pack_blocks(
        tag: Tag,
        disk: u16,
        offset: u64,
        data: &[u8],
        block: u32,
        compress: bool,
    ) -> Vec<Chunk> {
        let block = u64::from(block);
        let run = |start: usize, end: usize| {
            Chunk::pack(
                tag,
                disk,
                offset + start as u64,
                &data[start..end],
                compress,
            )
        };
        let mut out = Vec::new();
        let mut start = 0usize;
        let mut zero_run = None;
        let mut pos = 0usize;
        while pos < data.len() {
            // The next block boundary (or the end).
            let at = offset + pos as u64;
            let next = match at.checked_div(block) {
                Some(b) => ((b + 1) * block - offset).min(data.len() as u64) as usize,
                None => data.len(),
            };
            let zero = is_zero(&data[pos..next]);
            if zero_run.is_some_and(|z| z != zero) {
                out.push(run(start, pos));
                start = pos;
            }
            zero_run = Some(zero);
            pos = next;
        }
        if pos > start {
            out.push(run(start, pos));
        }
        out
    }

    /// The disk range the chunk covers.
    pub fn range(&self) -> Range {
        Range {
            disk: self.disk,
            offset: self.offset,
            len: u64::from(self.len),
        }
    }

    fn bad(&self, reason: impl Into<String>) -> WireError {
        WireError::BadChunk {
            disk: self.disk,
            offset: self.offset,
            reason: reason.into(),
        }
    }

    /// The uncompressed bytes, checked against the checksum. `None` for a zero chunk.
    pub fn unpack(&self) -> Result<Option<Vec<u8>>, WireError> {
        let mut out = Vec::new();
        let zero = self.unpack_into(&mut out)?.is_none();
        Ok(match self.encoding {
            _ if zero => None,
            Encoding::Raw => Some(self.payload.clone()),
            _ => Some(out),
        })
    }

    /// Like [`Chunk::unpack`], decompressing into `scratch` (reused across calls: neither
    /// allocated nor zeroed again once large enough); a raw payload is checked in place.
    pub fn unpack_into<'a>(
        &'a self,
        scratch: &'a mut Vec<u8>,
    ) -> Result<Option<&'a [u8]>, WireError> {
        if self.check_zero()? {
            return Ok(None);
        }
        let len = self.len as usize;
        let data: &[u8] = match self.encoding {
            Encoding::Lz4 => {
                scratch.resize(len, 0);
                self.decompress_to(&mut scratch[..len])?;
                &scratch[..len]
            }
            _ => &self.payload,
        };
        self.check(data)?;
        Ok(Some(data))
    }

    /// Like [`Chunk::unpack`], into `buf[at..at + len]`, where `at` (returned; None for a zero
    /// chunk) is the first [`direct::ALIGN`]ed place in `buf`: the bytes are ready for a direct
    /// write. `buf` is reused across calls (not allocated or zeroed again once large enough);
    /// a raw payload is copied into it.
    pub fn unpack_aligned(&self, buf: &mut Vec<u8>) -> Result<Option<usize>, WireError> {
        if self.check_zero()? {
            return Ok(None);
        }
        let len = self.len as usize;
        let at = direct::aligned(buf, len);
        let dst = &mut buf[at..];
        match self.encoding {
            Encoding::Lz4 => self.decompress_to(dst)?,
            _ if self.payload.len() == len => dst.copy_from_slice(&self.payload),
            _ => return Err(self.bad("length differs")),
        }
        self.check(dst)?;
        Ok(Some(at))
    }

    /// Checks the length and, for a zero marker, the marker itself: true if this is one.
    fn check_zero(&self) -> Result<bool, WireError> {
        if self.len > MAX_CHUNK {
            return Err(WireError::ChunkTooLarge(self.len));
        }
        if self.encoding != Encoding::Zero {
            return Ok(false);
        }
        if !self.payload.is_empty() {
            return Err(self.bad("zero chunk with a payload"));
        }
        if self.checksum != checksum(&ZEROES[..self.len as usize]) {
            return Err(self.bad("checksum mismatch"));
        }
        Ok(true)
    }

    /// Decompresses the lz4 payload into all of `dst` (the chunk's length).
    fn decompress_to(&self, dst: &mut [u8]) -> Result<(), WireError> {
        let n = lz4_flex::block::decompress_into(&self.payload, dst)
            .map_err(|e| self.bad(format!("lz4: {e}")))?;
        if n != dst.len() {
            return Err(self.bad("decompressed length differs"));
        }
        Ok(())
    }

    /// Checks unpacked `data` against the chunk's length and checksum.
    fn check(&self, data: &[u8]) -> Result<(), WireError> {
        if data.len() != self.len as usize {
            return Err(self.bad("length differs"));
        }
        if checksum(data) != self.checksum {
            return Err(self.bad("checksum mismatch"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(cycle: u64) -> Tag {
        Tag {
            lineage: Lineage([7; 16]),
            cycle,
            epoch: 3,
        }
    }

    fn frame(m: &Message) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(m, &mut buf).unwrap();
        buf
    }

    fn all() -> Vec<Message> {
        let l = Lineage([9; 16]);
        vec![
            Message::Hello {
                version: 2,
                vm: "vm1".into(),
                lineage: Some(l),
            },
            Message::Hello {
                version: 2,
                vm: "vm1".into(),
                lineage: None,
            },
            Message::Welcome {
                version: 2,
                lineage: Some(l),
                last_cycle: 7,
                last_freeze: 77,
                receiving: Some(Receiving {
                    lineage: l,
                    cycle: 8,
                    kind: CycleKind::Resync,
                    freeze: 88,
                }),
            },
            Message::Welcome {
                version: 2,
                lineage: None,
                last_cycle: 0,
                last_freeze: 0,
                receiving: None,
            },
            Message::BeginCycle {
                lineage: l,
                cycle: 8,
                kind: CycleKind::Initial,
                freeze: 88,
                disks: vec![DiskInfo {
                    name: "sys".into(),
                    size: 1 << 30,
                    granularity: 65536,
                }],
            },
            Message::Resume {
                lineage: l,
                cycle: 8,
                epoch: 4,
                ranges: vec![Range {
                    disk: 1,
                    offset: 4096,
                    len: 1 << 33,
                }],
                last: true,
            },
            Message::Chunk(Chunk::pack(tag(8), 0, 65536, &[7u8; 4096], true)),
            Message::Acked {
                cycle: 8,
                epoch: 4,
                bytes: 1 << 20,
            },
            Message::Manifest {
                lineage: l,
                cycle: 8,
                epoch: 4,
                ranges: 3,
                bytes: 99,
                digest: 5,
            },
            Message::Applied {
                lineage: l,
                cycle: 8,
            },
            Message::Error {
                code: code::NOT_ALLOWED,
                message: "no".into(),
            },
            Message::HashRequest {
                disk: "sys".into(),
                offset: 0,
                block: 65536,
                count: 16,
            },
            Message::Hashes {
                disk: "sys".into(),
                offset: 0,
                hashes: vec![1, 2, 3],
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_partial_frames_wait() {
        for m in all() {
            let buf = frame(&m);
            for cut in 0..buf.len() {
                assert_eq!(decode(&buf[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
            assert_eq!(decode(&buf), Ok(Some((m.clone(), buf.len()))));
        }
    }

    #[test]
    fn version_1_hello_and_welcome_decode_so_they_can_be_refused() {
        // Version 1 layouts: type, version, then the VM name / the last cycle.
        let mut hello = vec![T_HELLO, 0, 1, 0, 3];
        hello.extend_from_slice(b"vm1");
        let mut f = (hello.len() as u32).to_be_bytes().to_vec();
        f.extend(hello);
        assert_eq!(
            decode(&f).unwrap().unwrap().0,
            Message::Hello {
                version: 1,
                vm: "vm1".into(),
                lineage: None
            }
        );
        let mut welcome = vec![T_WELCOME, 0, 1];
        welcome.extend(5u64.to_be_bytes());
        let mut f = (welcome.len() as u32).to_be_bytes().to_vec();
        f.extend(welcome);
        assert_eq!(
            decode(&f).unwrap().unwrap().0,
            Message::Welcome {
                version: 1,
                lineage: None,
                last_cycle: 5,
                last_freeze: 0,
                receiving: None
            }
        );
        // A version 2 hello must carry its lineage field.
        let mut cut = frame(&Message::Hello {
            version: 2,
            vm: "vm1".into(),
            lineage: None,
        });
        cut.pop();
        cut[3] -= 1;
        assert!(decode(&cut).is_err());
    }

    #[test]
    fn a_chunk_frame_splits_into_head_and_payload() {
        let c = Chunk::pack(tag(8), 1, 65536, &[7u8; 4096], true);
        let whole = frame(&Message::Chunk(c.clone()));
        let head = chunk_frame_head(&c);
        assert_eq!([head.as_slice(), &c.payload].concat(), whole);
        assert_eq!(head.len(), 4 + CHUNK_HEAD);
        assert!(is_chunk(&head[4..]));
        let (got, plen) = decode_chunk_head(head[4..].try_into().unwrap()).unwrap();
        assert_eq!(plen, c.payload.len());
        assert_eq!(
            Chunk {
                payload: c.payload.clone(),
                ..got
            },
            c
        );
        let mut bad = head.clone();
        // The length field: after type, lineage, cycle, epoch, disk and offset.
        let at = 4 + 1 + 16 + 8 + 8 + 2 + 8;
        bad[at..at + 4].copy_from_slice(&(MAX_CHUNK + 1).to_be_bytes());
        assert_eq!(
            decode_chunk_head(bad[4..].try_into().unwrap()),
            Err(WireError::ChunkTooLarge(MAX_CHUNK + 1))
        );
        assert!(!is_chunk(&[T_HELLO]));
    }

    #[test]
    fn hostile_frames_are_refused_without_big_allocations() {
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(WireError::FrameTooLarge(u32::MAX.into()))
        );
        // A list count far beyond the frame's bytes.
        let mut f = vec![0, 0, 0, 38, T_RESUME];
        f.extend([0u8; 16]);
        f.extend(8u64.to_be_bytes());
        f.extend(1u64.to_be_bytes());
        f.push(1);
        f.extend(u32::MAX.to_be_bytes());
        assert!(matches!(decode(&f), Err(WireError::ListTooLong(_))));
        assert!(matches!(
            decode(&[0, 0, 0, 1, 200]),
            Err(WireError::UnknownType(200))
        ));
        let mut buf = frame(&Message::Acked {
            cycle: 1,
            epoch: 1,
            bytes: 1,
        });
        buf[3] += 1;
        buf.push(0);
        assert_eq!(decode(&buf), Err(WireError::Trailing(1)));
    }

    #[test]
    fn the_encoder_refuses_frames_over_the_limit_and_a_huge_resume_is_paged() {
        // More than 190,000 chunks' worth of ranges (apart, so none merge): one frame could
        // not hold them.
        let mut applied = RangeSet::new();
        for i in 0..300_000u64 {
            applied.insert((i % 3) as u16, i * 131072, i * 131072 + 65536);
        }
        let l = Lineage([1; 16]);
        let whole = Message::Resume {
            lineage: l,
            cycle: 9,
            epoch: 2,
            ranges: applied.iter().collect(),
            last: true,
        };
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode(&whole, &mut out),
            Err(WireError::FrameTooLarge(_))
        ));
        assert_eq!(out, [1, 2, 3], "a refused frame leaves nothing behind");
        let pages = resume_pages(l, 9, 2, &applied);
        assert!(pages.len() >= 3);
        let mut back = RangeSet::new();
        let mut lasts = Vec::new();
        for p in &pages {
            let f = frame(p);
            assert!(f.len() <= MAX_FRAME as usize + 4);
            match decode(&f).unwrap().unwrap().0 {
                Message::Resume {
                    ranges,
                    last,
                    epoch,
                    ..
                } => {
                    assert_eq!(epoch, 2);
                    lasts.push(last);
                    ranges.into_iter().for_each(|r| back.insert_range(r));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, applied);
        assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
        assert_eq!(lasts.last(), Some(&true));
        // Nothing applied: one empty, last page.
        assert_eq!(resume_pages(l, 9, 2, &RangeSet::new()).len(), 1);
        // A string longer than the limit is cut at a character boundary, not split.
        let long = "é".repeat(3000);
        let f = frame(&Message::Error {
            code: 1,
            message: long,
        });
        match decode(&f).unwrap().unwrap().0 {
            Message::Error { message, .. } => assert!(message.len() <= MAX_STRING as usize),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunks_pick_their_encoding_and_verify_checksums() {
        let t = tag(1);
        let zero = Chunk::pack(t, 0, 0, &[0u8; 65536], true);
        assert_eq!((zero.encoding, zero.payload.len()), (Encoding::Zero, 0));
        assert_eq!(zero.unpack(), Ok(None));
        let text: Vec<u8> = b"replicate me "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let c = Chunk::pack(t, 0, 0, &text, true);
        assert_eq!(c.encoding, Encoding::Lz4);
        assert!(c.payload.len() < 2000);
        assert_eq!(c.unpack().unwrap().unwrap(), text);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let r = Chunk::pack(t, 0, 0, &noise, true);
        assert_eq!(r.encoding, Encoding::Raw);
        let mut bad = c.clone();
        bad.payload[10] ^= 0x55;
        assert!(bad.unpack().is_err());
        let mut lie = r.clone();
        lie.checksum ^= 1;
        assert!(matches!(lie.unpack(), Err(WireError::BadChunk { .. })));
        let mut zlie = zero.clone();
        zlie.len = 4096;
        assert!(zlie.unpack().is_err());
        // A scratch buffer left longer and dirty by an earlier chunk still unpacks exactly.
        let mut scratch = vec![0xee; 2 * 65536];
        let short = Chunk::pack(t, 0, 0, &text[..4096], true);
        assert_eq!(
            short.unpack_into(&mut scratch).unwrap(),
            Some(&text[..4096])
        );
        assert_eq!(c.unpack_into(&mut scratch).unwrap(), Some(&text[..]));
        assert_eq!(r.unpack_into(&mut scratch).unwrap(), Some(&noise[..]));
        assert_eq!(zero.unpack_into(&mut scratch).unwrap(), None);
        assert!(bad.unpack_into(&mut scratch).is_err());
        // Aligned: the bytes land at an aligned start of the (dirty, reused) buffer, exactly
        // `len` of them up to its end, whether they were compressed or raw.
        let mut buf = vec![0xee; 3 * 65536];
        for (chunk, want) in [(&short, &text[..4096]), (&c, &text[..]), (&r, &noise[..])] {
            let at = chunk.unpack_aligned(&mut buf).unwrap().unwrap();
            assert_eq!((buf.as_ptr() as usize + at) % direct::ALIGN, 0);
            assert_eq!(&buf[at..], want);
        }
        assert_eq!(zero.unpack_aligned(&mut buf).unwrap(), None);
        assert!(bad.unpack_aligned(&mut buf).is_err());
        assert!(lie.unpack_aligned(&mut buf).is_err());
        let mut short_raw = r.clone();
        short_raw.payload.pop();
        assert!(short_raw.unpack_aligned(&mut buf).is_err());
        // A packed payload keeps no worst-case spare capacity while it is in flight.
        assert_eq!(c.payload.capacity(), c.payload.len());
    }

    #[test]
    fn zero_blocks_amid_data_travel_as_zero_markers() {
        const B: usize = 4096;
        let t = tag(1);
        // Blocks: data, zero, zero, data, zero (the last one short), from a disk offset that
        // is not a block boundary: the first "block" is the 1 KiB up to the boundary.
        let mut data = vec![0u8; 1024 + 4 * B + 100];
        data[..1024].fill(7);
        data[1024 + 2 * B..1024 + 3 * B].fill(9);
        let offset = 3 * B as u64 + 3072;
        let chunks = Chunk::pack_blocks(t, 2, offset, &data, B as u32, true);
        let shape: Vec<(u64, u32, Encoding)> = chunks
            .iter()
            .map(|c| (c.offset, c.len, c.encoding))
            .collect();
        let o = offset;
        assert_eq!(
            shape,
            vec![
                (o, 1024, Encoding::Lz4),
                (o + 1024, 2 * B as u32, Encoding::Zero),
                (o + 1024 + 2 * B as u64, B as u32, Encoding::Lz4),
                (o + 1024 + 3 * B as u64, B as u32 + 100, Encoding::Zero),
            ]
        );
        // Unpacked back to back, they are the data; together they tile the run.
        let mut back = Vec::new();
        let mut covered = RangeSet::new();
        for c in &chunks {
            assert_eq!((c.tag, c.disk), (t, 2));
            covered.insert_range(c.range());
            match c.unpack().unwrap() {
                Some(d) => back.extend(d),
                None => back.extend(vec![0u8; c.len as usize]),
            }
        }
        assert_eq!(back, data);
        assert_eq!(
            covered.iter().collect::<Vec<_>>(),
            vec![Range {
                disk: 2,
                offset,
                len: data.len() as u64
            }]
        );
        // All data, or all zero: one chunk, as `pack` makes it.
        assert_eq!(
            Chunk::pack_blocks(t, 0, 0, &[5; 3 * B], B as u32, true).len(),
            1
        );
        let z = Chunk::pack_blocks(t, 0, 0, &[0; 3 * B], B as u32, true);
        assert_eq!((z.len(), z[0].encoding), (1, Encoding::Zero));
        // No block size: packed whole.
        assert_eq!(Chunk::pack_blocks(t, 0, offset, &data, 0, true).len(), 1);
        assert!(Chunk::pack_blocks(t, 0, 0, &[], B as u32, true).is_empty());
    }
}
