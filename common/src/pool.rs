//! Byte buffers kept for reuse along the data paths (read buffers, received chunk payloads,
//! buffers chunks are unpacked into). A fresh `Vec` for every chunk of a cycle would be
//! allocated, zeroed and, at the sizes a cycle moves (a chunk is up to 1 MiB), faulted in page
//! by page and handed back to the kernel again: per GiB that is a quarter of a million page
//! faults that a pool of a few dozen buffers avoids.

use std::sync::Mutex;

use crate::iobuf::IoBuf;

/// A buffer a [`BufferPool`] can keep.
pub trait Reusable: Default {
    /// Bytes it holds without a new allocation (0: not worth keeping).
    fn capacity(&self) -> usize;
}

impl Reusable for Vec<u8> {
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
}

impl Reusable for IoBuf {
    fn capacity(&self) -> usize {
        IoBuf::capacity(self)
    }
}

/// A bounded stack of spare buffers shared between threads: at most `KEPT` wait for reuse,
/// holding at most `KEPT_BYTES` of capacity together; more are freed. A taken buffer's length
/// and contents are whatever it last held: users size it (`resize` zeroes only what it grows
/// by) and overwrite what they use.
#[derive(Debug)]
pub struct BufferPool<const KEPT: usize, B = Vec<u8>, const KEPT_BYTES: usize = { usize::MAX }> {
    free: Mutex<Spare<B>>,
}

#[derive(Debug)]
struct Spare<B> {
    bufs: Vec<B>,
    /// Capacity of `bufs` together.
    bytes: usize,
}

impl<const KEPT: usize, B, const KEPT_BYTES: usize> Default for BufferPool<KEPT, B, KEPT_BYTES> {
    fn default() -> Self {
        BufferPool {
            free: Mutex::new(Spare {
                bufs: Vec::new(),
                bytes: 0,
            }),
        }
    }
}

impl<const KEPT: usize, B: Reusable, const KEPT_BYTES: usize> BufferPool<KEPT, B, KEPT_BYTES> {
    fn spare_list(&self) -> std::sync::MutexGuard<'_, Spare<B>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A spare buffer, or an empty one when none waits.
    pub fn take(&self) -> B {
        let mut s = self.spare_list();
        let b = s.bufs.pop().unwrap_or_default();
        s.bytes -= b.capacity();
        b
    }

    /// Keeps `b` for a later [`take`](Self::take), unless `KEPT` already wait, their
    /// capacity and `b`'s would pass `KEPT_BYTES`, or `b` holds no allocation: then it is
    /// dropped.
    pub fn put(&self, b: B) {
        let cap = b.capacity();
        if cap == 0 {
            return;
        }
        let mut s = self.spare_list();
        if s.bufs.len() < KEPT && s.bytes.saturating_add(cap) <= KEPT_BYTES {
            s.bytes += cap;
            s.bufs.push(b);
        }
    }

    /// Frees every spare buffer (at the end of a transfer: an idle process holds none).
    pub fn clear(&self) {
        let spare = {
            let mut s = self.spare_list();
            s.bytes = 0;
            std::mem::take(&mut s.bufs)
        };
        // Freed (unmapped) after the lock is released.
        drop(spare);
    }

    /// Buffers waiting for reuse.
    pub fn spare(&self) -> usize {
        self.spare_list().bufs.len()
    }

    /// Their capacity together.
    pub fn spare_bytes(&self) -> usize {
        self.spare_list().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_its_bound_and_hands_back_the_same_allocations() {
        let pool = BufferPool::<2>::default();
        assert!(pool.take().is_empty());
        let bufs: Vec<Vec<u8>> = (0..3).map(|i| vec![i; 4096]).collect();
        let ptrs: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
        for b in bufs {
            pool.put(b);
        }
        assert_eq!(pool.spare(), 2, "the third buffer is freed, not kept");
        pool.put(Vec::new());
        assert_eq!(pool.spare(), 2, "an empty Vec is not worth keeping");
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptrs[1], "last in, first out");
        assert_eq!(b, vec![1; 4096], "contents are left as they were");
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptrs[0]);
        assert_eq!(pool.take().capacity(), 0);
        pool.put(vec![1; 10]);
        pool.clear();
        assert_eq!((pool.spare(), pool.spare_bytes()), (0, 0), "cleared");
    }

    #[test]
    fn keeps_at_most_its_bytes() {
        let pool = BufferPool::<8, Vec<u8>, 10_000>::default();
        for _ in 0..4 {
            pool.put(Vec::with_capacity(4096));
        }
        assert_eq!(
            pool.spare(),
            2,
            "a third 4 KiB buffer would pass 10,000 bytes"
        );
        assert_eq!(pool.spare_bytes(), 8192);
        pool.put(Vec::with_capacity(1000));
        assert_eq!(
            (pool.spare(), pool.spare_bytes()),
            (3, 9192),
            "a small one still fits"
        );
        let b = pool.take();
        assert_eq!(pool.spare_bytes(), 9192 - b.capacity());
    }
}
