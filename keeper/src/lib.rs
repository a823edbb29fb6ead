//! devmem-keeper: a small process that holds exported GPU memory file descriptors (VMM
//! allocations exported as POSIX fds) for client processes, so the memory outlives a client's
//! exit and a restarted client maps it again without a copy.
//!
//! The keeper holds fds only: it never loads a driver library, maps memory or creates a GPU
//! context. It must never die from a client's behaviour, and releases memory only when told.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod client;
pub mod paths;
pub mod protocol;
pub mod server;

pub use client::Client;

use serde::{Deserialize, Serialize};

/// What a set of kept entries is filed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Key {
    pub instance: String,
    pub rank: u32,
    pub world: u32,
    pub tag: String,
}

/// One kept allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The allocation's bytes (sum of piece sizes).
    pub size: u64,
    /// Size of each physical piece; one file descriptor per piece travels with the entry.
    pub pieces: Vec<u64>,
    /// Named ranges (name, offset, len) inside the allocation: what a re-attach matches on.
    pub names: Vec<(String, u64, u64)>,
    /// Device ordinal the memory lives on.
    pub device: i32,
    /// Opaque label of the device/driver (e.g. "cuda:0 <uuid>"), checked by the client,
    /// never interpreted by the keeper.
    pub device_label: String,
    /// Opaque client metadata (e.g. checksums), at most 64 KiB; keeper stores and returns it.
    pub meta: String,
}

/// Lease mode of an attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Exclusive among live connections' ReadWrite leases.
    ReadWrite,
    /// Shared; allowed while a writer holds ReadWrite.
    ReadOnly,
}

/// Every failure the keeper or its client reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum KeeperError {
    /// No keeper answers at the socket (not running, stale socket file).
    #[error("keeper not running: {0}")]
    NotRunning(String),
    /// The socket directory or peer fails the ownership/permission checks.
    #[error("keeper refused: {0}")]
    Refused(String),
    /// The keeper does not hold the key.
    #[error("keeper does not hold: {0}")]
    NotHeld(String),
    /// Another live client holds a conflicting lease (message says which pid).
    #[error("keeper busy: {0}")]
    Busy(String),
    /// Keeping would pass the keeper's cap (bytes or descriptors).
    #[error("keeper full: {0}")]
    Full(String),
    /// The request is malformed (bad key, piece count != fd count, sizes overflow...).
    #[error("invalid keeper request: {0}")]
    Invalid(String),
    /// The connection broke or an I/O call failed (message names the call and errno).
    #[error("keeper I/O error: {0}")]
    Io(String),
}

impl KeeperError {
    /// `Io` naming the failed call and the current errno.
    pub(crate) fn last_os(call: &str) -> KeeperError {
        KeeperError::Io(format!("{call}: {}", std::io::Error::last_os_error()))
    }
}

/// What the keeper reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub uid: u32,
    pub socket: String,
    pub bytes_held: u64,
    pub bytes_cap: u64,
    pub fds_held: u64,
    pub fds_cap: u64,
    pub keys: Vec<KeyStatus>,
}

/// One held key in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyStatus {
    pub key: Key,
    pub entries: u64,
    pub bytes: u64,
    pub writer_pid: Option<u32>,
    pub reader_pids: Vec<u32>,
}

/// Longest instance or tag name accepted.
pub const MAX_NAME: usize = 256;
/// Largest `Entry::meta` accepted.
pub const MAX_META: usize = 64 * 1024;
/// Most named ranges per entry.
pub const MAX_NAMES: usize = 4096;

impl Key {
    /// Checks the key's fields: names non-empty, bounded, no NUL; `rank < world`.
    pub fn validate(&self) -> Result<(), KeeperError> {
        if self.instance.is_empty() || self.instance.len() > MAX_NAME {
            return Err(KeeperError::Invalid(format!(
                "key instance must be 1..={MAX_NAME} bytes, got {}",
                self.instance.len()
            )));
        }
        if self.tag.len() > MAX_NAME {
            return Err(KeeperError::Invalid(format!(
                "key tag longer than {MAX_NAME} bytes"
            )));
        }
        if self.instance.contains('\0') || self.tag.contains('\0') {
            return Err(KeeperError::Invalid("key names contain NUL".into()));
        }
        if self.world == 0 || self.rank >= self.world {
            return Err(KeeperError::Invalid(format!(
                "key rank {} must be below world {} (world >= 1)",
                self.rank, self.world
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}/{}]:{}",
            self.instance, self.rank, self.world, self.tag
        )
    }
}

impl Entry {
    /// Checks sizes (pieces non-empty, positive, summing to `size` without overflow), names
    /// inside the allocation and the metadata bound.
    pub fn validate(&self) -> Result<(), KeeperError> {
        if self.pieces.is_empty() {
            return Err(KeeperError::Invalid("entry has no pieces".into()));
        }
        let mut sum: u64 = 0;
        for &p in &self.pieces {
            if p == 0 {
                return Err(KeeperError::Invalid("entry has a zero-sized piece".into()));
            }
            sum = sum
                .checked_add(p)
                .ok_or_else(|| KeeperError::Invalid("entry piece sizes overflow".into()))?;
        }
        if sum != self.size {
            return Err(KeeperError::Invalid(format!(
                "entry size {} is not the sum of its pieces {sum}",
                self.size
            )));
        }
        if self.names.len() > MAX_NAMES {
            return Err(KeeperError::Invalid(format!(
                "entry has more than {MAX_NAMES} names"
            )));
        }
        for (name, off, len) in &self.names {
            if name.len() > MAX_NAME {
                return Err(KeeperError::Invalid(format!(
                    "range name longer than {MAX_NAME}"
                )));
            }
            match off.checked_add(*len) {
                Some(end) if end <= self.size => {}
                _ => {
                    return Err(KeeperError::Invalid(format!(
                        "range {name:?} ({off}, {len}) lies outside the {} bytes",
                        self.size
                    )))
                }
            }
        }
        if self.meta.len() > MAX_META {
            return Err(KeeperError::Invalid(format!(
                "entry meta over {MAX_META} bytes"
            )));
        }
        if self.device_label.len() > MAX_NAME {
            return Err(KeeperError::Invalid(format!(
                "device label over {MAX_NAME} bytes"
            )));
        }
        Ok(())
    }
}
