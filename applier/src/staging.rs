//! Staging of one cycle: chunks are appended to a log file as they arrive (in wire format),
//! so a broken connection or a restart resumes without resending what was staged. Opening
//! the log scans it, keeps every intact frame and cuts a torn tail.
//!
//! A *direct* log (an initial copy, written straight into the replica images: there is no
//! earlier point to keep) holds only the chunks' headers, as an index of what the images
//! hold. Its entries are kept in memory until [`Staging::sync`], which callers run only
//! after fsyncing the images, so the log never lists data that is not durable.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmreplica_common::wire::{self, Chunk, ChunkId, Message, StagedChunk};

/// Reads the chunk frames at the start of a log file of `total` bytes, handing each with its
/// position to `keep` until a torn or foreign frame or one `keep` refuses; returns where the
/// intact prefix ends.
pub(crate) fn scan_log(
    file: &File,
    total: u64,
    mut keep: impl FnMut(&Chunk, u64) -> bool,
) -> io::Result<u64> {
    let mut r = io::BufReader::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let mut body = Vec::new();
    while pos + 4 <= total {
        let mut h = [0u8; 4];
        if r.read_exact(&mut h).is_err() {
            break;
        }
        let Ok(n) = wire::frame_len(h) else { break };
        if pos + 4 + u64::from(n) > total {
            break;
        }
        body.resize(n as usize, 0);
        if r.read_exact(&mut body).is_err() {
            break;
        }
        match wire::decode_body(&body) {
            Ok(Message::Chunk(c)) if keep(&c, pos) => {}
            _ => break,
        }
        pos += 4 + u64::from(n);
    }
    Ok(pos)
}

/// Writes the frame of chunk `c` at `pos` of a log file, its head and then its payload, so
/// the payload is not copied into a frame first; returns the frame's length. A crash between
/// the two writes leaves a torn frame, which [`scan_log`] cuts.
pub(crate) fn write_chunk_at(file: &File, pos: u64, c: &Chunk) -> io::Result<u64> {
    let head = wire::chunk_frame_head(c);
    file.write_all_at(&head, pos)?;
    file.write_all_at(&c.payload, pos + head.len() as u64)?;
    Ok((head.len() + c.payload.len()) as u64)
}

pub struct Staging {
    path: PathBuf,
    file: File,
    len: u64,
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
        let mut s = Staging {
            path: path.to_path_buf(),
            file,
            len: 0,
            index: BTreeMap::new(),
            synced: true,
            direct,
            deferred: Vec::new(),
        };
        let total = s.file.metadata()?.len();
        let pos = scan_log(&s.file, total, |c, pos| {
            let intact = c.cycle == cycle
                && if direct {
                    c.payload.is_empty()
                } else {
                    c.unpack().is_ok()
                };
            if intact {
                s.index.insert(c.id(), (pos, c.len, c.checksum));
            }
            intact
        })?;
        if pos != total {
            tracing::warn!(log = %path.display(), kept = pos, total, "cutting a torn tail off the staging log");
            s.file.set_len(pos).map_err(|e| io_ctx(path, e))?;
            s.file.sync_all().map_err(|e| io_ctx(path, e))?;
        }
        s.len = pos;
        Ok(s)
    }

    /// Appends a verified chunk (callers check it with [`Chunk::unpack`] first).
    pub fn append(&mut self, c: &Chunk) -> io::Result<()> {
        let n = write_chunk_at(&self.file, self.len, c).map_err(|e| io_ctx(&self.path, e))?;
        self.index.insert(c.id(), (self.len, c.len, c.checksum));
        self.len += n;
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
        let pos = self.len + self.deferred.len() as u64;
        wire::encode_chunk(&header, &mut self.deferred);
        self.index.insert(c.id(), (pos, c.len, c.checksum));
        self.synced = false;
    }

    /// Makes everything appended so far durable (direct mode: callers fsync the images
    /// first).
    pub fn sync(&mut self) -> io::Result<()> {
        if !self.deferred.is_empty() {
            self.file
                .write_all_at(&self.deferred, self.len)
                .map_err(|e| io_ctx(&self.path, e))?;
            self.len += self.deferred.len() as u64;
            self.deferred.clear();
        }
        if !self.synced {
            self.file.sync_data().map_err(|e| io_ctx(&self.path, e))?;
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
        self.len
    }

    pub fn digest(&self) -> u64 {
        wire::digest(self.index.iter().map(|(id, (_, _, sum))| (*id, *sum)))
    }

    /// Reads back every staged chunk, in (disk, offset) order.
    pub fn chunks(&self) -> impl Iterator<Item = io::Result<Chunk>> + '_ {
        self.index.values().map(move |(pos, _, _)| {
            let mut h = [0u8; 4];
            self.file.read_exact_at(&mut h, *pos)?;
            let n = wire::frame_len(h).map_err(io::Error::other)?;
            let mut body = vec![0u8; n as usize];
            self.file.read_exact_at(&mut body, pos + 4)?;
            match wire::decode_body(&body) {
                Ok(Message::Chunk(c)) => Ok(c),
                Ok(_) => Err(io::Error::other("staging log holds a non-chunk frame")),
                Err(e) => Err(io::Error::other(format!(
                    "staging log {}: {e}",
                    self.path.display()
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let back: Vec<Chunk> = s.chunks().map(|c| c.unwrap()).collect();
        assert_eq!(back[2].unpack().unwrap().unwrap(), vec![3u8; 4096]);
        // A log of another cycle keeps nothing.
        drop(s);
        let s = Staging::open(&p, 6, false).unwrap();
        assert_eq!(s.count(), 0);
    }
}
