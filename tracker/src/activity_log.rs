//! The activity log: the set of disk extents that may hold writes whose dirty bits are not yet
//! durable in the bitmap (DRBD's activity log, in spirit).
//!
//! Before the first write into an extent that is not in the log, the extent is added and the
//! log is made durable (one small write and fdatasync); later writes to a *hot* extent cost
//! nothing but an atomic bit set in the mapped bitmap. When the log is full, the bitmap is
//! flushed and the log emptied. After a crash, every block of every logged extent is marked
//! dirty, so no acknowledged write is ever forgotten.
//!
//! Every copy also records the checksums of the bitmap's two data slots as of its last
//! checkpoint (see [`crate::bitmap::Bitmap::checksum`]; in the active slot, the words of the
//! logged extents are left out, since they may change before the next checkpoint). On a
//! start, the slots the state uses must read back matching them: a bitmap body zeroed or
//! damaged behind the tracker's back is found, and the disk marked for a resync, instead of
//! silently forgetting its changes.
//!
//! File layout: two copies of `COPY_LEN` bytes, written alternately; each holds a sequence
//! number, a count, the two slot checksums, the extent numbers and a CRC. Recovery takes the
//! valid copy with the highest sequence number. Copies of version 1 (`VMRAL001`, without the
//! checksum) are still read: their bitmap is taken as it is, once.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Extents are 4 MiB of disk.
pub const EXTENT_SHIFT: u32 = 22;
/// Most extents the log can hold (the default capacity); a copy must fit in `COPY_LEN`.
pub const CAPACITY: usize = 1000;
const MAGIC: &[u8; 8] = b"VMRAL002";
const MAGIC_V1: &[u8; 8] = b"VMRAL001";
const COPY_LEN: u64 = 8192;
const HEADER: usize = 40;
const HEADER_V1: usize = 24;

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
    sums: [u64; 2],
}

/// What was found on disk when the log was opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovered {
    /// The log did not exist.
    New,
    /// The extents recorded in the newest valid copy, and the slot checksums it recorded
    /// (`None` in a version 1 copy).
    Extents(Vec<u64>, Option<[u64; 2]>),
    /// No copy is valid: the log cannot tell which extents were active.
    Unreadable,
}

/// One valid copy of the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Copy {
    pub seq: u64,
    pub extents: Vec<u64>,
    pub sums: Option<[u64; 2]>,
}

