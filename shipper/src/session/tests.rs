//! The primary-side session's tests: resume pages, lost acknowledgements, failover.
use super::*;
use vmreplica_common::wire::resume_pages;

pub(super) const L: Lineage = Lineage([4; 16]);

pub(super) fn drain(s: &mut ShipperSession) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

pub(super) fn view(frozen: Option<Frozen>, next: u64) -> TrackerView {
    TrackerView {
        lineage: Some(L),
        next_generation: next,
        frozen,
        resync_required: false,
        parent: None,
        sealed: false,
        disks: vec![DiskInfo {
            name: "sys".into(),
            size: 1 << 40,
            granularity: 65536,
        }],
    }
}

/// A session connected to a replica at cycle 9 of L, whose tracker holds `frozen`.
fn connected(frozen: Option<Frozen>, last_freeze: u64) -> (ShipperSession, Instant) {
    connected_with(frozen, last_freeze, None, None)
}

/// [`connected`], the session holding definition `mine`, the replica `theirs`.
fn connected_with(
    frozen: Option<Frozen>,
    last_freeze: u64,
    mine: Option<Definition>,
    theirs: Option<DefinitionHash>,
) -> (ShipperSession, Instant) {
    let now = Instant::now();
    let mut s = ShipperSession::new(
        Config {
            vm: "vm1".into(),
            interval: Some(Duration::from_secs(60)),
            initial_sync_at: None,
            planned: None,
            paused: None,
            resumed_at: 0,
        },
        now,
    );
    s.set_definition(mine);
    s.handle(Event::Tick, now);
    assert_eq!(drain(&mut s), vec![Action::Tracker(TrackerOp::Status)]);
    s.handle(Event::Tracker(Ok(view(frozen, 11))), now);
    assert_eq!(drain(&mut s), vec![Action::Connect { attempt: 1 }]);
    s.handle(Event::Connected { attempt: 1 }, now);
    assert!(matches!(
        &drain(&mut s)[..],
        [Action::Send {
            msg: Message::Hello { .. },
            ..
        }]
    ));
    s.handle(
        Event::Message {
            attempt: 1,
            msg: Message::Welcome {
                paused: None,
                version: PROTOCOL_VERSION,
                lineage: Some(L),
                last_cycle: 9,
                last_freeze,
                receiving: None,
                definition: theirs,
                role: Role::Replica,
            },
        },
        now,
    );
    (s, now)
}

/// A resume answer far beyond one frame's worth (300,000 ranges, where one frame holds
/// about 190,000 chunks' worth) arrives in pages; what is already applied is not sent
/// again, and the manifest covers both.
#[test]
fn a_huge_resume_is_taken_in_pages_and_only_the_rest_is_sent() {
    let f = Frozen {
        generation: 10,
        id: 77,
        full: false,
        baseline: false,
    };
    let (mut s, now) = connected(Some(f), 5);
    let acts = drain(&mut s);
    assert!(
        matches!(
            &acts[..],
            [Action::Send {
                msg: Message::BeginCycle {
                    cycle: 10,
                    freeze: 77,
                    kind: CycleKind::Delta,
                    ..
                },
                ..
            }]
        ),
        "{acts:?}"
    );
    let mut applied = RangeSet::new();
    let mut planned = RangeSet::new();
    for i in 0..400_000u64 {
        planned.insert(0, i * 131072, i * 131072 + 65536);
        if i % 4 != 0 {
            applied.insert(0, i * 131072, i * 131072 + 65536);
        }
    }
    let pages = resume_pages(L, 10, 3, &applied);
    assert!(pages.len() >= 3);
    for p in pages {
        s.handle(Event::Message { attempt: 1, msg: p }, now);
    }
    let acts = drain(&mut s);
    assert_eq!(
        acts,
        vec![Action::Plan {
            attempt: 1,
            generation: 10,
            freeze: 77,
            kind: CycleKind::Delta
        }]
    );
    s.handle(
        Event::Planned {
            attempt: 1,
            result: Ok(planned.clone()),
        },
        now,
    );
    let acts = drain(&mut s);
    let [Action::SendData { ranges, tag, .. }] = &acts[..] else {
        panic!("{acts:?}");
    };
    assert_eq!((tag.cycle, tag.epoch), (10, 3));
    assert_eq!(ranges.len(), 100_000, "only what the replica lacks is sent");
    s.handle(
        Event::Sent {
            attempt: 1,
            result: Ok(()),
        },
        now,
    );
    match &drain(&mut s)[..] {
        [Action::Send {
            msg:
                Message::Manifest {
                    ranges,
                    bytes,
                    digest,
                    epoch: 3,
                    ..
                },
            ..
        }] => assert_eq!(
            (*ranges, *bytes, *digest),
            (planned.len() as u64, planned.bytes(), planned.digest())
        ),
        other => panic!("{other:?}"),
    }
}

