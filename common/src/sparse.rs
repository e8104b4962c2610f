//! Small helpers for sparse files (images on both sites stay sparse).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Deallocates `[offset, offset+len)` (reads back as zeroes).
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        use std::os::unix::fs::FileExt;
        return f.write_all_at(&vec![0u8; len as usize], offset);
    }
    Err(e)
}

/// `lseek(f, pos, whence)` for SEEK_DATA/SEEK_HOLE: None when there is no data at or after
/// `pos` (ENXIO). Callers use positioned I/O, so moving the file offset is harmless.
fn seek(f: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// `lseek(f, pos, SEEK_DATA)`: where the first data at or after `pos` starts, or None if
/// there is none (ENXIO: a hole to the end of the file, or `pos` at or past it).
pub fn seek_data(f: &File, pos: u64) -> io::Result<Option<u64>> {
    seek(f, pos, libc::SEEK_DATA)
}

/// `lseek(f, pos, SEEK_HOLE)`: where the first hole at or after `pos` starts (the end of
/// the file counts as one), or None if `pos` is at or past the end (ENXIO).
pub fn seek_hole(f: &File, pos: u64) -> io::Result<Option<u64>> {
    seek(f, pos, libc::SEEK_HOLE)
}

/// Whether `[offset, offset+len)` of `f` is all hole (reads back as zeroes without touching
/// the disk).
pub fn is_hole(f: &File, offset: u64, len: u64) -> io::Result<bool> {
    Ok(seek(f, offset, libc::SEEK_DATA)?.is_none_or(|data| data >= offset + len))
}

/// Data (allocated) regions of `f` within `[0, size)`, as (offset, len).
pub fn data_regions(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Data (allocated) stretches of `f` within `[start, end)`, as (start, end) pairs in order.
pub fn data_regions_in(f: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(data) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_and_data_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 1 << 20).unwrap();
        assert!(is_hole(&f, 0, 1 << 20).unwrap());
        assert!(!is_hole(&f, 0, (1 << 20) + 1).unwrap());
        assert!(!is_hole(&f, (1 << 20) + 4096, 4096).unwrap());
        assert!(is_hole(&f, 2 << 20, 2 << 20).unwrap());
        assert_eq!(data_regions(&f, 4 << 20).unwrap(), vec![(1 << 20, 65536)]);
        assert_eq!(
            data_regions_in(&f, (1 << 20) + 4096, 2 << 20).unwrap(),
            vec![((1 << 20) + 4096, (1 << 20) + 65536)]
        );
        assert!(data_regions_in(&f, 0, 1 << 20).unwrap().is_empty());
        punch_hole(&f, 1 << 20, 65536).unwrap();
        assert!(is_hole(&f, 0, 4 << 20).unwrap());
    }
}
