//! Dirty tracking of one disk: the mapped bitmap, the activity log that makes set bits
//! crash-safe, and copy-on-write of frozen blocks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

use crate::activity_log::{ActivityLog, ActivityLogError, Recovered, CAPACITY, EXTENT_SHIFT};
use crate::bitmap::{Bitmap, BitmapError, Geometry, COW_SLOT};
use crate::cow::{CowStore, Then};

#[derive(Debug, Error)]
pub enum TrackingError {
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error(transparent)]
    ActivityLog(#[from] ActivityLogError),
    #[error("copy-on-write store {path}: {source}")]
    Cow { path: PathBuf, source: io::Error },
    #[error("image {path}: {source}")]
    Image { path: PathBuf, source: io::Error },
}

impl TrackingError {
    pub fn io_kind(&self) -> io::Error {
        io::Error::other(self.to_string())
    }
}

/// Which bitmap slot plays which role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub active: usize,
    pub frozen: Option<usize>,
}

pub struct Tracking {
    geo: Geometry,
    bitmap: Arc<Bitmap>,
    al: Mutex<ActivityLog>,
    hot: Vec<AtomicBool>,
    /// Extents the activity log holds before it is checkpointed.
    al_capacity: usize,
    slots: RwLock<Slots>,
    cow: Arc<CowStore>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.cow.stop();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

/// How opening the tracking files went.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenOutcome {
    /// Nothing to recover.
    Clean,
    /// The activity log was replayed: this many extents were marked dirty.
    Replayed(usize),
    /// The bitmap cannot be trusted: the disk needs a checksum resync.
    ResyncRequired(String),
}

