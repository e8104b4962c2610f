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

/// Data (allocated) regions of `f` within `[0, size)`, as (offset, len).
pub fn data_regions(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let seek = |pos: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own.
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}
