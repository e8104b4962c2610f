//! Undo logs: the contents a cycle overwrote, so older recovery points can be rebuilt from the
//! replica (which always holds the newest point).
//!
//! An undo log is a file of wire frames: one [`Chunk`] per overwritten range (zero runs as
//! markers, the rest lz4), then a [`Message::Manifest`] trailer with their count and digest.
//! It is written to a temporary name, fsynced and renamed, so it is either complete or absent.
//!
//! The undo log of a received cycle is built as a [`Journal`] while the cycle arrives (the
//! images do not change before its apply, so their contents are the old ones), and finished
//! into that form when the cycle commits.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use vmreplica_common::wire::{self, Chunk, ChunkId, Message};

use crate::logfile::{scan_log, LogWriter};

/// Writes an undo log of `entries` atomically at `path`, one entry at a time (a cycle's
/// undo log is never held in memory whole).
pub fn write(
    path: &Path,
    cycle: u64,
    entries: impl IntoIterator<Item = io::Result<Chunk>>,
) -> io::Result<u64> {
    let tmp = path.with_extension("undo.tmp");
    let written = write_tmp(&tmp, cycle, entries);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let bytes = written?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(bytes)
}

/// The body of [`write`]: the log at `tmp`, fsynced; its size.
fn write_tmp(
    tmp: &Path,
    cycle: u64,
    entries: impl IntoIterator<Item = io::Result<Chunk>>,
) -> io::Result<u64> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
    let mut buf = Vec::new();
    let (mut count, mut digest) = (0u64, 0u64);
    for e in entries {
        let e = e?;
        buf.clear();
        wire::encode_chunk(&e, &mut buf);
        w.write_all(&buf)?;
        count += 1;
        digest = digest.wrapping_add(wire::digest([(e.id(), e.checksum)]));
    }
    buf.clear();
    wire::encode(
        &Message::Manifest {
            cycle,
            chunks: count,
            digest,
        },
        &mut buf,
    );
    w.write_all(&buf)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    f.metadata().map(|m| m.len())
}

/// The entries of an undo log, read one at a time, each checked against its checksum; the
/// trailer is checked when it is reached, so only a log read to its end is known complete.
/// Memory stays at one entry whatever the log's size.
pub struct Entries {
    path: PathBuf,
    r: BufReader<File>,
    count: u64,
    digest: u64,
    done: bool,
}

impl Entries {
    pub fn open(path: &Path) -> io::Result<Entries> {
        Ok(Entries {
            path: path.to_path_buf(),
            r: BufReader::with_capacity(1 << 20, File::open(path)?),
            count: 0,
            digest: 0,
            done: false,
        })
    }

    fn bad(&self, why: impl std::fmt::Display) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("undo log {}: {why}", self.path.display()),
        )
    }

    fn next_entry(&mut self) -> io::Result<Option<(Chunk, Option<Vec<u8>>)>> {
        let mut h = [0u8; 4];
        self.r
            .read_exact(&mut h)
            .map_err(|_| self.bad("no trailer (incomplete)"))?;
        let n = wire::frame_len(h).map_err(|e| self.bad(e))?;
        let mut body = vec![0u8; n as usize];
        self.r
            .read_exact(&mut body)
            .map_err(|_| self.bad("truncated"))?;
        match wire::decode_body(&body).map_err(|e| self.bad(e))? {
            Message::Chunk(c) => {
                let data = c.unpack().map_err(|e| self.bad(e))?;
                self.count += 1;
                self.digest = self
                    .digest
                    .wrapping_add(wire::digest([(c.id(), c.checksum)]));
                Ok(Some((c, data)))
            }
            Message::Manifest { chunks, digest, .. } => {
                if chunks != self.count || digest != self.digest {
                    return Err(self.bad("trailer does not match its entries"));
                }
                Ok(None)
            }
            other => Err(self.bad(format!("unexpected frame {other:?}"))),
        }
    }
}