/// The frozen generation is the replica's last cycle: released with the replica's proof
/// only if it is the very freeze the replica applied; another freeze of that number (an
/// older tracker state restored) is merged and resynced, never released.
#[test]
fn a_lost_acknowledgement_is_released_only_for_the_same_freeze() {
    let f = Frozen {
        generation: 9,
        id: 42,
        full: false,
        baseline: false,
    };
    let (mut s, _) = connected(Some(f), 42);
    assert_eq!(
        drain(&mut s),
        vec![Action::Tracker(TrackerOp::Release {
            generation: 9,
            proof: (L, 9, 42)
        })]
    );
    // Another freeze numbered 9 (an older tracker state): a resync, decided durably (the
    // tracker's resync flags) before the frozen generation is merged.
    let (mut s, now) = connected(Some(f), 41);
    assert_eq!(drain(&mut s), vec![Action::Tracker(TrackerOp::MarkResync)]);
    let mut marked = view(Some(f), 10);
    marked.resync_required = true;
    s.handle(Event::Tracker(Ok(marked)), now);
    assert_eq!(
        drain(&mut s),
        vec![Action::Tracker(TrackerOp::Merge { generation: 9 })]
    );
}

/// A session through hello with a replica whose welcome says `role`, its tracker `view`.
fn greeted(view_: TrackerView, role: Role, last: u64) -> ShipperSession {
    let now = Instant::now();
    let mut s = ShipperSession::new(
        Config {
            vm: "vm1".into(),
            interval: Some(Duration::from_secs(60)),
            initial_sync_at: None,
            planned: None,
            paused: None,
            resumed_at: 0,
        },
        now,
    );
    s.handle(Event::Tick, now);
    s.handle(Event::Tracker(Ok(view_)), now);
    s.handle(Event::Connected { attempt: 1 }, now);
    drain(&mut s);
    s.handle(
        Event::Message {
            attempt: 1,
            msg: Message::Welcome {
                paused: None,
                version: PROTOCOL_VERSION,
                lineage: Some(L),
                last_cycle: last,
                last_freeze: 0,
                receiving: None,
                role,
                definition: None,
            },
        },
        now,
    );
    s
}

fn stop_message(acts: &[Action]) -> String {
    match acts {
        [Action::Close { .. }, Action::Stop { error }] => error.clone(),
        other => panic!("{other:?}"),
    }
}

/// A failover's baseline is never shipped (nor released), whatever the replica holds.
#[test]
fn a_baseline_is_never_shipped() {
    let f = Frozen {
        generation: 10,
        id: 5,
        full: true,
        baseline: true,
    };
    let mut s = greeted(view(Some(f), 11), Role::Replica, 9);
    let e = stop_message(&drain(&mut s));
    assert!(
        e.contains("baseline") && e.contains("vmreplica failover commit vm1"),
        "{e}"
    );
    assert!(s.is_stopped());
}

