//! Reading a recovery point while later cycles keep landing: a [`PointView`] of point N reads
//! the replica image, except where a cycle after N overwrote it: there it reads the old
//! contents from the undo log of the first such cycle (the cycle being received included).
//! Each log is indexed in memory ([`LogIndex`]), so a read costs one lookup and one pread
//! per piece, and a view never copies the disk.
//!
//! Race-free by ordering, like the tracker's frozen reads: a receiving cycle makes an undo
//! entry durable and inserts it into its log's index *before* it issues the image write it
//! undoes. A read resolves its range, reads image pieces, then resolves those pieces again:
//! a piece still resolved to the image was read before any write to it was issued; a piece
//! now covered by a log is read from the log (whose entries never change). A rollback
//! (which shrinks coverage) bumps a counter, and a read that saw it change starts over.
//!
//! A view pins its point: retention never drops a pinned point (pins live in memory).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vmreplica_common::sparse;

use crate::image::Image;
use crate::store::state::VmState;
use crate::store::StoreError;
use crate::undo::{Enc, Entry, LogIndex};

/// The undo logs of a replica, for views.
#[derive(Default)]
pub(crate) struct Chain {
    /// Finished logs, oldest first.
    pub logs: Vec<Arc<LogIndex>>,
    /// The log of the cycle being received.
    pub receiving: Option<Arc<LogIndex>>,
}

#[derive(Default)]
struct Pins {
    /// Points that exist (a view may pin them).
    points: BTreeSet<u64>,
    counts: BTreeMap<u64, usize>,
}

/// What views of one replica share with its store.
pub struct VmShared {
    pub(crate) vm: String,
    pub(crate) dir: PathBuf,
    pub(crate) images: RwLock<Arc<Vec<Image>>>,
    pub(crate) chain: RwLock<Chain>,
    /// Bumped whenever coverage shrinks (a rollback): reads that overlap it start over.
    pub(crate) shrinks: AtomicU64,
    pins: Mutex<Pins>,
    /// The state as last saved.
    published: RwLock<Arc<VmState>>,
}

impl VmShared {
    pub(crate) fn new(vm: &str, dir: PathBuf, state: &VmState) -> VmShared {
        let s = VmShared {
            vm: vm.to_string(),
            dir,
            images: RwLock::new(Arc::new(Vec::new())),
            chain: RwLock::new(Chain::default()),
            shrinks: AtomicU64::new(0),
            pins: Mutex::new(Pins::default()),
            published: RwLock::new(Arc::new(state.clone())),
        };
        s.publish(state);
        s
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// The state as last saved.
    pub(crate) fn state(&self) -> Arc<VmState> {
        Arc::clone(&self.published.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// A new state was saved: views see its points.
    pub(crate) fn publish(&self, state: &VmState) {
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state.clone());
        let mut pins = self.lock_pins();
        // A VM failed over here has its images written by its tracker: no point is readable.
        pins.points = if state.is_replica() {
            state.points.iter().map(|p| p.cycle).collect()
        } else {
            Default::default()
        };
    }

    fn lock_pins(&self) -> std::sync::MutexGuard<'_, Pins> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes point `cycle` away from views if none holds it: true if it may be dropped.
    pub(crate) fn unpinned_take(&self, cycle: u64) -> bool {
        let mut pins = self.lock_pins();
        if pins.counts.get(&cycle).copied().unwrap_or(0) > 0 {
            return false;
        }
        pins.points.remove(&cycle);
        true
    }

    /// Points views hold open.
    pub(crate) fn pinned(&self) -> BTreeSet<u64> {
        self.lock_pins()
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, _)| *p)
            .collect()
    }

    pub(crate) fn images(&self) -> Arc<Vec<Image>> {
        Arc::clone(&self.images.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Where a piece of a point's bytes is.
#[derive(Clone)]
enum Src {
    Log(Arc<LogIndex>, Entry),
    Image,
}

/// A stretch of a point's disk, as block status reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data.
    Data,
    /// Reads as zeroes, not allocated.
    Hole,
}

/// A read-only view of recovery point `point` of a VM's disks, exact at every instant while
/// later cycles apply. `Send + Sync`: one view serves many readers.
pub struct PointView {
    shared: Arc<VmShared>,
    point: u64,
    disks: Vec<(String, u64)>,
}

impl std::fmt::Debug for PointView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PointView({} at {})", self.shared.vm, self.point)
    }
}

