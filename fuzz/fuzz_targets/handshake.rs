//! Fuzzes the fixed-newstyle handshake state machine (`nbd::Handshake::advance`).
//!
//! Input layout: byte 0 (`ctl`) chooses how the stream is split into reads (see [`Chunks`]);
//! its bit 0x20 puts the server in forced-TLS mode (a STARTTLS that the server accepts is
//! taken as a TLS handshake that succeeded, and negotiation goes on).
//! If `ctl & 0x40`, five more bytes `pos: u16, seg: u8, reps: u16` (big endian) ask for
//! `rest[pos..pos + seg]` to be repeated `reps` more times in place (at most 256 KiB in all),
//! so that options over 64 KiB and more than 4096 options are reachable within libFuzzer's
//! input size limit. The rest is what the client sends after the server's greeting (client
//! flags, then options).
//!
//! The bytes are fed the way `server.rs` does it: append each read to a pending buffer, call
//! `advance`, drain the `used` bytes, stop on `Close`, `Transmission` or an error. The same
//! input is also fed in a single read, and both runs must agree. Checked on every input:
//! - `used` never exceeds the bytes offered; no panics;
//! - the output is a sequence of well-formed option replies (magic, option, type, length
//!   consistent with the bytes that follow, per-type payload shapes, error strings that are
//!   UTF-8 without NUL and at most 4096 bytes as the NBD spec requires); the only other
//!   thing allowed is a trailing NBD_OPT_EXPORT_NAME reply when the handshake ended in
//!   `Transmission`;
//! - `Close` only follows NBD_OPT_ABORT's ACK, `Transmission` only GO's ACK or EXPORT_NAME;
//! - the `Negotiated` result is consistent with the exports;
//! - the output stays bounded (< 64 KiB + 1 KiB per input byte).
#![no_main]

mod bytes;

use bytes::{be16, be32, be64};
use libfuzzer_sys::fuzz_target;
use vmreplica_nbd::consts::*;
use vmreplica_nbd::handshake::{
    ExportInfo, Handshake, HandshakeError, HandshakeStatus, Negotiated, MAX_PAYLOAD,
};
use vmreplica_nbd::DeviceFlags;

fn exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "disk0".into(),
            description: "first disk".into(),
            size: 1 << 20,
            flags: DeviceFlags::default(),
            contexts: vec![
                "base:allocation".into(),
                "qemu:dirty-bitmap:vmreplica".into(),
            ],
            refusal: None,
        },
        ExportInfo {
            name: "disk1".into(),
            description: String::new(),
            size: 4096,
            flags: DeviceFlags::read_only(),
            contexts: vec!["base:allocation".into()],
            refusal: Some("too many connections".into()),
        },
    ]
}

/// Read sizes derived from the control byte: high bit clear = fixed size `(ctl & 0x3f) + 1`,
/// high bit set = pseudo-random sizes in 1..=64 seeded by the byte.
struct Chunks {
    ctl: u8,
    state: u32,
}

