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

#[cfg(test)]
mod tests {
    use super::super::tests::{initial, seeded, store, tmp};
    use super::*;
    use crate::store::Retention;

    /// A pause is saved before it is acknowledged: a failed save changes nothing (in memory
    /// or on disk), a save maybe made is settled from disk before the pause is asked again,
    /// and a reopened replica (an applier restarted) still records it; the resume ends it.
    #[test]
    fn a_pause_is_saved_before_it_counts_and_survives_a_reopen() {
        let dir = tmp();
        let s = store(dir.path(), Retention::keep_all());
        let (mut vs, _) = initial(&s, &seeded(1));
        vs.fail_save = true;
        assert!(vs.record_pause(PauseChange::Paused(1000)).is_err());
        assert_eq!(vs.replica().paused, None);
        drop(vs);
        let mut vs = s.open_vm("vm1", "primary-1").unwrap();
        assert_eq!(vs.replica().paused, None, "nothing was saved");
        // Made, but reported failed (a directory fsync that failed): asked again, the
        // store settles from disk and finds it recorded.
        vs.fail_save_after_rename = true;
        assert!(vs.record_pause(PauseChange::Paused(1000)).is_err());
        assert!(
            !vs.record_pause(PauseChange::Paused(1000)).unwrap(),
            "recorded already"
        );
        assert_eq!(vs.replica().paused, Some(1000));
        drop(vs);
        let mut vs = s.open_vm("vm1", "primary-1").unwrap();
        assert_eq!(vs.replica().paused, Some(1000), "recorded across a reopen");
        assert!(vs.record_pause(PauseChange::Resumed(0)).unwrap());
        assert_eq!(vs.replica().paused, None);
        assert!(!vs.record_pause(PauseChange::Resumed(0)).unwrap());
        drop(vs);
        let vs = s.open_vm("vm1", "primary-1").unwrap();
        assert_eq!(vs.replica().paused, None);
    }
}
