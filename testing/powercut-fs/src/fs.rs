//! The FUSE side: a passthrough over a backing directory whose file data goes through a
//! per-file [`Overlay`] until fsync, and whose namespace changes are recorded in a
//! [`Journal`] until their directories are fsynced.
//!
//! Inodes are this file system's own numbers, kept for the life of the mount and never reused;
//! each is tied to the backing file's (device, inode) while that file has a name, and holds an
//! open descriptor of the backing file while it is open or has pending data, so fsync after a
//! rename or an unlink still reaches the right file. Everything sits under one mutex: simple,
//! and the power cut is one atomic step between two operations.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};

use crate::names::{Journal, Replaced, Undo, TRASH};
use crate::overlay::Overlay;

/// Attribute and entry timeout handed to the kernel.
const TTL: Duration = Duration::from_secs(1);

struct Node {
    /// Backing path; `None` once the last name is gone.
    path: Option<PathBuf>,
    /// Backing (device, inode) while the file has a name.
    key: Option<(u64, u64)>,
    file: Option<File>,
    opens: u64,
    overlay: Option<Overlay>,
}

struct Inner {
    /// Set by the power cut: from then on every operation fails and nothing reaches the
    /// backing directory.
    cut: bool,
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
    journal: Journal,
}

/// Counters for diagnostics (printed on exit with `--verbose`).
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub writes: u64,
    pub fsyncs: u64,
    pub fsyncs_applied: u64,
    pub fallocates: u64,
    pub truncates: u64,
    pub dir_fsyncs: u64,
    /// Namespace changes undone by the power cut, and those that could not be.
    pub names_undone: u64,
    pub names_not_undone: u64,
}

/// Shared state: the file system handed to fuser and the control side (signals) both hold it.
#[derive(Clone)]
pub struct Shared {
    inner: Arc<Mutex<Inner>>,
    stats: Arc<Mutex<Stats>>,
}

pub struct PowercutFs {
    shared: Shared,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn kind_of(m: &fs::Metadata) -> FileType {
    FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr_of(ino: u64, m: &fs::Metadata, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: m.blocks().max(size.div_ceil(512)),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind: kind_of(m),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        }
    }
}

type R<T> = Result<T, Errno>;

impl Inner {
    fn live(&self) -> R<()> {
        if self.cut {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    fn node(&self, ino: u64) -> R<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> R<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn path(&self, ino: u64) -> R<PathBuf> {
        self.node(ino)?.path.clone().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> R<PathBuf> {
        if parent == INodeNo::ROOT.0 && name == TRASH {
            // The trash is the file system's own, never seen through the mount.
            return Err(Errno::EACCES);
        }
        Ok(self.path(parent)?.join(name))
    }

    /// The inode for the backing file at `path`, whose metadata is `m`.
    fn node_for(&mut self, path: &Path, m: &fs::Metadata) -> u64 {
        let key = (m.dev(), m.ino());
        if let Some(ino) = self.by_key.get(&key) {
            if let Some(n) = self.nodes.get_mut(ino) {
                n.path = Some(path.to_path_buf());
                return *ino;
            }
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                path: Some(path.to_path_buf()),
                key: Some(key),
                file: None,
                opens: 0,
                overlay: None,
            },
        );
        self.by_key.insert(key, ino);
        ino
    }

    fn attr(&self, ino: u64) -> R<FileAttr> {
        let n = self.node(ino)?;
        let m = match (&n.file, &n.path) {
            (Some(f), _) => f.metadata(),
            (None, Some(p)) => fs::symlink_metadata(p),
            (None, None) => return Err(Errno::ENOENT),
        }
        .map_err(|e| errno(&e))?;
        let size = n.overlay.as_ref().map_or(m.len(), Overlay::size);
        Ok(attr_of(ino, &m, size))
    }

    fn entry(&mut self, path: &Path) -> R<FileAttr> {
        let m = fs::symlink_metadata(path).map_err(|e| errno(&e))?;
        let ino = self.node_for(path, &m);
        self.attr(ino)
    }

    /// Opens the backing file of a regular file if not open yet.
    fn file(&mut self, ino: u64) -> R<&File> {
        let n = self.node_mut(ino)?;
        if n.file.is_none() {
            let p = n.path.as_ref().ok_or(Errno::ENOENT)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| errno(&e))?;
            n.file = Some(f);
        }
        Ok(n.file.as_ref().expect("opened above"))
    }

    /// The overlay of `ino` (created empty over the backing file if none) and the backing file.
    fn overlay(&mut self, ino: u64) -> R<(&mut Overlay, &File)> {
        self.file(ino)?;
        let n = self.node_mut(ino)?;
        let f = n.file.as_ref().expect("opened above");
        if n.overlay.is_none() {
            let len = f.metadata().map_err(|e| errno(&e))?.len();
            n.overlay = Some(Overlay::new(len));
        }
        Ok((n.overlay.as_mut().expect("created above"), f))
    }

    /// Closes the backing descriptor of a node nobody has open and with nothing pending.
    fn maybe_close(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            if n.opens == 0 && n.overlay.is_none() {
                n.file = None;
            }
        }
    }