/// A replica the VM failed over to stops replication with the message naming the point and
/// the commands; nothing is frozen, shipped or released.
#[test]
fn a_failed_over_replica_stops_replication_with_the_commands() {
    let p = LineagePoint {
        lineage: L,
        cycle: 9,
    };
    let mut s = greeted(
        view(None, 10),
        Role::Primary {
            lineage: Lineage([5; 16]),
            parent: p,
        },
        9,
    );
    let e = stop_message(&drain(&mut s));
    for want in [
        "VM vm1 failed over to this site at cycle 9 of lineage",
        "--discard-local-changes",
        "vmreplica failover abandon vm1",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
}

/// A replica waiting for a reverse cycle: its divergent ranges (in pages) are marked dirty
/// in this tracker, whose lineage continues the point; a generation frozen after that ships
/// as a Reverse cycle naming the point; one frozen before is merged first.
#[test]
fn a_reverse_cycle_marks_the_divergent_ranges_then_ships_a_generation_frozen_after() {
    let parent = LineagePoint {
        lineage: Lineage([3; 16]),
        cycle: 9,
    };
    let mut t = view(
        Some(Frozen {
            generation: 12,
            id: 7,
            full: false,
            baseline: false,
        }),
        13,
    );
    t.parent = Some(parent);
    let now = Instant::now();
    let mut s = greeted(t.clone(), Role::ReversePending { parent }, 9);
    assert!(
        drain(&mut s).is_empty(),
        "acted before the divergent ranges came"
    );
    let mut d = RangeSet::new();
    d.insert(0, 65536, 131072);
    for page in vmreplica_common::wire::divergent_pages(&d) {
        s.handle(
            Event::Message {
                attempt: 1,
                msg: page,
            },
            now,
        );
    }
    // Frozen before the ranges were marked: merged first.
    assert_eq!(
        drain(&mut s),
        vec![Action::Tracker(TrackerOp::Merge { generation: 12 })]
    );
    t.frozen = None;
    s.handle(Event::Tracker(Ok(t.clone())), now);
    assert_eq!(
        drain(&mut s),
        vec![Action::Tracker(TrackerOp::MarkDirty { ranges: d.clone() })]
    );
    s.handle(Event::Tracker(Ok(t.clone())), now);
    assert_eq!(
        drain(&mut s),
        vec![Action::Tracker(TrackerOp::Freeze { full: false })]
    );
    t.frozen = Some(Frozen {
        generation: 13,
        id: 8,
        full: false,
        baseline: false,
    });
    t.next_generation = 14;
    s.handle(Event::Tracker(Ok(t.clone())), now);
    match &drain(&mut s)[..] {
        [Action::Send {
            msg:
                Message::BeginCycle {
                    cycle: 13,
                    kind: CycleKind::Reverse,
                    parent: Some(p),
                    ..
                },
            ..
        }] => assert_eq!(*p, parent),
        other => panic!("{other:?}"),
    }
    // A tracker whose lineage does not continue the point ships nothing.
    let mut other = view(None, 13);
    other.parent = Some(LineagePoint {
        lineage: Lineage([3; 16]),
        cycle: 8,
    });
    let mut s = greeted(other, Role::ReversePending { parent }, 9);
    for page in vmreplica_common::wire::divergent_pages(&d) {
        s.handle(
            Event::Message {
                attempt: 1,
                msg: page,
            },
            now,
        );
    }
    let e = stop_message(&drain(&mut s));
    assert!(e.contains("does not continue it"), "{e}");
}

/// A session whose tracker (next generation 10, nothing frozen) and replica (at 9) are
/// in step, driven until it asks for its first freeze (restarted paused since 1000 and
/// resumed at once, with `paused`).
pub(super) fn in_step(paused: bool) -> (ShipperSession, Instant) {
    let now = Instant::now();
    let mut s = ShipperSession::new(
        Config {
            vm: "vm1".into(),
            interval: Some(Duration::from_secs(60)),
            initial_sync_at: None,
            planned: None,
            paused: paused.then_some(1000),
            resumed_at: 0,
        },
        now,
    );
    if paused {
        assert!(s.is_paused(), "a pause survives a restart");
        assert_eq!(
            s.poll_timeout(),
            Some(now),
            "the replica site is told at once"
        );
        s.handle(Event::Resume { at: 1100 }, now);
    } else {
        s.handle(Event::Tick, now);
    }
    assert_eq!(drain(&mut s), vec![Action::Tracker(TrackerOp::Status)]);
    s.handle(Event::Tracker(Ok(view(None, 10))), now);
    s.handle(Event::Connected { attempt: 1 }, now);
    s.handle(
        Event::Message {
            attempt: 1,
            msg: welcome(None),
        },
        now,
    );
    assert_eq!(
        drain(&mut s).last(),
        Some(&Action::Tracker(TrackerOp::Freeze { full: false }))
    );
    (s, now)
}

/// The welcome of a replica at cycle 9 of L that records the pause `paused`.
pub(super) fn welcome(paused: Option<u64>) -> Message {
    Message::Welcome {
        paused,
        version: PROTOCOL_VERSION,
        lineage: Some(L),
        last_cycle: 9,
        last_freeze: 5,
        receiving: None,
        role: Role::Replica,
        definition: None,
    }
}

/// [`in_step`] (restarted paused and resumed), its cycle 10 shipped, applied and released:
/// connected, waiting 60 s for the next freeze.
pub(super) fn waiting() -> (ShipperSession, Instant) {
    let (mut s, now) = in_step(true);
    // The freeze made generation 10; shipped and applied; released: waiting 60 s.
    let f = Frozen {
        generation: 10,
        id: 77,
        full: false,
        baseline: false,
    };
    s.handle(Event::Tracker(Ok(view(Some(f), 11))), now);
    drain(&mut s);
    for m in resume_pages(L, 10, 1, &RangeSet::new()) {
        s.handle(Event::Message { attempt: 1, msg: m }, now);
    }
    s.handle(
        Event::Planned {
            attempt: 1,
            result: Ok(RangeSet::new()),
        },
        now,
    );
    s.handle(
        Event::Sent {
            attempt: 1,
            result: Ok(()),
        },
        now,
    );
    s.handle(
        Event::Message {
            attempt: 1,
            msg: Message::Applied {
                lineage: L,
                cycle: 10,
            },
        },
        now,
    );
    s.handle(Event::Tracker(Ok(view(None, 11))), now);
    drain(&mut s);
    assert!(s.is_idle());
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(60)));
    (s, now)
}

