//! Frozen generations: while fio rewrites the disks over NBD, a frozen generation must read
//! back exactly as the images were at the freeze, also after the tracker dies and restarts.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use vmreplica_nbd::{Server, ServerConfig};
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::{Tracker, TrackerConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn open(dir: &std::path::Path, disks: &[(String, std::path::PathBuf)]) -> Arc<Tracker> {
    Arc::new(
        Tracker::open(TrackerConfig {
            state_dir: dir.join("state"),
            disks: disks.to_vec(),
            granularity: 64 * 1024,
            tracking: true,
            force_thread_pool: false,
            al_extents: 1000,
            cow_limit: Default::default(),
            engine: None,
            excluded: Vec::new(),
        })
        .unwrap(),
    )
}

fn fio_randwrite(uri: &str, seconds: u32, seed: u32) -> Guard {
    Command::new("fio")
        .args([
            "--name=rw",
            "--ioengine=nbd",
            "--thread",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--iodepth=16",
            "--time_based",
            &format!("--runtime={seconds}"),
            &format!("--randseed={seed}"),
            "--refill_buffers",
            &format!("--size={SIZE}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Guard)
        .expect("running fio (scripts/install-deps.sh installs it)")
}

fn frozen_view(t: &Tracker, disk: usize) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    t.disks()[disk].read_frozen(0, &mut buf).unwrap();
    buf
}

#[test]
fn frozen_view_is_the_point_in_time_copy_under_concurrent_rewrites_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disks: Vec<(String, std::path::PathBuf)> = ["sys", "data"]
        .iter()
        .map(|n| (n.to_string(), image(dir.path(), &format!("{n}.img"), SIZE)))
        .collect();
    let tracker = open(dir.path(), &disks);
    let server = Server::new(ServerConfig::default(), tracker.nbd_exports());
    let sock = dir.path().join("nbd.sock");
    server
        .listen_unix(std::os::unix::net::UnixListener::bind(&sock).unwrap())
        .unwrap();
    let uri = |n: &str| format!("nbd+unix:///{n}?socket={}", sock.display());

    // Writers on both disks for ~4 s; freeze in the middle, copying the images at that instant.
    let mut writers = vec![
        fio_randwrite(&uri("sys"), 4, 1),
        fio_randwrite(&uri("data"), 4, 2),
    ];
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // On a loaded machine fio can take longer than that to connect: freeze only once both
    // disks hold writes (fio's runtime counts from its first I/O, so rewrites still follow).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !tracker
        .disks()
        .iter()
        .all(|d| d.dirty_extents(0, SIZE, 2).iter().any(|e| e.1 != 0))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "fio wrote nothing in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut copies = Vec::new();
    let generation = tracker
        .freeze_with(false, || {
            copies = disks
                .iter()
                .map(|(_, p)| std::fs::read(p).unwrap())
                .collect();
        })
        .unwrap();
    assert_eq!(generation.disks.len(), 2);
    assert!(
        generation.disks.iter().all(|d| d.blocks > 0),
        "{generation:?}"
    );
    for w in &mut writers {
        assert!(w.wait().success(), "fio failed");
    }
    // The guest really rewrote frozen blocks after the freeze.
    for (i, (_, p)) in disks.iter().enumerate() {
        assert_ne!(
            std::fs::read(p).unwrap(),
            copies[i],
            "no rewrite happened on disk {i}"
        );
        assert!(
            frozen_view(&tracker, i) == copies[i],
            "frozen view of disk {i} differs from the copy at freeze"
        );
        // The shipper's path: another mapping of the bitmap, reads of image and store.
        let r = FrozenReader::open(&generation.disks[i]).unwrap();
        for (off, len) in r.runs(1 << 20, false).unwrap() {
            let mut buf = vec![0u8; len as usize];
            r.read(off, &mut buf).unwrap();
            assert!(
                buf == copies[i][off as usize..(off + len) as usize],
                "frozen reader differs at {off}"
            );
        }
    }

    // Die without a clean stop (state stays unclean), restart: the frozen view survives.
    server.shutdown();
    drop(server);
    drop(tracker);
    let tracker = open(dir.path(), &disks);
    let frozen = tracker
        .frozen()
        .expect("frozen generation survives restart");
    assert_eq!(frozen.generation, generation.generation);
    for (i, copy) in copies.iter().enumerate() {
        assert!(
            frozen_view(&tracker, i) == *copy,
            "frozen view of disk {i} lost on restart"
        );
    }
    // A second freeze is refused while one is pending; release ends it.
    assert!(tracker.freeze().is_err());
    tracker.release(generation.generation).unwrap();
    assert!(tracker.frozen().is_none());
    let next = tracker.freeze().unwrap();
    assert_eq!(next.generation, generation.generation + 1);
    tracker.close().unwrap();
}

#[test]
fn merge_returns_frozen_blocks_to_the_dirty_set() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", SIZE);
    let disks = vec![("d".to_string(), img.clone())];
    let t = open(dir.path(), &disks);
    let d = Arc::clone(&t.disks()[0]);
    let (tx, rx) = std::sync::mpsc::channel();
    for (off, len) in [(0u64, 4096usize), (5 * MIB, 200_000)] {
        let tx = tx.clone();
        d.write(
            off,
            vec![1u8; len],
            false,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
    }
    assert!(rx.recv().unwrap() && rx.recv().unwrap());
    let g = t.freeze().unwrap();
    assert_eq!(g.disks[0].blocks, 1 + 4);
    let tr = d.tracking().unwrap();
    assert_eq!(tr.bitmap().count(tr.slots().active), 0);
    t.merge(g.generation).unwrap();
    assert!(t.frozen().is_none());
    let dirty: Vec<u64> = tr.bitmap().iter_set(tr.slots().active).collect();
    assert_eq!(dirty, vec![0, 80, 81, 82, 83]);
    t.close().unwrap();
}

#[test]
fn full_freeze_keeps_the_whole_disk_readable_as_of_the_freeze() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", SIZE);
    let disks = vec![("d".to_string(), img.clone())];
    let t = open(dir.path(), &disks);
    let server = Server::new(ServerConfig::default(), t.nbd_exports());
    let sock = dir.path().join("nbd.sock");
    server
        .listen_unix(std::os::unix::net::UnixListener::bind(&sock).unwrap())
        .unwrap();
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 1 0 4M",
        "-c",
        "write -P 2 8M 1M",
    ]));
    let mut copy = Vec::new();
    let g = t
        .freeze_with(true, || copy = std::fs::read(&img).unwrap())
        .unwrap();
    assert_eq!(
        g.disks[0].blocks,
        SIZE / 65536,
        "a full freeze holds every block"
    );
    // The guest rewrites data, trims data and writes into a hole after the freeze.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 3 1M 1M",
        "-c",
        "discard 8M 1M",
        "-c",
        "write -P 4 12M 64k",
    ]));
    let r = FrozenReader::open(&g.disks[0]).unwrap();
    let mut covered = vec![false; SIZE as usize];
    for (off, len) in r.runs(1 << 20, true).unwrap() {
        let mut buf = vec![0u8; len as usize];
        r.read(off, &mut buf).unwrap();
        assert!(
            buf == copy[off as usize..(off + len) as usize],
            "differs at {off}"
        );
        covered[off as usize..(off + len) as usize].fill(true);
    }
    // Every byte that held data at the freeze is covered, trimmed ones included.
    for (i, b) in copy.iter().enumerate() {
        assert!(*b == 0 || covered[i], "data at {i} was skipped");
    }
    assert!(
        !covered[14 << 20],
        "never-written space should be skipped as a hole"
    );
    server.shutdown();
    t.release(g.generation).unwrap();
    t.close().unwrap();
}
