//! Staging of one cycle: chunks are appended to a log file as they arrive (in wire format),
//! so a broken connection or a restart resumes without resending what was staged. Opening
//! the log scans it, keeps every intact frame and cuts a torn tail.
//!
//! A *direct* log (an initial copy, written straight into the replica images: there is no
//! earlier point to keep) holds only the chunks' headers, as an index of what the images
//! hold. Its entries are kept in memory until [`Staging::sync`], which callers run only
//! after fsyncing the images, so the log never lists data that is not durable.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use vmreplica_common::wire::{self, Chunk, ChunkId, StagedChunk};

use crate::logfile::{scan_log, LogReader, LogWriter};

pub struct Staging {
    path: PathBuf,
    log: LogWriter,
    /// Where each chunk's frame is in the log, its length and checksum. A chunk staged again
    /// under the same id replaces the earlier one.
    index: BTreeMap<ChunkId, (u64, u32, u64)>,
    synced: bool,
    direct: bool,
    /// Direct mode: header frames not yet in the file.
    deferred: Vec<u8>,
}

fn io_ctx(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("staging log {}: {e}", path.display()))
}

impl Staging {
    /// Opens or creates the log at `path`, keeping the intact chunks of `cycle` (headers only
    /// if `direct`).
    pub fn open(path: &Path, cycle: u64, direct: bool) -> io::Result<Staging> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_ctx(path, e))?;
        let mut index = BTreeMap::new();
        let total = file.metadata()?.len();
        let pos = scan_log(&file, path, total, |c, pos| {
            let intact = c.cycle == cycle
                && if direct {
                    c.payload.is_empty()
                } else {
                    c.unpack().is_ok()
                };
            if intact {
                index.insert(c.id(), (pos, c.len, c.checksum));
            }
            intact
        })?;
        if pos != total {
            tracing::warn!(log = %path.display(), kept = pos, total, "cutting a torn tail off the staging log");
            file.set_len(pos).map_err(|e| io_ctx(path, e))?;
            file.sync_all().map_err(|e| io_ctx(path, e))?;
        }
        Ok(Staging {
            path: path.to_path_buf(),
            log: LogWriter::open(file, path, pos).map_err(|e| io_ctx(path, e))?,
            index,
            synced: true,
            direct,
            deferred: Vec::new(),
        })
    }

    /// Appends a verified chunk (callers check it with [`Chunk::unpack`] first).
    pub fn append(&mut self, c: &Chunk) -> io::Result<()> {
        let pos = self.log.len();
        self.log
            .append_chunk(c)
            .map_err(|e| io_ctx(&self.path, e))?;
        self.index.insert(c.id(), (pos, c.len, c.checksum));
        self.synced = false;
        Ok(())
    }

    /// Direct mode: records that the image now holds chunk `c` (written, not yet fsynced).
    pub fn append_header(&mut self, c: &Chunk) {
        debug_assert!(self.direct);
        let header = Chunk {
            cycle: c.cycle,
            disk: c.disk,
            offset: c.offset,
            len: c.len,
            encoding: c.encoding,
            checksum: c.checksum,
            payload: Vec::new(),
        };
        let pos = self.log.len() + self.deferred.len() as u64;
        wire::encode_chunk(&header, &mut self.deferred);
        self.index.insert(c.id(), (pos, c.len, c.checksum));
        self.synced = false;
    }

    /// Makes everything appended so far durable (direct mode: callers fsync the images
    /// first).
    pub fn sync(&mut self) -> io::Result<()> {
        if !self.deferred.is_empty() {
            self.log
                .append(&[&self.deferred])
                .map_err(|e| io_ctx(&self.path, e))?;
            self.deferred.clear();
        }
        if !self.synced {
            self.log.sync().map_err(|e| io_ctx(&self.path, e))?;
            self.synced = true;
        }
        Ok(())
    }

    pub fn entries(&self) -> Vec<StagedChunk> {
        self.index
            .iter()
            .map(|(id, (_, len, checksum))| StagedChunk {
                id: *id,
                len: *len,
                checksum: *checksum,
            })
            .collect()
    }

    /// (disk, offset, length) of every staged chunk, in (disk, offset) order, without reading
    /// the log.
    pub fn ranges(&self) -> impl Iterator<Item = (u16, u64, u32)> + '_ {
        self.index
            .iter()
            .map(|(id, (_, len, _))| (id.disk, id.offset, *len))
    }

    pub fn count(&self) -> u64 {
        self.index.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.log.len()
    }

    pub fn digest(&self) -> u64 {
        wire::digest(self.index.iter().map(|(id, (_, _, sum))| (*id, *sum)))
    }

    /// Reads back every staged chunk, in the order they were staged (one pass through the
    /// log, with large direct reads; a chunk staged again is read where it was staged last).
    /// Callers [`Staging::sync`] first. All chunks of a cycle hold the same point in time,
    /// so the order they are applied in does not change the result.
    pub fn chunks(&self) -> io::Result<impl Iterator<Item = io::Result<Chunk>> + '_> {
        let mut positions: Vec<u64> = self.index.values().map(|(pos, _, _)| *pos).collect();
        positions.sort_unstable();
        let mut r = LogReader::new(self.log.file(), &self.path, self.log.len())
            .map_err(|e| io_ctx(&self.path, e))?;
        Ok(positions.into_iter().map(move |pos| {
            r.frame_at(pos).map(|(c, _)| c).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("staging log {} at {pos}: {e}", self.path.display()),
                )
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn resumes_with_intact_chunks_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chunks.log");
        let mut s = Staging::open(&p, 5, false).unwrap();
        for i in 0..3u64 {
            s.append(&Chunk::pack(5, 0, i * 4096, &[i as u8 + 1; 4096], true))
                .unwrap();
        }
        s.sync().unwrap();
        let digest = s.digest();
        let full = s.bytes();
        drop(s);
        // A torn append: half a frame at the end.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0, 0, 1, 0, 5, 9, 9], full).unwrap();
        let s = Staging::open(&p, 5, false).unwrap();
        assert_eq!(s.count(), 3);
        assert_eq!(s.bytes(), full);
        assert_eq!(s.digest(), digest);
        let back: Vec<Chunk> = s.chunks().unwrap().map(|c| c.unwrap()).collect();
        assert_eq!(back[2].unpack().unwrap().unwrap(), vec![3u8; 4096]);
        // A log of another cycle keeps nothing.
        drop(s);
        let s = Staging::open(&p, 6, false).unwrap();
        assert_eq!(s.count(), 0);
    }
}
