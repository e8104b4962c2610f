//! A gate that counts in-flight writes and can be closed to drain them, so a freeze sees no
//! write half-done.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    inflight: u64,
    closed: bool,
}

#[derive(Default)]
pub struct Gate {
    state: Mutex<State>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the gate is closed, then counts one more write in flight.
    pub fn enter(&self) {
        let mut s = self.lock();
        while s.closed {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.inflight += 1;
    }

    pub fn exit(&self) {
        let mut s = self.lock();
        s.inflight -= 1;
        if s.inflight == 0 {
            self.cv.notify_all();
        }
    }

    /// Closes the gate and waits until no write is in flight. Callers serialise closes.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        while s.inflight > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn open(&self) {
        self.lock().closed = false;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn close_waits_for_inflight_and_blocks_new_entries() {
        let g = Arc::new(Gate::default());
        g.enter();
        let closed = Arc::new(AtomicBool::new(false));
        let (g2, c2) = (Arc::clone(&g), Arc::clone(&closed));
        let t = std::thread::spawn(move || {
            g2.close();
            c2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !closed.load(Ordering::SeqCst),
            "close returned with a write in flight"
        );
        g.exit();
        t.join().unwrap();
        assert!(closed.load(Ordering::SeqCst));
        let entered = Arc::new(AtomicBool::new(false));
        let (g3, e3) = (Arc::clone(&g), Arc::clone(&entered));
        let t = std::thread::spawn(move || {
            g3.enter();
            e3.store(true, Ordering::SeqCst);
            g3.exit();
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "entered a closed gate");
        g.open();
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
