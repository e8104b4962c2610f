//! Certificates and TLS for the link between sites: a private CA, node certificates, and
//! rustls configurations for mutual TLS 1.3 with one explicit crypto provider (ring).
//!
//! Like Hyper-V's certificate-based replication, two hosts trust each other through a CA of
//! their own, without a domain: `init_ca` once, `issue` a certificate per host, copy the CA
//! certificate (not its key) and each host's certificate and key to that host.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

/// ALPN protocol of vmreplica's replication link.
pub const ALPN: &[u8] = b"vmreplica/1";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error(
        "the private key {key} does not belong to the certificate {cert} ({reason}): give the \
         key issued with that certificate (`vmreplica certs issue` writes NAME.pem and NAME.key \
         together)"
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_new(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_path_buf())
            } else {
                io_err(path)(e)
            }
        })?;
    io::Write::write_all(&mut f, data.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Paths of a CA directory.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Creates a CA (`ca.pem`, and `ca.key` readable by the owner only) in `dir`.
pub fn init_ca(dir: &Path, name: &str, days: i64) -> Result<PathBuf, TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (cert_path, key_path) = ca_paths(dir);
    if cert_path.exists() {
        return Err(TlsError::Exists(cert_path));
    }
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    let cert = p.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// Validity of an issued certificate, relative to now.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub from: time::Duration,
    pub until: time::Duration,
}

impl Validity {
    pub fn days(d: i64) -> Validity {
        Validity {
            from: -time::Duration::hours(1),
            until: time::Duration::days(d),
        }
    }
}

/// Issues a node certificate for `name` (and `ips`) signed by the CA in `ca_dir`; writes
/// `NAME.pem` and `NAME.key` into `out`. Returns their paths.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    ips: &[IpAddr],
    validity: Validity,
    out: &Path,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let (ca_cert_path, ca_key_path) = ca_paths(ca_dir);
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Pem {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(|e| TlsError::Pem {
            path: ca_cert_path.clone(),
            reason: e.to_string(),
        })?
        .self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    for ip in ips {
        p.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    // Key encipherment too: QEMU's x509 credentials refuse certificates whose (critical) key
    // usage lacks it, whatever the key type.
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = time::OffsetDateTime::now_utc() + validity.from;
    p.not_after = time::OffsetDateTime::now_utc() + validity.until;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    fs::create_dir_all(out).map_err(io_err(out))?;
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// The end of a QEMU or libnbd TLS connection a credentials directory is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum X509Role {
    Client,
    Server,
}

/// Issues `name` a certificate like [`issue`], but writes it in the layout QEMU's
/// `tls-creds-x509` (`dir=`, `endpoint=`) and libnbd's `tls-certificates=` read:
/// `ca-cert.pem` and `client-cert.pem`/`client-key.pem` (or `server-*`). Returns `out`.
pub fn issue_x509_dir(
    ca_dir: &Path,
    name: &str,
    ips: &[IpAddr],
    validity: Validity,
    out: &Path,
    role: X509Role,
) -> Result<PathBuf, TlsError> {
    let prefix = match role {
        X509Role::Client => "client",
        X509Role::Server => "server",
    };
    fs::create_dir_all(out).map_err(io_err(out))?;
    let (cert, key) = (
        out.join(format!("{prefix}-cert.pem")),
        out.join(format!("{prefix}-key.pem")),
    );
    for p in [&cert, &key] {
        if p.exists() {
            return Err(TlsError::Exists(p.clone()));
        }
    }
    let ca_cert = out.join("ca-cert.pem");
    let (ca_pem, _) = ca_paths(ca_dir);
    let ca_data = fs::read_to_string(&ca_pem).map_err(io_err(&ca_pem))?;
    match fs::read_to_string(&ca_cert) {
        Ok(existing) if existing == ca_data => {}
        Ok(_) => return Err(TlsError::Exists(ca_cert)),
        Err(_) => write_new(&ca_cert, &ca_data, 0o644)?,
    }
    let tmp = out.join(format!(".issue-{name}-{}", std::process::id()));
    let r = issue(ca_dir, name, ips, validity, &tmp).and_then(|(c, k)| {
        fs::rename(&k, &key).map_err(io_err(&key))?;
        fs::rename(&c, &cert).map_err(io_err(&cert))
    });
    let _ = fs::remove_dir_all(&tmp);
    r.map(|()| out.to_path_buf())
}

/// The TLS 1.3 suites of both ends, in order of preference: AES-128-GCM, then AES-256-GCM and
/// ChaCha20-Poly1305 (accepted from peers that offer only those). Every byte replicated is
/// sealed once and opened once with the suite chosen here, and with AES-NI AES-128 does 10
/// rounds per block to AES-256's 14; both are standard TLS 1.3 suites, and a peer that offers
/// them in another order (rustls' default puts AES-256 first) still talks to this one.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A host's certificate chain and key, and the CA it trusts.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: Vec<CertificateDer<'static>>,
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

impl Identity {
    /// Loads a host's certificate, its key and the CA; a key that is not the certificate's
    /// is refused here, naming both files (TLS would only say the handshake failed).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Identity, TlsError> {
        let id = Identity {
            chain: pem_certs(cert)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
                path: key.to_path_buf(),
                reason: e.to_string(),
            })?,
            ca: pem_certs(ca)?,
        };
        let mismatch = |reason: String| TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason,
        };
        let signer = rustls::crypto::ring::sign::any_supported_type(&id.key)
            .map_err(|e| mismatch(e.to_string()))?;
        rustls::sign::CertifiedKey::new(id.chain.clone(), signer)
            .keys_match()
            .map_err(|e| mismatch(e.to_string()))?;
        Ok(id)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        Ok(roots)
    }

    /// Server side: TLS 1.3 only, client certificates required and verified against the CA.
    /// The cipher suite is chosen in [`provider`]'s order (AES-128-GCM first), whatever the
    /// client's order: a shipper that lists AES-256-GCM first still gets the cheaper one.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.ignore_client_order = true;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side: TLS 1.3 only, server verified against the CA, our certificate presented;
    /// offers [`provider`]'s suites, AES-128-GCM first.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = provider();
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// The names a certificate speaks for: its DNS subject alternative names, else its CN.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            x.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
        );
    }
    names
}

