//! Congestion control over an emulated long, lossy link (`scripts/wan-relay.py`): real
//! tracker, shipper, QUIC and applier. `vmr` must finish an initial copy through 2% random loss
//! and move data many times faster than cubic over the same link (cubic halves its window on
//! every loss; the ratio here is ~20x, asserted with a wide margin, not a timed threshold).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::site::free_udp_port;
use common::*;
use rand::{RngCore, SeedableRng};
use vmreplica_common::tls::{self, Validity};

const MIB: u64 = 1 << 20;

/// 2% loss each way, 50 ms RTT, a 100 Mbit/s bottleneck with a one-BDP queue.
const RELAY_ARGS: [&str; 6] = ["--delay-ms", "25", "--loss", "0.02", "--rate", "100M"];

/// What the relay delivered to the applier: client->server UDP payload bytes per second
/// between the first and the last big datagram.
fn relay_rate(stats: &Path) -> f64 {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stats).expect("relay stats")).unwrap();
    let bytes = s["client->server"]["forwarded_bytes"].as_f64().unwrap();
    let first = s["big_c2s_first_wall"].as_f64().unwrap_or(0.0);
    let last = s["big_c2s_last_wall"].as_f64().unwrap_or(0.0);
    assert!(last > first, "no bulk data went through the relay: {s}");
    bytes / (last - first)
}

struct Leg {
    dir: PathBuf,
    relay: Guard,
    applier: Guard,
    shipper: Guard,
    tracker: TrackerProc,
    stats: PathBuf,
}

impl Leg {
    /// A tracker on `img`, an applier, the relay and a shipper using `congestion`, all fresh.
    fn start(root: &Path, ca: &Path, img: &Path, congestion: &str) -> Leg {
        let dir = root.join(congestion);
        std::fs::create_dir_all(&dir).unwrap();
        let (aport, rport) = (free_udp_port(), free_udp_port());
        let stats = dir.join("relay.json");
        let relay = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/wan-relay.py"))
            .args(["--listen", &format!("127.0.0.1:{rport}")])
            .args(["--to", &format!("127.0.0.1:{aport}"), "--seed", "1"])
            .args(RELAY_ARGS)
            .arg("--stats-json")
            .arg(&stats)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("relay.log")).unwrap())
            .spawn()
            .map(Guard)
            .expect("running scripts/wan-relay.py");
        let applier = Command::new(bin())
            .args(["applier", "--store"])
            .arg(dir.join("store"))
            .args([
                "--listen",
                &format!("127.0.0.1:{aport}"),
                "--allow",
                "primary-1",
            ])
            .arg("--cert")
            .arg(ca.join("replica-1.pem"))
            .arg("--key")
            .arg(ca.join("replica-1.key"))
            .arg("--ca")
            .arg(ca.join("ca.pem"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("applier.log")).unwrap())
            .spawn()
            .map(Guard)
            .unwrap();
        let tracker = TrackerProc::start(&dir, &[("sys", img)], &[]);
        let config = dir.join("shipper.toml");
        std::fs::write(
            &config,
            format!(
                "vm = \"vm1\"\ntracker = \"{}\"\nreplica = \"127.0.0.1:{rport}\"\n\
                 server_name = \"replica-1\"\nca = \"{ca}/ca.pem\"\ncert = \"{ca}/primary-1.pem\"\n\
                 key = \"{ca}/primary-1.key\"\ninterval = \"1h\"\nstreams = 4\n\
                 [tuning]\ncongestion = \"{congestion}\"\n",
                tracker.control.display(),
                ca = ca.display()
            ),
        )
        .unwrap();
        let shipper = Command::new(bin())
            .args(["shipper", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("shipper.log")).unwrap())
            .spawn()
            .map(Guard)
            .unwrap();
        Leg {
            dir,
            relay,
            applier,
            shipper,
            tracker,
            stats,
        }
    }

    fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{who}.log"))).unwrap_or_default()
    }

    /// Waits for `what` in the shipper's log; false after `limit`.
    fn wait_shipper(&self, what: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.log("shipper").contains(what) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Stops everything; returns the relay's delivery rate.
    fn stop(mut self) -> f64 {
        self.shipper.kill();
        // The relay writes its statistics on SIGTERM.
        run(Command::new("kill").arg(self.relay.0.id().to_string()));
        self.relay.wait();
        self.applier.kill();
        self.tracker.stop();
        relay_rate(&self.stats)
    }
}

#[test]
fn vmr_finishes_a_cycle_through_two_percent_loss_far_faster_than_cubic() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    tls::init_ca(&ca, "test CA", 30).unwrap();
    tls::issue(&ca, "primary-1", &[], Validity::days(30), &ca).unwrap();
    let ips = ["127.0.0.1".parse().unwrap()];
    tls::issue(&ca, "replica-1", &ips, Validity::days(30), &ca).unwrap();
    // 24 MiB of incompressible data in a 32 MiB image.
    let img = image(dir.path(), "sys.img", 32 * MIB);
    let mut data = vec![0u8; (24 * MIB) as usize];
    rand::rngs::StdRng::seed_from_u64(20).fill_bytes(&mut data);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all(&data)
        .unwrap();

    let vmr = Leg::start(dir.path(), &ca, &img, "vmr");
    let done = vmr.wait_shipper("cycle applied on the replica", Duration::from_secs(60));
    assert!(
        done,
        "vmr did not finish the initial copy through 2% loss in 60 s; shipper log:\n{}",
        vmr.log("shipper")
    );
    let replica = vmr.dir.join("store/vm1/disks/sys.img");
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(&img).unwrap(),
        "the replica differs from the primary"
    );
    let vmr_rate = vmr.stop();

    // Cubic over the same link, for a bounded time: it will not finish.
    let cubic = Leg::start(dir.path(), &ca, &img, "cubic");
    assert!(
        cubic.wait_shipper("cycle planned", Duration::from_secs(30)),
        "cubic never started its cycle; shipper log:\n{}",
        cubic.log("shipper")
    );
    std::thread::sleep(Duration::from_secs(8));
    let cubic_rate = cubic.stop();
    eprintln!(
        "through 2% loss at 50 ms: vmr {:.1} Mbit/s, cubic {:.1} Mbit/s",
        vmr_rate * 8e-6,
        cubic_rate * 8e-6
    );
    assert!(
        vmr_rate > 4.0 * cubic_rate,
        "vmr {:.1} Mbit/s is not well above cubic's {:.1} Mbit/s",
        vmr_rate * 8e-6,
        cubic_rate * 8e-6
    );
}
