//! The volatile part of the namespace: creates, renames, unlinks, mkdir and rmdir reach the
//! backing directory at once (so lookups need no overlay of their own), but each is recorded
//! here with how to undo it, until every directory it changed has been fsynced. A power cut
//! undoes, newest first, every change not yet durable: what a file system that loses recent
//! directory entries (any of them, without an fsync of the directory) would show.
//!
//! What an unlink or a rename over an existing file removed is kept in a trash directory
//! inside the backing directory (hidden from the mount) until the change is durable, so an
//! undo can put it back, data and all.
//!
//! A simplification: entries are undone by path, so an entry whose directory was itself
//! renamed by a later change that stayed durable is not found and left alone.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the trash directory in the backing directory's root.
pub const TRASH: &str = ".powercut-trash";

/// What replaced the target of a rename.
#[derive(Debug)]
pub enum Replaced {
    Nothing,
    /// A file, kept in the trash.
    File(PathBuf),
    /// An empty directory with this mode.
    Dir(u32),
}

/// How to undo one change.
#[derive(Debug)]
pub enum Undo {
    /// A create or mkdir: remove what was made.
    Remove { path: PathBuf, dir: bool },
    /// An unlink: put the file back from the trash.
    Restore { trash: PathBuf, path: PathBuf },
    /// An rmdir: make the (empty) directory again.
    Mkdir { path: PathBuf, mode: u32 },
    /// A rename: move it back (swap back for an exchange), and restore what it replaced.
    Rename {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
        replaced: Replaced,
    },
}

struct Entry {
    undo: Undo,
    /// Directories (the file system's inode numbers) still to be fsynced for it to be durable.
    pending: Vec<u64>,
}

pub struct Journal {
    trash: PathBuf,
    entries: Vec<Entry>,
    next: u64,
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call; no other memory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Journal {
    /// Starts with an empty trash in `root` (what a killed daemon left there is dropped).
    pub fn open(root: &Path) -> io::Result<Journal> {
        let trash = root.join(TRASH);
        if trash.exists() {
            fs::remove_dir_all(&trash)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&trash)?;
        Ok(Journal {
            trash,
            entries: Vec::new(),
            next: 0,
        })
    }

    fn trash_path(&mut self) -> PathBuf {
        self.next += 1;
        self.trash.join(self.next.to_string())
    }

    /// Moves `path` into the trash (an unlink that can be undone); returns where it went.
    pub fn stash(&mut self, path: &Path) -> io::Result<PathBuf> {
        let t = self.trash_path();
        fs::rename(path, &t)?;
        Ok(t)
    }

    /// Keeps the file at `path` in the trash as a second name (before a rename replaces it).
    pub fn stash_link(&mut self, path: &Path) -> io::Result<PathBuf> {
        let t = self.trash_path();
        fs::hard_link(path, &t)?;
        Ok(t)
    }

    /// Records a change, durable once every directory in `dirs` is fsynced.
    pub fn record(&mut self, undo: Undo, dirs: &[u64]) {
        let mut pending = dirs.to_vec();
        pending.dedup();
        self.entries.push(Entry { undo, pending });
    }

    /// Directory `dir` was fsynced: the changes in it are durable in it.
    pub fn synced(&mut self, dir: u64) {
        for e in &mut self.entries {
            e.pending.retain(|d| *d != dir);
        }
        let (done, keep): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| e.pending.is_empty());
        self.entries = keep;
        for e in done {
            Self::forget(e.undo);
        }
    }

    /// A durable change: what it kept for an undo goes.
    fn forget(undo: Undo) {
        match undo {
            Undo::Restore { trash, .. }
            | Undo::Rename {
                replaced: Replaced::File(trash),
                ..
            } => {
                let _ = fs::remove_file(trash);
            }
            _ => {}
        }
    }

    /// Changes not yet durable.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// The power cut: undoes every change not durable, newest first. Returns how many were
    /// undone and the ones that could not be (their paths changed since).
    pub fn undo_all(&mut self) -> (usize, Vec<String>) {
        let mut undone = 0;
        let mut failed = Vec::new();
        while let Some(e) = self.entries.pop() {
            let what = format!("{:?}", e.undo);
            match Self::undo(e.undo) {
                Ok(()) => undone += 1,
                Err(err) => failed.push(format!("{what}: {err}")),
            }
        }
        let _ = fs::remove_dir_all(&self.trash);
        (undone, failed)
    }

    fn undo(undo: Undo) -> io::Result<()> {
        match undo {
            Undo::Remove { path, dir: false } => fs::remove_file(path),
            Undo::Remove { path, dir: true } => fs::remove_dir_all(path),
            Undo::Restore { trash, path } => renameat2(&trash, &path, libc::RENAME_NOREPLACE),
            Undo::Mkdir { path, mode } => {
                fs::create_dir(&path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            }
            Undo::Rename {
                from,
                to,
                exchange: true,
                ..
            } => renameat2(&from, &to, libc::RENAME_EXCHANGE),
            Undo::Rename {
                from, to, replaced, ..
            } => {
                renameat2(&to, &from, libc::RENAME_NOREPLACE)?;
                match replaced {
                    Replaced::Nothing => Ok(()),
                    Replaced::File(trash) => renameat2(&trash, &to, libc::RENAME_NOREPLACE),
                    Replaced::Dir(mode) => {
                        fs::create_dir(&to)?;
                        fs::set_permissions(&to, fs::Permissions::from_mode(mode))
                    }
                }
            }
        }
    }

    /// Orderly shutdown: every change is durable.
    pub fn commit_all(&mut self) {
        for e in std::mem::take(&mut self.entries) {
            Self::forget(e.undo);
        }
        let _ = fs::remove_dir_all(&self.trash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undone_newest_first_unless_their_directories_were_synced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut j = Journal::open(root).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        fs::write(&b, b"old b").unwrap();
        // create a, rename a over b, unlink nothing durable: all undone.
        fs::write(&a, b"a").unwrap();
        j.record(
            Undo::Remove {
                path: a.clone(),
                dir: false,
            },
            &[1],
        );
        let kept = j.stash_link(&b).unwrap();
        fs::rename(&a, &b).unwrap();
        j.record(
            Undo::Rename {
                from: a.clone(),
                to: b.clone(),
                exchange: false,
                replaced: Replaced::File(kept),
            },
            &[1],
        );
        let (n, failed) = j.undo_all();
        assert_eq!((n, failed.len()), (2, 0), "{failed:?}");
        assert!(!a.exists());
        assert_eq!(fs::read(&b).unwrap(), b"old b");
        // A synced directory keeps its changes; the trash is emptied.
        let mut j = Journal::open(root).unwrap();
        let t = j.stash(&b).unwrap();
        j.record(
            Undo::Restore {
                trash: t.clone(),
                path: b.clone(),
            },
            &[1],
        );
        j.synced(2);
        assert_eq!(j.pending(), 1);
        j.synced(1);
        assert_eq!(j.pending(), 0);
        assert!(!t.exists());
        j.undo_all();
        assert!(!b.exists());
        assert!(!root.join(TRASH).exists());
    }
}
