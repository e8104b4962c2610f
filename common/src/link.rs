//! The QUIC link between sites: endpoints tuned for long fat networks, and framed
//! [`wire`] messages on QUIC streams.
//!
//! Defaults are sized for 100 ms RTT at 1 Gbit/s (a bandwidth-delay product of 12.5 MB):
//! 16 MiB per-stream and 64 MiB per-connection receive windows, a 64 MiB send window, and
//! 8 MiB UDP socket buffers. Congestion control is `vmr`, our own controller for long lossy
//! links ([`crate::congestion`]), which remembers each path for the next connection, unless
//! configured otherwise: Cubic and NewReno are quinn's loss-based ones; quinn's BBR is
//! offered but marked experimental by quinn itself.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, RecvStream, SendStream, TransportConfig, VarInt};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::congestion::{PathBook, VmrConfig};
use crate::tls::Identity;
use crate::wire::{self, Chunk, Message, WireError};

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("QUIC setup: {0}")]
    Setup(String),
    #[error("UDP socket {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(quinn::WriteError),
    #[error("stream read: {0}")]
    Read(quinn::ReadError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("peer sent a bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("peer: {0}")]
    Peer(String),
}

// A lost connection says why (e.g. the applier's refusal), not just "connection lost".
impl From<quinn::ReadError> for LinkError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => LinkError::Connection(c),
            e => LinkError::Read(e),
        }
    }
}

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => LinkError::Connection(c),
            e => LinkError::Write(e),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    NewReno,
    /// quinn's BBR implementation is experimental.
    Bbr,
    /// vmreplica's model-based controller for long, lossy links ([`crate::congestion`]):
    /// the default.
    #[default]
    Vmr,
}

/// Transport tuning; the defaults suit 100 ms at 1 Gbit/s.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    pub congestion: Congestion,
    pub stream_window: u64,
    pub connection_window: u64,
    pub send_window: u64,
    pub udp_buffer: usize,
    /// Assumed RTT before the first measurement, in milliseconds.
    pub initial_rtt_ms: u64,
    /// A connection silent this long (link cut, peer gone) is given up and re-established;
    /// the cycle then resumes. The shorter of the two sides' values applies.
    pub idle_timeout_s: u64,
    /// The largest UDP payload this side accepts and MTU discovery looks for (bytes,
    /// 1200..=[`MAX_UDP_PAYLOAD`]); the smaller of the two sides' values bounds a path.
    pub max_udp_payload: u16,
}

/// The largest `max_udp_payload`: quinn hands the kernel up to 10 datagrams in one GSO send,
/// which must stay within one 64 KiB UDP send (a bigger one fails with EMSGSIZE, which
/// quinn-udp takes for a lost MTU probe and drops without a word).
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// Packets start at 1200 bytes; MTU discovery (quinn's binary search, right after the
/// handshake and every 10 minutes) raises them to what the path carries up to this bound,
/// and black-hole detection drops back to 1200 if a path stops carrying them. quinn's
/// default, 1452, stays within Ethernet's 1500; a bigger bound costs nothing on such paths (a
/// few lost probes) and lets paths that carry more (jumbo-frame DR links, loopback) use
/// fewer, bigger packets: every packet costs a header, an AEAD seal and open, an ACK range
/// and the congestion controller's and loss detection's bookkeeping on both sides.
pub const DEFAULT_UDP_PAYLOAD: u16 = MAX_UDP_PAYLOAD;

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            congestion: Congestion::Vmr,
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            send_window: 64 << 20,
            udp_buffer: 8 << 20,
            initial_rtt_ms: 100,
            idle_timeout_s: 30,
            max_udp_payload: DEFAULT_UDP_PAYLOAD,
        }
    }
}

impl Tuning {
    pub fn transport(&self) -> TransportConfig {
        self.transport_on(None)
    }

