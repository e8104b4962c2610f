//! Append-only log files of wire frames (the staging log and the undo journal), written and
//! read back with direct I/O where the filesystem allows it.
//!
//! A cycle's chunks are written to its staging log once and read back once, by the apply;
//! through the page cache each 4 KiB would also cost a freshly allocated page. The writer
//! therefore gathers appended frames in an aligned buffer and writes whole aligned blocks
//! with `O_DIRECT`; [`LogWriter::flush`] writes the partial last block too, zero-padded, and
//! trims the file back to the log's length, so the file always ends at its last frame (a scan
//! after a crash finds the same frames as with buffered writes). The block holding the end of
//! the log is kept in memory and rewritten with the frames that follow it: its flushed prefix
//! is rewritten byte for byte, so a torn rewrite cannot damage a flushed frame.
//!
//! A failed write (a full disk) leaves the log's end unknown (a frame may be half in the
//! file), so the writer refuses everything after it: callers reopen the log, whose scan keeps
//! what reached the file. (Writing full blocks on a thread of their own, so that appends made
//! under a VM's lock never wait for the disk, measured no faster on a 1 GiB cycle.)
//!
//! Where direct I/O is refused (tmpfs, some FUSE filesystems) frames are written as they are
//! appended, through the page cache.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmreplica_common::direct::{self, ALIGN};
use vmreplica_common::wire::{self, Chunk, Message};

/// Reads the chunk frames at the start of the log file `file` (at `path`) of `total` bytes,
/// handing each with its position to `keep` until a torn or foreign frame or one `keep`
/// refuses; returns where the intact prefix ends.
pub(crate) fn scan_log(
    file: &File,
    path: &Path,
    total: u64,
    mut keep: impl FnMut(&Chunk, u64) -> bool,
) -> io::Result<u64> {
    let mut r = LogReader::new(file, path, total)?;
    let mut pos = 0u64;
    while let Ok((c, n)) = r.frame_at(pos) {
        if !keep(&c, pos) {
            break;
        }
        pos += n;
    }
    Ok(pos)
}

/// Bytes gathered before a direct write: large writes keep the disk streaming.
const BLOCK: usize = 4 << 20;

pub(crate) struct LogWriter {
    file: File,
    direct: Option<File>,
    /// Direct mode: the log's bytes from `base` on, from `buf[at]`.
    buf: Vec<u8>,
    at: usize,
    /// Aligned file offset of `buf[at]`.
    base: u64,
    /// Bytes of the log held in `buf`, and how many of them are in the file already.
    fill: usize,
    flushed: usize,
    /// A write failed: the log's end is unknown, so the writer refuses everything after
    /// (callers reopen the log, whose scan finds what reached the file).
    failed: Option<(io::ErrorKind, String)>,
}

fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

impl LogWriter {
    /// A writer appending at `len` (the end of the log's intact frames) of `file`, which is
    /// open read-write at `path`.
    pub fn open(file: File, path: &Path, len: u64) -> io::Result<LogWriter> {
        let direct = direct::open(path, true)?;
        let mut w = LogWriter {
            file,
            direct,
            buf: Vec::new(),
            at: 0,
            base: len,
            fill: 0,
            flushed: 0,
            failed: None,
        };
        if w.direct.is_some() {
            w.at = direct::aligned(&mut w.buf, BLOCK + ALIGN);
            w.base = len - len % ALIGN as u64;
            w.fill = (len - w.base) as usize;
            w.flushed = w.fill;
            let (at, fill) = (w.at, w.fill);
            w.file.read_exact_at(&mut w.buf[at..at + fill], w.base)?;
        }
        Ok(w)
    }

    /// The log's length: everything appended so far.
    pub fn len(&self) -> u64 {
        self.base + self.fill as u64
    }

    /// Appends the frame of chunk `c` (its head, then its payload: the payload is not copied
    /// into a frame first); returns the frame's length. Until [`LogWriter::flush`], the end of
    /// the log may be in memory only.
    pub fn append_chunk(&mut self, c: &Chunk) -> io::Result<u64> {
        let head = wire::chunk_frame_head(c);
        self.append(&[&head, &c.payload])
    }

