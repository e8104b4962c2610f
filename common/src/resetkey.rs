//! The applier's stateless-reset key, kept across restarts (`STORE/reset.key`).
//!
//! QUIC lets an endpoint that lost a connection's state (a restarted applier) answer the
//! peer's next packet with a stateless reset, which the peer recognises by a token derived
//! from this key and the connection ID: the shipper learns at once that its connection is
//! gone (within its next keep-alive), instead of after the idle timeout. For that the key
//! must be the one the connection began with, so it is kept in a file (0600): magic
//! `VMRRESET`, a version (1), 32 random bytes and a checksum; any other version is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"VMRRESET";
const VERSION: u32 = 1;
const LEN: usize = 8 + 4 + 32 + 8;

fn bad(path: &Path, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "stateless-reset key {}: {what} (remove it to make a new one; shippers then \
             reconnect after their idle timeout once)",
            path.display()
        ),
    )
}

/// The key in `path`, made (at random) if the file does not exist.
pub fn load_or_create(path: &Path) -> io::Result<[u8; 32]> {
    match fs::read(path) {
        Ok(b) => parse(path, &b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(path),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

fn parse(path: &Path, b: &[u8]) -> io::Result<[u8; 32]> {
    if b.len() != LEN || &b[..8] != MAGIC {
        return Err(bad(path, "not a key file".into()));
    }
    let version = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(
            path,
            format!("version {version}; this build reads version {VERSION}"),
        ));
    }
    if xxh3_64(&b[..44]).to_be_bytes() != b[44..] {
        return Err(bad(path, "damaged (checksum mismatch)".into()));
    }
    Ok(b[12..44].try_into().expect("32 bytes"))
}

fn create(path: &Path) -> io::Result<[u8; 32]> {
    let key: [u8; 32] = rand::random();
    let mut b = Vec::with_capacity(LEN);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_be_bytes());
    b.extend_from_slice(&key);
    b.extend_from_slice(&xxh3_64(&b).to_be_bytes());
    let tmp = path.with_extension("key.tmp");
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(ctx)?;
        f.write_all(&b).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
    }
    fs::rename(&tmp, path).map_err(ctx)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(ctx)?;
    Ok(key)
}

/// Connection IDs of 8 random bytes, every one of which an endpoint takes as possibly its own
/// (see the server endpoint in `link`).
pub struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_survives_restarts_and_a_strange_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("reset.key");
        let k = load_or_create(&p).unwrap();
        assert_eq!(load_or_create(&p).unwrap(), k);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut b = fs::read(&p).unwrap();
        b[11] = 2;
        fs::write(&p, &b).unwrap();
        let e = load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("version 2") && e.contains("reset.key"), "{e}");
        b[11] = 1;
        b[20] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(load_or_create(&p)
            .unwrap_err()
            .to_string()
            .contains("damaged"));
        fs::write(&p, b"hello").unwrap();
        assert!(load_or_create(&p).is_err());
    }
}
