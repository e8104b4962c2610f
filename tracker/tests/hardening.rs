//! The tracker's error paths, driven through its API: a freeze whose state cannot be saved,
//! zeroing that the file system cannot do while freezes drain writes, an engine that refuses
//! submissions, copy-on-write past its limit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vmreplica_common::engine::{self, Callback, Engine, Op, Rejected};
use vmreplica_nbd::device::Zero;
use vmreplica_nbd::BlockDevice;
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::{CowLimit, Tracker, TrackerConfig};

const MIB: u64 = 1 << 20;

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

/// Waits for a device callback, failing the test instead of hanging.
fn wait<T: Send + 'static>(f: impl FnOnce(Box<dyn FnOnce(T) + Send>)) -> T {
    let (tx, rx) = mpsc::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the request never completed")
}

fn write(d: &dyn BlockDevice, offset: u64, data: Vec<u8>) {
    wait(|done| d.write(offset, data, false, done)).unwrap();
}

fn read(d: &dyn BlockDevice, offset: u64, len: u32) -> Vec<u8> {
    wait(|done| d.read(offset, len, done)).unwrap()
}

#[test]
fn a_freeze_whose_state_cannot_be_saved_keeps_every_dirty_block() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 64 * MIB);
    let b = image(dir.path(), "b.img", 64 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &a), ("b", &b)])).unwrap();
    for (i, d) in t.disks().iter().enumerate() {
        write(&**d, (i as u64 + 1) * MIB, vec![7; MIB as usize]);
    }
    let dirty = |t: &Tracker| -> Vec<u64> {
        t.disks()
            .iter()
            .map(|d| {
                let tr = d.tracking().unwrap();
                tr.bitmap().count(tr.slots().active)
            })
            .collect()
    };
    let before = dirty(&t);
    assert_eq!(before, vec![16, 16]);
    // The state file cannot be written (its temporary name is taken by a directory).
    let blocker = dir.path().join("state/.tracker.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    for _ in 0..3 {
        let e = t.freeze().unwrap_err().to_string();
        assert!(e.contains("tracker.json"), "{e}");
        assert!(t.frozen().is_none());
        assert_eq!(dirty(&t), before, "a failed freeze changed the dirty sets");
    }
    std::fs::remove_dir(&blocker).unwrap();
    let g = t.freeze().unwrap();
    assert_eq!(
        g.disks.iter().map(|d| d.blocks).collect::<Vec<_>>(),
        before,
        "the generation lost blocks written before the failed freezes: {g:?}"
    );
    for d in &g.disks {
        assert_eq!(FrozenReader::open(d).unwrap().blocks().unwrap().len(), 16);
    }
    // Release and merge that cannot save leave the generation frozen and whole.
    std::fs::create_dir(&blocker).unwrap();
    assert!(t.release(g.generation).is_err());
    assert!(t.merge(g.generation).is_err());
    assert_eq!(t.frozen().unwrap().disks, g.disks);
    std::fs::remove_dir(&blocker).unwrap();
    t.merge(g.generation).unwrap();
    assert_eq!(dirty(&t), before);
    drop(t);
    // And the state on disk agrees after a restart.
    let t = Tracker::open(config(dir.path(), &[("a", &a), ("b", &b)])).unwrap();
    assert_eq!(dirty(&t), before);
}

/// Zeroing a range where the file system cannot (tmpfs has no FALLOC_FL_ZERO_RANGE) falls
/// back to writing zeroes. That fallback once ran on the io_uring completion thread and waited
/// at the write gate there: a freeze draining writes then waited for completions that thread
/// could no longer deliver, and every write and the control socket hung.
#[test]
fn zeroing_that_the_file_system_cannot_do_never_stalls_a_freeze() {
    let shm = Path::new("/dev/shm");
    let dir = tempfile::tempdir_in(shm).unwrap();
    let img = image(dir.path(), "a.img", 32 * MIB);
    let mut cfg = config(dir.path(), &[("a", &img)]);
    cfg.engine = Some(require_uring());
    let t = Arc::new(Tracker::open(cfg).unwrap());
    let d: Arc<dyn BlockDevice> = t.disks()[0].clone();
    write(&*d, 0, vec![9; 8 * MIB as usize]);
    let freezer = {
        let t = Arc::clone(&t);
        std::thread::spawn(move || {
            for _ in 0..200 {
                let g = t.freeze().unwrap();
                t.merge(g.generation).unwrap();
            }
        })
    };
    let (tx, rx) = mpsc::channel();
    let mut sent = 0;
    while !freezer.is_finished() {
        for i in 0..8u64 {
            let tx = tx.clone();
            let done = Box::new(move |r: std::io::Result<()>| tx.send(r).unwrap());
            if i % 2 == 0 {
                let z = Zero {
                    no_hole: true,
                    ..Zero::default()
                };
                d.write_zeroes(i * MIB, MIB, z, done);
            } else {
                d.write(i * MIB, vec![i as u8; MIB as usize], false, done);
            }
            sent += 1;
        }
        for _ in 0..8 {
            rx.recv_timeout(Duration::from_secs(20))
                .expect("a write never completed: the completion thread is stuck")
                .unwrap();
            sent -= 1;
        }
    }
    assert_eq!(sent, 0);
    freezer.join().unwrap();
    assert!(read(&*d, 0, MIB as u32).iter().all(|b| *b == 0));
    assert!(read(&*d, MIB, MIB as u32).iter().all(|b| *b == 1));
}

