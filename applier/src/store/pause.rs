//! The primary's pause, as the replica records it: in the VM's cycle history (the state's
//! `ops.history`), which status reads (`paused_since`, the paused state, no missed cycles
//! while paused). Saved before the session acknowledges it, so a replica restarted while
//! paused still shows the pause.

use super::{StoreError, VmStore};
use crate::session::PauseChange;

impl VmStore {
    /// Records the primary's pause (or its end) and saves it. Telling it again changes
    /// nothing (see [`vmreplica_ops::history::History::pause_since`]). Whether anything
    /// changed; on an error nothing changed in memory.
    pub fn record_pause(&mut self, change: PauseChange) -> Result<bool, StoreError> {
        // A save before was maybe made: the state on disk decides what is recorded.
        self.settle()?;
        let now = super::apply::now();
        let mut next = self.state.clone();
        let changed = match change {
            PauseChange::Paused(since) => next.ops.history.pause_since(since, now),
            PauseChange::Resumed(at) => next.ops.history.resume_at(at, now),
        };
        if changed {
            self.commit_state(next)?;
        }
        Ok(changed)
    }
}
