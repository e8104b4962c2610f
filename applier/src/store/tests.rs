//! The store with its pipeline, on a real filesystem (direct I/O where /var/tmp allows it):
//! cycles in place, crashes mid-cycle, idempotent capture, epochs, rollback, failed saves,
//! empty cycles, refusals, and point views while cycles land.

use std::collections::BTreeMap;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use rand::{Rng, SeedableRng};
use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::RangeSet;
use vmreplica_common::wire::{code, is_zero, CycleKind, DiskInfo, Tag};

use super::*;
use crate::pointview::PointView;

pub(crate) const SIZE: u64 = 4 << 20;
pub(crate) const G: u32 = 65536;
pub(crate) const L: Lineage = Lineage([0x11; 16]);
/// The tracker's freeze id (the tests freeze each cycle once).
pub(crate) const FREEZE: u64 = 7;

pub(crate) type Images = Vec<Vec<u8>>;

pub(crate) fn disks() -> Vec<DiskInfo> {
    ["a", "b"]
        .iter()
        .map(|n| DiskInfo {
            name: n.to_string(),
            size: SIZE,
            granularity: G,
        })
        .collect()
}

pub(crate) fn store(dir: &std::path::Path, r: Retention) -> Store {
    Store::new(dir, r).unwrap()
}

pub(crate) fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

/// Hands block `(disk, index)` of `data` to the pipeline as a chunk of `tag`; the outcome
/// comes on `tx`.
fn submit(
    vs: &VmStore,
    tag: Tag,
    data: &Images,
    (d, b): (u16, u64),
    tx: &mpsc::Sender<Result<(), Failure>>,
) {
    let off = b * u64::from(G);
    let bytes = &data[d as usize][off as usize..(off + u64::from(G)) as usize];
    let payload = (!is_zero(bytes)).then(|| {
        let mut buf = vmreplica_common::engine::IoBuf::default();
        let at = buf.for_direct(bytes.len());
        buf[at..].copy_from_slice(bytes);
        (buf, at)
    });
    let tx = tx.clone();
    vs.sender().expect("a cycle is being received").submit(Job {
        tag,
        disk: d,
        offset: off,
        len: G,
        data: payload,
        done: Box::new(move |r| {
            let _ = tx.send(r);
        }),
    });
}

/// Sends `blocks` as chunks of `tag` and waits until each is durably applied or failed.
pub(crate) fn send(
    vs: &VmStore,
    tag: Tag,
    data: &Images,
    blocks: &[(u16, u64)],
) -> Vec<Result<(), Failure>> {
    let (tx, rx) = mpsc::channel();
    for b in blocks {
        submit(vs, tag, data, *b, &tx);
    }
    vs.sender().unwrap().flush().ok();
    drop(tx);
    rx.iter().take(blocks.len()).collect()
}

pub(crate) fn plan(blocks: &[(u16, u64)]) -> RangeSet {
    blocks
        .iter()
        .map(|&(d, b)| vmreplica_common::ranges::Range {
            disk: d,
            offset: b * u64::from(G),
            len: u64::from(G),
        })
        .collect()
}

/// Starts cycle `cycle` of lineage `L` (freeze `FREEZE`); its chunks' tag.
pub(crate) fn start(vs: &mut VmStore, cycle: u64, kind: CycleKind) -> (Started, Tag) {
    let st = vs
        .start_cycle(L, cycle, kind, FREEZE, &disks(), None)
        .unwrap();
    let tag = Tag {
        lineage: L,
        cycle,
        epoch: st.epoch,
    };
    (st, tag)
}

/// Commits cycle `cycle` of attempt `epoch` as the plan of `blocks`.
pub(crate) fn commit_blocks(
    vs: &mut VmStore,
    cycle: u64,
    epoch: u64,
    blocks: &[(u16, u64)],
) -> Result<Committed, StoreError> {
    let set = plan(blocks);
    vs.commit(L, cycle, epoch, set.len() as u64, set.bytes(), set.digest())
}

/// Ships `blocks` of `data` as cycle `cycle` (skipping what the replica already holds) and
/// commits it.
pub(crate) fn ship(
    vs: &mut VmStore,
    cycle: u64,
    kind: CycleKind,
    data: &Images,
    blocks: &[(u16, u64)],
) -> Result<Committed, StoreError> {
    let st = vs.start_cycle(L, cycle, kind, FREEZE, &disks(), None)?;
    let tag = Tag {
        lineage: L,
        cycle,
        epoch: st.epoch,
    };
    let todo: Vec<(u16, u64)> = blocks
        .iter()
        .copied()
        .filter(|&(d, b)| {
            !st.applied
                .contains(d, b * u64::from(G), (b + 1) * u64::from(G))
        })
        .collect();
    for r in send(vs, tag, data, &todo) {
        r.map_err(StoreError::Receive)?;
    }
    commit_blocks(vs, cycle, st.epoch, blocks)
}

fn all_blocks() -> Vec<(u16, u64)> {
    (0..2)
        .flat_map(|d| (0..SIZE / u64::from(G)).map(move |b| (d, b)))
        .collect()
}

