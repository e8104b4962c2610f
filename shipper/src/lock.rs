//! One shipper per tracker: two shippers feeding from one tracker would each release
//! generations the other shipped (or never shipped). A shipper holds `shipper.lock` in the
//! directory of the tracker's control socket (its state directory) for as long as it runs
//! (flock: a crash releases it); the file names its PID, so a second one is refused with it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The shipper's hold on its tracker; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct ShipperLock {
    _file: File,
    pub path: PathBuf,
}

/// The directory of the tracker's control socket (its state directory, as a rule): where the
/// shipper keeps its lock, state file and control socket.
pub fn dir_of(control_socket: &Path) -> PathBuf {
    control_socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The shipper's lock file of the tracker whose control socket is `control_socket`.
pub fn path_of(control_socket: &Path) -> PathBuf {
    dir_of(control_socket).join("shipper.lock")
}

/// Takes the lock beside `control_socket`, or says which process holds it.
pub fn lock(control_socket: &Path) -> io::Result<ShipperLock> {
    let path = path_of(control_socket);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another shipper (PID {}) already ships from the tracker at {} (it holds {}): \
                 one shipper per tracker; stop it first",
                pid.trim(),
                control_socket.display(),
                path.display()
            ),
        ));
    }
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    writeln!(f, "{}", std::process::id())?;
    f.sync_all()?;
    Ok(ShipperLock { _file: f, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_shipper_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let first = lock(&sock).unwrap();
        let e = lock(&sock).unwrap_err().to_string();
        assert!(
            e.contains(&format!("PID {}", std::process::id()))
                && e.contains("one shipper per tracker"),
            "{e}"
        );
        drop(first);
        lock(&sock).unwrap();
    }
}
