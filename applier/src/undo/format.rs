//! The undo log's on-disk format, as a pure codec (no files): the header, the records, and a
//! scanner over a log's bytes that the file reader, the tests and the fuzz target share.
//!
//! ```text
//! header   4096 bytes: magic "VMRUNDO\0", version, header length, from, to, lineage, check
//! record   32-byte head + payload, repeated:
//!            magic "UR", kind, encoding, disk, offset, len, payload length,
//!            check = xxh3-64 of the head's first 24 bytes and the payload
//!   entry    (kind 1) the old contents of `len` bytes at `offset` of `disk`: a hole/zeroes
//!            (no payload), raw, or lz4
//!   applied  (kind 2) ranges of the cycle now durable in the images (18 bytes each)
//!   trailer  (kind 3) the log is complete: entries, bytes, digest of what they cover
//!   index    (kind 4) every entry's place in the file (27 bytes each), after the trailer
//!   footer   (kind 5) the index record's position: the last 40 bytes of a finished log
//!   reset    (kind 6) a rollback put the old contents back: nothing before it is applied
//! ```
//! Integers are big-endian. The header is one direct-I/O block, so records start aligned.
//! A crash leaves a log whose last record may be torn: a scan stops at the first record
//! whose head or check is wrong, and the writer cuts the file there. An unknown magic or
//! version is refused, never guessed.

use thiserror::Error;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::Range;
use vmreplica_common::wire::MAX_CHUNK;
use xxhash_rust::xxh3::Xxh3;

pub const MAGIC: [u8; 8] = *b"VMRUNDO\0";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 4096;
pub const HEAD_LEN: usize = 32;
const RECORD_MAGIC: [u8; 2] = *b"UR";
/// Ranges in one applied record, at most.
pub const MAX_MARK_RANGES: usize = 65536;
/// Entries in one index record, at most (27 bytes each: 27 MiB).
pub const MAX_INDEX_ENTRIES: usize = 1 << 20;
const RANGE_BYTES: usize = 18;
pub const INDEX_ENTRY_BYTES: usize = 27;
pub const TRAILER_BYTES: usize = 32;
pub const FOOTER_LEN: usize = HEAD_LEN + 8;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not an undo log (bad magic)")]
    BadMagic,
    #[error("undo log format version {0}; this build reads version {VERSION}")]
    Version(u32),
    #[error("header is damaged (checksum mismatch)")]
    BadHeader,
    #[error("truncated header")]
    Short,
}

/// What a log undoes: the writes of cycles after point `to`, up to cycle `from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub from: u64,
    pub to: u64,
    pub lineage: Option<Lineage>,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_be_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        b[16..24].copy_from_slice(&self.from.to_be_bytes());
        b[24..32].copy_from_slice(&self.to.to_be_bytes());
        if let Some(l) = self.lineage {
            b[32] = 1;
            b[33..49].copy_from_slice(&l.0);
        }
        let c = xxh(&[&b[..56]]);
        b[56..64].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < 64 {
            return Err(FormatError::Short);
        }
        if b[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let check = u64::from_be_bytes(b[56..64].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
        let canonical = match b[32] {
            0 => b[33..56].iter().all(|x| *x == 0),
            1 => b[49..56].iter().all(|x| *x == 0),
            _ => false,
        };
        if xxh(&[&b[..56]]) != check || len as usize != HEADER_LEN || !canonical {
            return Err(FormatError::BadHeader);
        }
        Ok(Header {
            from: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            to: u64::from_be_bytes(b[24..32].try_into().expect("8 bytes")),
            lineage: (b[32] != 0).then(|| Lineage(b[33..49].try_into().expect("16 bytes"))),
        })
    }
}

fn xxh(parts: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    for p in parts {
        h.update(p);
    }
    h.digest()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Entry = 1,
    Applied = 2,
    Trailer = 3,
    Index = 4,
    Footer = 5,
    Reset = 6,
}

/// How an entry's old contents are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enc {
    /// A hole (or zeroes): nothing stored, put back by punching a hole.
    Zero = 0,
    Raw = 1,
    Lz4 = 2,
}

impl Enc {
    fn from_u8(b: u8) -> Option<Enc> {
        match b {
            0 => Some(Enc::Zero),
            1 => Some(Enc::Raw),
            2 => Some(Enc::Lz4),
            _ => None,
        }
    }
}

