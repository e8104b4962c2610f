//! Reviewer R1's findings on the shipper's lineage rules with the real tracker (issues 16 and
//! 17), each shown by a test that failed on the code as reviewed and passes with its fix
//! (`cargo nextest run -p vmreplica-shipper -E 'test(r1_)'`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmreplica_common::lineage::Lineage;
use vmreplica_common::wire::{DiskInfo, Message, PROTOCOL_VERSION};
use vmreplica_shipper::session::{
    Action, Config, Event, Frozen, ShipperSession, TrackerOp, TrackerView,
};
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::{Tracker, TrackerConfig};

const MIB: u64 = 1 << 20;
const L: Lineage = Lineage([0x42; 16]);

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("sys.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    p
}

fn open(dir: &Path, img: &Path) -> Tracker {
    Tracker::open(TrackerConfig::new(
        dir.join("state"),
        vec![("sys".into(), img.to_path_buf())],
    ))
    .unwrap()
}

fn write(t: &Tracker, offset: u64, byte: u8) {
    let (tx, rx) = mpsc::channel();
    t.disks()[0].write(
        offset,
        vec![byte; 65536],
        false,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
}

/// The tracker's status as the shipper's driver builds it (`run::tracker_view`).
fn view(t: &Tracker) -> TrackerView {
    let st = t.state();
    TrackerView {
        lineage: st.lineage,
        next_generation: st.next_generation,
        frozen: t.frozen().map(|g| Frozen {
            generation: g.generation,
            id: g.id,
            full: g.full,
            baseline: g.baseline,
        }),
        resync_required: st.disks.iter().any(|d| d.resync_required),
        disks: st
            .disks
            .iter()
            .map(|d| DiskInfo {
                name: d.name.clone(),
                size: d.size,
                granularity: st.granularity,
            })
            .collect(),
        parent: None,
        sealed: st.sealed,
    }
}

/// What the replica says in its welcome.
struct Replica {
    lineage: Lineage,
    last_cycle: u64,
    last_freeze: u64,
}

/// A freshly started shipper process, driven against the real tracker `t` and a replica
/// that welcomes it as `r`, until it asks for a freeze (not carried out) or begins shipping
/// a generation. Returns the tracker operations it asked for.
fn drive_until_freeze(t: &Tracker, r: &Replica) -> Vec<TrackerOp> {
    let now = Instant::now();
    let mut s = ShipperSession::new(
        Config {
            vm: "vm1".into(),
            interval: Some(Duration::from_secs(1)),
            initial_sync_at: None,
            planned: None,
            paused: None,
            resumed_at: 0,
        },
        now,
    );
    s.handle(Event::Tick, now);
    let mut ops = Vec::new();
    for _ in 0..50 {
        let Some(a) = s.poll_action() else {
            // Waiting for the interval: time passes.
            s.handle(Event::Tick, now + Duration::from_secs(5));
            continue;
        };
        match a {
            Action::Tracker(op) => {
                if matches!(op, TrackerOp::Freeze { .. }) {
                    ops.push(op);
                    return ops;
                }
                let res = match &op {
                    TrackerOp::Status | TrackerOp::Freeze { .. } => Ok(()),
                    TrackerOp::Release { generation, proof } => t.release_proven(
                        *generation,
                        Some((proof.0, proof.1, Some(proof.2))),
                        false,
                    ),
                    TrackerOp::Merge { generation } => t.merge(*generation),
                    TrackerOp::SetLineage {
                        lineage,
                        next_generation,
                    } => t.set_lineage(lineage.unwrap_or(L), *next_generation, false),
                    TrackerOp::ClearResync | TrackerOp::MarkDirty { .. } => Ok(()),
                    TrackerOp::MarkResync => t
                        .state()
                        .disks
                        .iter()
                        .try_for_each(|d| t.mark_resync(&d.name)),
                };
                ops.push(op);
                s.handle(
                    Event::Tracker(res.map(|()| view(t)).map_err(|e| e.to_string())),
                    now,
                );
            }
            Action::Connect { attempt } => s.handle(Event::Connected { attempt }, now),
            Action::Send {
                attempt,
                msg: Message::Hello { .. },
            } => s.handle(
                Event::Message {
                    attempt,
                    msg: Message::Welcome {
                        paused: None,
                        version: PROTOCOL_VERSION,
                        lineage: Some(r.lineage),
                        last_cycle: r.last_cycle,
                        last_freeze: r.last_freeze,
                        receiving: None,
                        definition: None,
                        role: vmreplica_common::wire::Role::Replica,
                    },
                },
                now,
            ),
            Action::Send {
                msg: Message::BeginCycle { .. },
                ..
            } => return ops,
            other => panic!("unexpected {other:?} after {ops:?}"),
        }
    }
    panic!("the shipper never froze: {ops:?}");
}

/// R1 finding 2. A tracker whose state directory is gone (recreated empty: no lineage,
/// generation 1, no tracking files, so no `resync_required`) is caught up by a checksum
/// resync: the shipper sets the replica's lineage with `next_generation = last + 1`, then
/// freezes every block. That decision lives only in the shipper's memory (`must_resync`):
/// after `set-lineage` the tracker looks exactly like one in step with the replica. A
/// shipper restarted in between (a crash, `systemctl restart`, a reboot, a freeze that failed
/// and is retried after a backoff) ships a plain delta of what the new state tracked: the
/// writes made before the state was lost are never shipped, and the replica silently differs.
#[test]
fn r1_a_shipper_restarted_after_set_lineage_still_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let t = open(dir.path(), &img);
    let replica = Replica {
        lineage: L,
        last_cycle: 9,
        last_freeze: 77,
    };
    // The first shipper decides on a resync: it sets the tracker's lineage and asks for a
    // full freeze...
    let ops = drive_until_freeze(&t, &replica);
    assert!(
        matches!(
            ops[..],
            [
                TrackerOp::Status,
                TrackerOp::MarkResync,
                TrackerOp::SetLineage {
                    next_generation: 10,
                    ..
                },
                TrackerOp::Freeze { full: true }
            ]
        ),
        "{ops:?}"
    );
    // ...but it is killed before the freeze. The shipper restarted next must still resync.
    let ops = drive_until_freeze(&t, &replica);
    assert_eq!(
        ops.last(),
        Some(&TrackerOp::Freeze { full: true }),
        "a restarted shipper no longer resyncs: {ops:?} (the tracker's resync_required: {})",
        view(&t).resync_required
    );
}