fn require_uring() -> Arc<dyn Engine> {
    match engine::UringEngine::new(64) {
        Ok(e) => Arc::new(e),
        Err(e) if engine::uring_required() => panic!("io_uring required: {e}"),
        Err(e) => {
            eprintln!("io_uring unavailable ({e}); the thread pool runs instead");
            Arc::new(engine::PoolEngine::new(4))
        }
    }
}

/// An engine that refuses every other submission, as a full submission queue would.
struct Refusing {
    inner: Arc<dyn Engine>,
    n: AtomicU32,
    refused: AtomicU32,
}

impl Engine for Refusing {
    fn try_submit(&self, op: Op, done: Callback) -> Result<(), Rejected> {
        if self.n.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Rejected {
                error: std::io::Error::from_raw_os_error(libc::EBUSY),
                op,
                done,
            });
        }
        self.inner.try_submit(op, done)
    }
    fn name(&self) -> &'static str {
        "refusing"
    }
}

#[test]
fn requests_the_engine_refuses_still_complete() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 16 * MIB);
    let refusing = Arc::new(Refusing {
        inner: require_uring(),
        n: AtomicU32::new(0),
        refused: AtomicU32::new(0),
    });
    let mut cfg = config(dir.path(), &[("a", &img)]);
    cfg.engine = Some(refusing.clone());
    let t = Tracker::open(cfg).unwrap();
    let d = t.disks()[0].clone();
    for i in 0..16u64 {
        write(&*d, i * MIB, vec![i as u8 + 1; MIB as usize]);
        wait(|done| d.flush(done)).unwrap();
    }
    for i in 0..16u64 {
        assert!(read(&*d, i * MIB, 4096).iter().all(|b| *b == i as u8 + 1));
    }
    assert!(refusing.refused.load(Ordering::SeqCst) >= 16);
}

#[test]
fn copy_on_write_past_its_limit_abandons_the_generation_and_the_guest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 32 * MIB);
    let mut cfg = config(dir.path(), &[("a", &img)]);
    cfg.cow_limit = CowLimit::Bytes(MIB);
    let t = Tracker::open(cfg).unwrap();
    let d = t.disks()[0].clone();
    write(&*d, 0, vec![1; 8 * MIB as usize]);
    let g = t.freeze_with(true, || {}).unwrap();
    let reader = FrozenReader::open(&g.disks[0]).unwrap();
    // Within the limit: copied, the generation stays readable as frozen.
    write(&*d, 0, vec![2; MIB as usize / 2]);
    let mut buf = vec![0; MIB as usize];
    reader.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 1));
    // Past it: the writes succeed all the same, the generation is given up.
    write(&*d, MIB, vec![3; 4 * MIB as usize]);
    assert!(read(&*d, MIB, 4096).iter().all(|b| *b == 3));
    let e = reader.read(0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("abandoned"), "{e}");
    assert!(t.frozen().is_none(), "an abandoned generation stays frozen");
    let st = t.state();
    assert!(st.disks[0].resync_required, "{st:?}");
    assert!(t.release(g.generation).is_err());
    // Its blocks went back into the dirty set; the next freeze starts over.
    let tr = d.tracking().unwrap();
    assert_eq!(tr.bitmap().count(tr.slots().active), 32 * MIB / 65536);
    let g2 = t.freeze_with(true, || {}).unwrap();
    FrozenReader::open(&g2.disks[0]).unwrap();
    drop((d, t));
    // The resync requirement survives a restart.
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    assert!(t.state().disks[0].resync_required);
}

