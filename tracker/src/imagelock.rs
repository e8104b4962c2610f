//! The image belongs to the tracker: locks that a second tracker and QEMU itself respect.
//!
//! QEMU's raw driver (block/file-posix.c) takes open-file-description (OFD) locks on fixed
//! bytes of an image: a shared lock on byte `100 + n` while it holds permission `n`, and on
//! byte `200 + n` while it does not let others take permission `n`; before it takes a
//! permission, it tests (F_OFD_GETLK, as an exclusive lock) whether another process holds the
//! byte that forbids it. The tracker takes the bytes a running VM takes, so a VM, `qemu-io`
//! or `qemu-img` pointed at the file instead of the tracker's socket is refused, as a second
//! VM on a disk in use would be ("Failed to get "write" lock"). An exclusive lock on a byte of
//! its own, [`TRACKER_BYTE`], tells a second tracker that the image is taken.
//!
//! OFD locks belong to the open file description: they stay while the image's descriptor is
//! open and go with it (also at kill -9), whatever other descriptors of the file do.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// QEMU's `RAW_LOCK_PERM_BASE` and `RAW_LOCK_SHARED_BASE`.
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits, by index: `BLK_PERM_CONSISTENT_READ`, `BLK_PERM_WRITE`,
/// `BLK_PERM_WRITE_UNCHANGED`, `BLK_PERM_RESIZE`.
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;
/// The tracker's own byte (QEMU uses 100..=104 and 200..=204, libvirt byte 0).
pub const TRACKER_BYTE: i64 = 300;

/// Why an image cannot be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Another vmreplica tracker serves it.
    Tracker,
    /// Another process (QEMU, qemu-nbd, qemu-img...) has it open for writing or forbids
    /// writing it.
    Writer,
}

fn flock(typ: i32, start: i64) -> libc::flock {
    libc::flock {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

fn fcntl(f: &File, cmd: i32, lock: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `lock` is a valid, initialised `struct flock` that lives across the call; the
    // descriptor is open for the lifetime of `f`.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, lock as *mut libc::flock) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes a lock of type `typ` on byte `at`; `Ok(false)` if another holder conflicts.
fn take(f: &File, typ: i32, at: i64) -> io::Result<bool> {
    match fcntl(f, libc::F_OFD_SETLK, &mut flock(typ, at)) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether another open file description holds any lock on byte `at` (QEMU's test).
fn held_by_other(f: &File, at: i64) -> io::Result<bool> {
    let mut l = flock(libc::F_WRLCK, at);
    fcntl(f, libc::F_OFD_GETLK, &mut l)?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

/// Locks `image` (open read-write) for the tracker. On a conflict nothing stays locked once
/// the caller closes the file.
pub fn lock(image: &File) -> io::Result<Result<(), Conflict>> {
    if !take(image, libc::F_WRLCK, TRACKER_BYTE)? {
        return Ok(Err(Conflict::Tracker));
    }
    // What a running VM holds: consistent read and write, and it shares neither write nor
    // resize. Taken first, then tested, as QEMU does, so that two openers racing both see
    // each other.
    for at in [
        PERM_BASE + CONSISTENT_READ,
        PERM_BASE + WRITE,
        SHARED_BASE + WRITE,
        SHARED_BASE + RESIZE,
    ] {
        if !take(image, libc::F_RDLCK, at)? {
            return Ok(Err(Conflict::Writer));
        }
    }
    // Someone holding write or resize (which we do not share), or forbidding consistent read
    // or write (which we take).
    for at in [
        PERM_BASE + WRITE,
        PERM_BASE + RESIZE,
        SHARED_BASE + CONSISTENT_READ,
        SHARED_BASE + WRITE,
    ] {
        if held_by_other(image, at)? {
            return Ok(Err(Conflict::Writer));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "file locks")]
    fn a_second_opener_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let open = || File::options().read(true).write(true).open(&p).unwrap();
        let a = open();
        assert_eq!(lock(&a).unwrap(), Ok(()));
        let b = open();
        assert_eq!(lock(&b).unwrap(), Err(Conflict::Tracker));
        drop(b);
        // A writer that is not a tracker (as QEMU locks): holds byte 101.
        let q = open();
        drop(a);
        assert!(take(&q, libc::F_RDLCK, PERM_BASE + WRITE).unwrap());
        let c = open();
        assert_eq!(lock(&c).unwrap(), Err(Conflict::Writer));
        drop(c);
        drop(q);
        let d = open();
        assert_eq!(lock(&d).unwrap(), Ok(()));
        // What QEMU tests before writing: byte 201 is held by us.
        let probe = open();
        assert!(held_by_other(&probe, SHARED_BASE + WRITE).unwrap());
    }
}
