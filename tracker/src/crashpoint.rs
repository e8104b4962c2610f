//! Named crash points for tests: with `VMREPLICA_CRASH_AT=NAME` in its environment, the
//! process aborts (as kill -9 would stop it) when it reaches point `NAME`, so a test can check
//! what a crash between two exact steps leaves behind. Without the variable a crash point
//! costs one load of a cached value.
//!
//! Fail points likewise make a named I/O step fail with EIO while a test says so
//! ([`set_failing`]), for failures no real file system gives on demand.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

/// Aborts the process if `VMREPLICA_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    let at = CRASH_AT.get_or_init(|| std::env::var("VMREPLICA_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        eprintln!("VMREPLICA_CRASH_AT={point}: aborting here, as a crash would");
        std::process::abort();
    }
}

static ANY_FAILING: AtomicBool = AtomicBool::new(false);
static FAILING: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Makes [`fail_point`] `point` fail (or stop failing). For tests.
#[doc(hidden)]
pub fn set_failing(point: &str, failing: bool) {
    let mut f = FAILING.lock().unwrap_or_else(|e| e.into_inner());
    f.retain(|p| p != point);
    if failing {
        f.push(point.to_string());
    }
    ANY_FAILING.store(!f.is_empty(), Ordering::SeqCst);
}

/// EIO if a test made `point` fail; otherwise nothing (one atomic load).
pub fn fail_point(point: &str) -> io::Result<()> {
    if ANY_FAILING.load(Ordering::Relaxed)
        && FAILING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|p| p == point)
    {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}
