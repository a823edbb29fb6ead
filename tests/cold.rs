//! The cold paths against the driver emulator: the host store growing ahead of need (no call
//! from the user), and what device memory stays used after a sleep (`devmem_get_residual`).
//! Run with cargo nextest (one process per test).

mod common;

use std::time::{Duration, Instant};

use common::*;
use devmem::{devmem_status, ffi};

/// Polls the host store's size until `done` holds or `millis` pass; returns the last size.
fn held_when(millis: u64, done: impl Fn(usize) -> bool) -> usize {
    let until = Instant::now() + Duration::from_millis(millis);
    loop {
        let held = stats(None).host_store_bytes as usize;
        if done(held) || Instant::now() > until {
            return held;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn grow_ahead() -> i32 {
    let mut on = -1;
    ok(ffi::devmem_get_host_grow_ahead(&mut on));
    on
}

fn residual(device: i32) -> devmem::devmem_residual {
    let mut out = devmem::devmem_residual::default();
    ok(ffi::devmem_get_residual(device, &mut out));
    out
}

#[test]
fn grow_ahead_starts_after_malloc_without_any_reserve_call() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    assert_eq!(grow_ahead(), 1);
    let p = alloc(48 * MIB, "weights");
    fill(p, 48 * MIB, 3);
    let held = held_when(10_000, |h| h >= 48 * MIB);
    assert!(held >= 48 * MIB, "the store grew to {held} bytes only");
    // The first sleep registers nothing new: its memory was ready.
    let registered = emu().calls("cuMemHostRegister_v2");
    ok(sleep(&["weights"]));
    assert_eq!(emu().calls("cuMemHostRegister_v2"), registered);
    ok(wake(None));
    assert_eq!(mismatches(p, 48 * MIB, 3), 0);
    free_all(&[p]);
}

#[test]
fn small_allocations_do_not_wake_the_grower_each_time() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    // Below the 16 MiB step: no signal, no growth.
    let ptrs: Vec<u64> = (0..7).map(|_| alloc(2 * MIB, "kv")).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats(None).host_store_bytes, 0);
    assert_eq!(emu().calls("cuMemHostRegister_v2"), 0);
    free_all(&ptrs);
}

#[test]
fn malloc_never_waits_for_growing_ahead() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    devmem::core::slow_grow_ahead_for_tests(3_000);
    let first = alloc(32 * MIB, "weights");
    // The grower is now inside its first (slow) chunk.
    std::thread::sleep(Duration::from_millis(200));
    let mut ptrs = vec![first];
    let mut slowest = Duration::ZERO;
    for _ in 0..24 {
        let start = Instant::now();
        ptrs.push(alloc(2 * MIB, "weights"));
        slowest = slowest.max(start.elapsed());
    }
    assert_eq!(
        stats(None).host_store_bytes,
        0,
        "the slow chunk is still being faulted in"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "a malloc took {slowest:?} while the store grew"
    );
    // A sleep that comes meanwhile does not wait for the slow chunk either.
    let start = Instant::now();
    ok(sleep(&["weights"]));
    assert!(
        start.elapsed() < Duration::from_millis(2_000),
        "the sleep waited {:?} for the slow chunk",
        start.elapsed()
    );
    ok(wake(None));
    free_all(&ptrs);
}

#[test]
fn grow_ahead_stops_at_the_host_limit_and_the_sleep_reports_as_before() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
        ("DEVMEM_HOST_LIMIT", "16M"),
    ]);
    let p = alloc(48 * MIB, "weights");
    fill(p, 48 * MIB, 5);
    let held = held_when(1_000, |h| h > 16 * MIB);
    assert_eq!(held, 16 * MIB, "grown to the cap, not past it");
    expect_err(
        sleep(&["weights"]),
        devmem_status::HostOutOfMemory,
        "DEVMEM_HOST_LIMIT",
    );
    assert_eq!(mismatches(p, 48 * MIB, 5), 0);
    assert_eq!(stats(None).host_store_bytes, 16 * MIB as u64);
    free_all(&[p]);
}