/// Rewrites 1..12 random blocks (a fifth of them with zeroes); returns them.
pub(crate) fn mutate(rng: &mut impl Rng, data: &mut Images) -> Vec<(u16, u64)> {
    let mut blocks = Vec::new();
    for _ in 0..rng.gen_range(1..12) {
        let d = rng.gen_range(0..2u16);
        let b = rng.gen_range(0..SIZE / u64::from(G));
        let off = (b * u64::from(G)) as usize;
        let fill = if rng.gen_bool(0.2) { 0 } else { rng.gen() };
        data[d as usize][off..off + G as usize].fill(fill);
        if !blocks.contains(&(d, b)) {
            blocks.push((d, b));
        }
    }
    blocks
}

pub(crate) fn initial(s: &Store, data: &Images) -> (VmStore, BTreeMap<u64, Images>) {
    let mut vs = s.open_vm("vm1", "primary-1").unwrap();
    ship(&mut vs, 1, CycleKind::Initial, data, &all_blocks()).unwrap();
    (vs, BTreeMap::from([(1, data.clone())]))
}

pub(crate) fn read_images(vs: &VmStore) -> Images {
    ["a", "b"]
        .iter()
        .map(|n| fs::read(vs.image_path(n)).unwrap())
        .collect()
}

fn read_point(vs: &VmStore, point: u64) -> Images {
    let v = PointView::open(vs.shared(), point).unwrap();
    (0..2)
        .map(|d| {
            let mut b = vec![0u8; SIZE as usize];
            v.read_at(d, 0, &mut b).unwrap();
            b
        })
        .collect()
}

pub(crate) fn seeded(seed: u64) -> Images {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d = vec![vec![0u8; SIZE as usize]; 2];
    for img in &mut d {
        rng.fill(&mut img[..SIZE as usize / 2]);
    }
    d
}

#[test]
fn cycles_land_in_place_and_every_point_reads_back_exactly() {
    let dir = tmp();
    let s = store(
        dir.path(),
        Retention {
            keep: Some(4),
            ..Retention::keep_all()
        },
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut primary = seeded(1);
    let (mut vs, mut history) = initial(&s, &primary);
    for cycle in 2..=7 {
        let blocks = mutate(&mut rng, &mut primary);
        assert_eq!(
            ship(&mut vs, cycle, CycleKind::Delta, &primary, &blocks).unwrap(),
            Committed::Point
        );
        history.insert(cycle, primary.clone());
        assert!(
            read_images(&vs) == primary,
            "replica differs after cycle {cycle}"
        );
        assert_eq!(vs.buffers().spare(), 0, "an idle VM holds no chunk buffers");
    }
    let points: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
    assert_eq!(points, vec![4, 5, 6, 7]);
    for &k in &points {
        assert!(read_point(&vs, k) == history[&k], "point {k} differs");
        let out = dir.path().join(format!("export-{k}"));
        let v = PointView::open(vs.shared(), k).unwrap();
        let files = export(&v, &out).unwrap();
        for (i, f) in files.iter().enumerate() {
            assert!(
                fs::read(f).unwrap() == history[&k][i],
                "exported point {k} disk {i} differs"
            );
        }
    }
    assert!(matches!(
        PointView::open(vs.shared(), 3),
        Err(StoreError::NoSuchPoint { .. })
    ));
    // Dropping a middle point merges the logs around it; the others still read exactly.
    vs.drop_point(5).unwrap();
    assert_eq!(
        vs.points().iter().map(|p| p.cycle).collect::<Vec<_>>(),
        vec![4, 6, 7]
    );
    for k in [4u64, 6, 7] {
        assert!(
            read_point(&vs, k) == history[&k],
            "after the merge, point {k} differs"
        );
    }
    // ... also after a restart (the merged log is loaded from its index).
    drop(vs);
    let vs = s.open_vm("vm1", "primary-1").unwrap();
    for k in [4u64, 6, 7] {
        assert!(
            read_point(&vs, k) == history[&k],
            "after a restart, point {k} differs"
        );
    }
    // Zero blocks are holes in the replica.
    let f = fs::File::open(vs.image_path("a")).unwrap();
    let allocated: u64 = vmreplica_common::sparse::data_regions(&f, SIZE)
        .unwrap()
        .iter()
        .map(|r| r.1)
        .sum();
    assert!(allocated < SIZE, "replica is not sparse");
    assert_eq!(
        fs::read_dir(vs.dir().join("undo")).unwrap().count(),
        2,
        "no stray undo files"
    );
}

#[test]
fn a_crash_mid_cycle_keeps_the_last_point_readable_and_the_cycle_resumes() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut primary = seeded(2);
    let (mut vs, history) = initial(&s, &primary);
    let mut blocks = mutate(&mut rng, &mut primary);
    blocks.extend(mutate(&mut rng, &mut primary));
    blocks.sort();
    blocks.dedup();
    let (st, tag) = start(&mut vs, 2, CycleKind::Delta);
    let half = blocks.len() / 2;
    for r in send(&vs, tag, &primary, &blocks[..half]) {
        r.unwrap();
    }
    // The images hold part of cycle 2; point 1 reads as it was, through the undo overlay.
    assert!(read_images(&vs) != history[&1]);
    assert!(read_point(&vs, 1) == history[&1]);
    drop(vs); // a crash: nothing is committed
    let mut vs = s.open_vm("vm1", "primary-1").unwrap();
    assert_eq!(vs.last_cycle(), 1);
    assert!(
        read_point(&vs, 1) == history[&1],
        "after the crash, point 1 differs"
    );
    assert_eq!(vs.receiving().map(|r| r.cycle), Some(2));
    // The shipper resumes cycle 2: the replica reports what it holds, the rest follows.
    let st2 = vs
        .start_cycle(L, 2, CycleKind::Delta, FREEZE, &disks(), None)
        .unwrap();
    assert!(st2.continued && st2.epoch > st.epoch);
    assert_eq!(st2.applied, plan(&blocks[..half]));
    let tag2 = Tag {
        epoch: st2.epoch,
        ..tag
    };
    for r in send(&vs, tag2, &primary, &blocks[half..]) {
        r.unwrap();
    }
    commit_blocks(&mut vs, 2, st2.epoch, &blocks).unwrap();
    assert!(read_images(&vs) == primary);
    assert!(read_point(&vs, 1) == history[&1]);
    assert_eq!(vs.last_cycle(), 2);
}

