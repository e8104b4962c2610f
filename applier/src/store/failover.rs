//! A replica's side of failover, as operations on its record and images (the processes a
//! failed-over site runs are `crate::failover`'s):
//!
//! - an unplanned failover saves its role first (from then on no cycle of the old primary
//!   lands), rolls a cycle held in part back, and, for a point older than the newest M,
//!   rolls the images back to it from the undo logs of the cycles after it, having first
//!   written the current contents of every range it rewrites into a **redo log**
//!   (`failover/redo.log`): the cost is the changes rolled back, never the disk size;
//! - commit drops the redo log, the undo logs and the points (the images are none of them
//!   any more); cancel puts the baseline's copies back (what the failed-over VM overwrote)
//!   and applies the redo log, which returns the images to M, and the record to a replica;
//! - a planned failover's promote makes a replica that holds exactly the old primary's last
//!   cycle the primary;
//! - an old primary's images are adopted as the replica that waits for the reverse cycle
//!   (external image paths, a local recovery point of their state before it, and their
//!   divergent ranges for the new primary to ship back);
//! - abandon (a split brain resolved in favour of the old primary) turns a primary back into
//!   a replica waiting for its cycles over the ranges it wrote.
//!
//! Every step saves the record before it acts where an action cannot be undone, and each one
//! is idempotent: a crash between two steps and the same command again finishes it.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmreplica_common::lineage::Lineage;
use vmreplica_common::ranges::RangeSet;
use vmreplica_common::sparse::punch_hole;
use vmreplica_common::{read_state, write_state};
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::Generation;

use super::state::{
    DiskMeta, FailedOver, FailoverStep, PointInfo, Primary, ReversePending, ReverseTarget, Role,
    Span, SpanParent, VmState,
};
use super::{StoreError, VmStore};
use crate::undo::{Enc, Header, Loaded, UndoLog};

const REDO: &str = "redo.log";
const DIVERGENT: &str = "divergent.json";
const DIVERGENT_FORMAT: &str = "vmreplica-divergent";
const DIVERGENT_VERSION: u32 = 1;
/// Bytes read or written at a time while rolling images back or forward.
const STEP: u64 = 1 << 20;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn refused(m: String) -> StoreError {
    StoreError::Role(m)
}

/// An old primary's disk, adopted as a replica image.
#[derive(Clone, Debug)]
pub struct AdoptedDisk {
    pub name: String,
    pub image: PathBuf,
    pub size: u64,
    pub granularity: u32,
}

/// Where a record's failover files live.
fn failover_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("failover")
}

/// Saves divergent ranges (as `failover/divergent.json` under `vm_dir`), durably.
fn save_divergent(vm: &str, vm_dir: &Path, set: &RangeSet) -> Result<String, StoreError> {
    let dir = failover_dir(vm_dir);
    crate::undo::log::create_dirs(&dir).map_err(|e| super::io_err(vm, &dir, e))?;
    let list: Vec<(u16, u64, u64)> = set.iter().map(|r| (r.disk, r.offset, r.len)).collect();
    write_state(
        &dir.join(DIVERGENT),
        DIVERGENT_FORMAT,
        DIVERGENT_VERSION,
        &list,
    )?;
    Ok(DIVERGENT.to_string())
}

impl VmStore {
    pub fn role(&self) -> &Role {
        &self.state.role
    }

    fn failed_over(&self) -> Result<FailedOver, StoreError> {
        match &self.state.role {
            Role::FailedOver(f) => Ok(f.clone()),
            other => Err(refused(format!(
                "VM {}: no failover is in progress here (this site is its {})",
                self.vm(),
                other.name()
            ))),
        }
    }

    fn set_role(&mut self, role: Role) -> Result<(), StoreError> {
        let mut next = self.state.clone();
        next.role = role;
        self.commit_state(next)
    }

