//! A few threads that serve a test failover's reads, so one NBD connection has several in
//! flight (the driver reads the next request while they run; replies go out as they
//! complete). Dropped with the test failover: its threads end when the queue closes.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

pub struct Pool {
    tx: Mutex<Option<Sender<Job>>>,
}

impl Pool {
    /// `threads` workers (at least one).
    pub fn new(name: &str, threads: usize) -> std::io::Result<Arc<Pool>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Arc::new(Pool {
            tx: Mutex::new(Some(tx)),
        }))
    }

    /// Runs `job` on a worker; on this thread if the pool is closed.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(Box::new(job)) {
                    job()
                }
            }
            None => job(),
        }
    }

    /// Stops taking jobs: the workers end once the queue is empty.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