#[test]
fn capture_is_idempotent_across_resends_restarts_and_reconnects() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut primary = seeded(3);
    let (mut vs, history) = initial(&s, &primary);
    let blocks = mutate(&mut rng, &mut primary);
    let (_, tag) = start(&mut vs, 2, CycleKind::Delta);
    // Sent, sent again in the same attempt (a duplicate stream)...
    for r in send(&vs, tag, &primary, &blocks)
        .into_iter()
        .chain(send(&vs, tag, &primary, &blocks))
    {
        r.unwrap();
    }
    // ... again after a reconnect (a new attempt of the same cycle)...
    let st = vs
        .start_cycle(L, 2, CycleKind::Delta, FREEZE, &disks(), None)
        .unwrap();
    let tag = Tag {
        epoch: st.epoch,
        ..tag
    };
    for r in send(&vs, tag, &primary, &blocks) {
        r.unwrap();
    }
    // ... and after a restart: the images hold the new contents, the log the old ones.
    drop(vs);
    let mut vs = s.open_vm("vm1", "primary-1").unwrap();
    let st = vs
        .start_cycle(L, 2, CycleKind::Delta, FREEZE, &disks(), None)
        .unwrap();
    let tag = Tag {
        epoch: st.epoch,
        ..tag
    };
    for r in send(&vs, tag, &primary, &blocks) {
        r.unwrap();
    }
    commit_blocks(&mut vs, 2, st.epoch, &blocks).unwrap();
    assert!(read_images(&vs) == primary);
    assert!(
        read_point(&vs, 1) == history[&1],
        "point 1 differs: a resent chunk captured new contents as old"
    );
}

/// A chunk resent in the same batch as its first copy, or while that copy's undo entries
/// are still being synced, has nothing left to capture: it is captured once (the undo log
/// asserts it in test builds) and written only once those entries are durable (the pipeline
/// asserts the write-ahead order), and every earlier point stays exact.
#[test]
fn chunks_resent_while_their_first_capture_is_in_flight_wait_for_it() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut primary = seeded(5);
    let (mut vs, mut history) = initial(&s, &primary);
    // 12 blocks (data and holes in the replica) rewritten, sent 100 times over in one
    // stream: a batch of up to 64 chunks is covered by the captures of the batches just
    // before it. Cycle after cycle, as whether the first batches overlap depends on timing.
    let blocks: Vec<(u16, u64)> = (0..12u16).map(|i| (i % 2, u64::from(i) * 5)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for cycle in 2..10 {
        for &(d, b) in &blocks {
            let off = (b * u64::from(G)) as usize;
            rng.fill(&mut primary[d as usize][off..off + G as usize]);
        }
        let (_, tag) = start(&mut vs, cycle, CycleKind::Delta);
        let resent: Vec<(u16, u64)> = (0..100).flat_map(|_| blocks.iter().copied()).collect();
        for r in send(&vs, tag, &primary, &resent) {
            r.unwrap();
        }
        commit_blocks(&mut vs, cycle, tag.epoch, &blocks).unwrap();
        history.insert(cycle, primary.clone());
        assert!(read_images(&vs) == primary);
        for (point, images) in &history {
            assert!(read_point(&vs, *point) == *images, "point {point} differs");
        }
    }
}

