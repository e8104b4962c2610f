//! The launcher: one QEMU per run directory, started detached, stopped cleanly.
//!
//! A run directory holds `qmp.sock`, `qga.sock`, `console.log` (the serial console, when the
//! command line sends it to `${console}`), `qemu.log` (QEMU's own output), `qemu.pid` and
//! `command.json` (the command line as started). QEMU writes and locks `qemu.pid` itself
//! (`-pidfile`): the lock's holder is the running QEMU, so a stale pidfile or a reused pid
//! is never mistaken for it, and a second QEMU on the same directory is refused.
//!
//! QEMU runs in its own process group, so it outlives the command that started it and a
//! Ctrl-C there does not reach it. "Started" means QMP answered. Stopping asks the guest
//! (`system_powerdown`), then QEMU (`quit`), then the kernel (SIGKILL), each with a timeout,
//! and says which one ended it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::definition::{DefinitionError, Network, RenderInput, VmDefinition};
use crate::error::ProtocolError;
use crate::qga::GuestAgent;
use crate::qmp::Qmp;

/// Where VMs started by vmreplica keep their run directories by default (one per VM).
pub const DEFAULT_RUN_ROOT: &str = "/run/vmreplica/vm";

/// The longest path a unix socket takes (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("VM run directory {dir}: {what}: {source}")]
    Dir {
        dir: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("VM run directory {dir}: the socket path {path} is longer than the {MAX_SOCKET_PATH} bytes a unix socket takes; use a shorter run directory")]
    PathTooLong { dir: PathBuf, path: PathBuf },
    #[error("VM run directory {dir}: QEMU is already running there (pid {pid}); stop it first")]
    AlreadyRunning { dir: PathBuf, pid: i32 },
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error("VM run directory {dir}: refusing the command line: {reason}")]
    BadCommand { dir: PathBuf, reason: String },
    #[error("VM run directory {dir}: cannot start {program}: {source}")]
    Spawn {
        dir: PathBuf,
        program: String,
        source: std::io::Error,
    },
    #[error("VM run directory {dir}: QEMU exited ({status}) before answering on QMP; its output ({log}):\n{tail}")]
    Exited {
        dir: PathBuf,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("VM run directory {dir}: QEMU (pid {pid}) did not answer on QMP within {waited:?} ({source}), so it was killed; its output is in {log}")]
    NoQmp {
        dir: PathBuf,
        pid: i32,
        waited: Duration,
        log: PathBuf,
        source: Box<ProtocolError>,
    },
    #[error("VM run directory {dir}: QEMU (pid {pid}) is still running {waited:?} after SIGKILL")]
    Unkillable {
        dir: PathBuf,
        pid: i32,
        waited: Duration,
    },
}

/// Whether a run directory's QEMU runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    NotRunning,
    /// QMP answered `query-status` with `status` (`running`, `paused`, `shutdown`, ...).
    Running {
        pid: i32,
        status: String,
    },
    /// The process holds the pidfile but QMP did not answer.
    Unresponsive {
        pid: i32,
        error: String,
    },
}

impl RunState {
    /// The pid of a QEMU that holds the run directory, answering or not.
    pub fn pid(&self) -> Option<i32> {
        match self {
            RunState::NotRunning => None,
            RunState::Running { pid, .. } | RunState::Unresponsive { pid, .. } => Some(*pid),
        }
    }
}

/// A QEMU that answered on QMP.
#[derive(Clone, Debug)]
pub struct Started {
    pub pid: i32,
    /// `query-status` right after start (`running`, or `prelaunch` with `-S`).
    pub status: String,
    /// The command line started (the launcher's `-pidfile` included).
    pub argv: Vec<String>,
}

/// How long each way of stopping may take.
#[derive(Clone, Copy, Debug)]
pub struct StopPolicy {
    /// For the guest to shut down after the ACPI power button.
    pub powerdown: Duration,
    /// For QEMU to exit after `quit` (or SIGTERM when QMP does not answer).
    pub quit: Duration,
    /// For the process to vanish after SIGKILL.
    pub kill: Duration,
    /// For QMP to answer each command.
    pub qmp: Duration,
}

impl Default for StopPolicy {
    fn default() -> Self {
        StopPolicy {
            powerdown: Duration::from_secs(120),
            quit: Duration::from_secs(10),
            kill: Duration::from_secs(10),
            qmp: Duration::from_secs(5),
        }
    }
}