impl Chunks {
    fn new(ctl: u8) -> Self {
        Chunks {
            ctl,
            state: u32::from(ctl).wrapping_mul(0x9e37_79b9) | 1,
        }
    }
    fn next(&mut self) -> usize {
        if self.ctl & 0x80 == 0 {
            return usize::from(self.ctl & 0x3f) + 1;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        (self.state % 64) as usize + 1
    }
}

#[derive(Debug, PartialEq)]
enum End {
    /// Input ran out while the handshake wanted more.
    NeedMore,
    Close,
    Transmission(Negotiated),
    Error(HandshakeError),
}

struct Run {
    out: Vec<u8>,
    end: End,
    /// Bytes not consumed by the handshake (what the transmission phase would start with).
    leftover: Vec<u8>,
}

fn drive(input: &[u8], tls: bool, mut next_len: impl FnMut() -> usize) -> Run {
    let mut hs = Handshake::new(exports());
    if tls {
        hs = hs.require_tls();
    }
    let mut tls_on = false;
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    let end = 'feed: loop {
        if fed == input.len() {
            break End::NeedMore;
        }
        let n = next_len().clamp(1, input.len() - fed);
        pending.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        // What is pending may finish several steps (STARTTLS, then more options).
        loop {
            match hs.advance(&pending, &mut out) {
                Ok((used, status)) => {
                    assert!(
                        used <= pending.len(),
                        "advance used {used} of {} bytes",
                        pending.len()
                    );
                    pending.drain(..used);
                    match status {
                        HandshakeStatus::NeedMore => continue 'feed,
                        HandshakeStatus::Close => break 'feed End::Close,
                        HandshakeStatus::Transmission(n) => {
                            assert!(!tls || tls_on, "transmission without TLS: {n:?}");
                            break 'feed End::Transmission(n);
                        }
                        HandshakeStatus::StartTls => {
                            assert!(tls && !tls_on, "STARTTLS accepted (tls {tls}, on {tls_on})");
                            tls_on = true;
                            // A real driver runs TLS over what follows; here what follows is
                            // taken as the decrypted stream.
                            hs.tls_started();
                        }
                    }
                }
                Err(e) => break 'feed End::Error(e),
            }
        }
    };
    if matches!(end, End::Close | End::Transmission(_)) {
        // A finished handshake consumes nothing more and says nothing more.
        let mut extra = Vec::new();
        let r = hs.advance(&input[fed..], &mut extra);
        assert_eq!(r, Ok((0, HandshakeStatus::Close)), "advance after {end:?}");
        assert!(extra.is_empty(), "output after {end:?}");
    }
    pending.extend_from_slice(&input[fed..]);
    Run {
        out,
        end,
        leftover: pending,
    }
}

/// An NBD string: UTF-8, no NUL, at most 4096 bytes (proto.md, "Conventions").
fn check_string(what: &str, s: &[u8]) {
    assert!(s.len() <= 4096, "{what}: string of {} bytes", s.len());
    let s = std::str::from_utf8(s).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"));
    assert!(!s.contains('\0'), "{what}: contains NUL");
}

