//! The launcher and the QMP client against a real `qemu-system-x86_64 -accel tcg` with its
//! disk on a real NBD server (nbdkit). No guest OS: the machine starts paused (`-S`) or sits
//! in the firmware, which ignores the power button, so stopping must escalate. A real guest
//! that shuts down on the power button and runs qemu-ga is in the workspace's
//! `tests/vm_guest.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmreplica_vm::*;

struct Nbd {
    child: Child,
    socket: PathBuf,
}

impl Nbd {
    /// nbdkit serving a 64 MiB memory disk on a unix socket in `dir`.
    fn start(dir: &Path) -> Nbd {
        let socket = dir.join("nbd.sock");
        let child = Command::new("nbdkit")
            .args(["--exit-with-parent", "-f", "-U"])
            .arg(&socket)
            .args(["memory", "64M"])
            .stdout(Stdio::null())
            .spawn()
            .expect("nbdkit (scripts/install-deps.sh installs it)");
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nbdkit did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbd { child, socket }
    }

    fn disks(&self) -> BTreeMap<String, String> {
        [(
            "d".to_string(),
            format!("nbd+unix:///?socket={}", self.socket.display()),
        )]
        .into()
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn definition(dir: &Path, extra: &[&str]) -> VmDefinition {
    let mut qemu = vec![
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
        "-drive",
        "file=${disk:d},format=raw,if=virtio,cache=none",
        "-qmp",
        "unix:${qmp},server=on,wait=off",
        "-serial",
        "file:${console}",
        "${net}",
    ];
    qemu.extend_from_slice(extra);
    let text = format!(
        "version = 1\nname = \"t1\"\ndisks = [\"d\"]\nqemu = {}\nnet = [\"-nic\", \"none\"]\n",
        serde_json::to_string(&qemu).unwrap()
    );
    let p = dir.join("t1.toml");
    std::fs::write(&p, text).unwrap();
    VmDefinition::load(&p).unwrap()
}

const START: Duration = Duration::from_secs(60);

/// Kills the QEMU of a run directory when dropped: a failing test leaves no detached QEMU.
struct KillOnDrop(Instance);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(Some(pid)) = self.0.pid() {
            // SAFETY: kill(2) on the QEMU holding this test's run directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A paused (`-S`) QEMU on an nbdkit disk, started through the launcher in `dir/run`; the
/// guard kills it when the test ends.
fn paused(dir: &Path) -> (Nbd, VmDefinition, Instance, Started, KillOnDrop) {
    let nbd = Nbd::start(dir);
    let def = definition(dir, &["-S"]);
    let vm = Instance::new(dir.join("run"));
    let guard = KillOnDrop(vm.clone());
    let s = vm
        .start_definition(&def, nbd.disks(), Network::Test, START)
        .unwrap();
    (nbd, def, vm, s, guard)
}

fn quick_stop() -> StopPolicy {
    StopPolicy {
        powerdown: Duration::from_secs(2),
        quit: Duration::from_secs(10),
        kill: Duration::from_secs(10),
        qmp: Duration::from_secs(2),
    }
}

fn pgrp(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn starts_detached_answers_qmp_and_stops_by_quit_when_nobody_presses_the_button() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = Instance::new(dir.path().join("run"));
    assert_eq!(
        fresh.state(Duration::from_secs(2)).unwrap(),
        RunState::NotRunning
    );
    let (nbd, def, vm, s, _guard) = paused(dir.path());
    assert_eq!(s.status, "prelaunch");
    assert!(s
        .argv
        .ends_with(&["-pidfile".into(), vm.pidfile().display().to_string()]));
    // Its own process group: a Ctrl-C to ours does not reach it.
    assert_eq!(pgrp(s.pid), s.pid);
    assert_ne!(pgrp(s.pid), pgrp(std::process::id() as i32));
    let recorded: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(vm.dir().join("command.json")).unwrap())
            .unwrap();
    assert_eq!(recorded, s.argv);

    // Another Instance value on the same directory sees it (state lives on disk).
    let again = Instance::new(vm.dir());
    assert_eq!(
        again.state(Duration::from_secs(5)).unwrap(),
        RunState::Running {
            pid: s.pid,
            status: "prelaunch".into()
        }
    );
    let e = again
        .start_definition(&def, nbd.disks(), Network::Test, START)
        .unwrap_err();
    assert!(
        matches!(e, LaunchError::AlreadyRunning { pid, .. } if pid == s.pid),
        "{e}"
    );

    {
        let mut q = vm.qmp(Duration::from_secs(5)).unwrap();
        assert!(q.qemu_version().is_some());
        let blocks = q.execute("query-block", None).unwrap();
        let file = blocks[0]["inserted"]["file"].as_str().unwrap().to_string();
        assert!(file.contains(&nbd.socket.display().to_string()), "{file}");
        q.execute("cont", None).unwrap();
        q.wait_event("RESUME", Duration::from_secs(10)).unwrap();
        assert_eq!(q.query_status().unwrap(), "running");
        q.execute("stop", None).unwrap();
        assert_eq!(
            q.wait_event("STOP", Duration::from_secs(10)).unwrap().name,
            "STOP"
        );
        let e = q.execute("no-such-command", None).unwrap_err();
        assert_eq!(e.class(), Some("CommandNotFound"), "{e}");
        let e = q
            .execute(
                "human-monitor-command",
                Some(json!({"no-such-argument": 1})),
            )
            .unwrap_err();
        assert_eq!(e.class(), Some("GenericError"), "{e}");
        assert!(e.to_string().contains("qmp.sock"), "{e}");
        q.execute("cont", None).unwrap();
    }

    // The firmware ignores the power button: stop escalates to quit, and says so.
    let out = vm.stop(quick_stop()).unwrap();
    assert!(matches!(out, StopOutcome::Quit { .. }), "{out:?}");
    assert_eq!(
        vm.state(Duration::from_secs(2)).unwrap(),
        RunState::NotRunning
    );
    assert!(!Path::new(&format!("/proc/{}", s.pid)).exists() || zombie_or_gone(s.pid));
    assert_eq!(vm.stop(quick_stop()).unwrap(), StopOutcome::NotRunning);

    // The directory is reusable; the previous run's logs are kept once.
    let s2 = vm
        .start_definition(&def, nbd.disks(), Network::Test, START)
        .unwrap();
    assert_ne!(s2.pid, s.pid);
    assert!(vm.dir().join("qemu.log.1").exists());
    assert!(matches!(
        vm.stop(quick_stop()).unwrap(),
        StopOutcome::Quit { .. }
    ));
}

fn zombie_or_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s[s.rfind(')').unwrap() + 2..].starts_with('Z'),
    }
}

