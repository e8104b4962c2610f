//! What failover asks of the tracker, through its API: a seal refuses writes (and survives a
//! restart), a baseline keeps the failover point readable and is never a resync when its
//! copy-on-write overflows, divergent ranges go in (`mark_dirty`) and come out
//! (`dirty_ranges`), the last write's time is kept, and the lineage records its parent.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vmreplica_common::lineage::Lineage;
use vmreplica_nbd::device::Zero;
use vmreplica_nbd::BlockDevice;
use vmreplica_tracker::control::{self, Request};
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::{CowLimit, Parent, Tracker, TrackerConfig};

const MIB: u64 = 1 << 20;
const G: u64 = 65536;

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn config(dir: &Path, disks: &[(&str, &Path)]) -> TrackerConfig {
    TrackerConfig::new(
        dir.join("state"),
        disks
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_path_buf()))
            .collect(),
    )
}

fn wait<T: Send + 'static>(f: impl FnOnce(Box<dyn FnOnce(T) + Send>)) -> T {
    let (tx, rx) = mpsc::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the request never completed")
}

fn try_write(d: &dyn BlockDevice, offset: u64, data: Vec<u8>) -> std::io::Result<()> {
    wait(|done| d.write(offset, data, false, done))
}

fn read(d: &dyn BlockDevice, offset: u64, len: u32) -> Vec<u8> {
    wait(|done| d.read(offset, len, done)).unwrap()
}

fn active_dirty(t: &Tracker) -> u64 {
    let tr = t.disks()[0].tracking().unwrap();
    tr.bitmap().count(tr.slots().active)
}

#[test]
fn a_sealed_disk_refuses_every_write_serves_reads_and_stays_sealed_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 16 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    let d = t.disks()[0].clone();
    try_write(&*d, 0, vec![5; G as usize]).unwrap();
    t.seal(true).unwrap();
    let eperm = Some(libc::EPERM);
    let e = try_write(&*d, G, vec![6; 4096]).unwrap_err();
    assert_eq!(e.raw_os_error(), eperm, "{e}");
    let e = wait(|done| d.trim(0, G, false, done)).unwrap_err();
    assert_eq!(e.raw_os_error(), eperm);
    let z = Zero {
        fua: false,
        no_hole: false,
        fast: false,
    };
    let e = wait(|done| d.write_zeroes(0, G, z, done)).unwrap_err();
    assert_eq!(e.raw_os_error(), eperm);
    assert_eq!(read(&*d, 0, 4096), vec![5; 4096], "reads are served");
    assert_eq!(
        read(&*d, G, 4096),
        vec![0; 4096],
        "the refused write left nothing"
    );
    assert_eq!(active_dirty(&t), 1, "a refused write marks nothing dirty");
    // Freezing (the final cycle) works while sealed.
    let g = t.freeze().unwrap();
    assert_eq!(g.disks[0].blocks, 1);
    t.release_proven(g.generation, None, true).unwrap();
    drop(d);
    drop(t);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    assert!(t.state().sealed);
    let d = t.disks()[0].clone();
    assert_eq!(
        try_write(&*d, 0, vec![7; 4096]).unwrap_err().raw_os_error(),
        eperm,
        "the seal did not survive a restart"
    );
    t.seal(false).unwrap();
    try_write(&*d, 0, vec![7; 4096]).unwrap();
    assert_eq!(read(&*d, 0, 4096), vec![7; 4096]);
    assert!(!t.state().sealed);
}

