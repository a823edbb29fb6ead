//! Reading devmem's environment variables. A variable that is set is never mistaken for one
//! that is not: a value that is not UTF-8 text is an error naming the variable (or, where a
//! setting only warns, a warning), and paths are passed on as the bytes the environment holds.
//! Nothing here decides what a valid value is; each setting's reader does.

use std::ffi::OsString;

use crate::error::{bail, Result};

/// The environment variable `name`: `None` when it is unset, else its text, or its raw value
/// when that is not UTF-8.
pub(crate) fn read(name: &str) -> Option<std::result::Result<String, OsString>> {
    match std::env::var(name) {
        Ok(value) => Some(Ok(value)),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(value)) => Some(Err(value)),
    }
}

/// The text of the environment variable `name`: `None` when it is unset, an `INVALID_ARGUMENT`
/// error naming the variable when its value is not UTF-8.
pub(crate) fn text(name: &str) -> Result<Option<String>> {
    match read(name) {
        None => Ok(None),
        Some(Ok(value)) => Ok(Some(value)),
        Some(Err(value)) => {
            bail!(
                InvalidArgument,
                "{name}={value:?} is not valid: not UTF-8 text"
            )
        }
    }
}

/// The value of the environment variable `name` as a path (any bytes but NUL, as Linux allows):
/// `None` when it is unset or empty.
pub(crate) fn path(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|value| !value.is_empty())
}
