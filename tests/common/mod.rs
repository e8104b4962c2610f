//! Helpers for integration tests: run the real `vmreplica` binary and real NBD clients.
#![allow(dead_code)]

pub mod guest;
pub mod powercut;
pub mod site;
pub mod sites;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test. Every process a test starts registers itself and writes events
/// in a run directory of the test's own (under target/), never the host's /run/vmreplica;
/// a test that looks at them sets `VMREPLICA_RUN_DIR` itself first.
pub fn bin() -> &'static str {
    static RUN_DIR: std::sync::Once = std::sync::Once::new();
    RUN_DIR.call_once(|| {
        if std::env::var_os("VMREPLICA_RUN_DIR").is_none() {
            let d =
                Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("run-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&d);
            std::env::set_var("VMREPLICA_RUN_DIR", d);
        }
    });
    env!("CARGO_BIN_EXE_vmreplica")
}

/// Runs a tool, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (is it installed? scripts/install-deps.sh): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// The value of `key=value` (quotes dropped) in a log line; panics naming the line if absent.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> T {
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Issues `name` a certificate from the CA in `ca` that expired a day ago, into `out`.
pub fn issue_expired(ca: &Path, name: &str, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    vmreplica_common::tls::issue(
        ca,
        name,
        &[],
        vmreplica_common::tls::Validity {
            from: -time::Duration::days(10),
            until: -time::Duration::days(1),
        },
        out,
    )
    .unwrap();
}

/// Makes a sparse raw image of `size` bytes.
pub fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

pub struct TrackerProc {
    pub child: Option<Child>,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl TrackerProc {
    /// Starts `vmreplica tracker` on `disks` (NAME, PATH) with extra args; waits until ready.
    pub fn start(dir: &Path, disks: &[(&str, &Path)], extra: &[&str]) -> TrackerProc {
        let state = dir.join("state");
        let socket = dir.join("nbd.sock");
        let control = state.join("control.sock");
        let log = dir.join(format!("tracker-{}.log", std::process::id()));
        let mut cmd = Command::new(bin());
        cmd.arg("tracker")
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket);
        for (n, p) in disks {
            cmd.arg("--disk").arg(format!("{n}={}", p.display()));
        }
        cmd.args(extra);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(Stdio::null()).stderr(logf);
        let child = cmd.spawn().expect("spawning vmreplica tracker");
        let t = TrackerProc {
            child: Some(child),
            state,
            socket,
            control,
            log,
        };
        t.wait_ready();
        t
    }

    /// Like [`TrackerProc::start`], but with the state dir at `state` (which may sit on a file
    /// system that cannot hold unix sockets, such as a FUSE test mount) and the NBD socket,
    /// the control socket and the log in `run_dir`. Stale sockets there (from a killed
    /// tracker) are removed first.
    pub fn start_split(
        state: &Path,
        run_dir: &Path,
        disks: &[(&str, &Path)],
        extra: &[&str],
    ) -> TrackerProc {
        Self::start_split_env(state, run_dir, disks, extra, &[])
    }

    /// [`TrackerProc::start_split`] with extra environment variables.
    pub fn start_split_env(
        state: &Path,
        run_dir: &Path,
        disks: &[(&str, &Path)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TrackerProc {
        let socket = run_dir.join("nbd.sock");
        let control = run_dir.join("control.sock");
        let log = run_dir.join(format!("tracker-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&control);
        let mut cmd = Command::new(bin());
        cmd.arg("tracker")
            .arg("--state-dir")
            .arg(state)
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control);
        for (n, p) in disks {
            cmd.arg("--disk").arg(format!("{n}={}", p.display()));
        }
        cmd.args(extra);
        cmd.envs(env.iter().copied());
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(Stdio::null()).stderr(logf);
        let child = cmd.spawn().expect("spawning vmreplica tracker");
        let t = TrackerProc {
            child: Some(child),
            state: state.to_path_buf(),
            socket,
            control,
            log,
        };
        t.wait_ready();
        t
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.control.exists()
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tracker did not become ready; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let st = wait_timeout(&mut c, Duration::from_secs(30));
        assert!(
            st.success(),
            "tracker exited with {st}; log:\n{}",
            self.log_text()
        );
    }

    /// Waits for the process to exit by itself (a crash point); returns its status.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        wait_timeout(&mut c, Duration::from_secs(30))
    }

    /// Runs `vmreplica ctl ARGS` and returns its output whether it succeeds or not.
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("ctl")
            .arg("--socket")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap()
    }

    /// kill -9 and reap.
    pub fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
        let _ = c.wait();
    }

    pub fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let out = run(Command::new(bin())
            .arg("ctl")
            .arg("--socket")
            .arg(&self.control)
            .args(args));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for TrackerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_timeout(c: &mut Child, t: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses `nbdinfo --map` output into (offset, length, type) rows.
pub fn parse_map(s: &str) -> Vec<(u64, u64, u32)> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// The byte ranges a map marks with bit `bit` set, merged.
pub fn ranges_with(map: &[(u64, u64, u32)], bit: u32) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l, t) in map {
        if t & bit != 0 {
            match out.last_mut() {
                Some((so, sl)) if *so + *sl == *o => *sl += l,
                _ => out.push((*o, *l)),
            }
        }
    }
    out
}

/// A child process killed and reaped when dropped, also when a test panics.
pub struct Guard(pub Child);

impl Guard {
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().unwrap()
    }
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tmpfs of `size` bytes mounted at `dir` (created) until dropped: a small file system
/// that fills up for real (ENOSPC). Needs root, as the FUSE tests do.
pub struct SmallFs {
    pub dir: PathBuf,
}

impl SmallFs {
    pub fn mount(dir: &Path, size: u64) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg(format!("vmreplica-test-{}", std::process::id()))
            .arg(dir));
        SmallFs {
            dir: dir.to_path_buf(),
        }
    }

    /// Fills the file system until it is full; returns the filler file.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.dir.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0xeeu8; 64 << 10];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
        let _ = f.sync_all();
        p
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let p = std::ffi::CString::new(self.dir.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: umount2 with a NUL-terminated path.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}
