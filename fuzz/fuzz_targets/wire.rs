//! Fuzzes the replication wire format (`vmreplica_common::wire`), which the applier and the
//! shipper decode from the network.
//!
//! Checked on every input:
//! - `decode` never panics; `Ok(None)` only when the input holds no whole frame (fewer than
//!   4 bytes, or fewer than the frame length says); a decoded frame re-encodes to exactly the
//!   bytes it was decoded from (the encoding is canonical), except a version 1 hello or
//!   welcome, which decodes (to be refused by version) and re-encodes in the version 2 layout;
//! - a resume answer's ranges, paged again, fit frames and give back the same set;
//! - a decoded chunk's head decodes alone (`decode_chunk_head`, as the link's receive path
//!   does) to the same fields and payload length;
//! - `Chunk::unpack`, `Chunk::unpack_into` (with a dirty, reused scratch buffer) and
//!   `Chunk::unpack_aligned` (likewise, its bytes at an aligned start) agree: all refuse, or
//!   all give the same bytes, exactly `len` of them.
#![no_main]

mod bytes;

use bytes::be32;
use libfuzzer_sys::fuzz_target;
use vmreplica_common::wire::{
    decode, decode_chunk_head, encode, is_chunk, resume_pages, Chunk, Message, CHUNK_HEAD,
    MAX_FRAME, PROTOCOL_VERSION,
};
use vmreplica_common::ranges::RangeSet;

fn check_chunk(c: &Chunk, body: &[u8]) {
    assert!(is_chunk(body));
    let head: &[u8; CHUNK_HEAD] = body[..CHUNK_HEAD].try_into().unwrap();
    let (h, plen) = decode_chunk_head(head).expect("head of a decodable chunk");
    assert_eq!(plen, c.payload.len());
    assert_eq!(
        (h.tag, h.disk, h.offset, h.len, h.encoding, h.checksum),
        (c.tag, c.disk, c.offset, c.len, c.encoding, c.checksum)
    );
    let mut scratch = vec![0xa5u8; 4096];
    let whole = c.unpack();
    let into = c.unpack_into(&mut scratch).map(|d| d.map(<[u8]>::to_vec));
    let mut buf = vec![0x5au8; 3000];
    let aligned = c.unpack_aligned(&mut buf).map(|at| {
        at.map(|at| {
            assert_eq!(
                (buf.as_ptr() as usize + at) % vmreplica_common::direct::ALIGN,
                0
            );
            buf[at..].to_vec()
        })
    });
    match (&whole, &into, &aligned) {
        (Ok(a), Ok(b), Ok(d)) => {
            assert_eq!(a, b);
            assert_eq!(a, d);
            if let Some(d) = a {
                assert_eq!(d.len(), c.len as usize);
            }
        }
        (Err(_), Err(_), Err(_)) => {}
        _ => {
            panic!("unpack {whole:?}, unpack_into {into:?} and unpack_aligned {aligned:?} disagree")
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(None) => {
            assert!(
                data.len() < 4 || {
                    let n = be32(data) as usize;
                    n <= MAX_FRAME as usize && data.len() < 4 + n
                }
            );
        }
        Ok(Some((m, used))) => {
            assert!(used <= data.len());
            let mut again = Vec::new();
            encode(&m, &mut again).expect("a decoded frame fits a frame");
            let old_layout = matches!(
                m,
                Message::Hello { version, .. } | Message::Welcome { version, .. }
                    if version != PROTOCOL_VERSION
            );
            if !old_layout {
                assert_eq!(again, &data[..used], "{m:?} re-encodes differently");
            }
            match &m {
                Message::Chunk(c) => check_chunk(c, &data[4..used]),
                Message::Resume {
                    lineage,
                    cycle,
                    epoch,
                    ranges,
                    ..
                } => {
                    let set: RangeSet = ranges
                        .iter()
                        .filter(|r| r.offset.checked_add(r.len).is_some())
                        .copied()
                        .collect();
                    let mut back = RangeSet::new();
                    for p in resume_pages(*lineage, *cycle, *epoch, &set) {
                        let mut f = Vec::new();
                        encode(&p, &mut f).expect("a page fits a frame");
                        if let Message::Resume { ranges, .. } = p {
                            ranges.into_iter().for_each(|r| back.insert_range(r));
                        }
                    }
                    assert_eq!(back, set);
                }
                _ => {}
            }
        }
        Err(_) => {}
    }
});