/// A baseline keeps the failover point: what the failed-over VM overwrites is read back as
/// it was (that is what a cancel puts back), it is released without a replica's proof, and
/// the writes since the failover stay in the active slot.
#[test]
fn a_baseline_keeps_the_failover_point_and_is_released_without_proof() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 16 * MIB);
    std::fs::write(&img, vec![3u8; 4 * MIB as usize]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    let l2 = Lineage([2; 16]);
    let parent = Parent {
        lineage: Lineage([1; 16]),
        cycle: 41,
    };
    t.set_lineage_from(l2, 42, Some(parent), false).unwrap();
    let g = t.freeze_baseline().unwrap();
    assert!(g.baseline && g.full && g.generation == 42, "{g:?}");
    let d = t.disks()[0].clone();
    try_write(&*d, MIB, vec![9; 2 * G as usize]).unwrap();
    try_write(&*d, 8 * MIB, vec![8; G as usize]).unwrap();
    let r = FrozenReader::open(&g.disks[0]).unwrap();
    let copied = r.copied_blocks().unwrap();
    assert_eq!(copied, vec![16, 17, 128]);
    let mut buf = vec![0u8; 3 * G as usize];
    r.read(MIB - G, &mut buf).unwrap();
    assert!(
        buf.iter().all(|b| *b == 3),
        "the baseline lost the failover point"
    );
    r.read(8 * MIB, &mut buf[..G as usize]).unwrap();
    assert!(buf[..G as usize].iter().all(|b| *b == 0));
    assert_eq!(active_dirty(&t), 3);
    // The shipper's view: a frozen baseline, never to be shipped.
    let st = t.state();
    assert!(st.frozen.as_ref().unwrap().baseline);
    assert_eq!(st.parent, Some(parent));
    // Dirty ranges leave the baseline's (every) block out.
    assert_eq!(
        t.dirty_ranges().unwrap(),
        vec![("a".to_string(), vec![(MIB, 2 * G), (8 * MIB, G)])]
    );
    drop(r);
    // Committing the failover releases it, without a proof.
    t.release_proven(g.generation, None, false).unwrap();
    assert!(t.frozen().is_none());
    assert_eq!(active_dirty(&t), 3);
    // The parent stays recorded for the same lineage.
    t.set_lineage(l2, 43, false).unwrap();
    assert_eq!(t.state().parent, Some(parent));
}

/// The baseline's copy-on-write passes its limit: the baseline alone is dropped (cancel is
/// no longer possible), the write goes ahead, and no disk is marked for a resync: the writes
/// since the failover are tracked as before. Also across a restart.
#[test]
fn a_baseline_whose_copy_on_write_overflows_is_dropped_without_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 32 * MIB);
    let mut cfg = config(dir.path(), &[("a", &img)]);
    cfg.cow_limit = CowLimit::Bytes(MIB);
    let t = Tracker::open(cfg).unwrap();
    t.set_lineage(Lineage([2; 16]), 10, false).unwrap();
    let g = t.freeze_baseline().unwrap();
    let d = t.disks()[0].clone();
    // 4 MiB of writes: past the 1 MiB the copies may take.
    for i in 0..4 {
        try_write(&*d, i * MIB, vec![4; MIB as usize]).unwrap();
    }
    assert_eq!(read(&*d, 3 * MIB, 4096), vec![4; 4096]);
    let st = t.state();
    assert!(st.frozen.is_none(), "the baseline was kept: {st:?}");
    assert!(
        !st.disks[0].resync_required,
        "a dropped baseline must not cost a resync"
    );
    assert_eq!(
        active_dirty(&t),
        64,
        "the writes since the failover are tracked"
    );
    assert!(
        FrozenReader::open(&g.disks[0]).is_err()
            || FrozenReader::open(&g.disks[0])
                .unwrap()
                .copied_blocks()
                .is_err(),
        "the dropped baseline is still readable"
    );
    // A normal freeze works again, and what it ships is the writes since the failover.
    let g2 = t.freeze().unwrap();
    assert_eq!(g2.disks[0].blocks, 64);
    t.merge(g2.generation).unwrap();
    drop(d);
    drop(t);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    assert!(!t.state().disks[0].resync_required);
    assert_eq!(active_dirty(&t), 64);
}

/// A tracker killed while its baseline had already overflowed (the drop not yet saved):
/// on restart the baseline is dropped, not turned into a resync.
#[test]
fn a_baseline_found_abandoned_at_start_is_dropped_without_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 16 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    t.set_lineage(Lineage([2; 16]), 5, false).unwrap();
    t.freeze_baseline().unwrap();
    let d = t.disks()[0].clone();
    try_write(&*d, 0, vec![1; G as usize]).unwrap();
    // What the failure hook does first, before the state saying so is saved.
    d.tracking().unwrap().abandon();
    let state = std::fs::read(dir.path().join("state/tracker.json")).unwrap();
    drop(d);
    drop(t);
    // As if killed before the drop was saved: the state still names the baseline.
    std::fs::write(dir.path().join("state/tracker.json"), state).unwrap();
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    let st = t.state();
    assert!(st.frozen.is_none());
    assert!(!st.disks[0].resync_required, "{st:?}");
    assert!(active_dirty(&t) >= 1);
}

