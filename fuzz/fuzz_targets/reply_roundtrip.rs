//! Fuzzes reply encoding (`nbd::ReplyWriter`) in the three reply styles.
//!
//! Arbitrary reply calls are encoded after some existing bytes (which must stay untouched)
//! and parsed back with an independent decoder. Checked: magic per style, flags, type,
//! cookie, offset (extended), the length field equals the bytes that belong to the chunk,
//! the payload echoes the parameters, and error messages are at most 4096 bytes of UTF-8
//! as the NBD spec requires of strings.
//!
//! Inputs are kept within the writer's documented contract, as the server uses it: read
//! lengths at most `MAX_PAYLOAD` (validate refuses larger reads), extent lengths at most
//! `max_extent()`, and no block status in simple mode.
#![no_main]

mod bytes;

use bytes::{be16, be32, be64};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmreplica_nbd::consts::*;
use vmreplica_nbd::handshake::{Negotiated, MAX_PAYLOAD};
use vmreplica_nbd::{ReplyMode, ReplyWriter};

#[derive(Arbitrary, Debug)]
enum Op {
    Ok {
        cookie: u64,
        offset: u64,
    },
    Error {
        cookie: u64,
        offset: u64,
        errno: u32,
        /// The message is `unit` repeated `repeat` times, so long messages stay cheap.
        unit: String,
        repeat: u16,
    },
    Read {
        cookie: u64,
        offset: u64,
        len: u32,
    },
    BlockStatus {
        cookie: u64,
        offset: u64,
        id: u32,
        extents: Vec<(u64, u32)>,
        done: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    structured: bool,
    extended: bool,
    prefix: Vec<u8>,
    ops: Vec<Op>,
}

/// A parsed reply header: (flags, type, cookie, offset if extended, length), header size.
struct Chunk {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: Option<u64>,
    length: u64,
}

fn parse_chunk(mode: ReplyMode, b: &[u8]) -> (Chunk, &[u8]) {
    match mode {
        ReplyMode::Extended => {
            assert!(b.len() >= 32, "short extended reply header");
            assert_eq!(be32(b), EXTENDED_REPLY_MAGIC);
            let c = Chunk {
                flags: be16(&b[4..]),
                typ: be16(&b[6..]),
                cookie: be64(&b[8..]),
                offset: Some(be64(&b[16..])),
                length: be64(&b[24..]),
            };
            (c, &b[32..])
        }
        ReplyMode::Structured => {
            assert!(b.len() >= 20, "short structured reply header");
            assert_eq!(be32(b), STRUCTURED_REPLY_MAGIC);
            let c = Chunk {
                flags: be16(&b[4..]),
                typ: be16(&b[6..]),
                cookie: be64(&b[8..]),
                offset: None,
                length: u64::from(be32(&b[16..])),
            };
            (c, &b[20..])
        }
        ReplyMode::Simple => unreachable!(),
    }
}

/// Parses the one chunk of a reply that must be final, of type `typ`, for `cookie` (and, in
/// extended mode, `offset`).
fn final_chunk(mode: ReplyMode, b: &[u8], typ: u16, cookie: u64, offset: u64) -> (Chunk, &[u8]) {
    let (c, rest) = parse_chunk(mode, b);
    assert_eq!((c.flags, c.typ, c.cookie), (REPLY_FLAG_DONE, typ, cookie));
    assert!(c.offset.is_none_or(|o| o == offset));
    (c, rest)
}

fn message(unit: &str, repeat: u16) -> String {
    let n = usize::from(repeat % 1200).min(16 * 1024 / unit.len().max(1));
    unit.repeat(n)
}

/// Encodes `op` after `prefix` (replies are appended to what is already buffered) and checks
/// the prefix survives and the reply decodes to what was asked.
fn check(w: ReplyWriter, op: &Op, prefix: &[u8]) {
    let mut buf = prefix.to_vec();
    encode(w, op, &mut buf);
    assert_eq!(&buf[..prefix.len()], prefix, "existing bytes changed");
    decode(w, op, &buf[prefix.len()..]);
}

fn encode(w: ReplyWriter, op: &Op, out: &mut Vec<u8>) {
    match *op {
        Op::Ok { cookie, offset } => w.ok(out, cookie, offset),
        Op::Error {
            cookie,
            offset,
            errno,
            ref unit,
            repeat,
        } => w.error(out, cookie, offset, errno, &message(unit, repeat)),
        Op::Read {
            cookie,
            offset,
            len,
        } => w.read_header(out, cookie, offset, len % (MAX_PAYLOAD + 1)),
        Op::BlockStatus {
            cookie,
            offset,
            id,
            ref extents,
            done,
        } => {
            if w.mode != ReplyMode::Simple {
                w.block_status(out, cookie, offset, id, &clamp(w, extents), done)
            }
        }
    }
}

/// Extent lengths within the writer's limit, as the server's block-status code caps them.
fn clamp(w: ReplyWriter, extents: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let max = w.max_extent();
    extents.iter().map(|&(l, f)| (l.min(max), f)).collect()
}

fn decode(w: ReplyWriter, op: &Op, out: &[u8]) {
    let simple = |out: &[u8], errno: u32, cookie: u64| {
        assert_eq!(out.len(), 16, "simple reply length");
        assert_eq!(be32(out), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&out[4..]), errno);
        assert_eq!(be64(&out[8..]), cookie);
    };
    match *op {
        Op::Ok { cookie, offset } => {
            if w.mode == ReplyMode::Simple {
                return simple(out, 0, cookie);
            }
            let (c, rest) = final_chunk(w.mode, out, REPLY_TYPE_NONE, cookie, offset);
            assert_eq!(c.length, 0);
            assert!(rest.is_empty(), "bytes after NBD_REPLY_TYPE_NONE");
        }
        Op::Error {
            cookie,
            offset,
            errno,
            ref unit,
            repeat,
        } => {
            let msg = message(unit, repeat);
            if w.mode == ReplyMode::Simple {
                return simple(out, errno, cookie);
            }
            let (c, rest) = final_chunk(w.mode, out, REPLY_TYPE_ERROR, cookie, offset);
            assert_eq!(c.length, rest.len() as u64, "error chunk length field");
            assert!(rest.len() >= 6);
            assert_eq!(be32(rest), errno);
            let mlen = usize::from(be16(&rest[4..]));
            assert_eq!(mlen, rest.len() - 6, "error message length field");
            let sent = &rest[6..];
            assert!(msg.as_bytes().starts_with(sent), "message not a prefix");
            // Cut to the longest prefix of at most 4096 bytes that ends on a character
            // boundary (a UTF-8 character is at most 4 bytes).
            let mut want = msg.len().min(4096);
            while !msg.is_char_boundary(want) {
                want -= 1;
            }
            assert!(
                sent.len() == want && want + 4 > msg.len().min(4096),
                "message cut to {} of {} bytes",
                sent.len(),
                msg.len()
            );
            assert!(sent.len() <= 4096, "error message of {} bytes", sent.len());
            if let Err(e) = std::str::from_utf8(sent) {
                panic!(
                    "error message of {} bytes cut to {} is not UTF-8: {e}",
                    msg.len(),
                    sent.len()
                );
            }
        }
        Op::Read {
            cookie,
            offset,
            len,
        } => {
            let len = len % (MAX_PAYLOAD + 1);
            if w.mode == ReplyMode::Simple {
                return simple(out, 0, cookie);
            }
            let (c, rest) = final_chunk(w.mode, out, REPLY_TYPE_OFFSET_DATA, cookie, offset);
            assert_eq!(rest.len(), 8, "offset-data header");
            assert_eq!(be64(rest), offset);
            assert_eq!(c.length, 8 + u64::from(len), "offset-data length field");
        }
        Op::BlockStatus {
            cookie,
            offset,
            id,
            ref extents,
            done,
        } => {
            if w.mode == ReplyMode::Simple {
                return assert!(out.is_empty());
            }
            let extents = clamp(w, extents);
            let (c, rest) = parse_chunk(w.mode, out);
            let flags = if done { REPLY_FLAG_DONE } else { 0 };
            assert_eq!((c.flags, c.cookie), (flags, cookie));
            assert!(c.offset.is_none_or(|o| o == offset));
            assert_eq!(c.length, rest.len() as u64, "block status length field");
            assert_eq!(be32(rest), id);
            let decoded: Vec<(u64, u32)> = if w.mode == ReplyMode::Extended {
                assert_eq!(c.typ, REPLY_TYPE_BLOCK_STATUS_EXT);
                assert_eq!(be32(&rest[4..]) as usize, extents.len(), "descriptor count");
                assert_eq!(rest.len(), 8 + 16 * extents.len());
                rest[8..]
                    .chunks(16)
                    .map(|d| {
                        let f = be64(&d[8..]);
                        assert!(f <= u64::from(u32::MAX));
                        (be64(d), f as u32)
                    })
                    .collect()
            } else {
                assert_eq!(c.typ, REPLY_TYPE_BLOCK_STATUS);
                assert_eq!(rest.len(), 4 + 8 * extents.len());
                rest[4..]
                    .chunks(8)
                    .map(|d| (u64::from(be32(d)), be32(&d[4..])))
                    .collect()
            };
            assert_eq!(decoded, extents, "block status descriptors");
        }
    }
}

fuzz_target!(|input: Input| {
    let neg = Negotiated {
        export: 0,
        structured: input.structured,
        extended: input.extended,
        contexts: Vec::new(),
    };
    let w = ReplyWriter::new(&neg);
    let want = if input.extended {
        ReplyMode::Extended
    } else if input.structured {
        ReplyMode::Structured
    } else {
        ReplyMode::Simple
    };
    assert_eq!(w.mode, want);
    let max = w.max_extent();
    if w.mode != ReplyMode::Extended {
        assert!(max <= u64::from(u32::MAX) && max.is_multiple_of(4096) && max > 0);
    }
    for op in &input.ops {
        check(w, op, &input.prefix);
    }
});
