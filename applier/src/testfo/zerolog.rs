//! A test failover's zero record (`tests/POINT/NAME.zero`): the ranges of a disk the test VM
//! trimmed or zeroed, which read as zeroes whatever the point holds there. With the scratch
//! file's allocated extents (what the test VM wrote) it is everything a restarted applier
//! needs to serve the test failover as it was.
//!
//! ```text
//! header  32 bytes: magic "VMRZERO\0", version u32, 0u32, disk size u64, check u64
//! record  24 bytes: offset u64, length u64, check u64, repeated
//! ```
//! Integers are big-endian; each check is xxh3-64 of the bytes before it in its header or
//! record, with the record's index mixed in (a record copied elsewhere in the file fails).
//! Records are appended and made durable before the ranges they name are punched in the
//! scratch file. A crash may leave a torn last record: a scan stops at the first record whose
//! check fails, and the writer cuts the file there. An unknown magic or version is refused.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const MAGIC: [u8; 8] = *b"VMRZERO\0";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
pub const RECORD_LEN: usize = 24;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a zero record (bad magic)")]
    BadMagic,
    #[error("zero record format version {0}; this build reads version {VERSION}")]
    Version(u32),
    #[error("its header is damaged (checksum mismatch)")]
    BadHeader,
    #[error("truncated header")]
    Short,
}

/// What a zero record holds: the disk size it was made for, its ranges (in the order
/// written), and how many bytes of it are whole records (a torn tail beyond is cut).
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub size: u64,
    pub ranges: Vec<(u64, u64)>,
    pub valid_len: usize,
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

pub fn encode_header(size: u64) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_be_bytes());
    b[16..24].copy_from_slice(&size.to_be_bytes());
    let c = xxh3_64_with_seed(&b[..24], 0);
    b[24..].copy_from_slice(&c.to_be_bytes());
    b
}

/// Record number `index` (0 is the first after the header).
pub fn encode_record(index: u64, offset: u64, len: u64) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[..8].copy_from_slice(&offset.to_be_bytes());
    b[8..16].copy_from_slice(&len.to_be_bytes());
    let c = xxh3_64_with_seed(&b[..16], index.wrapping_add(1));
    b[16..].copy_from_slice(&c.to_be_bytes());
    b
}

/// Reads a zero record's bytes: its header must be whole and right; records are taken up
/// to the first one that is torn, fails its check, or names a range beyond the disk.
pub fn parse(b: &[u8]) -> Result<Parsed, FormatError> {
    if b.len() < HEADER_LEN {
        return Err(FormatError::Short);
    }
    if b[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    if b[12..16] != [0; 4] || xxh3_64_with_seed(&b[..24], 0) != be64(&b[24..32]) {
        return Err(FormatError::BadHeader);
    }
    let size = be64(&b[16..24]);
    let mut ranges = Vec::new();
    let mut at = HEADER_LEN;
    while let Some(r) = b.get(at..at + RECORD_LEN) {
        let index = ranges.len() as u64;
        let (offset, len) = (be64(&r[..8]), be64(&r[8..16]));
        let whole = xxh3_64_with_seed(&r[..16], index.wrapping_add(1)) == be64(&r[16..24]);
        if !whole || len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
            break;
        }
        ranges.push((offset, len));
        at += RECORD_LEN;
    }
    Ok(Parsed {
        size,
        ranges,
        valid_len: at,
    })
}

/// An open zero record, appended to.
pub struct ZeroLog {
    path: PathBuf,
    file: File,
    records: u64,
    len: u64,
}

