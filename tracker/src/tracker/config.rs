//! How a tracker is configured: its state directory, disks, granularity and the bound on
//! copy-on-write.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::Engine;

pub const DEFAULT_GRANULARITY: u32 = 64 * 1024;

pub struct TrackerConfig {
    pub state_dir: PathBuf,
    pub disks: Vec<(String, PathBuf)>,
    pub granularity: u32,
    pub tracking: bool,
    /// Use the thread-pool engine even where io_uring works.
    pub force_thread_pool: bool,
    /// Activity-log capacity in 4 MiB extents (default [`crate::activity_log::CAPACITY`]).
    pub al_extents: usize,
    /// How much the copy-on-write stores may hold for one frozen generation.
    pub cow_limit: CowLimit,
    /// An engine to use instead of probing one (tests).
    pub engine: Option<Arc<dyn Engine>>,
    /// Disks served but neither tracked nor shipped (swap, scratch): no bitmap, no log, no
    /// copy-on-write; the shipper leaves them out and failover recreates them blank.
    pub excluded: Vec<String>,
}

impl TrackerConfig {
    /// Defaults for everything but the state directory and the disks.
    pub fn new(state_dir: PathBuf, disks: Vec<(String, PathBuf)>) -> TrackerConfig {
        TrackerConfig {
            state_dir,
            disks,
            granularity: DEFAULT_GRANULARITY,
            tracking: true,
            force_thread_pool: false,
            al_extents: crate::activity_log::CAPACITY,
            cow_limit: CowLimit::default(),
            engine: None,
            excluded: Vec::new(),
        }
    }
}

/// The bound on the copy-on-write stores of one frozen generation (all disks together).
/// Past it the generation is abandoned and the disks resynchronised, rather than fill the
/// state directory's file system.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CowLimit {
    Bytes(u64),
    /// This fraction of the space free in the state directory's file system at the freeze.
    FreeFraction(f64),
}

impl Default for CowLimit {
    fn default() -> Self {
        CowLimit::FreeFraction(0.5)
    }
}

impl CowLimit {
    /// Parses `50%` (of the free space) or a size (`64G`, `512M`, `4096`).
    pub fn parse(s: &str) -> Result<CowLimit, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return p
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .map(|p| CowLimit::FreeFraction(p / 100.0))
                .ok_or_else(|| format!("{s:?}: a percentage from 0 to 100 (of the free space)"));
        }
        let (num, mult) = match s.chars().last() {
            Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
            Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
            Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
            Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
            _ => (s, 1),
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(CowLimit::Bytes)
            .ok_or_else(|| format!("{s:?} is not a size (64G, 512M) or a percentage (50%)"))
    }

    /// The limit in bytes now, for a state directory `dir`.
    pub(super) fn bytes(&self, dir: &Path) -> u64 {
        match *self {
            CowLimit::Bytes(b) => b,
            CowLimit::FreeFraction(f) => (free_space(dir).unwrap_or(0) as f64 * f) as u64,
        }
    }
}

/// Bytes available to us in the file system holding `dir`.
fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs fills the zeroed struct it is given; the path is NUL-terminated and
    // lives across the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
