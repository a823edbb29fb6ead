//! Status codes, the error type every layer returns, and the thread-local "last error" that the
//! C boundary exposes.
//!
//! Status values are part of the ABI: they are never renumbered or reused. A retired value stays
//! here as a comment.

use std::cell::RefCell;
use std::ffi::CStr;
use std::fmt;

/// Result of every fallible devmem function.
///
/// `DEVMEM_STATUS_SUCCESS` is 0; every other value is an error whose details are in
/// `devmem_last_error_message` on the calling thread.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::FromRepr, strum::IntoStaticStr)]
#[strum(
    serialize_all = "SCREAMING_SNAKE_CASE",
    prefix = "DEVMEM_STATUS_",
    suffix = "\0"
)]
pub enum devmem_status {
    /// The call succeeded.
    Success = 0,
    /// An argument is out of range (size 0, negative, overflowing, misaligned, ...).
    InvalidArgument = 1,
    /// A required pointer argument was NULL.
    NullPointer = 2,
    /// The device has no memory left for this request (driver out-of-memory).
    OutOfMemory = 3,
    /// The driver library could not be opened.
    DriverNotFound = 4,
    /// The driver returned an error, or lacks a symbol devmem needs.
    Driver = 5,
    /// The pointer is not an allocation devmem knows (never allocated, or already freed).
    UnknownPointer = 6,
    /// The device index is out of range.
    InvalidDevice = 7,
    /// A tag is NULL, not UTF-8, empty or longer than `DEVMEM_MAX_TAG_LEN` bytes.
    InvalidTag = 8,
    /// The call is not valid in the current state.
    InvalidState = 9,
    /// Host memory for backups could not be allocated.
    HostOutOfMemory = 10,
    /// devmem caught an internal panic; the process is intact but the call did nothing useful.
    Panic = 11,
    /// An output buffer is too small.
    BufferTooSmall = 12,
    /// The operation is not supported by this driver or device.
    Unsupported = 13,
    /// A shared host-store region was refused (another owner, a wrong mode, a symbolic link,
    /// a corrupt header, another layout, a rank in use, a creator that never finished), or
    /// what it stores does not match the allocations asking for it.
    Region = 14,
}

impl devmem_status {
    /// A stable, human-readable name for the status, as a static C string
    /// (`DEVMEM_STATUS_OUT_OF_MEMORY`): the C enumerator's own name.
    pub fn name(self) -> &'static CStr {
        let with_nul: &'static str = self.into();
        CStr::from_bytes_with_nul(with_nul.as_bytes()).unwrap_or(c"DEVMEM_STATUS_UNKNOWN")
    }

    /// The name as `&str`.
    pub fn as_str(self) -> &'static str {
        let with_nul: &'static str = self.into();
        with_nul.trim_end_matches('\0')
    }

    /// Maps a raw integer back to a status, if it is one.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Self::from_repr(raw)
    }
}

/// The error every internal layer returns: a status and a message naming what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    /// The status the C boundary returns for this error.
    pub status: devmem_status,
    /// What happened: the driver call and error name, the pointer, the tag.
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.as_str(), self.message)
    }
}

impl Error {
    /// Builds an error from a status and a message.
    pub fn new(status: devmem_status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// Prefixes the message with context (which operation, which pointer).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// Shorthand for results in this crate.
pub type Result<T> = std::result::Result<T, Error>;

macro_rules! bail {
    ($status:ident, $($fmt:tt)+) => {
        return Err($crate::error::Error::new(
            $crate::error::devmem_status::$status,
            format!($($fmt)+),
        ))
    };
}
pub(crate) use bail;

thread_local! {
    static LAST_ERROR: RefCell<Option<Error>> = const { RefCell::new(None) };
}

// The thread-local slot is reached with `try_with`: during thread or process exit (an atexit
// handler, a static destructor) it may already be destroyed, and devmem must then go on
// without a message rather than panic.

/// Records `err` as the calling thread's last error.
pub fn set_last_error(err: &Error) {
    log::debug!("devmem error: {err}");
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = Some(err.clone());
        }
    });
}

/// Forgets the calling thread's last error.
pub fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = None;
        }
    });
}

/// The calling thread's last error, if the last fallible call failed.
pub fn last_error() -> Option<Error> {
    LAST_ERROR
        .try_with(|slot| slot.try_borrow().ok().and_then(|e| e.clone()))
        .ok()
        .flatten()
}
