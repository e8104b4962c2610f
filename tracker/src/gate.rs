//! A gate that counts in-flight writes and can be closed to drain them, so a freeze sees no
//! write half-done.
//!
//! Every write passes it twice, so it wakes only threads that wait: a condition variable's
//! notify is a system call (futex) even with nobody waiting, and with writes done inline one
//! at a time the count drops to zero on every write, so that was one futex per write.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    inflight: u64,
    closed: bool,
    /// Threads waiting in `enter` or `close`.
    waiters: u32,
}

#[cfg(test)]
thread_local! {
    /// Wakeups (condition variable notifies) this thread made, for the tests.
    static WAKES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
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

    fn wait<'a>(&self, mut s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        s.waiters += 1;
        s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        s.waiters -= 1;
        s
    }

    /// Wakes the waiting threads, if any.
    fn wake(&self, s: &State) {
        if s.waiters > 0 {
            #[cfg(test)]
            WAKES.with(|w| w.set(w.get() + 1));
            self.cv.notify_all();
        }
    }

    /// Waits while the gate is closed, then counts one more write in flight.
    #[cfg(test)]
    pub fn enter(&self) {
        self.enter_with(|| {})
    }

    /// Waits while the gate is closed, then counts one more write in flight; with
    /// `before_waiting` run first (outside the gate's lock) if the gate is closed: a
    /// connection's reader thread sends the replies it holds back before it waits, so
    /// requests already done are not held up by a freeze.
    pub fn enter_with(&self, before_waiting: impl FnOnce()) {
        let mut s = self.lock();
        if s.closed {
            drop(s);
            before_waiting();
            s = self.lock();
        }
        while s.closed {
            s = self.wait(s);
        }
        s.inflight += 1;
    }

    pub fn exit(&self) {
        let mut s = self.lock();
        s.inflight -= 1;
        if s.inflight == 0 {
            self.wake(&s);
        }
    }

    /// Closes the gate and waits until no write is in flight. Callers serialise closes.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        while s.inflight > 0 {
            s = self.wait(s);
        }
    }

    pub fn open(&self) {
        let mut s = self.lock();
        s.closed = false;
        self.wake(&s);
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

    #[test]
    fn a_writer_about_to_wait_at_a_closed_gate_runs_its_hook_first() {
        let g = Arc::new(Gate::default());
        let mut ran = false;
        g.enter_with(|| ran = true);
        g.exit();
        assert!(!ran, "the hook ran at an open gate");
        g.close();
        let (tx, rx) = std::sync::mpsc::channel();
        let g2 = Arc::clone(&g);
        let t = std::thread::spawn(move || {
            g2.enter_with(|| tx.send(()).unwrap());
            g2.exit();
        });
        // The hook runs while the gate is still closed, not once it opens.
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the hook did not run before waiting");
        g.open();
        t.join().unwrap();
    }

    #[test]
    fn writes_nobody_waits_for_wake_nobody() {
        let g = Gate::default();
        let before = WAKES.with(|w| w.get());
        for _ in 0..100 {
            g.enter();
            g.exit();
        }
        g.close();
        g.open();
        assert_eq!(
            WAKES.with(|w| w.get()) - before,
            0,
            "a notify (a futex system call) with no thread waiting"
        );
    }
}
