//! The lineage rules on the replica side, as one pure function: which cycles a replica
//! accepts, and whether a cycle continues the one it holds in part.
//!
//! - An empty replica (no point yet) accepts an initial copy with any lineage and number.
//! - A replica of lineage R accepts a delta cycle of R only as `last + 1`, and a resync of R
//!   with any number `> last`; it refuses an initial copy (that would replace it) and any
//!   other lineage.
//! - A replica without a lineage (written before lineages existed) accepts only a resync.
//! - A site the VM failed over to (primary now) refuses every cycle, naming the point it
//!   failed over at and the commands that replicate back or resolve a split brain.
//! - A replica waiting for a reverse cycle takes only a `Reverse` cycle that continues the
//!   point it waits at (and is numbered after it); an ordinary replica takes no `Reverse`.
//!
//! A refusal says why and what to do, and never changes the replica. The session checks
//! these before it asks the store to start a cycle, and the store checks them again.

use vmreplica_common::lineage::{show, Lineage};
use vmreplica_common::wire::{CycleKind, LineagePoint, Receiving, Role};

/// What the rules need to know of a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    pub lineage: Option<Lineage>,
    pub last_cycle: u64,
    /// The freeze id of the last cycle (0: unknown).
    pub last_freeze: u64,
    /// Whether it holds a recovery point (an empty replica holds none).
    pub has_points: bool,
    pub receiving: Option<Receiving>,
    /// What the site is for the VM.
    pub role: Role,
    /// The primary's pause the replica records (since, the primary's clock), for the
    /// welcome: not a lineage matter.
    pub paused: Option<u64>,
}

pub use vmreplica_common::wire::failed_over_message;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The cycle is the one held in part: go on where it stopped.
    Continue,
    /// A new cycle: whatever is held in part is rolled back first.
    Fresh,
}