    /// The transport for a connection over `path` (the endpoint's book and the remote
    /// address): a `vmr` controller starts from what the book remembers of that path and
    /// keeps it up to date.
    pub fn transport_on(&self, path: Option<(PathBook, SocketAddr)>) -> TransportConfig {
        let mut t = TransportConfig::default();
        let var = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        let idle = Duration::from_secs(self.idle_timeout_s.clamp(1, 3600));
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(self.udp_payload());
        t.mtu_discovery_config(Some(mtud));
        t.stream_receive_window(var(self.stream_window))
            .receive_window(var(self.connection_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(256))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .initial_rtt(Duration::from_millis(self.initial_rtt_ms.max(1)))
            // A ping a second at most: a restarted peer answers it with a stateless reset,
            // so a lost connection is noticed within about a second, not at the idle timeout.
            .keep_alive_interval(Some((idle / 3).min(Duration::from_secs(1))))
            .max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::Vmr => t.congestion_controller_factory(Arc::new(VmrConfig {
                params: Default::default(),
                path,
            })),
        };
        t
    }

    /// `max_udp_payload` within 1200..=[`MAX_UDP_PAYLOAD`].
    pub fn udp_payload(&self) -> u16 {
        self.max_udp_payload.clamp(1200, MAX_UDP_PAYLOAD)
    }

    /// An endpoint that takes datagrams up to [`Tuning::udp_payload`] and tells its peers so
    /// (the transport parameter that bounds their MTU discovery).
    fn endpoint_config(&self, mut c: EndpointConfig) -> EndpointConfig {
        c.max_udp_payload_size(self.udp_payload())
            .expect("udp_payload is within quinn's 1200..=65527");
        c
    }
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<UdpSocket, LinkError> {
    let err = |source| LinkError::Socket { addr, source };
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max; say so, since a small
    // receive buffer drops bursts on a long fat link. (Linux reports twice what it grants.)
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    for (what, got, sysctl) in [
        ("receive", s.recv_buffer_size(), "net.core.rmem_max"),
        ("send", s.send_buffer_size(), "net.core.wmem_max"),
    ] {
        if let Ok(got) = got {
            if got / 2 < buffer {
                tracing::warn!(
                    %addr,
                    "UDP {what} buffer is {} KiB, not the {} KiB asked for (udp_buffer): raise {sysctl} for long fat links",
                    got / 2 / 1024,
                    buffer / 1024
                );
            }
        }
    }
    s.bind(&addr.into()).map_err(err)?;
    Ok(s.into())
}

/// A server endpoint: mutual TLS with the identity's CA; client certificates required.
/// `reset_key` (see `resetkey`): the stateless-reset key, kept across restarts so that a
/// restarted server resets its peers' old connections at once.
pub fn server(
    addr: SocketAddr,
    id: &Identity,
    tuning: &Tuning,
    reset_key: Option<&[u8; 32]>,
) -> Result<Endpoint, LinkError> {
    let crypto = QuicServerConfig::try_from(id.server_config()?)
        .map_err(|e| LinkError::Setup(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport()));
    let sock = udp_socket(addr, tuning.udp_buffer)?;
    let ep_cfg = match reset_key {
        Some(k) => {
            let mut c =
                EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k)));
            // Random connection IDs that any process of this applier takes for its own, so a
            // restarted one answers its predecessor's with a reset (quinn's default signs IDs
            // with a key per process, and drops the others silently).
            c.cid_generator(|| Box::new(crate::resetkey::RandomCids));
            c
        }
        None => EndpointConfig::default(),
    };
    let ep_cfg = tuning.endpoint_config(ep_cfg);
    Endpoint::new(ep_cfg, Some(cfg), sock, Arc::new(quinn::TokioRuntime))
        .map_err(|source| LinkError::Socket { addr, source })
}

/// A client endpoint and what its connections share: the TLS configuration and the memory
/// of the paths they took (so a reconnect starts at the path's last measured rate).
#[derive(Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    config: quinn::ClientConfig,
    tuning: Tuning,
    paths: PathBook,
}

