//! Installing a replica from outside the link: a seed from external media (`vmreplica seed
//! import`, see `vmreplica_common::seed`), or an existing copy on the replica site (`seed
//! adopt`: restored from a backup, an old replica), which a checksum resync then brings up
//! to date by shipping only the blocks that differ.
//!
//! Every block of a seed is checked against the manifest before anything is installed: a
//! damaged seed is refused, naming the file and the byte range. The replica is put together
//! in a staging directory (`STORE/.seed-VM-PID`: images, then the state file) and renamed
//! into place, so a crash leaves either no replica or a complete one (a leftover staging
//! directory is removed at the next start). An existing replica is never replaced.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmreplica_common::seed::{read_sums, Manifest};
use vmreplica_common::sparse::data_regions;
use vmreplica_common::wire::{checksum, is_zero};
use vmreplica_ops::events::{self, Event};
use vmreplica_ops::history::CycleRecord;

use crate::store::state::{DiskMeta, ExcludedDisk, PointInfo, Span, VmState};
use crate::store::{lock_vm, vm_dir, StoreError};

const COPY: u64 = 4 << 20;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: p.to_path_buf(),
        source,
    }
}

fn refused(vm: &str, why: String) -> StoreError {
    StoreError::Refused(format!("VM {vm}: {why}; nothing was installed"))
}

/// What was installed.
#[derive(Debug, serde::Serialize)]
pub struct Installed {
    pub vm: String,
    pub cycle: u64,
    pub dir: PathBuf,
    pub bytes: u64,
}

