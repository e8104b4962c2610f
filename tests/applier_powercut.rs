//! Power cuts on the replica site: the applier's store lives on `powercut-fs` (file data is
//! volatile until fsync; a cut drops the rest), and while a guest writes and replication
//! runs, the power is cut under the applier (and the shipper is killed) at random instants,
//! or just after a commit started: while a cycle is received (and written in place behind
//! its undo log), committed or recorded. After each cut the applier restarts on what
//! survived, and before the shipper comes back:
//! - the newest recovery point, exported through the running applier (its point view reads
//!   the image through the undo log of a cycle held in part), is a crash-consistent state of
//!   the primary: the guest writes 64 blocks in descending order, generation after
//!   generation, so every state it ever had holds generations that never fall from block to
//!   block and span at most two; a cycle half-applied (chunks land in any order) would show a
//!   fall; and when no cycle is held in part, the image itself is that point;
//! - every cycle the shipper saw acknowledged is still a recovery point.
//!
//! At the end the replica equals the primary, and every recovery point, rebuilt from the
//! undo logs that went through all the cuts, is again such a state, in cycle order.
//!
//! `APPLIER_POWERCUT_SEED=N` replays a run; `APPLIER_POWERCUT_ROUNDS=N` cuts more often.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::powercut::{self, powercut_fs_bin, PowercutFs};
use common::*;
use rand::{Rng, SeedableRng};
use vmreplica_common::tls::{self, Validity};

const KIB: u64 = 1 << 10;
const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 64 * KIB;
/// Blocks the guest writes, one every STRIDE bytes (apart, so each is a chunk of its own).
const BLOCKS: u64 = 64;
const STRIDE: u64 = SIZE / BLOCKS;
const ROUNDS: usize = 8;

/// A block holding generation `g`: the u32 repeated.
fn block_of(g: u32) -> Vec<u8> {
    g.to_le_bytes().repeat((BLOCK / 4) as usize)
}

/// The generation in each block of an image; panics naming the block if one is torn.
fn generations(img: &Path) -> Vec<u32> {
    let data = std::fs::read(img).unwrap();
    (0..BLOCKS)
        .map(|b| {
            let at = (b * STRIDE) as usize;
            let block = &data[at..at + BLOCK as usize];
            let g = u32::from_le_bytes(block[..4].try_into().unwrap());
            assert!(block == block_of(g), "{}: block {b} is torn", img.display());
            g
        })
        .collect()
}

/// Whether `gens` is a state the guest's disk was in: written from the last block down, a
/// generation at a time, so from block to block generations never fall and span at most two.
fn consistent(gens: &[u32]) -> bool {
    gens.windows(2).all(|w| w[0] <= w[1]) && gens[gens.len() - 1] - gens[0] <= 1
}

/// Writes generation after generation (from 2: the image starts at 1), each block from the
/// last down, through the tracker's NBD socket, until `stop`; `gen` is the one being written.
fn guest(socket: PathBuf, seed: u64, stop: Arc<AtomicBool>, gen: Arc<AtomicU32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let export = nbd::client::handshake(&mut s, b"sys").unwrap();
    let mut c = nbd::client::NbdClient::new(&mut s, &export);
    let mut g = 2u32;
    while !stop.load(Ordering::Relaxed) {
        gen.store(g, Ordering::Relaxed);
        let data = block_of(g);
        for b in (0..BLOCKS).rev() {
            c.seek(SeekFrom::Start(b * STRIDE)).unwrap();
            c.write_all(&data).unwrap();
        }
        g += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
    }
}

struct Sites {
    dir: PathBuf,
    ca: PathBuf,
    store: PathBuf,
    port: u16,
}

