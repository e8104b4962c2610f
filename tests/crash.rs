//! kill -9 at random instants, many rounds: every write acknowledged to a client is still
//! marked dirty after restart, and its data is in the image. Freezes and merges run
//! concurrently, and the activity log is kept tiny so its checkpoints run all the time.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use vmreplica_tracker::control::{self, Request};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const PAGE: u64 = 4096;
const ROUNDS: usize = 12;

#[derive(Clone, Copy)]
struct W {
    off: u64,
    len: u64,
    fill: u8,
}

#[derive(Default)]
struct Log {
    acked: Vec<W>,
    inflight: Option<W>,
}

fn writer(
    socket: std::path::PathBuf,
    half: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) else {
        return;
    };
    let Ok(export) = nbd::client::handshake(&mut s, b"d") else {
        return;
    };
    let mut c = nbd::client::NbdClient::new(&mut s, &export);
    let base = half * SIZE / 2;
    while !stop.load(Ordering::Relaxed) {
        let len = rng.gen_range(1..=64) * PAGE;
        let off = base + rng.gen_range(0..(SIZE / 2 - len) / PAGE) * PAGE;
        let fill = rng.gen_range(1..=255u8);
        let w = W { off, len, fill };
        log.lock().unwrap().inflight = Some(w);
        let ok =
            c.seek(SeekFrom::Start(off)).is_ok() && c.write_all(&vec![fill; len as usize]).is_ok();
        if !ok {
            return;
        }
        let mut l = log.lock().unwrap();
        l.acked.push(w);
        l.inflight = None;
    }
}

fn freezer(control_sock: std::path::PathBuf, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..60)));
        let Ok(g) = control::call(
            &control_sock,
            &Request::Freeze {
                full: false,
                baseline: false,
            },
        ) else {
            return;
        };
        let generation = g["generation"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..60)));
        // Merge, never release: every acknowledged write must stay dirty.
        if control::call(&control_sock, &Request::Merge { generation }).is_err() {
            return;
        }
    }
}

#[test]
fn kill9_at_random_points_never_loses_an_acknowledged_write() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", SIZE);
    let mut required: Vec<W> = Vec::new();
    // Expected contents per page (0 = never written), and pages an unacknowledged write
    // may or may not have reached.
    let mut expect = vec![0u8; (SIZE / PAGE) as usize];
    for round in 0..ROUNDS {
        let t = TrackerProc::start(dir.path(), &[("d", &img)], &["--al-extents", "3"]);
        let map = parse_map(&stdout(
            std::process::Command::new("nbdinfo")
                .arg("--map=qemu:dirty-bitmap:vmreplica")
                .arg(t.uri("d")),
        ));
        let dirty = ranges_with(&map, 1);
        for w in &required {
            assert!(
                dirty.iter().any(|(o, l)| *o <= w.off && w.off + w.len <= o + l),
                "round {round}: acknowledged write {}+{} is not dirty after kill -9 (seed {seed}); dirty: {dirty:?}",
                w.off,
                w.len
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let logs: Vec<Arc<Mutex<Log>>> = (0..2).map(|_| Arc::default()).collect();
        let mut threads = Vec::new();
        for (half, log) in logs.iter().enumerate() {
            let (sock, stop, log) = (t.socket.clone(), Arc::clone(&stop), Arc::clone(log));
            let s = rng.gen();
            threads.push(std::thread::spawn(move || {
                writer(sock, half as u64, s, stop, log)
            }));
        }
        {
            let (sock, stop, s) = (t.control.clone(), Arc::clone(&stop), rng.gen());
            threads.push(std::thread::spawn(move || freezer(sock, s, stop)));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
        t.kill9();
        stop.store(true, Ordering::Relaxed);
        for th in threads {
            th.join().unwrap();
        }
        let mut maybe = vec![false; expect.len()];
        for log in &logs {
            let l = log.lock().unwrap();
            for w in &l.acked {
                for p in w.off / PAGE..(w.off + w.len) / PAGE {
                    expect[p as usize] = w.fill;
                }
            }
            if let Some(w) = l.inflight {
                for p in w.off / PAGE..(w.off + w.len) / PAGE {
                    maybe[p as usize] = true;
                }
            }
            required.extend_from_slice(&l.acked);
        }
        // The data of acknowledged writes is in the image.
        let data = std::fs::read(&img).unwrap();
        for (p, want) in expect.iter_mut().enumerate() {
            let got = &data[p * PAGE as usize..(p + 1) * PAGE as usize];
            if maybe[p] {
                // Either outcome is right; the page now holds whatever landed.
                *want = got[0];
                continue;
            }
            assert!(
                got.iter().all(|b| b == want),
                "round {round}: page {p} lost its data (seed {seed})"
            );
        }
    }
    assert!(
        required.len() > 50,
        "too few writes were exercised: {}",
        required.len()
    );
    // A final clean start and stop.
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    t.stop();
}
