//! The shipper's state file, `shipper.json` beside its lock (in the tracker's state
//! directory): what status needs across restarts (the cycle history: sizes, durations,
//! bytes, pauses, failures, the last error), whether replication is paused (a pause survives
//! a restart), and the application-consistent freezes. Versioned (`vmreplica-shipper`,
//! version 1) and written atomically; an unknown version is refused.
//!
//! Saving it is never in the way of replication, except for a pause or resume, which is
//! saved before it takes effect (an operator's pause must not silently end at a restart).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmreplica_common::{read_state, write_state, StateFileError};
use vmreplica_ops::history::History;

pub const STATE_FILE: &str = "shipper.json";
const FORMAT: &str = "vmreplica-shipper";
const VERSION: u32 = 1;
/// App-consistent freeze ids remembered (the frozen generation is among the last few).
const APP_FREEZES: usize = 8;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppState {
    /// Ids of freezes made with the guest's filesystems frozen, newest last.
    #[serde(default)]
    pub freezes: Vec<u64>,
    /// The last one: generation, when (seconds since the epoch), how long the guest was
    /// frozen (ms).
    #[serde(default)]
    pub last_generation: Option<u64>,
    #[serde(default)]
    pub last_at: Option<u64>,
    #[serde(default)]
    pub last_frozen_ms: Option<u64>,
    /// The last attempt that failed (the point was crash-consistent).
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at: Option<u64>,
}

impl AppState {
    pub fn record(&mut self, freeze: u64, generation: u64, at: u64, frozen_ms: u64) {
        self.freezes.push(freeze);
        if self.freezes.len() > APP_FREEZES {
            self.freezes.remove(0);
        }
        self.last_generation = Some(generation);
        self.last_at = Some(at);
        self.last_frozen_ms = Some(frozen_ms);
    }

    pub fn is_app_consistent(&self, freeze: u64) -> bool {
        self.freezes.contains(&freeze)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShipperState {
    pub vm: String,
    #[serde(default)]
    pub history: History,
    #[serde(default)]
    pub app: AppState,
    /// Replication stopped on an error that needs an operator (cleared when it goes on).
    #[serde(default)]
    pub stopped: Option<String>,
    /// When an operator asked for a checksum resync (`vmreplica resync`), until a resync
    /// cycle is applied: the tracker's "resync required" is then the operator's, not
    /// tracking lost. Added within version 1 (absent: none asked).
    #[serde(default)]
    pub resync_requested: Option<u64>,
}

/// Where the state of the shipper of the tracker at `control_socket` lives.
pub fn path_for(control_socket: &Path) -> PathBuf {
    crate::lock::dir_of(control_socket).join(STATE_FILE)
}

impl ShipperState {
    pub fn load(path: &Path) -> Result<Option<ShipperState>, StateFileError> {
        read_state(path, FORMAT, VERSION)
    }

    pub fn save(&self, path: &Path) -> Result<(), StateFileError> {
        write_state(path, FORMAT, VERSION, self)
    }

    pub fn paused(&self) -> bool {
        self.history.paused()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        assert_eq!(ShipperState::load(&p).unwrap(), None);
        let mut s = ShipperState {
            vm: "vm1".into(),
            ..ShipperState::default()
        };
        s.history.pause(100);
        for i in 0..10 {
            s.app.record(i, i + 1, 1000 + i, 3);
        }
        s.save(&p).unwrap();
        let back = ShipperState::load(&p).unwrap().unwrap();
        assert!(back.paused());
        assert_eq!(back.app.freezes.len(), APP_FREEZES);
        assert!(back.app.is_app_consistent(9) && !back.app.is_app_consistent(0));
        assert_eq!(back, s);
        std::fs::write(
            &p,
            r#"{"format":"vmreplica-shipper","version":9,"state":{"vm":"vm1"}}"#,
        )
        .unwrap();
        let e = ShipperState::load(&p).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
    }
}
