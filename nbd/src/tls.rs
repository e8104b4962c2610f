//! NBD over TLS (NBD_OPT_STARTTLS), server side, with rustls: x509 certificates from the
//! project's CA (`vmreplica certs`), client certificates required, verified against that CA
//! and admitted only if one of their names is on an allow-list (exact names or `*.suffix`),
//! as qemu-nbd's `--tls-creds` with `verify-peer` and `--tls-authz` do.
//!
//! After the handshake the connection is a [`TlsStream`]: one reader and one writer thread
//! may use it at once (the driver's reader and writer threads). They share the rustls
//! connection under a mutex held only for the (CPU-only) record work, never across a blocking
//! socket read or write, so a reader waiting for the client never holds up replies.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use vmreplica_common::tls::{cert_names, describe_refusal, AllowList, Identity, TlsError};

/// The server's TLS settings: its certificate, the CA clients must be issued by, and the
/// names admitted.
pub struct TlsConfig {
    config: Arc<ServerConfig>,
    allow: AllowList,
}

impl TlsConfig {
    pub fn new(identity: &Identity, allow: AllowList) -> Result<TlsConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in &identity.ca {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(TlsConfig {
            config: Arc::new(config),
            allow,
        })
    }

    /// The server side of the TLS handshake on `sock` (blocking, bounded by the socket's read
    /// timeout). `early` holds bytes of it already read with the STARTTLS option. Returns the
    /// stream and the client certificate's admitted name.
    pub fn accept(&self, sock: TcpStream, early: &[u8]) -> io::Result<(TlsStream, String)> {
        let mut conn = ServerConnection::new(Arc::clone(&self.config)).map_err(io::Error::other)?;
        // Replies are turned into records and written out at once; the driver's byte budget
        // bounds what is in flight, not rustls' buffer.
        conn.set_buffer_limit(None);
        let mut early = early;
        while !early.is_empty() {
            conn.read_tls(&mut early)?;
            conn.process_new_packets()
                .map_err(|e| refused(&e.to_string()))?;
        }
        let mut s = &sock;
        while conn.is_handshaking() {
            conn.complete_io(&mut s)
                .map_err(|e| refused(&e.to_string()))?;
        }
        let names = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c: &CertificateDer<'_>| cert_names(c))
            .unwrap_or_default();
        let Some(name) = self.allow.admit(&names) else {
            conn.send_close_notify();
            let _ = conn.complete_io(&mut s);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "client certificate {} is not on the allow-list (--tls-allow)",
                    if names.is_empty() {
                        "without a name".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        };
        Ok((
            TlsStream {
                shared: Arc::new(Shared {
                    sock,
                    conn: Mutex::new(Conn {
                        conn,
                        ciphertext: Vec::new(),
                    }),
                    writing: Mutex::new(()),
                }),
            },
            name,
        ))
    }
}

fn refused(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "TLS handshake failed: {}",
            describe_refusal(reason, "server", "client")
        ),
    )
}

struct Conn {
    conn: ServerConnection,
    /// Bytes read from the socket that rustls has not taken yet.
    ciphertext: Vec<u8>,
}

struct Shared {
    sock: TcpStream,
    conn: Mutex<Conn>,
    /// Held while records are produced and written, so they reach the socket in order.
    writing: Mutex<()>,
}

/// A TLS connection one reader and one writer thread can use at once.
#[derive(Clone)]
pub struct TlsStream {
    shared: Arc<Shared>,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Shared {
    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes out every record rustls has queued (replies, alerts, key updates).
    fn send_pending(&self) -> io::Result<()> {
        let _w = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        {
            let mut c = self.conn();
            while c.conn.wants_write() {
                c.conn.write_tls(&mut out)?;
            }
        }
        (&self.sock).write_all(&out)
    }
}

impl TlsStream {
    pub fn try_clone(&self) -> TlsStream {
        self.clone()
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.shared.sock.set_read_timeout(t)
    }

    /// Sends close_notify on `Write`/`Both`, then shuts the socket down.
    pub fn shutdown(&self, how: Shutdown) {
        if how != Shutdown::Read {
            self.shared.conn().conn.send_close_notify();
            let _ = self.shared.send_pending();
        }
        let _ = self.shared.sock.shutdown(how);
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = &*self.shared;
        loop {
            let want_write = {
                let mut c = s.conn();
                match c.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The client closed without close_notify: the end of the stream.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if c.ciphertext.is_empty() {
                    None
                } else {
                    let Conn { conn, ciphertext } = &mut *c;
                    let mut rest = &ciphertext[..];
                    conn.read_tls(&mut rest)?;
                    let used = ciphertext.len() - rest.len();
                    ciphertext.drain(..used);
                    conn.process_new_packets().map_err(tls_err)?;
                    Some(conn.wants_write())
                }
            };
            match want_write {
                Some(true) => s.send_pending()?,
                Some(false) => {}
                None => {
                    // Nothing buffered: wait for the client, without holding the connection.
                    let mut tmp = [0u8; 16 * 1024];
                    let n = (&s.sock).read(&mut tmp)?;
                    if n == 0 {
                        return Ok(0);
                    }
                    s.conn().ciphertext.extend_from_slice(&tmp[..n]);
                }
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let s = &*self.shared;
        let _w = s.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(buf.len() + 64);
        {
            let mut c = s.conn();
            c.conn.writer().write_all(buf)?;
            while c.conn.wants_write() {
                c.conn.write_tls(&mut out)?;
            }
        }
        (&s.sock).write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