    /// A failover is refused while a test failover is recorded (served or not: after an
    /// applier restart it is served again) or a point is open (an export, a view): the
    /// images are about to become the running VM's disks, which no point view can read.
    /// The test failover is not ended here: its scratch holds the test VM's writes and its
    /// VM may run; ending it is the administrator's call, one command away.
    fn refuse_while_points_open(&self, what: &str) -> Result<(), StoreError> {
        let vm = self.vm();
        let tests: Vec<u64> = self.state.tests.iter().map(|t| t.point).collect();
        if !tests.is_empty() {
            let list = tests
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(refused(format!(
                "VM {vm}: a test failover of point(s) {list} is recorded on this site ({}), so \
                 the VM is not {what} (nothing changed): end it first with `vmreplica failover \
                 test-stop {vm} --all` (its test VM is stopped and its scratch writes \
                 discarded), then run this command again",
                self.dir().join("state.json").display()
            )));
        }
        let pinned = self.shared.pinned();
        if !pinned.is_empty() {
            let list = pinned
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(refused(format!(
                "VM {vm}: point(s) {list} are open on this site (an export or a point view), so \
                 the VM is not {what} (nothing changed): wait until they finish, then run this \
                 command again"
            )));
        }
        Ok(())
    }

    /// First step of an unplanned failover to point `point` (None: the newest): the role is
    /// saved, so no cycle of the old primary lands from now on. Again for a failover in
    /// progress (to the same point), it returns where that one got.
    pub fn begin_failover(
        &mut self,
        point: Option<u64>,
        start: bool,
        definition: Option<PathBuf>,
    ) -> Result<FailedOver, StoreError> {
        let vm = self.vm().to_string();
        if let Role::FailedOver(f) = &self.state.role {
            if point.is_some_and(|p| p != f.point) || f.step == FailoverStep::Cancelling {
                return Err(refused(format!(
                    "VM {vm}: a failover to point {} is {} here; {} it first",
                    f.point,
                    if f.step == FailoverStep::Cancelling {
                        "being cancelled"
                    } else {
                        "in progress"
                    },
                    if f.step == FailoverStep::Cancelling {
                        "finish cancelling"
                    } else {
                        "commit or cancel"
                    }
                )));
            }
            return Ok(f.clone());
        }
        if self.state.role != Role::Replica {
            return Err(refused(format!(
                "VM {vm}: this site is its {}, not a replica: there is nothing to fail over to",
                self.state.role.name()
            )));
        }
        let Some(lineage) = self.state.lineage else {
            return Err(refused(format!(
                "VM {vm}: the replica has no complete point yet (its initial copy did not \
                 finish): there is nothing to fail over to"
            )));
        };
        let newest = self.state.newest_point();
        if newest == 0 {
            return Err(refused(format!(
                "VM {vm} has no recovery point to fail over to"
            )));
        }
        let point = point.unwrap_or(newest);
        if !self.state.points.iter().any(|p| p.cycle == point) {
            return Err(StoreError::NoSuchPoint { vm, cycle: point });
        }
        self.refuse_while_points_open("failed over")?;
        // The latest point continues the last cycle (empty cycles after the newest point
        // left the images as they were); an older one continues itself.
        let parent_cycle = if point == newest {
            self.state.last_cycle
        } else {
            point
        };
        let f = FailedOver {
            lineage: Lineage::random(),
            parent: SpanParent {
                lineage,
                cycle: parent_cycle,
            },
            point,
            from: newest,
            since: now(),
            step: FailoverStep::Begun,
            redo: None,
            start,
            definition,
        };
        self.set_role(Role::FailedOver(f.clone()))?;
        tracing::warn!(vm, point, from = newest, new_lineage = %f.lineage, "failover: this site is the VM's primary now; cycles from the old primary are refused");
        Ok(f)
    }

    /// Second step: a cycle held in part is rolled back, then the images are rolled back to
    /// the failover point (behind a redo log that leads back to the newest point).
    pub fn roll_back_to_point(&mut self) -> Result<FailedOver, StoreError> {
        let mut f = self.failed_over()?;
        if f.step != FailoverStep::Begun {
            return Ok(f);
        }
        self.roll_back()?;
        vmreplica_tracker::crashpoint::crash_point("failover.partial-rolled-back");
        if f.point < f.from {
            if f.redo.is_none() {
                self.write_redo(f.point, f.from)?;
                f.redo = Some(REDO.to_string());
                self.set_role(Role::FailedOver(f.clone()))?;
                vmreplica_tracker::crashpoint::crash_point("failover.redo-written");
            }
            self.rewrite_to_point(f.point, f.from)?;
            vmreplica_tracker::crashpoint::crash_point("failover.rolled-back");
        }
        f.step = FailoverStep::RolledBack;
        self.set_role(Role::FailedOver(f.clone()))?;
        Ok(f)
    }

