//! Dirty tracking of one disk: the mapped bitmap, the activity log that makes set bits
//! crash-safe, and copy-on-write of frozen blocks.
//!
//! Every log copy records the checksums of the two data slots, leaving out (in the active
//! slot) the words of the extents it logs. A *checkpoint* makes the bitmap durable and empties
//! the log, with no bit being set meanwhile; adding an extent to the log takes its words out
//! of the active slot's checksum. So outside logged extents nothing changes between two log
//! copies, and on the next start the slots in use must read back matching the last copy (see
//! [`crate::activity_log`]); if they do not, the disk needs a resync.
//!
//! Hence the rule: no bit of the active slot is set before the log holds its extent (the
//! kernel may write a shared mapping's page back at any instant, so a bit set "just before a
//! checkpoint" may reach the disk alone). The hot path of [`Tracking::mark`] checks its
//! extents are hot; every other marking (large ranges, reverse replication's ranges, full
//! freezes, merges) goes through [`Tracking::mark_logged`].

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
    /// Tests: where the bitmap was found not matching the log on disk, just before a log
    /// write (see `tests::audit`).
    #[cfg(test)]
    audit: Mutex<Option<Vec<String>>>,
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
            #[cfg(test)]
            audit: Mutex::new(None),
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

    // `mark_all` and `mark_extent` set bits outside [`Tracking::mark_logged`], only while
    // opening, before the tracker serves anything and before the checkpoint that ends the
    // open, and safely so: a replayed extent is in the log on disk, and `mark_all` runs only
    // for a disk found in need of a resync, whose cause (or the checksum mismatch its bits
    // make) a power cut before that checkpoint leaves for the next start to find again.
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
    /// On an error (the activity log cannot be written) some bits may be missing: the caller
    /// must mark the disk for a resync.
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
            // A range too large for the log at once (a trim of the whole disk, say): logged
            // half a log at a time, a checkpoint between batches.
            let extents: Vec<u64> = (first..=last).collect();
            self.mark_logged(&extents, &|active, e| {
                self.set_bytes_in_extent(active, e, offset, len)
            })?;
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
            // No bit is set when the log cannot take the extents: a bit the log does not
            // cover could reach the file (the kernel writes back shared pages when it likes)
            // and fail the next start's checksum check. The caller marks the disk for a
            // resync instead, which covers this write.
            self.activate(first..=last)?;
        }
    }

    /// Adds extents to the activity log (checkpointing it if full) and marks them hot.
    fn activate(&self, extents: impl IntoIterator<Item = u64>) -> Result<(), TrackingError> {
        let mut al = self.al.lock().unwrap_or_else(|e| e.into_inner());
        let cold: Vec<u64> = extents
            .into_iter()
            .filter(|e| !self.hot[*e as usize].load(Ordering::Acquire))
            .collect();
        if cold.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        self.audit_here("activate", self.slots());
        if al.extents().len() + cold.len() > self.al_capacity {
            // Checkpoint: with no writer between its hot check and its bit set, the bitmap
            // becomes durable and every logged extent can leave the log.
            let slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            self.bitmap.flush()?;
            let sums = self.sums(slots.active, &cold);
            al.set(cold.clone(), sums)?;
            // (Under the write lock nobody reads `hot`: clear all, then set the new ones,
            // rather than a search of `cold` per extent of the disk, which a whole-disk
            // marking, half a log per checkpoint, made quadratic in the disk's size.)
            for hot in &self.hot {
                hot.store(false, Ordering::Release);
            }
            for e in &cold {
                self.hot[*e as usize].store(true, Ordering::Release);
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
        let mut sums = [0; 2];
        for (slot, sum) in sums.iter_mut().enumerate() {
            *sum = self.bitmap.checksum(slot, &|_| false);
        }
        // The XOR of every word's share, less those of the logged words (one hash lookup
        // per logged word instead of one per word of the slot: a checkpoint between the
        // batches of a whole-disk marking costs one pass over the slots).
        for i in words_of(self.geo, logged) {
            sums[active] ^= self.bitmap.word_share(active, i);
        }
        sums
    }

    /// Marks byte ranges `(offset, length)` dirty in the active slot, durably (the log holds
    /// their extents first): reverse replication's divergent ranges.
    pub fn mark_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), TrackingError> {
        // (extent, range) pairs, sorted: each extent finds its ranges by a binary search.
        let mut pairs: Vec<(u64, usize)> = ranges
            .iter()
            .enumerate()
            .filter(|(_, r)| r.1 > 0)
            .flat_map(|(i, &(offset, len))| {
                ((offset >> EXTENT_SHIFT)..=((offset + len - 1) >> EXTENT_SHIFT))
                    .map(move |e| (e, i))
            })
            .collect();
        pairs.sort_unstable();
        let mut extents: Vec<u64> = pairs.iter().map(|p| p.0).collect();
        extents.dedup();
        self.mark_logged(&extents, &|active, e| {
            let from = pairs.partition_point(|p| p.0 < e);
            for &(_, i) in pairs[from..].iter().take_while(|p| p.0 == e) {
                let (offset, len) = ranges[i];
                self.set_bytes_in_extent(active, e, offset, len);
            }
        })
    }

    /// The one way bits get set in the active slot outside the hot path of [`Tracking::mark`]:
    /// `extents` (sorted, no duplicates) go into the activity log, at most half a log at a
    /// time (a checkpoint between batches, see [`Tracking::activate`]), and only while a
    /// batch is in the log does `set(active, extent)` set that extent's bits. So the bitmap
    /// the kernel may write back at any instant never holds a bit outside the checkpointed
    /// body and the logged extents, and a power cut anywhere leaves a bitmap that the log's
    /// checksums vouch for. A failure leaves the bits of the batches not yet logged unset:
    /// callers report it (the disk then needs a resync).
    fn mark_logged(&self, extents: &[u64], set: &dyn Fn(usize, u64)) -> Result<(), TrackingError> {
        let batch = (self.al_capacity / 2).max(1);
        for chunk in extents.chunks(batch) {
            loop {
                {
                    // Under the read lock no checkpoint can take the batch out of the log.
                    let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
                    if chunk
                        .iter()
                        .all(|e| self.hot[*e as usize].load(Ordering::Acquire))
                    {
                        for &e in chunk {
                            set(slots.active, e);
                        }
                        break;
                    }
                }
                self.activate(chunk.iter().copied())?;
            }
        }
        Ok(())
    }

    /// The bytes of extent `e` itself.
    fn extent_bytes(&self, e: u64) -> (u64, u64) {
        let start = e << EXTENT_SHIFT;
        let end = ((e + 1) << EXTENT_SHIFT).min(self.geo.disk_size);
        (start, end.saturating_sub(start))
    }

    /// Sets in `slot` the blocks of `[offset, offset+len)` that lie in extent `e`.
    fn set_bytes_in_extent(&self, slot: usize, e: u64, offset: u64, len: u64) {
        let (es, el) = self.extent_bytes(e);
        let s = offset.max(es);
        let end = (offset + len).min(es + el);
        if s < end {
            self.bitmap
                .set_range(slot, self.geo.block_range(s, end - s));
        }
    }

    /// Every extent of the disk.
    fn all_extents(&self) -> Vec<u64> {
        (0..self.geo.disk_size.div_ceil(1 << EXTENT_SHIFT)).collect()
    }

    /// A checkpoint: makes the bitmap durable and empties the log, recording the slots'
    /// checksums, with no bit set meanwhile.
    pub fn checkpoint(&self) -> Result<(), TrackingError> {
        let mut al = self.al.lock().unwrap_or_else(|e| e.into_inner());
        let slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        #[cfg(test)]
        self.audit_here("checkpoint", *slots);
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
            self.mark_logged(&self.all_extents(), &|active, e| {
                let (start, len) = self.extent_bytes(e);
                self.set_bytes_in_extent(active, e, start, len)
            })?;
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
        if let Some(f) = self.slots().frozen {
            let g = u64::from(self.geo.granularity);
            let last_extent = self.geo.disk_size.saturating_sub(1) >> EXTENT_SHIFT;
            // The extents of the frozen blocks (a word's first to last set block: a few
            // extents too many at worst, never one too few).
            let mut extents = Vec::new();
            for i in 0..self.geo.words() {
                let v = self.bitmap.word_value(f, i);
                if v == 0 {
                    continue;
                }
                let first = i as u64 * 64 + u64::from(v.trailing_zeros());
                let last = i as u64 * 64 + 63 - u64::from(v.leading_zeros());
                let (a, b) = (
                    (first * g) >> EXTENT_SHIFT,
                    ((last + 1) * g - 1) >> EXTENT_SHIFT,
                );
                extents.extend(a.min(last_extent)..=b.min(last_extent));
            }
            extents.dedup();
            self.mark_logged(&extents, &|active, e| {
                let (start, len) = self.extent_bytes(e);
                self.bitmap
                    .merge_range(active, f, self.geo.block_range(start, len));
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity_log::decode;
    use crate::crashpoint::set_failing;

    const MIB: u64 = 1 << 20;
    const EXTENT: u64 = 1 << EXTENT_SHIFT;

    impl Tracking {
        /// Records a mismatch between the bitmap now and the newest log copy on disk: what
        /// a power cut at this instant, with every page of the mapping written back, would
        /// leave for the next start's checksum check.
        pub(super) fn audit_here(&self, at: &str, slots: Slots) {
            let mut found = self.audit.lock().unwrap();
            let Some(found) = found.as_mut() else { return };
            if let Some(why) = audit(self, slots) {
                found.push(format!("{at}: {why}"));
            }
        }
    }

    /// Does the bitmap, every page of it written back, pass the start's check against the
    /// newest log copy on disk?
    fn audit(t: &Tracking, slots: Slots) -> Option<String> {
        let path = t.bitmap.path().with_extension("al");
        let data = std::fs::read(&path).unwrap();
        let newest = data
            .chunks(data.len() / 2)
            .filter_map(decode)
            .max_by_key(|c| c.seq)
            .expect("a valid log copy");
        let sums = newest.sums.expect("version 2 copy");
        let masked = words_of(t.geo, &newest.extents);
        // Only the body's checksum is kept: name the set words outside the log, to help.
        let strays: Vec<usize> = (0..t.geo.words())
            .filter(|i| !masked.contains(i) && t.bitmap.word_value(slots.active, *i) != 0)
            .collect();
        if t.bitmap.checksum(slots.active, &|i| masked.contains(&i)) != sums[slots.active] {
            return Some(format!(
                "active slot {} does not match log copy {} (logged extents {:?}; set words \
                 outside them: {strays:?})",
                slots.active, newest.seq, newest.extents
            ));
        }
        if let Some(f) = slots.frozen {
            if t.bitmap.checksum(f, &|_| false) != sums[f] {
                return Some(format!(
                    "frozen slot {f} does not match log copy {}",
                    newest.seq
                ));
            }
        }
        None
    }

    fn open(dir: &Path, slots: Slots, unclean: bool) -> (Tracking, OpenOutcome) {
        let args = OpenArgs {
            geo: Geometry {
                disk_size: 64 * EXTENT,
                granularity: 65536,
            },
            slots,
            unclean,
            existed_before: unclean,
            lost_state: false,
            al_capacity: 8,
        };
        Tracking::open(dir, "d", args, Arc::new(CowBudget::new(u64::MAX))).unwrap()
    }

    fn check(t: &Tracking, step: &str) {
        let mut found = t.audit.lock().unwrap().replace(Vec::new()).unwrap();
        found.extend(audit(t, t.slots()));
        assert!(
            found.is_empty(),
            "{step}: a bit was set before the log held its extent: {found:#?}"
        );
    }

    /// The kernel may write a page of the shared mapping back at any instant: before every
    /// log write and after every marking call, the bitmap as it is must pass the check a
    /// start after a power cut makes (active slot, logged words aside, and frozen slot match
    /// the newest log copy's checksums). A bit set before its extent is logged fails it.
    #[test]
    fn no_bit_is_set_before_the_log_holds_its_extent() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots {
            active: 0,
            frozen: None,
        };
        let (t, outcome) = open(dir.path(), slots, false);
        assert_eq!(outcome, OpenOutcome::Clean);
        *t.audit.lock().unwrap() = Some(Vec::new());

        t.mark(0, MIB).unwrap();
        check(&t, "a small write");
        // More extents than half the log (4 here).
        t.mark(5 * EXTENT + 4096, 10 * EXTENT).unwrap();
        check(&t, "a large trim");
        assert!(t.bitmap.test(0, (5 * EXTENT + 4096) / 65536));
        assert!(t.bitmap.test(0, (15 * EXTENT) / 65536));
        assert!(!t.bitmap.test(0, (15 * EXTENT + 4096) / 65536 + 1));
        t.mark_ranges(&[
            (20 * EXTENT, MIB),
            (40 * EXTENT, 12 * EXTENT),
            (3 * EXTENT, 1),
        ])
        .unwrap();
        check(&t, "reverse replication's ranges");
        assert_eq!(t.bitmap.count(0), {
            let per = EXTENT / 65536;
            16 + 10 * per + 1 + 16 + 12 * per + 1
        });
        t.prepare_freeze(true).unwrap();
        check(&t, "a full freeze");
        assert_eq!(t.bitmap.count(0), t.geo.blocks());
        let s = t.flip();
        check(&t, "the flip");
        t.mark(EXTENT, MIB).unwrap();
        check(&t, "a write after the freeze");
        t.merge_frozen().unwrap();
        check(&t, "a merge");
        assert_eq!(t.bitmap.count(s.active), t.geo.blocks());
        t.drop_frozen().unwrap();
        check(&t, "dropping the generation");
        // A release: the active slot starts empty.
        t.prepare_freeze(false).unwrap();
        t.flip();
        t.drop_frozen().unwrap();
        t.mark(30 * EXTENT, 9 * EXTENT).unwrap();
        t.prepare_freeze(false).unwrap();
        let s = t.flip();
        t.mark(50 * EXTENT, MIB).unwrap();
        t.merge_frozen().unwrap();
        check(&t, "a merge of a partial generation");
        assert_eq!(t.bitmap.count(s.active), 9 * EXTENT / 65536 + 16);
        t.drop_frozen().unwrap();
        assert!(!t.bitmap.test(s.active, 60 * EXTENT / 65536));

        // The log cannot be written: the write's bits are not set unlogged (the caller
        // marks the disk for a resync instead).
        set_failing("activity-log", true);
        let r = t.mark(60 * EXTENT, MIB);
        let r2 = t.mark(44 * EXTENT, 15 * EXTENT);
        set_failing("activity-log", false);
        assert!(r.is_err() && r2.is_err());
        check(&t, "a write the log could not take");

        // A power cut now (the mapping written back): the start replays the log, and no
        // resync is asked for.
        let slots = t.slots();
        drop(t);
        let (_, outcome) = open(dir.path(), slots, true);
        assert!(matches!(outcome, OpenOutcome::Replayed(_)), "{outcome:?}");
    }
}