#[test]
fn divergent_ranges_go_in_with_mark_dirty_and_come_out_with_dirty_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 16 * MIB);
    let b = image(dir.path(), "b.img", 8 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &a), ("b", &b)])).unwrap();
    t.mark_dirty("a", &[(100, 10), (MIB, 3 * G)]).unwrap();
    t.mark_dirty("b", &[(8 * MIB - 1, 1)]).unwrap();
    let e = t.mark_dirty("b", &[(8 * MIB, 1)]).unwrap_err().to_string();
    assert!(e.contains("beyond its end"), "{e}");
    let e = t.mark_dirty("c", &[(0, 1)]).unwrap_err().to_string();
    assert!(e.contains("no disk named \"c\""), "{e}");
    let want = vec![
        ("a".to_string(), vec![(0, G), (MIB, 3 * G)]),
        ("b".to_string(), vec![(8 * MIB - G, G)]),
    ];
    assert_eq!(t.dirty_ranges().unwrap(), want);
    // A frozen generation's blocks count (they are not replicated yet), and they ship.
    let g = t.freeze().unwrap();
    assert_eq!(g.disks[0].blocks, 4);
    t.disks()[0].write(5 * MIB, vec![1; 10], false, Box::new(|_| {}));
    std::thread::sleep(Duration::from_millis(200));
    let mut want2 = want.clone();
    want2[0].1.push((5 * MIB, G));
    assert_eq!(t.dirty_ranges().unwrap(), want2);
    // Durable: after a restart the marks are there.
    t.merge(g.generation).unwrap();
    drop(t);
    let t = Tracker::open(config(dir.path(), &[("a", &a), ("b", &b)])).unwrap();
    assert_eq!(t.dirty_ranges().unwrap(), want2);
}

/// The control socket's failover requests, as the applier and the failover commands send
/// them, and the status fields they read.
#[test]
fn the_control_socket_takes_the_failover_requests() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 16 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    let call = |req: Request| -> serde_json::Value {
        let line = serde_json::to_string(&req).unwrap();
        control::handle(&t, &line)
    };
    let l2 = Lineage([7; 16]);
    let r = call(Request::SetLineage {
        lineage: l2,
        next_generation: 12,
        force: false,
        parent: Some(Parent {
            lineage: Lineage([6; 16]),
            cycle: 11,
        }),
    });
    assert_eq!(r["ok"], true, "{r}");
    let r = call(Request::Freeze {
        full: false,
        baseline: true,
    });
    assert_eq!(r["result"]["baseline"], true, "{r}");
    assert_eq!(r["result"]["generation"], 12);
    let r = call(Request::MarkDirty {
        disk: "a".into(),
        ranges: vec![(0, 4096)],
    });
    assert_eq!(r["ok"], true, "{r}");
    let r = call(Request::DirtyRanges);
    assert_eq!(
        r["result"][0]["ranges"][0],
        serde_json::json!([0, G]),
        "{r}"
    );
    assert_eq!(call(Request::Seal)["ok"], true);
    let st = call(Request::Status);
    let st = &st["result"];
    assert_eq!(st["sealed"], true);
    assert_eq!(st["parent"]["cycle"], 11);
    assert_eq!(st["frozen"]["baseline"], true);
    assert_eq!(st["pid"], std::process::id());
    assert_eq!(call(Request::Unseal)["ok"], true);
    // The unparsable and the unknown are refused with a message.
    let r = control::handle(&t, r#"{"op":"mark-dirty","disk":"a","ranges":[[1]]}"#);
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("bad request"), "{r}");
}

/// The last write's time: taken at each write, saved within seconds and at a clean stop,
/// read back by a new tracker (a split brain is an old primary that wrote after a
/// failover).
#[test]
fn the_last_write_time_is_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 16 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    assert_eq!(t.last_write_at(), 0);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    try_write(&*t.disks()[0], 0, vec![1; 4096]).unwrap();
    let at = t.last_write_at();
    assert!(at >= before, "{at} < {before}");
    // Saved by the background thread within a few seconds, without a stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while vmreplica_tracker::failover::read_stamp(&dir.path().join("state")) != at {
        assert!(std::time::Instant::now() < deadline, "never saved");
        std::thread::sleep(Duration::from_millis(100));
    }
    t.close().unwrap();
    drop(t);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    assert_eq!(t.last_write_at(), at);
}