/// Waiting for the interval after a delta, a requested resync freezes every block at
/// once; a shorter interval brings the next freeze forward.
#[test]
fn a_requested_resync_or_a_new_interval_applies_while_waiting() {
    let (mut s, now) = waiting();
    s.handle(Event::SetInterval(Some(Duration::from_secs(5))), now);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(5)));
    s.handle(Event::ResyncRequested, now + Duration::from_secs(1));
    assert_eq!(
        drain(&mut s),
        vec![Action::Tracker(TrackerOp::Freeze { full: true })]
    );
}

/// The definition goes before the cycle when the replica holds another; a refusal is
/// reported and the cycle goes on; a changed definition goes before the next cycle; one
/// the replica holds is not sent again.
#[test]
fn a_definition_goes_before_the_cycle_and_a_refusal_does_not_stop_replication() {
    let f = Frozen {
        generation: 10,
        id: 77,
        full: false,
        baseline: false,
    };
    let d1 = Definition::new("version = 1 # a".into(), None);
    let (mut s, now) = connected_with(Some(f), 5, Some(d1.clone()), None);
    let acts = drain(&mut s);
    assert!(
        matches!(
            &acts[..],
            [
                Action::Send {
                    msg: Message::Definition { hash, .. },
                    ..
                },
                Action::Send {
                    msg: Message::BeginCycle { cycle: 10, .. },
                    ..
                }
            ] if *hash == d1.hash
        ),
        "{acts:?}"
    );
    // Refused: said, and the cycle goes on (no retry, no close).
    s.handle(
        Event::Message {
            attempt: 1,
            msg: Message::DefinitionStored {
                hash: d1.hash,
                error: Some("bad".into()),
            },
        },
        now,
    );
    assert_eq!(
        drain(&mut s),
        vec![Action::Definition {
            hash: d1.hash,
            result: Err("bad".into())
        }]
    );
    for p in resume_pages(L, 10, 3, &RangeSet::new()) {
        s.handle(Event::Message { attempt: 1, msg: p }, now);
    }
    assert!(matches!(&drain(&mut s)[..], [Action::Plan { .. }]));
    s.handle(
        Event::Planned {
            attempt: 1,
            result: Ok(RangeSet::new()),
        },
        now,
    );
    drain(&mut s);
    s.handle(
        Event::Sent {
            attempt: 1,
            result: Ok(()),
        },
        now,
    );
    drain(&mut s);
    // The operator edits the definition; the next cycle carries it first.
    let d2 = Definition::new("version = 1 # b".into(), None);
    s.set_definition(Some(d2.clone()));
    s.handle(
        Event::Message {
            attempt: 1,
            msg: Message::Applied {
                lineage: L,
                cycle: 10,
            },
        },
        now,
    );
    drain(&mut s);
    let next = Frozen {
        generation: 11,
        id: 78,
        full: false,
        baseline: false,
    };
    s.handle(Event::Tracker(Ok(view(Some(next), 12))), now);
    let acts = drain(&mut s);
    assert!(
        matches!(
            &acts[..],
            [
                Action::Send {
                    msg: Message::Definition { hash, .. },
                    ..
                },
                Action::Send {
                    msg: Message::BeginCycle { cycle: 11, .. },
                    ..
                }
            ] if *hash == d2.hash
        ),
        "{acts:?}"
    );
    s.handle(
        Event::Message {
            attempt: 1,
            msg: Message::DefinitionStored {
                hash: d2.hash,
                error: None,
            },
        },
        now,
    );
    assert_eq!(
        drain(&mut s),
        vec![Action::Definition {
            hash: d2.hash,
            result: Ok(())
        }]
    );
    // A replica that holds it already is not sent it again.
    let (mut s, _) = connected_with(Some(f), 5, Some(d2.clone()), Some(d2.hash));
    assert!(matches!(
        &drain(&mut s)[..],
        [Action::Send {
            msg: Message::BeginCycle { .. },
            ..
        }]
    ));
}