impl Tracking {
    /// Opens (or creates) the tracking files of a disk under `dir` with prefix `name`.
    /// `unclean` says the tracker did not shut down cleanly, so the log is replayed.
    pub fn open(
        dir: &Path,
        name: &str,
        geo: Geometry,
        slots: Slots,
        unclean: bool,
        existed_before: bool,
        al_capacity: usize,
    ) -> Result<(Tracking, OpenOutcome), TrackingError> {
        let al_capacity = al_capacity.clamp(2, CAPACITY);
        let (bitmap, created) = Bitmap::open(&dir.join(format!("{name}.bitmap")), geo)?;
        let (al, recovered) = ActivityLog::open(&dir.join(format!("{name}.al")))?;
        let cow_path = dir.join(format!("{name}.cow"));
        let cow = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cow_path)
            .map_err(|source| TrackingError::Cow {
                path: cow_path.clone(),
                source,
            })?;
        let extents = (geo.disk_size >> EXTENT_SHIFT) + 1;
        let hot = (0..extents).map(|_| AtomicBool::new(false)).collect();
        let mut t = Tracking {
            geo,
            bitmap: Arc::new(bitmap),
            al: Mutex::new(al),
            hot,
            al_capacity,
            slots: RwLock::new(slots),
            cow: Arc::new(CowStore::new(cow_path, cow)),
            syncer: None,
        };
        let outcome = if existed_before && created {
            t.mark_all();
            OpenOutcome::ResyncRequired(format!("bitmap {} was missing", t.bitmap.path().display()))
        } else if !unclean {
            OpenOutcome::Clean
        } else {
            match recovered {
                Recovered::New if existed_before => {
                    t.mark_all();
                    OpenOutcome::ResyncRequired("activity log was missing".into())
                }
                Recovered::New => OpenOutcome::Clean,
                Recovered::Unreadable => {
                    t.mark_all();
                    OpenOutcome::ResyncRequired("activity log is unreadable".into())
                }
                Recovered::Extents(ext) => {
                    let n = ext.len();
                    for e in ext {
                        t.mark_extent(e);
                    }
                    OpenOutcome::Replayed(n)
                }
            }
        };
        // Everything recovered is now in the bitmap: make it durable and start a fresh log.
        t.bitmap.flush()?;
        t.al.get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .set(Vec::new())?;
        t.syncer = Some(t.cow.spawn_syncer(Arc::clone(&t.bitmap), name));
        Ok((t, outcome))
    }

    fn mark_all(&mut self) {
        let slots = *self.slots.get_mut().unwrap_or_else(|e| e.into_inner());
        self.bitmap.set_range(slots.active, 0..self.geo.blocks());
    }

    fn mark_extent(&mut self, e: u64) {
        let slots = *self.slots.get_mut().unwrap_or_else(|e| e.into_inner());
        let start = e << EXTENT_SHIFT;
        if start >= self.geo.disk_size {
            return;
        }
        let len = (1u64 << EXTENT_SHIFT).min(self.geo.disk_size - start);
        self.bitmap
            .set_range(slots.active, self.geo.block_range(start, len));
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn cow_path(&self) -> &Path {
        &self.cow.path
    }

    pub fn slots(&self) -> Slots {
        *self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the blocks of `[offset, offset+len)` dirty, durably enough that a crash after
    /// this returns still finds them dirty. Returns the frozen slot, if any, for copy-on-write.
    pub fn mark(&self, offset: u64, len: u64) -> Result<Option<usize>, TrackingError> {
        if len == 0 {
            return Ok(self.slots().frozen);
        }
        let first = offset >> EXTENT_SHIFT;
        let last = (offset + len - 1) >> EXTENT_SHIFT;
        if last - first + 1 > (self.al_capacity / 2) as u64 {
            // A range too large for the log (a trim of the whole disk, say): set the bits and
            // flush the bitmap before the write may proceed.
            let slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            self.bitmap
                .set_range(slots.active, self.geo.block_range(offset, len));
            self.bitmap.flush()?;
            return Ok(slots.frozen);
        }
        loop {
            {
                let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
                if (first..=last).all(|e| self.hot[e as usize].load(Ordering::Acquire)) {
                    for b in self.geo.block_range(offset, len) {
                        self.bitmap.set(slots.active, b);
                    }
                    return Ok(slots.frozen);
                }
            }
            self.activate(first..=last)?;
        }
    }

    /// Adds extents to the activity log (checkpointing it if full) and marks them hot.
    fn activate(&self, extents: std::ops::RangeInclusive<u64>) -> Result<(), TrackingError> {
        let mut al = self.al.lock().unwrap_or_else(|e| e.into_inner());
        let cold: Vec<u64> = extents
            .filter(|e| !self.hot[*e as usize].load(Ordering::Acquire))
            .collect();
        if cold.is_empty() {
            return Ok(());
        }
        let mut logged = al.extents().to_vec();
        if al.extents().len() + cold.len() > self.al_capacity {
            // Checkpoint: with no writer between its hot check and its bit set, the bitmap
            // becomes durable and every logged extent can leave the log.
            let _w = self.slots.write().unwrap_or_else(|e| e.into_inner());
            self.bitmap.flush()?;
            for e in logged.drain(..) {
                self.hot[e as usize].store(false, Ordering::Release);
            }
        }
        logged.extend_from_slice(&cold);
        al.set(logged)?;
        for e in cold {
            self.hot[e as usize].store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Before blocks of `[offset, offset+len)` are overwritten: copies aside those that are
    /// frozen and not yet copied, and runs `then` once the copies are durable.
    pub fn copy_on_write(
        &self,
        frozen: usize,
        image: &File,
        image_path: &Path,
        offset: u64,
        len: u64,
        then: Then,
    ) {
        self.cow.before_overwrite(
            &self.bitmap,
            self.geo,
            frozen,
            image,
            image_path,
            offset,
            len,
            then,
        )
    }

    /// Reads `[offset, offset+len)` as it was at the freeze of the frozen generation: the
    /// image first, then, for blocks whose copy-on-write bit is set by now, the store (the bit
    /// is set before any overwrite is issued, so this never returns a torn block).
    pub fn read_frozen(
        &self,
        image: &File,
        image_path: &Path,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), TrackingError> {
        image
            .read_exact_at(buf, offset)
            .map_err(|source| TrackingError::Image {
                path: image_path.to_path_buf(),
                source,
            })?;
        std::sync::atomic::fence(Ordering::SeqCst);
        for b in self.geo.block_range(offset, buf.len() as u64) {
            if !self.bitmap.test(COW_SLOT, b) {
                continue;
            }
            let (bs, bl) = self.geo.block_bytes(b);
            let s = bs.max(offset);
            let e = (bs + bl).min(offset + buf.len() as u64);
            self.cow
                .read(&mut buf[(s - offset) as usize..(e - offset) as usize], s)
                .map_err(|source| TrackingError::Cow {
                    path: self.cow.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Freeze: the active slot becomes frozen, the other (cleared) slot active. Callers have
    /// drained in-flight writes. Durable before it returns.
    /// With `full`, every block is frozen (initial sync, resync): the whole disk stays readable
    /// as of the freeze, and only blocks the guest rewrites cost a copy.
    pub fn freeze(&self, full: bool) -> Result<Slots, TrackingError> {
        let mut s = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let next = 1 - s.active;
        self.bitmap.clear_slot(next);
        self.bitmap.clear_slot(COW_SLOT);
        self.truncate_cow()?;
        if full {
            self.bitmap.set_range(s.active, 0..self.geo.blocks());
        }
        self.bitmap.flush()?;
        *s = Slots {
            active: next,
            frozen: Some(s.active),
        };
        Ok(*s)
    }

    /// Drops the frozen generation (it reached the replica).
    pub fn release(&self) -> Result<Slots, TrackingError> {
        let mut s = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = s.frozen.take() {
            self.bitmap.clear_slot(f);
        }
        self.bitmap.clear_slot(COW_SLOT);
        self.bitmap.flush()?;
        self.truncate_cow()?;
        Ok(*s)
    }

    /// Puts the frozen generation's blocks back into the active set (shipping failed).
    pub fn merge(&self) -> Result<Slots, TrackingError> {
        let mut s = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = s.frozen.take() {
            self.bitmap.merge(s.active, f);
            self.bitmap.flush()?;
            self.bitmap.clear_slot(f);
        }
        self.bitmap.clear_slot(COW_SLOT);
        self.bitmap.flush()?;
        self.truncate_cow()?;
        Ok(*s)
    }

    fn truncate_cow(&self) -> Result<(), TrackingError> {
        self.cow.truncate().map_err(|source| TrackingError::Cow {
            path: self.cow.path.clone(),
            source,
        })
    }

    /// Blocks changed and not yet replicated (active or frozen).
    pub fn is_dirty(&self, b: u64) -> bool {
        let s = self.slots();
        self.bitmap.test(s.active, b) || s.frozen.is_some_and(|f| self.bitmap.test(f, b))
    }

    pub fn flush(&self) -> Result<(), TrackingError> {
        Ok(self.bitmap.flush()?)
    }
}
