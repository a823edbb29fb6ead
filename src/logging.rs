//! devmem's own log output, to standard error, filtered by `DEVMEM_LOG` (`error`, `warn`,
//! `info`, `debug`, `trace`; unset means `warn`). Installed once, and only when the host
//! process has not installed a `log` logger of its own.

use std::sync::Once;

/// Environment variable that sets devmem's log level.
pub const LOG_ENV: &str = "DEVMEM_LOG";

/// Installs the logger on first use; later calls do nothing.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let env = env_logger::Env::new().filter_or(LOG_ENV, "warn");
        // A host that already set a logger keeps it; devmem's records go there instead.
        let _ = env_logger::Builder::from_env(env)
            .format_timestamp_millis()
            .try_init();
    });
}
