//! `vmreplica seed export|import|adopt`: initial replication by external media, or from a
//! copy already on the replica site.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use vmreplica_applier::admin::{self, Request as Admin};
use vmreplica_ops::registry;

use crate::human_bytes;

#[derive(Subcommand)]
pub enum SeedOp {
    /// On the primary: write a full frozen copy of the VM's disks (sparse images, block
    /// checksums, manifest) into DIR while the VM runs. Its shipper must not run.
    Export {
        vm: String,
        #[arg(long)]
        out: PathBuf,
        /// The shipper's configuration (tracker, certificate).
        #[arg(long)]
        config: PathBuf,
    },
    /// On the replica site: verify a seed block by block and install it as the VM's
    /// replica; the shipper then ships only what changed since the seed was frozen.
    Import {
        vm: String,
        #[arg(long)]
        from: PathBuf,
        /// The store (default: the running applier's, or /var/lib/vmreplica-replicas).
        #[arg(long)]
        store: Option<PathBuf>,
        /// The primary's certificate name, if not the one the seed names.
        #[arg(long)]
        owner: Option<String>,
    },
    /// On the replica site: adopt existing images (a backup, an old replica) as the VM's
    /// replica; the shipper's next cycle compares checksums and ships only what differs.
    Adopt {
        vm: String,
        /// NAME=PATH, the tracker's disk names. Repeatable.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// The primary's certificate name (the replica's owner).
        #[arg(long)]
        owner: String,
        #[arg(long)]
        store: Option<PathBuf>,
        /// The tracker's granularity.
        #[arg(long, default_value = "65536")]
        granularity: u32,
    },
}

/// The store to install into, and the running applier's admin socket on it, if any.
fn store_of(store: &Option<PathBuf>) -> (PathBuf, Option<PathBuf>) {
    let applier = registry::list().into_iter().find(|e| {
        e.role == registry::APPLIER
            && store.as_ref().is_none_or(|s| {
                e.state
                    .as_deref()
                    .map(std::fs::canonicalize)
                    .and_then(Result::ok)
                    == std::fs::canonicalize(s).ok()
            })
    });
    let root = store
        .clone()
        .or_else(|| applier.as_ref().and_then(|e| e.state.clone()))
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmreplica-replicas"));
    (root, applier.and_then(|e| e.control))
}

pub fn run(op: SeedOp) -> Result<()> {
    match op {
        SeedOp::Export { vm, out, config } => {
            let cfg = vmreplica_shipper::ShipperConfig::load(&config)?;
            if cfg.vm != vm {
                bail!("{} configures VM {}, not {vm}", config.display(), cfg.vm);
            }
            let t0 = Instant::now();
            let last = std::cell::Cell::new(Instant::now());
            let m = vmreplica_shipper::seed::export(&cfg, &out, &|done, total| {
                if last.get().elapsed() >= Duration::from_secs(2) {
                    last.set(Instant::now());
                    eprintln!(
                        "seed export: {} of {} ({:.0}%)",
                        human_bytes(done),
                        human_bytes(total),
                        100.0 * done as f64 / total.max(1) as f64
                    );
                }
            })
            .map_err(anyhow::Error::msg)?;
            let data: u64 = m.disks.iter().map(|d| d.data_bytes).sum();
            println!(
                "VM {vm}: seed of generation {} (lineage {}) in {}: {} disks, {} of data, {:.1} s",
                m.generation,
                m.lineage,
                out.display(),
                m.disks.len(),
                human_bytes(data),
                t0.elapsed().as_secs_f64()
            );
            println!(
                "import it on the replica site (`vmreplica seed import {vm} --from DIR`) before \
                 starting the shipper: it then ships only what changed since"
            );
            Ok(())
        }
        SeedOp::Import {
            vm,
            from,
            store,
            owner,
        } => {
            let from = std::path::absolute(&from)?;
            let (root, socket) = store_of(&store);
            let req = Admin::SeedImport {
                vm: vm.clone(),
                dir: from.clone(),
                owner: owner.clone(),
            };
            let v = match socket.map(|s| admin::call(&s, &req)).transpose()?.flatten() {
                Some(v) => v,
                None => serde_json::to_value(vmreplica_applier::seed::import(
                    &root,
                    &vm,
                    &from,
                    owner.as_deref(),
                )?)?,
            };
            println!(
                "VM {vm}: seed installed as point {} ({} of data) in {}",
                v["cycle"],
                human_bytes(v["bytes"].as_u64().unwrap_or(0)),
                v["dir"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        SeedOp::Adopt {
            vm,
            disks,
            owner,
            store,
            granularity,
        } => {
            let mut list = Vec::new();
            for d in &disks {
                let (n, p) = d
                    .split_once('=')
                    .with_context(|| format!("--disk {d:?}: expected NAME=PATH"))?;
                list.push((n.to_string(), std::path::absolute(p)?));
            }
            let (root, socket) = store_of(&store);
            let req = Admin::Adopt {
                vm: vm.clone(),
                owner: owner.clone(),
                disks: list.clone(),
                granularity,
            };
            let v = match socket.map(|s| admin::call(&s, &req)).transpose()?.flatten() {
                Some(v) => v,
                None => serde_json::to_value(vmreplica_applier::seed::adopt(
                    &root,
                    &vm,
                    &owner,
                    &list,
                    granularity,
                )?)?,
            };
            println!(
                "VM {vm}: {} adopted as its replica in {}; the shipper's next cycle compares \
                 checksums and ships only what differs",
                list.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                v["dir"].as_str().unwrap_or_default()
            );
            Ok(())
        }
    }
}
