//! The primary's pause, as the replica's session takes it: `Paused { since }` and
//! `Resumed { at }` are handed to the store, which records them in the VM's history and
//! saves it; only then is the answer `PauseNoted` sent, with the pause the replica records
//! now. Told what the replica records already (an answer lost with its connection), the
//! session answers at once without the store. An empty replica records no pause: there is
//! nothing of the VM here yet, and a pause must not create its replica.

use vmreplica_common::wire::{code, Message};

use super::{error, ApplierSession, ConnId, Pending};
use crate::rules::Replica;

/// A pause or resume of the primary, as the replica records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseChange {
    /// Paused since (seconds since the epoch, the primary's clock).
    Paused(u64),
    /// Resumed at (seconds since the epoch, the primary's clock; 0: unknown).
    Resumed(u64),
}

impl ApplierSession {
    pub(super) fn pause_change(&mut self, conn: ConnId, change: PauseChange) {
        let recorded = self.replica.paused;
        let held = match change {
            PauseChange::Paused(since) => recorded == Some(since),
            PauseChange::Resumed(_) => recorded.is_none(),
        };
        if held {
            return self.send(conn, Message::PauseNoted { paused: recorded });
        }
        let r = &self.replica;
        let empty =
            r.lineage.is_none() && r.last_cycle == 0 && !r.has_points && r.receiving.is_none();
        if empty && matches!(change, PauseChange::Paused(_)) {
            let m = format!(
                "VM {}: the replica holds nothing yet, so it records no pause (the first \
                 cycle after the resume begins the initial copy)",
                self.vm
            );
            return self.send(conn, error(code::NOT_ALLOWED, m));
        }
        self.pending = Some(Pending::Other);
        self.actions
            .push_back(super::Action::RecordPause { conn, change });
    }

    pub(super) fn pause_recorded(
        &mut self,
        conn: ConnId,
        result: Result<(), (u16, String)>,
        replica: Replica,
    ) {
        self.end_other();
        self.set_replica(replica);
        match result {
            Ok(()) => self.send(
                conn,
                Message::PauseNoted {
                    paused: self.replica.paused,
                },
            ),
            Err((c, m)) => self.send(conn, error(c, m)),
        }
    }
}