    /// The undo logs that lead from point `from` back to `to`, oldest first.
    fn logs_between(&self, to: u64, from: u64) -> Result<Vec<Loaded>, StoreError> {
        let mut refs: Vec<_> = self
            .state
            .undo
            .iter()
            .filter(|u| u.to >= to && u.from <= from)
            .cloned()
            .collect();
        refs.sort_by_key(|u| u.to);
        refs.iter()
            .map(|u| {
                let p = self.undo_path(&u.file);
                Loaded::open(&p).map_err(self.io(&p))
            })
            .collect()
    }

    fn redo_path(&self) -> PathBuf {
        failover_dir(self.dir()).join(REDO)
    }

    /// Writes the redo log: the images' current contents (point `from`) of every range the
    /// undo logs back to `to` rewrite. Durable (finished) before it returns.
    fn write_redo(&mut self, to: u64, from: u64) -> Result<(), StoreError> {
        let logs = self.logs_between(to, from)?;
        let mut cover = RangeSet::new();
        for l in &logs {
            for e in &l.entries {
                cover.insert(e.disk, e.offset, e.end());
            }
        }
        let dir = failover_dir(self.dir());
        crate::undo::log::create_dirs(&dir).map_err(self.io(&dir))?;
        let path = self.redo_path();
        let mut redo = UndoLog::create(
            &path,
            Header {
                from: to,
                to: from,
                lineage: self.state.lineage,
            },
        )
        .map_err(self.io(&path))?;
        let images = self.shared.images();
        let mut buf = Vec::new();
        for r in cover.iter() {
            let img = images
                .get(r.disk as usize)
                .ok_or_else(|| StoreError::BadChunk {
                    vm: self.vm().to_string(),
                    reason: format!("an undo log names disk {}, which the replica lacks", r.disk),
                })?;
            let ip = self.image_path(&self.state.disks[r.disk as usize].name);
            let mut at = r.offset;
            while at < r.end() {
                let n = (r.end() - at).min(STEP);
                buf.resize(n as usize, 0);
                img.file.read_exact_at(&mut buf, at).map_err(self.io(&ip))?;
                redo.append(r.disk, at, n as u32, Some(&buf))
                    .map_err(self.io(&path))?;
                at += n;
            }
        }
        redo.finish().map_err(self.io(&path))?;
        tracing::info!(vm = %self.vm(), bytes = cover.bytes(), "redo log written: a cancel returns to point {from}");
        Ok(())
    }

    /// Rewrites the images to point `to` from the undo logs after it (oldest first: where
    /// several cover a byte, the oldest holds point `to`'s contents). Idempotent.
    fn rewrite_to_point(&mut self, to: u64, from: u64) -> Result<(), StoreError> {
        let logs = self.logs_between(to, from)?;
        let images = self.shared.images();
        let mut done = RangeSet::new();
        let mut buf = Vec::new();
        for l in &logs {
            for e in &l.entries {
                let img = images
                    .get(e.disk as usize)
                    .ok_or_else(|| StoreError::BadChunk {
                        vm: self.vm().to_string(),
                        reason: format!("undo log {}: no disk {}", l.path.display(), e.disk),
                    })?;
                let ip = self.image_path(&self.state.disks[e.disk as usize].name);
                for (s, t) in done.uncovered(e.disk, e.offset, e.end()) {
                    if e.enc == Enc::Zero {
                        punch_hole(&img.file, s, t - s).map_err(self.io(&ip))?;
                    } else {
                        buf.resize((t - s) as usize, 0);
                        crate::undo::log::read_entry(&l.file, e, s, t, &mut buf)
                            .map_err(self.io(&l.path))?;
                        img.file.write_all_at(&buf, s).map_err(self.io(&ip))?;
                    }
                }
                done.insert(e.disk, e.offset, e.end());
            }
        }
        self.sync_images()?;
        tracing::info!(vm = %self.vm(), point = to, bytes = done.bytes(), "images rolled back to the failover point");
        Ok(())
    }

    fn sync_images(&self) -> Result<(), StoreError> {
        for (img, d) in self.shared.images().iter().zip(&self.state.disks) {
            img.file
                .sync_all()
                .map_err(self.io(&self.image_path(&d.name)))?;
        }
        Ok(())
    }

    /// The ranges rolled back by choosing an older point (the redo log's coverage): the new
    /// primary's tracker marks them dirty, so reverse replication ships them back.
    pub fn discarded_ranges(&self) -> Result<RangeSet, StoreError> {
        let f = self.failed_over()?;
        let mut set = RangeSet::new();
        if f.redo.is_some() {
            let p = self.redo_path();
            let l = Loaded::open(&p).map_err(self.io(&p))?;
            for e in &l.entries {
                set.insert(e.disk, e.offset, e.end());
            }
        }
        Ok(set)
    }

