//! The fixed-newstyle handshake as a state machine over bytes.
//!
//! [`Handshake::advance`] consumes client bytes and appends the server's replies to an output
//! buffer; it never blocks and never allocates more than [`MAX_OPTION_LEN`] for one option, so
//! a hostile client can neither crash it nor make it buffer without bound (oversized options
//! are skipped and answered with `NBD_REP_ERR_TOO_BIG`).
//!
//! With [`Handshake::require_tls`], the server is in the protocol's "forced TLS" mode: until
//! the client has sent `NBD_OPT_STARTTLS` and the driver has completed a TLS handshake (then
//! [`Handshake::tls_started`]), every option but STARTTLS and ABORT is answered with
//! `NBD_REP_ERR_TLS_REQD` and nothing about the exports is revealed.

use thiserror::Error;

use crate::consts::*;
use crate::device::DeviceFlags;

/// Largest option payload that is buffered; bigger ones are discarded and refused.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options accepted on one connection before the server gives up on the client.
pub const MAX_OPTIONS: u32 = 4096;
/// Largest payload (WRITE data) a client may send in one request.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK: u32 = 4096;

/// What the server exports under one name.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub flags: DeviceFlags,
    /// The metadata contexts offered, by full name; a selected context is known by its index
    /// here, and its id on the wire is that index plus one.
    pub contexts: Vec<String>,
    /// Why a client may not use this export now (it has too many connections), answered to
    /// NBD_OPT_GO with `NBD_REP_ERR_POLICY`.
    pub refusal: Option<String>,
}

impl ExportInfo {
    /// Transmission flags for this export, given what the client negotiated.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let d = &self.flags;
        let mut f = FLAG_HAS_FLAGS;
        let mut set = |on: bool, bit: u16| {
            if on {
                f |= bit;
            }
        };
        set(d.read_only, FLAG_READ_ONLY);
        set(d.flush, FLAG_SEND_FLUSH);
        set(d.flush && !d.read_only, FLAG_SEND_FUA);
        set(d.trim && !d.read_only, FLAG_SEND_TRIM);
        set(d.write_zeroes && !d.read_only, FLAG_SEND_WRITE_ZEROES);
        set(
            d.write_zeroes && d.fast_zero && !d.read_only,
            FLAG_SEND_FAST_ZERO,
        );
        set(d.multi_conn, FLAG_CAN_MULTI_CONN);
        set(d.cache, FLAG_SEND_CACHE);
        set(structured, FLAG_SEND_DF);
        f
    }
}

/// The wire id of the context at `index` in [`ExportInfo::contexts`].
fn context_id(index: usize) -> u32 {
    index as u32 + 1
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export in the list given to [`Handshake::new`].
    pub export: usize,
    pub structured: bool,
    pub extended: bool,
    /// Selected metadata contexts: (wire id, index in [`ExportInfo::contexts`]).
    pub contexts: Vec<(u32, usize)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStatus {
    /// Feed more bytes.
    NeedMore,
    /// Send what was produced, then close the connection.
    Close,
    /// Send what was produced, then enter the transmission phase.
    Transmission(Negotiated),
    /// Send what was produced (the STARTTLS acknowledgement), then run a TLS handshake over
    /// the connection: the bytes after the ones consumed belong to it. Call
    /// [`Handshake::tls_started`] once it succeeded, and go on through TLS.
    StartTls,
}

/// A violation after which the connection is closed (the message says why).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client used NBD_OPT_EXPORT_NAME after negotiating extended headers")]
    ExportNameAfterExtended,
    #[error("client sent option {0} without fixed newstyle negotiation")]
    NotFixedNewstyle(u32),
    #[error("export name is too long")]
    ExportNameTooLong,
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("client used NBD_OPT_EXPORT_NAME without TLS, which this server requires")]
    TlsRequired,
    #[error("export {0:?} refused: {1}")]
    Refused(String, String),
}

#[derive(Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { opt: u32, len: u32 },
    Discard { opt: u32, remaining: u64 },
    Finished,
}