impl Client {
    /// Connects to `remote`, starting from what this endpoint remembers of the path.
    pub fn connect(
        &self,
        remote: SocketAddr,
        server_name: &str,
    ) -> Result<quinn::Connecting, quinn::ConnectError> {
        let mut cfg = self.config.clone();
        let path = Some((self.paths.clone(), remote));
        cfg.transport_config(Arc::new(self.tuning.transport_on(path)));
        self.endpoint.connect_with(cfg, remote, server_name)
    }

    pub fn paths(&self) -> &PathBook {
        &self.paths
    }
}

/// A client endpoint bound to `bind` (use port 0), presenting the identity's certificate.
pub fn client(bind: SocketAddr, id: &Identity, tuning: &Tuning) -> Result<Client, LinkError> {
    let crypto = QuicClientConfig::try_from(id.client_config()?)
        .map_err(|e| LinkError::Setup(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport()));
    let sock = udp_socket(bind, tuning.udp_buffer)?;
    let mut ep = Endpoint::new(
        tuning.endpoint_config(EndpointConfig::default()),
        None,
        sock,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| LinkError::Socket { addr: bind, source })?;
    ep.set_default_client_config(cfg.clone());
    Ok(Client {
        endpoint: ep,
        config: cfg,
        tuning: tuning.clone(),
        paths: PathBook::default(),
    })
}

/// Names in the peer's verified certificate.
pub fn peer_names(conn: &quinn::Connection) -> Vec<String> {
    conn.peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(crate::tls::cert_names))
        .unwrap_or_default()
}

/// Writes one message as a frame.
pub async fn send(s: &mut SendStream, m: &Message) -> Result<(), LinkError> {
    let mut buf = Vec::new();
    wire::encode(m, &mut buf)?;
    s.write_all(&buf).await?;
    Ok(())
}

/// Writes one chunk as a frame, handing its payload to the stream without copying it.
pub async fn send_chunk(s: &mut SendStream, c: Chunk) -> Result<(), LinkError> {
    let head = Bytes::from(wire::chunk_frame_head(&c));
    s.write_all_chunks(&mut [head, Bytes::from(c.payload)])
        .await?;
    Ok(())
}

