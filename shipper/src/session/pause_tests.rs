//! The primary-side session's pause: the replica site is told (on the connection held
//! between cycles, or on one of its own, again after a backoff when it cannot be reached),
//! nothing is frozen while paused, a resume ends the replica's pause before any cycle, and
//! an older applier is refused naming both versions.
use super::tests::{drain, in_step, view, waiting, L};
use super::*;

fn welcome_at(last_cycle: u64, paused: Option<u64>) -> Message {
    Message::Welcome {
        paused,
        version: PROTOCOL_VERSION,
        lineage: Some(L),
        last_cycle,
        last_freeze: 77,
        receiving: None,
        role: Role::Replica,
        definition: None,
    }
}

fn msg(s: &mut ShipperSession, attempt: u64, msg: Message, at: Instant) -> Vec<Action> {
    s.handle(Event::Message { attempt, msg }, at);
    drain(s)
}

fn is_hello(acts: &[Action], attempt: u64) -> bool {
    matches!(acts, [Action::Send { attempt: a, msg: Message::Hello { .. } }] if *a == attempt)
}

/// Paused between cycles: told on the connection it holds, acknowledged, closed; nothing
/// is frozen while paused; resumed, the replica that records the pause hears `Resumed`
/// before the next freeze.
#[test]
fn a_pause_between_cycles_is_told_on_the_connection_held_and_a_resume_ends_it() {
    let (mut s, now) = waiting();
    s.handle(Event::Pause { since: 2000 }, now);
    assert!(s.is_paused() && !s.is_idle());
    assert_eq!(
        drain(&mut s),
        vec![Action::Send {
            attempt: 1,
            msg: Message::Paused { since: 2000 }
        }]
    );
    assert_eq!(s.poll_timeout(), Some(now + operator::TELL_TIMEOUT));
    let acts = msg(&mut s, 1, Message::PauseNoted { paused: Some(2000) }, now);
    assert_eq!(
        acts,
        vec![
            Action::Close { attempt: 1 },
            Action::PauseTold { since: Some(2000) }
        ]
    );
    assert!(s.is_paused() && s.is_idle());
    assert_eq!(s.poll_timeout(), None, "told: no connection, no timer");
    // The interval passes and a late tracker answer comes: nothing is frozen.
    s.handle(Event::Tracker(Ok(view(None, 11))), now);
    s.handle(Event::Tick, now + Duration::from_secs(600));
    assert!(drain(&mut s).is_empty());
    let later = now + Duration::from_secs(900);
    s.handle(Event::Resume { at: 3000 }, later);
    assert!(!s.is_paused());
    assert_eq!(drain(&mut s), vec![Action::Tracker(TrackerOp::Status)]);
    s.handle(Event::Tracker(Ok(view(None, 11))), later);
    assert_eq!(drain(&mut s), vec![Action::Connect { attempt: 2 }]);
    s.handle(Event::Connected { attempt: 2 }, later);
    assert!(is_hello(&drain(&mut s), 2));
    // The replica still records the pause: `Resumed` first, the freeze only after its answer.
    assert_eq!(
        msg(&mut s, 2, welcome_at(10, Some(2000)), later),
        vec![Action::Send {
            attempt: 2,
            msg: Message::Resumed { at: 3000 }
        }]
    );
    assert_eq!(
        msg(&mut s, 2, Message::PauseNoted { paused: None }, later).last(),
        Some(&Action::Tracker(TrackerOp::Freeze { full: false }))
    );
}

