//! Fuzzes the applier's undo log format (`vmreplica_applier::undo::format`), which a
//! restarted applier reads back from disk after a crash: any bytes must give an intact
//! prefix of records or a clear refusal, never a panic.
//!
//! Checked on every input:
//! - `scan` never panics; what it accepts is a header that encodes back to the same first
//!   64 bytes, and records that lie back to back from the end of the header, each head
//!   encoding back to its 32 bytes, each payload passing its check, entries never overlapping;
//! - index, applied and trailer payloads decode without panicking, and an index that
//!   decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmreplica_applier::undo::format::{
    decode_index, decode_ranges, encode_index, scan, Header, Kind, Trailer, HEADER_LEN, HEAD_LEN,
};
use vmreplica_common::ranges::RangeSet;

fuzz_target!(|data: &[u8]| {
    let Ok((header, found, end)) = scan(data) else {
        return;
    };
    assert_eq!(&header.encode()[..64], &data[..64]);
    let mut pos = HEADER_LEN as u64;
    let mut covered = RangeSet::new();
    for f in &found {
        assert_eq!(f.pos, pos + HEAD_LEN as u64);
        let at = pos as usize;
        assert_eq!(&f.head.encode()[..], &data[at..at + HEAD_LEN]);
        let payload = &data[f.pos as usize..(f.pos + u64::from(f.head.plen)) as usize];
        assert!(f.head.checks(payload));
        match f.head.kind {
            Kind::Entry => {
                assert!(covered.overlapping(f.head.disk, f.head.offset, f.head.end()).is_empty());
                covered.insert(f.head.disk, f.head.offset, f.head.end());
            }
            Kind::Applied => {
                assert_eq!(decode_ranges(payload).len(), f.head.len as usize);
            }
            Kind::Index => {
                if let Some(entries) = decode_index(payload) {
                    assert_eq!(encode_index(&entries), payload);
                }
            }
            Kind::Trailer => {
                let t = Trailer::decode(payload).expect("a trailer's payload is 32 bytes");
                assert_eq!(Trailer::decode(&t.encode()), Some(t));
            }
            Kind::Footer | Kind::Reset => {}
        }
        pos = f.pos + u64::from(f.head.plen);
    }
    assert_eq!(pos, end);
    let _ = Header::parse(data);
});