impl Iterator for Entries {
    /// An entry and what it unpacks to (None: zeroes).
    type Item = io::Result<(Chunk, Option<Vec<u8>>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_entry().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

/// Reads a whole undo log through, checking it, without keeping it: an incomplete or corrupt
/// one is an error naming the file. Callers that change anything from a log check it first.
pub fn check(path: &Path) -> io::Result<()> {
    for e in Entries::open(path)? {
        e?;
    }
    Ok(())
}

/// Reads a complete undo log into memory (small logs and tests).
pub fn read(path: &Path) -> io::Result<Vec<Chunk>> {
    Entries::open(path)?.map(|e| e.map(|(c, _)| c)).collect()
}

fn journal_err(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("undo journal {}: {e}", path.display()))
}

/// The undo log of the cycle being received, appended a range at a time (not fsynced until
/// [`Journal::finish`]). It knows which byte ranges it covers, so a range staged again, or
/// overlapping one staged before, is captured once: the first capture holds the old contents.
pub struct Journal {
    path: PathBuf,
    log: LogWriter,
    count: u64,
    digest: u64,
    /// Per disk, disjoint covered ranges: start → end.
    covered: BTreeMap<u16, BTreeMap<u64, u64>>,
}

impl Journal {
    /// Opens or creates the journal of `cycle` at `path`, keeping its intact entries (a torn
    /// tail or an earlier trailer is cut off).
    pub fn open(path: &Path, cycle: u64) -> io::Result<Journal> {
        let ctx = |e| journal_err(path, e);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(ctx)?;
        let total = file.metadata().map_err(ctx)?.len();
        let mut entries = Vec::new();
        let pos = scan_log(&file, path, total, |c, _| {
            let intact = c.cycle == cycle && c.unpack().is_ok();
            if intact {
                entries.push((c.id(), c.len, c.checksum));
            }
            intact
        })
        .map_err(ctx)?;
        if pos != total {
            file.set_len(pos).map_err(ctx)?;
        }
        let mut j = Journal {
            path: path.to_path_buf(),
            log: LogWriter::open(file, path, pos).map_err(ctx)?,
            count: 0,
            digest: 0,
            covered: BTreeMap::new(),
        };
        for (id, len, sum) in entries {
            j.note(id, len, sum);
        }
        Ok(j)
    }

    fn note(&mut self, id: ChunkId, len: u32, checksum: u64) {
        self.count += 1;
        self.digest = self.digest.wrapping_add(wire::digest([(id, checksum)]));
        let (mut start, mut end) = (id.offset, id.offset + u64::from(len));
        let m = self.covered.entry(id.disk).or_default();
        // Merge with every range that touches [start, end).
        let touching: Vec<(u64, u64)> = m
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            m.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        m.insert(start, end);
    }

    /// Parts of `[start, end)` of `disk` not captured yet.
    pub fn uncovered(&self, disk: u16, start: u64, end: u64) -> Vec<(u64, u64)> {
        let Some(m) = self.covered.get(&disk) else {
            return vec![(start, end)];
        };
        let mut over: Vec<(u64, u64)> = m
            .range(..end)
            .rev()
            .take_while(|(_, e)| **e > start)
            .map(|(s, e)| (*s, *e))
            .collect();
        over.reverse();
        subtract(start, end, &over)
    }

    /// Appends the old contents of one range (not yet covered).
    pub fn append(&mut self, c: &Chunk) -> io::Result<()> {
        self.log
            .append_chunk(c)
            .map_err(|e| journal_err(&self.path, e))?;
        self.note(c.id(), c.len, c.checksum);
        Ok(())
    }

    /// Writes what was appended so far to the file (not durably).
    pub fn flush(&mut self) -> io::Result<()> {
        self.log.flush().map_err(|e| journal_err(&self.path, e))
    }

