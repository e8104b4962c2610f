//! `powercut-fs`: a FUSE passthrough file system that behaves like a disk with a volatile
//! write cache, so tests can cut the power under a program and see what it made durable.
//!
//! ```text
//! powercut-fs [--persist-on-cut P] [--seed N] [--verbose] BACKING_DIR MOUNTPOINT
//! ```
//!
//! Mounts `BACKING_DIR` at `MOUNTPOINT` (in the foreground; root, or a FUSE the caller may
//! mount) and prints `ready` on stdout once mounted.
//!
//! The model:
//! * **File data is volatile until fsync.** `write`, `fallocate` (punch hole, zero range,
//!   allocate) and size changes (`truncate`, `ftruncate`, `O_TRUNC`) go into a per-file
//!   overlay held in this process: reads through the mount see them, the backing file does
//!   not. `fsync` or `fdatasync` of a file (and so `msync(MS_SYNC)` of a shared mapping, which
//!   the kernel turns into page writes and then an fsync) writes that file's overlay to the
//!   backing file. `close` makes nothing durable.
//! * **Names are volatile until their directory is fsynced.** `create`, `mkdir`, `rename`
//!   (also over an existing file, `RENAME_NOREPLACE`, `RENAME_EXCHANGE`), `unlink` and `rmdir`
//!   reach the backing directory at once but are recorded with how to undo them (an unlinked
//!   or replaced file is kept in a hidden trash); `fsync` of a directory makes the changes in
//!   it durable (a rename needs both its directories). A power cut undoes, newest first,
//!   every change not durable: a file created and fsynced in a directory never fsynced is
//!   gone, a rename that was not made durable is back where it was. `fsync` of a file makes
//!   its data durable, not its name (POSIX promises no more). Permissions, owners and times
//!   are durable at once (a simplification).
//! * **Holes are real:** `SEEK_DATA`/`SEEK_HOLE` answer from the backing file's holes and the
//!   pages written, punched or zeroed since the last fsync.
//! * **SIGUSR1 is a power cut:** every overlay is dropped (with `--persist-on-cut P`, each
//!   pending page is first written back with probability P, as a disk cache that had flushed
//!   some pages on its own; sizes and punched ranges are always lost), every name change not
//!   durable is undone, every later request fails with EIO, the mount is detached and the
//!   process exits 0. The kernel's page cache
//!   for the mount goes with the mount. An unmount from outside counts as a power cut too.
//! * **SIGTERM or SIGINT is an orderly shutdown:** every overlay is applied and every name
//!   change kept (a disk flushes its cache before powering off), then the same unmount and
//!   exit 0.
//!
//! What the kernel is told: no writeback cache (every `write(2)` reaches this process before
//! it returns, so the overlay is the only volatile layer besides the mount's page cache), no
//! `direct_io` (shared mappings need the page cache), 1 s attribute and entry timeouts; no
//! lock support, so `flock` and POSIX locks are handled by the kernel locally (they work
//! between the processes of this machine); no `mknod`, links or symlinks: keep unix sockets
//! outside the mount.

mod fs;
mod names;
mod overlay;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fuser::{Config, MountOption, Session};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

struct Args {
    backing: PathBuf,
    mountpoint: PathBuf,
    persist_on_cut: f64,
    seed: u64,
    verbose: bool,
}

const USAGE: &str =
    "usage: powercut-fs [--persist-on-cut P] [--seed N] [--verbose] BACKING_DIR MOUNTPOINT";

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args_os().skip(1);
    let mut pos = Vec::new();
    let mut persist_on_cut = 0.0;
    let mut seed = None;
    let mut verbose = false;
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--persist-on-cut") => {
                let v = it.next().ok_or("--persist-on-cut needs a value")?;
                persist_on_cut = v
                    .to_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or("--persist-on-cut takes a probability from 0 to 1")?;
            }
            Some("--seed") => {
                let v = it.next().ok_or("--seed needs a value")?;
                seed = Some(
                    v.to_str()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or("--seed takes an unsigned integer")?,
                );
            }
            Some("--verbose") => verbose = true,
            Some("-h" | "--help") => return Err(USAGE.into()),
            Some(s) if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            _ => pos.push(PathBuf::from(a)),
        }
    }
    let [backing, mountpoint] = <[PathBuf; 2]>::try_from(pos).map_err(|_| USAGE.to_string())?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id())
    });
    Ok(Args {
        backing,
        mountpoint,
        persist_on_cut,
        seed,
        verbose,
    })
}

/// splitmix64: enough randomness to pick the pages a cut keeps.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Detaches the mount (it goes once nothing uses it; this process exits right after, which
/// aborts the connection for anyone still holding a file open).
fn detach(mountpoint: &Path) {
    if let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: umount2 with a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "powercut-fs: unmounting {}: {}",
                mountpoint.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let fs = match fs::PowercutFs::new(&args.backing) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("powercut-fs: backing dir {}: {e}", args.backing.display());
            return ExitCode::FAILURE;
        }
    };
    let shared = fs.shared();
    let mountpoint = match std::fs::canonicalize(&args.mountpoint) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("powercut-fs: mountpoint {}: {e}", args.mountpoint.display());
            return ExitCode::FAILURE;
        }
    };
    // Signals first, so none is missed between "ready" and the handler.
    let mut signals = match Signals::new([SIGUSR1, SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("powercut-fs: signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("powercut".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::RW,
    ];
    config.n_threads = Some(2);
    let session = match Session::new(fs, &mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "powercut-fs: mounting at {}: {e} (is /dev/fuse there, and are we root?)",
                mountpoint.display()
            );
            return ExitCode::FAILURE;
        }
    };
    {
        let shared = shared.clone();
        let mountpoint = mountpoint.clone();
        let (persist, seed, verbose) = (args.persist_on_cut, args.seed, args.verbose);
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                if sig == SIGUSR1 {
                    let mut rng = Rng(seed);
                    let (files, lost, kept) =
                        shared.power_cut(&mut || persist > 0.0 && rng.unit() < persist);
                    if verbose {
                        eprintln!(
                            "powercut-fs: power cut: {files} files had pending data; \
                             {lost} pages lost, {kept} written back (seed {seed}); {:?}",
                            shared.stats()
                        );
                    }
                } else {
                    match shared.sync_all_and_stop() {
                        Ok(n) if verbose => eprintln!(
                            "powercut-fs: orderly shutdown: {n} files synced; {:?}",
                            shared.stats()
                        ),
                        Ok(_) => {}
                        Err(e) => eprintln!("powercut-fs: orderly shutdown: sync failed: {e}"),
                    }
                }
                detach(&mountpoint);
                std::process::exit(0);
            }
        });
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let res = session.run();
    // Unmounted from outside (or the connection was aborted): nothing pending is applied.
    let (files, lost, _) = shared.power_cut(&mut || false);
    if args.verbose || files > 0 {
        eprintln!(
            "powercut-fs: session ended ({res:?}); {files} files with pending data dropped \
             ({lost} pages)"
        );
    }
    ExitCode::SUCCESS
}