    pub fn set_failover_step(&mut self, step: FailoverStep) -> Result<(), StoreError> {
        let mut f = self.failed_over()?;
        if f.step != step {
            f.step = step;
            self.set_role(Role::FailedOver(f))?;
        }
        Ok(())
    }

    /// Drops every point and undo log (the images are none of them any more): saved first,
    /// the files removed after.
    fn drop_points(&mut self, next: &mut VmState) {
        next.points.clear();
        next.undo.clear();
        next.receiving = None;
    }

    fn remove_point_files(&mut self) {
        self.shared
            .chain
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .logs
            .clear();
        if let Err(e) = self.remove_unreferenced() {
            tracing::warn!(vm = %self.vm(), "removing the undo logs: {e} (removed at the next open)");
        }
        let _ = crate::undo::log::remove(&self.redo_path());
    }

    /// Commits the failover: the record becomes the primary's (the points and logs go).
    pub fn commit_failover(&mut self) -> Result<Primary, StoreError> {
        if let Role::Primary(p) = &self.state.role {
            return Ok(p.clone());
        }
        let f = self.failed_over()?;
        if f.step != FailoverStep::Serving {
            return Err(refused(format!(
                "VM {}: the failover is not complete (it got to {:?}): run `vmreplica failover \
                 unplanned {}` again to finish it, or cancel it",
                self.vm(),
                f.step,
                self.vm()
            )));
        }
        let p = Primary {
            lineage: f.lineage,
            parent: f.parent,
            point: Some(f.point),
            since: f.since,
            reverse: None,
            start: f.start,
            definition: f.definition,
        };
        let mut next = self.state.clone();
        next.role = Role::Primary(p.clone());
        self.drop_points(&mut next);
        self.commit_state(next)?;
        self.remove_point_files();
        tracing::info!(vm = %self.vm(), lineage = %p.lineage, "failover committed: this site is the VM's primary; its recovery points are gone");
        Ok(p)
    }

    /// First step of a cancel: saved, so that nothing else starts on the VM until the cancel
    /// is finished.
    pub fn begin_cancel(&mut self) -> Result<FailedOver, StoreError> {
        self.set_failover_step(FailoverStep::Cancelling)?;
        self.failed_over()
    }

    /// Finishes a cancel once the tracker is stopped: the baseline's copies (the failover
    /// point's contents of what the failed-over VM overwrote) go back into the images, then
    /// the redo log returns them to the newest point; the record is a replica again.
    pub fn finish_cancel(&mut self, baseline: Option<&Generation>) -> Result<(), StoreError> {
        let f = self.failed_over()?;
        if f.step != FailoverStep::Cancelling {
            return Err(refused(format!(
                "VM {}: the cancel was not begun",
                self.vm()
            )));
        }
        if let Some(g) = baseline {
            self.restore_baseline(g)?;
        }
        vmreplica_tracker::crashpoint::crash_point("cancel.baseline-restored");
        if f.redo.is_some() {
            let p = self.redo_path();
            let redo = Loaded::open(&p).map_err(self.io(&p))?;
            let images = self.shared.images();
            let mut buf = Vec::new();
            for e in &redo.entries {
                let img = &images[e.disk as usize];
                let ip = self.image_path(&self.state.disks[e.disk as usize].name);
                if e.enc == Enc::Zero {
                    punch_hole(&img.file, e.offset, u64::from(e.len)).map_err(self.io(&ip))?;
                    continue;
                }
                buf.resize(e.len as usize, 0);
                crate::undo::log::read_entry(&redo.file, e, e.offset, e.end(), &mut buf)
                    .map_err(self.io(&p))?;
                img.file
                    .write_all_at(&buf, e.offset)
                    .map_err(self.io(&ip))?;
            }
        }
        self.sync_images()?;
        vmreplica_tracker::crashpoint::crash_point("cancel.images-restored");
        self.set_role(Role::Replica)?;
        let _ = crate::undo::log::remove(&self.redo_path());
        tracing::warn!(vm = %self.vm(), point = f.from, "failover cancelled: the replica is at point {} again and takes the old primary's cycles", f.from);
        Ok(())
    }