    /// Closes the journal with its trailer, makes it durable and moves it to `dest` as the
    /// cycle's undo log. Returns its size.
    pub fn finish(mut self, cycle: u64, dest: &Path) -> io::Result<u64> {
        let path = self.path.clone();
        let ctx = |e| journal_err(&path, e);
        let mut buf = Vec::new();
        wire::encode(
            &Message::Manifest {
                cycle,
                chunks: self.count,
                digest: self.digest,
            },
            &mut buf,
        );
        self.log.append(&[&buf]).map_err(ctx)?;
        self.log.flush().map_err(ctx)?;
        let bytes = self.log.len();
        self.log.file().sync_all().map_err(ctx)?;
        fs::rename(&self.path, dest).map_err(ctx)?;
        if let Some(dir) = dest.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(bytes)
    }
}

/// Byte ranges per disk, sorted.
fn ranges(entries: impl IntoIterator<Item = (u16, u64, u32)>) -> BTreeMap<u16, Vec<(u64, u64)>> {
    let mut m: BTreeMap<u16, Vec<(u64, u64)>> = BTreeMap::new();
    for (disk, offset, len) in entries {
        m.entry(disk)
            .or_default()
            .push((offset, offset + u64::from(len)));
    }
    for v in m.values_mut() {
        v.sort();
    }
    m
}

/// Parts of `[start, end)` not covered by the sorted `covered` ranges.
fn subtract(start: u64, end: u64, covered: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = start;
    for &(s, e) in covered {
        if e <= pos || s >= end {
            continue;
        }
        if s > pos {
            out.push((pos, s));
        }
        pos = pos.max(e);
        if pos >= end {
            break;
        }
    }
    if pos < end {
        out.push((pos, end));
    }
    out
}

/// Writes at `dest` one undo log that reverts both of two consecutive logs: `newer` reverts
/// point B to A, `older` reverts A to the point before it; where both cover a byte, the older
/// one wins. Both are streamed (only the older log's ranges are held); returns the size.
/// Reading a damaged log fails before the trailer; [`write`] then renames nothing, so `dest`
/// appears only whole.
pub fn merge(older: &Path, newer: &Path, cycle: u64, dest: &Path) -> io::Result<u64> {
    // This pass also checks the older log through to its trailer.
    let mut cov_src = Vec::new();
    for e in Entries::open(older)? {
        let (c, _) = e?;
        cov_src.push((c.disk, c.offset, c.len));
    }
    let cov = ranges(cov_src);
    let empty = Vec::new();
    let older_entries = Entries::open(older)?.map(|e| e.map(|(c, _)| c));
    let newer_parts = Entries::open(newer)?.flat_map(|e| -> Vec<io::Result<Chunk>> {
        let (c, data) = match e {
            Ok(e) => e,
            Err(e) => return vec![Err(e)],
        };
        let covered = cov.get(&c.disk).unwrap_or(&empty);
        let end = c.offset + u64::from(c.len);
        let parts = subtract(c.offset, end, covered);
        if parts == [(c.offset, end)] {
            return vec![Ok(c)];
        }
        parts
            .into_iter()
            .map(|(s, t)| {
                Ok(match &data {
                    Some(d) => Chunk::pack(
                        cycle,
                        c.disk,
                        s,
                        &d[(s - c.offset) as usize..(t - c.offset) as usize],
                        true,
                    ),
                    None => Chunk::zeroes(cycle, c.disk, s, (t - s) as u32),
                })
            })
            .collect()
    });
    let all = older_entries.chain(newer_parts);
    write(dest, cycle, all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn write_read_and_reject_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("3.undo");
        let entries = vec![
            Chunk::pack(3, 0, 0, &[1u8; 8192], true),
            Chunk::pack(3, 1, 65536, &[0u8; 4096], true),
        ];
        write(&p, 3, entries.iter().cloned().map(Ok)).unwrap();
        assert_eq!(read(&p).unwrap(), entries);
        let data = fs::read(&p).unwrap();
        fs::write(&p, &data[..data.len() - 5]).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("3.undo"), "{e}");
    }

