//! Settings read from the environment are parsed strictly: a value devmem cannot use is either
//! an error (`DEVMEM_BACKEND`, `DEVMEM_HOST_LIMIT`: tests in bad_input.rs, level_zero.rs and
//! reliability.rs) or a warning naming the variable and what it accepts, with the default used
//! (the host-store settings here, `DEVMEM_LOG`, and the emulator's settings).

mod common;

use std::sync::Mutex;

use common::*;
use devmem::{devmem_host_policy, ffi};

struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(format!("{} {}", record.level(), record.args()));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn invalid_host_store_settings_are_warned_about_and_ignored() {
    setup(&[
        ("DEVMEM_HOST_POLICY", "bogus"),
        ("DEVMEM_HOST_CHUNK_MB", "lots"),
        ("DEVMEM_HOST_THREADS", "0"),
        ("DEVMEM_COPY_BATCH_MB", "-4"),
    ]);
    log::set_logger(&CAPTURE).expect("the first logger");
    log::set_max_level(log::LevelFilter::Trace);
    let p = alloc(4 * MIB, "weights");
    fill(p, 4 * MIB, 5);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 4 * MIB, 5), 0);
    let mut policy = devmem_host_policy::Release;
    ok(ffi::devmem_get_host_policy(&mut policy));
    assert_eq!(policy, devmem_host_policy::Keep, "the default");
    let lines = CAPTURE.0.lock().expect("lines").clone();
    for needle in [
        "WARN devmem: ignoring DEVMEM_HOST_POLICY=\"bogus\": not keep or release",
        "WARN devmem: ignoring DEVMEM_HOST_CHUNK_MB=\"lots\": not a whole number from 2 to",
        "WARN devmem: ignoring DEVMEM_HOST_THREADS=\"0\": not a whole number from 1 to",
        "WARN devmem: ignoring DEVMEM_COPY_BATCH_MB=\"-4\": not a whole number of MiB",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(needle)),
            "{needle:?} not in {lines:#?}"
        );
    }
    free_all(&[p]);
    assert_no_device_leaks();
}

/// Run by `invalid_log_level_and_emulator_settings_are_reported` in a child process with bad
/// values (the logger and the emulator read them once per process).
#[test]
#[ignore = "run by invalid_log_level_and_emulator_settings_are_reported"]
fn config_child() {
    assert_eq!(std::env::var("DEVMEM_CONFIG_CHILD").as_deref(), Ok("1"));
    setup(&[("DEVMEM_LOG", "bogus"), ("DEVMEM_EMU_CAPACITY", "lots")]);
    let p = alloc(2 * MIB, "x");
    free_all(&[p]);
}

#[test]
fn invalid_log_level_and_emulator_settings_are_reported() {
    let printed = run_child_test(
        &[],
        "config_child",
        &[("DEVMEM_CONFIG_CHILD", "1")],
        std::time::Duration::from_secs(120),
    );
    assert!(
        printed.contains("devmem: ignoring DEVMEM_LOG=\"bogus\": not one of off, error, warn"),
        "{printed}"
    );
    assert!(
        printed.contains("cuemu: ignoring DEVMEM_EMU_CAPACITY=\"lots\": not a size"),
        "{printed}"
    );
}
