//! `vmreplica seed export`: a full frozen copy of a VM's disks for external media, made
//! while the VM runs (see `vmreplica_common::seed` for the format).
//!
//! The shipper must not run (this takes its lock: the freeze is the shipper's to make). The
//! tracker is put in a lineage (a new one if it has none), every disk is frozen at one
//! instant, and the frozen blocks are written as sparse images with a checksum per block;
//! the manifest comes last. Then the generation is released: the seed is its copy, and the
//! writes since the freeze stay dirty in the tracker, so once the seed is imported on the
//! replica site the shipper's first cycle is a delta of exactly those writes. If the seed is
//! never imported, the shipper finds an empty replica and makes a normal initial copy: no
//! change is lost either way. A failure before the manifest is written merges the
//! generation back.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vmreplica_common::lineage::Lineage;
use vmreplica_common::seed::{write_sums, Manifest, SeedDisk, FORMAT, VERSION};
use vmreplica_common::wire::{checksum, is_zero, MAX_CHUNK};
use vmreplica_tracker::control::{self, Request};
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::Generation;

use crate::config::ShipperConfig;

fn call(socket: &Path, req: Request) -> Result<Value, String> {
    control::call(socket, &req).map_err(|e| crate::run::tracker_error(socket, &e).to_string())
}

/// Writes the seed of `cfg`'s VM into `out` (created; it must be empty); `progress` hears
/// bytes done of the total now and then.
pub fn export(
    cfg: &ShipperConfig,
    out: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Manifest, String> {
    let _lock = crate::lock::lock(&cfg.tracker).map_err(|e| {
        format!("{e} (seed export freezes the tracker itself: stop the shipper first)")
    })?;
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| format!("{}: {e}", out.display()))?
            .next()
            .is_some()
    {
        return Err(format!(
            "{} is not empty: a seed goes into a directory of its own",
            out.display()
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let id = vmreplica_common::tls::Identity::load(&cfg.cert, &cfg.key, &cfg.ca)
        .map_err(|e| e.to_string())?;
    let owner = vmreplica_common::tls::cert_names(&id.chain[0])
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: the certificate names no one", cfg.cert.display()))?;
    let st = call(&cfg.tracker, Request::Status)?;
    if let Some(g) = st["frozen"]["generation"].as_u64() {
        return Err(format!(
            "the tracker holds generation {g} frozen (a cycle the shipper has not finished): \
             start the shipper to finish it first, or `vmreplica ctl merge {g}`"
        ));
    }
    let lineage = match st["lineage"].as_str() {
        Some(l) => Lineage::parse(l).map_err(|e| e.to_string())?,
        None => {
            let l = Lineage::random();
            call(
                &cfg.tracker,
                Request::SetLineage {
                    lineage: l,
                    next_generation: st["next_generation"].as_u64().unwrap_or(1),
                    force: false,
                    parent: None,
                },
            )?;
            l
        }
    };
    let g: Generation = serde_json::from_value(call(
        &cfg.tracker,
        Request::Freeze {
            full: true,
            baseline: false,
        },
    )?)
    .map_err(|e| format!("tracker's freeze: {e}"))?;
    let r = write_seed(&g, out, progress).and_then(|disks| {
        let excluded = st["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["excluded"] == Value::Bool(true))
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or_default().to_string(),
                    d["size"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            vm: cfg.vm.clone(),
            owner,
            lineage,
            generation: g.generation,
            freeze: g.id,
            frozen_at: g.frozen_at,
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            granularity: g.disks.first().map_or(65536, |d| d.granularity),
            disks,
            excluded,
        };
        m.save(out)
            .map_err(|e| format!("{}: {e}", out.join("manifest.json").display()))?;
        Ok(m)
    });
    match r {
        Ok(m) => {
            // The seed holds the generation: release it (the writes since stay dirty).
            call(
                &cfg.tracker,
                Request::Release {
                    generation: g.generation,
                    applied: None,
                    force: true,
                },
            )?;
            vmreplica_ops::events::emit(
                vmreplica_ops::events::Event::new(vmreplica_ops::events::SEED_EXPORTED)
                    .vm(&cfg.vm)
                    .field("dir", out)
                    .field("generation", g.generation),
            );
            Ok(m)
        }
        Err(e) => {
            let _ = call(
                &cfg.tracker,
                Request::Merge {
                    generation: g.generation,
                },
            );
            Err(format!(
                "{e}; the freeze was merged back, nothing is lost (remove {} and try again)",
                out.display()
            ))
        }
    }
}

/// Writes each frozen disk as a sparse image and its block checksums.
fn write_seed(
    g: &Generation,
    out: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<SeedDisk>, String> {
    let total: u64 = g.disks.iter().map(|d| d.size).sum();
    let mut done = 0u64;
    let mut disks = Vec::new();
    for d in &g.disks {
        let r = FrozenReader::open(d).map_err(|e| format!("disk {}: {e}", d.name))?;
        let gran = u64::from(d.granularity);
        let blocks = d.size.div_ceil(gran);
        let zero_sum = checksum(&vec![0u8; gran as usize]);
        let mut sums: Vec<u64> = (0..blocks)
            .map(|b| {
                let len = gran.min(d.size - b * gran);
                if len == gran {
                    zero_sum
                } else {
                    checksum(&vec![0u8; len as usize])
                }
            })
            .collect();
        let file = format!("{}.img", d.name);
        let path = out.join(&file);
        let img = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        img.set_len(d.size)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut data_bytes = 0u64;
        let mut buf = Vec::new();
        let runs = r
            .runs(u64::from(MAX_CHUNK), true)
            .map_err(|e| format!("disk {}: {e}", d.name))?;
        for (off, len) in runs {
            buf.resize(len as usize, 0);
            r.read(off, &mut buf)
                .map_err(|e| format!("disk {}: {e}", d.name))?;
            for (i, block) in buf.chunks(gran as usize).enumerate() {
                let at = off + i as u64 * gran;
                sums[(at / gran) as usize] = checksum(block);
                if !is_zero(block) {
                    img.write_all_at(block, at)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    data_bytes += block.len() as u64;
                }
            }
            done += len;
            progress(done, total);
        }
        img.sync_all()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let sums_file = format!("{}.sums", d.name);
        let sums_checksum = write_sums(&out.join(&sums_file), &sums)
            .map_err(|e| format!("{}: {e}", out.join(&sums_file).display()))?;
        disks.push(SeedDisk {
            name: d.name.clone(),
            size: d.size,
            file,
            sums: sums_file,
            sums_checksum,
            data_bytes,
        });
    }
    std::fs::File::open(out)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(disks)
}
