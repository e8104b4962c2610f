//! Mounting `powercut-fs` (testing/powercut-fs), the FUSE file system that loses what was not
//! fsynced when the power is cut, for the tests that cut power under a process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use super::{run, wait_timeout};

/// The `powercut-fs` binary: built by `cargo nextest run --workspace` (or `cargo build
/// --workspace`) next to this test's profile directory; built here if missing or older than
/// its sources.
pub fn powercut_fs_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/powercut-HASH
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = profile_dir.join("powercut-fs");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("testing/powercut-fs");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let newest_src = newest_mtime(&src);
    if built.is_some_and(|b| newest_src.is_none_or(|s| s <= b)) {
        return bin;
    }
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
    };
    let target_dir = profile_dir.parent().unwrap();
    run(Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "-p",
            "vmreplica-powercut-fs",
            "--bin",
            "powercut-fs",
        ])
        .arg("--profile")
        .arg(profile)
        .arg("--target-dir")
        .arg(target_dir));
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_str()))
}

/// Where a test mounts `powercut-fs` under `dir`: the backing directory and the mount point
/// (both created), and the file system's log.
pub fn dirs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (backing, mnt) = (dir.join("backing"), dir.join("mnt"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    (backing, mnt, dir.join("powercut-fs.log"))
}

/// A mounted `powercut-fs`.
pub struct PowercutFs {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl PowercutFs {
    pub fn mount(
        bin: &Path,
        backing: &Path,
        mnt: &Path,
        log: &Path,
        persist: f64,
        seed: u64,
    ) -> Self {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(bin)
            .arg("--verbose")
            .arg("--persist-on-cut")
            .arg(persist.to_string())
            .arg("--seed")
            .arg(seed.to_string())
            .arg(backing)
            .arg(mnt)
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let fs = PowercutFs {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
        };
        assert_eq!(
            line.trim(),
            "ready",
            "powercut-fs did not mount (needs root and /dev/fuse): {}",
            fs.log_text()
        );
        fs
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGUSR1: everything not fsynced is gone, the mount with it.
    pub fn power_cut(&mut self) {
        self.stop(libc::SIGUSR1);
    }

    pub fn stop(&mut self, sig: i32) {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe { libc::kill(c.id() as i32, sig) };
        let st = wait_timeout(&mut c, Duration::from_secs(30));
        assert!(
            st.success(),
            "powercut-fs exited with {st}: {}",
            self.log_text()
        );
        assert!(
            !is_mounted(&self.mnt),
            "{} still mounted",
            self.mnt.display()
        );
    }
}

impl Drop for PowercutFs {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let p = std::ffi::CString::new(self.mnt.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: umount2 with a NUL-terminated path.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
