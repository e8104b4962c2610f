//! Fuzzes a test failover's zero record (`vmreplica_applier::testfo::zerolog`), which a
//! restarted applier reads back from disk to serve a test failover again: any bytes must give
//! an intact prefix of records or a clear refusal, never a panic.
//!
//! Checked on every input:
//! - `parse` never panics; what it accepts is a header that encodes back to the same first
//!   32 bytes, and records back to back after it, each encoding back to its 24 bytes (as
//!   record number `i`), each a non-empty range within the disk; `valid_len` is where they end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmreplica_applier::testfo::zerolog::{
    encode_header, encode_record, parse, HEADER_LEN, RECORD_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = parse(data) else {
        return;
    };
    assert_eq!(&encode_header(p.size)[..], &data[..HEADER_LEN]);
    for (i, (offset, len)) in p.ranges.iter().enumerate() {
        let at = HEADER_LEN + i * RECORD_LEN;
        assert_eq!(
            &encode_record(i as u64, *offset, *len)[..],
            &data[at..at + RECORD_LEN]
        );
        assert!(*len > 0 && offset.checked_add(*len).is_some_and(|e| e <= p.size));
    }
    assert_eq!(p.valid_len, HEADER_LEN + p.ranges.len() * RECORD_LEN);
    assert!(p.valid_len <= data.len());
});
