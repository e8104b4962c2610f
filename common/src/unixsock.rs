//! Unix sockets with the owner, group and mode they are meant to have from the first instant
//! (so that, say, a QEMU running as another user can reach a disk, and nobody else can):
//! bound under a temporary name, given their permissions, then renamed into place.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Who may use a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits (connecting needs write permission).
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

impl SocketPerms {
    /// Only the owner (this process's user).
    pub fn owner_only() -> SocketPerms {
        SocketPerms {
            mode: 0o600,
            owner: None,
            group: None,
        }
    }
}

/// The process's umask (from /proc/self/status, which reads it without changing it; 022 where
/// that is not available).
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Parses an octal mode such as `0660` or `660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal permission mode such as 0660"))
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A user's id, from a name or a number.
pub fn user_id(name: &str) -> io::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = cstr(name)?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: a zeroed passwd is a valid out-parameter; getpwnam_r fills it, pointing into
    // `buf`, which outlives the call; `found` is set to null or to `pw`.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as above; the name is NUL-terminated and the buffer length is its own.
    let r = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    if found.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user named {name:?}"),
        ));
    }
    Ok(pw.pw_uid)
}

/// A group's id, from a name or a number.
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = cstr(name)?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: as in `user_id`, for getgrnam_r.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `user_id`.
    let r = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    if found.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group named {name:?}"),
        ));
    }
    Ok(gr.gr_gid)
}

/// Binds a unix socket at `path` with `perms`. A stale socket there (nobody answers on it) is
/// replaced; one in use is an error naming it.
pub fn bind(path: &Path, perms: &SocketPerms) -> io::Result<UnixListener> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if path.exists() && UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another server", path.display()),
        ));
    }
    let name = path
        .file_name()
        .ok_or_else(|| ctx(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(ctx)?;
    let set = || -> io::Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(perms.mode))?;
        if perms.owner.is_some() || perms.group.is_some() {
            let c = CString::new(tmp.as_os_str().as_bytes())
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let keep = u32::MAX; // -1: leave unchanged
                                 // SAFETY: lchown with a NUL-terminated path that lives across the call.
            let r = unsafe {
                libc::lchown(
                    c.as_ptr(),
                    perms.owner.unwrap_or(keep),
                    perms.group.unwrap_or(keep),
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = set() {
        let _ = std::fs::remove_file(&tmp);
        return Err(ctx(e));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    #[cfg_attr(miri, ignore = "sockets")]
    fn sockets_get_their_permissions_and_stale_ones_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let perms = SocketPerms {
            mode: 0o660,
            owner: None,
            group: Some(group_id("0").unwrap()),
        };
        let l = bind(&p, &perms).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o660);
        assert_eq!(m.gid(), 0);
        let e = bind(&p, &perms).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(l);
        // A stale socket file (its server gone) is replaced.
        let l = bind(&p, &SocketPerms::owner_only()).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        drop(l);
        assert_eq!(user_id("root").unwrap(), 0);
        assert!(user_id("no-such-user-vmreplica").is_err());
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("999").is_err());
    }
}
