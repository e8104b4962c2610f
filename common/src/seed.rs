//! The seed format: a full frozen copy of a VM's disks on external media, for an initial
//! replication that does not cross the WAN (`vmreplica seed export` on the primary, `seed
//! import` on the replica site).
//!
//! A seed directory holds, per disk, `NAME.img` (a sparse raw image of the disk as frozen)
//! and `NAME.sums` (the xxh3 checksum of every block of `granularity` bytes, 8 bytes
//! little-endian each, holes included), and `manifest.json` (versioned: `vmreplica-seed`,
//! version 1), written last: a directory without it is an unfinished seed. The manifest
//! names the VM, the primary's certificate name (the replica's owner), the lineage,
//! generation and freeze id the copy is of, and each disk's size and the checksum of its
//! sums file; import verifies every block against it before installing anything.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::lineage::Lineage;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "vmreplica-seed";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeedDisk {
    pub name: String,
    pub size: u64,
    /// The image and the sums file, relative to the seed directory.
    pub file: String,
    pub sums: String,
    /// xxh3 of the sums file's bytes.
    pub sums_checksum: u64,
    /// Bytes of data written (the rest are holes).
    pub data_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub vm: String,
    /// The primary's certificate name: the replica's owner.
    pub owner: String,
    pub lineage: Lineage,
    pub generation: u64,
    pub freeze: u64,
    /// When the tracker froze the copy, and when the seed was finished (seconds since the
    /// epoch).
    pub frozen_at: u64,
    pub created_at: u64,
    pub granularity: u32,
    pub disks: Vec<SeedDisk>,
    /// Disks served but not replicated (name, size).
    #[serde(default)]
    pub excluded: Vec<(String, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("seed {dir}: {reason}")]
    Bad { dir: PathBuf, reason: String },
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Manifest, SeedError> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read(&p).map_err(|source| SeedError::Io {
            path: p.clone(),
            source,
        })?;
        let bad = |reason: String| SeedError::Bad {
            dir: dir.to_path_buf(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
        if v["format"] != FORMAT {
            return Err(bad(format!("{MANIFEST} is not a {FORMAT} manifest")));
        }
        if v["version"] != VERSION {
            return Err(bad(format!(
                "{MANIFEST} has version {}, this vmreplica reads version {VERSION}",
                v["version"]
            )));
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
        crate::validate_name(&m.vm).map_err(|e| bad(format!("vm: {e}")))?;
        if !m.granularity.is_power_of_two() || m.granularity < 4096 {
            return Err(bad(format!("granularity {} is not valid", m.granularity)));
        }
        if m.generation == 0 {
            return Err(bad(format!(
                "{MANIFEST}: generation 0: a seed is of a frozen generation, 1 or later"
            )));
        }
        if m.disks.is_empty() {
            return Err(bad(format!("{MANIFEST} lists no disk")));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut files = std::collections::BTreeSet::new();
        for d in &m.disks {
            crate::validate_name(&d.name).map_err(|e| bad(format!("disk: {e}")))?;
            if !names.insert(d.name.as_str()) {
                return Err(bad(format!("{MANIFEST} lists disk {} twice", d.name)));
            }
            for f in [&d.file, &d.sums] {
                if f.contains('/') || f.starts_with('.') {
                    return Err(bad(format!("file name {f:?} is not in the seed directory")));
                }
                if !files.insert(f.as_str()) {
                    return Err(bad(format!("{MANIFEST} names file {f} twice")));
                }
            }
        }
        for (name, _) in &m.excluded {
            crate::validate_name(name).map_err(|e| bad(format!("excluded disk: {e}")))?;
            if !names.insert(name.as_str()) {
                return Err(bad(format!(
                    "{MANIFEST} lists disk {name} twice (excluded and shipped, or excluded twice)"
                )));
            }
        }
        Ok(m)
    }

    /// Writes the manifest (atomically, last).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        crate::write_atomic(&dir.join(MANIFEST), &data)
    }

    /// Blocks of a disk of `size` bytes.
    pub fn blocks(&self, size: u64) -> u64 {
        size.div_ceil(u64::from(self.granularity))
    }
}

/// Writes block checksums as a sums file; returns its checksum.
pub fn write_sums(path: &Path, sums: &[u64]) -> io::Result<u64> {
    let mut bytes = Vec::with_capacity(sums.len() * 8);
    for s in sums {
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    let mut f = File::create(path)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    Ok(xxh3_64(&bytes))
}

/// Reads a sums file of `blocks` checksums whose bytes have checksum `want`.
pub fn read_sums(path: &Path, blocks: u64, want: u64) -> Result<Vec<u64>, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(blocks.saturating_mul(8) + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 != blocks * 8 {
        return Err(format!(
            "{}: {} bytes, the manifest's disk has {blocks} blocks ({} bytes of checksums)",
            path.display(),
            bytes.len(),
            blocks * 8
        ));
    }
    if xxh3_64(&bytes) != want {
        return Err(format!(
            "{}: its checksum does not match the manifest's: the sums file is damaged",
            path.display()
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> serde_json::Value {
        serde_json::json!({
            "format": FORMAT, "version": VERSION, "vm": "vm1", "owner": "primary-1",
            "lineage": "4ef9e9b3c0b6afb6b6b4209e6f196ddb", "generation": 22, "freeze": 7,
            "frozen_at": 1, "created_at": 2, "granularity": 65536,
            "disks": [{"name": "sys", "size": 65536, "file": "sys.img", "sums": "sys.sums",
                       "sums_checksum": 1, "data_bytes": 0}],
            "excluded": [["swap", 65536]]
        })
    }

    /// A hand-edited or damaged manifest is refused with what is wrong, before any file is
    /// read: generation 0, no disk, a disk twice, a file named twice, an excluded disk that
    /// is also shipped.
    #[test]
    fn manifests_that_cannot_describe_a_replica_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |m: &serde_json::Value| {
            std::fs::write(dir.path().join(MANIFEST), m.to_string()).unwrap();
            Manifest::load(dir.path())
        };
        assert!(write(&manifest()).is_ok());
        let disk = manifest()["disks"][0].clone();
        let mut other = disk.clone();
        other["name"] = "data".into();
        for (edit, want) in [
            (serde_json::json!({"generation": 0}), "generation 0"),
            (serde_json::json!({"disks": []}), "lists no disk"),
            (serde_json::json!({"disks": [disk, disk]}), "disk sys twice"),
            (
                serde_json::json!({"disks": [disk, other]}),
                "file sys.img twice",
            ),
            (
                serde_json::json!({"excluded": [["sys", 5]]}),
                "disk sys twice",
            ),
            (
                serde_json::json!({"excluded": [["../x", 5]]}),
                "excluded disk",
            ),
        ] {
            let mut m = manifest();
            for (k, v) in edit.as_object().unwrap() {
                m[k] = v.clone();
            }
            let e = write(&m).unwrap_err().to_string();
            assert!(e.contains(want), "{edit}: {e}");
        }
    }
}
