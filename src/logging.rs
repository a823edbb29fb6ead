//! devmem's own log output, to standard error, filtered by `DEVMEM_LOG` (`error`, `warn`,
//! `info`, `debug`, `trace`; unset means `warn`). Installed once, and only when the host
//! process has not installed a `log` logger of its own.

use std::sync::Once;

/// Environment variable that sets devmem's log level.
pub const LOG_ENV: &str = "DEVMEM_LOG";

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
/// `parse` returns `None` for an invalid value, which then counts as unset. `accepted` says
/// what would have been accepted.
pub(crate) fn env_or_warn<T>(
    name: &str,
    accepted: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    let value = std::env::var(name).ok()?;
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

/// Installs the logger on first use; later calls do nothing. A `DEVMEM_LOG` that is not a
/// level is reported on standard error and replaced by `warn`.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut filter = std::env::var(LOG_ENV).unwrap_or_default();
        if !filter.is_empty() && !is_filter(&filter) {
            eprintln!(
                "devmem: ignoring {LOG_ENV}={filter:?}: not one of {} (or a module=level list); using warn",
                LEVELS.join(", ")
            );
            filter = "warn".into();
        }
        if filter.is_empty() {
            filter = "warn".into();
        }
        let env = env_logger::Env::new().default_filter_or(filter);
        // A host that already set a logger keeps it; devmem's records go there instead.
        let _ = env_logger::Builder::from_env(env)
            .format_timestamp_millis()
            .try_init();
    });
}
