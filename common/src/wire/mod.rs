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
//! Version 2: every cycle message carries its lineage and cycle, and every data frame the
//! receive attempt's epoch; the resume answer is the durably applied set of ranges (paged),
//! and the manifest proves a cycle complete by the digest of its ranges. Version 3 (this one)
//! adds failover (see [`failover`]): the replica's role in `Welcome`, `Reverse` cycles with
//! the point they continue, the divergent ranges a replica waiting for one sends, `Promote`
//! (planned failover) and `Reverse` requests. Version 4 (this one) adds the operator's pause
//! (see [`pause`]): the pause the replica records in `Welcome`, and `Paused`, `Resumed`,
//! `PauseNoted`. Version 3 was the one before it. A peer of another version is refused at
//! hello with a message that names both versions and the site to upgrade
//! ([`version_refused`]): `Hello` and `Welcome` decode in every version's layout for that.
//!
//! The VM's definition travels with its disks ([`definition`]): `Welcome` ends with the
//! replica's [`DefinitionHash`] when it holds one (a welcome without it decodes as holding
//! none), and `Definition` / `DefinitionStored` carry a new one and its fate. A peer that
//! predates them never receives them: the shipper sends a definition only to a replica whose
//! welcome said which one it holds, or that it holds none.

mod chunk;
pub mod definition;
mod failover;
mod pause;

#[cfg(test)]
pub(crate) use chunk::incompressible;
pub use chunk::{
    checksum, chunk_frame_head, decode_chunk_head, is_chunk, is_zero, zero_checksum, CHUNK_HEAD,
};
pub use definition::{DefinitionHash, ReverseTarget, MAX_DEFINITION};
pub use failover::{divergent_pages, failed_over_message, Endpoint, LineagePoint, Role};

use crate::lineage::Lineage;
use crate::ranges::{Range, RangeSet};
use thiserror::Error;

pub const PROTOCOL_VERSION: u16 = 4;

/// The refusal of a peer that speaks replication protocol `theirs` (not
/// [`PROTOCOL_VERSION`]): names both versions and the site whose vmreplica is older.
/// `peer` and `me` name the two programs (`"the applier"`, `"this shipper"`), `peer_site`
/// and `my_site` their sites (`"replica"`, `"primary"`).
pub fn version_refused(
    peer: &str,
    theirs: u16,
    me: &str,
    peer_site: &str,
    my_site: &str,
) -> String {
    let older = if theirs < PROTOCOL_VERSION {
        format!("the {peer_site} site")
    } else {
        format!("this ({my_site}) site")
    };
    format!(
        "{peer} speaks replication protocol version {theirs}, {me} version {PROTOCOL_VERSION}: \
         both sites must run the same vmreplica; upgrade vmreplica on {older}"
    )
}

/// Most uncompressed bytes in one chunk.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Largest frame (a chunk that did not compress, plus headers, fits easily).
pub const MAX_FRAME: u32 = 4 << 20;
/// Highest cycle (generation) number anyone takes: far beyond any real history, and low
/// enough that `cycle + 1` never overflows anywhere.
pub const MAX_CYCLE: u64 = u64::MAX / 2;
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
    #[error("VM definition of {0} bytes exceeds the {MAX_DEFINITION}-byte limit")]
    DefinitionTooLarge(u32),
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
    /// The first cycle after a failover, towards the site that was primary before it: the
    /// ranges where the two sites can differ, continuing a point the replica holds (its
    /// `parent`).
    Reverse = 3,
}

