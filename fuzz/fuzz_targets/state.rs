//! Fuzzes the tracker's binary state parsers: the dirty bitmap's header
//! (`bitmap::parse_header`) and one copy of the activity log (`activity_log::decode`). Both
//! are read back from disk after a crash, so any bytes must give a geometry, a log or a clear
//! refusal, never a panic. Checked on every input:
//! - `parse_header` never panics; a geometry it accepts has a power-of-two granularity, and
//!   every length derived from it (blocks, words, slot and file length, the byte range of the
//!   last block) is computed without overflow; writing that geometry back gives the same 36
//!   header bytes;
//! - `activity_log::decode` never panics; a copy it accepts holds at most `CAPACITY` extents;
//!   a current-version copy (with slot checksums) encodes back to the same bytes over its
//!   checksummed part (magic, sequence number, count, slot checksums, CRC, extents).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmreplica_tracker::activity_log::{self, CAPACITY};
use vmreplica_tracker::bitmap::{header_bytes, parse_header};

fuzz_target!(|data: &[u8]| {
    if let Ok(geo) = parse_header(data) {
        assert!(geo.granularity.is_power_of_two());
        let blocks = geo.blocks();
        assert!(blocks as u128 * geo.granularity as u128 >= geo.disk_size as u128);
        assert!(geo.words() as u64 * 64 >= blocks);
        assert!(geo.file_len() > geo.slot_bytes());
        if blocks > 0 {
            let (start, len) = geo.block_bytes(blocks - 1);
            assert_eq!(start + len, geo.disk_size);
            assert_eq!(geo.block_range(0, geo.disk_size), 0..blocks);
        }
        assert_eq!(&header_bytes(&geo)[..36], &data[..36]);
    }

    if let Some(c) = activity_log::decode(data) {
        assert!(c.extents.len() <= CAPACITY);
        if let Some(sums) = c.sums {
            let end = 40 + c.extents.len() * 8;
            assert_eq!(
                &activity_log::encode(c.seq, &c.extents, sums)[..end],
                &data[..end]
            );
        }
    }
});