    /// Appends `parts` as one piece of the log; returns its length. After an error the writer
    /// is unusable (see `failed`).
    pub fn append(&mut self, parts: &[&[u8]]) -> io::Result<u64> {
        self.check()?;
        for p in parts {
            let r = self.put(p);
            self.poison_on(r)?;
        }
        Ok(parts.iter().map(|p| p.len() as u64).sum())
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(io::Error::new(
                *kind,
                format!("an earlier write failed: {msg}"),
            )),
            None => Ok(()),
        }
    }

    fn poison_on<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.failed = Some((e.kind(), e.to_string()));
        }
        r
    }

    fn put(&mut self, mut p: &[u8]) -> io::Result<()> {
        while !p.is_empty() {
            if self.direct.is_none() {
                self.file.write_all_at(p, self.base)?;
                self.base += p.len() as u64;
                return Ok(());
            }
            let n = p.len().min(BLOCK - self.fill);
            let dst = self.at + self.fill;
            self.buf[dst..dst + n].copy_from_slice(&p[..n]);
            self.fill += n;
            p = &p[n..];
            if self.fill == BLOCK {
                self.write_full()?;
            }
        }
        Ok(())
    }

    /// Writes the full buffer direct and continues with an empty one.
    fn write_full(&mut self) -> io::Result<()> {
        if self.write_buf(BLOCK)? {
            self.base += BLOCK as u64;
            self.fill = 0;
            self.flushed = 0;
        }
        Ok(())
    }

    /// Writes the first `n` (aligned) bytes of the buffer direct at `base`; true if they went
    /// direct. If the filesystem refuses, what the buffer holds is written through the page
    /// cache instead, and so is the rest of the log (false).
    fn write_buf(&mut self, n: usize) -> io::Result<bool> {
        let f = self.direct.as_ref().expect("direct mode");
        match f.write_all_at(&self.buf[self.at..self.at + n], self.base) {
            Err(e) if direct::is_refusal(&e) => {
                tracing::debug!("direct writes refused ({e}); log written buffered");
                self.direct = None;
                let data = &self.buf[self.at..self.at + self.fill];
                self.file.write_all_at(data, self.base)?;
                self.base += self.fill as u64;
                self.fill = 0;
                self.flushed = 0;
                Ok(false)
            }
            r => r.map(|()| true),
        }
    }

    /// Writes everything appended so far to the file (not yet durable: see
    /// [`LogWriter::sync`]).
    pub fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        let r = self.flush_inner();
        self.poison_on(r)
    }

    fn flush_inner(&mut self) -> io::Result<()> {
        if self.direct.is_none() || self.fill == self.flushed {
            return Ok(());
        }
        let n = round_up(self.fill);
        let tail = self.at + self.fill;
        self.buf[tail..self.at + n].fill(0);
        if self.write_buf(n)? {
            self.flushed = self.fill;
        }
        // The padding is not part of the log: the file ends where the log does.
        self.file.set_len(self.len())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        let r = self.file.sync_data();
        self.poison_on(r)
    }

    /// The file, for reading frames back (after a [`LogWriter::flush`]).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for LogWriter {
    /// What was appended reaches the file (not durably), as unbuffered appends would have.
    fn drop(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.flush() {
                tracing::warn!("log file: the last appends were not written: {e}");
            }
        }
    }
}

/// Reads frames of a log file at increasing positions through one aligned buffer, with
/// direct reads where the filesystem allows them (one large read brings many frames).
pub(crate) struct LogReader<'a> {
    file: &'a File,
    direct: Option<File>,
    buf: Vec<u8>,
    at: usize,
    /// File range held in `buf[at..]`.
    start: u64,
    end: u64,
    /// The log's length.
    len: u64,
}

impl<'a> LogReader<'a> {
    pub fn new(file: &'a File, path: &Path, len: u64) -> io::Result<LogReader<'a>> {
        Ok(LogReader {
            file,
            direct: direct::open(path, false)?,
            buf: Vec::new(),
            at: 0,
            start: 0,
            end: 0,
            len,
        })
    }

    /// The `n` bytes of the log at `pos`.
    fn bytes(&mut self, pos: u64, n: usize) -> io::Result<&[u8]> {
        let want_end = pos + n as u64;
        if want_end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("log ends at {}, frame needs {want_end}", self.len),
            ));
        }
        if pos < self.start || want_end > self.end {
            self.fill(pos, n)?;
        }
        let i = self.at + (pos - self.start) as usize;
        Ok(&self.buf[i..i + n])
    }

    /// Reads at least `[pos, pos + n)` into the buffer, and as much after it as a block holds.
    fn fill(&mut self, pos: u64, n: usize) -> io::Result<()> {
        let start = pos - pos % ALIGN as u64;
        let span = round_up((pos - start) as usize + n).max(BLOCK);
        let span = span.min(round_up((self.len - start) as usize));
        self.at = direct::aligned(&mut self.buf, span);
        let dst = &mut self.buf[self.at..self.at + span];
        let direct = match &self.direct {
            Some(f) => match read_to_end_direct(f, dst, start) {
                Err(e) if direct::is_refusal(&e) => {
                    tracing::debug!("direct reads refused ({e}); log read buffered");
                    self.direct = None;
                    None
                }
                r => Some(r?),
            },
            None => None,
        };
        let got = match direct {
            Some(got) => got,
            None => {
                let want = ((self.len - start) as usize).min(span);
                self.file.read_exact_at(&mut dst[..want], start)?;
                want
            }
        };
        self.start = start;
        self.end = start + got as u64;
        if self.end < pos + n as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("log file ends at {} before {}", self.end, pos + n as u64),
            ));
        }
        Ok(())
    }

    /// The chunk whose frame starts at `pos`, and the frame's length.
    pub fn frame_at(&mut self, pos: u64) -> io::Result<(Chunk, u64)> {
        let h = self.bytes(pos, 4)?;
        let n = wire::frame_len([h[0], h[1], h[2], h[3]]).map_err(io::Error::other)?;
        let body = self.bytes(pos + 4, n as usize)?;
        match wire::decode_body(body) {
            Ok(Message::Chunk(c)) => Ok((c, 4 + u64::from(n))),
            Ok(_) => Err(io::Error::other("a non-chunk frame")),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }
}