    /// fsync: the overlay of `ino` goes to the backing file.
    fn sync(&mut self, ino: u64) -> io::Result<bool> {
        let Some(n) = self.nodes.get_mut(&ino) else {
            return Ok(false);
        };
        let (Some(o), Some(f)) = (&n.overlay, &n.file) else {
            return Ok(false);
        };
        o.apply(f)?;
        n.overlay = None;
        self.maybe_close(ino);
        Ok(true)
    }

    /// The backing file at `path` lost a name: if it was the last, forget its key (the
    /// backing inode number may be reused by a new file) and its pending data once closed.
    fn unlinked(&mut self, m: &fs::Metadata, path: &Path) {
        let key = (m.dev(), m.ino());
        let Some(ino) = self.by_key.get(&key).copied() else {
            return;
        };
        if m.is_dir() || m.nlink() <= 1 {
            self.by_key.remove(&key);
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = None;
                n.key = None;
                if n.opens == 0 {
                    n.overlay = None;
                    n.file = None;
                }
            }
        } else if let Some(n) = self.nodes.get_mut(&ino) {
            if n.path.as_deref() == Some(path) {
                n.path = None;
            }
        }
    }

    /// Paths under `from` now live under `to` (and with `exchange`, the other way round too).
    fn moved(&mut self, from: &Path, to: &Path, exchange: bool) {
        for n in self.nodes.values_mut() {
            let Some(p) = &n.path else { continue };
            if let Ok(rest) = p.strip_prefix(from) {
                n.path = Some(if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                });
            } else if exchange {
                if let Ok(rest) = p.strip_prefix(to) {
                    n.path = Some(if rest.as_os_str().is_empty() {
                        from.to_path_buf()
                    } else {
                        from.join(rest)
                    });
                }
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The power cut: every pending change is dropped, except the pages `keep` picks (a
    /// cache that had written them back already); nothing reaches the backing directory
    /// afterwards. Returns (files with pending changes, pages lost, pages kept).
    pub fn power_cut(&self, keep: &mut dyn FnMut() -> bool) -> (usize, usize, usize) {
        let mut g = self.lock();
        g.cut = true;
        let (mut files, mut lost, mut kept) = (0, 0, 0);
        for n in g.nodes.values_mut() {
            if let (Some(o), Some(f)) = (n.overlay.take(), &n.file) {
                files += 1;
                let k = o.apply_some(f, keep).unwrap_or(0);
                kept += k;
                lost += o.dirty_pages() - k;
            }
        }
        // Then the names: every create, rename, unlink not yet made durable by an fsync of
        // its directory is undone.
        let (undone, failed) = g.journal.undo_all();
        for f in &failed {
            eprintln!("powercut-fs: power cut: could not undo {f}");
        }
        self.stat(|s| {
            s.names_undone += undone as u64;
            s.names_not_undone += failed.len() as u64;
        });
        (files, lost, kept)
    }

    /// Orderly shutdown: every pending change is applied; then, like a power cut, nothing
    /// more. Returns the files synced.
    pub fn sync_all_and_stop(&self) -> io::Result<usize> {
        let mut g = self.lock();
        let inos: Vec<u64> = g.nodes.keys().copied().collect();
        let mut n = 0;
        let mut first_err = None;
        for ino in inos {
            match g.sync(ino) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        g.journal.commit_all();
        g.cut = true;
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

impl PowercutFs {
    pub fn new(backing: &Path) -> io::Result<PowercutFs> {
        let root = fs::canonicalize(backing)?;
        let m = fs::metadata(&root)?;
        if !m.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        let mut inner = Inner {
            cut: false,
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            next: INodeNo::ROOT.0,
            journal: Journal::open(&root)?,
        };
        let ino = inner.node_for(&root, &m);
        debug_assert_eq!(ino, INodeNo::ROOT.0);
        Ok(PowercutFs {
            shared: Shared {
                inner: Arc::new(Mutex::new(inner)),
                stats: Arc::default(),
            },
        })
    }

    pub fn shared(&self) -> Shared {
        self.shared.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// Runs `f` on the state unless the power is cut.
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> R<T>) -> R<T> {
        let mut g = self.lock();
        g.live()?;
        f(&mut g)
    }
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with(|g| {
            let p = g.child(parent.0, name)?;
            g.entry(&p)
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|g| g.attr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = self.with(|g| {
            let ino = ino.0;
            let io = |e: io::Error| errno(&e);
            // Metadata: straight to the backing directory (see the crate docs).
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                let p = g.path(ino)?;
                if let Some(m) = mode {
                    fs::set_permissions(&p, fs::Permissions::from_mode(m & 0o7777)).map_err(io)?;
                }
                if uid.is_some() || gid.is_some() {
                    std::os::unix::fs::lchown(&p, uid, gid).map_err(io)?;
                }
                if atime.is_some() || mtime.is_some() {
                    let c = cpath(&p).map_err(io)?;
                    let ts = [timespec(atime), timespec(mtime)];
                    // SAFETY: a NUL-terminated path and a two-element timespec array.
                    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) })
                        .map_err(io)?;
                }
            }
            // Size: data, so into the overlay.
            if let Some(s) = size {
                let (o, f) = g.overlay(ino)?;
                o.truncate(f, s).map_err(io)?;
                self.shared.stat(|st| st.truncates += 1);
            }
            g.attr(ino)
        });
        match res {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.with(|g| {
            let p = g.child(parent.0, name)?;
            fs::create_dir(&p).map_err(|e| errno(&e))?;
            g.journal.record(
                Undo::Remove {
                    path: p.clone(),
                    dir: true,
                },
                &[parent.0],
            );
            fs::set_permissions(&p, fs::Permissions::from_mode(mode & !umask & 0o7777))
                .map_err(|e| errno(&e))?;
            g.entry(&p)
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|g| {
            let p = g.child(parent.0, name)?;
            let m = fs::symlink_metadata(&p).map_err(|e| errno(&e))?;
            if m.is_dir() {
                return Err(Errno::EISDIR);
            }
            // Kept in the trash until the unlink is durable.
            let trash = g.journal.stash(&p).map_err(|e| errno(&e))?;
            g.journal.record(
                Undo::Restore {
                    trash,
                    path: p.clone(),
                },
                &[parent.0],
            );
            g.unlinked(&m, &p);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|g| {
            let p = g.child(parent.0, name)?;
            let m = fs::symlink_metadata(&p).map_err(|e| errno(&e))?;
            fs::remove_dir(&p).map_err(|e| errno(&e))?;
            g.journal.record(
                Undo::Mkdir {
                    path: p.clone(),
                    mode: m.mode() & 0o7777,
                },
                &[parent.0],
            );
            g.unlinked(&m, &p);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.with(|g| {
            let io = |e: io::Error| errno(&e);
            let from = g.child(parent.0, name)?;
            let to = g.child(newparent.0, newname)?;
            let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
            let replaced = if exchange {
                None
            } else {
                fs::symlink_metadata(&to).ok()
            };
            // What the rename replaces is kept until the rename is durable.
            let kept = match &replaced {
                Some(m) if m.is_dir() => Replaced::Dir(m.mode() & 0o7777),
                Some(_) if from != to => Replaced::File(g.journal.stash_link(&to).map_err(io)?),
                _ => Replaced::Nothing,
            };
            let (cf, ct) = (cpath(&from).map_err(io)?, cpath(&to).map_err(io)?);
            // SAFETY: NUL-terminated paths; renameat2 takes no other memory.
            let renamed = check(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    cf.as_ptr(),
                    libc::AT_FDCWD,
                    ct.as_ptr(),
                    flags.bits(),
                )
            });
            if let Err(e) = renamed {
                if let Replaced::File(t) = &kept {
                    let _ = fs::remove_file(t);
                }
                return Err(io(e));
            }
            if from != to {
                g.journal.record(
                    Undo::Rename {
                        from: from.clone(),
                        to: to.clone(),
                        exchange,
                        replaced: kept,
                    },
                    &[parent.0, newparent.0],
                );
            }
            if let Some(m) = replaced {
                if from != to {
                    g.unlinked(&m, &to);
                }
            }
            g.moved(&from, &to, exchange);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|g| {
            g.file(ino.0)?;
            g.node_mut(ino.0)?.opens += 1;
            Ok(())
        }) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with(|g| {
            let p = g.child(parent.0, name)?;
            // The new name lasts once the directory is fsynced; the file's data once the file
            // is (it starts empty).
            let existed = fs::symlink_metadata(&p).is_ok();
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .custom_flags(flags & libc::O_EXCL)
                .mode(mode & !umask & 0o7777)
                .open(&p)
                .map_err(|e| errno(&e))?;
            let m = f.metadata().map_err(|e| errno(&e))?;
            if !existed {
                g.journal.record(
                    Undo::Remove {
                        path: p.clone(),
                        dir: false,
                    },
                    &[parent.0],
                );
            }
            let ino = g.node_for(&p, &m);
            let n = g.node_mut(ino)?;
            n.file.get_or_insert(f);
            n.opens += 1;
            if flags & libc::O_TRUNC != 0 {
                let (o, f) = g.overlay(ino)?;
                o.truncate(f, 0).map_err(|e| errno(&e))?;
            }
            g.attr(ino)
        }) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|g| {
            let io = |e: io::Error| errno(&e);
            g.file(ino.0)?;
            let n = g.node(ino.0)?;
            let f = n.file.as_ref().expect("opened above");
            match &n.overlay {
                Some(o) => o.read(f, offset, size as usize).map_err(io),
                None => {
                    let mut buf = vec![0u8; size as usize];
                    let k = crate::overlay::Backing::read_at(f, &mut buf, offset).map_err(io)?;
                    buf.truncate(k);
                    Ok(buf)
                }
            }
        }) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|g| {
            let (o, f) = g.overlay(ino.0)?;
            o.write(f, offset, data).map_err(|e| errno(&e))
        }) {
            Ok(()) => {
                self.shared.stat(|s| s.writes += 1);
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point.
        match self.with(|_| Ok(())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut g = self.lock();
        if let Some(n) = g.nodes.get_mut(&ino.0) {
            n.opens = n.opens.saturating_sub(1);
            if n.opens == 0 && n.path.is_none() {
                // Unlinked and closed: its data can never be read again.
                n.overlay = None;
            }
        }
        g.maybe_close(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fsync and fdatasync alike: the file's data, size and holes become durable.
        match self.with(|g| g.sync(ino.0).map_err(|e| errno(&e))) {
            Ok(applied) => {
                self.shared.stat(|s| {
                    s.fsyncs += 1;
                    s.fsyncs_applied += u64::from(applied);
                });
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|_| Ok(())) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self.with(|g| {
            let dir = g.path(ino.0)?;
            let mut entries: Vec<(u64, FileType, std::ffi::OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            let mut names: Vec<std::ffi::OsString> = fs::read_dir(&dir)
                .map_err(|e| errno(&e))?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort();
            for name in names {
                if ino.0 == INodeNo::ROOT.0 && name == TRASH {
                    continue;
                }
                let p = dir.join(&name);
                if let Ok(m) = fs::symlink_metadata(&p) {
                    let child = g.node_for(&p, &m);
                    entries.push((child, kind_of(&m), name));
                }
            }
            Ok(entries)
        });
        match res {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The directory's changed names become durable (in this directory).
        match self.with(|g| {
            g.journal.synced(ino.0);
            Ok(())
        }) {
            Ok(()) => {
                self.shared.stat(|s| s.dir_fsyncs += 1);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let res = self.with(|g| {
            let p = cpath(&g.path(INodeNo::ROOT.0)?).map_err(|e| errno(&e))?;
            // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated and lives
            // across the call.
            check(unsafe { libc::statvfs(p.as_ptr(), &mut s) }).map_err(|e| errno(&e))?;
            Ok(s)
        });
        match res {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.with(|_| Ok(())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let res = self.with(|g| {
            let (o, f) = g.overlay(ino.0)?;
            let io = |e: io::Error| errno(&e);
            if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                if !keep {
                    return Err(Errno::EOPNOTSUPP);
                }
                o.zero(f, offset, length, true).map_err(io)
            } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                o.zero(f, offset, length, keep).map_err(io)
            } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
                // Plain allocation: only the size can change.
                let end = offset.saturating_add(length);
                if !keep && end > o.size() {
                    o.truncate(f, end).map_err(io)?;
                }
                Ok(())
            } else {
                Err(Errno::EOPNOTSUPP)
            }
        });
        match res {
            Ok(()) => {
                self.shared.stat(|s| s.fallocates += 1);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    /// SEEK_DATA and SEEK_HOLE as the file's data is seen through the mount: holes of the
    /// backing file and ranges punched or zeroed since the last fsync are holes; pages written
    /// since are data.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let res = self.with(|g| {
            if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
                return Err(Errno::EINVAL);
            }
            let pos = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            g.file(ino.0)?;
            let n = g.node(ino.0)?;
            let f = n.file.as_ref().expect("opened above");
            let data = whence == libc::SEEK_DATA;
            let found = match &n.overlay {
                Some(o) => o.seek(f, pos, data),
                None => crate::overlay::seek_fd(f.as_raw_fd(), pos, data),
            };
            found.map_err(|e| errno(&e))?.ok_or(Errno::ENXIO)
        });
        match res {
            Ok(p) => reply.offset(p as i64),
            Err(e) => reply.error(e),
        }
    }
}