/// The activity log's writes fail (EIO): writes go on, the frozen generation is abandoned,
/// the disk needs a resync, and a resync frozen after the log works again clears that.
#[test]
fn an_activity_log_that_fails_never_fails_the_guest() {
    use vmreplica_tracker::crashpoint::set_failing;
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 64 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    let d = t.disks()[0].clone();
    write(&*d, 0, vec![1; 4 * MIB as usize]);
    let g = t.freeze().unwrap();
    let reader = FrozenReader::open(&g.disks[0]).unwrap();
    set_failing("activity-log", true);
    // A new extent needs the log; a frozen block needs a copy too.
    write(&*d, 32 * MIB, vec![2; MIB as usize]);
    write(&*d, 0, vec![3; MIB as usize]);
    assert!(read(&*d, 32 * MIB, 4096).iter().all(|b| *b == 2));
    assert!(t.frozen().is_none(), "the generation was kept");
    assert!(t.state().disks[0].resync_required);
    let mut buf = vec![0u8; 4096];
    assert!(reader
        .read(0, &mut buf)
        .unwrap_err()
        .to_string()
        .contains("abandoned"));
    // No bit is set where the log cannot vouch for it (a bit the kernel wrote back alone
    // would fail the next start's checksum check): the resync flag stands for the write and
    // for the abandoned generation's blocks.
    let tr = d.tracking().unwrap();
    let active = tr.slots().active;
    assert!(
        !tr.bitmap().test(active, 32 * MIB / 65536),
        "a write's bit was set unlogged"
    );
    assert!(
        !tr.bitmap().test(active, 0),
        "the abandoned generation's block was set unlogged"
    );
    set_failing("activity-log", false);
    // The shipper's resync: a full freeze, shipped, released, then the flag cleared.
    let r = t.freeze_with(true, || {}).unwrap();
    t.release(r.generation).unwrap();
    t.clear_resync("a").unwrap();
    assert!(!t.state().disks[0].resync_required);
    drop((d, t));
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    assert!(!t.state().disks[0].resync_required);
}

/// Tracking fails again after the resync's freeze (here between the release and the clear,
/// when nothing is frozen; while frozen, a failure abandons the generation): clearing the flag
/// then would forget that those writes may have no durable bit. It stays.
#[test]
fn a_failure_after_the_resync_was_frozen_keeps_the_disk_marked() {
    use vmreplica_tracker::crashpoint::set_failing;
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "a.img", 64 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &img)])).unwrap();
    let d = t.disks()[0].clone();
    set_failing("activity-log", true);
    write(&*d, 0, vec![1; MIB as usize]);
    set_failing("activity-log", false);
    assert!(t.state().disks[0].resync_required);
    let r = t.freeze_with(true, || {}).unwrap();
    t.release(r.generation).unwrap();
    set_failing("activity-log", true);
    write(&*d, 16 * MIB, vec![1; MIB as usize]);
    set_failing("activity-log", false);
    t.clear_resync("a").unwrap();
    assert!(
        t.state().disks[0].resync_required,
        "cleared despite a failure after the freeze"
    );
    // The next resync, frozen after the failure, clears it.
    let r = t.freeze_with(true, || {}).unwrap();
    t.release(r.generation).unwrap();
    t.clear_resync("a").unwrap();
    assert!(!t.state().disks[0].resync_required);
}

/// R1 (low): a release is checked and made under one hold of the operations lock, and a
/// proof that names no freeze does not release a freeze that has an id; a generation number
/// that would overflow is refused at the control socket.
#[test]
fn a_release_needs_the_freeze_id_and_generations_stay_in_range() {
    use vmreplica_common::lineage::Lineage;
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 64 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &a)])).unwrap();
    let l = Lineage([3; 16]);
    t.set_lineage(l, 1, false).unwrap();
    let g = t.freeze().unwrap();
    let e = t
        .release_proven(g.generation, Some((l, g.generation, None)), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("names no freeze"), "{e}");
    assert!(t.frozen().is_some(), "a refused release changes nothing");
    t.release_proven(g.generation, Some((l, g.generation, Some(g.id))), false)
        .unwrap();
    let req = serde_json::json!({"op": "set-lineage", "lineage": l,
        "next_generation": u64::MAX, "force": false});
    let r = vmreplica_tracker::control::handle(&t, &req.to_string());
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("out of range"), "{r}");
    assert_eq!(t.state().next_generation, 2);
    t.freeze().unwrap();
}

/// R1 finding 5, the tracker's side: a freeze whose state save fails after its rename (the
/// state directory cannot be opened to sync it) fails, and the state in memory (not frozen)
/// is saved again before the next operation, so the file no longer says "frozen" while
/// writes keep going to the slot it names as frozen.
#[test]
fn a_freeze_whose_save_is_maybe_made_is_saved_again_as_not_made() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 64 * MIB);
    let t = Tracker::open(config(dir.path(), &[("a", &a)])).unwrap();
    write(&*t.disks()[0], MIB, vec![7; 65536]);
    vmreplica_test_support::drop_dac_override();
    let state = dir.path().join("state");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o300)).unwrap();
    let r = t.freeze();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = r.expect_err("the save failed").to_string();
    assert!(e.contains("tracker.json"), "{e}");
    assert!(t.frozen().is_none());
    let _ = t.state(); // any operation
    let on_disk = std::fs::read_to_string(state.join("tracker.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&on_disk).unwrap();
    assert!(v["state"]["frozen"].is_null(), "{on_disk}");
    let g = t.freeze().unwrap();
    assert!(FrozenReader::open(&g.disks[0])
        .unwrap()
        .blocks()
        .unwrap()
        .contains(&(MIB / 65536)));
}
