//! Buffers the I/O engine transfers into and out of.
//!
//! A direct (`O_DIRECT`) transfer goes between the disk and the process's own pages. In a
//! `Vec<u8>` those are 4 KiB pages wherever the allocator's pages landed, so a 1 MiB transfer
//! is 256 scattered pieces: on a virtual disk (virtio-blk: 256 ring entries, no indirect
//! descriptors here) one such request takes the whole ring, and the next ones wait to be
//! requeued (benches/results/initial-sync-idle-2026-12-04.md). [`DirectBuf`] is memory of its
//! own, mapped anonymously at a 2 MiB boundary and advised to be backed by transparent huge
//! pages: where the kernel grants them (THP `madvise` or `always`), a transfer of up to 2 MiB
//! is one physically contiguous piece. Where it does not, the buffer is still correct, only
//! scattered as before.
//!
//! [`IoBuf`] is what an engine operation owns: either kind, handed back on completion.

use std::io;
use std::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut, MmapOptions};

/// The size (and alignment) of a transparent huge page on x86-64 and arm64 (4 KiB base).
pub const HUGE: usize = 2 << 20;

/// The smallest transfer [`IoBuf::for_direct`] maps a [`DirectBuf`] for. Smaller ones (a
/// delta's 64 KiB blocks) take at most 128 ring entries in scattered pages, so two fit the
/// ring at once, and a huge page for each would cost 4 to 32 times their size in memory.
pub const DIRECT_BUF_MIN: usize = 512 << 10;

/// A zero-initialised buffer in memory of its own, starting on a [`HUGE`] boundary, its
/// capacity a whole number of huge pages advised `MADV_HUGEPAGE`. Its length can change
/// within the capacity; bytes keep what they last held (never uninitialised memory). The
/// mapping is freed when the buffer is dropped.
pub struct DirectBuf {
    /// The mapping: the capacity plus up to one huge page of slack in front, never touched,
    /// so that the buffer can start on a huge-page boundary.
    map: MmapMut,
    start: usize,
    len: usize,
    cap: usize,
}

impl std::fmt::Debug for DirectBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBuf")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .finish_non_exhaustive()
    }
}

impl DirectBuf {
    /// An empty buffer that holds at least `cap` bytes (rounded up to whole huge pages). Fails
    /// only if the kernel refuses the mapping (out of memory or of mappings).
    pub fn with_capacity(cap: usize) -> io::Result<DirectBuf> {
        let cap = cap
            .max(1)
            .checked_next_multiple_of(HUGE)
            .and_then(|c| c.checked_add(HUGE).map(|m| (c, m)));
        let Some((cap, mapped)) = cap else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "a buffer that large cannot be mapped",
            ));
        };
        let map = MmapOptions::new().len(mapped).map_anon()?;
        let addr = map.as_ptr() as usize;
        let start = (HUGE - addr % HUGE) % HUGE;
        // Advice only: without huge pages the buffer is correct, only scattered.
        let _ = map.advise_range(Advice::HugePage, start, cap);
        Ok(DirectBuf {
            map,
            start,
            len: 0,
            cap,
        })
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length to `len`, at most the capacity: bytes beyond the old length hold
    /// what they last held (zeroes if never written).
    ///
    /// # Panics
    /// If `len` exceeds the capacity (a caller's bug: it sized the buffer).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "DirectBuf of {} bytes cannot hold {len}",
            self.cap
        );
        self.len = len;
    }
}

impl Deref for DirectBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl DerefMut for DirectBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }
}

/// The buffer of an engine operation: ordinary heap memory, or a [`DirectBuf`]. Its bytes
/// stay where they are when the value moves (both kinds own their memory indirectly), which
/// the io_uring engine relies on while a transfer is in flight.
#[derive(Debug)]
pub enum IoBuf {
    Heap(Vec<u8>),
    Direct(DirectBuf),
}

impl Default for IoBuf {
    fn default() -> Self {
        IoBuf::Heap(Vec::new())
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(v: Vec<u8>) -> Self {
        IoBuf::Heap(v)
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            IoBuf::Heap(v) => v,
            IoBuf::Direct(d) => d,
        }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            IoBuf::Heap(v) => v,
            IoBuf::Direct(d) => d,
        }
    }
}

