//! Two sites for failover tests, as real processes: site A (the primary: tracker, shipper,
//! and an applier that receives replication back after a failover) and site B (the replica:
//! an applier), each with its own store and certificate, on loopback or in two network
//! namespaces. Either site's applier starts the tracker, shipper and QEMU of a VM it is
//! primary for, under `STORE/vm1/primary/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmreplica_common::tls::{self, Validity};

use super::site::{free_udp_port, in_ns, tail};
use super::*;

pub const MIB: u64 = 1 << 20;

/// One site: its applier (store, certificate, address) and, where it is primary by hand
/// (site A at first), its tracker and shipper.
pub struct SiteDir {
    pub name: &'static str,
    pub dir: PathBuf,
    pub store: PathBuf,
    pub cert: String,
    pub ip: String,
    pub port: u16,
    pub ns: Option<String>,
    pub applier: Option<Guard>,
}

impl SiteDir {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{who}.log"))).unwrap_or_default()
    }

    /// The log of a process this site's applier started for vm1 (`tracker`, `shipper`).
    pub fn primary_log(&self, who: &str) -> String {
        std::fs::read_to_string(self.store.join(format!("vm1/primary/{who}.log")))
            .unwrap_or_default()
    }

    pub fn primary_dir(&self) -> PathBuf {
        self.store.join("vm1/primary")
    }

    /// `failover planned vm1` run on this site while it is vm1's primary after a failover
    /// (a failback), with the shipper configuration its applier wrote, starting no VM.
    /// Must succeed; its stdout.
    pub fn fail_back_planned(&self) -> String {
        let cfg = self.primary_dir().join("shipper.toml");
        self.cli_ok(&[
            "failover",
            "planned",
            "vm1",
            "--config",
            cfg.to_str().unwrap(),
            "--no-start",
        ])
    }

    /// The NBD URI of a disk this site's applier serves (as vm1's primary).
    pub fn uri(&self, disk: &str) -> String {
        format!(
            "nbd+unix:///{disk}?socket={}",
            self.primary_dir().join("nbd.sock").display()
        )
    }

    /// `vmreplica ARGS --store STORE` on this site (in its namespace).
    pub fn cli(&self, args: &[&str]) -> Output {
        in_ns(&self.ns, bin())
            .args(args)
            .arg("--store")
            .arg(&self.store)
            .output()
            .unwrap()
    }

    /// [`SiteDir::cli`], which must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "site {}: vmreplica {args:?} failed: {}\nstdout: {}\nstderr: {}\napplier log:\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log("applier"))
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// vm1's record on this site (the applier's status).
    pub fn record(&self) -> Value {
        let v: Value = serde_json::from_str(&self.cli_ok(&["applier", "status"])).unwrap();
        v["vms"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["vm"] == "vm1").cloned())
            .unwrap_or(Value::Null)
    }

    pub fn role(&self) -> String {
        self.record()["role"]["kind"]
            .as_str()
            .unwrap_or("none")
            .to_string()
    }

    /// Waits until vm1's role on this site is `role`.
    pub fn wait_role(&self, role: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.role() != role {
            assert!(
                Instant::now() < deadline,
                "site {}: vm1 never became {role} (is {}); applier log:\n{}\nshipper log (site's own):\n{}",
                self.name,
                self.role(),
                tail(&self.log("applier")),
                tail(&self.primary_log("shipper"))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The replica image of vm1's disk `disk` in this site's store.
    pub fn image(&self, disk: &str) -> PathBuf {
        self.store.join(format!("vm1/disks/{disk}.img"))
    }
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub a: SiteDir,
    pub b: SiteDir,
    /// Site A's image of vm1's disk `sys`, its tracker and shipper.
    pub img: PathBuf,
    pub tracker: Option<TrackerProc>,
    pub shipper: Option<Guard>,
    pub config: PathBuf,
}

/// How the two sites are placed: on loopback, or in two namespaces (primary, replica, their
/// addresses).
pub type Namespaces = Option<(String, String, String, String)>;

impl Pair {
    /// Two sites; site A's 32 MiB image holds `data_mib` MiB of random data; both appliers
    /// run (keeping every point), site A's tracker serves its image.
    pub fn new(data_mib: u64, ns: Namespaces) -> Pair {
        Pair::sized(32, data_mib, ns)
    }

    /// [`Pair::new`] with a `size_mib` MiB image.
    /// A pair replicating: [`Pair::new`], its shipper started and its first cycle (the
    /// initial copy) applied.
    pub fn replicating(data_mib: u64, ns: Namespaces) -> Pair {
        let mut p = Pair::new(data_mib, ns);
        p.start_shipper();
        p.wait_cycles(0, 1);
        p
    }

    pub fn sized(size_mib: u64, data_mib: u64, ns: Namespaces) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tls::init_ca(&ca, "test CA", 30).unwrap();
        tls::issue(&ca, "primary-1", &[], Validity::days(30), &ca).unwrap();
        let (ip_a, ip_b, ns_a, ns_b) = match &ns {
            Some((na, nb, ia, ib)) => (ia.clone(), ib.clone(), Some(na.clone()), Some(nb.clone())),
            None => ("127.0.0.1".into(), "127.0.0.1".into(), None, None),
        };
        for (name, ip) in [("site-a", &ip_a), ("site-b", &ip_b)] {
            tls::issue(&ca, name, &[ip.parse().unwrap()], Validity::days(30), &ca).unwrap();
        }
        let site = |name, cert: &str, ip: &str, ns: Option<String>| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            SiteDir {
                name,
                store: d.join("store"),
                dir: d,
                cert: cert.to_string(),
                ip: ip.to_string(),
                port: free_udp_port(),
                ns,
                applier: None,
            }
        };
        let a = site("a", "site-a", &ip_a, ns_a);
        let b = site("b", "site-b", &ip_b, ns_b);
        let img = image(&a.dir, "vm1-sys.img", size_mib * MIB);
        if data_mib > 0 {
            super::site::fill_random(&img, data_mib);
        }
        let mut p = Pair {
            ca,
            config: a.dir.join("shipper.toml"),
            a,
            b,
            img,
            tracker: None,
            shipper: None,
            dir,
        };
        p.start_applier('a', &[]);
        p.start_applier('b', &[]);
        p.start_tracker(&[]);
        p.write_config("");
        p
    }

    pub fn site(&self, which: char) -> &SiteDir {
        if which == 'a' {
            &self.a
        } else {
            &self.b
        }
    }

    /// Starts (again) the applier of site `which`, with `env`.
    pub fn start_applier(&mut self, which: char, env: &[(&str, &str)]) {
        let ca = self.ca.clone();
        let s = if which == 'a' {
            &mut self.a
        } else {
            &mut self.b
        };
        if let Some(mut g) = s.applier.take() {
            g.kill();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("applier.log"))
            .unwrap();
        // The store as a relative path, as an admin in its directory gives it: what the
        // applier writes for other processes (shipper.toml, NBD URIs) must still resolve.
        let g = in_ns(&s.ns, bin())
            .current_dir(&s.dir)
            .args(["applier", "--store", "store"])
            .args(["--listen", &s.addr()])
            .args([
                "--allow",
                "primary-1",
                "--allow",
                "site-a",
                "--allow",
                "site-b",
            ])
            .args(["--keep-all-for", "100d"])
            .arg("--cert")
            .arg(ca.join(format!("{}.pem", s.cert)))
            .arg("--key")
            .arg(ca.join(format!("{}.key", s.cert)))
            .arg("--ca")
            .arg(ca.join("ca.pem"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Guard)
            .unwrap();
        s.applier = Some(g);
        let sock = s.store.join("applier.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "applier {which} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill_applier(&mut self, which: char) {
        let s = if which == 'a' {
            &mut self.a
        } else {
            &mut self.b
        };
        if let Some(mut g) = s.applier.take() {
            g.kill();
        }
    }

    /// Site A's tracker on its image (state in `a/state`).
    pub fn start_tracker(&mut self, extra: &[&str]) {
        self.tracker = Some(TrackerProc::start(
            &self.a.dir,
            &[("sys", &self.img)],
            extra,
        ));
    }

    /// Site A's shipper configuration (towards B, `[reverse]` to A's applier), plus `extra`.
    pub fn write_config(&self, extra: &str) {
        let t = self.tracker.as_ref().unwrap();
        std::fs::write(
            &self.config,
            format!(
                "vm = \"vm1\"\ntracker = \"{}\"\nreplica = \"{}\"\nserver_name = \"site-b\"\n\
                 ca = \"{ca}/ca.pem\"\ncert = \"{ca}/primary-1.pem\"\nkey = \"{ca}/primary-1.key\"\n\
                 interval = \"1s\"\nstreams = 2\n{extra}\n[reverse]\nreplica = \"{}\"\n\
                 server_name = \"site-a\"\n",
                t.control.display(),
                self.b.addr(),
                self.a.addr(),
                ca = self.ca.display()
            ),
        )
        .unwrap();
    }

    pub fn start_shipper(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.a.dir.join("shipper.log"))
            .unwrap();
        self.shipper = Some(
            in_ns(&self.a.ns, bin())
                .args(["shipper", "--config"])
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map(Guard)
                .unwrap(),
        );
    }

    /// Cycles site A's shipper has had applied so far.
    pub fn applied(&self) -> usize {
        applied_in(&self.a.log("shipper"))
    }

    /// Waits until `n` more cycles than `since` were applied (site A's shipper).
    pub fn wait_cycles(&self, since: usize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.applied() < since + n {
            assert!(
                Instant::now() < deadline,
                "replication did not go on; shipper log:\n{}\napplier B log:\n{}",
                tail(&self.a.log("shipper")),
                tail(&self.b.log("applier"))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A guest's write through NBD `uri` (see [`Pair::nbd_write`]), then waits until a cycle
    /// frozen after it was applied: two more cycles, since the first one applied after the
    /// write may have been frozen before it.
    pub fn write_replicated(&self, uri: &str, byte: u8, offset: u64, len: u64) {
        Pair::nbd_write(uri, byte, offset, len);
        let n = self.applied();
        self.wait_cycles(n, 2);
    }

    /// Writes `len` bytes of `byte` at `offset` through NBD `uri` (a guest's write).
    pub fn nbd_write(uri: &str, byte: u8, offset: u64, len: u64) {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -P {byte} {offset} {len}"))
            .arg(uri));
    }

    /// The disk behind NBD `uri`, read whole.
    pub fn nbd_read(&self, uri: &str) -> Vec<u8> {
        let out = self
            .dir
            .path()
            .join(format!("read-{}", rand::random::<u32>()));
        run(Command::new("nbdcopy").arg(uri).arg(&out));
        let data = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        data
    }

    /// Kills site A's shipper and tracker (the primary site is gone).
    pub fn kill_primary(&mut self) {
        if let Some(mut s) = self.shipper.take() {
            s.kill();
        }
        if let Some(t) = self.tracker.take() {
            t.kill9();
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Processes the appliers started (detached): killed by the PIDs in their locks.
        for s in [&self.a, &self.b] {
            let d = s.primary_dir();
            for lock in [d.join("tracker/shipper.lock"), d.join("tracker/lock")] {
                kill_holder(&lock);
            }
            if let Ok(Some(pid)) = vmreplica_vm::Instance::new(d.join("run")).pid() {
                // SAFETY: kill(2) on the QEMU an applier of this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// SIGKILL to the process whose PID is in `lockfile`, if it still holds its lock.
pub fn kill_holder(lockfile: &Path) {
    if let Some(pid) = vmreplica_applier::store::lock_holder(lockfile).filter(|p| *p > 0) {
        // SAFETY: kill(2) on a process of this test (an applier it started spawned it).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// sha256 of a file.
pub fn sha(p: &Path) -> String {
    let out = stdout(Command::new("sha256sum").arg(p));
    out.split_whitespace().next().unwrap().to_string()
}

/// Two network namespaces joined by a veth pair (removed on drop): site A at 10.234.0.1,
/// site B at 10.234.0.2.
pub struct TwoNamespaces {
    pub a: String,
    pub b: String,
}

impl TwoNamespaces {
    pub fn new() -> TwoNamespaces {
        let id = std::process::id() % 100_000;
        let t = TwoNamespaces {
            a: format!("vmr-fa{id}"),
            b: format!("vmr-fb{id}"),
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["netns", "add", &t.a]);
        ip(&["netns", "add", &t.b]);
        let (va, vb) = (format!("vfa{id}"), format!("vfb{id}"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &t.a]);
        ip(&["link", "set", &vb, "netns", &t.b]);
        for (ns, dev, addr) in [(&t.a, &va, "10.234.0.1/30"), (&t.b, &vb, "10.234.0.2/30")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        t
    }

    pub fn placement(&self) -> Namespaces {
        Some((
            self.a.clone(),
            self.b.clone(),
            "10.234.0.1".into(),
            "10.234.0.2".into(),
        ))
    }
}

impl Drop for TwoNamespaces {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Cycles a shipper's log says were applied.
pub fn applied_in(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("cycle applied on the replica"))
        .count()
}