/// One copy of the log: `extents` (at most [`CAPACITY`]) and the slot checksums `sums` under
/// sequence number `seq`.
pub fn encode(seq: u64, extents: &[u64], sums: [u64; 2]) -> Vec<u8> {
    let mut b = vec![0u8; COPY_LEN as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    b[20..28].copy_from_slice(&sums[0].to_le_bytes());
    b[28..36].copy_from_slice(&sums[1].to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        b[HEADER + i * 8..HEADER + i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    let end = HEADER + extents.len() * 8;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..36]);
    h.update(&b[HEADER..end]);
    b[36..40].copy_from_slice(&h.finalize().to_le_bytes());
    b
}

/// Reads one copy (this version's or version 1), or `None` if it is damaged (bad magic,
/// count above [`CAPACITY`], checksum mismatch) or too short.
pub fn decode(b: &[u8]) -> Option<Copy> {
    let magic = b.get(..8)?;
    let le64 =
        |i: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
    let (header, summed, crc_at, sums) = if magic == MAGIC {
        (HEADER, 36, 36, Some([le64(20)?, le64(28)?]))
    } else if magic == MAGIC_V1 {
        (HEADER_V1, 20, 20, None)
    } else {
        return None;
    };
    let seq = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    let n = u32::from_le_bytes(b.get(16..20)?.try_into().ok()?) as usize;
    if n > CAPACITY {
        return None;
    }
    let end = header + n * 8;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..summed]);
    h.update(b.get(header..end)?);
    if h.finalize() != u32::from_le_bytes(b.get(crc_at..crc_at + 4)?.try_into().ok()?) {
        return None;
    }
    let extents = b[header..end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Some(Copy { seq, extents, sums })
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
            sums: [0; 2],
        };
        if !existed {
            log.file.set_len(2 * COPY_LEN).map_err(io_err)?;
            log.write()?;
            // The new name must survive a power cut too.
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
            }
            return Ok((log, Recovered::New));
        }
        let mut best: Option<Copy> = None;
        for copy in 0..2 {
            let mut b = vec![0u8; COPY_LEN as usize];
            if log.file.read_exact_at(&mut b, copy * COPY_LEN).is_err() {
                continue;
            }
            if let Some(c) = decode(&b) {
                if best.as_ref().is_none_or(|b| c.seq > b.seq) {
                    best = Some(c);
                }
            }
        }
        match best {
            Some(c) => {
                log.seq = c.seq;
                Ok((log, Recovered::Extents(c.extents, c.sums)))
            }
            None => Ok((log, Recovered::Unreadable)),
        }
    }

    pub fn extents(&self) -> &[u64] {
        &self.extents
    }

    /// The slot checksums of the last record.
    pub fn sums(&self) -> [u64; 2] {
        self.sums
    }

    /// Replaces the logged set and the slot checksums and makes them durable. On failure the
    /// log in memory is unchanged.
    pub fn set(&mut self, extents: Vec<u64>, sums: [u64; 2]) -> Result<(), ActivityLogError> {
        assert!(extents.len() <= CAPACITY);
        let old = (
            std::mem::replace(&mut self.extents, extents),
            std::mem::replace(&mut self.sums, sums),
        );
        let r = self.write();
        if r.is_err() {
            (self.extents, self.sums) = old;
        }
        r
    }

    fn write(&mut self) -> Result<(), ActivityLogError> {
        self.seq += 1;
        let buf = encode(self.seq, &self.extents, self.sums);
        let at = (self.seq % 2) * COPY_LEN;
        crate::crashpoint::fail_point("activity-log")
            .and_then(|_| self.file.write_all_at(&buf, at))
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
        log.set(vec![1, 2], [7, 0]).unwrap();
        log.set(vec![1, 2, 3], [8, 1]).unwrap();
        drop(log);
        let (mut log, rec) = ActivityLog::open(&p).unwrap();
        assert_eq!(rec, Recovered::Extents(vec![1, 2, 3], Some([8, 1])));
        log.set(vec![9], [9, 9]).unwrap();
        drop(log);
        // Tear the newest copy: recovery falls back to the older one (a superset is fine).
        let (log, _) = ActivityLog::open(&p).unwrap();
        let newest = (log.seq % 2) * COPY_LEN;
        drop(log);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 16], newest + 8).unwrap();
        let (_, rec) = ActivityLog::open(&p).unwrap();
        assert_eq!(rec, Recovered::Extents(vec![1, 2, 3], Some([8, 1])));
        // Both torn: unreadable, never "empty".
        f.write_all_at(&[0xff; 16], (COPY_LEN - newest) + 8)
            .unwrap();
        let (_, rec) = ActivityLog::open(&p).unwrap();
        assert_eq!(rec, Recovered::Unreadable);
    }

    #[test]
    fn version_1_copies_are_read_without_a_checksum() {
        // A version 1 copy as the previous release wrote it.
        let mut b = vec![0u8; COPY_LEN as usize];
        b[..8].copy_from_slice(MAGIC_V1);
        b[8..16].copy_from_slice(&5u64.to_le_bytes());
        b[16..20].copy_from_slice(&2u32.to_le_bytes());
        b[24..32].copy_from_slice(&3u64.to_le_bytes());
        b[32..40].copy_from_slice(&4u64.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..20]);
        h.update(&b[24..40]);
        b[20..24].copy_from_slice(&h.finalize().to_le_bytes());
        assert_eq!(
            decode(&b),
            Some(Copy {
                seq: 5,
                extents: vec![3, 4],
                sums: None
            })
        );
        b[33] ^= 1;
        assert_eq!(decode(&b), None);
        let c = encode(6, &[1], [0xabcd, 2]);
        assert_eq!(decode(&c).unwrap().sums, Some([0xabcd, 2]));
        assert_eq!(decode(&c[..20]), None);
    }
}
