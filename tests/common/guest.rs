//! The test guest (scripts/guest/): building it, a VM definition that boots it with the vm
//! crate's launcher, and reading its console protocol (scripts/guest/init).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::run;

/// Builds the test guest once (build.sh is idempotent and locked) and returns its directory.
pub fn guest_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest");
    std::fs::create_dir_all(&d).unwrap();
    run(Command::new("bash")
        .arg("scripts/guest/build.sh")
        .arg(&d)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    d
}

/// Writes a VM definition (`DIR/NAME.toml`) that boots the test guest in `mode` with one
/// disk, `disk0`, plus QMP, the guest agent and the serial console in the run directory.
/// `kernel_args` are extra kernel parameters (`vmr.max_files=20`, ...).
pub fn guest_definition(dir: &Path, name: &str, mode: &str, kernel_args: &str) -> PathBuf {
    let g = guest_dir();
    let lit = |p: PathBuf| p.display().to_string().replace('$', "$$");
    let qemu = [
        "qemu-system-x86_64".to_string(),
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        "512".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        lit(g.join("bzImage")),
        "-initrd".into(),
        lit(g.join("initramfs.cpio.gz")),
        "-append".into(),
        format!("console=ttyS0 panic=-1 vmr.mode={mode} {kernel_args} quiet").replace('$', "$$"),
        "-drive".into(),
        "file=${disk:disk0},format=raw,if=virtio,cache=none".into(),
        "-qmp".into(),
        "unix:${qmp},server=on,wait=off".into(),
        "-chardev".into(),
        "socket,id=qga0,path=${qga},server=on,wait=off".into(),
        "-device".into(),
        "virtio-serial".into(),
        "-device".into(),
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        "-serial".into(),
        "file:${console}".into(),
        "${net}".into(),
    ];
    let text = format!(
        "version = 1\nname = \"{name}\"\ndisks = [\"disk0\"]\nqemu = {}\nnet = [\"-nic\", \"none\"]\n",
        serde_json::to_string(&qemu).unwrap()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// The console's complete lines, carriage returns dropped (empty if the log is not there yet).
/// A last line without its newline is one QEMU is still writing (the serial port hands the
/// log a few bytes at a time) and is left for the next read.
pub fn console_lines(log: &Path) -> Vec<String> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..=end],
        None => &[],
    };
    String::from_utf8_lossy(complete)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// Fields after `tag` on the console lines that start with it.
pub fn tagged(lines: &[String], tag: &str) -> Vec<Vec<String>> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))
        .map(|r| r.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// A SHA-256 as the guest's `sha256sum` prints it.
fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The writer's `VMR-FILE <seq> <name> <sha256>` lines: name → sha256. A line a kernel
/// message broke into is not a report and is skipped (the checker's side then has nothing
/// to match it against, so nothing is claimed for that file).
pub fn files_written(lines: &[String]) -> BTreeMap<String, String> {
    tagged(lines, "VMR-FILE")
        .into_iter()
        .filter(|f| f.len() == 3 && is_sha256(&f[2]))
        .map(|f| (f[1].clone(), f[2].clone()))
        .collect()
}

/// The highest sequence number of the writer's `VMR-FILE <seq> ...` lines (0 if none): a
/// line a kernel message broke into may be skipped by [`files_written`], so counting its
/// files undercounts what the writer numbered.
pub fn highest_seq(lines: &[String]) -> u64 {
    tagged(lines, "VMR-FILE")
        .iter()
        .filter_map(|f| f.first()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// The checker's `VMR-HAVE <name> <sha256>` lines: name → sha256. A broken line is skipped,
/// which can only make a file look missing, never present.
pub fn files_present(lines: &[String]) -> BTreeMap<String, String> {
    tagged(lines, "VMR-HAVE")
        .into_iter()
        .filter(|f| f.len() == 2 && is_sha256(&f[1]))
        .map(|f| (f[0].clone(), f[1].clone()))
        .collect()
}

/// Waits until the console at `log` shows at least `n` VMR-FILE lines; panics with the
/// console's tail after `timeout`.
pub fn wait_files(log: &Path, n: usize, timeout: Duration) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let lines = console_lines(log);
        if files_written(&lines).len() >= n {
            return lines;
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("VMR-GUEST-FAIL")),
            "the guest failed:\n{}",
            lines.join("\n")
        );
        assert!(
            t0.elapsed() < timeout,
            "fewer than {n} VMR-FILE lines after {timeout:?}; console {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills the QEMU of a run directory when dropped (a failing test must not leave a detached
/// QEMU behind).
pub struct KillOnDrop(pub vmreplica_vm::Instance);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(Some(pid)) = self.0.pid() {
            // SAFETY: kill(2) on the QEMU holding this test's run directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