    /// Writes the baseline's copy-on-write blocks back into the images.
    fn restore_baseline(&mut self, g: &Generation) -> Result<(), StoreError> {
        let images = self.shared.images();
        let mut bytes = 0u64;
        for d in &g.disks {
            let Some(i) = self.state.disks.iter().position(|m| m.name == d.name) else {
                continue;
            };
            let r = FrozenReader::open(d).map_err(|e| self.baseline_err(e))?;
            let geo = r.geometry();
            let ip = self.image_path(&d.name);
            let mut buf = Vec::new();
            for b in r.copied_blocks().map_err(|e| self.baseline_err(e))? {
                let (off, len) = geo.block_bytes(b);
                buf.resize(len as usize, 0);
                r.read(off, &mut buf).map_err(|e| self.baseline_err(e))?;
                images[i]
                    .file
                    .write_all_at(&buf, off)
                    .map_err(self.io(&ip))?;
                bytes += len;
            }
        }
        tracing::info!(vm = %self.vm(), bytes, "the failed-over VM's writes are undone from the baseline");
        Ok(())
    }

    fn baseline_err(&self, e: std::io::Error) -> StoreError {
        refused(format!(
            "VM {}: the failover's baseline cannot be read ({e}), so the failed-over VM's \
             writes cannot be undone: cancel is not possible. Commit the failover instead \
             (`vmreplica failover commit {}`)",
            self.vm(),
            self.vm()
        ))
    }

    /// A planned failover's promote: this replica holds exactly `(lineage, cycle)`, the old
    /// primary's sealed last cycle; it becomes the primary in a new lineage that continues it
    /// (the points go: the images will change outside any cycle). Again (a lost answer), it
    /// returns the same primary.
    pub fn promote(
        &mut self,
        lineage: Lineage,
        cycle: u64,
        reverse: ReverseTarget,
        start: bool,
        definition: Option<PathBuf>,
    ) -> Result<Primary, StoreError> {
        let vm = self.vm().to_string();
        let asked = SpanParent { lineage, cycle };
        if let Role::Primary(p) = &self.state.role {
            if p.parent == asked {
                return Ok(p.clone());
            }
        }
        if self.state.role != Role::Replica {
            return Err(refused(format!(
                "VM {vm}: promote asked at cycle {cycle} of lineage {lineage}, but this site is \
                 its {}, not a replica",
                self.state.role.name()
            )));
        }
        if self.state.lineage != Some(lineage) || self.state.last_cycle != cycle {
            return Err(refused(format!(
                "VM {vm}: promote asked at cycle {cycle} of lineage {lineage}, but the replica \
                 holds cycle {} of lineage {}: it does not hold the primary's last cycle, so it \
                 is not promoted (nothing changed). Ship the last cycle first",
                self.state.last_cycle,
                vmreplica_common::lineage::show(self.state.lineage)
            )));
        }
        self.refuse_while_points_open("promoted")?;
        // A cycle held in part is not the last one (that one is complete): it goes.
        self.roll_back()?;
        self.release_images();
        let p = Primary {
            lineage: Lineage::random(),
            parent: asked,
            point: None,
            since: now(),
            reverse: Some(reverse),
            start,
            definition,
        };
        let mut next = self.state.clone();
        next.role = Role::Primary(p.clone());
        self.drop_points(&mut next);
        self.commit_state(next)?;
        self.remove_point_files();
        tracing::warn!(vm, %lineage, cycle, new_lineage = %p.lineage, "promoted (planned failover): this site is the VM's primary");
        Ok(p)
    }

    /// Records where reverse replication goes (the primary's shipper is started for it).
    pub fn set_reverse(&mut self, target: ReverseTarget) -> Result<Primary, StoreError> {
        let Role::Primary(mut p) = self.state.role.clone() else {
            return Err(refused(format!(
                "VM {}: this site is its {}, not its primary",
                self.vm(),
                self.state.role.name()
            )));
        };
        if p.reverse.as_ref() != Some(&target) {
            p.reverse = Some(target);
            self.set_role(Role::Primary(p.clone()))?;
        }
        Ok(p)
    }

