//! Dirty tracking of one disk: the mapped bitmap, the activity log that makes set bits
//! crash-safe, and copy-on-write of frozen blocks.
//!
//! Every log copy records the checksums of the two data slots, leaving out (in the active
//! slot) the words of the extents it logs. A *checkpoint* makes the bitmap durable and empties
//! the log, with no bit being set meanwhile; adding an extent to the log takes its words out
//! of the active slot's checksum. So outside logged extents nothing changes between two log
//! copies, and on the next start the slots in use must read back matching the last copy (see
//! [`crate::activity_log`]); if they do not, the disk needs a resync.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

use crate::activity_log::{ActivityLog, ActivityLogError, Recovered, CAPACITY, EXTENT_SHIFT};
use crate::bitmap::{Bitmap, BitmapError, Geometry, COW_SLOT};
use crate::cow::{CowBudget, CowStore, Then};

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
    /// The frozen generation could not be kept as it was frozen (a copy-on-write failed or
    /// passed its limit): no more copies are made for it.
    abandoned: AtomicBool,
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

/// What [`Tracking::open`] needs to know about the state the tracker found.
#[derive(Clone, Copy, Debug)]
pub struct OpenArgs {
    pub geo: Geometry,
    pub slots: Slots,
    /// The tracker did not shut down cleanly: the log is replayed.
    pub unclean: bool,
    /// The tracker's state file existed (so must the tracking files).
    pub existed_before: bool,
    /// The tracking files are there but the state file that explains them was lost.
    pub lost_state: bool,
    pub al_capacity: usize,
}

/// The words of the bitmap that blocks of extent `e` live in.
fn extent_words(geo: Geometry, e: u64) -> std::ops::Range<usize> {
    let g = u64::from(geo.granularity);
    let first = (e << EXTENT_SHIFT) / g;
    let last = (((e + 1) << EXTENT_SHIFT) - 1) / g;
    let words = geo.words();
    ((first / 64) as usize).min(words)..((last / 64 + 1) as usize).min(words)
}

/// Words touched by any of `extents`.
fn words_of(geo: Geometry, extents: &[u64]) -> HashSet<usize> {
    extents.iter().flat_map(|e| extent_words(geo, *e)).collect()
}

impl Tracking {
    /// Opens (or creates) the tracking files of a disk under `dir` with prefix `name`.
    pub fn open(
        dir: &Path,
        name: &str,
        args: OpenArgs,
        budget: Arc<CowBudget>,
    ) -> Result<(Tracking, OpenOutcome), TrackingError> {
        let OpenArgs {
            geo,
            slots,
            unclean,
            ..
        } = args;
        let al_capacity = args.al_capacity.clamp(2, CAPACITY);
        let bitmap_path = dir.join(format!("{name}.bitmap"));
        let (bitmap, created, damaged) = match Bitmap::open(&bitmap_path, geo) {
            Ok((b, created)) => (b, created, None),
            Err(BitmapError::Corrupt { path, reason }) => {
                // Kept for a post-mortem, replaced by a new one: every block becomes dirty.
                let aside = path.with_extension(format!("bitmap.damaged-{}", now_secs()));
                std::fs::rename(&path, &aside).map_err(|source| BitmapError::Io {
                    path: path.clone(),
                    source,
                })?;
                tracing::error!(
                    bitmap = %path.display(),
                    moved_to = %aside.display(),
                    "bitmap is damaged ({reason}); a new one replaces it"
                );
                let (b, _) = Bitmap::open(&bitmap_path, geo)?;
                (
                    b,
                    true,
                    Some(format!("bitmap {} was damaged: {reason}", path.display())),
                )
            }
            Err(e) => return Err(e.into()),
        };
        let (al, recovered) = ActivityLog::open(&dir.join(format!("{name}.al")))?;
        let cow_path = dir.join(format!("{name}.cow"));
        let cow_existed = cow_path.exists();
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
        if !cow_existed {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| TrackingError::Cow {
                    path: cow_path.clone(),
                    source,
                })?;
        }
        let extents = (geo.disk_size >> EXTENT_SHIFT) + 1;
        let hot = (0..extents).map(|_| AtomicBool::new(false)).collect();
        let mut t = Tracking {
            geo,
            bitmap: Arc::new(bitmap),
            al: Mutex::new(al),
            hot,
            al_capacity,
            slots: RwLock::new(slots),
            cow: Arc::new(CowStore::new(cow_path, cow, budget)),
            syncer: None,
            abandoned: AtomicBool::new(false),
        };
        let unreadable = recovered == Recovered::Unreadable;
        let (logged, sums) = match recovered {
            Recovered::Extents(ext, sums) => (Some(ext), sums),
            _ => (None, None),
        };
        // Do the slots in use read back as the log's last copy says (words of logged extents
        // aside)?
        let sum_mismatch = match (&logged, sums) {
            (Some(ext), Some(want)) if !created => {
                let masked = words_of(geo, ext);
                let active_ok =
                    t.bitmap.checksum(slots.active, &|i| masked.contains(&i)) == want[slots.active];
                let frozen_ok = slots
                    .frozen
                    .is_none_or(|f| t.bitmap.checksum(f, &|_| false) == want[f]);
                (!(active_ok && frozen_ok)).then(|| {
                    format!(
                        "bitmap {} does not match the checksums its activity log recorded \
                         (damaged or replaced behind the tracker's back)",
                        t.bitmap.path().display()
                    )
                })
            }
            _ => None,
        };
        let outcome = if args.lost_state {
            t.mark_all();
            OpenOutcome::ResyncRequired("the tracker's state file was lost".into())
        } else if let Some(why) = damaged {
            t.mark_all();
            OpenOutcome::ResyncRequired(why)
        } else if args.existed_before && created {
            t.mark_all();
            OpenOutcome::ResyncRequired(format!("bitmap {} was missing", t.bitmap.path().display()))
        } else if let Some(why) = sum_mismatch {
            t.mark_all();
            OpenOutcome::ResyncRequired(why)
        } else if unclean && unreadable {
            t.mark_all();
            OpenOutcome::ResyncRequired("activity log is unreadable".into())
        } else if !unclean {
            OpenOutcome::Clean
        } else {
            match logged {
                Some(ext) => {
                    let n = ext.len();
                    for e in ext {
                        t.mark_extent(e);
                    }
                    OpenOutcome::Replayed(n)
                }
                None if args.existed_before => {
                    t.mark_all();
                    OpenOutcome::ResyncRequired("activity log was missing".into())
                }
                None => OpenOutcome::Clean,
            }
        };
        // Everything recovered is now in the bitmap: make it durable and start a fresh log.
        t.checkpoint()?;
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