#[test]
fn grow_ahead_off_from_the_environment_and_from_the_call() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "0"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    assert_eq!(grow_ahead(), 0);
    let p = alloc(32 * MIB, "weights");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats(None).host_store_bytes, 0);
    // Turning it on grows toward what is already allocated.
    ok(ffi::devmem_set_host_grow_ahead(1));
    assert_eq!(grow_ahead(), 1);
    let held = held_when(10_000, |h| h >= 32 * MIB);
    assert_eq!(held, 32 * MIB);
    ok(ffi::devmem_set_host_grow_ahead(0));
    let q = alloc(32 * MIB, "weights");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats(None).host_store_bytes, 32 * MIB as u64);
    free_all(&[p, q]);
}

#[test]
fn grow_ahead_bad_values_are_refused() {
    setup(&[("DEVMEM_HOST_GROW_AHEAD", "yes")]);
    // Like the other settings that only warn: the value is ignored, the default (on) used.
    assert_eq!(grow_ahead(), 1);
    expect_err(
        ffi::devmem_set_host_grow_ahead(2),
        devmem_status::InvalidArgument,
        "enabled is 2",
    );
    assert_eq!(grow_ahead(), 1);
    expect_err(
        ffi::devmem_get_host_grow_ahead(std::ptr::null_mut()),
        devmem_status::NullPointer,
        "out is NULL",
    );
}

#[test]
fn release_policy_does_not_grow_ahead_and_keep_gives_back_on_release() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
        ("DEVMEM_HOST_POLICY", "release"),
    ]);
    let p = alloc(32 * MIB, "weights");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats(None).host_store_bytes, 0, "release: nothing ahead");
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(stats(None).host_store_bytes, 0, "release: given back");
    // Under keep the store grows ahead; freeing everything and releasing gives it all back.
    ok(ffi::devmem_set_host_policy(0));
    let q = alloc(32 * MIB, "weights");
    let held = held_when(10_000, |h| h >= 64 * MIB);
    assert_eq!(held, 64 * MIB);
    free_all(&[p, q]);
    let mut freed = 0usize;
    ok(ffi::devmem_release_host_store(&mut freed));
    assert_eq!(freed, 64 * MIB);
    assert_eq!(stats(None).host_store_bytes, 0);
    assert_eq!(emu().counters().host_registered, 0);
}

#[test]
fn a_refused_grow_ahead_thread_does_not_break_malloc() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    devmem::threads::fail_spawns(0, usize::MAX);
    let p = alloc(32 * MIB, "weights");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats(None).host_store_bytes, 0);
    devmem::threads::fail_spawns(0, 0);
    // The next allocation tries again.
    let q = alloc(32 * MIB, "weights");
    let held = held_when(10_000, |h| h >= 64 * MIB);
    assert_eq!(held, 64 * MIB);
    fill(q, 32 * MIB, 9);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(q, 32 * MIB, 9), 0);
    free_all(&[p, q]);
}

#[test]
fn residual_is_zero_for_devmem_after_a_full_sleep() {
    setup(&[]);
    let before = residual(0);
    assert_eq!(before.devmem_mapped_bytes, 0);
    let a = alloc(16 * MIB, "weights");
    let b = alloc(8 * MIB, "kv");
    let awake = residual(0);
    assert_eq!(awake.devmem_mapped_bytes, 24 * MIB as u64);
    assert_eq!(awake.devmem_other_bytes, 0);
    assert!(awake.driver_used_bytes >= 24 * MIB as u64, "{awake:?}");
    assert_eq!(
        awake.other_used_bytes,
        awake.driver_used_bytes - awake.devmem_mapped_bytes
    );
    ok(sleep(&["weights"]));
    let asleep = residual(0);
    assert_eq!(asleep.devmem_mapped_bytes, 0, "{asleep:?}");
    assert_eq!(asleep.devmem_other_bytes, 0);
    assert_eq!(asleep.driver_used_bytes, asleep.other_used_bytes);
    assert!(asleep.total_bytes >= asleep.driver_used_bytes);
    ok(wake(None));
    free_all(&[a, b]);
}