fn check_reply(opt: u32, rep: u32, data: &[u8]) {
    match rep {
        REP_ACK => assert!(data.is_empty(), "ACK with {} bytes", data.len()),
        REP_SERVER => {
            assert_eq!(opt, OPT_LIST, "REP_SERVER for option {opt}");
            assert!(data.len() >= 4);
            let nlen = be32(data) as usize;
            assert!(nlen <= data.len() - 4, "REP_SERVER name length {nlen}");
            check_string("export name", &data[4..4 + nlen]);
            check_string("export description", &data[4 + nlen..]);
        }
        REP_INFO => {
            assert!(
                opt == OPT_INFO || opt == OPT_GO,
                "REP_INFO for option {opt}"
            );
            assert!(data.len() >= 2, "short REP_INFO");
            match be16(data) {
                INFO_EXPORT => assert_eq!(data.len(), 12, "NBD_INFO_EXPORT length"),
                INFO_NAME => check_string("NBD_INFO_NAME", &data[2..]),
                INFO_DESCRIPTION => check_string("NBD_INFO_DESCRIPTION", &data[2..]),
                INFO_BLOCK_SIZE => {
                    assert_eq!(data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                    let (min, pref, max) = (be32(&data[2..]), be32(&data[6..]), be32(&data[10..]));
                    assert!(min.is_power_of_two() && pref.is_power_of_two());
                    assert!(min <= pref && pref <= max && max <= MAX_PAYLOAD);
                }
                t => panic!("unexpected info type {t}"),
            }
        }
        REP_META_CONTEXT => {
            assert!(
                opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT,
                "REP_META_CONTEXT for option {opt}"
            );
            assert!(data.len() > 4, "short REP_META_CONTEXT");
            let id = be32(data);
            if opt == OPT_SET_META_CONTEXT {
                assert_ne!(id, 0, "SET_META_CONTEXT reply with context id 0");
            }
            check_string("context name", &data[4..]);
        }
        r if r & (1 << 31) != 0 => {
            check_string(&format!("error reply {r:#x} to option {opt}"), data)
        }
        r => panic!("unknown option reply type {r:#x}"),
    }
}

fn check_negotiated(n: &Negotiated) {
    let ex = exports();
    assert!(n.export < ex.len(), "export index {}", n.export);
    assert!(!n.extended || n.structured, "extended without structured");
    for (i, (id, ctx)) in n.contexts.iter().enumerate() {
        assert!(
            n.contexts[..i].iter().all(|(j, c)| j != id && c != ctx),
            "duplicate context in {:?}",
            n.contexts
        );
        assert!(
            *ctx < ex[n.export].contexts.len(),
            "context {ctx} of an export with {} contexts",
            ex[n.export].contexts.len()
        );
        assert_eq!(*id, *ctx as u32 + 1, "context id vs index");
    }
    assert!(
        n.contexts.is_empty() || n.structured,
        "meta contexts without structured replies"
    );
}

fn check_output(out: &[u8], end: &End, input_len: usize) {
    assert!(
        out.len() < 64 * 1024 + 1024 * input_len,
        "{} output bytes for {input_len} input bytes",
        out.len()
    );
    let mut p = out;
    let mut last: Option<(u32, u32)> = None;
    while !p.is_empty() {
        if p.len() >= 8 && be64(p) == REP_MAGIC {
            assert!(p.len() >= 20, "truncated option reply header");
            let (opt, rep, len) = (be32(&p[8..]), be32(&p[12..]), be32(&p[16..]) as usize);
            assert!(
                len <= p.len() - 20,
                "option reply claims {len} bytes, {} follow",
                p.len() - 20
            );
            check_reply(opt, rep, &p[20..20 + len]);
            last = Some((opt, rep));
            p = &p[20 + len..];
            continue;
        }
        // Anything else must be the NBD_OPT_EXPORT_NAME reply that ends the handshake.
        let End::Transmission(n) = end else {
            panic!(
                "stray bytes in handshake output (end {end:?}): {:02x?}",
                &p[..p.len().min(32)]
            );
        };
        assert!(!n.extended, "EXPORT_NAME reply after extended headers");
        assert!(
            p.len() == 10 || p.len() == 134,
            "EXPORT_NAME reply of {} bytes",
            p.len()
        );
        let e = &exports()[n.export];
        assert_eq!(be64(p), e.size, "EXPORT_NAME reply size");
        assert_eq!(be16(&p[8..]), e.transmission_flags(n.structured));
        assert!(p[10..].iter().all(|&b| b == 0), "non-zero padding");
        return;
    }
    match end {
        End::Close => assert_eq!(last, Some((OPT_ABORT, REP_ACK)), "Close without ABORT"),
        End::Transmission(_) => {
            assert_eq!(last, Some((OPT_GO, REP_ACK)), "Transmission without GO")
        }
        End::NeedMore | End::Error(_) => {}
    }
}

/// Repeats `rest[pos..pos + seg]` `reps` more times in place; `hdr` is `pos, seg, reps`.
fn expand(rest: &[u8], hdr: &[u8]) -> Vec<u8> {
    const MAX_EXPANDED: usize = 256 * 1024;
    let pos = usize::from(be16(hdr)).min(rest.len());
    let seg = usize::from(hdr[2]).min(rest.len() - pos);
    let room = MAX_EXPANDED.saturating_sub(rest.len());
    let reps = room
        .checked_div(seg)
        .map_or(0, |max| usize::from(be16(&hdr[3..])).min(max));
    let mut v = Vec::with_capacity(rest.len() + seg * reps);
    v.extend_from_slice(&rest[..pos]);
    for _ in 0..reps {
        v.extend_from_slice(&rest[pos..pos + seg]);
    }
    v.extend_from_slice(&rest[pos..]);
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let expanded;
    let input = if ctl & 0x40 == 0 {
        rest
    } else {
        let Some(hdr) = rest.get(..5) else {
            return;
        };
        expanded = expand(&rest[5..], hdr);
        &expanded[..]
    };
    let tls = ctl & 0x20 != 0;
    let mut chunks = Chunks::new(ctl);
    let split = drive(input, tls, || chunks.next());
    let whole = drive(input, tls, || usize::MAX);

    assert_eq!(split.end, whole.end, "split vs whole reads");
    assert!(
        split.out == whole.out,
        "split vs whole reads: different output"
    );
    if !matches!(split.end, End::Error(_)) {
        assert_eq!(split.leftover, whole.leftover, "split vs whole: leftover");
    }
    if let End::Transmission(n) = &split.end {
        check_negotiated(n);
    }
    check_output(&split.out, &split.end, input.len());
});