    /// Turns this site's primary record into the replica that waits for the reverse cycle
    /// continuing `parent` (the last cycle this site shipped, sealed): a planned failover
    /// away from a site that was itself failed over to. `owner` is the new primary.
    pub fn yield_primary(
        &mut self,
        owner: &str,
        parent: SpanParent,
        tracker: PathBuf,
    ) -> Result<(), StoreError> {
        let vm = self.vm().to_string();
        match &self.state.role {
            Role::ReversePending(r) if r.parent == parent => return Ok(()),
            Role::Primary(p) if p.lineage == parent.lineage => {}
            other => {
                return Err(refused(format!(
                    "VM {vm}: this site is its {}, not the primary of lineage {}: it cannot give \
                     way at cycle {}",
                    other.name(),
                    parent.lineage,
                    parent.cycle
                )))
            }
        }
        let Role::Primary(p) = self.state.role.clone() else {
            unreachable!()
        };
        let mut next = self.state.clone();
        next.history.push(Span {
            lineage: parent.lineage,
            first_cycle: p.parent.cycle + 1,
            last_cycle: parent.cycle,
            parent: Some(p.parent),
        });
        self.pending_replica(&mut next, owner, parent, None, Some(tracker));
        if let Role::ReversePending(r) = &mut next.role {
            r.previous = Some(Box::new(p));
        }
        self.commit_state(next)?;
        tracing::info!(vm, %parent.lineage, cycle = parent.cycle, owner, "this site gave way: it waits for the new primary's reverse cycle");
        Ok(())
    }

    /// Undoes [`Self::yield_primary`] (the promote on the other site failed): the record is
    /// the primary again. Only while nothing was received.
    pub fn unyield(&mut self) -> Result<bool, StoreError> {
        let Role::ReversePending(ReversePending {
            previous: Some(p), ..
        }) = self.state.role.clone()
        else {
            return Ok(false);
        };
        if self.state.receiving.is_some() || self.state.newest_point() != self.state.last_cycle {
            return Err(refused(format!(
                "VM {}: the new primary's reverse cycle is landing here: this site cannot be \
                 the primary again",
                self.vm()
            )));
        }
        let mut next = self.state.clone();
        next.history.pop();
        next.points.clear();
        next.role = Role::Primary(*p);
        self.commit_state(next)?;
        tracing::warn!(vm = %self.vm(), "this site is the VM's primary again (the failover away from it did not happen)");
        Ok(true)
    }

    /// Abandons a failover (a split brain resolved for the old primary): this site's writes
    /// since the failover (`divergent`) are overwritten by the old primary's next cycle,
    /// which continues the failover point; its state before stays a recovery point.
    pub fn abandon(&mut self, divergent: &RangeSet) -> Result<SpanParent, StoreError> {
        let vm = self.vm().to_string();
        let p = match &self.state.role {
            Role::ReversePending(r) => return Ok(r.parent),
            Role::Primary(p) => p.clone(),
            other => {
                return Err(refused(format!(
                    "VM {vm}: this site is its {}: there is no committed failover to abandon \
                     (an uncommitted one is cancelled)",
                    other.name()
                )))
            }
        };
        let file = save_divergent(&vm, self.dir(), divergent)?;
        let owner = self.state.owner.clone();
        let mut next = self.state.clone();
        self.pending_replica(&mut next, &owner, p.parent, Some(file), None);
        self.commit_state(next)?;
        tracing::warn!(vm, parent = %p.parent.point(), bytes = divergent.bytes(), "failover abandoned: this site's writes since the failover are overwritten by the old primary's next cycle");
        Ok(p.parent)
    }

    /// `next` as a replica of `owner` waiting for the reverse cycle continuing `parent`,
    /// with one local point (the images' state before it).
    fn pending_replica(
        &self,
        next: &mut VmState,
        owner: &str,
        parent: SpanParent,
        divergent: Option<String>,
        tracker: Option<PathBuf>,
    ) {
        next.owner = owner.to_string();
        next.lineage = Some(parent.lineage);
        next.last_cycle = parent.cycle;
        next.last_freeze = 0;
        next.receiving = None;
        next.undo.clear();
        next.points = vec![PointInfo {
            cycle: parent.cycle,
            applied_at: now(),
            kind: "local".into(),
            bytes: 0,
            app_consistent: false,
        }];
        next.role = Role::ReversePending(ReversePending {
            parent,
            divergent,
            tracker,
            since: now(),
            previous: None,
            withdrawn: None,
        });
    }