#[test]
fn a_hung_qemu_is_reported_unresponsive_and_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (_nbd, _def, vm, s, _guard) = paused(dir.path());
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(s.pid, libc::SIGSTOP) };
    let st = vm.state(Duration::from_millis(500)).unwrap();
    assert!(
        matches!(&st, RunState::Unresponsive { pid, error } if *pid == s.pid && error.contains("qmp.sock")),
        "{st:?}"
    );
    // QMP is silent and SIGTERM waits for a stopped process: only SIGKILL ends it.
    let mut p = quick_stop();
    p.quit = Duration::from_secs(1);
    let out = vm.stop(p).unwrap();
    assert!(matches!(out, StopOutcome::Killed { .. }), "{out:?}");
    assert_eq!(
        vm.state(Duration::from_secs(1)).unwrap(),
        RunState::NotRunning
    );
}

#[test]
fn after_kill_9_the_stale_pidfile_and_sockets_do_not_block_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (nbd, def, vm, s, _guard) = paused(dir.path());
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(s.pid, libc::SIGKILL) };
    assert!(vm.wait_stopped(Duration::from_secs(10)).unwrap());
    assert!(
        vm.pidfile().exists(),
        "QEMU cannot remove its pidfile after kill -9"
    );
    assert_eq!(
        vm.state(Duration::from_secs(1)).unwrap(),
        RunState::NotRunning
    );
    let s2 = vm
        .start_definition(&def, nbd.disks(), Network::Test, START)
        .unwrap();
    assert_eq!(vm.pid().unwrap(), Some(s2.pid));
    // Paused (-S): nobody can react to the power button, so it is not waited for.
    let mut p = quick_stop();
    p.powerdown = Duration::from_secs(120);
    let out = vm.stop(p).unwrap();
    assert!(
        matches!(out, StopOutcome::Quit { after } if after < Duration::from_secs(60)),
        "{out:?}"
    );
}

#[test]
fn a_qemu_that_cannot_start_is_reported_with_its_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let nbd = Nbd::start(dir.path());
    let vm = Instance::new(dir.path().join("run"));

    // The disk's NBD server is not there.
    let def = definition(dir.path(), &["-S"]);
    let mut disks = nbd.disks();
    disks.insert(
        "d".into(),
        format!("nbd+unix:///?socket={}/missing.sock", dir.path().display()),
    );
    let e = vm
        .start_definition(&def, disks, Network::Test, START)
        .unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(e, LaunchError::Exited { .. })
            && m.contains("missing.sock")
            && m.contains("qemu.log"),
        "{m}"
    );

    // An option QEMU does not know.
    let def = definition(dir.path(), &["-no-such-option"]);
    let m = vm
        .start_definition(&def, nbd.disks(), Network::Test, START)
        .unwrap_err()
        .to_string();
    assert!(m.contains("no-such-option"), "{m}");

    // Arguments the launcher owns, or none at all.
    for argv in [
        vec![],
        vec!["qemu-system-x86_64".to_string(), "-daemonize".into()],
    ] {
        let e = vm.start(&argv, START).unwrap_err();
        assert!(matches!(e, LaunchError::BadCommand { .. }), "{e}");
    }

    // A program that is not there.
    let m = vm
        .start(&["/nonexistent/qemu".to_string()], START)
        .unwrap_err()
        .to_string();
    assert!(m.contains("/nonexistent/qemu") && m.contains("run"), "{m}");

    // A run directory too deep for a unix socket.
    let deep = dir.path().join("x".repeat(120));
    let m = Instance::new(&deep)
        .start_definition(
            &definition(dir.path(), &[]),
            nbd.disks(),
            Network::Test,
            START,
        )
        .unwrap_err()
        .to_string();
    assert!(m.contains("unix socket"), "{m}");
    assert_eq!(
        vm.state(Duration::from_secs(1)).unwrap(),
        RunState::NotRunning
    );
}