    #[test]
    fn a_journal_captures_each_range_once_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let done = dir.path().join("4.undo");
        let mut j = Journal::open(&p, 4).unwrap();
        assert_eq!(j.uncovered(0, 0, 100), vec![(0, 100)]);
        j.append(&Chunk::pack(4, 0, 20, &[7u8; 30], true)).unwrap();
        j.append(&Chunk::zeroes(4, 0, 50, 10)).unwrap();
        j.append(&Chunk::pack(4, 1, 0, &[8u8; 10], true)).unwrap();
        // 20..60 merged into one range; disk 1 apart.
        assert_eq!(j.uncovered(0, 0, 100), vec![(0, 20), (60, 100)]);
        assert_eq!(j.uncovered(0, 30, 40), vec![]);
        assert_eq!(j.uncovered(1, 5, 15), vec![(10, 15)]);
        let full = j.log.len();
        drop(j);
        // A torn append: reopening keeps the three entries and their coverage.
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0, 0, 1, 0, 5], full).unwrap();
        let mut j = Journal::open(&p, 4).unwrap();
        assert_eq!((j.log.len(), j.count), (full, 3));
        assert_eq!(j.uncovered(0, 0, 100), vec![(0, 20), (60, 100)]);
        j.append(&Chunk::pack(4, 0, 0, &[9u8; 20], true)).unwrap();
        let bytes = j.finish(4, &done).unwrap();
        assert!(!p.exists());
        assert_eq!(fs::metadata(&done).unwrap().len(), bytes);
        let back = read(&done).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back[3].unpack().unwrap().unwrap(), vec![9u8; 20]);
    }

    #[test]
    fn merge_keeps_the_older_contents_where_both_cover() {
        let dir = tempfile::tempdir().unwrap();
        let (op, np, mp) = (
            dir.path().join("2.undo"),
            dir.path().join("3.undo"),
            dir.path().join("3-1.undo"),
        );
        write(&op, 2, [Ok(Chunk::pack(2, 0, 4096, &[2u8; 4096], true))]).unwrap();
        write(
            &np,
            3,
            [
                Ok(Chunk::pack(3, 0, 0, &[3u8; 12288], true)),
                Ok(Chunk::zeroes(3, 1, 0, 8192)),
            ],
        )
        .unwrap();
        let bytes = merge(&op, &np, 3, &mp).unwrap();
        assert_eq!(fs::metadata(&mp).unwrap().len(), bytes);
        let mut img = vec![9u8; 12288];
        let mut other = vec![9u8; 8192];
        for c in read(&mp).unwrap() {
            let d = c
                .unpack()
                .unwrap()
                .unwrap_or_else(|| vec![0; c.len as usize]);
            let target = if c.disk == 0 { &mut img } else { &mut other };
            target[c.offset as usize..c.offset as usize + d.len()].copy_from_slice(&d);
        }
        assert_eq!(&img[..4096], &[3u8; 4096][..]);
        assert_eq!(&img[4096..8192], &[2u8; 4096][..]);
        assert_eq!(&img[8192..], &[3u8; 4096][..]);
        assert_eq!(other, vec![0u8; 8192]);
        assert_eq!(
            subtract(0, 10, &[(2, 4), (3, 6), (8, 20)]),
            vec![(0, 2), (6, 8)]
        );
        // A damaged input: nothing is written.
        let data = fs::read(&np).unwrap();
        fs::write(&np, &data[..data.len() - 3]).unwrap();
        fs::remove_file(&mp).unwrap();
        let e = merge(&op, &np, 3, &mp).unwrap_err().to_string();
        assert!(e.contains("3.undo"), "{e}");
        assert!(!mp.exists());
        assert!(!mp.with_extension("undo.tmp").exists());
    }
}