impl IoBuf {
    /// The bytes as a `Vec` (a heap buffer as it is; a direct one copied).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            IoBuf::Heap(v) => v,
            IoBuf::Direct(d) => d.to_vec(),
        }
    }

    /// How many bytes it can hold without a new allocation.
    pub fn capacity(&self) -> usize {
        match self {
            IoBuf::Heap(v) => v.capacity(),
            IoBuf::Direct(d) => d.capacity(),
        }
    }

    /// Sizes the buffer for a direct transfer of `len` bytes and returns where in it the
    /// transfer starts (aligned for `O_DIRECT`). A transfer of at least [`DIRECT_BUF_MIN`]
    /// gets this [`DirectBuf`] if it is one large enough, else a new one. A smaller one (or
    /// one the kernel refuses a mapping for) gets a heap buffer with an aligned start inside
    /// it ([`crate::direct::aligned`]): a direct buffer is dropped rather than held by a
    /// small transfer, so that the pooled buffers of a cycle whose chunks are mostly small
    /// do not each hold a huge page. Contents are whatever the buffer held.
    pub fn for_direct(&mut self, len: usize) -> usize {
        if len >= DIRECT_BUF_MIN {
            if let IoBuf::Direct(d) = self {
                if d.capacity() >= len {
                    d.set_len(len);
                    return 0;
                }
            }
            match DirectBuf::with_capacity(len) {
                Ok(mut d) => {
                    d.set_len(len);
                    *self = IoBuf::Direct(d);
                    return 0;
                }
                Err(e) => crate::warn_limited!(
                    std::time::Duration::from_secs(60),
                    "cannot map a {len}-byte transfer buffer ({e}); using ordinary memory"
                ),
            }
        }
        let mut v = match std::mem::take(self) {
            IoBuf::Heap(v) => v,
            IoBuf::Direct(_) => Vec::new(),
        };
        let at = crate::direct::aligned(&mut v, len);
        *self = IoBuf::Heap(v);
        at
    }

    /// Sizes the buffer to `len` bytes from its start, for a buffered transfer (a direct
    /// buffer is kept if it can hold them). Contents are whatever the buffer held.
    pub fn for_buffered(&mut self, len: usize) {
        match self {
            IoBuf::Direct(d) if d.capacity() >= len => d.set_len(len),
            IoBuf::Direct(_) => *self = IoBuf::Heap(vec![0; len]),
            IoBuf::Heap(v) => v.resize(len, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "Miri does not emulate mmap")]
    fn a_direct_buffer_starts_on_a_huge_page_and_keeps_its_bytes() {
        let mut d = DirectBuf::with_capacity(1 << 20).unwrap();
        assert_eq!(d.capacity(), HUGE);
        assert!(d.is_empty());
        d.set_len(HUGE);
        assert_eq!(d.as_ptr() as usize % HUGE, 0);
        assert!(d.iter().all(|b| *b == 0), "fresh memory reads as zeroes");
        d[..5].copy_from_slice(b"hello");
        d[HUGE - 1] = 7;
        d.set_len(3);
        assert_eq!(&d[..], b"hel");
        d.set_len(HUGE);
        assert_eq!(
            (&d[..5], d[HUGE - 1]),
            (&b"hello"[..], 7),
            "bytes keep what they held"
        );
        let big = DirectBuf::with_capacity(HUGE + 1).unwrap();
        assert_eq!(big.capacity(), 2 * HUGE);
        assert!(DirectBuf::with_capacity(usize::MAX).is_err());
    }

    #[test]
    #[should_panic(expected = "cannot hold")]
    #[cfg_attr(miri, ignore = "Miri does not emulate mmap")]
    fn a_length_past_the_capacity_is_a_bug_caught() {
        DirectBuf::with_capacity(4096).unwrap().set_len(HUGE + 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri does not emulate mmap")]
    fn sizing_reuses_what_fits_and_maps_what_does_not() {
        let mut b = IoBuf::from(vec![1u8; 10]);
        let at = b.for_direct(65536);
        assert!(
            matches!(b, IoBuf::Heap(_)),
            "a small transfer stays on the heap"
        );
        assert_eq!((b.as_ptr() as usize + at) % crate::direct::ALIGN, 0);
        assert_eq!(b.len() - at, 65536);
        assert_eq!(b.for_direct(DIRECT_BUF_MIN), 0);
        let IoBuf::Direct(d) = &b else {
            panic!("a heap buffer is replaced by a direct one")
        };
        let at = d.as_ptr();
        assert_eq!(b.len(), DIRECT_BUF_MIN);
        b.for_direct(HUGE);
        assert_eq!(
            (b.as_ptr(), b.len()),
            (at, HUGE),
            "the same mapping is reused"
        );
        b.for_direct(HUGE + 4096);
        assert_eq!(
            b.capacity(),
            2 * HUGE,
            "a larger transfer gets a larger mapping"
        );
        b.for_buffered(100);
        assert!(matches!(b, IoBuf::Direct(_)) && b.len() == 100);
        let at = b.for_direct(65536);
        assert!(
            matches!(b, IoBuf::Heap(_)),
            "a small direct transfer does not hold a huge page"
        );
        assert_eq!(b.len() - at, 65536);
        b.for_direct(HUGE);
        b.for_buffered(3 * HUGE);
        assert!(matches!(b, IoBuf::Heap(_)) && b.len() == 3 * HUGE);
        b[0] = 9;
        assert_eq!(b.into_vec()[0], 9);
        let mut d = IoBuf::default();
        d.for_direct(HUGE);
        d[..8].copy_from_slice(b"12345678");
        assert_eq!(
            &d.into_vec()[..8],
            b"12345678",
            "a direct buffer's bytes are copied out"
        );
    }
}
