//! A connection's pool of write payload buffers, so that a small write in steady state costs
//! no `malloc` and no `free`.
//!
//! glibc serves a 4 KiB block from its bins rather than from a per-thread cache, and giving it
//! back often merges it into the heap's top only to split it off again: callgrind counted about
//! 1,000 instructions per 4 KiB write in allocating and freeing its payload, a sixth of the
//! server's user-space instructions for that write.
//!
//! The pool lives on a connection's reader thread, only while it serves the connection
//! ([`PoolGuard`]): the reader takes a buffer for each write's payload ([`take`]), and a device
//! that is done with the payload on that same thread (the tracker writes small payloads with a
//! `pwrite` right there) hands it back ([`recycle`]). A buffer dropped anywhere else (a device's
//! completion thread) is simply freed, and [`recycle`] on a thread without a pool frees it too.
//!
//! Bounded: at most [`POOL_MAX_BUFFERS`] buffers, none of more than [`POOL_MAX_BUFFER`] bytes of
//! capacity (larger ones are freed, never kept), so a connection's pool holds at most
//! `POOL_MAX_BUFFERS * POOL_MAX_BUFFER` = 256 KiB, whatever sizes the client writes; and it
//! is freed when the connection ends.

use std::cell::RefCell;

/// Most buffers a connection's pool keeps. A payload is handed back on the reader thread right
/// after its write, so one or two are in use at a time; a few more cover sizes that alternate.
pub const POOL_MAX_BUFFERS: usize = 4;
/// Largest capacity a pooled buffer may have (the tracker's inline writes go up to 64 KiB).
pub const POOL_MAX_BUFFER: usize = 64 << 10;

thread_local! {
    static POOL: RefCell<Option<Vec<Vec<u8>>>> = const { RefCell::new(None) };
}

/// Keeps a pool on this thread while it lives; the pool (and every buffer in it) is freed when
/// it is dropped.
pub(crate) struct PoolGuard(());

impl PoolGuard {
    pub(crate) fn start() -> PoolGuard {
        POOL.with(|p| *p.borrow_mut() = Some(Vec::with_capacity(POOL_MAX_BUFFERS)));
        PoolGuard(())
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        // `try_with`: the thread-local may be gone already if the thread is exiting.
        let _ = POOL.try_with(|p| p.borrow_mut().take());
    }
}

/// An empty buffer with room for at least `n` bytes: a pooled one when one is large enough
/// (the most recently returned first: its memory is the warmest), else a new one.
pub(crate) fn take(n: usize) -> Vec<u8> {
    if n <= POOL_MAX_BUFFER {
        let pooled = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let p = p.as_mut()?;
            let i = p.iter().rposition(|b| b.capacity() >= n)?;
            Some(p.swap_remove(i))
        });
        if let Some(b) = pooled {
            return b;
        }
    }
    Vec::with_capacity(n)
}

/// A payload buffer (pooled on a connection's reader thread) holding a copy of `data`.
pub fn copy_of(data: &[u8]) -> Vec<u8> {
    let mut b = take(data.len());
    b.extend_from_slice(data);
    b
}

/// Hands a write's payload back once the device is done with it. On a connection's reader
/// thread it is kept for the next write (if small enough and the pool has room; when full, it
/// replaces a smaller buffer, so the pool follows the sizes in use); anywhere else it is freed.
pub fn recycle(mut buf: Vec<u8>) {
    let cap = buf.capacity();
    if cap == 0 || cap > POOL_MAX_BUFFER {
        return;
    }
    buf.clear();
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        let Some(p) = p.as_mut() else {
            return;
        };
        if p.len() < POOL_MAX_BUFFERS {
            p.push(buf);
        } else if let Some(smallest) = p.iter_mut().min_by_key(|b| b.capacity()) {
            if smallest.capacity() < cap {
                *smallest = buf;
            }
        }
    });
}

/// Buffers and bytes of capacity this thread's pool holds now.
#[cfg(test)]
pub(crate) fn held() -> (usize, usize) {
    POOL.with(|p| {
        p.borrow()
            .as_ref()
            .map_or((0, 0), |p| (p.len(), p.iter().map(|b| b.capacity()).sum()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_write_reuses_its_buffer() {
        let _g = PoolGuard::start();
        let b = take(4096);
        let ptr = b.as_ptr();
        recycle(b);
        assert_eq!(held(), (1, 4096));
        let b = take(4096);
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer is handed out again");
        assert!(b.is_empty() && b.capacity() >= 4096);
        // Smaller requests may use it too; a larger one gets a new buffer.
        recycle(b);
        let small = take(512);
        assert_eq!(small.as_ptr(), ptr);
        assert_eq!(held(), (0, 0));
    }

    #[test]
    fn a_burst_of_large_writes_leaves_the_pool_within_its_cap() {
        let _g = PoolGuard::start();
        let cap = POOL_MAX_BUFFERS * POOL_MAX_BUFFER;
        // Many buffers in flight at once, of every size from tiny to 4 MiB, all handed back.
        let sizes = [512, 4096, 65536, 65537, 1 << 20, 4 << 20, 128 << 10, 4096];
        let bufs: Vec<Vec<u8>> = (0..24)
            .map(|i| {
                let mut b = take(sizes[i % sizes.len()]);
                b.push(1);
                b
            })
            .collect();
        for b in bufs {
            recycle(b);
            let (n, bytes) = held();
            assert!(n <= POOL_MAX_BUFFERS, "{n} buffers pooled");
            assert!(bytes <= cap, "{bytes} bytes pooled, more than {cap}");
        }
        // Nothing larger than the per-buffer limit was kept.
        assert!(POOL.with(|p| p
            .borrow()
            .as_ref()
            .unwrap()
            .iter()
            .all(|b| b.capacity() <= POOL_MAX_BUFFER && b.is_empty())));
        // A write larger than any pooled buffer gets its own, and it is not kept.
        let big = take(1 << 20);
        assert!(big.capacity() >= 1 << 20);
        recycle(big);
        assert!(held().1 <= cap);
    }

    #[test]
    fn without_a_pool_buffers_are_freed_and_the_pool_ends_with_its_connection() {
        recycle(vec![0u8; 4096]);
        assert_eq!(held(), (0, 0));
        {
            let _g = PoolGuard::start();
            recycle(Vec::with_capacity(4096));
            assert_eq!(held().0, 1);
        }
        assert_eq!(held(), (0, 0));
        // Another thread's buffers never enter this thread's pool.
        let _g = PoolGuard::start();
        std::thread::spawn(|| recycle(Vec::with_capacity(4096)))
            .join()
            .unwrap();
        assert_eq!(held(), (0, 0));
    }
}
