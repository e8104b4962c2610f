//! Fallback engine: blocking positional I/O on a few threads.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{
    complete, into_completion, mark_completion_thread, run_blocking, Callback, Engine, Op, Rejected,
};

pub struct PoolEngine {
    tx: Mutex<Option<Sender<(Op, Callback)>>>,
    threads: Vec<JoinHandle<()>>,
}

impl PoolEngine {
    pub fn new(threads: usize) -> Self {
        let (tx, rx) = channel::<(Op, Callback)>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("io-pool-{i}"))
                    .spawn(move || loop {
                        mark_completion_thread();
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((mut op, done)) = job else { return };
                        let result = run_blocking(&mut op, 0);
                        complete(done, into_completion(op, result));
                    })
                    .expect("spawning an I/O thread")
            })
            .collect();
        PoolEngine {
            tx: Mutex::new(Some(tx)),
            threads,
        }
    }
}

impl Engine for PoolEngine {
    fn try_submit(&self, op: Op, done: Callback) -> Result<(), Rejected> {
        let stopped = || std::io::Error::other("I/O engine stopped");
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        match tx {
            Some(tx) => tx.send((op, done)).map_err(|e| {
                let (op, done) = e.0;
                Rejected {
                    error: stopped(),
                    op,
                    done,
                }
            }),
            None => Err(Rejected {
                error: stopped(),
                op,
                done,
            }),
        }
    }

    fn name(&self) -> &'static str {
        "thread-pool"
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        if let Ok(mut t) = self.tx.lock() {
            t.take();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
