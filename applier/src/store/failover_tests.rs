//! The store's failover operations against failed saves and recorded test failovers.

use rand::SeedableRng;
use vmreplica_common::wire::CycleKind;

use super::tests::{
    disks, initial, mutate, plan, read_images, seeded, send, ship, start, store, tmp, Images,
    FREEZE, L,
};
use super::*;

/// Rewrites block `b` of disk 0 with `fill`; returns it as a cycle's block list.
fn write_block(data: &mut Images, b: u64, fill: u8) -> Vec<(u16, u64)> {
    let off = (b * u64::from(super::tests::G)) as usize;
    data[0][off..off + super::tests::G as usize].fill(fill);
    vec![(0, b)]
}

/// A cycle's commit whose state save failed after its rename (maybe made: on disk the
/// replica holds cycle 4, in memory still 3), then an unplanned failover to point 2, which
/// does not settle the store first. Before `commit_state` re-read the store, the failover
/// saved a state made from memory (newest point 3, without cycle 4's undo log), the settle
/// that followed deleted cycle 4's undo log as unreferenced, and the images were rolled
/// back with the logs of cycle 3 only: block 40, written by cycle 4 alone, kept cycle 4's
/// data at "point 2".
#[test]
fn a_failover_after_a_maybe_made_save_rolls_back_to_the_exact_point() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut primary = seeded(21);
    let (mut vs, mut history) = initial(&s, &primary);
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for c in 2..=3 {
        let b = mutate(&mut rng, &mut primary);
        ship(&mut vs, c, CycleKind::Delta, &primary, &b).unwrap();
        history.insert(c, primary.clone());
    }
    let b = write_block(&mut primary, 40, 0xC4);
    let (st, tag) = start(&mut vs, 4, CycleKind::Delta);
    for r in send(&vs, tag, &primary, &b) {
        r.unwrap();
    }
    let set = plan(&b);
    vs.fail_save_after_rename = true;
    assert!(vs
        .commit(L, 4, st.epoch, set.len() as u64, set.bytes(), set.digest())
        .is_err());
    assert_eq!(vs.last_cycle(), 3, "in memory, the commit failed");
    // The failover starts from a state that may not be the one on disk: refused, with the
    // store re-read, then asked again.
    let e = vs
        .begin_failover(Some(2), false, None)
        .expect_err("a failover made from a state the disk no longer holds");
    let msg = e.to_string();
    assert!(
        matches!(e, StoreError::Reread { .. })
            && msg.contains("vm1")
            && msg.contains("state.json")
            && msg.contains("run the command again"),
        "{msg}"
    );
    assert_eq!(vs.last_cycle(), 4, "the store was re-read");
    let f = vs.begin_failover(Some(2), false, None).unwrap();
    assert_eq!((f.point, f.from), (2, 4));
    vs.roll_back_to_point().unwrap();
    assert!(
        read_images(&vs) == history[&2],
        "the images are not point 2 after the failover"
    );
}

/// A failover operation's own save maybe made: commit's (on disk the record is the
/// primary's, its points gone; in memory still failed over). Before the fix a cancel went
/// on from memory and saved a failed-over record over the committed one.
#[test]
fn a_commit_saved_despite_its_error_is_not_cancelled_from_memory() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut primary = seeded(22);
    let (mut vs, _) = initial(&s, &primary);
    let b = write_block(&mut primary, 3, 0x22);
    ship(&mut vs, 2, CycleKind::Delta, &primary, &b).unwrap();
    vs.begin_failover(None, false, None).unwrap();
    vs.roll_back_to_point().unwrap();
    vs.set_failover_step(FailoverStep::Serving).unwrap();
    vs.fail_save_after_rename = true;
    assert!(vs.commit_failover().is_err());
    let e = vs.begin_cancel().expect_err("the commit is on disk");
    assert!(matches!(e, StoreError::Reread { .. }), "{e}");
    assert!(matches!(vs.role(), Role::Primary(_)), "{:?}", vs.role());
    let e = vs.begin_cancel().expect_err("nothing to cancel");
    assert!(e.to_string().contains("no failover is in progress"), "{e}");
    assert!(vs.commit_failover().is_ok(), "commit again is a no-op");
    drop(vs);
    let vs = s.open_vm("vm1", "primary-1").unwrap();
    assert!(matches!(vs.role(), Role::Primary(_)), "{:?}", vs.role());
    assert!(vs.points().is_empty());
}

fn pin(point: u64) -> TestPin {
    TestPin {
        point,
        created_at: 1,
        tcp: None,
        tls_allow: Vec::new(),
        started: false,
        scratch_limit: None,
    }
}

