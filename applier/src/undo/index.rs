//! An undo log's entries in memory, by disk and offset, so that a read of a recovery point
//! finds the old contents of a range with one lookup and reads them with one pread.
//!
//! The log of the cycle being received grows while it is read: entries are inserted once
//! they are durable and before the image writes they undo are issued (see `pointview`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::format::Entry;
use super::log::read_entry;

pub struct LogIndex {
    /// The newest cycle whose writes the log undoes.
    pub from: u64,
    /// The point the log leads back to.
    pub to: u64,
    path: PathBuf,
    file: File,
    entries: RwLock<BTreeMap<(u16, u64), Entry>>,
}

impl LogIndex {
    /// The index of the log at `path` (opened here for reading) holding `entries`.
    pub fn open(
        from: u64,
        to: u64,
        path: &Path,
        entries: impl IntoIterator<Item = Entry>,
    ) -> io::Result<LogIndex> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(LogIndex {
            from,
            to,
            path: path.to_path_buf(),
            file,
            entries: RwLock::new(
                entries
                    .into_iter()
                    .map(|e| ((e.disk, e.offset), e))
                    .collect(),
            ),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds entries (durable in the log).
    pub fn insert(&self, entries: &[Entry]) {
        let mut m = self.entries.write().unwrap_or_else(|e| e.into_inner());
        for e in entries {
            m.insert((e.disk, e.offset), *e);
        }
    }

    /// The parts of `[start, end)` of `disk` the log covers, in order, with their entries.
    pub fn covering(&self, disk: u16, start: u64, end: u64) -> Vec<(u64, u64, Entry)> {
        let m = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, u64, Entry)> = m
            .range(..(disk, end))
            .rev()
            .take_while(|((d, _), e)| *d == disk && e.end() > start)
            .map(|(_, e)| (e.offset.max(start), e.end().min(end), *e))
            .collect();
        out.reverse();
        out
    }

    /// Every entry, by disk and offset.
    pub fn entries(&self) -> Vec<Entry> {
        let m = self.entries.read().unwrap_or_else(|e| e.into_inner());
        m.values().copied().collect()
    }

    /// Reads `[start, end)` of entry `e`'s old contents into `buf`.
    pub fn read(&self, e: &Entry, start: u64, end: u64, buf: &mut [u8]) -> io::Result<()> {
        read_entry(&self.file, e, start, end, buf)
            .map_err(|x| io::Error::new(x.kind(), format!("undo log {}: {x}", self.path.display())))
    }
}
