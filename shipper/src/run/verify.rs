//! `vmreplica verify`: compares the VM's disks on both sites by checksum.

use serde_json::Value;
use vmreplica_common::link::{self, LinkError};
use vmreplica_common::wire::Message;
use vmreplica_tracker::control::Request;

use super::{endpoint, hello, open, tracker};
use crate::config::ShipperConfig;
use crate::ship::ShipError;

/// Compares every block of the VM's disks on both sites by checksum; returns, per disk, the
/// differing byte ranges. Only checksums cross the link.
pub async fn verify(cfg: &ShipperConfig) -> Result<Vec<(String, Vec<(u64, u64)>)>, ShipError> {
    const BATCH: u32 = 1024;
    let ep = endpoint(cfg)?;
    let (conn, mut ctl) = open(&ep, cfg).await?;
    match hello(cfg, &mut ctl, None).await? {
        Message::Welcome { .. } => {}
        other => return Err(ShipError::Protocol(other.name().into())),
    }
    let st = tracker(&cfg.tracker, Request::Status).await?;
    let granularity = st["granularity"].as_u64().unwrap_or(65536);
    let mut out = Vec::new();
    for d in st["disks"].as_array().cloned().unwrap_or_default() {
        if d["excluded"] == Value::Bool(true) {
            continue; // not replicated: nothing to compare
        }
        let name = d["name"].as_str().unwrap_or_default().to_string();
        let size = d["size"].as_u64().unwrap_or(0);
        let image =
            std::fs::File::open(d["image"].as_str().unwrap_or_default()).map_err(|source| {
                ShipError::Read {
                    disk: name.clone(),
                    source,
                }
            })?;
        let mut diffs: Vec<(u64, u64)> = Vec::new();
        let mut offset = 0u64;
        let mut buf = vec![0u8; granularity as usize];
        while offset < size {
            link::send(
                &mut ctl.0,
                &Message::HashRequest {
                    disk: name.clone(),
                    offset,
                    block: granularity as u32,
                    count: BATCH,
                },
            )
            .await?;
            let remote = match link::expect(&mut ctl.1).await {
                Ok(Message::Hashes { hashes, .. }) => hashes,
                Ok(other) => return Err(ShipError::Protocol(other.name().into())),
                Err(LinkError::Peer(reason)) => {
                    return Err(ShipError::Refused { cycle: 0, reason })
                }
                Err(e) => return Err(e.into()),
            };
            for i in 0..u64::from(BATCH) {
                let off = offset + i * granularity;
                if off >= size {
                    break;
                }
                let n = granularity.min(size - off) as usize;
                use std::os::unix::fs::FileExt;
                image
                    .read_exact_at(&mut buf[..n], off)
                    .map_err(|source| ShipError::Read {
                        disk: name.clone(),
                        source,
                    })?;
                if remote.get(i as usize) != Some(&vmreplica_common::wire::checksum(&buf[..n])) {
                    match diffs.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += n as u64,
                        _ => diffs.push((off, n as u64)),
                    }
                }
            }
            offset += u64::from(BATCH) * granularity;
        }
        out.push((name, diffs));
    }
    conn.close(0u32.into(), b"verify done");
    ep.endpoint.wait_idle().await;
    Ok(out)
}