/// A record's head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub kind: Kind,
    pub enc: Enc,
    pub disk: u16,
    pub offset: u64,
    pub len: u32,
    pub plen: u32,
    pub check: u64,
}

impl Head {
    /// A head for `payload`, its check computed.
    pub fn new(kind: Kind, enc: Enc, disk: u16, offset: u64, len: u32, payload: &[u8]) -> Head {
        let mut h = Head {
            kind,
            enc,
            disk,
            offset,
            len,
            plen: payload.len() as u32,
            check: 0,
        };
        h.check = xxh(&[&h.unchecked(), payload]);
        h
    }

    fn unchecked(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..2].copy_from_slice(&RECORD_MAGIC);
        b[2] = self.kind as u8;
        b[3] = self.enc as u8;
        b[4..6].copy_from_slice(&self.disk.to_be_bytes());
        b[8..16].copy_from_slice(&self.offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b[20..24].copy_from_slice(&self.plen.to_be_bytes());
        b
    }

    pub fn encode(&self) -> [u8; HEAD_LEN] {
        let mut b = [0u8; HEAD_LEN];
        b[..24].copy_from_slice(&self.unchecked());
        b[24..].copy_from_slice(&self.check.to_be_bytes());
        b
    }

    /// Parses a head and checks that its fields are consistent (not yet its payload): None
    /// for anything that is not a record head of this format.
    pub fn parse(b: &[u8; HEAD_LEN]) -> Option<Head> {
        if b[..2] != RECORD_MAGIC || b[6..8] != [0, 0] {
            return None;
        }
        let kind = match b[2] {
            1 => Kind::Entry,
            2 => Kind::Applied,
            3 => Kind::Trailer,
            4 => Kind::Index,
            5 => Kind::Footer,
            6 => Kind::Reset,
            _ => return None,
        };
        let h = Head {
            kind,
            enc: Enc::from_u8(b[3])?,
            disk: u16::from_be_bytes([b[4], b[5]]),
            offset: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(b[16..20].try_into().expect("4 bytes")),
            plen: u32::from_be_bytes(b[20..24].try_into().expect("4 bytes")),
            check: u64::from_be_bytes(b[24..32].try_into().expect("8 bytes")),
        };
        let (len, plen) = (h.len as usize, h.plen as usize);
        let sane = match h.kind {
            Kind::Entry => {
                len > 0
                    && h.len <= MAX_CHUNK
                    && h.offset.checked_add(u64::from(h.len)).is_some()
                    && match h.enc {
                        Enc::Zero => plen == 0,
                        Enc::Raw => plen == len,
                        Enc::Lz4 => plen > 0 && plen < len,
                    }
            }
            Kind::Applied => len <= MAX_MARK_RANGES && plen == len * RANGE_BYTES,
            Kind::Trailer => plen == TRAILER_BYTES,
            Kind::Index => len <= MAX_INDEX_ENTRIES && plen == len * INDEX_ENTRY_BYTES,
            Kind::Footer => plen == 8,
            Kind::Reset => len == 0 && plen == 0,
        };
        (sane && (h.kind == Kind::Entry || h.enc == Enc::Zero)).then_some(h)
    }

    /// Whether `payload` is this head's payload.
    pub fn checks(&self, payload: &[u8]) -> bool {
        payload.len() == self.plen as usize && xxh(&[&self.unchecked(), payload]) == self.check
    }

    /// Bytes of the record: head and payload.
    pub fn record_len(&self) -> u64 {
        (HEAD_LEN + self.plen as usize) as u64
    }

    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The payload of an applied record.
pub fn encode_ranges(ranges: &[Range]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ranges.len() * RANGE_BYTES);
    for r in ranges {
        b.extend_from_slice(&r.disk.to_be_bytes());
        b.extend_from_slice(&r.offset.to_be_bytes());
        b.extend_from_slice(&r.len.to_be_bytes());
    }
    b
}

pub fn decode_ranges(b: &[u8]) -> Vec<Range> {
    b.chunks_exact(RANGE_BYTES)
        .map(|c| Range {
            disk: u16::from_be_bytes([c[0], c[1]]),
            offset: u64::from_be_bytes(c[2..10].try_into().expect("8 bytes")),
            len: u64::from_be_bytes(c[10..18].try_into().expect("8 bytes")),
        })
        .collect()
}