#[test]
fn residual_counts_a_tag_still_awake() {
    setup(&[]);
    let a = alloc(16 * MIB, "weights");
    let b = alloc(8 * MIB, "kv");
    ok(ffi::devmem_offload([c"weights".as_ptr()].as_ptr(), 1));
    let r = residual(0);
    assert_eq!(r.devmem_mapped_bytes, 8 * MIB as u64, "{r:?}");
    ok(wake(None));
    free_all(&[a, b]);
}

#[test]
fn residual_bad_input_is_refused() {
    setup(&[]);
    let mut out = devmem::devmem_residual::default();
    expect_err(
        ffi::devmem_get_residual(99, &mut out),
        devmem_status::InvalidArgument,
        "device 99 does not exist",
    );
    expect_err(
        ffi::devmem_get_residual(-1, &mut out),
        devmem_status::InvalidArgument,
        "device -1 does not exist",
    );
    expect_err(
        ffi::devmem_get_residual(0, std::ptr::null_mut()),
        devmem_status::NullPointer,
        "out is NULL",
    );
}

// --- Durable reads (DEVMEM_DURABLE_READ) ----------------------------------------------------

const AREA: u64 = 96 * MIB as u64;
const SIZES: [usize; 3] = [40 * MIB, 34 * MIB, 2 * MIB];

fn open_region(name: &str, keep: bool) -> devmem_status {
    let cname = std::ffi::CString::new(name).expect("name");
    let options = ffi::devmem_shared_store_options {
        name: cname.as_ptr(),
        dir: std::ptr::null(),
        bytes_per_rank: AREA,
        rank: 0,
        world: 1,
        flags: if keep { ffi::DEVMEM_SHARED_KEEP } else { 0 },
        timeout_ms: 2000,
    };
    ffi::devmem_shared_store_open(&options)
}

fn restore(list: &[&str]) -> devmem_status {
    let (_owned, ptrs) = tags(list);
    ffi::devmem_restore_from_store_by_order(ptrs.as_ptr(), ptrs.len())
}

fn region_name() -> String {
    std::env::var("DEVMEM_TEST_REGION").expect("DEVMEM_TEST_REGION")
}

/// Sleeps three allocations into a kept region and exits without closing it.
#[test]
#[ignore = "run by the durable_read_ tests"]
fn durable_read_writer() {
    setup(&[]);
    ok(open_region(&region_name(), true));
    let ptrs: Vec<u64> = SIZES.iter().map(|s| alloc(*s, "weights")).collect();
    for (i, (p, s)) in ptrs.iter().zip(SIZES).enumerate() {
        fill(*p, s, 40 + i as u64);
    }
    ok(sleep(&["weights"]));
}

/// Restores them in a new process under the mode in `DEVMEM_DURABLE_READ`, checking the
/// bytes and the registrations the mode implies; with `DEVMEM_TEST_FAIL_PIN`, the second
/// registration fails and the restore must fail cleanly, the region kept for the next reader.
#[test]
#[ignore = "run by the durable_read_ tests"]
fn durable_read_reader() {
    setup(&[]);
    let mode = std::env::var("DEVMEM_DURABLE_READ").unwrap_or_default();
    let fail = std::env::var("DEVMEM_TEST_FAIL_PIN").is_ok();
    if fail {
        emu().inject("cuMemHostRegister_v2", 2, 999);
    }
    let before = emu().calls("cuMemHostRegister_v2");
    // Kept only for the next reader after a failure; the last reader removes the region.
    ok(open_region(&region_name(), fail));
    let ptrs: Vec<u64> = SIZES.iter().map(|s| alloc(*s, "weights")).collect();
    if fail {
        expect_err(
            restore(&["weights"]),
            devmem_status::Driver,
            "cuMemHostRegister",
        );
        // Nothing half-restored is reported as restored; the region stays for the next reader.
        free_all(&ptrs);
        return;
    }
    ok(restore(&["weights"]));
    for (i, (p, s)) in ptrs.iter().zip(SIZES).enumerate() {
        assert_eq!(
            mismatches(*p, s, 40 + i as u64),
            0,
            "allocation #{i} ({mode})"
        );
    }
    if !level_zero() {
        let registered = emu().calls("cuMemHostRegister_v2") - before;
        // The area is at least AREA (rounded up, plus the manifest's room).
        let (low, high) = match mode.as_str() {
            "pin" => (1, 1),
            "pin-fine" => (AREA.div_ceil(32 * MIB as u64), 8),
            "pageable" => (0, 0),
            other => panic!("unexpected mode {other:?}"),
        };
        assert!(
            (low..=high).contains(&registered),
            "{registered} registrations under {mode}"
        );
    }
    // A sleep and wake through the region work in the same mode.
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(ptrs[0], SIZES[0], 40), 0);
    free_all(&ptrs);
    ok(ffi::devmem_shared_store_close());
    assert_no_violations();
}