/// Copies `src` (`size` bytes) into `dst` block by block, sparse; `check(block, offset,
/// data)` sees every block, holes included (as zeroes).
fn copy_checked(
    src_path: &Path,
    dst: &File,
    size: u64,
    gran: u64,
    mut check: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<u64, StoreError> {
    let src = File::open(src_path).map_err(io(src_path))?;
    let len = src.metadata().map_err(io(src_path))?.len();
    if len != size {
        return Err(StoreError::Export(format!(
            "{}: {len} bytes, {size} expected",
            src_path.display()
        )));
    }
    dst.set_len(size).map_err(io(src_path))?;
    let data = data_regions(&src, size).map_err(io(src_path))?;
    let zero = vec![0u8; gran as usize];
    let mut written = 0u64;
    let mut pos = 0u64;
    let mut buf = Vec::new();
    let bad = |e: String| StoreError::Export(e);
    for (start, dlen) in data {
        // Holes read as zeroes: checked without reading.
        let start = start / gran * gran;
        while pos < start {
            let n = gran.min(size - pos);
            check(pos, &zero[..n as usize]).map_err(bad)?;
            pos += n;
        }
        let end = (start + dlen).div_ceil(gran).saturating_mul(gran).min(size);
        while pos < end {
            let n = COPY.min(end - pos);
            buf.resize(n as usize, 0);
            src.read_exact_at(&mut buf, pos).map_err(io(src_path))?;
            for (i, block) in buf.chunks(gran as usize).enumerate() {
                let at = pos + i as u64 * gran;
                check(at, block).map_err(bad)?;
                if !is_zero(block) {
                    dst.write_all_at(block, at).map_err(io(src_path))?;
                    written += block.len() as u64;
                }
            }
            pos += n;
        }
    }
    while pos < size {
        let n = gran.min(size - pos);
        check(pos, &zero[..n as usize]).map_err(bad)?;
        pos += n;
    }
    dst.sync_all().map_err(io(src_path))?;
    Ok(written)
}

/// The staging directory, and the checks before it: no replica there yet.
fn staging(root: &Path, vm: &str) -> Result<(PathBuf, PathBuf), StoreError> {
    let dir = vm_dir(root, vm)?;
    if dir.join("state.json").exists() {
        return Err(refused(
            vm,
            format!(
                "the store holds a replica of it already ({}): remove it first (`vmreplica \
                 remove {vm} --replica`)",
                dir.display()
            ),
        ));
    }
    let stage = root.join(format!(".seed-{vm}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    crate::undo::log::create_dirs(&stage.join("disks")).map_err(io(&stage))?;
    Ok((dir, stage))
}

/// Saves the state into the staging directory and renames it into place.
fn install(
    root: &Path,
    vm: &str,
    stage: &Path,
    dir: &Path,
    state: &VmState,
) -> Result<(), StoreError> {
    crate::undo::log::sync_dir(&stage.join("disks").join("x")).map_err(io(stage))?;
    state.save(&stage.join("state.json"))?;
    if dir.exists() {
        // A directory without a state file: what a crash left of nothing.
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(stage, dir).map_err(io(dir))?;
    File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io(root))?;
    tracing::info!(vm, dir = %dir.display(), "replica installed");
    Ok(())
}

/// Verifies the seed in `from` block by block and installs it as VM `vm`'s replica: a
/// point of the seed's lineage at its generation, so the shipper's next cycle is a delta of
/// what changed since the seed was frozen. `owner` replaces the manifest's primary name.
pub fn import(
    root: &Path,
    vm: &str,
    from: &Path,
    owner: Option<&str>,
) -> Result<Installed, StoreError> {
    let m = Manifest::load(from).map_err(|e| StoreError::Export(e.to_string()))?;
    if m.vm != vm {
        return Err(refused(
            vm,
            format!("the seed in {} is of VM {}", from.display(), m.vm),
        ));
    }
    crate::undo::log::create_dirs(root).map_err(io(root))?;
    let _lock = lock_vm(root, vm)?;
    let (dir, stage) = staging(root, vm)?;
    let r = (|| {
        let gran = u64::from(m.granularity);
        let mut disks = Vec::new();
        let mut bytes = 0;
        for d in &m.disks {
            let sums_path = from.join(&d.sums);
            let sums = read_sums(&sums_path, m.blocks(d.size), d.sums_checksum)
                .map_err(StoreError::Export)?;
            let src = from.join(&d.file);
            let dst_path = stage.join("disks").join(format!("{}.img", d.name));
            let dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dst_path)
                .map_err(io(&dst_path))?;
            bytes += copy_checked(&src, &dst, d.size, gran, |at, block| {
                if sums[(at / gran) as usize] == checksum(block) {
                    Ok(())
                } else {
                    Err(format!(
                        "seed image {}: bytes {at}..{} (block {}) do not match the manifest's \
                         checksum: the seed is damaged; nothing was installed",
                        src.display(),
                        at + block.len() as u64,
                        at / gran
                    ))
                }
            })?;
            disks.push(DiskMeta {
                name: d.name.clone(),
                size: d.size,
                granularity: m.granularity,
                image: None,
            });
        }
        let mut s = VmState::new(owner.unwrap_or(&m.owner));
        s.disks = disks;
        s.lineage = Some(m.lineage);
        s.history = vec![Span {
            lineage: m.lineage,
            first_cycle: m.generation,
            last_cycle: m.generation,
            parent: None,
        }];
        s.last_cycle = m.generation;
        s.last_freeze = m.freeze;
        s.epoch = 0;
        s.points = vec![PointInfo {
            cycle: m.generation,
            applied_at: now(),
            kind: "seed".into(),
            bytes: 0,
            app_consistent: false,
        }];
        s.excluded = m
            .excluded
            .iter()
            .map(|(name, size)| ExcludedDisk {
                name: name.clone(),
                size: *size,
            })
            .collect();
        s.ops.last_frozen_at = m.frozen_at;
        s.ops.history.record(CycleRecord {
            cycle: m.generation,
            kind: "seed".into(),
            frozen_at: m.frozen_at,
            started_ms: now() * 1000,
            applied_ms: now() * 1000,
            bytes,
            wire_bytes: 0,
            app_consistent: false,
        });
        install(root, vm, &stage, &dir, &s)?;
        Ok(Installed {
            vm: vm.to_string(),
            cycle: m.generation,
            dir: dir.clone(),
            bytes,
        })
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&stage);
    } else {
        events::emit(
            Event::new(events::SEED_IMPORTED)
                .vm(vm)
                .field("dir", from)
                .field("cycle", m.generation),
        );
    }
    r
}

/// Adopts existing images (`disks`: name, path) as VM `vm`'s replica for primary `owner`:
/// a point without a lineage, which only a checksum resync continues, so the shipper's
/// next cycle compares checksums and ships only the blocks that differ.
pub fn adopt(
    root: &Path,
    vm: &str,
    owner: &str,
    disks: &[(String, PathBuf)],
    granularity: u32,
) -> Result<Installed, StoreError> {
    if disks.is_empty() {
        return Err(refused(vm, "no disk given".into()));
    }
    crate::undo::log::create_dirs(root).map_err(io(root))?;
    let _lock = lock_vm(root, vm)?;
    let (dir, stage) = staging(root, vm)?;
    let r = (|| {
        let mut metas = Vec::new();
        let mut bytes = 0;
        for (name, path) in disks {
            vmreplica_common::validate_name(name).map_err(|source| StoreError::Name {
                name: name.clone(),
                source,
            })?;
            let size = std::fs::metadata(path).map_err(io(path))?.len();
            let dst_path = stage.join("disks").join(format!("{name}.img"));
            let dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dst_path)
                .map_err(io(&dst_path))?;
            bytes += copy_checked(path, &dst, size, u64::from(granularity), |_, _| Ok(()))?;
            metas.push(DiskMeta {
                name: name.clone(),
                size,
                granularity,
                image: None,
            });
        }
        let mut s = VmState::new(owner);
        s.disks = metas;
        // No lineage: only a resync continues it (cycle numbers after 1).
        s.last_cycle = 1;
        s.points = vec![PointInfo {
            cycle: 1,
            applied_at: now(),
            kind: "adopted".into(),
            bytes: 0,
            app_consistent: false,
        }];
        install(root, vm, &stage, &dir, &s)?;
        Ok(Installed {
            vm: vm.to_string(),
            cycle: 1,
            dir: dir.clone(),
            bytes,
        })
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&stage);
    } else {
        events::emit(
            Event::new(events::SEED_IMPORTED)
                .vm(vm)
                .field("adopted", true),
        );
    }
    r
}
