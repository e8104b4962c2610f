//! Reply encoding for the three reply styles: simple, structured and extended.

use crate::consts::*;
use crate::handshake::Negotiated;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

/// Where a reply's bytes are encoded: a `Vec`, or a fixed buffer for the headers whose size
/// is known (see [`ReplyWriter::ok`] and [`ReplyWriter::read_header`]), which need no
/// allocation.
pub trait ReplyBuf {
    fn put(&mut self, bytes: &[u8]);
}

impl ReplyBuf for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes)
    }
}

/// The most bytes [`ReplyWriter::ok`] or [`ReplyWriter::read_header`] encode (an extended
/// header and a read chunk's offset).
pub const MAX_FIXED_HEADER: usize = 40;

/// Encodes replies in the style the connection negotiated.
#[derive(Clone, Copy, Debug)]
pub struct ReplyWriter {
    pub mode: ReplyMode,
}

impl ReplyWriter {
    pub fn new(neg: &Negotiated) -> Self {
        let mode = if neg.extended {
            ReplyMode::Extended
        } else if neg.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        };
        ReplyWriter { mode }
    }

    /// Largest extent length one block-status descriptor can carry.
    pub fn max_extent(&self) -> u64 {
        match self.mode {
            ReplyMode::Extended => u64::MAX,
            _ => u64::from(u32::MAX) & !4095,
        }
    }

    fn chunk<B: ReplyBuf + ?Sized>(
        &self,
        out: &mut B,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u64,
    ) {
        // Each header is assembled here and handed over in one piece.
        match self.mode {
            ReplyMode::Extended => {
                let mut b = [0u8; 32];
                b[..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
                b[4..6].copy_from_slice(&flags.to_be_bytes());
                b[6..8].copy_from_slice(&typ.to_be_bytes());
                b[8..16].copy_from_slice(&cookie.to_be_bytes());
                b[16..24].copy_from_slice(&offset.to_be_bytes());
                b[24..].copy_from_slice(&len.to_be_bytes());
                out.put(&b);
            }
            _ => {
                let mut b = [0u8; 20];
                b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                b[4..6].copy_from_slice(&flags.to_be_bytes());
                b[6..8].copy_from_slice(&typ.to_be_bytes());
                b[8..16].copy_from_slice(&cookie.to_be_bytes());
                b[16..].copy_from_slice(&(len as u32).to_be_bytes());
                out.put(&b);
            }
        }
    }

    fn simple<B: ReplyBuf + ?Sized>(out: &mut B, errno: u32, cookie: u64) {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&errno.to_be_bytes());
        b[8..].copy_from_slice(&cookie.to_be_bytes());
        out.put(&b);
    }

    /// Success without data (at most [`MAX_FIXED_HEADER`] bytes).
    pub fn ok<B: ReplyBuf + ?Sized>(&self, out: &mut B, cookie: u64, offset: u64) {
        match self.mode {
            ReplyMode::Simple => Self::simple(out, 0, cookie),
            _ => self.chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0),
        }
    }

    /// A failed request; `message` reaches the user where the reply style allows.
    pub fn error(&self, out: &mut Vec<u8>, cookie: u64, offset: u64, errno: u32, message: &str) {
        match self.mode {
            ReplyMode::Simple => Self::simple(out, errno, cookie),
            _ => {
                // At most 4096 bytes, cut at a character boundary: the protocol wants UTF-8.
                let mut end = message.len().min(4096);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                let msg = &message.as_bytes()[..end];
                self.chunk(
                    out,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    cookie,
                    offset,
                    6 + msg.len() as u64,
                );
                out.extend_from_slice(&errno.to_be_bytes());
                out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                out.extend_from_slice(msg);
            }
        }
    }

    /// The header of a successful read (at most [`MAX_FIXED_HEADER`] bytes); exactly `len`
    /// data bytes must follow it.
    pub fn read_header<B: ReplyBuf + ?Sized>(
        &self,
        out: &mut B,
        cookie: u64,
        offset: u64,
        len: u32,
    ) {
        match self.mode {
            ReplyMode::Simple => Self::simple(out, 0, cookie),
            _ => {
                self.chunk(
                    out,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    offset,
                    8 + u64::from(len),
                );
                out.put(&offset.to_be_bytes());
            }
        }
    }

    /// One block-status chunk for context `id`; `extents` are (length, flags) pairs, each
    /// length at most [`Self::max_extent`]. Only valid for structured or extended replies.
    pub fn block_status(
        &self,
        out: &mut Vec<u8>,
        cookie: u64,
        offset: u64,
        id: u32,
        extents: &[(u64, u32)],
        done: bool,
    ) {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let n = extents.len() as u64;
        match self.mode {
            ReplyMode::Extended => {
                self.chunk(
                    out,
                    flags,
                    REPLY_TYPE_BLOCK_STATUS_EXT,
                    cookie,
                    offset,
                    8 + 16 * n,
                );
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(n as u32).to_be_bytes());
                for (len, f) in extents {
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&u64::from(*f).to_be_bytes());
                }
            }
            _ => {
                self.chunk(
                    out,
                    flags,
                    REPLY_TYPE_BLOCK_STATUS,
                    cookie,
                    offset,
                    4 + 8 * n,
                );
                out.extend_from_slice(&id.to_be_bytes());
                for (len, f) in extents {
                    out.extend_from_slice(&(*len as u32).to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(mode: ReplyMode) -> ReplyWriter {
        ReplyWriter { mode }
    }

    #[test]
    fn simple_replies() {
        let mut out = Vec::new();
        w(ReplyMode::Simple).error(&mut out, 9, 0, EIO, "ignored");
        assert_eq!(out.len(), 16);
        assert_eq!(&out[4..8], &EIO.to_be_bytes());
        assert_eq!(&out[8..16], &9u64.to_be_bytes());
    }

    #[test]
    fn structured_read_and_error() {
        let mut out = Vec::new();
        w(ReplyMode::Structured).read_header(&mut out, 1, 4096, 512);
        assert_eq!(out.len(), 20 + 8);
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([out[4], out[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 520);
        out.clear();
        w(ReplyMode::Structured).error(&mut out, 1, 0, EINVAL, "bad");
        assert_eq!(out.len(), 20 + 6 + 3);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_ERROR);
    }

    #[test]
    fn extended_block_status() {
        let mut out = Vec::new();
        w(ReplyMode::Extended).block_status(&mut out, 3, 0, 2, &[(1 << 33, 1), (4096, 0)], true);
        assert_eq!(out.len(), 32 + 8 + 32);
        assert_eq!(&out[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u64::from_be_bytes(out[24..32].try_into().unwrap()), 40);
        assert_eq!(u32::from_be_bytes(out[36..40].try_into().unwrap()), 2);
        assert_eq!(u64::from_be_bytes(out[40..48].try_into().unwrap()), 1 << 33);
    }

    #[test]
    fn long_error_messages_are_cut_at_a_character_boundary() {
        let mut out = Vec::new();
        let message = format!("{}é", "x".repeat(4095));
        w(ReplyMode::Structured).error(&mut out, 1, 0, 22, &message);
        let len = u16::from_be_bytes([out[out.len() - 4095 - 2], out[out.len() - 4095 - 1]]);
        assert_eq!(len, 4095);
        assert!(std::str::from_utf8(&out[out.len() - 4095..]).is_ok());
    }
}