    /// The divergent ranges a replica waiting for a reverse cycle sends the new primary.
    pub fn divergent(&self) -> Result<RangeSet, StoreError> {
        let Role::ReversePending(r) = &self.state.role else {
            return Err(refused(format!(
                "VM {}: this site does not wait for a reverse cycle",
                self.vm()
            )));
        };
        let Some(f) = &r.divergent else {
            return Ok(RangeSet::new());
        };
        let p = failover_dir(self.dir()).join(f);
        let list: Vec<(u16, u64, u64)> =
            read_state(&p, DIVERGENT_FORMAT, DIVERGENT_VERSION)?.unwrap_or_default();
        let mut set = RangeSet::new();
        for (d, o, l) in list {
            if let Some(e) = o.checked_add(l) {
                set.insert(d, o, e);
            }
        }
        Ok(set)
    }

    /// Before a cycle lands in images outside the store (an old primary's, adopted): they
    /// are held as a tracker holds them (its lock byte and a running VM's), so that the old
    /// primary's tracker, started again by mistake, or a VM, cannot take them while cycles
    /// land; refused (busy) while one has them.
    ///
    /// Whatever the record says, no cycle lands while this site's own tracker for the VM
    /// (`primary/tracker`, started by a failover) runs: its images are then a running VM's
    /// disks, and a record that calls them a replica is not the one the failover wrote (a
    /// backup of `state.json` restored over it).
    pub(crate) fn hold_images(&mut self) -> Result<(), StoreError> {
        let tracker = self.dir().join("primary/tracker");
        if let Some(pid) = lock_holder(&tracker.join("lock")) {
            return Err(StoreError::Busy {
                vm: format!(
                    "{vm} (a tracker, PID {pid}, state dir {}, serves this site's images of it: \
                     they are a running VM's disks, yet its record {} says {}, not what a \
                     failover leaves; was a backup of it restored? No cycle lands in them. \
                     Put back the record the failover wrote; or, to make this site a replica \
                     again, stop that VM and tracker and remove {} so that the primary makes \
                     a new initial copy)",
                    tracker.display(),
                    self.dir().join("state.json").display(),
                    self.state.role.name(),
                    self.dir().display(),
                    vm = self.vm(),
                ),
            });
        }
        if !self.held.is_empty() {
            return Ok(());
        }
        let mut held = Vec::new();
        for d in &self.state.disks {
            let Some(p) = &d.image else { continue };
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(self.io(p))?;
            match vmreplica_tracker::imagelock::lock(&f).map_err(self.io(p))? {
                Ok(()) => held.push(f),
                Err(c) => {
                    return Err(StoreError::Busy {
                        vm: format!(
                            "{} (its image {} is {} on this site: stop it; the cycle waits)",
                            self.vm(),
                            p.display(),
                            match c {
                                vmreplica_tracker::imagelock::Conflict::Tracker => {
                                    "served by a tracker"
                                }
                                vmreplica_tracker::imagelock::Conflict::Writer => {
                                    "open for writing by another process"
                                }
                            }
                        ),
                    })
                }
            }
        }
        self.held = held;
        Ok(())
    }

    /// Lets go of the images (this site's tracker is about to serve them).
    pub(crate) fn release_images(&mut self) {
        self.held.clear();
    }

    /// A reverse cycle may land only once the tracker that served these images is gone.
    pub(crate) fn check_reverse_ready(&self) -> Result<(), StoreError> {
        let Role::ReversePending(ReversePending {
            tracker: Some(dir), ..
        }) = &self.state.role
        else {
            return Ok(());
        };
        if let Some(pid) = lock_holder(&dir.join("lock")) {
            return Err(StoreError::Busy {
                vm: format!(
                    "{} (the tracker that served its images, PID {pid}, state dir {}, still \
                     runs: a reverse cycle lands once it stopped)",
                    self.vm(),
                    dir.display()
                ),
            });
        }
        Ok(())
    }

    /// The VM's directory in the store.
    pub fn vm_dir(&self) -> &Path {
        self.dir()
    }
}

/// The PID holding the flock on `lockfile` (it wrote its PID there), or None if nobody
/// holds it.
pub fn lock_holder(lockfile: &Path) -> Option<i32> {
    let f = std::fs::File::open(lockfile).ok()?;
    // SAFETY: flock on a descriptor this function owns; released when `f` is closed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return None;
    }
    let pid = std::fs::read_to_string(lockfile).unwrap_or_default();
    Some(pid.trim().parse().unwrap_or(0))
}