fn durable_read_round(label: &str, mode: &str) {
    setup(&[]);
    let name = format!("test-{}-{label}", std::process::id());
    let e = [("DEVMEM_TEST_REGION", name.as_str())];
    run_child_test(&[], "durable_read_writer", &e, Duration::from_secs(120));
    let e = [
        ("DEVMEM_TEST_REGION", name.as_str()),
        ("DEVMEM_DURABLE_READ", mode),
    ];
    run_child_test(&[], "durable_read_reader", &e, Duration::from_secs(120));
}

#[test]
fn durable_read_pin_restores_every_byte() {
    durable_read_round("dr-pin", "pin");
}

#[test]
fn durable_read_pin_fine_registers_32_mib_pieces() {
    durable_read_round("dr-fine", "pin-fine");
}

#[test]
fn durable_read_pageable_pins_nothing() {
    durable_read_round("dr-pageable", "pageable");
}

/// A registration failing half-way through a fine-grained restore fails the restore with the
/// driver's error and leaves the stored bytes intact: a pageable reader restores them after.
#[test]
fn durable_read_failure_midway_leaves_the_region_intact() {
    if level_zero() {
        return; // Level Zero pins nothing
    }
    setup(&[]);
    let name = format!("test-{}-dr-fail", std::process::id());
    let e = [("DEVMEM_TEST_REGION", name.as_str())];
    run_child_test(&[], "durable_read_writer", &e, Duration::from_secs(120));
    let failing = [
        ("DEVMEM_TEST_REGION", name.as_str()),
        ("DEVMEM_DURABLE_READ", "pin-fine"),
        ("DEVMEM_TEST_FAIL_PIN", "1"),
    ];
    run_child_test(
        &[],
        "durable_read_reader",
        &failing,
        Duration::from_secs(120),
    );
    let e = [
        ("DEVMEM_TEST_REGION", name.as_str()),
        ("DEVMEM_DURABLE_READ", "pageable"),
    ];
    run_child_test(&[], "durable_read_reader", &e, Duration::from_secs(120));
}

#[test]
fn durable_read_bad_value_is_a_clear_error() {
    setup(&[("DEVMEM_DURABLE_READ", "bounce")]);
    let name = format!("test-{}-dr-bad", std::process::id());
    expect_err(
        open_region(&name, false),
        devmem_status::InvalidArgument,
        "DEVMEM_DURABLE_READ=\"bounce\" is not valid: one of auto, pin, pin-fine, pageable",
    );
}

#[test]
fn grow_ahead_leaves_the_pool_alone_when_a_shared_store_is_named() {
    let name = format!("test-{}-ahead-shared", std::process::id());
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
        ("DEVMEM_SHARED_STORE", name.as_str()),
        ("DEVMEM_SHARED_BYTES", "64M"),
    ]);
    let p = alloc(32 * MIB, "weights");
    fill(p, 32 * MIB, 4);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stats(None).host_store_bytes,
        0,
        "backups will go to the region"
    );
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 32 * MIB, 4), 0);
    free_all(&[p]);
    ok(ffi::devmem_shared_store_close());
}