/// Whether replica `r` of VM `vm` takes cycle `cycle` of `lineage`, of kind `kind`, frozen
/// as freeze `freeze` (the cycle held in part continues only if it is the same freeze).
pub fn decide(
    vm: &str,
    r: &Replica,
    lineage: Lineage,
    cycle: u64,
    kind: CycleKind,
    freeze: u64,
    parent: Option<LineagePoint>,
) -> Result<Decision, String> {
    let nothing = "nothing on the replica was changed";
    if cycle == 0 || cycle > vmreplica_common::wire::MAX_CYCLE {
        return Err(format!("VM {vm}: cycle {cycle} is out of range; {nothing}"));
    }
    if let Some(m) = failed_over_message(vm, &r.role) {
        return Err(m);
    }
    if let Role::ReversePending { parent: want } = r.role {
        let given = match parent {
            Some(p) => p.to_string(),
            None => "no point".to_string(),
        };
        if kind != CycleKind::Reverse || parent != Some(want) || cycle <= want.cycle {
            return Err(format!(
                "VM {vm}: this site waits for the reverse cycle from the new primary, which \
                 continues {want}; a {} cycle ({cycle} of lineage {lineage}, continuing {given}) \
                 is refused; {nothing}",
                kind.name()
            ));
        }
    } else if kind == CycleKind::Reverse {
        return Err(format!(
            "VM {vm}: reverse cycle {cycle} of lineage {lineage}, but this replica (lineage {}, \
             cycle {}) does not wait for one; {nothing}",
            show(r.lineage),
            r.last_cycle
        ));
    } else if !r.has_points && r.lineage.is_none() {
        if kind != CycleKind::Initial {
            return Err(format!(
                "VM {vm}: the replica is empty, so it needs an initial copy, not a {} cycle \
                 ({cycle} of lineage {lineage}); {nothing}",
                kind.name()
            ));
        }
    } else if let Some(have) = r.lineage.filter(|have| *have != lineage) {
        return Err(format!(
            "VM {vm}: the primary sends cycle {cycle} of lineage {lineage}, but the replica \
             holds lineage {have} (up to cycle {}): they are not one history of this VM (a \
             different primary or tracker, or a restored one); {nothing}. To replace the \
             replica with this primary's disks, stop the applier, remove the VM's directory \
             from the store and let the shipper make a new initial copy",
            r.last_cycle
        ));
    } else {
        match kind {
            CycleKind::Initial => {
                return Err(format!(
                    "VM {vm}: the replica already holds cycle {} of lineage {}; an initial copy \
                     would replace it, so it is refused ({nothing}). The shipper resyncs by \
                     checksums instead; to start over, remove the VM's directory from the store",
                    r.last_cycle,
                    show(r.lineage)
                ))
            }
            CycleKind::Delta if r.lineage.is_none() => {
                return Err(format!(
                    "VM {vm}: the replica has no lineage (an older store): only a resync can \
                     continue it; {nothing}"
                ))
            }
            CycleKind::Delta if cycle != r.last_cycle + 1 => {
                return Err(format!(
                    "VM {vm}: delta cycle {cycle} of lineage {lineage} does not follow the \
                     replica's last cycle {} (it must be {}): applying it would leave the \
                     replica silently different from the primary; {nothing}. The shipper must \
                     resync by checksums",
                    r.last_cycle,
                    r.last_cycle + 1
                ))
            }
            CycleKind::Resync if cycle <= r.last_cycle => {
                return Err(format!(
                    "VM {vm}: resync cycle {cycle} of lineage {lineage} is not after the \
                     replica's last cycle {}; {nothing}",
                    r.last_cycle
                ))
            }
            _ => {}
        }
    }
    let same = Receiving {
        lineage,
        cycle,
        kind,
        freeze,
    };
    Ok(if r.receiving == Some(same) {
        Decision::Continue
    } else {
        Decision::Fresh
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Lineage = Lineage([0xa; 16]);
    const B: Lineage = Lineage([0xb; 16]);

    fn at(lineage: Option<Lineage>, last: u64) -> Replica {
        Replica {
            lineage,
            last_cycle: last,
            last_freeze: 0,
            has_points: last > 0,
            receiving: None,
            role: Role::Replica,
            paused: None,
        }
    }

    #[test]
    fn cycle_numbers_out_of_range_are_refused() {
        use CycleKind::*;
        let max = vmreplica_common::wire::MAX_CYCLE;
        for c in [0, max + 1, u64::MAX] {
            let e = decide("vm1", &at(None, 0), A, c, Initial, 1, None).unwrap_err();
            assert!(e.contains("out of range") && e.contains("vm1"), "{e}");
        }
        assert_eq!(
            decide("vm1", &at(None, 0), A, max, Initial, 1, None),
            Ok(Decision::Fresh)
        );
        // The replica at the highest cycle: the next delta is refused, never an overflow.
        assert!(decide("vm1", &at(Some(A), max), A, max + 1, Delta, 1, None).is_err());
    }

    #[test]
    fn gaps_other_lineages_and_replacing_copies_are_refused() {
        use CycleKind::*;
        let empty = at(None, 0);
        assert_eq!(
            decide("vm1", &empty, A, 7, Initial, 1, None),
            Ok(Decision::Fresh)
        );
        assert!(decide("vm1", &empty, A, 7, Delta, 1, None)
            .unwrap_err()
            .contains("empty"));
        let r = at(Some(A), 5);
        assert_eq!(decide("vm1", &r, A, 6, Delta, 1, None), Ok(Decision::Fresh));
        // A gap (N+2 after N), an old cycle, the same one again.
        for c in [7, 8, 5, 4] {
            let e = decide("vm1", &r, A, c, Delta, 1, None).unwrap_err();
            assert!(e.contains("must be 6") && e.contains("vm1"), "{e}");
        }
        assert_eq!(
            decide("vm1", &r, A, 9, Resync, 1, None),
            Ok(Decision::Fresh)
        );
        assert!(decide("vm1", &r, A, 5, Resync, 1, None).is_err());
        let e = decide("vm1", &r, A, 9, Initial, 1, None).unwrap_err();
        assert!(e.contains("would replace it"), "{e}");
        let e = decide("vm1", &r, B, 6, Delta, 1, None).unwrap_err();
        assert!(
            e.contains(&A.to_string()) && e.contains(&B.to_string()),
            "{e}"
        );
        assert!(e.contains("nothing on the replica was changed"), "{e}");
        // No lineage (an older store): only a resync.
        let old = Replica {
            lineage: None,
            last_cycle: 3,
            last_freeze: 0,
            has_points: true,
            receiving: None,
            role: Role::Replica,
            paused: None,
        };
        assert!(decide("vm1", &old, A, 4, Delta, 1, None).is_err());
        assert_eq!(
            decide("vm1", &old, A, 4, Resync, 1, None),
            Ok(Decision::Fresh)
        );
        assert!(decide("vm1", &r, A, 0, Resync, 1, None).is_err());
    }

    #[test]
    fn the_cycle_held_in_part_continues_anything_else_starts_fresh() {
        let mut r = at(Some(A), 5);
        r.receiving = Some(Receiving {
            lineage: A,
            cycle: 6,
            kind: CycleKind::Delta,
            freeze: 66,
        });
        let d = |c, k, f| decide("vm1", &r, A, c, k, f, None);
        assert_eq!(d(6, CycleKind::Delta, 66), Ok(Decision::Continue));
        // Same number, another freeze (an older tracker state restored, then frozen again):
        // other contents, so fresh.
        assert_eq!(d(6, CycleKind::Delta, 67), Ok(Decision::Fresh));
        // Same number, another kind (a resync after the tracker lost its state): fresh.
        assert_eq!(d(6, CycleKind::Resync, 66), Ok(Decision::Fresh));
        assert_eq!(d(7, CycleKind::Resync, 1), Ok(Decision::Fresh));
    }

    /// A site the VM failed over to refuses the old primary's every cycle, naming the point
    /// and the commands; a replica waiting for a reverse cycle takes only the one continuing
    /// its point, and an ordinary replica takes no reverse cycle.
    #[test]
    fn failed_over_sites_refuse_and_reverse_cycles_must_continue_the_point() {
        use CycleKind::*;
        let p = LineagePoint {
            lineage: A,
            cycle: 5,
        };
        for role in [
            Role::FailedOver {
                lineage: B,
                parent: p,
            },
            Role::Primary {
                lineage: B,
                parent: p,
            },
        ] {
            let r = Replica {
                role,
                ..at(Some(A), 5)
            };
            for (k, c) in [(Delta, 6), (Resync, 9), (Reverse, 9), (Initial, 9)] {
                let e = decide("vm1", &r, A, c, k, 1, Some(p)).unwrap_err();
                for want in [
                    "VM vm1 failed over to this site at cycle 5 of lineage",
                    "vmreplica reverse vm1",
                    "--discard-local-changes",
                    "vmreplica failover abandon vm1",
                    "split brain",
                ] {
                    assert!(e.contains(want), "{want}: {e}");
                }
                assert_eq!(
                    e.contains("vmreplica failover commit vm1"),
                    matches!(role, Role::FailedOver { .. }),
                    "{e}"
                );
            }
        }
        let r = Replica {
            role: Role::ReversePending { parent: p },
            ..at(Some(A), 5)
        };
        assert_eq!(
            decide("vm1", &r, B, 8, Reverse, 1, Some(p)),
            Ok(Decision::Fresh)
        );
        // Continuing the point in the same lineage (an abandoned failover) is a reverse too.
        assert_eq!(
            decide("vm1", &r, A, 8, Reverse, 1, Some(p)),
            Ok(Decision::Fresh)
        );
        let other = LineagePoint {
            lineage: A,
            cycle: 4,
        };
        for (k, c, parent) in [
            (Delta, 6, None),
            (Resync, 8, None),
            (Reverse, 8, None),
            (Reverse, 8, Some(other)),
            (Reverse, 5, Some(p)),
        ] {
            let e = decide("vm1", &r, B, c, k, 1, parent).unwrap_err();
            assert!(e.contains("waits for the reverse cycle"), "{e}");
        }
        let e = decide("vm1", &at(Some(A), 5), B, 8, Reverse, 1, Some(p)).unwrap_err();
        assert!(e.contains("does not wait for one"), "{e}");
    }
}