    /// The frozen generation's copy-on-write was given up.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Gives up the frozen generation's copy-on-write: from now on readers of the generation
    /// fail (the bitmap's header says so) and overwrites of frozen blocks are not copied.
    /// Callers make sure nothing uncopied is overwritten before this returns.
    pub fn abandon(&self) {
        self.bitmap.set_abandoned(true);
        self.abandoned.store(true, Ordering::SeqCst);
        // Best effort: a reader in another process sees the mapping anyway.
        let _ = self.bitmap.flush();
    }

    /// Marks the blocks of `[offset, offset+len)` dirty, durably enough that a crash after
    /// this returns still finds them dirty. Returns the frozen slot, if any, for copy-on-write.
    /// On an error the bits are set all the same (in memory), but not durably.
    pub fn mark(&self, offset: u64, len: u64) -> Result<Option<usize>, TrackingError> {
        let frozen = || {
            let s = self.slots();
            s.frozen.filter(|_| !self.abandoned())
        };
        if len == 0 {
            return Ok(frozen());
        }
        let first = offset >> EXTENT_SHIFT;
        let last = (offset + len - 1) >> EXTENT_SHIFT;
        if last - first + 1 > (self.al_capacity / 2) as u64 {
            // A range too large for the log (a trim of the whole disk, say): set the bits and
            // checkpoint before the write may proceed.
            {
                let slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
                self.bitmap
                    .set_range(slots.active, self.geo.block_range(offset, len));
            }
            self.checkpoint()?;
            return Ok(frozen());
        }
        loop {
            {
                let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
                if (first..=last).all(|e| self.hot[e as usize].load(Ordering::Acquire)) {
                    for b in self.geo.block_range(offset, len) {
                        self.bitmap.set(slots.active, b);
                    }
                    return Ok(slots.frozen.filter(|_| !self.abandoned()));
                }
            }
            if let Err(e) = self.activate(first..=last) {
                let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
                self.bitmap
                    .set_range(slots.active, self.geo.block_range(offset, len));
                return Err(e);
            }
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
        if al.extents().len() + cold.len() > self.al_capacity {
            // Checkpoint: with no writer between its hot check and its bit set, the bitmap
            // becomes durable and every logged extent can leave the log.
            let slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            self.bitmap.flush()?;
            let sums = self.sums(slots.active, &cold);
            al.set(cold.clone(), sums)?;
            for (e, hot) in self.hot.iter().enumerate() {
                hot.store(cold.contains(&(e as u64)), Ordering::Release);
            }
            return Ok(());
        }
        // No checkpoint: the active slot's checksum leaves out the words the new extents
        // touch, as they are now (unchanged since the last log copy: nothing writes a cold
        // extent).
        let active = self.slots().active;
        let mut logged = al.extents().to_vec();
        let before = words_of(self.geo, &logged);
        let mut sums = al.sums();
        sums[active] = words_of(self.geo, &cold)
            .difference(&before)
            .fold(sums[active], |s, i| s ^ self.bitmap.word_share(active, *i));
        logged.extend_from_slice(&cold);
        al.set(logged, sums)?;
        for e in cold {
            self.hot[e as usize].store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The slots' checksums, with the words of `logged` left out of the active one.
    fn sums(&self, active: usize, logged: &[u64]) -> [u64; 2] {
        let masked = words_of(self.geo, logged);
        let mut sums = [0; 2];
        for (slot, sum) in sums.iter_mut().enumerate() {
            *sum = if slot == active {
                self.bitmap.checksum(slot, &|i| masked.contains(&i))
            } else {
                self.bitmap.checksum(slot, &|_| false)
            };
        }
        sums
    }

    /// Marks byte ranges `(offset, length)` dirty in the active slot, durably (a checkpoint
    /// follows): reverse replication's divergent ranges.
    pub fn mark_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), TrackingError> {
        {
            let slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            for &(offset, len) in ranges {
                self.bitmap
                    .set_range(slots.active, self.geo.block_range(offset, len));
            }
        }
        self.checkpoint()
    }

    /// A checkpoint: makes the bitmap durable and empties the log, recording the slots'
    /// checksums, with no bit set meanwhile.
    pub fn checkpoint(&self) -> Result<(), TrackingError> {
        let mut al = self.al.lock().unwrap_or_else(|e| e.into_inner());
        let slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        self.bitmap.flush()?;
        let sums = self.sums(slots.active, &[]);
        al.set(Vec::new(), sums)?;
        for hot in &self.hot {
            hot.store(false, Ordering::Release);
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
        if self.bitmap.abandoned() {
            return Err(TrackingError::Cow {
                path: self.cow.path.clone(),
                source: io::Error::other(ABANDONED),
            });
        }
        Ok(())
    }

    /// First step of a freeze (callers have drained writes): empties the slot that becomes
    /// active, the copy-on-write slot and store, and checkpoints. With `full` (initial sync,
    /// resync), every block of the active slot is set: the whole disk will be frozen and stay
    /// readable as of the freeze, and only blocks the guest rewrites cost a copy. Nothing the
    /// current state needs is lost, so a freeze that fails after this loses nothing (a full
    /// one leaves every block dirty, which the next freeze ships).
    pub fn prepare_freeze(&self, full: bool) -> Result<(), TrackingError> {
        let s = self.slots();
        debug_assert!(s.frozen.is_none());
        self.bitmap.clear_slot(1 - s.active);
        self.bitmap.clear_slot(COW_SLOT);
        self.bitmap.set_abandoned(false);
        if full {
            self.bitmap.set_range(s.active, 0..self.geo.blocks());
        }
        self.truncate_cow()?;
        self.checkpoint()
    }

    /// The freeze itself, once the state saying so is durable: the active slot becomes
    /// frozen, the other (emptied by [`Tracking::prepare_freeze`]) active. No bit changes, so
    /// the last checkpoint still holds.
    pub fn flip(&self) -> Slots {
        let mut s = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let frozen = s.active;
        *s = Slots {
            active: 1 - frozen,
            frozen: Some(frozen),
        };
        self.abandoned.store(false, Ordering::SeqCst);
        *s
    }

    /// First step of a merge: the frozen generation's blocks go back into the active set,
    /// durably. The generation itself stays readable.
    pub fn merge_frozen(&self) -> Result<(), TrackingError> {
        {
            let s = self.slots.write().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = s.frozen {
                self.bitmap.merge(s.active, f);
            }
        }
        self.checkpoint()
    }

    /// Last step of a release or merge, once the state no longer names the generation: its
    /// slot, the copy-on-write slot and store are emptied. A failure here loses nothing (the
    /// next freeze empties them again).
    pub fn drop_frozen(&self) -> Result<(), TrackingError> {
        {
            let mut s = self.slots.write().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = s.frozen.take() {
                self.bitmap.clear_slot(f);
            }
            self.bitmap.clear_slot(COW_SLOT);
        }
        self.abandoned.store(false, Ordering::SeqCst);
        self.truncate_cow()?;
        self.checkpoint()
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
        self.checkpoint()
    }
}

/// The message readers of an abandoned generation get.
pub const ABANDONED: &str = "the frozen generation was abandoned by the tracker (its \
                             copy-on-write failed or reached its limit); the disk needs a \
                             checksum resync";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