/// A test failover recorded in the state but not served (the applier restarted and has not
/// served it again yet, or serving it again failed) blocks a failover as a served one does:
/// the message names the command that ends it. Before, only a pin held in memory did, and
/// the failover made the images the running VM's disks under a test failover that an
/// applier restart then served again from them.
#[test]
fn a_recorded_test_failover_blocks_a_failover_until_it_is_stopped() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let primary = seeded(23);
    let (mut vs, _) = initial(&s, &primary);
    vs.add_test(pin(1)).unwrap();
    drop(vs);
    let mut vs = s.open_vm("vm1", "primary-1").unwrap();
    assert!(vs.shared().pinned().is_empty(), "not served");
    let e = vs
        .begin_failover(None, false, None)
        .expect_err("a test failover is recorded");
    let msg = e.to_string();
    assert!(
        msg.contains("vmreplica failover test-stop vm1 --all") && msg.contains("point(s) 1"),
        "{msg}"
    );
    assert_eq!(*vs.role(), Role::Replica, "nothing changed");
    vs.remove_test(1).unwrap();
    vs.begin_failover(None, false, None).unwrap();
}

/// A test failover of a VM failed over to this site is refused: its images are the running
/// VM's disks, so no point view reads a point from them. Before, it was recorded (and
/// served as "point N" from images the failed-over VM writes).
#[test]
fn a_test_failover_of_a_failed_over_vm_is_refused() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let primary = seeded(24);
    let (mut vs, _) = initial(&s, &primary);
    vs.begin_failover(None, false, None).unwrap();
    let e = vs.add_test(pin(1)).expect_err("failed over");
    let msg = e.to_string();
    assert!(
        msg.contains("vm1")
            && msg.contains("failed-over")
            && msg.contains("vmreplica failover cancel vm1"),
        "{msg}"
    );
    assert!(vs.tests().is_empty());
}

/// A full disk at each state save of an unplanned failover to an older point, of its cancel
/// and of a second failover's commit: the step fails, what is in memory stays what is on
/// disk, and the same step again finishes it; the images end exactly at the point asked.
#[test]
fn a_full_disk_at_each_failover_save_loses_nothing_and_a_rerun_finishes() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut primary = seeded(25);
    let (mut vs, mut history) = initial(&s, &primary);
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    for c in 2..=3 {
        let b = mutate(&mut rng, &mut primary);
        ship(&mut vs, c, CycleKind::Delta, &primary, &b).unwrap();
        history.insert(c, primary.clone());
    }
    let on_disk = |vs: &VmStore| {
        let st: VmState = read_vm_state("vm1", &vs.dir().join("state.json"))
            .unwrap()
            .unwrap();
        st
    };
    vs.fail_save = true;
    assert!(vs.begin_failover(Some(1), false, None).is_err());
    assert_eq!(*vs.role(), Role::Replica);
    assert_eq!(on_disk(&vs).role, Role::Replica);
    vs.begin_failover(Some(1), false, None).unwrap();
    // The save that records the redo log (twice: the redo log is written again).
    for _ in 0..2 {
        vs.fail_save = true;
        assert!(vs.roll_back_to_point().is_err());
        assert_eq!(on_disk(&vs).role, *vs.role());
    }
    vs.roll_back_to_point().unwrap();
    assert!(read_images(&vs) == history[&1]);
    vs.fail_save = true;
    assert!(vs.set_failover_step(FailoverStep::Serving).is_err());
    vs.set_failover_step(FailoverStep::Serving).unwrap();
    vs.fail_save = true;
    assert!(vs.begin_cancel().is_err());
    vs.begin_cancel().unwrap();
    vs.fail_save = true;
    assert!(vs.finish_cancel(None).is_err());
    assert_eq!(on_disk(&vs).role, *vs.role());
    vs.finish_cancel(None).unwrap();
    assert_eq!(*vs.role(), Role::Replica);
    assert!(
        read_images(&vs) == history[&3],
        "the cancel did not return to point 3"
    );
    assert_eq!(vs.points().len(), 3, "a point was lost");
    // A second failover, committed through a full disk.
    vs.begin_failover(None, false, None).unwrap();
    vs.roll_back_to_point().unwrap();
    vs.set_failover_step(FailoverStep::Serving).unwrap();
    vs.fail_save = true;
    assert!(vs.commit_failover().is_err());
    assert!(matches!(vs.role(), Role::FailedOver(_)));
    assert_eq!(
        vs.points().len(),
        3,
        "points dropped although the commit failed"
    );
    assert!(vs.dir().join("undo").read_dir().unwrap().count() > 0);
    vs.commit_failover().unwrap();
    drop(vs);
    let vs = s.open_vm("vm1", "primary-1").unwrap();
    assert!(matches!(vs.role(), Role::Primary(_)));
    assert!(read_images(&vs) == history[&3]);
}

