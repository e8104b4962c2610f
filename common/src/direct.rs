//! Direct I/O (`O_DIRECT`) for the bulk data paths: the shipper's reads of frozen blocks and
//! the applier's writes into staging logs and replica images.
//!
//! A cycle moves its data through the disk once on each site; through the page cache it would
//! also allocate (and, on a host that reclaims free guest memory, fault in) a fresh page for
//! every 4 KiB it reads or writes, and evict the guest's and other VMs' cached data for bytes
//! nobody reads again. Direct I/O moves the bytes between the disk and the process's own
//! buffers, which are reused across chunks.
//!
//! Direct transfers need an aligned file offset, length and memory address. [`aligned`] picks
//! the aligned start inside a plain `Vec<u8>` with slack; transfers of 512 KiB or more (the
//! shipper's reads, the applier's chunk writes) use [`crate::iobuf::DirectBuf`] instead,
//! whose transfers lie in huge pages (one contiguous piece for the disk rather than 256
//! scattered ones per MiB). Filesystems that refuse
//! `O_DIRECT` (tmpfs, some FUSE filesystems) get `None` from [`open`], and callers use their
//! buffered descriptor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of direct transfers: offset, length and buffer address. 4 KiB covers every
/// logical block size in use (512 and 4096).
pub const ALIGN: usize = 4096;

/// Whether a transfer of `len` bytes at `offset` may go direct.
pub fn fits(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN) && len > 0
}

/// Sizes `buf` so that `len` bytes fit from an [`ALIGN`]-aligned start inside it, and returns
/// that start: the transfer goes into (or from) `buf[at..at + len]`. Reuses the allocation when
/// it is large enough; the bytes' contents are whatever the buffer held.
pub fn aligned(buf: &mut Vec<u8>, len: usize) -> usize {
    if buf.len() < len + ALIGN {
        buf.resize(len + ALIGN, 0);
    }
    let addr = buf.as_ptr() as usize;
    let at = (ALIGN - addr % ALIGN) % ALIGN;
    buf.truncate(at + len);
    at
}

/// Opens `path` a second time with `O_DIRECT` (read-only, or read-write if `write`), and
/// checks with one aligned read that transfers work; `None` where the filesystem refuses
/// direct I/O. A file too short to probe is opened unchecked: callers fall back to buffered
/// I/O if its first direct transfer fails with [`is_refusal`].
pub fn open(path: &Path, write: bool) -> io::Result<Option<File>> {
    let f = match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if is_refusal(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() < ALIGN as u64 {
        return Ok(Some(f));
    }
    let mut probe = Vec::new();
    let at = aligned(&mut probe, ALIGN);
    match f.read_exact_at(&mut probe[at..], 0) {
        Ok(()) => Ok(Some(f)),
        Err(e) if is_refusal(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Set (to anything but `0`) in tests that must exercise direct I/O: a test that finds it
/// unavailable fails instead of passing on the page-cache path only.
pub const REQUIRE_DIRECT_ENV: &str = "VMREPLICA_REQUIRE_DIRECT";

/// Whether [`REQUIRE_DIRECT_ENV`] is set.
pub fn direct_required() -> bool {
    std::env::var_os(REQUIRE_DIRECT_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// For tests that found no direct I/O: fails the test if [`REQUIRE_DIRECT_ENV`] says direct
/// I/O must be exercised, else says what is skipped.
pub fn unavailable(skipped: &str) {
    assert!(
        !direct_required(),
        "no direct I/O here, but {REQUIRE_DIRECT_ENV} is set: {skipped}"
    );
    eprintln!("no direct I/O here: {skipped}");
}

/// Whether `e` is a filesystem refusing a direct transfer (rather than an I/O error).
pub fn is_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_start_holds_the_length_and_reuses_the_buffer() {
        let mut b = Vec::new();
        for len in [4096, 65536, 12288, 1 << 20, 4096] {
            let at = aligned(&mut b, len);
            assert_eq!((b.as_ptr() as usize + at) % ALIGN, 0);
            assert_eq!(b.len() - at, len);
        }
        let cap = b.capacity();
        aligned(&mut b, 65536);
        assert_eq!(
            b.capacity(),
            cap,
            "a large enough buffer is not reallocated"
        );
        assert!(fits(8192, 4096));
        assert!(!fits(8192, 100));
        assert!(!fits(100, 4096));
        assert!(!fits(0, 0));
    }

    #[test]
    fn direct_reads_return_the_files_bytes() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("img");
        let data: Vec<u8> = (0..3 * ALIGN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let Some(f) = open(&p, false).unwrap() else {
            unavailable("direct reads are not exercised");
            return;
        };
        let mut b = Vec::new();
        let at = aligned(&mut b, 2 * ALIGN);
        f.read_exact_at(&mut b[at..], ALIGN as u64).unwrap();
        assert_eq!(&b[at..], &data[ALIGN..]);
        // An unaligned direct read is refused, not failed.
        let e = f.read_exact_at(&mut b[at + 1..at + 2], 1).unwrap_err();
        assert!(is_refusal(&e), "{e}");
    }
}