impl Sites {
    fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{who}.log"))).unwrap_or_default()
    }

    fn spawn(&self, who: &str, args: &[&str]) -> Guard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{who}.log")))
            .unwrap();
        Command::new(bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Guard)
            .unwrap()
    }

    /// Starts the applier and waits until it recovered the store and listens.
    fn applier(&self) -> Guard {
        let started = self.log("applier").matches("applier listening").count();
        let ca = |f: &str| self.ca.join(f).to_string_lossy().into_owned();
        let g = self.spawn(
            "applier",
            &[
                "applier",
                "--store",
                &self.store.to_string_lossy(),
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--cert",
                &ca("replica-1.pem"),
                "--key",
                &ca("replica-1.key"),
                "--ca",
                &ca("ca.pem"),
                "--allow",
                "primary-1",
                "--admin-socket",
                &self.admin().to_string_lossy(),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log("applier").matches("applier listening").count() == started {
            assert!(
                Instant::now() < deadline,
                "the applier did not start:\n{}",
                self.log("applier")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        g
    }

    /// The applier's admin socket: outside the cut file system (FUSE holds no sockets).
    fn admin(&self) -> PathBuf {
        self.dir.join("applier.sock")
    }

    /// Exports point `p` into `out` (through the running applier, or from the store).
    fn export(&self, p: u64, out: &Path) {
        run(Command::new(bin())
            .args([
                "applier",
                "export",
                "vm1",
                "--point",
                &p.to_string(),
                "--store",
            ])
            .arg(&self.store)
            .arg("--admin-socket")
            .arg(self.admin())
            .arg("--out")
            .arg(out));
    }

    /// Whether the replica holds a cycle in part (`applier status`).
    fn holds_a_cycle_in_part(&self) -> bool {
        let out = stdout(
            Command::new(bin())
                .args(["applier", "status", "--store"])
                .arg(&self.store)
                .arg("--admin-socket")
                .arg(self.admin()),
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        !v["vms"][0]["receiving"].is_null()
    }

    fn shipper(&self, config: &Path) -> Guard {
        self.spawn(
            "shipper",
            &["shipper", "--config", &config.to_string_lossy()],
        )
    }

    /// Cycles the shipper saw applied, in order.
    fn acknowledged(&self) -> Vec<u64> {
        self.log("shipper")
            .lines()
            .filter(|l| l.contains("cycle applied on the replica"))
            .map(|l| field(l, "cycle"))
            .collect()
    }

    /// The recovery points' cycles, as `vmreplica applier points` lists them.
    fn points(&self) -> Vec<u64> {
        stdout(
            Command::new(bin())
                .args(["applier", "points", "vm1", "--store"])
                .arg(&self.store)
                .arg("--admin-socket")
                .arg(self.admin()),
        )
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
    }
}

#[test]
fn power_cuts_on_the_replica_site_never_tear_or_lose_a_point() {
    let seed: u64 = std::env::var("APPLIER_POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("APPLIER_POWERCUT_SEED={seed}");
    let rounds: usize = std::env::var("APPLIER_POWERCUT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fs_bin = powercut_fs_bin();
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt, fs_log) = powercut::dirs(dir.path());
    let ca = dir.path().join("ca");
    tls::init_ca(&ca, "test CA", 30).unwrap();
    tls::issue(&ca, "primary-1", &[], Validity::days(30), &ca).unwrap();
    tls::issue(&ca, "replica-1", &[], Validity::days(30), &ca).unwrap();
    let sites = Sites {
        dir: dir.path().to_path_buf(),
        ca: ca.clone(),
        store: mnt.join("store"),
        port: std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    };
    // The primary (not on the cut file system): generation 1 everywhere to start with.
    let img = image(dir.path(), "sys.img", SIZE);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for b in 0..BLOCKS {
        std::os::unix::fs::FileExt::write_all_at(&f, &block_of(1), b * STRIDE).unwrap();
    }
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    let config = dir.path().join("shipper.toml");
    std::fs::write(
        &config,
        format!(
            "vm = \"vm1\"\ntracker = \"{}\"\nreplica = \"127.0.0.1:{}\"\nserver_name = \"replica-1\"\nca = \"{ca}/ca.pem\"\ncert = \"{ca}/primary-1.pem\"\nkey = \"{ca}/primary-1.key\"\ninterval = \"200ms\"\nstreams = 2\n",
            tracker.control.display(),
            sites.port,
            ca = ca.display()
        ),
    )
    .unwrap();
    let mut fs = PowercutFs::mount(&fs_bin, &backing, &mnt, &fs_log, 0.0, rng.gen());
    let mut applier = sites.applier();
    let mut shipper = sites.shipper(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let gen = Arc::new(AtomicU32::new(1));
    let writer = {
        let (sock, stop, gen, s) = (tracker.socket.clone(), stop.clone(), gen.clone(), rng.gen());
        std::thread::spawn(move || guest(sock, s, stop, gen))
    };
    let replica = sites.store.join("vm1/disks/sys.img");
    let mut mid_apply = 0;
    for round in 0..rounds {
        // Every other round on average, the cut follows the start of a cycle (logged as
        // "cycle started"), aimed at its chunks landing in place, or at its commit.
        let aim_at_apply = rng.gen_bool(0.5);
        if aim_at_apply {
            let marker = if rng.gen_bool(0.7) {
                "cycle started"
            } else {
                "committing"
            };
            let seen = sites.log("applier").matches(marker).count();
            let deadline = Instant::now() + Duration::from_secs(10);
            while sites.log("applier").matches(marker).count() == seen && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Somewhere in the cycle: captures and writes in place, the last writes' fsync,
            // the undo log's trailer, the state's new point.
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        }
        let persist = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.1..0.9)
        };
        let cut_first = rng.gen_bool(0.5);
        if cut_first {
            fs.power_cut();
            applier.kill();
        } else {
            applier.kill();
            fs.power_cut();
        }
        shipper.kill();
        let acked = sites.acknowledged();
        // Gone before the next mount: dropping it later would unmount its successor.
        drop(fs);
        fs = PowercutFs::mount(&fs_bin, &backing, &mnt, &fs_log, persist, rng.gen());
        applier = sites.applier();
        let ctx = format!(
            "round {round} (APPLIER_POWERCUT_SEED={seed}); applier log:\n{}",
            sites.log("applier")
        );
        let held = sites.store.join("vm1/state.json").exists() && sites.holds_a_cycle_in_part();
        if held {
            mid_apply += 1;
        }
        // Until the initial copy is a point, the replica is a copy in progress; from then on
        // it must always be at a point.
        let points = if sites.store.join("vm1/state.json").exists() {
            sites.points()
        } else {
            Vec::new()
        };
        let last_acked = acked.last().copied().unwrap_or(0);
        assert!(
            points.last().copied().unwrap_or(0) >= last_acked,
            "cycle {last_acked} was acknowledged but the points are {points:?}\n{ctx}"
        );
        if let Some(&newest) = points.last() {
            let out = sites.dir.join(format!("newest-{round}"));
            sites.export(newest, &out);
            let gens = generations(&out.join("sys.img"));
            assert!(
                consistent(&gens),
                "point {newest} is not a state of the disk after a power cut: {gens:?}\n{ctx}"
            );
            std::fs::remove_dir_all(&out).unwrap();
            if !held {
                let img = generations(&replica);
                assert!(
                    img == gens,
                    "no cycle is held in part, yet the image ({img:?}) is not the newest point ({gens:?})\n{ctx}"
                );
            }
        }
        eprintln!(
            "round {round}: {}{}{} after {} cycles acknowledged; persist-on-cut {persist:.2}; guest at generation {}",
            if cut_first { "power cut, then kill -9" } else { "kill -9, then power cut" },
            if aim_at_apply { " aimed at a cycle" } else { "" },
            if held { ", a cycle held in part" } else { "" },
            acked.len(),
            gen.load(Ordering::Relaxed)
        );
        shipper = sites.shipper(&config);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // The guest stopped: two more cycles, and the replica is the primary.
    let n = sites.acknowledged().len();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sites.acknowledged().len() < n + 2 {
        assert!(
            Instant::now() < deadline,
            "replication did not converge:\n{}",
            sites.log("shipper")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(&img).unwrap(),
        "the replica differs from the primary"
    );
    shipper.kill();
    applier.kill();
    // Every point the undo logs can still rebuild is a state of the guest's disk, and the
    // points only move forward.
    let points = sites.points();
    let mut last: Option<Vec<u32>> = None;
    for p in &points {
        let out = dir.path().join(format!("point-{p}"));
        sites.export(*p, &out);
        let gens = generations(&out.join("sys.img"));
        assert!(
            consistent(&gens),
            "point {p} is not a state of the disk: {gens:?}"
        );
        if let Some(before) = &last {
            assert!(
                before.iter().zip(&gens).all(|(b, g)| b <= g),
                "point {p} ({gens:?}) is older than the point before it ({before:?})"
            );
        }
        last = Some(gens);
        std::fs::remove_dir_all(&out).unwrap();
    }
    fs.stop(libc::SIGTERM);
    tracker.stop();
    eprintln!(
        "{rounds} power cuts ({mid_apply} with a cycle held in part); {} cycles acknowledged; points {points:?}",
        n
    );
}
