//! The activity log: the set of disk extents that may hold writes whose dirty bits are not yet
//! durable in the bitmap (DRBD's activity log, in spirit).
//!
//! Before the first write into an extent that is not in the log, the extent is added and the
//! log is made durable (one small write and fdatasync); later writes to a *hot* extent cost
//! nothing but an atomic bit set in the mapped bitmap. When the log is full, the bitmap is
//! flushed and the log emptied. After a crash, every block of every logged extent is marked
//! dirty, so no acknowledged write is ever forgotten.
//!
//! File layout: two copies of `COPY_LEN` bytes, written alternately; each holds a sequence
//! number, a count, the extent numbers and a CRC. Recovery takes the valid copy with the
//! highest sequence number.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Extents are 4 MiB of disk.
pub const EXTENT_SHIFT: u32 = 22;
/// Most extents the log can hold (the default capacity); a copy must fit in `COPY_LEN`.
pub const CAPACITY: usize = 1000;
const MAGIC: &[u8; 8] = b"VMRAL001";
const COPY_LEN: u64 = 8192;
const HEADER: usize = 24;

#[derive(Debug, Error)]
pub enum ActivityLogError {
    #[error("activity log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct ActivityLog {
    path: PathBuf,
    file: File,
    seq: u64,
    extents: Vec<u64>,
}

/// What was found on disk when the log was opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovered {
    /// The log did not exist.
    New,
    /// The extents recorded in the newest valid copy.
    Extents(Vec<u64>),
    /// No copy is valid: the log cannot tell which extents were active.
    Unreadable,
}

/// One copy of the log: `extents` (at most [`CAPACITY`]) under sequence number `seq`.
pub fn encode(seq: u64, extents: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; COPY_LEN as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        b[HEADER + i * 8..HEADER + i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    let end = HEADER + extents.len() * 8;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..20]);
    h.update(&b[HEADER..end]);
    b[20..24].copy_from_slice(&h.finalize().to_le_bytes());
    b
}

/// Reads one copy: its sequence number and extents, or `None` if it is damaged (bad magic,
/// count above [`CAPACITY`], checksum mismatch) or too short.
pub fn decode(b: &[u8]) -> Option<(u64, Vec<u64>)> {
    if b.len() < HEADER || &b[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > CAPACITY {
        return None;
    }
    let end = HEADER + n * 8;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..20]);
    h.update(b.get(HEADER..end)?);
    if h.finalize() != u32::from_le_bytes(b[20..24].try_into().ok()?) {
        return None;
    }
    let extents = b[HEADER..end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Some((seq, extents))
}

impl ActivityLog {
    pub fn open(path: &Path) -> Result<(ActivityLog, Recovered), ActivityLogError> {
        let io_err = |source| ActivityLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let mut log = ActivityLog {
            path: path.to_path_buf(),
            file,
            seq: 0,
            extents: Vec::new(),
        };
        if !existed {
            log.file.set_len(2 * COPY_LEN).map_err(io_err)?;
            log.write()?;
            return Ok((log, Recovered::New));
        }
        let mut best: Option<(u64, Vec<u64>)> = None;
        for copy in 0..2 {
            let mut b = vec![0u8; COPY_LEN as usize];
            if log.file.read_exact_at(&mut b, copy * COPY_LEN).is_err() {
                continue;
            }
            if let Some((seq, ext)) = decode(&b) {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, ext));
                }
            }
        }
        match best {
            Some((seq, ext)) => {
                log.seq = seq;
                Ok((log, Recovered::Extents(ext)))
            }
            None => Ok((log, Recovered::Unreadable)),
        }
    }

    pub fn extents(&self) -> &[u64] {
        &self.extents
    }

    /// Replaces the logged set and makes it durable.
    pub fn set(&mut self, extents: Vec<u64>) -> Result<(), ActivityLogError> {
        assert!(extents.len() <= CAPACITY);
        self.extents = extents;
        self.write()
    }

    fn write(&mut self) -> Result<(), ActivityLogError> {
        self.seq += 1;
        let buf = encode(self.seq, &self.extents);
        let at = (self.seq % 2) * COPY_LEN;
        self.file
            .write_all_at(&buf, at)
            .and_then(|_| self.file.sync_data())
            .map_err(|source| ActivityLogError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_newest_valid_copy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.al");
        let (mut log, rec) = ActivityLog::open(&p).unwrap();
        assert_eq!(rec, Recovered::New);
        log.set(vec![1, 2]).unwrap();
        log.set(vec![1, 2, 3]).unwrap();
        drop(log);
        let (mut log, rec) = ActivityLog::open(&p).unwrap();
        assert_eq!(rec, Recovered::Extents(vec![1, 2, 3]));
        log.set(vec![9]).unwrap();
        drop(log);
        // Tear the newest copy: recovery falls back to the older one (a superset is fine).
        let (log, _) = ActivityLog::open(&p).unwrap();
        let newest = (log.seq % 2) * COPY_LEN;
        drop(log);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 16], newest + 8).unwrap();
        let (_, rec) = ActivityLog::open(&p).unwrap();
        assert_eq!(rec, Recovered::Extents(vec![1, 2, 3]));
        // Both torn: unreadable, never "empty".
        f.write_all_at(&[0xff; 16], (COPY_LEN - newest) + 8)
            .unwrap();
        let (_, rec) = ActivityLog::open(&p).unwrap();
        assert_eq!(rec, Recovered::Unreadable);
    }
}