impl CycleKind {
    pub fn name(self) -> &'static str {
        match self {
            CycleKind::Delta => "delta",
            CycleKind::Initial => "initial",
            CycleKind::Resync => "resync",
            CycleKind::Reverse => "reverse",
        }
    }

    pub fn from_name(s: &str) -> Option<CycleKind> {
        match s {
            "delta" => Some(CycleKind::Delta),
            "initial" => Some(CycleKind::Initial),
            "resync" => Some(CycleKind::Resync),
            "reverse" => Some(CycleKind::Reverse),
            _ => None,
        }
    }

    fn from_u8(k: u8) -> Result<CycleKind, WireError> {
        match k {
            0 => Ok(CycleKind::Delta),
            1 => Ok(CycleKind::Initial),
            2 => Ok(CycleKind::Resync),
            3 => Ok(CycleKind::Reverse),
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

/// What a cycle tells the replica besides its blocks, for status and failover. Added within
/// protocol 2: encoded after the disks of a `BeginCycle` (a tag byte, then the fields) only
/// when it is not the default, so a `BeginCycle` without it reads as before.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CycleMeta {
    /// The guest's filesystems were frozen through its agent for this freeze.
    pub app_consistent: bool,
    /// When the tracker froze the generation, seconds since the epoch (0: unknown).
    pub frozen_at: u64,
    /// The primary's interval in seconds (0: unknown, [`CycleMeta::CONTINUOUS`]: continuous).
    pub interval: u64,
    /// The RPO past which the VM's health is critical, seconds (0: unknown).
    pub rpo_limit: u64,
    /// Disks the tracker serves without replicating them (name, size): failover recreates
    /// them blank.
    pub excluded: Vec<(String, u64)>,
}

impl CycleMeta {
    pub const CONTINUOUS: u64 = u64::MAX;
    const TAG: u8 = 1;
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
    /// freeze id of that cycle (0: unknown), the cycle it holds in part, if any, and the VM
    /// definition it holds, if any.
    Welcome {
        version: u16,
        lineage: Option<Lineage>,
        last_cycle: u64,
        last_freeze: u64,
        receiving: Option<Receiving>,
        definition: Option<DefinitionHash>,
        /// What the site is for this VM (a replica, or failed over: see [`Role`]).
        role: Role,
        /// The primary's pause the replica records: since when (seconds since the epoch, the
        /// primary's clock), or None. Version 4.
        paused: Option<u64>,
    },
    /// Shipper → applier: a cycle starts (or resumes): the tracker's generation `cycle` of
    /// `lineage`, frozen as freeze `freeze`. A `Reverse` cycle names the point it continues.
    BeginCycle {
        lineage: Lineage,
        cycle: u64,
        kind: CycleKind,
        freeze: u64,
        disks: Vec<DiskInfo>,
        parent: Option<LineagePoint>,
        meta: CycleMeta,
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
    /// Shipper → applier, on the control stream: the VM's definition (`VmDefinition::to_toml()`,
    /// at most [`MAX_DEFINITION`] bytes) and the primary site's reverse target, whose
    /// [`DefinitionHash::of`] is `hash`; sent when the replica's hash differs.
    Definition {
        hash: DefinitionHash,
        definition: String,
        reverse: Option<ReverseTarget>,
    },
    /// Applier → shipper: the definition `hash` is stored (`error` None), or refused (the
    /// replica keeps the one it had; replication goes on either way).
    DefinitionStored {
        hash: DefinitionHash,
        error: Option<String>,
    },
    /// Applier → shipper, after a `Welcome` with [`Role::ReversePending`], in pages: the
    /// ranges where this site's disks may differ from the point the reverse cycle continues
    /// (its unreplicated writes); the shipper ships them with its own. `last` ends the list.
    Divergent { ranges: Vec<Range>, last: bool },
    /// Old primary → replica (planned failover): the replica holds exactly `(lineage,
    /// cycle)`, the primary's sealed last cycle; become the primary in a new lineage that
    /// continues it, start the VM (`start`, from `definition` if given), and replicate back to
    /// `back` (the old primary site's applier), which reaches this site as `here`.
    Promote {
        lineage: Lineage,
        cycle: u64,
        back: Endpoint,
        here: Endpoint,
        interval: String,
        start: bool,
        definition: Option<String>,
    },
    /// Replica → old primary: promoted; the new lineage.
    Promoted { lineage: Lineage },
    /// Old primary → new primary (after an unplanned failover): replicate back to `back`
    /// (`here`: how that site reaches this one). `start` false only checks (split brain,
    /// commit); `last_write_at` is the old primary's last write (seconds since the epoch);
    /// `discard_local`: its writes since the failover may be overwritten.
    Reverse {
        start: bool,
        discard_local: bool,
        last_write_at: u64,
        back: Endpoint,
        here: Endpoint,
        interval: String,
    },
    /// New primary → old primary: the reverse is accepted (or would be): the new lineage,
    /// the point it continues, the failover's time.
    ReverseOk {
        lineage: Lineage,
        parent: LineagePoint,
        since: u64,
    },
    /// Shipper → applier: an operator paused replication at `since` (seconds since the
    /// epoch): record it (see [`pause`]).
    Paused { since: u64 },
    /// Shipper → applier: replication was resumed at `at` (0: unknown): end the pause.
    Resumed { at: u64 },
    /// Applier → shipper, the answer to `Paused` and `Resumed`: the pause the replica records
    /// now (saved), or None.
    PauseNoted { paused: Option<u64> },
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
            Message::Definition { .. } => "Definition",
            Message::DefinitionStored { .. } => "DefinitionStored",
            Message::Divergent { .. } => "Divergent",
            Message::Promote { .. } => "Promote",
            Message::Promoted { .. } => "Promoted",
            Message::Reverse { .. } => "Reverse",
            Message::ReverseOk { .. } => "ReverseOk",
            Message::Paused { .. } => "Paused",
            Message::Resumed { .. } => "Resumed",
            Message::PauseNoted { .. } => "PauseNoted",
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
    /// The VM failed over to the replica site: it takes no cycles from the old primary.
    pub const FAILED_OVER: u16 = 10;
    /// Both sites wrote since their last common point: refused until an operator chooses.
    pub const SPLIT_BRAIN: u16 = 11;
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
const T_DEFINITION: u8 = 17;
const T_DEFINITION_STORED: u8 = 18;
const T_DIVERGENT: u8 = 12;
const T_PROMOTE: u8 = 13;
const T_PROMOTED: u8 = 14;
const T_REVERSE: u8 = 15;
const T_REVERSE_OK: u8 = 16;
const T_PAUSED: u8 = 19;
const T_RESUMED: u8 = 20;
const T_PAUSE_NOTED: u8 = 21;

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
    fn opt_str(&mut self, s: &Option<String>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }

    fn ranges(&mut self, ranges: &[Range]) {
        self.u32(ranges.len() as u32);
        for r in ranges {
            self.u16(r.disk);
            self.u64(r.offset);
            self.u64(r.len);
        }
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
    fn opt_str(&mut self) -> Result<Option<String>, WireError> {
        Ok(match self.flag()? {
            false => None,
            true => Some(self.str()?),
        })
    }
    fn hash(&mut self) -> Result<DefinitionHash, WireError> {
        let b = self.take(16, "definition hash")?;
        Ok(DefinitionHash(b.try_into().expect("16 bytes")))
    }
    fn count(&mut self, entry_size: usize) -> Result<usize, WireError> {
        let n = self.u32()?;
        if n > MAX_LIST || (n as usize).saturating_mul(entry_size) > self.0.len() {
            return Err(WireError::ListTooLong(n));
        }
        Ok(n as usize)
    }
    fn ranges(&mut self) -> Result<Vec<Range>, WireError> {
        let n = self.count(18)?;
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            ranges.push(Range {
                disk: self.u16()?,
                offset: self.u64()?,
                len: self.u64()?,
            });
        }
        Ok(ranges)
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
            definition,
            role,
            paused,
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
            // Version 2 ended here.
            if *version >= 3 {
                w.role(role);
            }
            if *version >= 4 {
                // Always a flag from version 4 on, so that the pause can follow.
                w.u8(u8::from(definition.is_some()));
                if let Some(h) = definition {
                    w.0.extend_from_slice(&h.0);
                }
                w.opt_time(paused);
            } else if let Some(h) = definition {
                // Version 3: absent, not a 0 flag, when there is none.
                w.u8(1);
                w.0.extend_from_slice(&h.0);
            }
        }
        Message::BeginCycle {
            lineage,
            cycle,
            kind,
            freeze,
            disks,
            parent,
            meta,
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
            w.opt_point(parent);
            if *meta != CycleMeta::default() {
                w.u8(CycleMeta::TAG);
                w.bool(meta.app_consistent);
                w.u64(meta.frozen_at);
                w.u64(meta.interval);
                w.u64(meta.rpo_limit);
                w.u32(meta.excluded.len() as u32);
                for (name, size) in &meta.excluded {
                    w.str(name);
                    w.u64(*size);
                }
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
            w.ranges(ranges);
        }
        Message::Chunk(c) => chunk::chunk_body(w, c),
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
        Message::Definition {
            hash,
            definition,
            reverse,
        } => {
            w.u8(T_DEFINITION);
            w.0.extend_from_slice(&hash.0);
            // Longer than the limit: the decoder refuses it (so does the frame bound).
            w.u32(definition.len().min(u32::MAX as usize) as u32);
            w.0.extend_from_slice(definition.as_bytes());
            match reverse {
                Some(r) => {
                    w.u8(1);
                    w.str(&r.replica);
                    w.str(&r.server_name);
                }
                None => w.u8(0),
            }
        }
        Message::DefinitionStored { hash, error } => {
            w.u8(T_DEFINITION_STORED);
            w.0.extend_from_slice(&hash.0);
            w.opt_str(error);
        }
        Message::Divergent { ranges, last } => {
            w.u8(T_DIVERGENT);
            w.bool(*last);
            w.ranges(ranges);
        }
        m @ (Message::Promote { .. }
        | Message::Promoted { .. }
        | Message::Reverse { .. }
        | Message::ReverseOk { .. }) => failover::encode(w, m),
        m @ (Message::Paused { .. } | Message::Resumed { .. } | Message::PauseNoted { .. }) => {
            pause::encode(w, m)
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
            let lineage = if r.0.is_empty() && version == 1 {
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
            let (lineage, last_freeze, receiving) = if r.0.is_empty() && version == 1 {
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
            // Versions 1 and 2 ended here.
            let role = if version >= 3 {
                r.role()?
            } else {
                Role::Replica
            };
            // The definition's hash, if the replica holds one (version 3: absent when none).
            let definition = if version >= 4 {
                match r.flag()? {
                    true => Some(r.hash()?),
                    false => None,
                }
            } else if r.0.is_empty() {
                None
            } else {
                match r.u8()? {
                    1 => Some(r.hash()?),
                    b => return Err(WireError::BadFlag(b)),
                }
            };
            let paused = if version >= 4 { r.opt_time()? } else { None };
            Message::Welcome {
                version,
                lineage,
                last_cycle,
                last_freeze,
                receiving,
                definition,
                role,
                paused,
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
            let parent = r.opt_point()?;
            let mut meta = CycleMeta::default();
            if !r.0.is_empty() {
                match r.u8()? {
                    CycleMeta::TAG => {}
                    t => return Err(WireError::BadFlag(t)),
                }
                meta.app_consistent = r.bool()?;
                meta.frozen_at = r.u64()?;
                meta.interval = r.u64()?;
                meta.rpo_limit = r.u64()?;
                let n = r.count(10)?;
                for _ in 0..n {
                    meta.excluded.push((r.str()?, r.u64()?));
                }
            }
            Message::BeginCycle {
                lineage,
                cycle,
                kind,
                freeze,
                disks,
                parent,
                meta,
            }
        }
        T_RESUME => {
            let lineage = r.lineage()?;
            let cycle = r.u64()?;
            let epoch = r.u64()?;
            let last = r.bool()?;
            let ranges = r.ranges()?;
            Message::Resume {
                lineage,
                cycle,
                epoch,
                ranges,
                last,
            }
        }
        T_CHUNK => {
            let (mut c, plen) = chunk::chunk_fields(&mut r)?;
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
        T_DEFINITION => {
            let hash = r.hash()?;
            let n = r.u32()?;
            if n > MAX_DEFINITION {
                return Err(WireError::DefinitionTooLarge(n));
            }
            let definition = String::from_utf8(r.take(n as usize, "definition")?.to_vec())
                .map_err(|_| WireError::BadString)?;
            let reverse = match r.flag()? {
                false => None,
                true => Some(ReverseTarget {
                    replica: r.str()?,
                    server_name: r.str()?,
                }),
            };
            Message::Definition {
                hash,
                definition,
                reverse,
            }
        }
        T_DEFINITION_STORED => Message::DefinitionStored {
            hash: r.hash()?,
            error: r.opt_str()?,
        },
        T_DIVERGENT => Message::Divergent {
            last: r.bool()?,
            ranges: r.ranges()?,
        },
        t @ (T_PROMOTE | T_PROMOTED | T_REVERSE | T_REVERSE_OK) => failover::decode(t, &mut r)?,
        t @ (T_PAUSED | T_RESUMED | T_PAUSE_NOTED) => pause::decode(t, &mut r)?,
        t => return Err(WireError::UnknownType(t)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(m)
}

#[cfg(test)]
mod tests;
