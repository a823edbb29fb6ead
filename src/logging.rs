//! devmem's own log output, to standard error, filtered by `DEVMEM_LOG` (`error`, `warn`,
//! `info`, `debug`, `trace`, or an env_logger list such as `devmem=debug`). When `DEVMEM_LOG`
//! is unset, `RUST_LOG` is used, and when both are unset the level is `warn`. When both are
//! set, `DEVMEM_LOG` wins and one line on standard error says so. Installed once, and only
//! when the host process has not installed a `log` logger of its own.

use std::ffi::OsString;
use std::sync::Once;

/// Environment variable that sets devmem's log level.
pub const LOG_ENV: &str = "DEVMEM_LOG";
/// The Rust ecosystem's log filter, used when `DEVMEM_LOG` is unset.
const RUST_LOG_ENV: &str = "RUST_LOG";
/// The level when neither variable gives one.
const DEFAULT_FILTER: &str = "warn";

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Whether `value` is a level (or an env_logger filter whose every directive ends in one, such
/// as `devmem=debug`).
fn is_filter(value: &str) -> bool {
    !value.trim().is_empty()
        && value.split(',').all(|directive| {
            let level = directive.rsplit('=').next().unwrap_or("").trim();
            LEVELS.contains(&level.to_ascii_lowercase().as_str())
        })
}

/// Reads an environment variable, warning (through the log) when its value cannot be used:
/// `parse` returns `None` for an invalid value, which then counts as unset, and a value that is
/// not UTF-8 is invalid. `accepted` says what would have been accepted.
pub(crate) fn env_or_warn<T>(
    name: &str,
    accepted: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    let value = match crate::env::read(name)? {
        Ok(value) => value,
        Err(raw) => {
            init();
            log::warn!(
                "devmem: ignoring {name}={raw:?}: not {accepted} (not UTF-8 text); using the default"
            );
            return None;
        }
    };
    if value.trim().is_empty() {
        return None;
    }
    let parsed = parse(value.trim());
    if parsed.is_none() {
        init();
        log::warn!("devmem: ignoring {name}={value:?}: not {accepted}; using the default");
    }
    parsed
}

/// The log filter from the values of `DEVMEM_LOG` and `RUST_LOG` (`None`: unset; `Err`: not
/// UTF-8), and the lines to print on standard error about the choice: an invalid `DEVMEM_LOG`,
/// or both variables set.
fn choose_filter(
    devmem_log: Option<Result<String, OsString>>,
    rust_log: Option<Result<String, OsString>>,
) -> (String, Vec<String>) {
    // RUST_LOG is the ecosystem's variable, not devmem's: a value that is not text counts as
    // unset, and env_logger reports a malformed one itself.
    let rust_log = rust_log
        .and_then(Result::ok)
        .filter(|v| !v.trim().is_empty());
    let fallback = || match &rust_log {
        Some(r) => (r.clone(), format!("{RUST_LOG_ENV}={r:?}")),
        None => (DEFAULT_FILTER.to_string(), DEFAULT_FILTER.to_string()),
    };
    let accepted = format!("one of {} (or a module=level list)", LEVELS.join(", "));
    match devmem_log {
        None => (fallback().0, Vec::new()),
        Some(Ok(d)) if d.trim().is_empty() => (fallback().0, Vec::new()),
        Some(Ok(d)) if is_filter(&d) => {
            let notes = rust_log
                .iter()
                .map(|r| {
                    format!(
                        "devmem: {LOG_ENV}={d:?} and {RUST_LOG_ENV}={r:?} are both set; devmem \
                         logs at {LOG_ENV}={d:?}"
                    )
                })
                .collect();
            (d, notes)
        }
        Some(bad) => {
            let shown = match &bad {
                Ok(d) => format!("{d:?}"),
                Err(raw) => format!("{raw:?} (not UTF-8 text)"),
            };
            let (filter, used) = fallback();
            let note = format!("devmem: ignoring {LOG_ENV}={shown}: not {accepted}; using {used}");
            (filter, vec![note])
        }
    }
}

/// Installs the logger on first use; later calls do nothing. The filter is `DEVMEM_LOG`, else
/// `RUST_LOG`, else `warn`; an invalid `DEVMEM_LOG`, or both variables set, is reported on
/// standard error.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let (filter, notes) =
            choose_filter(crate::env::read(LOG_ENV), crate::env::read(RUST_LOG_ENV));
        for note in notes {
            eprintln!("{note}");
        }
        // A host that already set a logger keeps it; devmem's records go there instead.
        let _ = env_logger::Builder::new()
            .parse_filters(&filter)
            .format_timestamp_millis()
            .try_init();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &str) -> Option<Result<String, OsString>> {
        Some(Ok(v.to_string()))
    }

    #[test]
    fn devmem_log_wins_over_rust_log_and_says_so() {
        let (filter, notes) = choose_filter(text("warn"), text("debug"));
        assert_eq!(filter, "warn");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("both set"), "{notes:?}");
    }

    #[test]
    fn rust_log_alone_is_used_and_neither_means_warn() {
        assert_eq!(choose_filter(None, text("info")), ("info".into(), vec![]));
        assert_eq!(choose_filter(None, None), ("warn".into(), vec![]));
        assert_eq!(choose_filter(text(" "), None), ("warn".into(), vec![]));
    }

    #[test]
    fn an_invalid_devmem_log_is_reported_with_what_is_used_instead() {
        let (filter, notes) = choose_filter(text("bogus"), text("info"));
        assert_eq!(filter, "info");
        assert!(notes[0].ends_with("using RUST_LOG=\"info\""), "{notes:?}");
        use std::os::unix::ffi::OsStrExt;
        let raw = std::ffi::OsStr::from_bytes(b"\xff").to_os_string();
        let (filter, notes) = choose_filter(Some(Err(raw)), None);
        assert_eq!(filter, "warn");
        assert!(
            notes[0].contains("DEVMEM_LOG=\"\\xFF\" (not UTF-8 text)"),
            "{notes:?}"
        );
    }
}