/// R1 finding 3. A tracker restarted on an older copy of its state directory (a host
/// restored from a backup or snapshot while the disks live elsewhere) is not told apart from
/// one that never stopped: no `resync_required` (the simulated pair's model assumes it is set,
/// "as a restored state directory is"), and its frozen generation is the very freeze the
/// replica applied last (freeze ids match), so the shipper releases it as a lost
/// acknowledgement and ships deltas from the copy's bitmaps. Writes made after the copy was
/// taken are in no bitmap: never shipped.
#[test]
fn r1_a_restored_tracker_state_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let t = open(dir.path(), &img);
    t.set_lineage(L, 1, false).unwrap();
    let g1 = t.freeze_with(true, || {}).unwrap();
    // The state directory is backed up (tracker stopped cleanly for it) while generation 1,
    // the initial copy, is frozen.
    t.close().unwrap();
    drop(t);
    let backup = dir.path().join("backup");
    let state = dir.path().join("state");
    let cp = |from: &Path, to: &Path| {
        assert!(Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success());
    };
    cp(&state, &backup);
    let t = open(dir.path(), &img);
    // The replica applies generation 1; it is released with its proof.
    t.release_proven(1, Some((L, 1, Some(g1.id))), false)
        .unwrap();
    // The guest writes block 5 (64 KiB at 5 MiB).
    write(&t, 5 * MIB, 0x77);
    assert!(t.disks()[0].tracking().unwrap().is_dirty(5 * MIB / 65536));
    t.close().unwrap();
    drop(t);
    // The host comes back from the backup: the tracker's state directory is the copy.
    std::fs::remove_dir_all(&state).unwrap();
    cp(&backup, &state);
    let t = open(dir.path(), &img);
    let replica = Replica {
        lineage: L,
        last_cycle: 1,
        last_freeze: g1.id,
    };
    let ops = drive_until_freeze(&t, &replica);
    if let Some(TrackerOp::Freeze { full }) = ops.last() {
        t.freeze_with(*full, || {}).unwrap();
    }
    let g = t.frozen().expect("a generation was frozen");
    let blocks = FrozenReader::open(&g.disks[0]).unwrap().blocks().unwrap();
    assert!(
        g.full || blocks.contains(&(5 * MIB / 65536)),
        "the write at 5 MiB is in no generation: the shipper did {ops:?}, then froze generation \
         {} with blocks {blocks:?} (resync_required: {})",
        g.generation,
        view(&t).resync_required
    );
}