/// A failover to an older point with a cycle held in part, each save inside
/// `roll_back_to_point` failing in turn: on a full disk (not made), then after its rename
/// (maybe made). Each failure leaves the record consistent (on disk as in memory, or
/// re-read), the same step again finishes, the images end exactly at the point asked, and
/// a cancel returns them exactly to the newest complete point with every point kept.
#[test]
fn each_failing_save_inside_roll_back_to_point_is_finished_by_a_rerun() {
    for after_rename in [false, true] {
        for skip in 0.. {
            let dir = tmp();
            let s = store(dir.path(), Retention::keep_all());
            let mut primary = seeded(26);
            let (mut vs, mut history) = initial(&s, &primary);
            let mut rng = rand::rngs::StdRng::seed_from_u64(26);
            for c in 2..=3 {
                let b = mutate(&mut rng, &mut primary);
                ship(&mut vs, c, CycleKind::Delta, &primary, &b).unwrap();
                history.insert(c, primary.clone());
            }
            // Cycle 4, received in part when the primary is lost.
            let b = mutate(&mut rng, &mut primary);
            let (_, tag) = start(&mut vs, 4, CycleKind::Delta);
            for r in send(&vs, tag, &primary, &b) {
                r.unwrap();
            }
            vs.begin_failover(Some(1), false, None).unwrap();
            vs.fail_save_skip = skip;
            if after_rename {
                vs.fail_save_after_rename = true;
            } else {
                vs.fail_save = true;
            }
            let first = vs.roll_back_to_point();
            let fired = !(vs.fail_save || vs.fail_save_after_rename);
            (vs.fail_save, vs.fail_save_after_rename, vs.fail_save_skip) = (false, false, 0);
            if !fired {
                // Every save of the step went through: all of them were failed in turn.
                first.unwrap();
                assert!(skip >= 2, "roll_back_to_point saved only {skip} time(s)");
                break;
            }
            let e = first.expect_err("the failed save is reported");
            let on_disk: VmState = read_vm_state("vm1", &vs.dir().join("state.json"))
                .unwrap()
                .unwrap();
            if !after_rename {
                assert_eq!(on_disk.role, *vs.role(), "save {skip} failed: {e}");
            }
            // The same step again (after a maybe-made save, the first rerun may only re-read).
            let f = match vs.roll_back_to_point() {
                Err(StoreError::Reread { .. }) => vs.roll_back_to_point(),
                r => r,
            }
            .unwrap_or_else(|e| {
                panic!("save {skip} failed (after rename: {after_rename}), rerun: {e}")
            });
            assert_eq!(f.step, FailoverStep::RolledBack);
            assert!(
                read_images(&vs) == history[&1],
                "save {skip} failed (after rename: {after_rename}): the images are not point 1"
            );
            vs.set_failover_step(FailoverStep::Serving).unwrap();
            vs.begin_cancel().unwrap();
            vs.finish_cancel(None).unwrap();
            assert_eq!(*vs.role(), Role::Replica);
            assert!(
                read_images(&vs) == history[&3],
                "save {skip} failed (after rename: {after_rename}): the cancel did not return \
                 to point 3"
            );
            assert_eq!(vs.points().len(), 3, "a point was lost");
        }
    }
}

/// A planned failover's adoption undone at `--timeout` is withdrawn, not removed: the record
/// stays (history, divergent ranges), takes no cycle, and a new adoption of the same images
/// (the command run again) replaces it.
#[test]
fn a_withdrawn_adoption_is_kept_takes_no_cycle_and_is_adopted_again() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let images = tmp();
    let adopted: Vec<AdoptedDisk> = disks()
        .iter()
        .map(|d| {
            let image = images.path().join(format!("{}.img", d.name));
            fs::File::create(&image).unwrap().set_len(d.size).unwrap();
            AdoptedDisk {
                name: d.name.clone(),
                image,
                size: d.size,
                granularity: d.granularity,
            }
        })
        .collect();
    let parent = SpanParent {
        lineage: L,
        cycle: 4,
    };
    let adopt = || {
        s.create_adopted(
            "vm1",
            "primary-2",
            &adopted,
            parent,
            &vmreplica_common::ranges::RangeSet::new(),
            None,
        )
    };
    adopt().unwrap();
    assert!(s.withdraw_adopted("vm1").unwrap());
    assert!(s.withdraw_adopted("vm1").unwrap(), "again: nothing changes");
    let st = s.peek_state("vm1").unwrap();
    let Role::ReversePending(r) = &st.role else {
        panic!("{:?}", st.role)
    };
    assert!(r.withdrawn.is_some() && r.divergent.is_some(), "{r:?}");
    assert_eq!(st.points.len(), 1);
    let mut vs = s.open_vm("vm1", "primary-2").unwrap();
    let e = vs
        .start_cycle(
            L,
            5,
            CycleKind::Reverse,
            FREEZE,
            &disks(),
            Some(parent.point()),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("withdrawn") && e.contains("failover planned vm1"),
        "{e}"
    );
    drop(vs);
    adopt().unwrap();
    let st = s.peek_state("vm1").unwrap();
    assert!(
        matches!(&st.role, Role::ReversePending(r) if r.withdrawn.is_none()),
        "{:?}",
        st.role
    );
}