pub struct Handshake {
    exports: Vec<ExportInfo>,
    state: State,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Contexts selected by the last SET_META_CONTEXT, and the export it named.
    meta: Option<(String, Vec<(u32, usize)>)>,
    options_seen: u32,
    tls_required: bool,
    tls_active: bool,
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn option_reply(out: &mut Vec<u8>, opt: u32, rep: u32, data: &[u8]) {
    put_u64(out, REP_MAGIC);
    put_u32(out, opt);
    put_u32(out, rep);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// A minimal cursor over an option's payload that never panics on short input.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.buf.split_at_checked(2)?;
        self.buf = t;
        Some(u16::from_be_bytes(h.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.buf.split_at_checked(4)?;
        self.buf = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = self.buf.split_at_checked(n)?;
        self.buf = t;
        Some(h)
    }
    fn string(&mut self, n: usize) -> Option<String> {
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

impl Handshake {
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        Handshake {
            exports,
            state: State::ClientFlags,
            fixed: false,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta: None,
            options_seen: 0,
            tls_required: false,
            tls_active: false,
        }
    }

    /// Requires TLS (NBD_OPT_STARTTLS) before any option but ABORT.
    pub fn require_tls(mut self) -> Self {
        self.tls_required = true;
        self
    }

    /// The TLS handshake asked for by STARTTLS succeeded: negotiation goes on over TLS.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
    }

    /// The server's opening bytes.
    pub fn greeting(out: &mut Vec<u8>) {
        put_u64(out, NBDMAGIC);
        put_u64(out, IHAVEOPT);
        put_u16(out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }

    /// Consumes as much of `input` as forms complete messages, appending replies to `out`.
    /// Returns how many bytes were consumed and what the driver should do next.
    pub fn advance(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, HandshakeStatus), HandshakeError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Finished => return Ok((used, HandshakeStatus::Close)),
                State::ClientFlags => {
                    let Some(b) = rest.get(..4) else {
                        return Ok((used, HandshakeStatus::NeedMore));
                    };
                    used += 4;
                    let flags = u32::from_be_bytes(b.try_into().unwrap_or_default());
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        self.state = State::Finished;
                        return Err(HandshakeError::BadClientFlags(flags));
                    }
                    self.fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    let Some(b) = rest.get(..16) else {
                        return Ok((used, HandshakeStatus::NeedMore));
                    };
                    used += 16;
                    let magic = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
                    let opt = u32::from_be_bytes(b[8..12].try_into().unwrap_or_default());
                    let len = u32::from_be_bytes(b[12..16].try_into().unwrap_or_default());
                    if magic != IHAVEOPT {
                        self.state = State::Finished;
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    self.options_seen += 1;
                    if self.options_seen > MAX_OPTIONS {
                        self.state = State::Finished;
                        return Err(HandshakeError::TooManyOptions);
                    }
                    if !self.fixed && opt != OPT_EXPORT_NAME {
                        self.state = State::Finished;
                        return Err(HandshakeError::NotFixedNewstyle(opt));
                    }
                    self.state = if len > MAX_OPTION_LEN {
                        if opt == OPT_EXPORT_NAME {
                            self.state = State::Finished;
                            return Err(HandshakeError::ExportNameTooLong);
                        }
                        State::Discard {
                            opt,
                            remaining: len as u64,
                        }
                    } else {
                        State::OptionData { opt, len }
                    };
                }
                State::Discard { opt, remaining } => {
                    let take = remaining.min(rest.len() as u64);
                    used += take as usize;
                    if take < remaining {
                        self.state = State::Discard {
                            opt,
                            remaining: remaining - take,
                        };
                        return Ok((used, HandshakeStatus::NeedMore));
                    }
                    option_reply(out, opt, REP_ERR_TOO_BIG, b"option payload too large");
                    self.state = State::OptionHeader;
                }
                State::OptionData { opt, len } => {
                    let Some(data) = rest.get(..len as usize) else {
                        return Ok((used, HandshakeStatus::NeedMore));
                    };
                    used += len as usize;
                    self.state = State::OptionHeader;
                    match self.option(opt, data, out)? {
                        HandshakeStatus::NeedMore => {}
                        // The driver runs TLS, then negotiation goes on where it stopped.
                        HandshakeStatus::StartTls => return Ok((used, HandshakeStatus::StartTls)),
                        other => {
                            self.state = State::Finished;
                            return Ok((used, other));
                        }
                    }
                }
            }
        }
    }

    fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn option(
        &mut self,
        opt: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<HandshakeStatus, HandshakeError> {
        if self.tls_required && !self.tls_active {
            match opt {
                OPT_STARTTLS => {
                    if !data.is_empty() {
                        option_reply(out, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data");
                        return Ok(HandshakeStatus::NeedMore);
                    }
                    option_reply(out, opt, REP_ACK, &[]);
                    return Ok(HandshakeStatus::StartTls);
                }
                OPT_ABORT => {}
                OPT_EXPORT_NAME => return Err(HandshakeError::TlsRequired),
                _ => {
                    option_reply(
                        out,
                        opt,
                        REP_ERR_TLS_REQD,
                        b"this server requires TLS: use NBD_OPT_STARTTLS",
                    );
                    return Ok(HandshakeStatus::NeedMore);
                }
            }
        }
        match opt {
            OPT_EXPORT_NAME => {
                if self.extended {
                    return Err(HandshakeError::ExportNameAfterExtended);
                }
                let name = String::from_utf8_lossy(data).into_owned();
                let idx = self
                    .find_export(&name)
                    .ok_or(HandshakeError::UnknownExport(name))?;
                let e = &self.exports[idx];
                if let Some(why) = &e.refusal {
                    return Err(HandshakeError::Refused(e.name.clone(), why.clone()));
                }
                put_u64(out, e.size);
                put_u16(out, e.transmission_flags(self.structured));
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(HandshakeStatus::Transmission(self.negotiated(idx)))
            }
            OPT_ABORT => {
                option_reply(out, opt, REP_ACK, &[]);
                Ok(HandshakeStatus::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(out, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Ok(HandshakeStatus::NeedMore);
                }
                for e in &self.exports {
                    let mut d = Vec::new();
                    put_u32(&mut d, e.name.len() as u32);
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(out, opt, REP_SERVER, &d);
                }
                option_reply(out, opt, REP_ACK, &[]);
                Ok(HandshakeStatus::NeedMore)
            }
            OPT_INFO | OPT_GO => self.info_or_go(opt, data, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(out, opt, REP_ERR_INVALID, b"option takes no data");
                } else if self.extended {
                    option_reply(
                        out,
                        opt,
                        REP_ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    );
                } else {
                    self.structured = true;
                    option_reply(out, opt, REP_ACK, &[]);
                }
                Ok(HandshakeStatus::NeedMore)
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    option_reply(out, opt, REP_ERR_INVALID, b"option takes no data");
                } else {
                    self.extended = true;
                    option_reply(out, opt, REP_ACK, &[]);
                }
                Ok(HandshakeStatus::NeedMore)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data, out);
                Ok(HandshakeStatus::NeedMore)
            }
            OPT_STARTTLS => {
                let (rep, msg): (u32, &[u8]) = if self.tls_active {
                    (REP_ERR_INVALID, b"TLS is already on")
                } else {
                    (REP_ERR_UNSUP, b"TLS is not offered on this socket")
                };
                option_reply(out, opt, rep, msg);
                Ok(HandshakeStatus::NeedMore)
            }
            _ => {
                option_reply(out, opt, REP_ERR_UNSUP, b"option not supported");
                Ok(HandshakeStatus::NeedMore)
            }
        }
    }

    fn negotiated(&self, export: usize) -> Negotiated {
        let contexts = match &self.meta {
            Some((name, ctx)) if self.find_export(name) == Some(export) => ctx.clone(),
            _ => Vec::new(),
        };
        Negotiated {
            export,
            structured: self.structured || self.extended,
            extended: self.extended,
            contexts,
        }
    }

