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
/// more are freed. A taken buffer's length and contents are whatever it last held: users
/// size it (`resize` zeroes only what it grows by) and overwrite what they use.
#[derive(Debug)]
pub struct BufferPool<const KEPT: usize, B = Vec<u8>> {
    free: Mutex<Vec<B>>,
}

impl<const KEPT: usize, B> Default for BufferPool<KEPT, B> {
    fn default() -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
        }
    }
}

impl<const KEPT: usize, B: Reusable> BufferPool<KEPT, B> {
    /// A spare buffer, or an empty one when none waits.
    pub fn take(&self) -> B {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Keeps `b` for a later [`take`](Self::take), unless `KEPT` already wait (or it holds
    /// no allocation): then it is dropped.
    pub fn put(&self, b: B) {
        if b.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEPT {
            free.push(b);
        }
    }

    /// Frees every spare buffer (at the end of a transfer: an idle process holds none).
    pub fn clear(&self) {
        let spare = std::mem::take(&mut *self.free.lock().unwrap_or_else(|e| e.into_inner()));
        // Freed (unmapped) after the lock is released.
        drop(spare);
    }

    /// Buffers waiting for reuse.
    pub fn spare(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
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
        assert_eq!(pool.spare(), 0, "cleared");
    }
}