impl super::Store {
    /// Creates the record of an old primary's own images (`disks`), adopted as the replica of
    /// `owner` that waits for the reverse cycle continuing `parent`; `divergent`: where the
    /// images may differ from `parent` (their unreplicated writes); `tracker`: the state dir
    /// of the tracker that served them. Again for a pending adoption of the same images, it
    /// replaces it (nothing was received yet).
    pub fn create_adopted(
        &self,
        vm: &str,
        owner: &str,
        disks: &[AdoptedDisk],
        parent: SpanParent,
        divergent: &RangeSet,
        tracker: Option<PathBuf>,
    ) -> Result<(), StoreError> {
        let dir = super::vm_dir(&self.root, vm)?;
        let state_path = dir.join("state.json");
        let _lock = super::lock_vm(&self.root, vm)?;
        if let Some(old) = super::read_vm_state(vm, &state_path)? {
            let pending = matches!(old.role, Role::ReversePending(_)) && old.receiving.is_none();
            let same = old.disks.len() == disks.len()
                && old
                    .disks
                    .iter()
                    .zip(disks)
                    .all(|(o, d)| o.image.as_deref() == Some(d.image.as_path()));
            if !(pending && same) {
                return Err(refused(format!(
                    "VM {vm} already has a record on this site ({}, lineage {}, cycle {}): \
                     adopting its primary's images would replace it; remove it first (stop the \
                     applier, remove {})",
                    old.role.name(),
                    vmreplica_common::lineage::show(old.lineage),
                    old.last_cycle,
                    dir.display()
                )));
            }
        }
        crate::undo::log::create_dirs(&dir).map_err(|e| super::io_err(vm, &dir, e))?;
        let file = save_divergent(vm, &dir, divergent)?;
        let mut st = VmState::new(owner);
        st.disks = disks
            .iter()
            .map(|d| DiskMeta {
                name: d.name.clone(),
                size: d.size,
                granularity: d.granularity,
                image: Some(d.image.clone()),
            })
            .collect();
        st.history.push(Span {
            lineage: parent.lineage,
            first_cycle: parent.cycle,
            last_cycle: parent.cycle,
            parent: None,
        });
        st.lineage = Some(parent.lineage);
        st.last_cycle = parent.cycle;
        st.points = vec![PointInfo {
            cycle: parent.cycle,
            applied_at: now(),
            kind: "local".into(),
            bytes: 0,
            app_consistent: false,
        }];
        st.role = Role::ReversePending(ReversePending {
            parent,
            divergent: Some(file),
            tracker,
            since: now(),
            previous: None,
            withdrawn: None,
        });
        st.save(&state_path)?;
        tracing::info!(vm, owner, parent = %parent.point(), divergent_bytes = divergent.bytes(), "adopted this site's images as the replica waiting for the reverse cycle");
        Ok(())
    }

    /// Withdraws a pending adoption (a planned failover that did not complete): the record
    /// is kept, marked withdrawn (no cycle lands in it; see [`ReversePending::withdrawn`]),
    /// and the images (the primary's own) are untouched. The command run again adopts them
    /// anew ([`super::Store::create_adopted`] replaces a pending adoption of the same
    /// images). Again for a withdrawn one: nothing changes.
    pub fn withdraw_adopted(&self, vm: &str) -> Result<bool, StoreError> {
        let dir = super::vm_dir(&self.root, vm)?;
        let _lock = super::lock_vm(&self.root, vm)?;
        let path = dir.join("state.json");
        let Some(mut st) = super::read_vm_state(vm, &path)? else {
            return Ok(false);
        };
        let external = st.disks.iter().all(|d| d.image.is_some());
        let (receiving, last, newest) = (st.receiving.is_some(), st.last_cycle, st.newest_point());
        let Role::ReversePending(r) = &mut st.role else {
            return Err(not_pending(vm, &st));
        };
        if receiving || !external || last != newest || r.previous.is_some() {
            return Err(not_pending(vm, &st));
        }
        if r.withdrawn.is_some() {
            return Ok(true);
        }
        r.withdrawn = Some(now());
        st.save(&path)?;
        tracing::info!(
            vm,
            "pending adoption withdrawn (kept, takes no cycle); the images are untouched"
        );
        Ok(true)
    }
}

fn not_pending(vm: &str, st: &VmState) -> StoreError {
    refused(format!(
        "VM {vm}: its record here is not a pending adoption (it is a {} at cycle {}): it is \
         kept as it is",
        st.role.name(),
        st.last_cycle
    ))
}
