//! The processes a site runs for a VM it is the primary of (after a failover): its tracker
//! (serving the images), its shipper (replicating back to the old primary) and QEMU. Each
//! runs detached, in a session of its own (under systemd, in a scope of its own, so a
//! restart of the applier's service does not stop it), with its log, state and sockets under
//! `STORE/VM/primary/`; the applier finds them again after a restart by their locks: the
//! tracker's `tracker/lock` and the shipper's `tracker/shipper.lock` (each holds an flock and
//! names its PID), QEMU's `run/qemu.pid` (see `vmreplica_vm::Instance`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmreplica_tracker::control::{self, Request};
use vmreplica_vm::{Instance, StopOutcome, StopPolicy};

use crate::store::lock_holder;

/// How long a started tracker may take to answer on its control socket.
const TRACKER_START: Duration = Duration::from_secs(60);
/// How long a process may take to stop after SIGTERM (then SIGKILL).
const STOP: Duration = Duration::from_secs(30);

/// The processes of one VM (`STORE/VM/primary/`).
#[derive(Clone, Debug)]
pub struct Procs {
    pub vm: String,
    pub dir: PathBuf,
}

impl Procs {
    /// `dir` is made absolute: what is written here for other processes (shipper.toml, NBD
    /// URIs, a VM's command line) must not depend on their working directory, and relative
    /// paths in shipper.toml are read from its own directory.
    pub fn new(vm_dir: &Path, vm: &str) -> Procs {
        let dir = vm_dir.join("primary");
        Procs {
            vm: vm.to_string(),
            dir: std::path::absolute(&dir).unwrap_or(dir),
        }
    }

    pub fn tracker_dir(&self) -> PathBuf {
        self.dir.join("tracker")
    }

