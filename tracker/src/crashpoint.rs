//! Named crash points for tests: with `VMREPLICA_CRASH_AT=NAME` in its environment, the
//! process aborts (as kill -9 would stop it) when it reaches point `NAME`, so a test can check
//! what a crash between two exact steps leaves behind. Without the variable a crash point
//! costs one load of a cached value.

use std::sync::OnceLock;

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

/// Aborts the process if `VMREPLICA_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    let at = CRASH_AT.get_or_init(|| std::env::var("VMREPLICA_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        eprintln!("VMREPLICA_CRASH_AT={point}: aborting here, as a crash would");
        std::process::abort();
    }
}