impl PointView {
    /// A view of point `point`, pinned until the view is dropped.
    pub fn open(shared: &Arc<VmShared>, point: u64) -> Result<PointView, StoreError> {
        let state = shared.state();
        {
            let mut pins = shared.lock_pins();
            if !pins.points.contains(&point) {
                return Err(StoreError::NoSuchPoint {
                    vm: shared.vm.clone(),
                    cycle: point,
                });
            }
            *pins.counts.entry(point).or_default() += 1;
        }
        Ok(PointView {
            shared: Arc::clone(shared),
            point,
            disks: state
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.size))
                .collect(),
        })
    }

    pub fn vm(&self) -> &str {
        &self.shared.vm
    }

    pub fn point(&self) -> u64 {
        self.point
    }

    /// The disks: name and size, in the cycle's order.
    pub fn disks(&self) -> &[(String, u64)] {
        &self.disks
    }

    fn check(&self, disk: usize, offset: u64, len: u64) -> io::Result<()> {
        let Some((name, size)) = self.disks.get(disk) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("VM {}: no disk {disk}", self.shared.vm),
            ));
        };
        if offset.checked_add(len).is_none_or(|e| e > *size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "VM {} disk {name}: {offset}+{len} is beyond its end ({size} bytes)",
                    self.shared.vm
                ),
            ));
        }
        Ok(())
    }

    /// Where each piece of `[start, end)` of `disk` is for this point now.
    fn resolve(&self, disk: u16, start: u64, end: u64) -> Vec<(u64, u64, Src)> {
        let chain = self.shared.chain.read().unwrap_or_else(|e| e.into_inner());
        let logs = chain
            .logs
            .iter()
            .filter(|l| l.to >= self.point)
            .chain(chain.receiving.iter());
        let mut out = Vec::new();
        let mut rest = vec![(start, end)];
        for log in logs {
            if rest.is_empty() {
                break;
            }
            let mut still = Vec::new();
            for (s, e) in rest {
                let mut pos = s;
                for (a, b, entry) in log.covering(disk, s, e) {
                    if a > pos {
                        still.push((pos, a));
                    }
                    out.push((a, b, Src::Log(Arc::clone(log), entry)));
                    pos = b;
                }
                if pos < e {
                    still.push((pos, e));
                }
            }
            rest = still;
        }
        out.extend(rest.into_iter().map(|(s, e)| (s, e, Src::Image)));
        out.sort_by_key(|p| p.0);
        out
    }

    /// Reads `buf.len()` bytes of disk `disk` at `offset`, exactly as they were at the point.
    pub fn read_at(&self, disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(disk, offset, buf.len() as u64)?;
        let images = self.shared.images();
        let img = images.get(disk).ok_or_else(|| {
            io::Error::other(format!("VM {}: disk {disk} is not open", self.shared.vm))
        })?;
        let end = offset + buf.len() as u64;
        loop {
            let shrinks = self.shared.shrinks.load(Ordering::Acquire);
            let mut from_image = Vec::new();
            for (s, t, src) in self.resolve(disk as u16, offset, end) {
                let dst = &mut buf[(s - offset) as usize..(t - offset) as usize];
                match src {
                    Src::Log(log, e) => log.read(&e, s, t, dst)?,
                    Src::Image => {
                        read_image(img, s, dst)?;
                        from_image.push((s, t));
                    }
                }
            }
            // Pieces read from the image: covered by a log since (its cycle's write may have
            // landed), they come from the log; still not covered, what was read is right.
            for (s, t) in from_image {
                for (a, b, src) in self.resolve(disk as u16, s, t) {
                    if let Src::Log(log, e) = src {
                        log.read(
                            &e,
                            a,
                            b,
                            &mut buf[(a - offset) as usize..(b - offset) as usize],
                        )?;
                    }
                }
            }
            if self.shared.shrinks.load(Ordering::Acquire) == shrinks {
                return Ok(());
            }
        }
    }

    /// Data and holes of `[offset, offset + len)` of disk `disk` at the point, in order.
    pub fn extents(&self, disk: usize, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(disk, offset, len)?;
        let images = self.shared.images();
        let img = images.get(disk).ok_or_else(|| {
            io::Error::other(format!("VM {}: disk {disk} is not open", self.shared.vm))
        })?;
        let end = offset + len;
        loop {
            let shrinks = self.shared.shrinks.load(Ordering::Acquire);
            let mut out: Vec<Extent> = Vec::new();
            for (s, t, src) in self.resolve(disk as u16, offset, end) {
                match src {
                    Src::Log(_, e) => push(&mut out, s, t, kind_of(&e)),
                    Src::Image => {
                        // Re-resolved after the image was asked, as reads are.
                        let mut parts = Vec::new();
                        let mut pos = s;
                        for (a, b) in sparse::data_regions_in(&img.file, s, t)? {
                            if a > pos {
                                parts.push((pos, a, ExtentKind::Hole));
                            }
                            parts.push((a, b, ExtentKind::Data));
                            pos = b;
                        }
                        if pos < t {
                            parts.push((pos, t, ExtentKind::Hole));
                        }
                        for (a, b, k) in parts {
                            for (x, y, src) in self.resolve(disk as u16, a, b) {
                                let k = match src {
                                    Src::Log(_, e) => kind_of(&e),
                                    Src::Image => k,
                                };
                                push(&mut out, x, y, k);
                            }
                        }
                    }
                }
            }
            if self.shared.shrinks.load(Ordering::Acquire) == shrinks {
                return Ok(out);
            }
        }
    }
}

fn kind_of(e: &Entry) -> ExtentKind {
    if e.enc == Enc::Zero {
        ExtentKind::Hole
    } else {
        ExtentKind::Data
    }
}

/// Appends an extent, joined to the last one if it continues it with the same kind.
fn push(out: &mut Vec<Extent>, s: u64, t: u64, kind: ExtentKind) {
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.offset + last.len == s {
            last.len += t - s;
            return;
        }
    }
    out.push(Extent {
        offset: s,
        len: t - s,
        kind,
    });
}

fn read_image(img: &Image, offset: u64, dst: &mut [u8]) -> io::Result<()> {
    img.file.read_exact_at(dst, offset)
}

impl Drop for PointView {
    fn drop(&mut self) {
        let mut pins = self.shared.lock_pins();
        if let Some(n) = pins.counts.get_mut(&self.point) {
            *n -= 1;
            if *n == 0 {
                pins.counts.remove(&self.point);
            }
        }
    }
}