#[test]
fn a_stale_attempt_can_neither_capture_nor_write() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut primary = seeded(4);
    let (mut vs, history) = initial(&s, &primary);
    let blocks = mutate(&mut rng, &mut primary);
    let (_, old_tag) = start(&mut vs, 2, CycleKind::Delta);
    // A new attempt of the same cycle starts (the shipper reconnected); the first one's
    // stream is still alive and sends other bytes where cycle 2 writes (say, a block it
    // read before a tracker restart): refused.
    let new = vs
        .start_cycle(L, 2, CycleKind::Delta, FREEZE, &disks(), None)
        .unwrap();
    let mut other = primary.clone();
    for &(d, b) in &blocks {
        let off = (b * u64::from(G)) as usize;
        other[d as usize][off..off + G as usize].fill(0x5a);
    }
    for r in send(&vs, old_tag, &other, &blocks) {
        assert_eq!(r.unwrap_err().code, code::STALE);
    }
    assert!(read_images(&vs) == history[&1], "a stale chunk was written");
    // A different cycle replaces the one held in part (rolled back): the old attempt's
    // chunks are refused too, and point 1 stays exact.
    let new_tag = Tag {
        lineage: L,
        cycle: 2,
        epoch: new.epoch,
    };
    for r in send(&vs, new_tag, &primary, &blocks[..1]) {
        r.unwrap();
    }
    let third = vs
        .start_cycle(L, 3, CycleKind::Resync, FREEZE, &disks(), None)
        .unwrap();
    assert!(!third.continued);
    for r in send(&vs, new_tag, &other, &blocks) {
        assert_eq!(r.unwrap_err().code, code::STALE);
    }
    assert!(
        read_images(&vs) == history[&1],
        "the rollback or a stale chunk left changes"
    );
    let tag3 = Tag {
        lineage: L,
        cycle: 3,
        epoch: third.epoch,
    };
    for r in send(&vs, tag3, &primary, &blocks) {
        r.unwrap();
    }
    commit_blocks(&mut vs, 3, third.epoch, &blocks).unwrap();
    assert!(read_images(&vs) == primary);
    assert!(read_point(&vs, 1) == history[&1]);
}

#[test]
fn rollback_restores_the_last_point_and_survives_a_failed_save() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut primary = seeded(5);
    let (mut vs, history) = initial(&s, &primary);
    let blocks = mutate(&mut rng, &mut primary);
    let (_, tag) = start(&mut vs, 2, CycleKind::Delta);
    for r in send(&vs, tag, &primary, &blocks) {
        r.unwrap();
    }
    assert!(read_images(&vs) != history[&1]);
    // The state save after the restore fails: the images are back at point 1 and the log
    // says nothing of cycle 2 is applied any more, so a resume resends all of it.
    vs.fail_save = true;
    assert!(vs.roll_back().is_err());
    assert!(read_images(&vs) == history[&1]);
    drop(vs);
    let mut vs = s.open_vm("vm1", "primary-1").unwrap();
    let again = vs
        .start_cycle(L, 2, CycleKind::Delta, FREEZE, &disks(), None)
        .unwrap();
    assert!(
        again.continued && again.applied.is_empty(),
        "{:?}",
        again.applied
    );
    assert!(vs.roll_back().unwrap());
    assert!(read_images(&vs) == history[&1]);
    assert!(vs.receiving().is_none());
    assert_eq!(fs::read_dir(vs.dir().join("undo")).unwrap().count(), 0);
    assert!(!vs.roll_back().unwrap());
    // An initial copy into an empty replica rolls back to empty images.
    let dir2 = tmp();
    let s2 = store(dir2.path(), Retention::keep_all());
    let mut vs2 = s2.open_vm("vm1", "p").unwrap();
    let (_, tag) = start(&mut vs2, 1, CycleKind::Initial);
    for r in send(&vs2, tag, &primary, &all_blocks()[..20]) {
        r.unwrap();
    }
    assert!(vs2.roll_back().unwrap());
    assert!(read_images(&vs2).iter().all(|i| is_zero(i)));
}