/// Fills `buf` from the stream; a stream that ends first is a truncated frame.
async fn read_exact(s: &mut RecvStream, buf: &mut [u8]) -> Result<(), LinkError> {
    match s.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(LinkError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads one frame; `Ok(None)` when the stream finished cleanly between frames. A chunk's
/// payload is read straight into the chunk.
pub async fn recv(s: &mut RecvStream) -> Result<Option<Message>, LinkError> {
    recv_reusing(s, Vec::new()).await
}

/// Reads exactly `n` bytes from the stream into `buf`, replacing what it held. The bytes go
/// straight into `buf`'s spare capacity: neither zeroed first nor, when `buf` is too small,
/// copied by a reallocation (it is replaced by a new one of `n` bytes, as nothing in it is
/// kept).
async fn read_payload(s: &mut RecvStream, buf: &mut Vec<u8>, n: usize) -> Result<(), LinkError> {
    buf.clear();
    if buf.capacity() < n {
        *buf = Vec::with_capacity(n);
    }
    while buf.len() < n {
        let got = std::future::poll_fn(|cx| {
            let want = n - buf.len();
            let mut rb = tokio::io::ReadBuf::uninit(&mut buf.spare_capacity_mut()[..want]);
            std::task::ready!(s.poll_read_buf(cx, &mut rb))?;
            std::task::Poll::Ready(Ok::<usize, quinn::ReadError>(rb.filled().len()))
        })
        .await?;
        if got == 0 {
            return Err(LinkError::Truncated);
        }
        // SAFETY: `got` is the length of what `poll_read_buf` filled at the start of the
        // ReadBuf, which is the spare capacity right after `buf.len()`: those bytes are
        // initialised (ReadBuf only counts as filled what was written through it), and
        // `buf.len() + got <= n <= buf.capacity()` since the ReadBuf held `n - buf.len()`.
        unsafe { buf.set_len(buf.len() + got) };
    }
    Ok(())
}

/// [`recv`], reading a chunk's payload into `spare`'s allocation: a receiver that hands its
/// payloads back (a [`BufferPool`](crate::pool::BufferPool)) neither allocates nor zeroes a
/// buffer per chunk. `spare` is emptied and filled from the stream with the payload alone
/// (see `read_payload`), so nothing it held before survives in a chunk; a frame that is not a
/// chunk drops it.
pub async fn recv_reusing(
    s: &mut RecvStream,
    spare: Vec<u8>,
) -> Result<Option<Message>, LinkError> {
    let mut h = [0u8; 4];
    match s.read_exact(&mut h).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(LinkError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let n = wire::frame_len(h)? as usize;
    let mut head = [0u8; wire::CHUNK_HEAD];
    let first = n.min(wire::CHUNK_HEAD);
    read_exact(s, &mut head[..first]).await?;
    if n >= wire::CHUNK_HEAD && wire::is_chunk(&head) {
        let (mut c, plen) = wire::decode_chunk_head(&head)?;
        match plen.cmp(&(n - wire::CHUNK_HEAD)) {
            std::cmp::Ordering::Equal => {}
            std::cmp::Ordering::Less => {
                return Err(WireError::Trailing(n - wire::CHUNK_HEAD - plen).into())
            }
            std::cmp::Ordering::Greater => return Err(WireError::Truncated("chunk payload").into()),
        }
        c.payload = spare;
        read_payload(s, &mut c.payload, plen).await?;
        return Ok(Some(Message::Chunk(c)));
    }
    let mut body = vec![0u8; n];
    body[..first].copy_from_slice(&head[..first]);
    read_exact(s, &mut body[first..]).await?;
    Ok(Some(wire::decode_body(&body)?))
}

/// Reads one frame that must be there; a peer `Error` message becomes [`LinkError::Peer`].
pub async fn expect(s: &mut RecvStream) -> Result<Message, LinkError> {
    match recv(s).await? {
        None => Err(LinkError::Truncated),
        Some(Message::Error { code, message }) => {
            Err(LinkError::Peer(format!("{message} (code {code})")))
        }
        Some(m) => Ok(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{init_ca, issue, Validity};

    /// Endpoints and connections that must outlive the test's stream.
    type Keep = (Endpoint, Client, quinn::Connection, quinn::Connection);

    const HELLO: Message = Message::Acked {
        cycle: 1,
        epoch: 1,
        bytes: 1,
    };

    /// A CA in `dir/ca`, and a function that issues and loads an identity it signs for
    /// 127.0.0.1 under a name.
    fn test_ca(dir: &std::path::Path) -> impl Fn(&str) -> Identity + '_ {
        let ca = dir.join("ca");
        init_ca(&ca, "link test CA", 1).unwrap();
        move |name: &str| {
            let ips = ["127.0.0.1".parse().unwrap()];
            let (c, k) = issue(&ca, name, &ips, Validity::days(1), dir).unwrap();
            Identity::load(&c, &k, &ca.join("ca.pem")).unwrap()
        }
    }

    /// A client and a server endpoint on loopback that trust each other, and one stream
    /// whose first frame (`HELLO`) is already sent.
    async fn pair(dir: &std::path::Path) -> (SendStream, RecvStream, Keep) {
        let id = test_ca(dir);
        let t = Tuning::default();
        let srv = server("127.0.0.1:0".parse().unwrap(), &id("replica-1"), &t, None).unwrap();
        let cli = client("127.0.0.1:0".parse().unwrap(), &id("primary-1"), &t).unwrap();
        let addr = srv.local_addr().unwrap();
        let accept = {
            let srv = srv.clone();
            tokio::spawn(async move {
                let conn = srv.accept().await.unwrap().await.unwrap();
                let (_, r) = conn.accept_bi().await.unwrap();
                (r, conn)
            })
        };
        let conn = cli.connect(addr, "replica-1").unwrap().await.unwrap();
        let (mut s, _) = conn.open_bi().await.unwrap();
        // The server sees the stream once something is written on it.
        send(&mut s, &HELLO).await.unwrap();
        let (r, server_conn) = accept.await.unwrap();
        (s, r, (srv, cli, conn, server_conn))
    }

    /// The path MTU the client's connection to a server reaches within 2 seconds of
    /// traffic on loopback (which carries 64 KiB datagrams), with the tunings given.
    async fn discovered_mtu(dir: &std::path::Path, cli_t: &Tuning, srv_t: &Tuning) -> u16 {
        let id = test_ca(dir);
        let srv = server(
            "127.0.0.1:0".parse().unwrap(),
            &id("replica-1"),
            srv_t,
            None,
        )
        .unwrap();
        let cli = client("127.0.0.1:0".parse().unwrap(), &id("primary-1"), cli_t).unwrap();
        let addr = srv.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let conn = srv.accept().await.unwrap().await.unwrap();
            let (_, mut r) = conn.accept_bi().await.unwrap();
            while r.read_chunk(1 << 20, true).await.unwrap().is_some() {}
            conn
        });
        let conn = cli.connect(addr, "replica-1").unwrap().await.unwrap();
        let (mut s, _) = conn.open_bi().await.unwrap();
        let block = vec![0x5a; 256 << 10];
        // Discovery on loopback takes a few round trips of microseconds; 2 s of traffic also
        // leaves time to overshoot a bound that does not hold.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline && conn.stats().path.current_mtu <= 6000 {
            s.write_all(&block).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mtu = conn.stats().path.current_mtu;
        s.finish().unwrap();
        drop(sink);
        mtu
    }

    /// Paths that carry big datagrams (here loopback) get packets up to `max_udp_payload`
    /// (6500 by default), not quinn's 1452; a side that sets it lower, or a peer of an older
    /// version (which accepts at most 1472), bounds them.
    #[tokio::test]
    async fn mtu_discovery_reaches_the_configured_bound() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tuning::default();
        let mtu = discovered_mtu(&dir.path().join("a"), &t, &t).await;
        assert!(mtu > 6000 && mtu <= MAX_UDP_PAYLOAD, "{mtu}");
        let small = Tuning {
            max_udp_payload: 1452,
            ..Tuning::default()
        };
        let mtu = discovered_mtu(&dir.path().join("b"), &t, &small).await;
        assert!(mtu <= 1452, "{mtu}");
        let old = Tuning {
            max_udp_payload: 1472,
            ..Tuning::default()
        };
        let mtu = discovered_mtu(&dir.path().join("c"), &old, &t).await;
        assert!(mtu <= 1472, "{mtu}");
    }

    #[tokio::test]
    async fn frames_and_chunks_cross_a_stream_and_bad_chunk_lengths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, mut r, _conn) = pair(dir.path()).await;
        let tag = crate::wire::Tag {
            lineage: crate::lineage::Lineage([5; 16]),
            cycle: 3,
            epoch: 1,
        };
        let chunk = Chunk::pack(tag, 0, 65536, &[9u8; 8192], true);
        let raw = Chunk::pack(tag, 0, 0, &[7u8; 100], false);
        send_chunk(&mut s, chunk.clone()).await.unwrap();
        send_chunk(&mut s, raw.clone()).await.unwrap();
        send(&mut s, &Message::Chunk(chunk.clone())).await.unwrap();
        // A chunk frame whose payload length claims less than the frame holds.
        let mut bad = wire::chunk_frame_head(&chunk);
        bad.extend_from_slice(&chunk.payload);
        bad[..4]
            .copy_from_slice(&((wire::CHUNK_HEAD + chunk.payload.len() + 1) as u32).to_be_bytes());
        bad.push(0);
        s.write_all(&bad).await.unwrap();
        s.finish().unwrap();
        assert_eq!(recv(&mut r).await.unwrap(), Some(HELLO.clone()));
        for want in [chunk.clone(), raw, chunk] {
            assert_eq!(recv(&mut r).await.unwrap(), Some(Message::Chunk(want)));
        }
        assert!(matches!(
            recv(&mut r).await,
            Err(LinkError::Wire(WireError::Trailing(1)))
        ));
    }

    /// Payloads read into reused buffers (longer than the payload and full of other bytes,
    /// shorter, empty) come out exactly as sent; a damaged payload read into one is
    /// still caught by the chunk's checksum; a stream that ends inside a payload is an error.
    #[tokio::test]
    async fn chunks_received_into_spare_buffers_hold_only_what_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, mut r, _conn) = pair(dir.path()).await;
        let tag = crate::wire::Tag {
            lineage: crate::lineage::Lineage([5; 16]),
            cycle: 3,
            epoch: 1,
        };
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_be_bytes())
            .collect();
        let noise = crate::wire::incompressible(70_000);
        let lz4 = Chunk::pack(tag, 0, 0, &text, true);
        let raw = Chunk::pack(tag, 0, 1 << 20, &noise, true);
        let zero = Chunk::pack(tag, 0, 2 << 20, &[0u8; 8192], true);
        assert_eq!(lz4.encoding, crate::wire::Encoding::Lz4);
        assert_eq!(raw.encoding, crate::wire::Encoding::Raw);
        let mut damaged = lz4.clone();
        let mid = damaged.payload.len() / 2;
        damaged.payload[mid] ^= 0x40;
        for c in [&lz4, &raw, &zero, &damaged] {
            send_chunk(&mut s, c.clone()).await.unwrap();
        }
        // Half a chunk, then the end of the stream.
        let mut cut = wire::chunk_frame_head(&lz4);
        cut.extend_from_slice(&lz4.payload[..lz4.payload.len() / 2]);
        s.write_all(&cut).await.unwrap();
        s.finish().unwrap();
        assert_eq!(recv(&mut r).await.unwrap(), Some(HELLO.clone()));

        // Longer than the payload, full of other bytes.
        let long = vec![0xee; 3 << 20];
        // Shorter.
        let short = vec![0x11; 1000];
        for (want, spare) in [(&lz4, long), (&raw, short), (&zero, vec![7; 64])] {
            let got = match recv_reusing(&mut r, spare).await.unwrap() {
                Some(Message::Chunk(c)) => c,
                other => panic!("expected a chunk, got {other:?}"),
            };
            assert_eq!(&got, want);
            let mut buf = crate::iobuf::IoBuf::default();
            let at = got.unpack_aligned(&mut buf).unwrap();
            if got.encoding == crate::wire::Encoding::Zero {
                assert_eq!(at, None);
            } else {
                let at = at.unwrap();
                let plain: &[u8] = if got.offset == 0 { &text } else { &noise };
                assert_eq!(&buf[at..], plain);
            }
        }
        let got = match recv_reusing(&mut r, vec![0xaa; 2 << 20]).await.unwrap() {
            Some(Message::Chunk(c)) => c,
            other => panic!("expected a chunk, got {other:?}"),
        };
        assert_eq!(got, damaged);
        let err = got
            .unpack_aligned(&mut vec![0xaa; 4096].into())
            .unwrap_err();
        assert!(
            matches!(err, WireError::BadChunk { ref reason, .. } if reason.contains("checksum") || reason.contains("lz4") || reason.contains("length")),
            "{err}"
        );
        assert!(matches!(
            recv_reusing(&mut r, vec![0x55; 1 << 20]).await,
            Err(LinkError::Truncated)
        ));
    }
}