/// How a stop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Nothing was running.
    NotRunning,
    /// The guest shut down after the power button (cleanly, as far as QEMU can tell).
    PoweredDown { after: Duration },
    /// The guest did not shut down in time; QEMU quit on request.
    Quit { after: Duration },
    /// QMP did not answer; QEMU exited on SIGTERM.
    Terminated { after: Duration },
    /// Nothing else worked: SIGKILL.
    Killed { after: Duration },
}

/// One run directory and the QEMU in it.
#[derive(Clone, Debug)]
pub struct Instance {
    dir: PathBuf,
}

/// The holder of the POSIX write lock QEMU keeps on its pidfile, if any.
fn lock_holder(pidfile: &Path) -> std::io::Result<Option<i32>> {
    let f = match File::open(pidfile) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: `f` is an open descriptor we own for the whole call, and `fl` is a valid,
    // initialized flock that F_GETLK only writes into; no memory is shared with the kernel
    // beyond the call.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short && fl.l_pid > 0).then_some(fl.l_pid))
}

fn signal(pid: i32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill(2) takes no pointers; `pid` is the current holder of the run
        // directory's pidfile lock, i.e. the QEMU we mean to stop (never 0 or negative).
        unsafe { libc::kill(pid, sig) };
    }
}

impl Instance {
    pub fn new(dir: impl Into<PathBuf>) -> Instance {
        Instance { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The values a definition is rendered with for this run directory.
    pub fn render_input(&self, disks: BTreeMap<String, String>, network: Network) -> RenderInput {
        RenderInput {
            disks,
            qmp: self.qmp_socket(),
            qga: self.agent_socket(),
            console: self.console_log(),
            network,
        }
    }

    fn dir_err(&self, what: &str, source: std::io::Error) -> LaunchError {
        LaunchError::Dir {
            dir: self.dir.clone(),
            what: what.to_string(),
            source,
        }
    }

    /// The pid holding this directory's pidfile, if a QEMU does.
    pub fn pid(&self) -> Result<Option<i32>, LaunchError> {
        lock_holder(&self.pidfile()).map_err(|e| self.dir_err("reading qemu.pid", e))
    }

    /// Whether QEMU runs here, and what QMP says of it (within `timeout`).
    pub fn state(&self, timeout: Duration) -> Result<RunState, LaunchError> {
        let Some(pid) = self.pid()? else {
            return Ok(RunState::NotRunning);
        };
        Ok(
            match Qmp::connect(&self.qmp_socket(), timeout).and_then(|mut q| q.query_status()) {
                Ok(status) => RunState::Running { pid, status },
                Err(e) => RunState::Unresponsive {
                    pid,
                    error: e.to_string(),
                },
            },
        )
    }

    /// Connects to the QMP socket (one client at a time: QEMU serves the next once this one
    /// is dropped).
    pub fn qmp(&self, timeout: Duration) -> Result<Qmp, ProtocolError> {
        Qmp::connect(&self.qmp_socket(), timeout)
    }

    /// Waits up to `timeout` for the guest agent to answer.
    pub fn agent(&self, timeout: Duration) -> Result<GuestAgent, ProtocolError> {
        GuestAgent::wait_ready(&self.agent_socket(), timeout)
    }

    /// Serializes starts and stops of this directory (flock on `launch.lock`).
    fn lock(&self) -> Result<File, LaunchError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&self.dir)
            .map_err(|e| self.dir_err("creating it", e))?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("launch.lock"))
            .map_err(|e| self.dir_err("opening launch.lock", e))?;
        // SAFETY: flock on a descriptor this function owns; it blocks only on another
        // start or stop of the same directory, which is bounded by their timeouts.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.dir_err("locking launch.lock", std::io::Error::last_os_error()));
        }
        Ok(f)
    }

    /// Renders `def` for this directory and starts it.
    pub fn start_definition(
        &self,
        def: &VmDefinition,
        disks: BTreeMap<String, String>,
        network: Network,
        timeout: Duration,
    ) -> Result<Started, LaunchError> {
        let argv = def.render_qemu(&self.render_input(disks, network))?;
        self.start(&argv, timeout)
    }

    /// Starts `argv` (program first; the launcher adds `-pidfile`), detached; returns once
    /// QMP answers, within `timeout`. A QEMU that exits or stays silent is reported with
    /// its output (and a silent one is killed).
    pub fn start(&self, argv: &[String], timeout: Duration) -> Result<Started, LaunchError> {
        let bad = |reason: &str| LaunchError::BadCommand {
            dir: self.dir.clone(),
            reason: reason.to_string(),
        };
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(bad("it is empty"));
        }
        // A daemonizing QEMU would leave us watching its parent, which exits at once.
        if argv.iter().any(|a| {
            matches!(
                a.as_str(),
                "-daemonize" | "--daemonize" | "-pidfile" | "--pidfile"
            )
        }) {
            return Err(bad(
                "-daemonize and -pidfile are the launcher's; remove them",
            ));
        }
        let _lock = self.lock()?;
        if let Some(pid) = self.pid()? {
            return Err(LaunchError::AlreadyRunning {
                dir: self.dir.clone(),
                pid,
            });
        }
        for p in [self.qmp_socket(), self.agent_socket()] {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(LaunchError::PathTooLong {
                    dir: self.dir.clone(),
                    path: p,
                });
            }
        }
        for log in [self.console_log(), self.qemu_log()] {
            let mut old = log.clone().into_os_string();
            old.push(".1");
            match std::fs::rename(&log, &old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.dir_err(&format!("keeping {}", log.display()), e)),
            }
        }
        let mut argv = argv.to_vec();
        argv.push("-pidfile".into());
        argv.push(self.pidfile().to_string_lossy().into_owned());
        let json = serde_json::to_string_pretty(&argv).expect("strings serialize");
        std::fs::write(self.dir.join("command.json"), json + "\n")
            .map_err(|e| self.dir_err("writing command.json", e))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.qemu_log())
            .map_err(|e| self.dir_err("opening qemu.log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| self.dir_err("opening qemu.log", e))?;
        let program = argv[0].clone();
        let mut child = Command::new(&program)
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                dir: self.dir.clone(),
                program,
                source,
            })?;
        let pid = child.id() as i32;
        tracing::info!(dir = %self.dir.display(), pid, "QEMU started; waiting for QMP");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(LaunchError::Exited {
                    dir: self.dir.clone(),
                    status: st.to_string(),
                    log: self.qemu_log(),
                    tail: tail(&self.qemu_log(), 30),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.min(Duration::from_secs(2));
            match self.qmp(attempt).and_then(|mut q| q.query_status()) {
                Ok(s) => break s,
                Err(e) if left.is_zero() => {
                    signal(pid, libc::SIGKILL);
                    let _ = child.wait();
                    return Err(LaunchError::NoQmp {
                        dir: self.dir.clone(),
                        pid,
                        waited: timeout,
                        log: self.qemu_log(),
                        source: Box::new(e),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        // Reap QEMU whenever it exits, for as long as this process lives; afterwards init
        // does. No zombie stays behind holding the pid.
        std::thread::Builder::new()
            .name(format!("reap-qemu-{pid}"))
            .spawn(move || {
                let _ = child.wait();
            })
            .map_err(|e| self.dir_err("starting the reaper thread", e))?;
        tracing::info!(dir = %self.dir.display(), pid, %status, "QEMU answers on QMP");
        Ok(Started { pid, status, argv })
    }

    /// Waits up to `within` for the QEMU of this directory (if any) to be gone; true if it is.
    pub fn wait_stopped(&self, within: Duration) -> Result<bool, LaunchError> {
        match self.pid()? {
            None => Ok(true),
            Some(pid) => Ok(self.wait_gone(pid, within)),
        }
    }

    /// Waits until `pid` no longer holds the pidfile, up to `within`; true if it let go.
    fn wait_gone(&self, pid: i32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.pid().ok().flatten() != Some(pid) && exited(pid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit, or for the guest to have shut down while QEMU stays
    /// (`-no-shutdown`); true if either happened within `within`.
    fn wait_shutdown(&self, q: &mut Qmp, pid: i32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut qmp_ok = true;
        loop {
            if self.pid().ok().flatten() != Some(pid) && exited(pid) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if qmp_ok {
                match q.wait_event("SHUTDOWN", left.min(Duration::from_millis(200))) {
                    Ok(_) => {
                        if q.query_status().is_ok_and(|s| s == "shutdown") {
                            return true;
                        }
                    }
                    Err(ProtocolError::Timeout { .. }) => {}
                    // QEMU closes QMP as it exits: watch the pidfile from here on.
                    Err(_) => qmp_ok = false,
                }
            } else {
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
        }
    }

    /// Stops the QEMU of this directory: power button (if the guest runs: a paused one cannot
    /// react), then `quit` (SIGTERM if QMP does not answer), then SIGKILL, each within
    /// `policy`'s time. Says which one ended it.
    pub fn stop(&self, policy: StopPolicy) -> Result<StopOutcome, LaunchError> {
        let _lock = self.lock()?;
        let t0 = Instant::now();
        let Some(pid) = self.pid()? else {
            return Ok(StopOutcome::NotRunning);
        };
        let dir = self.dir.display().to_string();
        match self.qmp(policy.qmp) {
            Ok(mut q) => {
                if let Some(out) = self.power_down(&mut q, pid, policy, t0)? {
                    return Ok(out);
                }
                // QEMU answers quit and closes the connection: either way, watch the process.
                let _ = q.execute("quit", None);
                if self.wait_gone(pid, policy.quit) {
                    return Ok(StopOutcome::Quit {
                        after: t0.elapsed(),
                    });
                }
            }
            Err(e) => {
                tracing::warn!(%dir, pid, error = %e, "QMP does not answer; sending SIGTERM");
                signal(pid, libc::SIGTERM);
                if self.wait_gone(pid, policy.quit) {
                    return Ok(StopOutcome::Terminated {
                        after: t0.elapsed(),
                    });
                }
            }
        }
        self.kill(pid, t0, policy)
    }

    /// The power button, when the guest can react to it (it runs): the outcome if the guest
    /// shut down in time, None to go on with `quit`.
    fn power_down(
        &self,
        q: &mut Qmp,
        pid: i32,
        policy: StopPolicy,
        t0: Instant,
    ) -> Result<Option<StopOutcome>, LaunchError> {
        let dir = self.dir.display().to_string();
        match q.query_status() {
            Ok(s) if s == "running" => {}
            // Paused, stopped on an I/O error, not started (-S): nobody would press it.
            Ok(s) => {
                tracing::info!(%dir, pid, status = %s, "the guest is not running; quitting QEMU");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(%dir, error = %e, "query-status failed; quitting QEMU");
                return Ok(None);
            }
        }
        if let Err(e) = q.execute("system_powerdown", None) {
            tracing::warn!(%dir, error = %e, "system_powerdown failed; quitting QEMU");
            return Ok(None);
        }
        if !self.wait_shutdown(q, pid, policy.powerdown) {
            tracing::warn!(%dir, pid, waited = ?policy.powerdown, "the guest did not shut down after the power button; quitting QEMU");
            return Ok(None);
        }
        if self.pid()?.is_some() {
            // -no-shutdown: the guest is off, QEMU waits to be told.
            let _ = q.execute("quit", None);
            if !self.wait_gone(pid, policy.quit) {
                tracing::warn!(%dir, pid, "QEMU did not quit after the guest shut down");
                return self.kill(pid, t0, policy).map(Some);
            }
        }
        Ok(Some(StopOutcome::PoweredDown {
            after: t0.elapsed(),
        }))
    }

    fn kill(&self, pid: i32, t0: Instant, policy: StopPolicy) -> Result<StopOutcome, LaunchError> {
        tracing::warn!(dir = %self.dir.display(), pid, "killing QEMU (SIGKILL)");
        signal(pid, libc::SIGKILL);
        if self.wait_gone(pid, policy.kill) {
            return Ok(StopOutcome::Killed {
                after: t0.elapsed(),
            });
        }
        Err(LaunchError::Unkillable {
            dir: self.dir.clone(),
            pid,
            waited: policy.kill,
        })
    }
}

/// The last `lines` lines of a log file (at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(65536)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped). QEMU gives up its
/// pidfile in an exit handler, while the process still runs: a stop waits for the exit too,
/// so that whoever stopped it (and then starts it again, or seals its disks) finds it gone.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..))
            .is_none_or(|state| state.starts_with('Z') || state.starts_with('X')),
    }
}

#[cfg(test)]
mod tests {
    use super::exited;

    #[test]
    fn a_running_process_has_not_exited_a_zombie_or_reaped_one_has() {
        assert!(!exited(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: once it has exited it is a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !exited(pid) {
            assert!(std::time::Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(exited(pid));
    }
}
