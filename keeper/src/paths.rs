//! Where the keeper's socket lives, and the checks its directory must pass.
//! Never follows a symlink for the directory, never accepts a directory others can enter.

use crate::KeeperError;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The socket path: `DEVMEM_KEEPER_SOCKET` if set; else `$XDG_RUNTIME_DIR/devmem/keeper.sock`
/// when XDG_RUNTIME_DIR is set and usable; else `/dev/shm/devmem-<uid>/keeper.sock`.
pub fn socket_path() -> Result<PathBuf, KeeperError> {
    if let Some(p) = std::env::var_os("DEVMEM_KEEPER_SOCKET") {
        if p.is_empty() {
            return Err(KeeperError::Invalid("DEVMEM_KEEPER_SOCKET is empty".into()));
        }
        return Ok(PathBuf::from(p));
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        let x = PathBuf::from(x);
        if x.is_absolute() && check_dir(&x).is_ok() {
            return Ok(x.join("devmem").join("keeper.sock"));
        }
    }
    Ok(PathBuf::from(format!(
        "/dev/shm/devmem-{}/keeper.sock",
        uid()
    )))
}

/// This process's real uid.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn cpath(p: &Path) -> Result<CString, KeeperError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| KeeperError::Invalid(format!("path {} contains NUL", p.display())))
}

/// Checks that `dir` is a real directory (not a symlink), owned by this uid, mode 0700 or
/// narrower.
pub fn check_dir(dir: &Path) -> Result<(), KeeperError> {
    let c = cpath(dir)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: c is NUL-terminated; st is a valid out-pointer.
    if unsafe { libc::lstat(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(KeeperError::last_os(&format!("lstat({})", dir.display())));
    }
    // SAFETY: lstat succeeded and filled st.
    let st = unsafe { st.assume_init() };
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Err(KeeperError::Refused(format!(
            "socket directory {} is a symlink",
            dir.display()
        )));
    }
    if kind != libc::S_IFDIR {
        return Err(KeeperError::Refused(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if st.st_uid != uid() {
        return Err(KeeperError::Refused(format!(
            "socket directory {} is owned by uid {}, not {}",
            dir.display(),
            st.st_uid,
            uid()
        )));
    }
    if st.st_mode & 0o077 != 0 {
        return Err(KeeperError::Refused(format!(
            "socket directory {} has mode {:o}; it must be 0700",
            dir.display(),
            st.st_mode & 0o777
        )));
    }
    Ok(())
}

/// The socket's directory, created 0700 when absent (its parent must exist), then checked.
pub fn ensure_dir(socket: &Path) -> Result<PathBuf, KeeperError> {
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let c = cpath(&dir)?;
    // SAFETY: c is NUL-terminated.
    if unsafe { libc::mkdir(c.as_ptr(), 0o700) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(KeeperError::Io(format!("mkdir({}): {e}", dir.display())));
        }
    }
    check_dir(&dir)?;
    Ok(dir)
}