    fn info_or_go(
        &mut self,
        opt: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<HandshakeStatus, HandshakeError> {
        let mut r = Reader { buf: data };
        let parsed = (|| {
            let nlen = r.u32()? as usize;
            let name = r.string(nlen)?;
            let n = r.u16()?;
            let mut reqs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                reqs.push(r.u16()?);
            }
            r.is_empty().then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            option_reply(
                out,
                opt,
                REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/GO payload",
            );
            return Ok(HandshakeStatus::NeedMore);
        };
        let Some(idx) = self.find_export(&name) else {
            let msg = format!("unknown export {name:?}");
            option_reply(out, opt, REP_ERR_UNKNOWN, msg.as_bytes());
            return Ok(HandshakeStatus::NeedMore);
        };
        let e = &self.exports[idx];
        if let (OPT_GO, Some(why)) = (opt, &e.refusal) {
            option_reply(out, opt, REP_ERR_POLICY, why.as_bytes());
            return Ok(HandshakeStatus::NeedMore);
        }
        let mut d = Vec::with_capacity(12);
        put_u16(&mut d, INFO_EXPORT);
        put_u64(&mut d, e.size);
        put_u16(
            &mut d,
            e.transmission_flags(self.structured || self.extended),
        );
        option_reply(out, opt, REP_INFO, &d);
        if reqs.contains(&INFO_NAME) {
            let mut d = Vec::new();
            put_u16(&mut d, INFO_NAME);
            d.extend_from_slice(e.name.as_bytes());
            option_reply(out, opt, REP_INFO, &d);
        }
        if reqs.contains(&INFO_DESCRIPTION) {
            let mut d = Vec::new();
            put_u16(&mut d, INFO_DESCRIPTION);
            d.extend_from_slice(e.description.as_bytes());
            option_reply(out, opt, REP_INFO, &d);
        }
        // Block sizes are always sent: clients that did not ask still benefit from the hint.
        let mut d = Vec::new();
        put_u16(&mut d, INFO_BLOCK_SIZE);
        put_u32(&mut d, 1);
        put_u32(&mut d, PREFERRED_BLOCK);
        put_u32(&mut d, MAX_PAYLOAD);
        option_reply(out, opt, REP_INFO, &d);
        option_reply(out, opt, REP_ACK, &[]);
        if opt == OPT_GO {
            Ok(HandshakeStatus::Transmission(self.negotiated(idx)))
        } else {
            Ok(HandshakeStatus::NeedMore)
        }
    }

    /// Contexts of export `idx` matching `query` (index, name); `list` enables namespace
    /// wildcards: a query ending in `:` (`base:`, `qemu:`, `qemu:dirty-bitmap:`) matches
    /// every context it is a prefix of.
    fn matching(&self, idx: usize, query: &str, list: bool) -> Vec<(usize, String)> {
        self.exports[idx]
            .contexts
            .iter()
            .enumerate()
            .filter(|(_, name)| {
                *name == query || (list && query.ends_with(':') && name.starts_with(query))
            })
            .map(|(i, name)| (i, name.clone()))
            .collect()
    }

    fn meta_context(&mut self, opt: u32, data: &[u8], out: &mut Vec<u8>) {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // Replaces the previous selection even when it fails.
            self.meta = None;
        }
        if !(self.structured || self.extended) {
            option_reply(
                out,
                opt,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let mut r = Reader { buf: data };
        let parsed = (|| {
            let nlen = r.u32()? as usize;
            let name = r.string(nlen)?;
            let n = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                let qlen = r.u32()? as usize;
                queries.push(r.string(qlen)?);
            }
            r.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            option_reply(out, opt, REP_ERR_INVALID, b"malformed meta context payload");
            return;
        };
        let Some(idx) = self.find_export(&name) else {
            let msg = format!("unknown export {name:?}");
            option_reply(out, opt, REP_ERR_UNKNOWN, msg.as_bytes());
            return;
        };
        let mut found: Vec<(usize, String)> = Vec::new();
        if queries.is_empty() && !set {
            found = self.exports[idx]
                .contexts
                .iter()
                .cloned()
                .enumerate()
                .collect();
        }
        for q in &queries {
            for m in self.matching(idx, q, !set) {
                if !found.iter().any(|(c, _)| *c == m.0) {
                    found.push(m);
                }
            }
        }
        for (ctx, cname) in &found {
            let mut d = Vec::new();
            put_u32(&mut d, if set { context_id(*ctx) } else { 0 });
            d.extend_from_slice(cname.as_bytes());
            option_reply(out, opt, REP_META_CONTEXT, &d);
        }
        option_reply(out, opt, REP_ACK, &[]);
        if set {
            self.meta = Some((
                name,
                found.iter().map(|(c, _)| (context_id(*c), *c)).collect(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportInfo> {
        vec![
            ExportInfo {
                name: "disk0".into(),
                description: "first".into(),
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
                refusal: None,
            },
        ]
    }

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_u64(&mut v, IHAVEOPT);
        put_u32(&mut v, o);
        put_u32(&mut v, data.len() as u32);
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        put_u32(&mut d, name.len() as u32);
        d.extend_from_slice(name.as_bytes());
        put_u16(&mut d, infos.len() as u16);
        for i in infos {
            put_u16(&mut d, *i);
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        put_u32(&mut d, name.len() as u32);
        d.extend_from_slice(name.as_bytes());
        put_u32(&mut d, queries.len() as u32);
        for q in queries {
            put_u32(&mut d, q.len() as u32);
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Parses option replies: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), REP_MAGIC);
            let o = u32::from_be_bytes(out[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(out[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            v.push((o, t, out[20..20 + l].to_vec()));
            out = &out[20 + l..];
        }
        v
    }

    fn run(h: &mut Handshake, input: &[u8]) -> (Vec<u8>, Result<HandshakeStatus, HandshakeError>) {
        let mut out = Vec::new();
        let r = h.advance(input, &mut out).map(|(used, st)| {
            assert!(used <= input.len());
            st
        });
        (out, r)
    }

    const FLAGS: [u8; 4] = [0, 0, 0, 3];

    #[test]
    fn go_with_extended_headers_and_contexts() {
        let mut h = Handshake::new(exports());
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data(
                "disk0",
                &["base:allocation", "qemu:dirty-bitmap:vmreplica", "x:y"],
            ),
        ));
        input.extend(opt(OPT_GO, &go_data("disk0", &[INFO_BLOCK_SIZE])));
        let (out, st) = run(&mut h, &input);
        let rs = replies(&out);
        assert_eq!(rs[0], (OPT_EXTENDED_HEADERS, REP_ACK, vec![]));
        assert_eq!(rs[1].1, REP_META_CONTEXT);
        assert_eq!(&rs[1].2[4..], b"base:allocation");
        assert_eq!(&rs[2].2[4..], b"qemu:dirty-bitmap:vmreplica");
        assert_eq!(rs[3], (OPT_SET_META_CONTEXT, REP_ACK, vec![]));
        assert_eq!(rs.last().unwrap().1, REP_ACK);
        match st.unwrap() {
            HandshakeStatus::Transmission(n) => {
                assert_eq!(n.export, 0);
                assert!(n.extended && n.structured);
                assert_eq!(n.contexts, vec![(1, 0), (2, 1)]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn info_reports_size_and_flags_then_unknown_export_is_refused() {
        let mut h = Handshake::new(exports());
        let mut input = FLAGS.to_vec();
        input.extend(opt(
            OPT_INFO,
            &go_data("disk1", &[INFO_NAME, INFO_DESCRIPTION]),
        ));
        input.extend(opt(OPT_GO, &go_data("nope", &[])));
        let (out, st) = run(&mut h, &input);
        assert_eq!(st.unwrap(), HandshakeStatus::NeedMore);
        let rs = replies(&out);
        let export = &rs[0].2;
        assert_eq!(u16::from_be_bytes([export[0], export[1]]), INFO_EXPORT);
        assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), 4096);
        let flags = u16::from_be_bytes([export[10], export[11]]);
        assert!(flags & FLAG_READ_ONLY != 0);
        assert_eq!(&rs[1].2[2..], b"disk1");
        assert_eq!(rs.last().unwrap().1, REP_ERR_UNKNOWN);
    }

    #[test]
    fn export_name_old_style_with_zero_padding() {
        let mut h = Handshake::new(exports());
        let mut input = vec![0, 0, 0, 1]; // fixed newstyle, no NO_ZEROES
        input.extend(opt(OPT_EXPORT_NAME, b"disk0"));
        let (out, st) = run(&mut h, &input);
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), 1 << 20);
        assert!(matches!(st.unwrap(), HandshakeStatus::Transmission(n) if !n.structured));
    }

    #[test]
    fn unknown_options_and_malformed_payloads_get_errors_and_continue() {
        let mut h = Handshake::new(exports());
        let mut input = FLAGS.to_vec();
        input.extend(opt(99, b"junk"));
        input.extend(opt(OPT_GO, &[0, 0, 0, 50, 1])); // name length beyond payload
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk0", &["base:allocation"]),
        ));
        input.extend(opt(OPT_STRUCTURED_REPLY, b"x"));
        input.extend(opt(OPT_LIST, &[]));
        let (out, st) = run(&mut h, &input);
        assert_eq!(st.unwrap(), HandshakeStatus::NeedMore);
        let rs = replies(&out);
        assert_eq!(rs[0].1, REP_ERR_UNSUP);
        assert_eq!(rs[1].1, REP_ERR_INVALID);
        assert_eq!(
            rs[2].1, REP_ERR_INVALID,
            "SET_META_CONTEXT needs structured replies"
        );
        assert_eq!(rs[3].1, REP_ERR_INVALID);
        assert_eq!(rs[4].1, REP_SERVER);
        assert_eq!(rs[5].1, REP_SERVER);
        assert_eq!(rs[6].1, REP_ACK);
    }

    #[test]
    fn oversized_option_is_discarded_without_buffering() {
        let mut h = Handshake::new(exports());
        let mut out = Vec::new();
        let mut input = FLAGS.to_vec();
        let mut hdr = Vec::new();
        put_u64(&mut hdr, IHAVEOPT);
        put_u32(&mut hdr, OPT_LIST_META_CONTEXT);
        put_u32(&mut hdr, 1 << 30);
        input.extend(hdr);
        let (used, st) = h.advance(&input, &mut out).unwrap();
        assert_eq!((used, st), (input.len(), HandshakeStatus::NeedMore));
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..1023 {
            let (used, st) = h.advance(&chunk, &mut out).unwrap();
            assert_eq!((used, st), (chunk.len(), HandshakeStatus::NeedMore));
        }
        assert!(out.is_empty());
        let (used, _) = h.advance(&chunk, &mut out).unwrap();
        assert_eq!(used, chunk.len());
        assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
    }

    #[test]
    fn byte_at_a_time_gives_same_result() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_LIST_META_CONTEXT, &meta_data("disk0", &[])));
        input.extend(opt(OPT_GO, &go_data("disk0", &[])));
        let mut whole = Handshake::new(exports());
        let (expect, st) = run(&mut whole, &input);
        let st = st.unwrap();
        let mut h = Handshake::new(exports());
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut last = HandshakeStatus::NeedMore;
        for b in &input {
            pending.push(*b);
            let (used, s) = h.advance(&pending, &mut out).unwrap();
            pending.drain(..used);
            last = s;
        }
        assert_eq!(out, expect);
        assert_eq!(last, st);
        // The LIST with no queries names both contexts.
        let names: Vec<_> = replies(&out)
            .into_iter()
            .filter(|r| r.1 == REP_META_CONTEXT)
            .map(|r| String::from_utf8(r.2[4..].to_vec()).unwrap())
            .collect();
        assert_eq!(names, ["base:allocation", "qemu:dirty-bitmap:vmreplica"]);
    }

    #[test]
    fn violations_close() {
        let mut h = Handshake::new(exports());
        let (_, st) = run(&mut h, &[0, 0, 0, 0x10]);
        assert_eq!(st, Err(HandshakeError::BadClientFlags(0x10)));
        let mut h = Handshake::new(exports());
        let mut input = FLAGS.to_vec();
        input.extend([0u8; 16]);
        assert!(matches!(
            run(&mut h, &input).1,
            Err(HandshakeError::BadOptionMagic(0))
        ));
        let mut h = Handshake::new(exports());
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"missing"));
        assert!(matches!(
            run(&mut h, &input).1,
            Err(HandshakeError::UnknownExport(_))
        ));
        let mut h = Handshake::new(exports());
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_ABORT, &[]));
        let (out, st) = run(&mut h, &input);
        assert_eq!(st.unwrap(), HandshakeStatus::Close);
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn tls_is_required_before_anything_but_abort() {
        let mut h = Handshake::new(exports()).require_tls();
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(OPT_GO, &go_data("disk0", &[])));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_STARTTLS, b"x"));
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend(b"\x16\x03\x01 a TLS ClientHello");
        let mut out = Vec::new();
        let (used, st) = h.advance(&input, &mut out).unwrap();
        assert_eq!(st, HandshakeStatus::StartTls);
        // What follows STARTTLS is the TLS handshake's, left for the driver.
        assert_eq!(&input[used..], b"\x16\x03\x01 a TLS ClientHello");
        let rs = replies(&out);
        assert_eq!(
            rs.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            vec![
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_GO, REP_ERR_TLS_REQD),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ERR_INVALID),
                (OPT_STARTTLS, REP_ACK),
            ]
        );
        // No export name leaked before TLS.
        assert!(!out.windows(5).any(|w| w == b"disk0"));
        h.tls_started();
        let mut out = Vec::new();
        let mut input = opt(OPT_STARTTLS, &[]);
        input.extend(opt(OPT_GO, &go_data("disk0", &[])));
        let (_, st) = h.advance(&input, &mut out).unwrap();
        assert!(matches!(st, HandshakeStatus::Transmission(n) if n.export == 0));
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "a second STARTTLS");
        // EXPORT_NAME without TLS ends the connection; ABORT is allowed.
        let mut h = Handshake::new(exports()).require_tls();
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"disk0"));
        assert_eq!(run(&mut h, &input).1, Err(HandshakeError::TlsRequired));
        let mut h = Handshake::new(exports()).require_tls();
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_ABORT, &[]));
        assert_eq!(run(&mut h, &input).1, Ok(HandshakeStatus::Close));
    }

    #[test]
    fn a_refused_export_answers_go_with_a_policy_error() {
        let mut ex = exports();
        ex[0].refusal = Some("too many connections".into());
        let mut h = Handshake::new(ex.clone());
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_INFO, &go_data("disk0", &[])));
        input.extend(opt(OPT_GO, &go_data("disk0", &[])));
        input.extend(opt(OPT_GO, &go_data("disk1", &[])));
        let (out, st) = run(&mut h, &input);
        assert!(matches!(st.unwrap(), HandshakeStatus::Transmission(n) if n.export == 1));
        let rs = replies(&out);
        let policy: Vec<_> = rs.iter().filter(|r| r.1 == REP_ERR_POLICY).collect();
        assert_eq!(policy.len(), 1);
        assert_eq!(policy[0].2, b"too many connections");
        let mut h = Handshake::new(ex);
        let mut input = FLAGS.to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"disk0"));
        assert!(matches!(
            run(&mut h, &input).1,
            Err(HandshakeError::Refused(..))
        ));
    }
}