#[test]
fn a_failed_state_save_acknowledges_nothing_and_a_restart_is_consistent() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut primary = seeded(6);
    let (mut vs, history) = initial(&s, &primary);
    let blocks = mutate(&mut rng, &mut primary);
    // The save that would start cycle 2 fails: nothing starts.
    vs.fail_save = true;
    assert!(vs
        .start_cycle(L, 2, CycleKind::Delta, FREEZE, &disks(), None)
        .is_err());
    assert!(vs.receiving().is_none() && vs.sender().is_none());
    let (st, tag) = start(&mut vs, 2, CycleKind::Delta);
    for r in send(&vs, tag, &primary, &blocks) {
        r.unwrap();
    }
    // The save that would record point 2 fails (a full disk): the cycle is not
    // acknowledged, memory and disk still agree it is received in part.
    let set = plan(&blocks);
    vs.fail_save = true;
    let e = vs
        .commit(L, 2, st.epoch, set.len() as u64, set.bytes(), set.digest())
        .unwrap_err();
    assert_eq!(e.code(), code::NO_SPACE, "{e}");
    assert_eq!(vs.last_cycle(), 1);
    assert_eq!(vs.points().len(), 1);
    assert!(read_point(&vs, 1) == history[&1]);
    assert!(matches!(
        PointView::open(vs.shared(), 2),
        Err(StoreError::NoSuchPoint { .. })
    ));
    // The same commit again works, in this process...
    vs.commit(L, 2, st.epoch, set.len() as u64, set.bytes(), set.digest())
        .unwrap();
    assert_eq!(vs.last_cycle(), 2);
    // ... and a failed save after a restart leaves the restart's view consistent too.
    let more = mutate(&mut rng, &mut primary);
    let (st, tag) = start(&mut vs, 3, CycleKind::Delta);
    for r in send(&vs, tag, &primary, &more) {
        r.unwrap();
    }
    let set = plan(&more);
    vs.fail_save = true;
    assert!(vs
        .commit(L, 3, st.epoch, set.len() as u64, set.bytes(), set.digest())
        .is_err());
    drop(vs);
    let mut vs = s.open_vm("vm1", "primary-1").unwrap();
    assert_eq!(
        (vs.last_cycle(), vs.receiving().map(|r| r.cycle)),
        (2, Some(3))
    );
    let st = vs
        .start_cycle(L, 3, CycleKind::Delta, FREEZE, &disks(), None)
        .unwrap();
    assert!(st.continued);
    assert_eq!(st.applied, set);
    vs.commit(L, 3, st.epoch, set.len() as u64, set.bytes(), set.digest())
        .unwrap();
    assert!(read_images(&vs) == primary);
    assert!(read_point(&vs, 1) == history[&1]);
}

#[test]
fn empty_cycles_advance_the_replica_without_a_point() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let primary = seeded(7);
    let (mut vs, _) = initial(&s, &primary);
    for c in 2..=5 {
        assert_eq!(
            ship(&mut vs, c, CycleKind::Delta, &primary, &[]).unwrap(),
            Committed::Empty
        );
    }
    assert_eq!(vs.last_cycle(), 5);
    assert_eq!(vs.points().len(), 1);
    assert_eq!(
        vs.history().last().map(|h| (h.first_cycle, h.last_cycle)),
        Some((1, 5))
    );
    // The sequence holds: 7 after 5 is a gap.
    assert!(matches!(
        vs.start_cycle(L, 7, CycleKind::Delta, FREEZE, &disks(), None),
        Err(StoreError::Refused(_))
    ));
    let mut p2 = primary.clone();
    p2[0][..G as usize].fill(3);
    assert_eq!(
        ship(&mut vs, 6, CycleKind::Delta, &p2, &[(0, 0)]).unwrap(),
        Committed::Point
    );
    assert_eq!(
        vs.points().iter().map(|p| p.cycle).collect::<Vec<_>>(),
        vec![1, 6]
    );
    assert!(read_point(&vs, 1) == primary);
    assert_eq!(fs::read_dir(vs.dir().join("undo")).unwrap().count(), 1);
    // An initial copy of an all-zero disk is a point even though it wrote nothing.
    let dir2 = tmp();
    let s2 = store(dir2.path(), Retention::keep_all());
    let mut vs2 = s2.open_vm("vm1", "p").unwrap();
    assert_eq!(
        ship(&mut vs2, 4, CycleKind::Initial, &primary, &[]).unwrap(),
        Committed::Point
    );
    assert_eq!(vs2.points().len(), 1);
}

#[test]
fn refused_cycles_change_nothing_and_the_cycle_held_in_part_goes_on() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut primary = seeded(8);
    let (mut vs, history) = initial(&s, &primary);
    let blocks = mutate(&mut rng, &mut primary);
    let (_, tag) = start(&mut vs, 2, CycleKind::Delta);
    for r in send(&vs, tag, &primary, &blocks) {
        r.unwrap();
    }
    let other = Lineage([0x22; 16]);
    for (l, c, k) in [
        (other, 2, CycleKind::Delta),
        (other, 9, CycleKind::Resync),
        (L, 3, CycleKind::Delta),
        (L, 9, CycleKind::Initial),
        (L, 1, CycleKind::Resync),
    ] {
        let e = vs.start_cycle(l, c, k, FREEZE, &disks(), None).unwrap_err();
        assert!(matches!(e, StoreError::Refused(_)), "{e}");
        assert_eq!(e.code(), code::LINEAGE);
    }
    let mut more = disks();
    more[0].size += 4096;
    assert!(matches!(
        vs.start_cycle(L, 2, CycleKind::Delta, FREEZE, &more, None),
        Err(StoreError::DiskMismatch { .. })
    ));
    // The cycle held in part is untouched: it resumes and commits.
    let st = vs
        .start_cycle(L, 2, CycleKind::Delta, FREEZE, &disks(), None)
        .unwrap();
    assert!(st.continued);
    assert_eq!(st.applied, plan(&blocks));
    let set = plan(&blocks);
    // A manifest that promises more than was applied: the cycle stays held in part.
    let e = vs
        .commit(
            L,
            2,
            st.epoch,
            set.len() as u64 + 1,
            set.bytes(),
            set.digest(),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Incomplete { .. }), "{e}");
    assert!(matches!(
        vs.commit(L, 2, st.epoch - 1, 0, 0, 0),
        Err(StoreError::NoSuchCycle { .. })
    ));
    vs.commit(L, 2, st.epoch, set.len() as u64, set.bytes(), set.digest())
        .unwrap();
    assert!(read_point(&vs, 1) == history[&1]);
    drop(vs);
    assert!(matches!(
        s.open_vm("vm1", "p2"),
        Err(StoreError::NotOwner { .. })
    ));
    assert!(matches!(
        s.open_vm("../x", "p1"),
        Err(StoreError::Name { .. })
    ));
}

