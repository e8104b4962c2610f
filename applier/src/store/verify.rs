//! Checksums of a replica's blocks, for `vmreplica verify` and for a checksum resync.

use std::os::unix::fs::FileExt;

use vmreplica_common::wire::{self, MAX_CHUNK, MAX_HASHES};

use super::{StoreError, VmStore};

impl VmStore {
    /// xxh3 checksums of `count` (at most [`MAX_HASHES`]) blocks of `block` bytes of `disk`
    /// from `offset`, as the image holds them now.
    pub fn hashes(
        &self,
        disk: &str,
        offset: u64,
        block: u32,
        count: u32,
    ) -> Result<Vec<u64>, StoreError> {
        let i = self
            .state
            .disks
            .iter()
            .position(|d| d.name == disk)
            .ok_or_else(|| StoreError::BadChunk {
                vm: self.vm().to_string(),
                reason: format!("no disk {disk}"),
            })?;
        let size = self.state.disks[i].size;
        let p = self.image_path(disk);
        let block = u64::from(block.clamp(4096, MAX_CHUNK));
        let mut buf = vec![0u8; block as usize];
        let mut out = Vec::new();
        let mut pos = offset;
        let images = self.shared.images();
        for _ in 0..count.min(MAX_HASHES) {
            if pos >= size {
                break;
            }
            let n = block.min(size - pos) as usize;
            images[i]
                .file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(self.io(&p))?;
            out.push(wire::checksum(&buf[..n]));
            pos += n as u64;
        }
        Ok(out)
    }
}
