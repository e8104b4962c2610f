//! Power cuts, not just kill -9: the image and the state dir live on `powercut-fs` (a FUSE file
//! system whose file data is volatile until fsync, see testing/powercut-fs), NBD clients write
//! at random, then the tracker is killed and the file system drops everything that was not
//! fsynced. After the restart every acknowledged write is still reported dirty, the disk is
//! not marked for resync (the activity log proved the bitmap complete), and data that a FLUSH
//! covered is in the image. The activity log is kept tiny so checkpoints run all the time.
//!
//! `POWERCUT_SEED=N` replays a run.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::powercut::{powercut_fs_bin, PowercutFs};
use common::*;
use nbd::client::NbdExt;
use rand::{Rng, SeedableRng};
use vmreplica_tracker::control::{self, Request};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const PAGE: u64 = 4096;
const PAGES: usize = (SIZE / PAGE) as usize;
/// Rounds (power cuts) per run; `POWERCUT_ROUNDS=N` runs more (a soak).
const ROUNDS: usize = 8;

/// One acknowledged (or in-flight) request; `fill` 0 is a trim (reads back as zeros).
#[derive(Clone, Copy, Debug)]
struct W {
    off: u64,
    len: u64,
    fill: u8,
}

impl W {
    fn pages(&self) -> std::ops::Range<usize> {
        (self.off / PAGE) as usize..((self.off + self.len) / PAGE) as usize
    }
}

#[derive(Default)]
struct Log {
    acked: Vec<W>,
    /// `acked[..flushed]` were acknowledged before a FLUSH that was acknowledged.
    flushed: usize,
    flushes: usize,
    inflight: Option<W>,
}

fn writer(
    socket: PathBuf,
    half: u64,
    seed: u64,
    flushes: bool,
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
        let r = rng.gen_range(0..100);
        if flushes && r < 8 {
            if c.flush().is_err() {
                return;
            }
            let mut l = log.lock().unwrap();
            l.flushed = l.acked.len();
            l.flushes += 1;
            continue;
        }
        let len = rng.gen_range(1..=64) * PAGE;
        let off = base + rng.gen_range(0..(SIZE / 2 - len) / PAGE) * PAGE;
        let trim = r >= 92;
        let fill = if trim { 0 } else { rng.gen_range(1..=255u8) };
        let w = W { off, len, fill };
        log.lock().unwrap().inflight = Some(w);
        let ok = c.seek(SeekFrom::Start(off)).is_ok()
            && if trim {
                c.trim(len as usize).is_ok()
            } else {
                c.write_all(&vec![fill; len as usize]).is_ok()
            };
        if !ok {
            return;
        }
        let mut l = log.lock().unwrap();
        l.acked.push(w);
        l.inflight = None;
    }
}