/// Certificate problems a TLS handshake failure can name (in rustls' words, whether this side
/// found the problem or the peer sent it), and what an admin should do about each.
const CERTIFICATE_PROBLEMS: [(&[&str], &str); 5] = [
    (
        // BadSignature: another CA of the same name (two `certs init-ca` with the defaults).
        &["unknownissuer", "unknownca", "unknown ca", "badsignature"],
        "it was not issued by the CA the other side trusts (each side's ca.pem must be the CA \
         that issued the other side's certificate)",
    ),
    (
        &["expired"],
        "it has expired (issue a new one: vmreplica certs issue)",
    ),
    (
        &["not valid yet", "notvalidyet"],
        "it is not valid yet (check both hosts' clocks)",
    ),
    (
        &["not valid for name", "notvalidforname"],
        "it does not carry the name or address it was reached by (the shipper's server_name; \
         certs issue --ip)",
    ),
    (
        &[
            "certificaterequired",
            "certificate required",
            "no certificate",
        ],
        "none was presented (the shipper needs cert and key)",
    ),
];

/// A plain account of a handshake failure `reason` that names a certificate problem: who
/// refused whose certificate, and why. `here` and `peer` name the two sides ("primary",
/// "replica"); a reason the peer sent ("... by peer ...") means the peer refused ours.
pub fn explain_refusal(reason: &str, here: &str, peer: &str) -> Option<String> {
    let r = reason.to_ascii_lowercase();
    let (_, problem) = CERTIFICATE_PROBLEMS
        .iter()
        .find(|(marks, _)| marks.iter().any(|m| r.contains(m)))?;
    let (refuser, owner) = if r.contains("by peer") {
        (peer, here)
    } else {
        (here, peer)
    };
    Some(format!(
        "the {refuser} refused the {owner}'s certificate: {problem}"
    ))
}

/// `reason` for a log line or an error: led by [`explain_refusal`]'s account when it names a
/// certificate problem, as it is otherwise.
pub fn describe_refusal(reason: &str, here: &str, peer: &str) -> String {
    match explain_refusal(reason, here, peer) {
        Some(plain) => format!("{plain} ({reason})"),
        None => reason.to_string(),
    }
}

/// Which primaries an applier admits: exact names and `*.suffix` patterns.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    patterns: Vec<String>,
}

impl AllowList {
    pub fn new(patterns: &[String]) -> AllowList {
        AllowList {
            patterns: patterns.iter().map(|p| p.to_ascii_lowercase()).collect(),
        }
    }

