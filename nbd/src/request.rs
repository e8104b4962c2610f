//! Transmission-phase request decoding and validation.
//!
//! Decoding is split in two: [`decode_header`] frames the bytes (and reports violations that
//! force a hard disconnect), [`validate`] turns a framed request into a [`Command`] or the NBD
//! error to send back, after which the connection carries on.

use thiserror::Error;

use crate::consts::*;
use crate::device::DeviceFlags;
use crate::handshake::{Negotiated, MAX_PAYLOAD};

pub const COMPACT_HEADER_LEN: usize = 28;
pub const EXTENDED_HEADER_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length, or payload length for requests that carry one.
    pub length: u64,
    /// Bytes of payload that follow the header.
    pub payload: u32,
}

/// Violations after which the stream cannot be resynchronised: the server disconnects.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge(u64),
}

pub fn header_len(extended: bool) -> usize {
    if extended {
        EXTENDED_HEADER_LEN
    } else {
        COMPACT_HEADER_LEN
    }
}

/// Decodes one request header from the front of `buf`; `Ok(None)` if more bytes are needed.
pub fn decode_header(buf: &[u8], extended: bool) -> Result<Option<RequestHeader>, RequestError> {
    let Some(b) = buf.get(..header_len(extended)) else {
        return Ok(None);
    };
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
    let magic = be32(0);
    let flags = u16::from_be_bytes([b[4], b[5]]);
    let typ = u16::from_be_bytes([b[6], b[7]]);
    let cookie = be64(8);
    let offset = be64(16);
    let (length, payload) = if extended {
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        let length = be64(24);
        // The spec asks for PAYLOAD_LEN on writes, but QEMU's client (up to at least 10.0)
        // omits it; like QEMU's own server, a write always carries `length` bytes.
        if flags & CMD_FLAG_PAYLOAD_LEN != 0 || typ == CMD_WRITE {
            (length, length)
        } else {
            (length, 0)
        }
    } else {
        if magic != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        let length = u64::from(be32(24));
        (length, if typ == CMD_WRITE { length } else { 0 })
    };
    if payload > u64::from(MAX_PAYLOAD) {
        return Err(RequestError::PayloadTooLarge(payload));
    }
    Ok(Some(RequestHeader {
        flags,
        typ,
        cookie,
        offset,
        length,
        payload: payload as u32,
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
        fast_zero: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

/// A validated request: what to do, and what the reply must echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub offset: u64,
    pub command: Command,
}

/// An NBD error to reply with, plus a message for structured replies and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub message: &'static str,
}

fn refuse(errno: u32, message: &'static str) -> Refusal {
    Refusal { errno, message }
}

/// Checks a framed request against the export (its size and what its device supports) and
/// the negotiated options.
pub fn validate(
    h: &RequestHeader,
    size: u64,
    device: &DeviceFlags,
    neg: &Negotiated,
) -> Result<Command, Refusal> {
    let read_only = device.read_only;
    let allowed = match h.typ {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_DISC | CMD_FLUSH => 0,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_CACHE => 0,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return Err(refuse(EINVAL, "unknown command")),
    };
    let payload_flag = if neg.extended && h.typ == CMD_WRITE {
        CMD_FLAG_PAYLOAD_LEN
    } else {
        0
    };
    if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 && h.typ != CMD_WRITE {
        return Err(refuse(EINVAL, "payload not supported for this command"));
    }
    if h.flags & !(allowed | payload_flag) != 0 {
        return Err(refuse(EINVAL, "flag not valid for this command"));
    }
    if h.payload != 0 && h.typ != CMD_WRITE {
        return Err(refuse(EINVAL, "this command takes no payload"));
    }
    let end = h.offset.checked_add(h.length);
    let in_range = end.is_some_and(|e| e <= size);
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err(refuse(EPERM, "export is read-only"));
    }
    let unsupported = match h.typ {
        CMD_TRIM => !device.trim,
        CMD_WRITE_ZEROES => {
            !device.write_zeroes || (h.flags & CMD_FLAG_FAST_ZERO != 0 && !device.fast_zero)
        }
        CMD_CACHE => !device.cache,
        _ => false,
    };
    if unsupported {
        return Err(refuse(EINVAL, "command not supported by this export"));
    }
    match h.typ {
        CMD_READ => {
            if h.length > u64::from(MAX_PAYLOAD) {
                return Err(refuse(EINVAL, "read larger than the maximum payload"));
            }
            if !in_range {
                return Err(refuse(EINVAL, "read beyond the end of the export"));
            }
            Ok(Command::Read {
                offset: h.offset,
                len: h.length as u32,
            })
        }
        CMD_WRITE => {
            if !in_range {
                return Err(refuse(ENOSPC, "write beyond the end of the export"));
            }
            Ok(Command::Write {
                offset: h.offset,
                len: h.payload,
                fua,
            })
        }
        CMD_DISC => Ok(Command::Disc),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => {
            if !in_range {
                return Err(refuse(EINVAL, "trim beyond the end of the export"));
            }
            Ok(Command::Trim {
                offset: h.offset,
                len: h.length,
                fua,
            })
        }
        CMD_WRITE_ZEROES => {
            if !in_range {
                return Err(refuse(ENOSPC, "write-zeroes beyond the end of the export"));
            }
            Ok(Command::WriteZeroes {
                offset: h.offset,
                len: h.length,
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast_zero: h.flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
        CMD_CACHE => {
            if !in_range {
                return Err(refuse(EINVAL, "cache beyond the end of the export"));
            }
            Ok(Command::Cache {
                offset: h.offset,
                len: h.length,
            })
        }
        CMD_BLOCK_STATUS => {
            if neg.contexts.is_empty() {
                return Err(refuse(EINVAL, "no metadata context was negotiated"));
            }
            if h.length == 0 || !in_range {
                return Err(refuse(
                    EINVAL,
                    "block status range is empty or beyond the end",
                ));
            }
            Ok(Command::BlockStatus {
                offset: h.offset,
                len: h.length,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => Err(refuse(EINVAL, "unknown command")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(flags: u16, typ: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(typ.to_be_bytes());
        v.extend(7u64.to_be_bytes());
        v.extend(offset.to_be_bytes());
        v.extend(len.to_be_bytes());
        v
    }

    fn rw() -> DeviceFlags {
        DeviceFlags::default()
    }

    fn neg(extended: bool) -> Negotiated {
        Negotiated {
            export: 0,
            structured: true,
            extended,
            contexts: vec![(1, 0)],
        }
    }

    #[test]
    fn decodes_compact_write_and_needs_more_on_short_input() {
        let b = compact(CMD_FLAG_FUA, CMD_WRITE, 4096, 512);
        assert_eq!(decode_header(&b[..27], false), Ok(None));
        let h = decode_header(&b, false).unwrap().unwrap();
        assert_eq!(
            (h.cookie, h.offset, h.length, h.payload),
            (7, 4096, 512, 512)
        );
        assert_eq!(
            validate(&h, 1 << 20, &rw(), &neg(false)),
            Ok(Command::Write {
                offset: 4096,
                len: 512,
                fua: true
            })
        );
    }

    #[test]
    fn decodes_extended_64bit_lengths() {
        let mut b = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend(0u16.to_be_bytes());
        b.extend(CMD_BLOCK_STATUS.to_be_bytes());
        b.extend(1u64.to_be_bytes());
        b.extend(0u64.to_be_bytes());
        b.extend((8u64 << 30).to_be_bytes());
        let h = decode_header(&b, true).unwrap().unwrap();
        assert_eq!(h.length, 8 << 30);
        assert_eq!(h.payload, 0);
        assert!(matches!(
            validate(&h, 8 << 30, &rw(), &neg(true)),
            Ok(Command::BlockStatus { .. })
        ));
        assert!(validate(&h, (8 << 30) - 1, &rw(), &neg(true)).is_err());
    }

    #[test]
    fn fatal_framing_errors() {
        let mut b = compact(0, CMD_READ, 0, 1);
        b[0] = 0;
        assert!(matches!(
            decode_header(&b, false),
            Err(RequestError::BadMagic(_))
        ));
        let b = compact(0, CMD_WRITE, 0, MAX_PAYLOAD + 1);
        assert!(matches!(
            decode_header(&b, false),
            Err(RequestError::PayloadTooLarge(_))
        ));
        // A compact header is not accepted once extended headers are on.
        let mut b = compact(0, CMD_READ, 0, 1);
        b.extend([0u8; 4]);
        assert!(matches!(
            decode_header(&b, true),
            Err(RequestError::BadMagic(_))
        ));
    }

    #[test]
    fn refusals_carry_the_right_errno() {
        let n = neg(false);
        let check = |b: Vec<u8>, ro: bool| {
            let h = decode_header(&b, false).unwrap().unwrap();
            let flags = if ro { DeviceFlags::read_only() } else { rw() };
            validate(&h, 1 << 20, &flags, &n).unwrap_err().errno
        };
        assert_eq!(check(compact(0, CMD_READ, (1 << 20) - 1, 2), false), EINVAL);
        assert_eq!(check(compact(0, CMD_READ, u64::MAX, 2), false), EINVAL);
        assert_eq!(check(compact(0, CMD_WRITE, 1 << 20, 1), false), ENOSPC);
        assert_eq!(check(compact(0, CMD_WRITE, 0, 1), true), EPERM);
        assert_eq!(check(compact(0, CMD_TRIM, 0, 1), true), EPERM);
        assert_eq!(check(compact(0, 42, 0, 1), false), EINVAL);
        assert_eq!(
            check(compact(CMD_FLAG_REQ_ONE, CMD_READ, 0, 1), false),
            EINVAL
        );
        assert_eq!(check(compact(0, CMD_TRIM, 1 << 19, 1 << 20), false), EINVAL);
        let none = Negotiated {
            contexts: vec![],
            ..n.clone()
        };
        let h = decode_header(&compact(0, CMD_BLOCK_STATUS, 0, 512), false)
            .unwrap()
            .unwrap();
        assert_eq!(
            validate(&h, 1 << 20, &rw(), &none).unwrap_err().errno,
            EINVAL
        );
    }
}