/// Paused in the middle of a cycle: the attempt ends and a connection of its own tells the
/// replica; while the applier cannot be reached (or does not answer in time) it is tried
/// again after a backoff; the welcome showing the pause recorded already ends it.
#[test]
fn a_pause_mid_cycle_or_with_the_link_down_is_told_at_the_next_connection() {
    let (mut s, now) = in_step(false);
    s.handle(Event::Pause { since: 1000 }, now);
    assert_eq!(
        drain(&mut s),
        vec![Action::Close { attempt: 1 }, Action::Connect { attempt: 2 }]
    );
    s.handle(
        Event::Disconnected {
            attempt: 2,
            reason: "connecting to 10.0.0.2:4433: timed out".into(),
        },
        now,
    );
    match &drain(&mut s)[..] {
        [Action::Close { attempt: 2 }, Action::PauseUntold { error, after }] => {
            assert!(error.contains("timed out"), "{error}");
            assert_eq!(*after, Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
    assert!(s.is_paused() && s.is_idle());
    let t1 = now + Duration::from_secs(1);
    assert_eq!(s.poll_timeout(), Some(t1));
    s.handle(Event::Tick, t1);
    assert_eq!(drain(&mut s), vec![Action::Connect { attempt: 3 }]);
    s.handle(Event::Connected { attempt: 3 }, t1);
    assert!(is_hello(&drain(&mut s), 3));
    // The freeze asked before the pause answers late: ignored.
    s.handle(Event::Tracker(Ok(view(None, 11))), t1);
    assert!(drain(&mut s).is_empty());
    assert_eq!(
        msg(&mut s, 3, welcome_at(9, None), t1),
        vec![Action::Send {
            attempt: 3,
            msg: Message::Paused { since: 1000 }
        }]
    );
    // No answer in time: given up, tried again later.
    let t2 = t1 + operator::TELL_TIMEOUT;
    s.handle(Event::Tick, t2);
    match &drain(&mut s)[..] {
        [Action::Close { attempt: 3 }, Action::PauseUntold { error, after }] => {
            assert!(error.contains("did not answer"), "{error}");
            assert_eq!(*after, Duration::from_secs(2));
        }
        other => panic!("{other:?}"),
    }
    let t3 = t2 + Duration::from_secs(2);
    s.handle(Event::Tick, t3);
    assert_eq!(drain(&mut s), vec![Action::Connect { attempt: 4 }]);
    s.handle(Event::Connected { attempt: 4 }, t3);
    drain(&mut s);
    // The slow applier did record it: its welcome says so, nothing is sent again.
    assert_eq!(
        msg(&mut s, 4, welcome_at(9, Some(1000)), t3),
        vec![
            Action::Close { attempt: 4 },
            Action::PauseTold { since: Some(1000) }
        ]
    );
    assert_eq!(s.poll_timeout(), None);
}

/// A shipper restarted paused tells the replica again; an empty replica is not told (a
/// pause must not create it); an applier of another protocol version is refused, the
/// message naming both versions and the site to upgrade; a resume while telling closes
/// that connection.
#[test]
fn a_restarted_paused_shipper_tells_again_but_not_an_empty_replica_nor_an_old_applier() {
    let now = Instant::now();
    let cfg = || Config {
        vm: "vm1".into(),
        interval: Some(Duration::from_secs(60)),
        initial_sync_at: None,
        planned: None,
        paused: Some(1000),
        resumed_at: 0,
    };
    let mut s = ShipperSession::new(cfg(), now);
    s.handle(Event::Tick, now);
    assert_eq!(drain(&mut s), vec![Action::Connect { attempt: 1 }]);
    s.handle(Event::Connected { attempt: 1 }, now);
    drain(&mut s);
    let empty = Message::Welcome {
        paused: None,
        version: PROTOCOL_VERSION,
        lineage: None,
        last_cycle: 0,
        last_freeze: 0,
        receiving: None,
        role: Role::Replica,
        definition: None,
    };
    assert_eq!(
        msg(&mut s, 1, empty, now),
        vec![
            Action::Close { attempt: 1 },
            Action::PauseTold { since: None }
        ]
    );
    // A version 3 applier.
    let mut s = ShipperSession::new(cfg(), now);
    s.handle(Event::Tick, now);
    s.handle(Event::Connected { attempt: 1 }, now);
    drain(&mut s);
    let old = Message::Welcome {
        paused: None,
        version: 3,
        lineage: Some(L),
        last_cycle: 9,
        last_freeze: 77,
        receiving: None,
        role: Role::Replica,
        definition: None,
    };
    match &msg(&mut s, 1, old.clone(), now)[..] {
        [Action::Close { attempt: 1 }, Action::PauseUntold { error, .. }] => {
            for want in [
                "version 3",
                &format!("version {PROTOCOL_VERSION}"),
                "upgrade vmreplica on the replica site",
            ] {
                assert!(error.contains(want), "{want}: {error}");
            }
        }
        other => panic!("{other:?}"),
    }
    // Resumed while telling: that connection closes, replication goes on.
    s.handle(Event::Tick, now + Duration::from_secs(1));
    assert_eq!(drain(&mut s), vec![Action::Connect { attempt: 2 }]);
    s.handle(Event::Resume { at: 1500 }, now + Duration::from_secs(1));
    assert_eq!(
        drain(&mut s),
        vec![
            Action::Close { attempt: 2 },
            Action::Tracker(TrackerOp::Status)
        ]
    );
    // Not paused, the version 3 applier is refused the same way (and tried again).
    s.handle(Event::Tracker(Ok(view(None, 10))), now);
    s.handle(Event::Connected { attempt: 3 }, now);
    drain(&mut s);
    match &msg(&mut s, 3, old, now)[..] {
        [Action::Close { .. }, Action::Retry { error, .. }] => {
            assert!(
                error.contains("upgrade vmreplica on the replica site"),
                "{error}"
            )
        }
        other => panic!("{other:?}"),
    }
}
