//! Settings read from the environment are parsed strictly: a value devmem cannot use is either
//! an error (`DEVMEM_BACKEND`, `DEVMEM_HOST_LIMIT`: tests in bad_input.rs, level_zero.rs and
//! reliability.rs) or a warning naming the variable and what it accepts, with the default used
//! (the host-store settings here, `DEVMEM_LOG`, and the emulator's settings). A value that is
//! not UTF-8 is never taken for an unset variable (tests here), except that a driver library's
//! path may be any bytes, and `DEVMEM_LOG` wins over `RUST_LOG`, saying so.

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use common::*;
use devmem::{devmem_host_policy, devmem_status, ffi};

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
    cycle_and_expect_warnings(&[
        "WARN devmem: ignoring DEVMEM_HOST_POLICY=\"bogus\": not keep or release",
        "WARN devmem: ignoring DEVMEM_HOST_CHUNK_MB=\"lots\": not a whole number from 2 to",
        "WARN devmem: ignoring DEVMEM_HOST_THREADS=\"0\": not a whole number from 1 to",
        "WARN devmem: ignoring DEVMEM_COPY_BATCH_MB=\"-4\": not a whole number of MiB",
    ]);
}

/// With the capture logger installed: sleeps and wakes an allocation (the default policy,
/// keep, in force), then asserts that a log line starts with each of `needles`.
fn cycle_and_expect_warnings(needles: &[&str]) {
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
    for needle in needles {
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

/// A value that is not UTF-8 text: the byte 0xff after `prefix`.
fn not_utf8(prefix: &str) -> OsString {
    let mut bytes = prefix.as_bytes().to_vec();
    bytes.push(0xff);
    OsStr::from_bytes(&bytes).to_os_string()
}

#[test]
fn a_host_limit_that_is_not_utf8_is_an_error_not_no_cap() {
    setup(&[]);
    // SAFETY (of set_var): single-threaded, before devmem reads it.
    std::env::set_var("DEVMEM_HOST_LIMIT", not_utf8("64M"));
    let mut limit = 0u64;
    expect_err(
        ffi::devmem_get_host_limit(&mut limit),
        devmem_status::InvalidArgument,
        "DEVMEM_HOST_LIMIT=\"64M\\xFF\" is not valid: not UTF-8 text",
    );
    let p = alloc(2 * MIB, "weights");
    expect_err(
        sleep(&["weights"]),
        devmem_status::InvalidArgument,
        "DEVMEM_HOST_LIMIT",
    );
    assert_eq!(state(p), devmem::devmem_state::Mapped);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// Each backend setting that is not UTF-8 fails the backend's load naming the variable (a
/// failed load is not cached, so one process tries them in turn); once all are gone the load
/// succeeds.
#[test]
fn backend_settings_that_are_not_utf8_fail_the_load_naming_the_variable() {
    setup(&[]);
    for name in [
        "DEVMEM_BACKEND",
        "DEVMEM_CHUNK_SIZE",
        "DEVMEM_RERESERVE",
        "DEVMEM_ZERO_ON_WAKE",
        "DEVMEM_WAKE_CHUNK_MB",
    ] {
        let before = std::env::var_os(name);
        // SAFETY (of set_var/remove_var): single-threaded test process.
        std::env::set_var(name, not_utf8("1"));
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        expect_err(
            ffi::devmem_malloc(2 * MIB, 0, &mut p),
            devmem_status::InvalidArgument,
            &format!("{name}=\"1\\xFF\" is not valid: not UTF-8 text"),
        );
        match before {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }
    let p = alloc(2 * MIB, "weights");
    free_all(&[p]);
    assert_no_device_leaks();
}

/// A driver library path that is not UTF-8 is a valid Linux path: it is opened, not ignored
/// (ignoring it would fall back to the system driver, absent here).
#[test]
fn a_library_path_that_is_not_utf8_is_opened() {
    setup(&[]);
    let dir = std::env::temp_dir().join(format!("devmem-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut name = b"emulator-".to_vec();
    name.push(0xff);
    name.extend_from_slice(b".so");
    let link = dir.join(OsStr::from_bytes(&name));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(emulator_path(), &link).expect("symlink");
    // SAFETY (of set_var): single-threaded, before devmem loads the driver.
    std::env::set_var(tr("DEVMEM_CUDA_LIBRARY"), &link);
    let p = alloc(2 * MIB, "weights");
    assert!(
        emu().counters().handles >= 1,
        "the emulator holds the memory"
    );
    free_all(&[p]);
    assert_no_device_leaks();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Host-store settings only warn when invalid; one that is not UTF-8 warns the same way
/// instead of counting as unset.
#[test]
fn host_store_settings_that_are_not_utf8_are_warned_about() {
    setup(&[]);
    // SAFETY (of set_var): single-threaded, before devmem reads them.
    std::env::set_var("DEVMEM_HOST_POLICY", not_utf8("keep"));
    std::env::set_var("DEVMEM_HOST_THREADS", not_utf8("2"));
    if hip() {
        std::env::set_var("VLLM_ROCM_SLEEP_MEM_CHUNK_SIZE", not_utf8("4"));
    }
    let mut needles = vec![
        "WARN devmem: ignoring DEVMEM_HOST_POLICY=\"keep\\xFF\": not keep or release (not UTF-8",
        "WARN devmem: ignoring DEVMEM_HOST_THREADS=\"2\\xFF\": not a whole number from 1 to",
    ];
    if hip() {
        needles
            .push("WARN devmem: ignoring VLLM_ROCM_SLEEP_MEM_CHUNK_SIZE=\"4\\xFF\" is not valid");
    }
    cycle_and_expect_warnings(&needles);
}

/// Run by the `DEVMEM_LOG` tests in a child process (the logger reads its variables once per
/// process): allocates and frees, which logs at debug level. `DEVMEM_TEST_LOG_NOT_UTF8=1`
/// sets `DEVMEM_LOG` to a value that is not UTF-8 first.
#[test]
#[ignore = "run by the DEVMEM_LOG tests"]
fn log_child() {
    setup(&[]);
    if std::env::var("DEVMEM_TEST_LOG_NOT_UTF8").as_deref() == Ok("1") {
        // SAFETY (of set_var): single-threaded, before devmem's logger is installed.
        std::env::set_var("DEVMEM_LOG", not_utf8("debug"));
    }
    let p = alloc(2 * MIB, "x");
    free_all(&[p]);
}

#[test]
fn devmem_log_wins_over_rust_log_and_says_so() {
    let printed = run_child_test(
        &[],
        "log_child",
        &[("DEVMEM_LOG", "warn"), ("RUST_LOG", "debug")],
        std::time::Duration::from_secs(120),
    );
    assert!(
        printed.contains(
            "devmem: DEVMEM_LOG=\"warn\" and RUST_LOG=\"debug\" are both set; devmem logs at \
             DEVMEM_LOG=\"warn\""
        ),
        "{printed}"
    );
    assert!(
        !printed.contains("devmem: allocated"),
        "debug records despite DEVMEM_LOG=warn: {printed}"
    );
    // RUST_LOG alone still works, without a note.
    let printed = run_child_test(
        &[],
        "log_child",
        &[("DEVMEM_LOG", ""), ("RUST_LOG", "debug")],
        std::time::Duration::from_secs(120),
    );
    assert!(printed.contains("devmem: allocated"), "{printed}");
    assert!(!printed.contains("both set"), "{printed}");
}

#[test]
fn a_log_level_that_is_not_utf8_is_reported() {
    let printed = run_child_test(
        &[],
        "log_child",
        &[("DEVMEM_TEST_LOG_NOT_UTF8", "1")],
        std::time::Duration::from_secs(120),
    );
    assert!(
        printed.contains(
            "devmem: ignoring DEVMEM_LOG=\"debug\\xFF\" (not UTF-8 text): not one of off, error"
        ),
        "{printed}"
    );
}