fn err(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl ZeroLog {
    /// Creates an empty record for a disk of `size` bytes (durable, its name too).
    pub fn create(path: &Path, size: u64) -> io::Result<ZeroLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| err(path, e))?;
        file.write_all_at(&encode_header(size), 0)
            .and_then(|()| file.sync_all())
            .and_then(|()| crate::undo::log::sync_dir(path))
            .map_err(|e| err(path, e))?;
        Ok(ZeroLog {
            path: path.to_path_buf(),
            file,
            records: 0,
            len: HEADER_LEN as u64,
        })
    }

    /// Opens a record made for a disk of `size` bytes; returns it and its ranges. A torn tail
    /// is cut; a record of another size, version or format is refused.
    pub fn open(path: &Path, size: u64) -> io::Result<(ZeroLog, Vec<(u64, u64)>)> {
        let bad = |m: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("zero record {}: {m}", path.display()),
            )
        };
        let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
        let p = parse(&bytes).map_err(|e| bad(e.to_string()))?;
        if p.size != size {
            return Err(bad(format!(
                "made for a disk of {} bytes, the disk has {size}",
                p.size
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(path, e))?;
        if p.valid_len < bytes.len() {
            tracing::info!(file = %path.display(), bytes = bytes.len() - p.valid_len, "cut the zero record's torn tail");
            file.set_len(p.valid_len as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| err(path, e))?;
        }
        Ok((
            ZeroLog {
                path: path.to_path_buf(),
                file,
                records: p.ranges.len() as u64,
                len: p.valid_len as u64,
            },
            p.ranges,
        ))
    }

    /// Appends `[offset, offset + len)` and makes it durable.
    pub fn append(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let r = encode_record(self.records, offset, len);
        self.file
            .write_all_at(&r, self.len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| err(&self.path, e))?;
        self.records += 1;
        self.len += RECORD_LEN as u64;
        Ok(())
    }

    pub fn records(&self) -> u64 {
        self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sys.zero");
        let mut z = ZeroLog::create(&p, 1 << 30).unwrap();
        z.append(4096, 8192).unwrap();
        z.append(1 << 20, 1 << 20).unwrap();
        drop(z);
        // A torn third record.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&encode_record(2, 0, 4096)[..10]);
        std::fs::write(&p, &bytes).unwrap();
        let (mut z, ranges) = ZeroLog::open(&p, 1 << 30).unwrap();
        assert_eq!(ranges, vec![(4096, 8192), (1 << 20, 1 << 20)]);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            (HEADER_LEN + 2 * RECORD_LEN) as u64
        );
        z.append(0, 4096).unwrap();
        drop(z);
        let (_, ranges) = ZeroLog::open(&p, 1 << 30).unwrap();
        assert_eq!(ranges.len(), 3);
        // Another disk size, or not a zero record: refused, naming the file.
        let e = ZeroLog::open(&p, 1 << 20).err().unwrap().to_string();
        assert!(e.contains("sys.zero") && e.contains("bytes"), "{e}");
        std::fs::write(&p, b"VMRUNDO\0 and more bytes than a header needs").unwrap();
        let e = ZeroLog::open(&p, 1 << 30).err().unwrap().to_string();
        assert!(e.contains("bad magic"), "{e}");
    }

    #[test]
    fn records_out_of_place_or_beyond_the_disk_end_the_scan() {
        let mut b = encode_header(1 << 20).to_vec();
        b.extend(encode_record(0, 0, 4096));
        // Record 0's bytes again as record 1: its check was made for index 0.
        b.extend(encode_record(0, 8192, 4096));
        assert_eq!(parse(&b).unwrap().ranges, vec![(0, 4096)]);
        let mut b = encode_header(1 << 20).to_vec();
        b.extend(encode_record(0, 1 << 20, 4096));
        assert!(parse(&b).unwrap().ranges.is_empty());
        let mut v = encode_header(1).to_vec();
        v[11] = 2;
        assert_eq!(parse(&v), Err(FormatError::Version(2)));
        let mut h = encode_header(1).to_vec();
        h[20] ^= 1;
        assert_eq!(parse(&h), Err(FormatError::BadHeader));
        assert_eq!(parse(&h[..10]), Err(FormatError::Short));
    }

    /// The fuzz target's seeds (`fuzz/seeds/zero_log`), valid records: written with
    /// VMREPLICA_WRITE_FUZZ_SEEDS=DIR.
    #[test]
    fn fuzz_seeds_are_valid_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("three");
        let mut z = ZeroLog::create(&p, 1 << 30).unwrap();
        for (o, l) in [(0, 4096), (1 << 20, 65536), (8192, 4096)] {
            z.append(o, l).unwrap();
        }
        drop(z);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(dir.path().join("torn"), &full[..full.len() - 5]).unwrap();
        std::fs::write(dir.path().join("empty"), &full[..HEADER_LEN]).unwrap();
        let names = ["three", "torn", "empty"];
        for n in names {
            assert!(parse(&std::fs::read(dir.path().join(n)).unwrap()).is_ok());
        }
        if let Ok(out) = std::env::var("VMREPLICA_WRITE_FUZZ_SEEDS") {
            std::fs::create_dir_all(&out).unwrap();
            for n in names {
                std::fs::copy(dir.path().join(n), Path::new(&out).join(n)).unwrap();
            }
        }
    }
}