    pub fn control(&self) -> PathBuf {
        self.tracker_dir().join("control.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    pub fn shipper_config(&self) -> PathBuf {
        self.dir.join("shipper.toml")
    }

    pub fn instance(&self) -> Instance {
        Instance::new(self.run_dir())
    }

    /// Where the blank images of the VM's excluded disks are made (issue 19: a failover
    /// recreates each as a blank sparse disk of its size). Inside this directory, so a cancel
    /// or an abandon, which removes it, leaves no guest data in them for a later failover.
    pub fn excluded_dir(&self) -> PathBuf {
        self.dir.join("excluded")
    }

    /// Each disk's NBD URI on this site's tracker.
    pub fn uris(&self, disks: &[String]) -> BTreeMap<String, String> {
        disks
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    format!("nbd+unix:///{d}?socket={}", self.nbd_socket().display()),
                )
            })
            .collect()
    }

    pub fn tracker_pid(&self) -> Option<i32> {
        lock_holder(&self.tracker_dir().join("lock"))
    }

    pub fn shipper_pid(&self) -> Option<i32> {
        lock_holder(&self.tracker_dir().join("shipper.lock"))
    }

    /// A request to the tracker's control socket.
    pub fn tracker(&self, req: &Request) -> Result<Value, String> {
        control::call(&self.control(), req).map_err(|e| e.to_string())
    }

    /// Starts the tracker on `disks` (name, image) unless it runs, with the disks named in
    /// `excluded` served but neither tracked nor shipped (`--exclude`: the shipper back to the
    /// old primary learns it from the tracker's status); returns once its control socket
    /// answers.
    pub fn start_tracker(
        &self,
        disks: &[(String, PathBuf)],
        excluded: &[String],
    ) -> Result<(), String> {
        if self.tracker_pid().is_some() && self.tracker(&Request::Status).is_ok() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        for s in [self.nbd_socket(), self.control()] {
            if self.tracker_pid().is_none() {
                let _ = std::fs::remove_file(&s);
            }
        }
        if self.tracker_pid().is_none() {
            let mut args: Vec<OsString> = vec![
                "tracker".into(),
                "--state-dir".into(),
                self.tracker_dir().into(),
                "--socket".into(),
                self.nbd_socket().into(),
            ];
            for (name, image) in disks {
                let mut a = OsString::from(format!("{name}="));
                a.push(image);
                args.push("--disk".into());
                args.push(a);
            }
            for name in excluded {
                args.push("--exclude".into());
                args.push(name.into());
            }
            let log = self.dir.join("tracker.log");
            let pid = spawn_detached(&self.vm, "tracker", &args, &log)
                .map_err(|e| format!("starting the tracker: {e}"))?;
            tracing::info!(vm = %self.vm, pid, log = %log.display(), "tracker started for the failed-over VM");
        }
        let deadline = Instant::now() + TRACKER_START;
        loop {
            if self.tracker(&Request::Status).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the tracker did not answer within {TRACKER_START:?}; its log ({}):\n{}",
                    self.dir.join("tracker.log").display(),
                    vmreplica_vm::instance::tail(&self.dir.join("tracker.log"), 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop_tracker(&self) -> Result<(), String> {
        stop_holder(&self.tracker_dir().join("lock"), "tracker", STOP)
    }

    /// Starts the shipper of `shipper.toml` (replicating back) unless one runs.
    pub fn start_shipper(&self) -> Result<(), String> {
        if self.shipper_pid().is_some() {
            return Ok(());
        }
        let args: Vec<OsString> = vec![
            "shipper".into(),
            "--config".into(),
            self.shipper_config().into(),
        ];
        let log = self.dir.join("shipper.log");
        let pid = spawn_detached(&self.vm, "shipper", &args, &log)
            .map_err(|e| format!("starting the shipper: {e}"))?;
        tracing::info!(vm = %self.vm, pid, log = %log.display(), "shipper started: replicating back to the old primary");
        Ok(())
    }

    pub fn stop_shipper(&self) -> Result<(), String> {
        stop_holder(&self.tracker_dir().join("shipper.lock"), "shipper", STOP)
    }

    /// Stops QEMU at once (its writes are being discarded): `quit`, then SIGKILL.
    pub fn kill_vm(&self) -> Result<StopOutcome, String> {
        self.instance()
            .stop(StopPolicy {
                powerdown: Duration::ZERO,
                ..StopPolicy::default()
            })
            .map_err(|e| e.to_string())
    }

    /// Stops everything (VM, shipper, tracker) and removes the directory.
    pub fn stop_all_and_remove(&self) -> Result<(), String> {
        self.kill_vm()?;
        self.stop_shipper()?;
        self.stop_tracker()?;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", self.dir.display())),
        }
    }
}

/// Starts `vmreplica ARGS` detached (own session; under systemd, its own scope), its output
/// appended to `log`; reaped by a thread while this process lives. Returns its PID.
pub fn spawn_detached(vm: &str, what: &str, args: &[OsString], log: &Path) -> std::io::Result<u32> {
    let exe = std::env::current_exe()?;
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let under_systemd =
        std::env::var_os("INVOCATION_ID").is_some() && Path::new("/usr/bin/systemd-run").exists();
    let mut cmd = if under_systemd {
        let mut c = Command::new("/usr/bin/systemd-run");
        c.args(["--scope", "--quiet", "--collect", "--unit"])
            .arg(format!("vmreplica-{vm}-{what}-{}", std::process::id()))
            .arg("--")
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env_remove("VMREPLICA_CRASH_AT");
    // SAFETY: setsid(2) only changes this (forked) child's session; it allocates nothing and
    // is async-signal-safe, as a pre_exec closure must be.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    std::thread::Builder::new()
        .name(format!("reap-{what}-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })?;
    Ok(pid)
}

/// Stops the process holding `lockfile` (it wrote its PID there): SIGTERM, then SIGKILL
/// after `within`; returns once the lock is free.
pub fn stop_holder(lockfile: &Path, what: &str, within: Duration) -> Result<(), String> {
    let Some(pid) = lock_holder(lockfile) else {
        return Ok(());
    };
    if pid <= 0 {
        return Err(format!(
            "the {what} holding {} did not write its PID there: stop it by hand",
            lockfile.display()
        ));
    }
    // SAFETY: kill(2) takes no pointers; `pid` holds the lock (it wrote its PID into the
    // lock file it holds), so it is the process meant.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + within;
    while lock_holder(lockfile).is_some() {
        if Instant::now() >= deadline {
            tracing::warn!(
                pid,
                "the {what} did not stop after SIGTERM within {within:?}: SIGKILL"
            );
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + within;
            while lock_holder(lockfile).is_some() {
                if Instant::now() >= deadline {
                    return Err(format!("the {what} (PID {pid}) survives SIGKILL"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(pid, "{what} stopped");
    Ok(())
}