#[test]
fn an_image_of_the_wrong_size_and_an_old_store_are_refused_at_open() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let (vs, _) = initial(&s, &seeded(9));
    let p = vs.image_path("b");
    drop(vs);
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(SIZE + 512)
        .unwrap();
    let e = s.open_vm("vm1", "primary-1").err().unwrap();
    assert!(matches!(e, StoreError::ImageSize { .. }), "{e}");
    assert!(e.to_string().contains("b.img"), "{e}");
    // A store written by the previous version (state format 1).
    let old = dir.path().join("vm2");
    fs::create_dir_all(&old).unwrap();
    fs::write(
        old.join("state.json"),
        r#"{"format":"vmreplica-replica","version":1,"state":{}}"#,
    )
    .unwrap();
    let e = s.open_existing("vm2").err().unwrap();
    assert!(e.to_string().contains("older vmreplica"), "{e}");
    assert!(s.points("vm2").is_err());
}

/// A record older than the replica's files (a `state.json` restored from a backup) is
/// refused at every open, saying so, whichever undo log it names is gone: the one of the
/// cycle it holds in part too, and before a missing image could hide it behind a bare
/// "No such file".
#[test]
fn a_record_whose_undo_logs_are_gone_is_refused_at_every_open() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut primary = seeded(5);
    let (mut vs, _) = initial(&s, &primary);
    let blocks = mutate(&mut rng, &mut primary);
    ship(&mut vs, 2, CycleKind::Delta, &primary, &blocks).unwrap();
    let blocks = mutate(&mut rng, &mut primary);
    let (_, tag) = start(&mut vs, 3, CycleKind::Delta);
    for r in send(&vs, tag, &primary, &blocks) {
        r.unwrap();
    }
    let receiving = vs.undo_path(&vs.state.receiving.as_ref().unwrap().log);
    let point_log = vs.undo_path(&vs.state.undo[0].file);
    let image = vs.image_path("b");
    drop(vs);
    let refused = |what: &str| {
        for e in [
            s.open_vm("vm1", "primary-1").err().unwrap(),
            s.open_existing("vm1").err().unwrap(),
        ] {
            let m = e.to_string();
            assert!(
                m.contains("restored from a backup") && m.contains(what) && m.contains("VM vm1"),
                "{m}"
            );
        }
    };
    // The cycle held in part: its undo log is gone.
    let kept = fs::read(&receiving).unwrap();
    fs::remove_file(&receiving).unwrap();
    refused("cycle 3");
    fs::write(&receiving, kept).unwrap();
    // A point's undo log and an image are gone: the record is named, not the image.
    fs::remove_file(&point_log).unwrap();
    fs::remove_file(&image).unwrap();
    refused("points 2..1");
    assert!(
        !image.exists() && receiving.exists(),
        "the refusal changed files"
    );
}

#[test]
fn exports_refuse_the_store_and_existing_images() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let (vs, _) = initial(&s, &seeded(10));
    let names = vs.disk_names();
    for inside in [
        dir.path().join("vm1"),
        dir.path().join("new/sub"),
        dir.path().to_path_buf(),
    ] {
        let e = check_export_dir(dir.path(), &inside, &names).unwrap_err();
        assert!(e.to_string().contains("inside the replica store"), "{e}");
    }
    let out = tempfile::tempdir().unwrap();
    check_export_dir(dir.path(), out.path(), &names).unwrap();
    fs::write(out.path().join("b.img"), b"mine").unwrap();
    let e = check_export_dir(dir.path(), out.path(), &names).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    let v = PointView::open(vs.shared(), 1).unwrap();
    assert!(export(&v, out.path()).is_err());
    assert_eq!(fs::read(out.path().join("b.img")).unwrap(), b"mine");
    assert!(
        !out.path().join("a.img").exists(),
        "a half export is removed"
    );
}

#[test]
fn one_process_at_a_time_opens_a_replica_and_points_are_readable_meanwhile() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let (vs, _) = initial(&s, &seeded(11));
    assert!(matches!(
        s.open_vm("vm1", "primary-1"),
        Err(StoreError::Busy { .. })
    ));
    let e = s.open_existing("vm1").err().unwrap();
    assert!(e.to_string().contains("open in another process"), "{e}");
    let listed = s.points("vm1").unwrap();
    assert_eq!(listed, vs.points());
    assert_eq!(listed[0].kind, "initial");
    drop(vs);
    drop(s.open_existing("vm1").unwrap());
    assert!(matches!(
        s.open_existing("nope"),
        Err(StoreError::NoReplica(_))
    ));
    assert!(!dir.path().join("nope.lock").exists());
}