/// What a finished log holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub entries: u64,
    /// Bytes the entries cover.
    pub bytes: u64,
    /// [`RangeSet::digest`](vmreplica_common::ranges::RangeSet::digest) of their coverage.
    pub digest: u64,
    pub from: u64,
}

impl Trailer {
    pub fn encode(&self) -> Vec<u8> {
        [self.entries, self.bytes, self.digest, self.from]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }

    pub fn decode(b: &[u8]) -> Option<Trailer> {
        let v: Vec<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        (v.len() == 4).then(|| Trailer {
            entries: v[0],
            bytes: v[1],
            digest: v[2],
            from: v[3],
        })
    }
}

/// Where an entry's old contents are in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub disk: u16,
    pub offset: u64,
    pub len: u32,
    /// File position of the payload.
    pub pos: u64,
    pub plen: u32,
    pub enc: Enc,
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

pub fn encode_index(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * INDEX_ENTRY_BYTES);
    for e in entries {
        b.extend_from_slice(&e.disk.to_be_bytes());
        b.extend_from_slice(&e.offset.to_be_bytes());
        b.extend_from_slice(&e.len.to_be_bytes());
        b.extend_from_slice(&e.pos.to_be_bytes());
        b.extend_from_slice(&e.plen.to_be_bytes());
        b.push(e.enc as u8);
    }
    b
}

/// The entries of an index record; None if one is inconsistent.
pub fn decode_index(b: &[u8]) -> Option<Vec<Entry>> {
    b.chunks_exact(INDEX_ENTRY_BYTES)
        .map(|c| {
            let e = Entry {
                disk: u16::from_be_bytes([c[0], c[1]]),
                offset: u64::from_be_bytes(c[2..10].try_into().expect("8 bytes")),
                len: u32::from_be_bytes(c[10..14].try_into().expect("4 bytes")),
                pos: u64::from_be_bytes(c[14..22].try_into().expect("8 bytes")),
                plen: u32::from_be_bytes(c[22..26].try_into().expect("4 bytes")),
                enc: Enc::from_u8(c[26])?,
            };
            let ok = e.len > 0
                && e.len <= MAX_CHUNK
                && e.offset.checked_add(u64::from(e.len)).is_some()
                && e.pos.checked_add(u64::from(e.plen)).is_some();
            ok.then_some(e)
        })
        .collect()
}

/// A record found by [`scan`]: its head, and where its payload starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub head: Head,
    pub pos: u64,
}

