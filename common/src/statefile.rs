//! Versioned state files, written atomically.
//!
//! Every state file is JSON wrapped in an envelope `{"format": F, "version": V, "state": ...}`
//! and replaced with write-temp, fsync, rename, fsync-directory, so a crash leaves either the
//! old or the new file, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("cannot write state file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state file {path} is a {found:?} file, expected {expected:?}")]
    WrongFormat {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("state file {path} has version {found}, this build reads version {expected}")]
    WrongVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// The new file was renamed into place but its directory could not be synced: a reader
    /// (a restart) sees the new state, a power cut may bring the old one back. The save is
    /// *maybe made*: the caller must keep whatever either state refers to, and must not take
    /// the new state as durable until a later save (or directory sync) succeeds.
    #[error(
        "state file {path} was replaced but its directory could not be synced ({source}); \
         the new state may not survive a power cut"
    )]
    Unsynced { path: PathBuf, source: io::Error },
}

impl StateFileError {
    /// Whether the new state may be on disk despite the error (see [`StateFileError::Unsynced`]).
    pub fn maybe_made(&self) -> bool {
        matches!(self, StateFileError::Unsynced { .. })
    }
}

/// A failed replace: whether the new file was already renamed into place, and why.
struct ReplaceError {
    renamed: bool,
    source: io::Error,
}

impl From<io::Error> for ReplaceError {
    fn from(source: io::Error) -> ReplaceError {
        ReplaceError {
            renamed: false,
            source,
        }
    }
}

/// Replaces `path` with `data` atomically and durably. An error after the rename (syncing
/// the directory) says so in its message: the new file is then in place but may not be
/// durable; callers that must tell the two apart use [`write_state`].
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    replace(path, data).map_err(|e| {
        if e.renamed {
            io::Error::new(
                e.source.kind(),
                format!(
                    "{} is in place but its directory could not be synced: {}",
                    path.display(),
                    e.source
                ),
            )
        } else {
            e.source
        }
    })
}

fn replace(path: &Path, data: &[u8]) -> Result<(), ReplaceError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ReplaceError {
            renamed: true,
            source,
        })
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    format: String,
    version: u32,
    state: T,
}

/// Writes `state` as a versioned state file of the given format.
pub fn write_state<T: Serialize>(
    path: &Path,
    format: &str,
    version: u32,
    state: &T,
) -> Result<(), StateFileError> {
    let env = Envelope {
        format: format.to_string(),
        version,
        state,
    };
    let mut data = serde_json::to_vec_pretty(&env).map_err(|e| StateFileError::Write {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    data.push(b'\n');
    replace(path, &data).map_err(|e| {
        let path = path.to_path_buf();
        if e.renamed {
            StateFileError::Unsynced {
                path,
                source: e.source,
            }
        } else {
            StateFileError::Write {
                path,
                source: e.source,
            }
        }
    })
}

/// Reads a state file written by [`write_state`]; `Ok(None)` when it does not exist.
pub fn read_state<T: DeserializeOwned>(
    path: &Path,
    format: &str,
    version: u32,
) -> Result<Option<T>, StateFileError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    #[derive(Deserialize)]
    struct Head {
        format: String,
        version: u32,
    }
    let corrupt = |e: serde_json::Error| StateFileError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let head: Head = serde_json::from_slice(&data).map_err(corrupt)?;
    if head.format != format {
        return Err(StateFileError::WrongFormat {
            path: path.to_path_buf(),
            found: head.format,
            expected: format.to_string(),
        });
    }
    if head.version != version {
        return Err(StateFileError::WrongVersion {
            path: path.to_path_buf(),
            found: head.version,
            expected: version,
        });
    }
    let env: Envelope<T> = serde_json::from_slice(&data).map_err(corrupt)?;
    Ok(Some(env.state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct S {
        n: u64,
    }

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        assert!(read_state::<S>(&p, "t", 1).unwrap().is_none());
        write_state(&p, "t", 1, &S { n: 1 }).unwrap();
        write_state(&p, "t", 1, &S { n: 2 }).unwrap();
        assert_eq!(read_state::<S>(&p, "t", 1).unwrap(), Some(S { n: 2 }));
        // No temp file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rejects_corrupt_wrong_format_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            read_state::<S>(&p, "t", 1),
            Err(StateFileError::Corrupt { .. })
        ));
        write_state(&p, "t", 1, &S { n: 1 }).unwrap();
        assert!(matches!(
            read_state::<S>(&p, "u", 1),
            Err(StateFileError::WrongFormat { .. })
        ));
        assert!(matches!(
            read_state::<S>(&p, "t", 2),
            Err(StateFileError::WrongVersion { .. })
        ));
        let msg = read_state::<S>(&p, "t", 2).unwrap_err().to_string();
        assert!(msg.contains("x.json"), "{msg}");
    }
}
