//! Writing a recovery point's disks out as sparse raw images, through a point view: it works
//! while the applier keeps applying cycles (the view pins the point, and reads exactly it).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmreplica_common::wire::{is_zero, MAX_CHUNK};

use super::StoreError;
use crate::pointview::{ExtentKind, PointView};

/// `path` made absolute with its existing part resolved (symlinks, `..`), for comparisons.
fn resolved(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match fs::canonicalize(existing) {
            Ok(c) => {
                let mut out = c;
                for r in rest.iter().rev() {
                    out.push(r);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e);
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Refuses an export into `out` that could damage a replica or an earlier export: a
/// directory inside the store `root`, or one holding an image of the same name already.
pub fn check_export_dir(root: &Path, out: &Path, disks: &[String]) -> Result<(), StoreError> {
    let bad = |m: String| StoreError::Export(m);
    let root_r = resolved(root).map_err(|e| bad(format!("store {}: {e}", root.display())))?;
    let out_r = resolved(out).map_err(|e| bad(format!("{}: {e}", out.display())))?;
    if out_r.starts_with(&root_r) {
        return Err(bad(format!(
            "{} is inside the replica store {}: an export there could overwrite a replica; \
             choose a directory outside the store",
            out.display(),
            root.display()
        )));
    }
    for d in disks {
        let p = out.join(format!("{d}.img"));
        if p.exists() {
            return Err(bad(format!(
                "{} exists already: refusing to overwrite it (remove it, or choose another \
                 directory)",
                p.display()
            )));
        }
    }
    Ok(())
}

/// Writes each disk of `view`'s point as `out/NAME.img` (sparse; only data is written).
/// Images are created new (never overwritten); on an error the ones begun are removed.
pub fn export(view: &PointView, out: &Path) -> Result<Vec<PathBuf>, StoreError> {
    // Every directory made is durable (its parent fsynced), like the images in it.
    crate::undo::log::create_dirs(out).map_err(|source| StoreError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut made: Vec<PathBuf> = Vec::new();
    let r = (|| {
        for (i, (name, size)) in view.disks().iter().enumerate() {
            let p = out.join(format!("{name}.img"));
            let io = |source| StoreError::Io {
                path: p.clone(),
                source,
            };
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        StoreError::Export(format!(
                            "{} exists already: refusing to overwrite it",
                            p.display()
                        ))
                    } else {
                        io(e)
                    }
                })?;
            made.push(p.clone());
            f.set_len(*size).map_err(io)?;
            copy_disk(view, i, *size, &f).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        File::open(out)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Io {
                path: out.to_path_buf(),
                source,
            })
    })();
    if let Err(e) = r {
        for p in &made {
            let _ = fs::remove_file(p);
        }
        return Err(e);
    }
    Ok(made)
}

fn copy_disk(view: &PointView, disk: usize, size: u64, out: &File) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    for x in view.extents(disk, 0, size)? {
        if x.kind != ExtentKind::Data {
            continue;
        }
        let mut pos = x.offset;
        while pos < x.offset + x.len {
            let n = (x.offset + x.len - pos).min(buf.len() as u64) as usize;
            view.read_at(disk, pos, &mut buf[..n])?;
            // Zero blocks stay holes.
            let mut at = 0;
            for block in buf[..n].chunks(4096) {
                if !is_zero(block) {
                    out.write_all_at(block, pos + at as u64)?;
                }
                at += block.len();
            }
            pos += n as u64;
        }
    }
    Ok(())
}
