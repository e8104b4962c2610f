//! The replica session's pause: recorded by the store before it is acknowledged, told
//! again without the store, refused for an empty replica, shown in the welcome; and an
//! older shipper refused at hello naming both versions.

use super::*;

const A: Lineage = Lineage([0xa; 16]);

fn replica(paused: Option<u64>) -> Replica {
    Replica {
        lineage: Some(A),
        last_cycle: 5,
        last_freeze: 0,
        has_points: true,
        receiving: None,
        role: Role::Replica,
        paused,
    }
}

fn drain(s: &mut ApplierSession) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn hello(s: &mut ApplierSession, conn: ConnId, version: u16) -> Vec<Action> {
    s.handle(Event::Hello {
        conn,
        version,
        lineage: Some(A),
    });
    drain(s)
}

fn welcome_paused(acts: &[Action]) -> Option<u64> {
    match acts {
        [Action::Send {
            msg: Message::Welcome { paused, .. },
            ..
        }] => *paused,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_pause_is_recorded_before_it_is_acknowledged_and_the_welcome_shows_it() {
    let mut s = ApplierSession::new("vm1", replica(None));
    assert_eq!(welcome_paused(&hello(&mut s, 1, PROTOCOL_VERSION)), None);
    s.handle(Event::Message {
        conn: 1,
        msg: Message::Paused { since: 1000 },
    });
    assert_eq!(
        drain(&mut s),
        vec![Action::RecordPause {
            conn: 1,
            change: PauseChange::Paused(1000)
        }]
    );
    // A cycle's begin meanwhile waits for the store.
    s.handle(Event::Message {
        conn: 1,
        msg: Message::Resumed { at: 0 },
    });
    assert!(drain(&mut s).is_empty());
    // The save failed: the shipper hears why, nothing is acknowledged; the resume that
    // waited finds nothing to end.
    s.handle(Event::PauseRecorded {
        conn: 1,
        result: Err((code::NO_SPACE, "VM vm1: no space left".into())),
        replica: replica(None),
    });
    assert_eq!(
        drain(&mut s),
        vec![
            Action::Send {
                conn: 1,
                msg: Message::Error {
                    code: code::NO_SPACE,
                    message: "VM vm1: no space left".into()
                }
            },
            Action::Send {
                conn: 1,
                msg: Message::PauseNoted { paused: None }
            }
        ]
    );
    // Asked again, saved: acknowledged with the pause recorded, and the welcome says it.
    s.handle(Event::Message {
        conn: 1,
        msg: Message::Paused { since: 1000 },
    });
    drain(&mut s);
    s.handle(Event::PauseRecorded {
        conn: 1,
        result: Ok(()),
        replica: replica(Some(1000)),
    });
    assert_eq!(
        drain(&mut s),
        vec![Action::Send {
            conn: 1,
            msg: Message::PauseNoted { paused: Some(1000) }
        }]
    );
    assert_eq!(
        welcome_paused(&hello(&mut s, 2, PROTOCOL_VERSION)),
        Some(1000)
    );
    // Told again (an acknowledgement lost with its connection): answered without the store.
    s.handle(Event::Message {
        conn: 2,
        msg: Message::Paused { since: 1000 },
    });
    assert_eq!(
        drain(&mut s),
        vec![Action::Send {
            conn: 2,
            msg: Message::PauseNoted { paused: Some(1000) }
        }]
    );
    // The resume goes to the store, and is acknowledged once saved.
    s.handle(Event::Message {
        conn: 2,
        msg: Message::Resumed { at: 1500 },
    });
    assert_eq!(
        drain(&mut s),
        vec![Action::RecordPause {
            conn: 2,
            change: PauseChange::Resumed(1500)
        }]
    );
    s.handle(Event::PauseRecorded {
        conn: 2,
        result: Ok(()),
        replica: replica(None),
    });
    assert_eq!(
        drain(&mut s),
        vec![Action::Send {
            conn: 2,
            msg: Message::PauseNoted { paused: None }
        }]
    );
    // A restarted applier reads the pause from the store: its welcome shows it.
    let mut s = ApplierSession::new("vm1", replica(Some(1000)));
    assert_eq!(
        welcome_paused(&hello(&mut s, 1, PROTOCOL_VERSION)),
        Some(1000)
    );
}

#[test]
fn an_empty_replica_records_no_pause_and_older_shippers_are_refused_by_version() {
    let empty = Replica {
        lineage: None,
        last_cycle: 0,
        has_points: false,
        ..replica(None)
    };
    let mut s = ApplierSession::new("vm1", empty);
    s.handle(Event::Message {
        conn: 1,
        msg: Message::Paused { since: 1000 },
    });
    match &drain(&mut s)[..] {
        [Action::Send {
            msg: Message::Error { code: c, message },
            ..
        }] => assert!(
            *c == code::NOT_ALLOWED && message.contains("vm1") && message.contains("nothing"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    // A version 3 shipper: refused, naming both versions and the site to upgrade.
    match &hello(&mut s, 2, 3)[..] {
        [Action::Send {
            msg: Message::Error { code: c, message },
            ..
        }] => {
            assert_eq!(*c, code::PROTOCOL);
            for want in [
                "version 3",
                &format!("version {PROTOCOL_VERSION}"),
                "upgrade vmreplica on the primary site",
            ] {
                assert!(message.contains(want), "{want}: {message}");
            }
        }
        other => panic!("{other:?}"),
    }
}