/// Fills `dst` from `offset` with direct reads until it is full or the file ends; returns the
/// bytes read. (A direct read comes back short only at the end of the file.)
fn read_to_end_direct(f: &File, dst: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < dst.len() {
        let n = match f.read_at(&mut dst[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        got += n;
        if !got.is_multiple_of(ALIGN) {
            break;
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn rw(p: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap()
    }

    fn frames(n: usize) -> Vec<Chunk> {
        (0..n)
            .map(|i| {
                let data: Vec<u8> = (0..(i % 7 + 1) * 37_000)
                    .map(|j| (j * i % 253) as u8)
                    .collect();
                Chunk::pack(9, 0, (i as u64) << 20, &data, i % 2 == 0)
            })
            .collect()
    }

    /// On /var/tmp (a disk filesystem: direct I/O) and on the tmpfs-or-not /tmp alike, the
    /// log is the frames back to back, whatever was flushed when, and it reads back whole.
    #[test]
    fn appended_frames_read_back_and_the_file_ends_at_the_log() {
        for root in ["/var/tmp", "/tmp"] {
            let dir = tempfile::tempdir_in(root).unwrap();
            let p = dir.path().join("log");
            let chunks = frames(300);
            let mut expect = Vec::new();
            let mut w = LogWriter::open(rw(&p), &p, 0).unwrap();
            let mut positions = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                positions.push(w.len());
                wire::encode_chunk(c, &mut expect);
                w.append_chunk(c).unwrap();
                if i % 37 == 0 {
                    w.flush().unwrap();
                    assert_eq!(std::fs::metadata(&p).unwrap().len(), w.len());
                }
                if i == 150 {
                    // Reopened mid-log (as after a restart): appends continue at the end.
                    w.sync().unwrap();
                    let len = w.len();
                    drop(w);
                    w = LogWriter::open(rw(&p), &p, len).unwrap();
                }
            }
            w.sync().unwrap();
            assert_eq!(w.len(), expect.len() as u64);
            assert_eq!(std::fs::read(&p).unwrap(), expect, "{root}");
            let mut r = LogReader::new(w.file(), &p, w.len()).unwrap();
            for (pos, c) in positions.iter().zip(&chunks) {
                assert_eq!(&r.frame_at(*pos).unwrap().0, c);
            }
            // Backwards too (a refill behind the window), and past the end is an error.
            assert_eq!(&r.frame_at(positions[3]).unwrap().0, &chunks[3]);
            assert!(r.frame_at(w.len()).is_err());
        }
    }

    /// A crash (the writer vanishes without flushing) keeps every frame flushed before it and
    /// whole blocks written since: a scan finds an intact prefix of the frames.
    #[test]
    fn a_crash_keeps_an_intact_prefix_of_the_frames() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("log");
        let chunks = frames(200);
        let mut w = LogWriter::open(rw(&p), &p, 0).unwrap();
        for c in &chunks[..50] {
            w.append_chunk(c).unwrap();
        }
        w.sync().unwrap();
        for c in &chunks[50..] {
            w.append_chunk(c).unwrap();
        }
        std::mem::forget(w);
        let f = rw(&p);
        let mut found = Vec::new();
        let total = f.metadata().unwrap().len();
        scan_log(&f, &p, total, |c, _| {
            found.push(c.clone());
            true
        })
        .unwrap();
        assert!(found.len() >= 50 && found.len() < 200, "{}", found.len());
        assert_eq!(found, chunks[..found.len()]);
    }

    /// A write that fails (here: /dev/full, as a full disk) leaves the writer refusing every
    /// later append and flush with the same kind of error, never a log with a hole in it.
    #[test]
    fn after_a_failed_write_the_writer_refuses_everything() {
        let p = Path::new("/dev/full");
        let mut w = LogWriter::open(rw(p), p, 0).unwrap();
        let big = vec![7u8; BLOCK + 100];
        let e = w.append(&[&big]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        let e = w.append(&[b"more"]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        assert!(e.to_string().contains("earlier write failed"), "{e}");
        assert_eq!(w.flush().unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert!(w.sync().is_err());
    }
}