/// Issue 17's test: readers compare a view of point N with an exported copy of N while 20
/// cycles land (each rewriting blocks the readers read), and retention (capped at 3 points)
/// runs after each: the view's pin keeps N.
#[test]
fn a_point_view_reads_point_n_exactly_while_20_cycles_land() {
    let dir = tmp();
    let s = store(
        dir.path(),
        Retention {
            keep: Some(3),
            ..Retention::keep_all()
        },
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut primary = seeded(12);
    let (mut vs, _) = initial(&s, &primary);
    let b = mutate(&mut rng, &mut primary);
    ship(&mut vs, 2, CycleKind::Delta, &primary, &b).unwrap();
    let view = Arc::new(PointView::open(vs.shared(), 2).unwrap());
    let copy = tempfile::tempdir().unwrap();
    let files = export(&view, copy.path()).unwrap();
    let want: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    assert!(want == primary);
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (view, want, stop) = (Arc::clone(&view), want.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i);
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) || reads < 50 {
                    let d = rng.gen_range(0..2usize);
                    let len = rng.gen_range(1..300_000u64);
                    let off = rng.gen_range(0..SIZE - len);
                    let mut buf = vec![0u8; len as usize];
                    view.read_at(d, off, &mut buf).unwrap();
                    assert!(
                        buf[..] == want[d][off as usize..(off + len) as usize],
                        "point 2 read differs at disk {d} {off}+{len}"
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for cycle in 3..=22 {
        let mut blocks = mutate(&mut rng, &mut primary);
        // Big cycles, so reads race with captures and writes.
        for _ in 0..4 {
            blocks.extend(mutate(&mut rng, &mut primary));
        }
        blocks.sort();
        blocks.dedup();
        ship(&mut vs, cycle, CycleKind::Delta, &primary, &blocks).unwrap();
        let points: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
        assert!(
            points.contains(&2),
            "retention dropped the viewed point: {points:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() >= 50);
    }
    // Let go of the view: the next retention drops point 2.
    drop(view);
    let b = mutate(&mut rng, &mut primary);
    ship(&mut vs, 23, CycleKind::Delta, &primary, &b).unwrap();
    let points: Vec<u64> = vs.points().iter().map(|p| p.cycle).collect();
    assert_eq!(points, vec![21, 22, 23]);
    assert!(read_images(&vs) == primary);
}

/// A point's block status: the image's holes are holes; what a later cycle overwrote is what
/// its undo log recorded: data, or zeroes not claimed to be a hole (the log does not tell a
/// hole from written zeroes).
#[test]
fn point_extents_tell_data_holes_and_recorded_zeroes_apart() {
    use crate::pointview::{Extent, ExtentKind};
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    // Disk a: data in its first half, a hole in its second.
    let mut primary = seeded(3);
    let (mut vs, _) = initial(&s, &primary);
    let g = u64::from(G);
    let half = SIZE / 2;
    // Cycle 2: block 0 becomes zeroes, the second block of the hole becomes data.
    primary[0][..G as usize].fill(0);
    let hb = (half / g + 1) as usize;
    primary[0][hb * G as usize..(hb + 1) * G as usize].fill(9);
    ship(
        &mut vs,
        2,
        CycleKind::Delta,
        &primary,
        &[(0, 0), (0, hb as u64)],
    )
    .unwrap();
    let ext = |point| {
        PointView::open(vs.shared(), point)
            .unwrap()
            .extents(0, 0, SIZE)
            .unwrap()
    };
    let e = |offset, len, kind| Extent { offset, len, kind };
    assert_eq!(
        ext(1),
        vec![
            e(0, half, ExtentKind::Data),
            e(half, g, ExtentKind::Hole),
            e(half + g, g, ExtentKind::Zero),
            e(half + 2 * g, half - 2 * g, ExtentKind::Hole),
        ]
    );
    assert_eq!(
        ext(2),
        vec![
            e(0, g, ExtentKind::Hole),
            e(g, half - g, ExtentKind::Data),
            e(half, g, ExtentKind::Hole),
            e(half + g, g, ExtentKind::Data),
            e(half + 2 * g, half - 2 * g, ExtentKind::Hole),
        ]
    );
}

/// What a cycle says of itself is recorded: app-consistent points, the primary's interval
/// and RPO limit, the excluded disks (failover recreates them blank and sparse), the
/// history status reads.
#[test]
fn cycle_metadata_marks_points_and_records_excluded_disks() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let data = seeded(3);
    let (mut vs, _) = initial(&s, &data);
    let meta = vmreplica_common::wire::CycleMeta {
        app_consistent: true,
        frozen_at: 1_796_000_000,
        interval: 60,
        rpo_limit: 900,
        excluded: vec![("swap".into(), 3 << 20)],
    };
    let mut data2 = data.clone();
    data2[0][..G as usize].fill(9);
    let st = vs
        .start_cycle_with(L, 2, CycleKind::Delta, FREEZE, &disks(), None, &meta)
        .unwrap();
    let tag = Tag {
        lineage: L,
        cycle: 2,
        epoch: st.epoch,
    };
    for r in send(&vs, tag, &data2, &[(0, 0)]) {
        r.unwrap();
    }
    let set = plan(&[(0, 0)]);
    vs.commit(L, 2, st.epoch, set.len() as u64, set.bytes(), set.digest())
        .unwrap();
    let points = vs.points();
    assert!(
        !points[0].app_consistent && points[1].app_consistent,
        "{points:?}"
    );
    assert_eq!(vs.excluded_disks(), vec![("swap".to_string(), 3 << 20)]);
    let state = VmState::load(&dir.path().join("vm1/state.json"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (state.ops.interval, state.ops.rpo_limit),
        (Some(60), Some(900))
    );
    assert_eq!(state.ops.last_frozen_at, 1_796_000_000);
    assert_eq!(state.ops.history.totals.cycles, 2);
    assert!(state.ops.history.last().unwrap().app_consistent);
    // Blank sparse images for a failover, again on a rerun; another size is refused.
    let out = dir.path().join("vm1/disks");
    let made = vs.create_excluded_images(&out).unwrap();
    assert_eq!(made, vec![("swap".to_string(), out.join("swap.img"))]);
    let m = fs::metadata(out.join("swap.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((m.len(), m.blocks()), (3 << 20, 0));
    vs.create_excluded_images(&out).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(out.join("swap.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    assert!(matches!(
        vs.create_excluded_images(&out),
        Err(StoreError::ImageSize { .. })
    ));
}

/// R1 finding 4, without a race: a commit publishes its point before it moves the cycle's
/// log out of `receiving`; a view of the new point opened in that window must read that
/// point, not the one before it from the cycle's own undo log.
#[test]
fn a_view_of_a_point_whose_log_is_still_the_receiving_one_reads_that_point() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let data = seeded(3);
    let (mut vs, _) = initial(&s, &data);
    let mut next = data.clone();
    next[0][..G as usize].fill(0x77);
    ship(&mut vs, 2, CycleKind::Delta, &next, &[(0, 0)]).unwrap();
    // Back into the commit's window: point 2 is published, its log still the receiving one.
    {
        let mut chain = vs.shared.chain.write().unwrap();
        let log = chain.logs.pop().expect("cycle 2's log");
        assert_eq!((log.from, log.to), (2, 1));
        chain.receiving = Some(log);
    }
    assert!(read_point(&vs, 2) == next, "point 2 reads point 1's data");
    assert!(read_point(&vs, 1) == data);
}

/// Within one pipeline (across batches and a resumed attempt) what it learnt of the images'
/// holes stays right while the cycle writes and punches beside it: holes are recorded as
/// holes and data as data, so a rollback gives back the very layout (the filled hole is a
/// hole again, the punched data is data again) and contents.
#[test]
fn holes_learnt_in_a_cycle_stay_right_while_it_writes_beside_them() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    // Each disk: data in its first half, a hole in its second.
    let mut primary = seeded(8);
    let (mut vs, history) = initial(&s, &primary);
    let g = u64::from(G);
    let half = SIZE / g / 2;
    let layout = |vs: &VmStore| {
        let f = fs::File::open(vs.image_path("a")).unwrap();
        vmreplica_common::sparse::data_regions(&f, SIZE).unwrap()
    };
    let before = layout(&vs);
    assert_eq!(before, vec![(0, SIZE / 2)]);
    let set = |primary: &mut Images, b: u64, fill: u8| {
        let at = (b * g) as usize;
        primary[0][at..at + G as usize].fill(fill);
        (0u16, b)
    };
    // One batch each: fill the hole's second block, then ask about its neighbours; punch a
    // data block (zeroes), then ask about the one after it.
    let (_, tag) = start(&mut vs, 2, CycleKind::Delta);
    let batches = [
        set(&mut primary, half + 1, 9),
        set(&mut primary, half + 2, 8),
        set(&mut primary, half, 7),
        set(&mut primary, 1, 0),
        set(&mut primary, 2, 6),
    ];
    for b in batches {
        for r in send(&vs, tag, &primary, &[b]) {
            r.unwrap();
        }
    }
    // A resumed attempt keeps the pipeline (and what it learnt).
    let (st, tag) = start(&mut vs, 2, CycleKind::Delta);
    assert!(st.continued);
    let batches = [
        set(&mut primary, half + 3, 5),
        set(&mut primary, 3, 0),
        set(&mut primary, half - 1, 4),
    ];
    for b in batches {
        for r in send(&vs, tag, &primary, &[b]) {
            r.unwrap();
        }
    }
    assert!(read_images(&vs) == primary);
    assert!(layout(&vs) != before);
    assert!(vs.roll_back().unwrap());
    assert!(read_images(&vs) == history[&1]);
    assert_eq!(
        layout(&vs),
        before,
        "holes were recorded as holes, data as data"
    );
}