fn freezer(control_sock: PathBuf, seed: u64, stop: Arc<AtomicBool>) {
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

/// The value of every page of the image (each page is written whole with one byte value).
fn page_values(img: &Path) -> Vec<u8> {
    let data = std::fs::read(img).unwrap();
    assert_eq!(data.len() as u64, SIZE, "the image changed size");
    data.chunks(PAGE as usize)
        .enumerate()
        .map(|(p, c)| {
            assert!(c[1..] == c[..c.len() - 1], "page {p} is torn");
            c[0]
        })
        .collect()
}

/// Extents the tracker's last start replayed from the activity log ("-" if none logged).
fn replayed_extents(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text
        .lines()
        .rev()
        .find(|l| l.contains("replayed activity log"))
    else {
        return "-".into();
    };
    // Drop colour escapes, then take the number after "extents=".
    let mut plain = String::new();
    let mut esc = false;
    for ch in line.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
        .split_once("extents=")
        .map(|(_, r)| r.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_else(|| "?".into())
}

#[test]
fn power_cut_never_loses_an_acknowledged_write() {
    let seed: u64 = std::env::var("POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("POWERCUT_SEED={seed}");
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fs_bin = powercut_fs_bin();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    let run_dir = dir.path().join("run");
    for d in [&backing, &mnt, &run_dir] {
        std::fs::create_dir(d).unwrap();
    }
    let fs_log = run_dir.join("powercut-fs.log");
    // The image starts durable: made on the backing directory before the first mount.
    image(&backing, "d.img", SIZE);
    let img = mnt.join("d.img");
    let state = mnt.join("state");
    // Acknowledged writes since the dirty set was last cleared (freeze + release).
    let mut required: Vec<W> = Vec::new();
    // Durable page values as of the start of the round.
    let mut durable = vec![0u8; PAGES];
    let mut total = (0usize, 0usize);
    let rounds: usize = std::env::var("POWERCUT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        let persist = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.1..0.9)
        };
        let engine = if rng.gen_bool(0.5) {
            "auto"
        } else {
            "thread-pool"
        };
        let mut fs = PowercutFs::mount(&fs_bin, &backing, &mnt, &fs_log, persist, rng.gen());
        let t = TrackerProc::start_split(
            &state,
            &run_dir,
            &[("d", &img)],
            &["--al-extents", "3", "--io-engine", engine],
        );
        let status = t.ctl(&["status"]);
        let ctx = |what: &str| {
            format!(
                "round {round} (POWERCUT_SEED={seed}): {what}\ntracker log:\n{}\npowercut-fs log:\n{}",
                t.log_text(),
                fs.log_text()
            )
        };
        assert_eq!(
            status["disks"][0]["resync_required"],
            serde_json::json!(false),
            "{}",
            ctx(&format!(
                "the disk needs a resync after a power cut: {status}"
            ))
        );
        let map = parse_map(&stdout(
            Command::new("nbdinfo")
                .arg("--map=qemu:dirty-bitmap:vmreplica")
                .arg(t.uri("d")),
        ));
        let dirty = ranges_with(&map, 1);
        let dirty_bytes: u64 = dirty.iter().map(|(_, l)| l).sum();
        for w in &required {
            assert!(
                dirty
                    .iter()
                    .any(|(o, l)| *o <= w.off && w.off + w.len <= o + l),
                "{}",
                ctx(&format!(
                    "acknowledged {} {}+{} is not dirty after the power cut; dirty: {dirty:?}",
                    if w.fill == 0 { "trim" } else { "write" },
                    w.off,
                    w.len
                ))
            );
        }
        // A generation the cut left frozen goes back into the dirty set.
        if let Some(g) = status["frozen"]["generation"].as_u64() {
            t.ctl(&["merge", &g.to_string()]);
        }
        let cleared = rng.gen_bool(0.5);
        if cleared {
            let g = t.ctl(&["freeze"])["generation"].as_u64().unwrap();
            t.ctl(&["release", &g.to_string(), "--force"]);
            required.clear();
        }

        let stop = Arc::new(AtomicBool::new(false));
        let logs: Vec<Arc<Mutex<Log>>> = (0..2).map(|_| Arc::default()).collect();
        let flushes = rng.gen_bool(0.75);
        let mut threads = Vec::new();
        for (half, log) in logs.iter().enumerate() {
            let (sock, stop, log) = (t.socket.clone(), Arc::clone(&stop), Arc::clone(log));
            let s = rng.gen();
            threads.push(std::thread::spawn(move || {
                writer(sock, half as u64, s, flushes, stop, log)
            }));
        }
        let freezing = rng.gen_bool(0.3);
        if freezing {
            let (sock, stop, s) = (t.control.clone(), Arc::clone(&stop), rng.gen());
            threads.push(std::thread::spawn(move || freezer(sock, s, stop)));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        let tracker_log = t.log.clone();
        let cut_first = rng.gen_bool(0.3);
        if cut_first {
            fs.power_cut();
            t.kill9();
        } else {
            t.kill9();
            fs.power_cut();
        }
        stop.store(true, Ordering::Relaxed);
        for th in threads {
            th.join().unwrap();
        }

        // What the image may hold now, page by page: the value as of the last FLUSH that
        // covered the page (or of the round's start), or that of any later write to it.
        let got = page_values(&backing.join("d.img"));
        let mut later: Vec<Vec<u8>> = vec![Vec::new(); PAGES];
        let (mut acked, mut flushed) = (0, 0);
        for log in &logs {
            let l = log.lock().unwrap();
            for (i, w) in l.acked.iter().enumerate() {
                for p in w.pages() {
                    if i < l.flushed {
                        durable[p] = w.fill;
                        later[p].clear();
                    } else {
                        later[p].push(w.fill);
                    }
                }
            }
            if let Some(w) = l.inflight {
                for p in w.pages() {
                    later[p].push(w.fill);
                }
            }
            acked += l.acked.len();
            flushed += l.flushes;
            required.extend_from_slice(&l.acked);
        }
        for p in 0..PAGES {
            assert!(
                got[p] == durable[p] || later[p].contains(&got[p]),
                "round {round} (POWERCUT_SEED={seed}): page {p} holds {} but only {} (flushed) \
                 or one of {:?} (written after the last flush) are possible",
                got[p],
                durable[p],
                later[p]
            );
        }
        durable = got;
        let replayed = replayed_extents(&tracker_log);
        let cut = std::fs::read_to_string(&fs_log)
            .unwrap_or_default()
            .lines()
            .rev()
            .find_map(|l| l.split_once("power cut: ").map(|(_, r)| r.to_string()))
            .unwrap_or_default();
        total.0 += acked;
        total.1 += flushed;
        eprintln!(
            "round {round}: {acked} writes/trims acknowledged, {flushed} flushes; engine {engine}; \
             persist-on-cut {persist:.2}; {}; freezer {freezing}; cleared before {cleared}; \
             {} KiB dirty at start ({replayed} extents replayed)\n  powercut-fs: {cut}",
            if cut_first { "power cut, then kill -9" } else { "kill -9, then power cut" },
            dirty_bytes / 1024
        );
    }
    assert!(total.0 > 50, "too few writes were exercised: {}", total.0);
    // A final clean start and stop, and an orderly unmount.
    let mut fs = PowercutFs::mount(&fs_bin, &backing, &mnt, &fs_log, 0.0, 0);
    let t = TrackerProc::start_split(&state, &run_dir, &[("d", &img)], &[]);
    t.stop();
    fs.stop(libc::SIGTERM);
    eprintln!(
        "{rounds} power cuts, {} writes, {} flushes in {:.1?}",
        total.0,
        total.1,
        started.elapsed()
    );
}
