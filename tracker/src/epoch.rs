//! Telling a restored state directory from the live one: the state's epoch, stamped on the
//! images.
//!
//! `tracker.json` holds an epoch, raised at every open and every freeze, and each image
//! carries the last epoch it was used under in an extended attribute
//! ([`XATTR`], `getfattr -n user.vmreplica.tracker-epoch IMAGE`). The state is saved
//! before the images are stamped, so on the live directory an image's epoch is never ahead
//! of the state's. An image ahead of the state means the state directory is an older copy
//! (a host restored from a backup or snapshot while its disks live elsewhere): its bitmaps
//! miss the writes made since, and its frozen generation's copies-on-write miss what was
//! overwritten since, so every disk needs a checksum resync. The marker lives with the
//! disks, not in the state directory, so restoring the directory cannot restore it too.
//!
//! Limits: a copy of the directory taken while the tracker ran is told apart only once the
//! live tracker froze or restarted after the copy; an image on a file system without user
//! extended attributes (or a block device) is not stamped (said once, at open).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::disk::Disk;

/// The extended attribute holding an image's epoch (decimal ASCII).
pub const XATTR: &str = "user.vmreplica.tracker-epoch";

fn name() -> std::ffi::CString {
    std::ffi::CString::new(XATTR).expect("no NUL in the name")
}

/// The epoch `image` was last used under; None if it was never stamped.
pub fn read(image: &File) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 32];
    // SAFETY: fgetxattr writes at most `buf.len()` bytes into `buf`, which lives across the
    // call; the name is a valid NUL-terminated string; the descriptor is open.
    let n = unsafe {
        libc::fgetxattr(
            image.as_raw_fd(),
            name().as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    std::str::from_utf8(&buf[..n as usize])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("extended attribute {XATTR} is not a number"),
            )
        })
}

/// Stamps `image` with `epoch` (durable with the image's next fsync).
pub fn write(image: &File, epoch: u64) -> io::Result<()> {
    let v = epoch.to_string();
    // SAFETY: fsetxattr reads `v.len()` bytes from `v`, which lives across the call; the name
    // is a valid NUL-terminated string; the descriptor is open.
    let r = unsafe {
        libc::fsetxattr(
            image.as_raw_fd(),
            name().as_ptr(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// At open: whether the state (epoch `state_epoch`, read from `dir`; `check` false for a
/// state just made or no tracking) is older than the images' last use, and the state's new
/// epoch (above every stamp seen). Said when restored.
pub(crate) fn check<'a>(
    dir: &Path,
    check: bool,
    state_epoch: u64,
    images: impl Iterator<Item = (&'a str, &'a Path, &'a File)>,
) -> (bool, u64) {
    let stamped = images
        .filter_map(|(name, path, file)| {
            read(file).unwrap_or_else(|e| {
                tracing::warn!(disk = name, image = %path.display(), "cannot read the tracker epoch stamped on the image ({e}): a restored older state directory cannot be told for this disk");
                None
            })
        })
        .max();
    let restored = check && stamped.is_some_and(|e| e > state_epoch);
    if restored {
        tracing::error!(dir = %dir.display(), state_epoch, image_epoch = stamped, "the tracker's state is older than the disks' last use (an older copy of the state directory was restored): its bitmaps miss the writes made since; every disk is marked for a checksum resync and a frozen generation is abandoned");
    }
    (restored, state_epoch.max(stamped.unwrap_or(0)) + 1)
}

/// Stamps the image of `d` with `epoch` (saved in the state before), with `sync` durably;
/// a failure is said, rate-limited, and only weakens the restore detection.
pub(crate) fn stamp(d: &Disk, epoch: u64, sync: bool) {
    let r = write(&d.file, epoch).and_then(|()| if sync { d.file.sync_all() } else { Ok(()) });
    if let Err(e) = r {
        vmreplica_common::warn_limited!(
            std::time::Duration::from_secs(3600),
            key = &d.name,
            "disk {} ({}): cannot stamp the tracker epoch on the image ({e}): a restored older state directory cannot be told for this disk",
            d.name,
            d.path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_read_back() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("i.img"))
            .unwrap();
        assert_eq!(read(&f).unwrap(), None);
        write(&f, 7).unwrap();
        assert_eq!(read(&f).unwrap(), Some(7));
        write(&f, u64::MAX).unwrap();
        assert_eq!(read(&f).unwrap(), Some(u64::MAX));
    }
}