/// Review: `devmem_release_host_store` while the grower is faulting in a chunk ahead of need:
/// once every allocation is freed and the store released, no pinned memory may come back
/// (the chunk in flight used to be added after the release returned).
#[test]
fn release_host_store_during_grow_ahead_leaves_nothing_pinned() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    devmem::core::slow_grow_ahead_for_tests(600);
    let p = alloc(48 * MIB, "weights");
    // The grower is inside its first (slow) chunk.
    std::thread::sleep(Duration::from_millis(200));
    free_all(&[p]);
    let mut freed = 0usize;
    ok(ffi::devmem_release_host_store(&mut freed));
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        stats(None).host_store_bytes,
        0,
        "grown back after the release"
    );
    assert_eq!(emu().counters().host_registered, 0);
}

/// Review: the process exits while the grow-ahead thread is faulting a chunk in (slow) or held
/// inside the driver's pin call: no crash, no hang at exit.
#[test]
fn exit_while_growing_ahead_neither_crashes_nor_hangs() {
    for child in ["child_exits_while_faulting_in", "child_exits_while_pinning"] {
        run_child_test(&[], child, &[], Duration::from_secs(20));
    }
}

#[test]
#[ignore = "run by exit_while_growing_ahead_neither_crashes_nor_hangs"]
fn child_exits_while_faulting_in() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    devmem::core::slow_grow_ahead_for_tests(5_000);
    let _p = alloc(64 * MIB, "weights");
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
#[ignore = "run by exit_while_growing_ahead_neither_crashes_nor_hangs"]
fn child_exits_while_pinning() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
    ]);
    emu().hold(&tr("cuMemHostRegister_v2"));
    let _p = alloc(64 * MIB, "weights");
    assert!(emu().wait_held(5_000), "the grower reached the pin");
}

/// Review: a bad `DEVMEM_DURABLE_READ` refuses the open without leaving the region's file or
/// its lock behind: the same name opens at once with a good value, and closes cleanly.
#[test]
fn durable_read_bad_value_leaves_no_region_behind() {
    setup(&[("DEVMEM_DURABLE_READ", "bounce")]);
    let name = format!("test-{}-dr-bad2", std::process::id());
    expect_err(
        open_region(&name, true),
        devmem_status::InvalidArgument,
        "DEVMEM_DURABLE_READ",
    );
    std::env::set_var("DEVMEM_DURABLE_READ", "pageable");
    let start = Instant::now();
    ok(open_region(&name, false));
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    let p = alloc(2 * MIB, "weights");
    fill(p, 2 * MIB, 8);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 2 * MIB, 8), 0);
    free_all(&[p]);
    ok(ffi::devmem_shared_store_close());
}

/// Review: a shared store opened while the grower faults a chunk in: backups go to the
/// region from then on, so the chunk in flight is not added to the pool.
#[test]
fn opening_a_shared_store_while_growing_ahead_adds_nothing_to_the_pool() {
    setup(&[
        ("DEVMEM_HOST_GROW_AHEAD", "1"),
        ("DEVMEM_HOST_CHUNK_MB", "8"),
        ("DEVMEM_DURABLE_READ", "pageable"),
    ]);
    devmem::core::slow_grow_ahead_for_tests(600);
    let p = alloc(48 * MIB, "weights");
    std::thread::sleep(Duration::from_millis(200));
    let name = format!("test-{}-ahead-open", std::process::id());
    ok(open_region(&name, false));
    let region = stats(None).host_store_bytes;
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        stats(None).host_store_bytes,
        region,
        "the pool grew after the open"
    );
    if !level_zero() {
        assert_eq!(
            emu().counters().host_registered,
            0,
            "pageable region, nothing pinned"
        );
    }
    fill(p, 48 * MIB, 4);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 48 * MIB, 4), 0);
    free_all(&[p]);
    ok(ffi::devmem_shared_store_close());
}
