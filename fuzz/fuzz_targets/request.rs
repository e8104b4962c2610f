//! Fuzzes transmission-phase request framing and validation
//! (`nbd::request::decode_header`, then `nbd::request::validate`).
//!
//! The input is the raw bytes after the handshake; it is decoded both as a compact (28-byte)
//! and as an extended (32-byte) header. Checked on every input:
//! - `Ok(None)` only for short input; the decoded fields are the bytes on the wire;
//! - a decoded payload never exceeds `MAX_PAYLOAD`, and is either 0 or the length;
//! - for each fixed (export size, read-only, negotiated) case, an accepted command stays
//!   inside the export (`offset + len <= size`, no overflow) for
//!   Read/Write/Trim/WriteZeroes/Cache/BlockStatus, echoes the header's offset and length,
//!   carries no payload unless it is a Write, respects read-only exports, reads at most
//!   `MAX_PAYLOAD`, asks for block status only with a context negotiated and a non-empty
//!   range; refusals use an NBD errno and a message.
#![no_main]

mod bytes;

use bytes::{be32, be64};
use libfuzzer_sys::fuzz_target;
use vmreplica_nbd::consts::*;
use vmreplica_nbd::handshake::{Negotiated, MAX_PAYLOAD};
use vmreplica_nbd::request::{decode_header, header_len, validate, RequestError};
use vmreplica_nbd::{Command, DeviceFlags, RequestHeader};

/// (export size, read-only, what was negotiated).
fn cases(extended: bool) -> [(u64, bool, Negotiated); 3] {
    let both = vec![(1, 0), (2, 1)];
    [
        (
            1 << 30,
            false,
            Negotiated {
                export: 0,
                structured: true,
                extended,
                contexts: both.clone(),
            },
        ),
        (
            3 * 4096 + 512,
            true,
            Negotiated {
                export: 1,
                structured: extended,
                extended,
                contexts: Vec::new(),
            },
        ),
        (
            u64::MAX,
            false,
            Negotiated {
                export: 0,
                structured: true,
                extended,
                contexts: both,
            },
        ),
    ]
}

fn check_validate(h: &RequestHeader, size: u64, read_only: bool, neg: &Negotiated) {
    let flags = if read_only {
        DeviceFlags::read_only()
    } else {
        DeviceFlags::default()
    };
    let cmd = match validate(h, size, &flags, neg) {
        Ok(cmd) => cmd,
        Err(r) => {
            assert!(
                [EPERM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP].contains(&r.errno),
                "refusal with errno {}",
                r.errno
            );
            assert!(!r.message.is_empty() && r.message.len() <= 4096);
            return;
        }
    };
    let ctx = format!("{h:?} size {size} ro {read_only} {neg:?} -> {cmd:?}");
    if !matches!(cmd, Command::Write { .. }) {
        assert_eq!(h.payload, 0, "payload accepted for a non-write: {ctx}");
    }
    let flag = |f: u16| h.flags & f != 0;
    let range = match cmd {
        Command::Read { offset, len } => {
            assert!(len <= MAX_PAYLOAD, "read too large: {ctx}");
            assert_eq!(u64::from(len), h.length, "{ctx}");
            Some((offset, u64::from(len)))
        }
        Command::Write { offset, len, fua } => {
            assert!(!read_only, "write to read-only export: {ctx}");
            assert_eq!(len, h.payload, "write length vs payload: {ctx}");
            assert_eq!(u64::from(len), h.length, "{ctx}");
            assert_eq!(fua, flag(CMD_FLAG_FUA), "{ctx}");
            Some((offset, u64::from(len)))
        }
        Command::Disc | Command::Flush => {
            assert_eq!(h.flags, 0, "{ctx}");
            None
        }
        Command::Trim { offset, len, fua } => {
            assert!(!read_only, "trim on read-only export: {ctx}");
            assert_eq!(fua, flag(CMD_FLAG_FUA), "{ctx}");
            Some((offset, len))
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast_zero,
        } => {
            assert!(!read_only, "write-zeroes on read-only export: {ctx}");
            assert_eq!(
                (fua, no_hole, fast_zero),
                (
                    flag(CMD_FLAG_FUA),
                    flag(CMD_FLAG_NO_HOLE),
                    flag(CMD_FLAG_FAST_ZERO)
                ),
                "{ctx}"
            );
            Some((offset, len))
        }
        Command::Cache { offset, len } => {
            assert!(flags.cache, "cache on an export without it: {ctx}");
            Some((offset, len))
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            assert!(
                !neg.contexts.is_empty(),
                "block status without contexts: {ctx}"
            );
            assert!(len > 0, "empty block status: {ctx}");
            assert_eq!(req_one, flag(CMD_FLAG_REQ_ONE), "{ctx}");
            Some((offset, len))
        }
    };
    if let Some((offset, len)) = range {
        assert_eq!(offset, h.offset, "{ctx}");
        assert_eq!(len, h.length, "{ctx}");
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|e| e <= size),
            "command outside the export: {ctx}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        let hlen = header_len(extended);
        let h = match decode_header(data, extended) {
            Ok(None) => {
                assert!(data.len() < hlen, "Ok(None) with {} bytes", data.len());
                continue;
            }
            Err(RequestError::BadMagic(m)) => {
                assert!(data.len() >= hlen);
                assert_eq!(m, be32(data));
                let want = if extended {
                    EXTENDED_REQUEST_MAGIC
                } else {
                    REQUEST_MAGIC
                };
                assert_ne!(m, want, "good magic reported as bad");
                continue;
            }
            Err(RequestError::PayloadTooLarge(p)) => {
                assert!(p > u64::from(MAX_PAYLOAD), "payload {p} refused");
                continue;
            }
            Ok(Some(h)) => h,
        };
        assert!(data.len() >= hlen);
        assert!(h.payload <= MAX_PAYLOAD, "payload {} decoded", h.payload);
        assert_eq!(h.flags, u16::from_be_bytes([data[4], data[5]]));
        assert_eq!(h.typ, u16::from_be_bytes([data[6], data[7]]));
        assert_eq!(h.cookie, be64(&data[8..]));
        assert_eq!(h.offset, be64(&data[16..]));
        let length = if extended {
            be64(&data[24..])
        } else {
            u64::from(be32(&data[24..]))
        };
        assert_eq!(h.length, length);
        assert!(h.payload == 0 || u64::from(h.payload) == h.length);
        if h.typ == CMD_WRITE {
            assert_eq!(u64::from(h.payload), h.length, "write without its payload");
        }
        for (size, ro, neg) in cases(extended) {
            check_validate(&h, size, ro, &neg);
        }
    }
});