/// The intact records of a log's bytes, in order, up to the first torn, foreign or
/// inconsistent one; and where that prefix ends. Entries that overlap an earlier entry make
/// the log inconsistent there too (a log never captures a byte twice).
pub fn scan(data: &[u8]) -> Result<(Header, Vec<Found>, u64), FormatError> {
    let header = Header::parse(data)?;
    let mut found = Vec::new();
    let mut pos = HEADER_LEN;
    let mut covered = vmreplica_common::ranges::RangeSet::new();
    while let Some(h) = data.get(pos..pos + HEAD_LEN) {
        let Some(head) = Head::parse(h.try_into().expect("HEAD_LEN bytes")) else {
            break;
        };
        let start = pos + HEAD_LEN;
        let Some(payload) = data.get(start..start + head.plen as usize) else {
            break;
        };
        if !head.checks(payload) {
            break;
        }
        if head.kind == Kind::Entry {
            if !covered
                .overlapping(head.disk, head.offset, head.end())
                .is_empty()
            {
                break;
            }
            covered.insert(head.disk, head.offset, head.end());
        }
        found.push(Found {
            head,
            pos: start as u64,
        });
        pos = start + head.plen as usize;
    }
    Ok((header, found, pos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(records: &[(Head, Vec<u8>)]) -> Vec<u8> {
        let mut b = Header {
            from: 5,
            to: 4,
            lineage: Some(Lineage([3; 16])),
        }
        .encode();
        for (h, p) in records {
            b.extend_from_slice(&h.encode());
            b.extend_from_slice(p);
        }
        b
    }

    #[test]
    fn records_round_trip_and_a_scan_stops_at_damage() {
        let data = vec![9u8; 8192];
        let lz = lz4_flex::block::compress(&[1u8; 8192]);
        let ranges = vec![Range {
            disk: 1,
            offset: 0,
            len: 65536,
        }];
        let recs = vec![
            (
                Head::new(Kind::Entry, Enc::Raw, 0, 0, 8192, &data),
                data.clone(),
            ),
            (Head::new(Kind::Entry, Enc::Zero, 1, 0, 65536, &[]), vec![]),
            (
                Head::new(Kind::Entry, Enc::Lz4, 0, 8192, 8192, &lz),
                lz.clone(),
            ),
            (
                Head::new(Kind::Applied, Enc::Zero, 0, 0, 1, &encode_ranges(&ranges)),
                encode_ranges(&ranges),
            ),
        ];
        let bytes = log(&recs);
        let (h, found, end) = scan(&bytes).unwrap();
        assert_eq!(h.from, 5);
        assert_eq!(h.lineage, Some(Lineage([3; 16])));
        assert_eq!(end, bytes.len() as u64);
        assert_eq!(found.len(), 4);
        assert_eq!(found[0].pos, (HEADER_LEN + HEAD_LEN) as u64);
        assert_eq!(decode_ranges(&bytes[found[3].pos as usize..]), ranges);
        // Any cut or flipped byte after the header keeps an intact prefix, never more.
        for cut in HEADER_LEN..bytes.len() {
            let (_, f, e) = scan(&bytes[..cut]).unwrap();
            assert!(e as usize <= cut && f.len() < 4);
        }
        let mut bad = bytes.clone();
        bad[HEADER_LEN + HEAD_LEN + 100] ^= 1;
        assert_eq!(scan(&bad).unwrap().1.len(), 0);
        // An entry overlapping an earlier one ends the intact prefix.
        let mut twice = recs.clone();
        twice.push(recs[0].clone());
        assert_eq!(scan(&log(&twice)).unwrap().1.len(), 4);
        // Header: wrong magic, version, or check.
        let mut b = bytes.clone();
        b[0] = b'X';
        assert_eq!(scan(&b).unwrap_err(), FormatError::BadMagic);
        let mut b = bytes.clone();
        b[11] = 9;
        assert_eq!(scan(&b).unwrap_err(), FormatError::Version(9));
        let mut b = bytes.clone();
        b[20] ^= 1;
        assert_eq!(scan(&b).unwrap_err(), FormatError::BadHeader);
        assert_eq!(scan(&bytes[..10]).unwrap_err(), FormatError::Short);
    }

    #[test]
    fn inconsistent_heads_are_refused() {
        let ok = Head::new(Kind::Entry, Enc::Raw, 0, 0, 4, &[1, 2, 3, 4]);
        assert_eq!(Head::parse(&ok.encode()), Some(ok));
        for bad in [
            Head::new(Kind::Entry, Enc::Raw, 0, 0, 5, &[1, 2, 3, 4]),
            Head::new(Kind::Entry, Enc::Lz4, 0, 0, 4, &[1, 2, 3, 4]),
            Head::new(Kind::Entry, Enc::Zero, 0, 0, 4, &[1]),
            Head::new(Kind::Entry, Enc::Zero, 0, 0, MAX_CHUNK + 1, &[]),
            Head::new(Kind::Entry, Enc::Zero, 0, u64::MAX, 4, &[]),
            Head::new(Kind::Trailer, Enc::Zero, 0, 0, 0, &[0; 8]),
            Head::new(Kind::Applied, Enc::Raw, 0, 0, 0, &[]),
        ] {
            assert_eq!(Head::parse(&bad.encode()), None, "{bad:?}");
        }
        let t = Trailer {
            entries: 1,
            bytes: 2,
            digest: 3,
            from: 4,
        };
        assert_eq!(Trailer::decode(&t.encode()), Some(t));
        let e = Entry {
            disk: 2,
            offset: 65536,
            len: 4096,
            pos: 8192,
            plen: 100,
            enc: Enc::Lz4,
        };
        assert_eq!(decode_index(&encode_index(&[e, e])), Some(vec![e, e]));
        let mut b = encode_index(&[e]);
        b[26] = 7;
        assert_eq!(decode_index(&b), None);
    }
}
