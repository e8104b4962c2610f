//! Block data on the wire: the chunk frame (written head first, so a sender hands the
//! payload to the link as it is, and read head first, so a receiver reads the payload
//! straight into the chunk), and packing and checking chunks: zero runs as markers, the rest
//! lz4 compressed or raw, each with the xxh3 checksum of its uncompressed bytes.

use xxhash_rust::xxh3::xxh3_64;

use super::{Chunk, Encoding, Tag, WireError, MAX_CHUNK, MAX_FRAME, R, T_CHUNK, W};
use crate::iobuf::IoBuf;
use crate::ranges::Range;

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

pub(super) fn chunk_body(w: &mut W<'_>, c: &Chunk) {
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
pub(super) fn chunk_fields(r: &mut R<'_>) -> Result<(Chunk, usize), WireError> {
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
    if len == 0 {
        return Err(WireError::BadChunk {
            disk,
            offset,
            reason: "a chunk of no bytes".into(),
        });
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

/// Distinct lengths of zero runs whose checksum a thread keeps (a cycle's zero runs come in a
/// few lengths: whole chunks, whole blocks, the tail of a disk).
const ZERO_SUMS_KEPT: usize = 64;

thread_local! {
    /// Checksums of zero runs by length, as computed once by this thread: hashing a MiB of
    /// zeroes for every zero chunk packed or received cost as much as the zero test itself.
    static ZERO_SUMS: std::cell::RefCell<Vec<(u32, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The checksum of `len` zero bytes (`len` at most [`MAX_CHUNK`]), computed once per length
/// per thread.
pub fn zero_checksum(len: u32) -> u64 {
    assert!(len <= MAX_CHUNK);
    ZERO_SUMS.with_borrow_mut(|sums| {
        if let Some(&(_, sum)) = sums.iter().find(|&&(l, _)| l == len) {
            return sum;
        }
        let sum = checksum(&ZEROES[..len as usize]);
        if sums.len() >= ZERO_SUMS_KEPT {
            sums.remove(0);
        }
        sums.push((len, sum));
        sum
    })
}

/// `data` lz4-compressed (liblz4's default compressor, acceleration 1: the same ratio as
/// lz4_flex's on disk data for fewer instructions per MiB, benches/cpu-callgrind.sh), if that
/// shrinks it. Compressed straight into the payload's own allocation, of lz4's worst-case size
/// and neither zeroed nor copied: it is then shrunk to the output in place (glibc's realloc
/// splits a heap chunk or mremaps a mapped one), so no chunk keeps spare capacity in flight.
fn lz4_compress(data: &[u8]) -> Option<Vec<u8>> {
    use lz4::liblz4::{LZ4_compressBound, LZ4_compress_default};
    let src_len = i32::try_from(data.len()).ok()?;
    // SAFETY: a pure function of its argument.
    let bound = unsafe { LZ4_compressBound(src_len) };
    let mut out: Vec<u8> = Vec::with_capacity(usize::try_from(bound).ok().filter(|&b| b > 0)?);
    // SAFETY: `data` is readable for `src_len` bytes and `out`'s spare capacity is writable
    // for `bound` bytes (uninitialised is fine: the compressor only writes to `dest`, and
    // never more than `maxDestSize` bytes). It returns how many it wrote, 0 on failure.
    let n = unsafe {
        LZ4_compress_default(
            data.as_ptr().cast(),
            out.as_mut_ptr().cast(),
            src_len,
            bound,
        )
    };
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n > 0 && n < data.len())?;
    // SAFETY: the compressor wrote (initialised) the first `n` bytes, `n <= bound <=
    // capacity`.
    unsafe { out.set_len(n) };
    out.shrink_to_fit();
    Some(out)
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
            checksum: zero_checksum(len),
            payload: Vec::new(),
        }
    }

    /// Packs `data`: a zero marker if all zero, else lz4 if `compress` and it shrinks, else raw.
    pub fn pack(tag: Tag, disk: u16, offset: u64, data: &[u8], compress: bool) -> Chunk {
        assert!(data.len() <= MAX_CHUNK as usize);
        let zero = is_zero(data);
        let checksum = if zero {
            zero_checksum(data.len() as u32)
        } else {
            checksum(data)
        };
        let (encoding, payload) = if zero {
            (Encoding::Zero, Vec::new())
        } else if compress {
            match lz4_compress(data) {
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
    /// chunk) is a [`crate::direct::ALIGN`]ed place in `buf` (huge-page memory for large chunks:
    /// [`IoBuf::for_direct`]): the bytes are ready for a direct write. `buf` is reused across
    /// calls (not allocated or zeroed again once large enough); a raw payload is copied into
    /// it.
    pub fn unpack_aligned(&self, buf: &mut IoBuf) -> Result<Option<usize>, WireError> {
        if self.check_zero()? {
            return Ok(None);
        }
        let len = self.len as usize;
        let at = buf.for_direct(len);
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
        if self.checksum != zero_checksum(self.len) {
            return Err(self.bad("checksum mismatch"));
        }
        Ok(true)
    }

    /// Decompresses the lz4 payload into all of `dst` (the chunk's length). The payload comes
    /// from a peer: liblz4's `LZ4_decompress_safe` is the reference decoder made for hostile
    /// input (it never reads past the payload nor writes past `dst`, and says when the input
    /// is malformed), and takes fewer instructions than lz4_flex's safe decoder
    /// (benches/cpu-callgrind.sh).
    fn decompress_to(&self, dst: &mut [u8]) -> Result<(), WireError> {
        // Both lengths fit the i32s that liblz4 takes.
        if dst.len() > MAX_CHUNK as usize || self.payload.len() > MAX_FRAME as usize {
            return Err(self.bad("lz4: payload or chunk too large"));
        }
        let n = lz4::block::decompress_to_buffer(&self.payload, Some(dst.len() as i32), dst)
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

/// Bytes lz4 cannot shrink (xorshift64), the same for every call: for tests of chunks that
/// must go out raw.
#[cfg(test)]
pub(crate) fn incompressible(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