    /// The first of `names` admitted by the list.
    pub fn admit(&self, names: &[String]) -> Option<String> {
        names
            .iter()
            .find(|n| {
                let n = n.to_ascii_lowercase();
                self.patterns.iter().any(|p| match p.strip_prefix("*.") {
                    // `*.dr.example` admits `a.dr.example` and `b.c.dr.example`, not
                    // `dr.example` itself nor `xdr.example`.
                    Some(suffix) => {
                        n.len() > suffix.len() + 1 && n.ends_with(&format!(".{suffix}"))
                    }
                    None => *p == n,
                })
            })
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_refusals_are_explained_with_who_refused_whom() {
        let e = explain_refusal(
            "aborted by peer: the cryptographic handshake failed: error 45: invalid peer \
             certificate: certificate expired: verification time 1796287435 (UNIX), but \
             certificate is not valid after 1796201035 (86400 seconds ago)",
            "primary",
            "replica",
        )
        .unwrap();
        assert!(
            e.starts_with("the replica refused the primary's certificate: it has expired"),
            "{e}"
        );
        let e = explain_refusal(
            "the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer",
            "replica",
            "primary",
        )
        .unwrap();
        assert!(
            e.starts_with(
                "the replica refused the primary's certificate: it was not issued by the CA"
            ),
            "{e}"
        );
        assert!(explain_refusal("timed out", "primary", "replica").is_none());
        assert!(explain_refusal("closed by peer: not allowed", "primary", "replica").is_none());
    }

    #[test]
    fn allow_list_matches_exact_names_and_suffixes() {
        let a = AllowList::new(&["primary-1".into(), "*.dc1.example".into()]);
        let ok = |n: &str| a.admit(&[n.to_string()]).is_some();
        assert!(
            ok("primary-1") && ok("PRIMARY-1") && ok("h1.dc1.example") && ok("a.b.dc1.example")
        );
        assert!(
            !ok("primary-2")
                && !ok("dc1.example")
                && !ok("xdc1.example")
                && !ok("h1.dc1.example.evil")
        );
    }

    #[test]
    fn issued_certificates_carry_their_names_and_configs_build() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "vmreplica test CA", 30).unwrap();
        assert!(matches!(
            init_ca(&ca, "again", 30),
            Err(TlsError::Exists(_))
        ));
        let (c, k) = issue(
            &ca,
            "primary-1",
            &["127.0.0.1".parse().unwrap()],
            Validity::days(7),
            dir.path(),
        )
        .unwrap();
        let id = Identity::load(&c, &k, &ca.join("ca.pem")).unwrap();
        assert_eq!(cert_names(&id.chain[0]), vec!["primary-1".to_string()]);
        id.server_config().unwrap();
        id.client_config().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let e = Identity::load(&dir.path().join("nope.pem"), &k, &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }

    /// The suite a client and a server configuration agree on, by a TLS handshake in memory
    /// (quinn does not tell; its QUIC handshake chooses the suite in the same rustls code).
    fn negotiated(client: ClientConfig, server: ServerConfig) -> rustls::CipherSuite {
        let name = rustls::pki_types::ServerName::try_from("replica-1").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(s.negotiated_cipher_suite().unwrap().suite(), suite);
        suite
    }

    /// AES-128-GCM is chosen between two builds of this version, and between this version and
    /// a peer configured as before (rustls' default order, AES-256-GCM first, client's order
    /// followed) whichever end that peer is; a peer that offers only ChaCha20 still connects.
    #[test]
    fn aes_128_gcm_is_negotiated_with_new_and_old_peers() {
        use rustls::crypto::ring::{cipher_suite as cs, default_provider};
        use rustls::CipherSuite::{
            TLS13_AES_128_GCM_SHA256 as AES128, TLS13_CHACHA20_POLY1305_SHA256 as CHACHA,
        };
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "vmreplica test CA", 30).unwrap();
        let ips = ["127.0.0.1".parse().unwrap()];
        let id = |name: &str| {
            let (c, k) = issue(&ca, name, &ips, Validity::days(7), dir.path()).unwrap();
            Identity::load(&c, &k, &ca.join("ca.pem")).unwrap()
        };
        let (primary, replica) = (id("primary-1"), id("replica-1"));
        // The configurations of the version before, with a provider of the caller's choosing.
        let client_with = |p: rustls::crypto::CryptoProvider| {
            ClientConfig::builder_with_provider(Arc::new(p))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(primary.roots().unwrap())
                .with_client_auth_cert(primary.chain.clone(), primary.key.clone_key())
                .unwrap()
        };
        let old_server = {
            let p = Arc::new(default_provider());
            let v = WebPkiClientVerifier::builder_with_provider(
                Arc::new(replica.roots().unwrap()),
                p.clone(),
            )
            .build()
            .unwrap();
            ServerConfig::builder_with_provider(p)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(v)
                .with_single_cert(replica.chain.clone(), replica.key.clone_key())
                .unwrap()
        };
        let new_client = || primary.client_config().unwrap();
        let new_server = || replica.server_config().unwrap();
        assert_eq!(negotiated(new_client(), new_server()), AES128);
        assert_eq!(negotiated(new_client(), old_server), AES128);
        assert_eq!(
            negotiated(client_with(default_provider()), new_server()),
            AES128
        );
        let chacha_only = rustls::crypto::CryptoProvider {
            cipher_suites: vec![cs::TLS13_CHACHA20_POLY1305_SHA256],
            ..default_provider()
        };
        assert_eq!(negotiated(client_with(chacha_only), new_server()), CHACHA);
    }

    /// A key that is not the certificate's is refused when loading, naming both files
    /// (before, the TLS handshake failed later and named neither).
    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "vmreplica test CA", 30).unwrap();
        let (c1, _) = issue(&ca, "primary-1", &[], Validity::days(7), dir.path()).unwrap();
        let (_, k2) = issue(&ca, "primary-2", &[], Validity::days(7), dir.path()).unwrap();
        let e = Identity::load(&c1, &k2, &ca.join("ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("primary-1.pem")
                && e.contains("primary-2.key")
                && e.contains("does not belong"),
            "{e}"
        );
    }
}
