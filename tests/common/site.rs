//! A replica site for process tests: a CA, an applier and shipper started as real
//! processes (optionally in network namespaces), their logs, and checks that the replica equals
//! the primary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmreplica_common::tls::{self, Validity};

use super::*;

pub const MIB: u64 = 1 << 20;

pub struct Site {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub port: u16,
    pub store: PathBuf,
    /// Where the applier listens, and the network namespaces of the applier and the shipper
    /// (None: this one, on loopback).
    pub replica_ip: String,
    pub replica_ns: Option<String>,
    pub primary_ns: Option<String>,
}

/// `cmd` run inside network namespace `ns`, if any.
pub fn in_ns(ns: &Option<String>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

impl Site {
    /// Talks to this site's applier as the primary's shipper (its certificate) on one
    /// stream: says hello for vm1 in replication protocol `version`, then sends each of
    /// `then`; returns the applier's answer to each, the welcome (or refusal) first.
    pub fn talk_as_primary(
        &self,
        version: u16,
        then: &[vmreplica_common::wire::Message],
    ) -> Vec<vmreplica_common::wire::Message> {
        use vmreplica_common::link::{self, Tuning};
        use vmreplica_common::tls::Identity;
        use vmreplica_common::wire::Message;
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let id = Identity::load(
                &self.ca.join("primary-1.pem"),
                &self.ca.join("primary-1.key"),
                &self.ca.join("ca.pem"),
            )
            .unwrap();
            let ep = link::client("0.0.0.0:0".parse().unwrap(), &id, &Tuning::default()).unwrap();
            let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
            let conn = ep.connect(addr, "replica-1").unwrap().await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let hello = Message::Hello {
                version,
                vm: "vm1".into(),
                lineage: None,
            };
            let mut answers = Vec::new();
            for msg in std::iter::once(&hello).chain(then) {
                link::send(&mut send, msg).await.unwrap();
                answers.push(link::recv(&mut recv).await.unwrap().expect("an answer"));
            }
            conn.close(0u32.into(), b"done");
            ep.endpoint.wait_idle().await;
            answers
        })
    }

    pub fn new(dir: &Path, store: PathBuf) -> Site {
        let ca = dir.join("ca");
        tls::init_ca(&ca, "test CA", 30).unwrap();
        tls::issue(&ca, "primary-1", &[], Validity::days(30), &ca).unwrap();
        tls::issue(
            &ca,
            "replica-1",
            &["127.0.0.1".parse().unwrap()],
            Validity::days(30),
            &ca,
        )
        .unwrap();
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Site {
            dir: dir.to_path_buf(),
            ca,
            port,
            store,
            replica_ip: "127.0.0.1".into(),
            replica_ns: None,
            primary_ns: None,
        }
    }

    pub fn applier(&self) -> Guard {
        self.applier_with(&[])
    }

    /// [`Site::applier`] with extra arguments (`--metrics ADDR`, ...).
    pub fn applier_with(&self, extra: &[&str]) -> Guard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("applier.log"))
            .unwrap();
        in_ns(&self.replica_ns, bin())
            .args(["applier", "--store"])
            .arg(&self.store)
            .args([
                "--listen",
                &format!("{}:{}", self.replica_ip, self.port),
                "--allow",
                "primary-1",
            ])
            .arg("--cert")
            .arg(self.ca.join("replica-1.pem"))
            .arg("--key")
            .arg(self.ca.join("replica-1.key"))
            .arg("--ca")
            .arg(self.ca.join("ca.pem"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Guard)
            .unwrap()
    }

    pub fn config(&self, tracker: &TrackerProc) -> PathBuf {
        self.config_via(tracker, &format!("{}:{}", self.replica_ip, self.port), "")
    }

    /// A shipper config reaching the applier through `port` (a relay's), plus `extra` TOML.
    pub fn config_via(&self, tracker: &TrackerProc, replica: &str, extra: &str) -> PathBuf {
        self.config_full(tracker, replica, "1s", extra)
    }

    /// A shipper config with `interval` between freezes, plus `extra` TOML.
    pub fn config_with(&self, tracker: &TrackerProc, interval: &str, extra: &str) -> PathBuf {
        let replica = format!("{}:{}", self.replica_ip, self.port);
        self.config_full(tracker, &replica, interval, extra)
    }

    fn config_full(
        &self,
        tracker: &TrackerProc,
        replica: &str,
        interval: &str,
        extra: &str,
    ) -> PathBuf {
        let p = self.dir.join("shipper.toml");
        std::fs::write(
            &p,
            format!(
                "vm = \"vm1\"\ntracker = \"{}\"\nreplica = \"{}\"\nserver_name = \"replica-1\"\nca = \"{ca}/ca.pem\"\ncert = \"{ca}/primary-1.pem\"\nkey = \"{ca}/primary-1.key\"\ninterval = \"{interval}\"\nstreams = 2\n{extra}",
                tracker.control.display(),
                replica,
                ca = self.ca.display()
            ),
        )
        .unwrap();
        p
    }

    pub fn shipper(&self, config: &Path, env: &[(&str, &str)]) -> Guard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("shipper.log"))
            .unwrap();
        in_ns(&self.primary_ns, bin())
            .args(["shipper", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Guard)
            .unwrap()
    }

    pub fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{who}.log"))).unwrap_or_default()
    }

    /// The shipper's log lines of the cycles applied so far, oldest first.
    pub fn applied_lines(&self) -> Vec<String> {
        self.log("shipper")
            .lines()
            .filter(|l| l.contains("cycle applied on the replica"))
            .map(str::to_string)
            .collect()
    }

    pub fn applied(&self) -> usize {
        self.applied_lines().len()
    }

    /// Waits until `n` more cycles than `since` were applied.
    pub fn wait_cycles(&self, since: usize, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.applied() < since + n {
            assert!(
                Instant::now() < deadline,
                "replication did not converge; shipper log:\n{}\napplier log:\n{}",
                tail(&self.log("shipper")),
                tail(&self.log("applier"))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Applier and shipper for `tracker`'s disks; returns the shipper's config too.
    pub fn start(&self, tracker: &TrackerProc, env: &[(&str, &str)]) -> (PathBuf, Guard, Guard) {
        let config = self.config(tracker);
        (config.clone(), self.applier(), self.shipper(&config, env))
    }

    /// `vmreplica verify` succeeds and the replica image is byte-for-byte the primary.
    pub fn assert_equal(&self, config: &Path, img: &Path) {
        self.assert_equal_disk(config, img, "sys")
    }

    /// [`Site::assert_equal`] for the disk named `disk`.
    pub fn assert_equal_disk(&self, config: &Path, img: &Path, disk: &str) {
        let out = run(in_ns(&self.primary_ns, bin())
            .args(["verify", "vm1", "--config"])
            .arg(config));
        assert!(String::from_utf8_lossy(&out.stdout).contains("replica equal to primary"));
        let replica = self.store.join(format!("vm1/disks/{disk}.img"));
        assert!(
            std::fs::read(img).unwrap() == std::fs::read(&replica).unwrap(),
            "cmp: replica differs"
        );
    }
}

/// Writes `mib` MiB of incompressible data at the start of the raw image, with fio.
pub fn fill_random(img: &Path, mib: u64) {
    run(Command::new("fio")
        .args(["--name=fill", "--rw=write", "--bs=1M", "--refill_buffers"])
        .arg(format!("--size={mib}M"))
        .arg(format!("--filename={}", img.display())));
}

/// Writes `len` bytes of `byte` at `offset` of the raw image, with qemu-io.
pub fn qemu_write(img: &Path, byte: u8, offset: &str, len: &str) {
    run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(img)
        .args(["-c", &format!("write -P {byte} {offset} {len}")]));
}

pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

pub fn kill9(c: &mut Guard) {
    c.kill();
}

pub fn fio(uri: &str, seconds: u64) -> Guard {
    Command::new("fio")
        .args([
            "--name=guest",
            "--ioengine=nbd",
            "--thread",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--iodepth=4",
            "--rate=8m",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--refill_buffers",
            "--size=64M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Guard)
        .expect("running fio")
}

/// A test bed: a temporary directory with a CA and a replica store, and a 16 MiB primary
/// image holding `data_mib` MiB of random data, served by a tracker.
pub fn small_site(data_mib: u64) -> (tempfile::TempDir, Site, PathBuf, TrackerProc) {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path(), dir.path().join("store"));
    let img = image(dir.path(), "sys.img", 16 * MIB);
    if data_mib > 0 {
        fill_random(&img, data_mib);
    }
    let tracker = TrackerProc::start(dir.path(), &[("sys", &img)], &[]);
    (dir, site, img, tracker)
}

/// Bytes of `p` that are allocated on disk.
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `cond` holds on the log of `who`, or fails showing it.
pub fn wait_log(site: &Site, who: &str, what: &str, limit: Duration, cond: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    while !cond(&site.log(who)) {
        assert!(
            Instant::now() < deadline,
            "waited for {what}; {who} log:\n{}",
            tail(&site.log(who))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
