//! devmem's real backend against the driver emulator: allocation, sleep, wake, offload, discard,
//! out-of-memory rollback, injected driver faults, bad input, threads. Run with cargo nextest
//! (one process per test).

mod common;

use std::ffi::{c_char, c_void, CString};
use std::ptr;

use common::*;
use devmem::{devmem_state, devmem_status, ffi};

#[test]
fn alloc_write_lookup_free() {
    setup(&[]);
    let p = alloc(3 * MIB + 5, "weights");
    fill(p, 3 * MIB + 5, 1);
    assert_eq!(mismatches(p, 3 * MIB + 5, 1), 0);
    // SAFETY: zero is a valid value of the C struct.
    let mut info: devmem::devmem_allocation_info = unsafe { std::mem::zeroed() };
    ok(ffi::devmem_get_allocation_info(
        (p + 100) as *const c_void,
        &mut info,
    ));
    assert_eq!(info.ptr, p);
    assert_eq!(
        info.size,
        4 * MIB as u64,
        "rounded to the 2 MiB granularity"
    );
    assert_eq!(info.requested_size, 3 * MIB as u64 + 5);
    assert_eq!(info.state, devmem_state::Mapped);
    assert_ne!(info.handle, 0);
    let tag: Vec<u8> = info
        .tag
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    assert_eq!(tag, b"weights");
    let s = stats(Some("weights"));
    assert_eq!(s.allocations.current, 1);
    assert_eq!(s.mapped_bytes.current, 4 * MIB as u64);
    ok(ffi::devmem_free(p as *mut c_void));
    assert_no_device_leaks();
    assert_eq!(stats(None).allocations.current, 0);
    assert_eq!(stats(None).allocations.total, 1);
}

#[test]
fn my_malloc_and_my_free_use_the_recorded_size() {
    setup(&[]);
    let p = ffi::my_malloc(5 * MIB as isize, 0, ptr::null_mut());
    assert!(!p.is_null(), "{}", message());
    fill(p as u64, 5 * MIB, 9);
    // A wrong size from the caller is ignored: the recorded 6 MiB is freed.
    ffi::my_free(p, 1, 0, ptr::null_mut());
    assert_eq!(ffi::devmem_last_error_status(), devmem_status::Success);
    assert_no_device_leaks();
}

#[test]
fn threads_without_a_tag_use_default() {
    setup(&[]);
    let mut buf = [0 as c_char; 256];
    ok(ffi::devmem_get_current_tag(buf.as_mut_ptr(), buf.len()));
    // SAFETY: NUL-terminated by devmem.
    assert_eq!(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_str(),
        Ok("default")
    );
    let mut small = [0 as c_char; 4];
    expect_err(
        ffi::devmem_get_current_tag(small.as_mut_ptr(), small.len()),
        devmem_status::BufferTooSmall,
        "needs 8 bytes",
    );
}

#[test]
fn sleep_offloads_listed_tags_and_discards_the_rest() {
    setup(&[("DEVMEM_EMU_CAPACITY", "256M")]);
    let weights: Vec<u64> = (0..4).map(|_| alloc(8 * MIB, "weights")).collect();
    let kv: Vec<u64> = (0..2).map(|_| alloc(16 * MIB, "kv_cache")).collect();
    for (i, p) in weights.iter().enumerate() {
        fill(*p, 8 * MIB, i as u64);
    }
    let mut free_before = 0usize;
    let mut total = 0usize;
    ok(ffi::devmem_mem_get_info(0, &mut free_before, &mut total));
    assert_eq!(total, 256 * MIB);
    assert_eq!(free_before, 256 * MIB - 64 * MIB);

    ok(sleep(&["weights"]));
    let mut t = devmem::devmem_transfer::default();
    ok(ffi::devmem_get_last_transfer(&mut t));
    assert_eq!(t.allocations, 6);
    assert_eq!(t.bytes_freed, 64 * MIB as u64);
    assert_eq!(t.bytes_saved, 32 * MIB as u64);
    assert_eq!(t.bytes_discarded, 32 * MIB as u64);
    let mut free_asleep = 0usize;
    ok(ffi::devmem_mem_get_info(0, &mut free_asleep, &mut total));
    assert_eq!(
        free_asleep,
        256 * MIB,
        "every byte of device memory returned"
    );
    assert_eq!(emu().counters().handles, 0);
    assert_eq!(emu().counters().mappings, 0);
    assert_eq!(state(weights[0]), devmem_state::Offloaded);
    assert_eq!(state(kv[0]), devmem_state::Discarded);
    let s = stats(None);
    assert_eq!(s.offloaded_bytes.current, 32 * MIB as u64);
    assert_eq!(s.discarded_bytes.current, 32 * MIB as u64);
    assert_eq!(s.mapped_bytes.current, 0);
    assert!(s.host_store_bytes >= 32 * MIB as u64);

    ok(wake(None));
    ok(ffi::devmem_get_last_transfer(&mut t));
    assert_eq!(t.bytes_mapped, 64 * MIB as u64);
    assert_eq!(t.bytes_restored, 32 * MIB as u64);
    for (i, p) in weights.iter().enumerate() {
        assert_eq!(mismatches(*p, 8 * MIB, i as u64), 0, "weights[{i}]");
    }
    for p in &kv {
        fill(*p, 16 * MIB, 77);
        assert_eq!(mismatches(*p, 16 * MIB, 77), 0);
    }
    let mut free_after = 0usize;
    ok(ffi::devmem_mem_get_info(0, &mut free_after, &mut total));
    assert_eq!(free_after, free_before);
    free_all(&weights);
    free_all(&kv);
    assert_no_device_leaks();
}

#[test]
fn host_store_is_reused_across_cycles_and_released_on_request() {
    setup(&[]);
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 3);
    for _ in 0..5 {
        ok(sleep(&["weights"]));
        ok(wake(None));
        assert_eq!(mismatches(p, 8 * MIB, 3), 0);
    }
    assert_eq!(emu().calls("cuMemHostRegister_v2"), 1, "one chunk, reused");
    assert_eq!(stats(None).host_store_bytes, 32 * MIB as u64);
    let mut freed = 0usize;
    ok(ffi::devmem_release_host_store(&mut freed));
    assert_eq!(freed, 32 * MIB);
    assert_eq!(emu().counters().host_registered, 0);
    assert_eq!(stats(None).host_store_bytes, 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn backups_span_chunks_and_the_store_stays_within_one_chunk_of_the_backups() {
    setup(&[("DEVMEM_HOST_CHUNK_MB", "4")]);
    let sizes = [10 * MIB, 2 * MIB, 6 * MIB, 14 * MIB, 2 * MIB];
    let ptrs: Vec<u64> = sizes.iter().map(|s| alloc(*s, "weights")).collect();
    for (i, (p, s)) in ptrs.iter().zip(sizes).enumerate() {
        fill(*p, s, 50 + i as u64);
    }
    ok(sleep(&["weights"]));
    let offloaded: usize = sizes.iter().sum();
    let held = stats(None).host_store_bytes as usize;
    assert!(
        held >= offloaded && held <= offloaded + 4 * MIB,
        "held {held}, offloaded {offloaded}"
    );
    ok(wake(None));
    for (i, (p, s)) in ptrs.iter().zip(sizes).enumerate() {
        assert_eq!(mismatches(*p, s, 50 + i as u64), 0, "allocation {i}");
    }
    free_all(&ptrs);
    assert_no_device_leaks();
}

#[test]
fn release_policy_frees_the_store_after_wake() {
    setup(&[]);
    expect_err(
        ffi::devmem_set_host_policy(7),
        devmem_status::InvalidArgument,
        "host policy 7",
    );
    ok(ffi::devmem_set_host_policy(
        devmem::devmem_host_policy::Release as i32,
    ));
    let mut policy = devmem::devmem_host_policy::Keep;
    ok(ffi::devmem_get_host_policy(&mut policy));
    assert_eq!(policy, devmem::devmem_host_policy::Release);
    let p = alloc(40 * MIB, "weights");
    fill(p, 40 * MIB, 8);
    ok(sleep(&["weights"]));
    assert_eq!(stats(None).host_store_bytes, 64 * MIB as u64);
    ok(wake(None));
    assert_eq!(mismatches(p, 40 * MIB, 8), 0);
    assert_eq!(stats(None).host_store_bytes, 0);
    assert_eq!(emu().counters().host_registered, 0);
    free_all(&[p]);
}

#[test]
fn release_policy_from_the_environment() {
    setup(&[("DEVMEM_HOST_POLICY", "release")]);
    let mut policy = devmem::devmem_host_policy::Keep;
    ok(ffi::devmem_get_host_policy(&mut policy));
    assert_eq!(policy, devmem::devmem_host_policy::Release);
}

#[test]
fn reserving_ahead_makes_the_first_sleep_allocate_nothing() {
    setup(&[]);
    ok(ffi::devmem_reserve_host_store(48 * MIB, 1));
    assert_eq!(stats(None).host_store_bytes, 64 * MIB as u64);
    let registered = emu().calls("cuMemHostRegister_v2");
    let p = alloc(48 * MIB, "weights");
    fill(p, 48 * MIB, 2);
    ok(sleep(&["weights"]));
    assert_eq!(emu().calls("cuMemHostRegister_v2"), registered);
    ok(wake(None));
    assert_eq!(mismatches(p, 48 * MIB, 2), 0);
    free_all(&[p]);
}

#[test]
fn background_reserve_and_an_immediate_sleep_cooperate() {
    setup(&[("DEVMEM_HOST_CHUNK_MB", "8")]);
    let ptrs: Vec<u64> = (0..6).map(|_| alloc(16 * MIB, "weights")).collect();
    for (i, p) in ptrs.iter().enumerate() {
        fill(*p, 16 * MIB, i as u64);
    }
    ok(ffi::devmem_reserve_host_store(40 * MIB, 0));
    ok(sleep(&["weights"]));
    let held = stats(None).host_store_bytes as usize;
    assert!((96 * MIB..=104 * MIB).contains(&held), "held {held}");
    ok(wake(None));
    for (i, p) in ptrs.iter().enumerate() {
        assert_eq!(mismatches(*p, 16 * MIB, i as u64), 0);
    }
    free_all(&ptrs);
}

#[test]
fn host_registration_failure_leaves_everything_mapped() {
    setup(&[]);
    let p = alloc(8 * MIB, "weights");
    let q = alloc(8 * MIB, "kv");
    fill(p, 8 * MIB, 1);
    emu().inject("cuMemHostRegister_v2", 1, 999);
    expect_err(
        sleep(&["weights"]),
        devmem_status::Driver,
        "cuMemHostRegister",
    );
    assert!(message().contains("nothing was released"), "{}", message());
    assert_eq!(state(p), devmem_state::Mapped);
    assert_eq!(state(q), devmem_state::Mapped);
    assert_eq!(mismatches(p, 8 * MIB, 1), 0);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 8 * MIB, 1), 0);
    free_all(&[p, q]);
    assert_no_device_leaks();
}

#[test]
fn copy_marker_failure_keeps_the_batch_mapped() {
    setup(&[]);
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 21);
    emu().inject("cuEventSynchronize", 1, 999);
    expect_err(
        sleep(&["weights"]),
        devmem_status::Driver,
        "cuEventSynchronize",
    );
    assert_eq!(state(p), devmem_state::Mapped);
    assert_eq!(mismatches(p, 8 * MIB, 21), 0);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 8 * MIB, 21), 0);
    free_all(&[p]);
}

#[test]
fn per_tag_offload_discard_and_wake() {
    setup(&[]);
    let a = alloc(4 * MIB, "a");
    let b = alloc(4 * MIB, "b");
    let c = alloc(4 * MIB, "c");
    fill(a, 4 * MIB, 1);
    fill(b, 4 * MIB, 2);
    fill(c, 4 * MIB, 3);
    let (_o, only_a) = tags(&["a"]);
    ok(ffi::devmem_offload(only_a.as_ptr(), 1));
    let (_o, only_b) = tags(&["b"]);
    ok(ffi::devmem_discard(only_b.as_ptr(), 1));
    assert_eq!(state(a), devmem_state::Offloaded);
    assert_eq!(state(b), devmem_state::Discarded);
    assert_eq!(state(c), devmem_state::Mapped);
    assert_eq!(mismatches(c, 4 * MIB, 3), 0);
    // Waking only "b" leaves "a" asleep.
    ok(wake(Some(&["b"])));
    assert_eq!(state(a), devmem_state::Offloaded);
    assert_eq!(state(b), devmem_state::Mapped);
    ok(wake(Some(&["a"])));
    assert_eq!(mismatches(a, 4 * MIB, 1), 0);
    free_all(&[a, b, c]);
    assert_no_device_leaks();
}

#[test]
fn sleep_while_asleep_and_wake_while_awake_are_no_ops() {
    setup(&[]);
    let p = alloc(2 * MIB, "weights");
    fill(p, 2 * MIB, 5);
    ok(wake(None));
    let mut t = devmem::devmem_transfer::default();
    ok(ffi::devmem_get_last_transfer(&mut t));
    assert_eq!(t.allocations, 0);
    ok(sleep(&["weights"]));
    // A second sleep that would discard everything leaves the offloaded bytes alone.
    ok(sleep(&[]));
    ok(ffi::devmem_get_last_transfer(&mut t));
    assert_eq!(t.allocations, 0);
    assert_eq!(state(p), devmem_state::Offloaded);
    ok(wake(None));
    assert_eq!(mismatches(p, 2 * MIB, 5), 0);
    free_all(&[p]);
}

#[test]
fn unknown_tags_are_no_ops() {
    setup(&[]);
    let p = alloc(2 * MIB, "weights");
    ok(wake(Some(&["nobody"])));
    let (_o, t) = tags(&["nobody"]);
    ok(ffi::devmem_offload(t.as_ptr(), 1));
    assert_eq!(state(p), devmem_state::Mapped);
    assert_eq!(stats(Some("nobody")), devmem::devmem_stats::default());
    free_all(&[p]);
}

#[test]
fn free_works_in_every_state() {
    setup(&[]);
    let mapped = alloc(2 * MIB, "m");
    let offloaded = alloc(2 * MIB, "o");
    let discarded = alloc(2 * MIB, "d");
    ok(sleep(&["o"]));
    ok(wake(Some(&["m"])));
    assert_eq!(state(mapped), devmem_state::Mapped);
    assert_eq!(state(offloaded), devmem_state::Offloaded);
    assert_eq!(state(discarded), devmem_state::Discarded);
    free_all(&[mapped, offloaded, discarded]);
    assert_no_device_leaks();
    let s = stats(None);
    assert_eq!(s.allocations.current, 0);
    assert_eq!(
        (
            s.mapped_bytes.current,
            s.offloaded_bytes.current,
            s.discarded_bytes.current
        ),
        (0, 0, 0)
    );
}

#[test]
fn wake_out_of_memory_rolls_back_and_keeps_backups() {
    setup(&[("DEVMEM_EMU_CAPACITY", "64M")]);
    let weights: Vec<u64> = (0..4).map(|_| alloc(8 * MIB, "weights")).collect();
    for (i, p) in weights.iter().enumerate() {
        fill(*p, 8 * MIB, 10 + i as u64);
    }
    ok(sleep(&["weights"]));
    // Something else takes the memory while devmem sleeps: 48 of 64 MiB.
    let blocker = alloc(48 * MIB, "other");
    expect_err(wake(None), devmem_status::OutOfMemory, "cuMemCreate");
    assert!(message().contains("every backup is kept"), "{}", message());
    for p in &weights {
        assert_eq!(state(*p), devmem_state::Offloaded);
    }
    assert_eq!(emu().counters().handles, 1, "only the blocker holds memory");
    assert_eq!(emu().counters().mappings, 1);
    ok(ffi::devmem_free(blocker as *mut c_void));
    ok(wake(None));
    for (i, p) in weights.iter().enumerate() {
        assert_eq!(mismatches(*p, 8 * MIB, 10 + i as u64), 0);
    }
    free_all(&weights);
    assert_no_device_leaks();
}

#[test]
fn malloc_out_of_memory_is_reported_and_leaks_nothing() {
    setup(&[("DEVMEM_EMU_CAPACITY", "8M")]);
    let p = ffi::my_malloc(16 * MIB as isize, 0, ptr::null_mut());
    assert!(p.is_null());
    assert_eq!(ffi::devmem_last_error_status(), devmem_status::OutOfMemory);
    assert!(
        message().contains(&tr("CUDA_ERROR_OUT_OF_MEMORY")),
        "{}",
        message()
    );
    assert_no_device_leaks();
    // The next allocation that fits succeeds: no sticky error.
    let q = alloc(8 * MIB, "default");
    free_all(&[q]);
}

#[test]
fn copy_failure_during_sleep_leaves_everything_mapped() {
    setup(&[]);
    let a = alloc(4 * MIB, "weights");
    let b = alloc(4 * MIB, "weights");
    fill(a, 4 * MIB, 1);
    fill(b, 4 * MIB, 2);
    emu().inject("cuMemcpyDtoHAsync_v2", 2, 999);
    expect_err(
        sleep(&["weights"]),
        devmem_status::Driver,
        "cuMemcpyDtoHAsync",
    );
    assert!(
        message().contains(&tr("CUDA_ERROR_UNKNOWN")),
        "{}",
        message()
    );
    assert_eq!(state(a), devmem_state::Mapped);
    assert_eq!(state(b), devmem_state::Mapped);
    assert_eq!(mismatches(a, 4 * MIB, 1), 0);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(a, 4 * MIB, 1), 0);
    assert_eq!(mismatches(b, 4 * MIB, 2), 0);
    free_all(&[a, b]);
    assert_no_device_leaks();
}

#[test]
fn map_failure_during_wake_rolls_back_then_retry_succeeds() {
    setup(&[]);
    let ptrs: Vec<u64> = (0..3).map(|_| alloc(2 * MIB, "weights")).collect();
    for (i, p) in ptrs.iter().enumerate() {
        fill(*p, 2 * MIB, i as u64);
    }
    ok(sleep(&["weights"]));
    emu().inject("cuMemMap", 3, 999);
    expect_err(wake(None), devmem_status::Driver, "cuMemMap");
    assert_eq!(emu().counters().mappings, 0);
    assert_eq!(emu().counters().handles, 0);
    ok(wake(None));
    for (i, p) in ptrs.iter().enumerate() {
        assert_eq!(mismatches(*p, 2 * MIB, i as u64), 0);
    }
    free_all(&ptrs);
    assert_no_device_leaks();
}

#[test]
fn restore_copy_failure_rolls_back_wake() {
    setup(&[]);
    let p = alloc(2 * MIB, "weights");
    fill(p, 2 * MIB, 4);
    ok(sleep(&["weights"]));
    emu().inject("cuMemcpyHtoDAsync_v2", 1, 999);
    expect_err(wake(None), devmem_status::Driver, "cuMemcpyHtoDAsync");
    assert_eq!(state(p), devmem_state::Offloaded);
    ok(wake(None));
    assert_eq!(mismatches(p, 2 * MIB, 4), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn release_failure_during_sleep_keeps_the_handle_and_wake_reuses_it() {
    setup(&[]);
    let p = alloc(2 * MIB, "weights");
    fill(p, 2 * MIB, 6);
    emu().inject("cuMemRelease", 1, 999);
    expect_err(sleep(&["weights"]), devmem_status::Driver, "cuMemRelease");
    assert_eq!(state(p), devmem_state::Offloaded);
    assert_eq!(emu().counters().handles, 1, "the handle is still held");
    ok(wake(None));
    assert_eq!(mismatches(p, 2 * MIB, 6), 0);
    ok(sleep(&["weights"]));
    assert_eq!(emu().counters().handles, 0);
    ok(wake(None));
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn unmap_failure_during_free_keeps_the_allocation() {
    setup(&[]);
    let p = alloc(2 * MIB, "weights");
    fill(p, 2 * MIB, 8);
    emu().inject("cuMemUnmap", 1, 999);
    expect_err(
        ffi::devmem_free(p as *mut c_void),
        devmem_status::Driver,
        "cuMemUnmap",
    );
    assert_eq!(state(p), devmem_state::Mapped);
    assert_eq!(mismatches(p, 2 * MIB, 8), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// CUDA only: Level Zero has no shareable-handle types to fall back through (scripts/test.sh
/// filters `cuda_only_*` out of the Level Zero run, where nextest reports them as skipped).
#[test]
fn cuda_only_fabric_handles_fall_back_when_not_permitted() {
    setup(&[("DEVMEM_EMU_FABRIC", "1")]);
    assert!(
        !level_zero() && !hip(),
        "CUDA-only test run on another backend"
    );
    let p = alloc(2 * MIB, "weights");
    assert_eq!(
        emu().calls("cuMemCreate"),
        2,
        "fabric refused, POSIX fd accepted"
    );
    let q = alloc(2 * MIB, "weights");
    assert_eq!(
        emu().calls("cuMemCreate"),
        3,
        "the accepted handle type is remembered"
    );
    free_all(&[p, q]);
}

#[test]
fn device_without_vmm_is_unsupported() {
    setup(&[("DEVMEM_EMU_NO_VMM", "1")]);
    let mut p: *mut c_void = ptr::null_mut();
    expect_err(
        ffi::devmem_malloc(MIB, 0, &mut p),
        devmem_status::Unsupported,
        "virtual memory",
    );
    assert!(p.is_null(), "out-pointers are written only on success");
}

#[test]
fn missing_driver_library_is_driver_not_found() {
    setup(&[("DEVMEM_CUDA_LIBRARY", "/nonexistent/libcuda.so.1")]);
    let p = ffi::my_malloc(MIB as isize, 0, ptr::null_mut());
    assert!(p.is_null());
    assert_eq!(
        ffi::devmem_last_error_status(),
        devmem_status::DriverNotFound
    );
    assert!(
        message().contains("/nonexistent/libcuda.so.1"),
        "{}",
        message()
    );
    let mut free = 0usize;
    let mut total = 0usize;
    expect_err(
        ffi::devmem_mem_get_info(0, &mut free, &mut total),
        devmem_status::DriverNotFound,
        "DEVMEM_CUDA_LIBRARY",
    );
}

#[test]
fn stub_driver_without_symbols_is_a_driver_error() {
    setup(&[("DEVMEM_CUDA_LIBRARY", "libc.so.6")]);
    let mut count = 0;
    expect_err(
        ffi::devmem_device_count(&mut count),
        devmem_status::Driver,
        "lacks symbol",
    );
}

#[test]
fn bad_pointers_and_sizes() {
    setup(&[]);
    let mut p: *mut c_void = ptr::null_mut();
    expect_err(
        ffi::devmem_malloc(0, 0, &mut p),
        devmem_status::InvalidArgument,
        "size 0",
    );
    expect_err(
        ffi::devmem_malloc(usize::MAX, 0, &mut p),
        devmem_status::InvalidArgument,
        "overflows",
    );
    expect_err(
        ffi::devmem_malloc(usize::MAX - (1 << 20), 0, &mut p),
        devmem_status::InvalidArgument,
        "overflows",
    );
    expect_err(
        ffi::devmem_malloc(MIB, 0, ptr::null_mut()),
        devmem_status::NullPointer,
        "out is NULL",
    );
    assert!(ffi::my_malloc(-5, 0, ptr::null_mut()).is_null());
    assert_eq!(
        ffi::devmem_last_error_status(),
        devmem_status::InvalidArgument
    );
    assert!(message().contains("negative"));
    assert!(ffi::my_malloc(0, 0, ptr::null_mut()).is_null());
    assert_eq!(
        ffi::devmem_last_error_status(),
        devmem_status::InvalidArgument
    );
    expect_err(
        ffi::devmem_malloc(MIB, 1, &mut p),
        devmem_status::InvalidDevice,
        "out of range",
    );
    expect_err(
        ffi::devmem_malloc(MIB, -1, &mut p),
        devmem_status::InvalidDevice,
        "negative",
    );
    expect_err(
        ffi::devmem_free(ptr::null_mut()),
        devmem_status::NullPointer,
        "NULL",
    );
    expect_err(
        ffi::devmem_free(0xdead_0000 as *mut c_void),
        devmem_status::UnknownPointer,
        "not a live devmem allocation",
    );
    let q = alloc(4 * MIB, "x");
    expect_err(
        ffi::devmem_free((q + 4096) as *mut c_void),
        devmem_status::UnknownPointer,
        "inside the allocation",
    );
    ok(ffi::devmem_free(q as *mut c_void));
    expect_err(
        ffi::devmem_free(q as *mut c_void),
        devmem_status::UnknownPointer,
        "already freed",
    );
    ffi::my_free(q as *mut c_void, 0, 0, ptr::null_mut());
    assert_eq!(
        ffi::devmem_last_error_status(),
        devmem_status::UnknownPointer
    );
    assert_eq!(stats(None).unknown_frees, 4);
    // SAFETY: zero is a valid value of the C struct.
    let mut info: devmem::devmem_allocation_info = unsafe { std::mem::zeroed() };
    expect_err(
        ffi::devmem_get_allocation_info(q as *const c_void, &mut info),
        devmem_status::UnknownPointer,
        "not inside",
    );
    expect_err(
        ffi::devmem_get_allocation_info(ptr::null(), &mut info),
        devmem_status::NullPointer,
        "NULL",
    );
    expect_err(
        ffi::devmem_get_stats(ptr::null(), ptr::null_mut()),
        devmem_status::NullPointer,
        "NULL",
    );
    expect_err(
        ffi::devmem_get_last_transfer(ptr::null_mut()),
        devmem_status::NullPointer,
        "NULL",
    );
    let mut free = 0usize;
    expect_err(
        ffi::devmem_mem_get_info(0, &mut free, ptr::null_mut()),
        devmem_status::NullPointer,
        "NULL",
    );
    expect_err(
        ffi::devmem_mem_get_info(3, &mut free, &mut free.clone()),
        devmem_status::InvalidDevice,
        "out of range",
    );
    expect_err(
        ffi::devmem_granularity(0, ptr::null_mut()),
        devmem_status::NullPointer,
        "NULL",
    );
    expect_err(
        ffi::devmem_device_count(ptr::null_mut()),
        devmem_status::NullPointer,
        "NULL",
    );
    expect_err(
        ffi::devmem_for_each_allocation(None, ptr::null_mut(), ptr::null_mut()),
        devmem_status::NullPointer,
        "callback",
    );
    expect_err(
        ffi::devmem_get_current_tag(ptr::null_mut(), 10),
        devmem_status::NullPointer,
        "buf",
    );
    assert_no_device_leaks();
}

#[test]
fn bad_tags() {
    setup(&[]);
    expect_err(
        ffi::devmem_set_current_tag(ptr::null()),
        devmem_status::InvalidTag,
        "NULL",
    );
    expect_err(
        ffi::devmem_set_current_tag(c"".as_ptr()),
        devmem_status::InvalidTag,
        "empty",
    );
    let bad_utf8 = [0xffu8, 0xfe, 0];
    expect_err(
        ffi::devmem_set_current_tag(bad_utf8.as_ptr().cast()),
        devmem_status::InvalidTag,
        "UTF-8",
    );
    let long = CString::new("x".repeat(256)).expect("tag");
    expect_err(
        ffi::devmem_set_current_tag(long.as_ptr()),
        devmem_status::InvalidTag,
        "longer than 255",
    );
    let longest = CString::new("y".repeat(255)).expect("tag");
    ok(ffi::devmem_set_current_tag(longest.as_ptr()));
    let p = alloc(MIB, &"y".repeat(255));
    expect_err(
        ffi::devmem_sleep(ptr::null(), 2),
        devmem_status::NullPointer,
        "tags is NULL",
    );
    let list = [c"ok".as_ptr(), ptr::null()];
    expect_err(
        ffi::devmem_sleep(list.as_ptr(), 2),
        devmem_status::InvalidTag,
        "tags[1] is NULL",
    );
    expect_err(
        ffi::devmem_offload(list.as_ptr(), 2),
        devmem_status::InvalidTag,
        "tags[1]",
    );
    expect_err(
        ffi::devmem_discard(list.as_ptr(), 2),
        devmem_status::InvalidTag,
        "tags[1]",
    );
    expect_err(
        ffi::devmem_wake_up(list.as_ptr(), 2),
        devmem_status::InvalidTag,
        "tags[1]",
    );
    let mut s = devmem::devmem_stats::default();
    expect_err(
        ffi::devmem_get_stats(long.as_ptr(), &mut s),
        devmem_status::InvalidTag,
        "longer",
    );
    // Nothing happened: the allocation is still mapped.
    assert_eq!(state(p), devmem_state::Mapped);
    free_all(&[p]);
}

#[test]
fn status_strings_and_version() {
    setup(&[]);
    // SAFETY: devmem returns static NUL-terminated strings.
    let text = |s: i32| {
        unsafe { std::ffi::CStr::from_ptr(ffi::devmem_status_string(s)) }
            .to_str()
            .map(String::from)
    };
    assert_eq!(text(0).as_deref(), Ok("DEVMEM_STATUS_SUCCESS"));
    assert_eq!(text(3).as_deref(), Ok("DEVMEM_STATUS_OUT_OF_MEMORY"));
    assert_eq!(text(4).as_deref(), Ok("DEVMEM_STATUS_DRIVER_NOT_FOUND"));
    assert_eq!(text(-1).as_deref(), Ok("DEVMEM_STATUS_UNKNOWN"));
    assert_eq!(text(1000).as_deref(), Ok("DEVMEM_STATUS_UNKNOWN"));
    // SAFETY: as above.
    let version = unsafe { std::ffi::CStr::from_ptr(ffi::devmem_version()) };
    assert_eq!(version.to_str(), Ok(env!("CARGO_PKG_VERSION")));
    // The message is truncated to the buffer and the full length is returned.
    let mut p: *mut c_void = ptr::null_mut();
    let _ = ffi::devmem_malloc(0, 0, &mut p);
    let mut tiny = [0 as c_char; 5];
    let n = ffi::devmem_last_error_message(tiny.as_mut_ptr(), tiny.len());
    assert!(n > 4);
    assert_eq!(tiny[4], 0);
    assert_eq!(ffi::devmem_last_error_message(ptr::null_mut(), 0), n);
}

unsafe extern "C" fn record(info: *const devmem::devmem_allocation_info, user: *mut c_void) {
    // SAFETY: devmem passes a valid info and the test's Vec.
    let (info, seen) = unsafe { (&*info, &mut *(user as *mut Vec<(u64, i32)>)) };
    seen.push((info.ptr, info.state as i32));
}

#[test]
fn callbacks_and_iteration() {
    setup(&[]);
    let mut allocated: Vec<(u64, i32)> = Vec::new();
    ok(ffi::devmem_set_callbacks(
        Some(record),
        None,
        (&mut allocated as *mut Vec<(u64, i32)>).cast(),
    ));
    let a = alloc(2 * MIB, "a");
    let b = alloc(2 * MIB, "b");
    assert_eq!(allocated, vec![(a, 0), (b, 0)]);
    ok(ffi::devmem_set_callbacks(None, None, ptr::null_mut()));
    ok(sleep(&["a"]));
    let mut seen: Vec<(u64, i32)> = Vec::new();
    let mut count = 0usize;
    ok(ffi::devmem_for_each_allocation(
        Some(record),
        (&mut seen as *mut Vec<(u64, i32)>).cast(),
        &mut count,
    ));
    assert_eq!(count, 2);
    let mut expected = vec![(a, 1), (b, 2)];
    expected.sort();
    assert_eq!(seen, expected);
    let mut freed: Vec<(u64, i32)> = Vec::new();
    ok(ffi::devmem_set_callbacks(
        None,
        Some(record),
        (&mut freed as *mut Vec<(u64, i32)>).cast(),
    ));
    free_all(&[a, b]);
    assert_eq!(freed, vec![(a, 1), (b, 2)]);
    ok(ffi::devmem_set_callbacks(None, None, ptr::null_mut()));
}

/// CUDA only: vLLM's primitives over a range reserved through the CUDA driver.
#[test]
fn cuda_only_low_level_create_and_map_over_a_caller_reservation() {
    setup(&[]);
    assert!(
        !level_zero() && !hip(),
        "CUDA-only test run on another backend"
    );
    // Reserve a range the way vLLM does, through the driver (the emulator here).
    let p = alloc(2 * MIB, "x"); // gives this thread the primary context
                                 // SAFETY: the emulator's cuMemAddressReserve with a valid out-pointer.
    let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("emulator");
    type Reserve = unsafe extern "C" fn(*mut u64, usize, usize, u64, u64) -> u32;
    type FreeVa = unsafe extern "C" fn(u64, usize) -> u32;
    // SAFETY: types match the driver prototypes.
    let reserve: libloading::Symbol<Reserve> =
        unsafe { lib.get(b"cuMemAddressReserve\0") }.expect("sym");
    // SAFETY: as above.
    let free_va: libloading::Symbol<FreeVa> =
        unsafe { lib.get(b"cuMemAddressFree\0") }.expect("sym");
    let mut va = 0u64;
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { reserve(&mut va, 4 * MIB, 0, 0, 0) }, 0);
    let mut handle: std::ffi::c_ulonglong = 0;
    assert_eq!(
        ffi::create_and_map(0, 4 * MIB as isize, va, &mut handle),
        0,
        "{}",
        message()
    );
    assert_ne!(handle, 0);
    fill(va, 4 * MIB, 12);
    assert_eq!(mismatches(va, 4 * MIB, 12), 0);
    assert_eq!(
        ffi::unmap_and_release(0, 4 * MIB as isize, va, &mut handle),
        0,
        "{}",
        message()
    );
    // Bad input for the primitives.
    assert_eq!(
        ffi::create_and_map(0, 4 * MIB as isize, va, ptr::null_mut()),
        devmem_status::NullPointer as i32
    );
    assert_eq!(
        ffi::create_and_map(0, 3 * MIB as isize, va, &mut handle),
        devmem_status::InvalidArgument as i32
    );
    assert!(message().contains("granularity"));
    assert_eq!(
        ffi::create_and_map(0, -1, va, &mut handle),
        devmem_status::InvalidArgument as i32
    );
    assert_eq!(
        ffi::create_and_map(0, 4 * MIB as isize, 0, &mut handle),
        devmem_status::NullPointer as i32
    );
    assert_eq!(
        ffi::create_and_map(7, 4 * MIB as isize, va, &mut handle),
        devmem_status::InvalidDevice as i32
    );
    assert_eq!(
        ffi::create_and_map(u64::MAX, 4 * MIB as isize, va, &mut handle),
        devmem_status::InvalidDevice as i32
    );
    // SAFETY: frees the reservation made above.
    assert_eq!(unsafe { free_va(va, 4 * MIB) }, 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn two_devices_keep_their_own_bytes_and_memory() {
    setup(&[("DEVMEM_EMU_DEVICES", "2"), ("DEVMEM_EMU_CAPACITY", "64M")]);
    set_tag("weights");
    let mut on0: *mut c_void = ptr::null_mut();
    let mut on1: *mut c_void = ptr::null_mut();
    ok(ffi::devmem_malloc(8 * MIB, 0, &mut on0));
    set_tag("kv_cache");
    ok(ffi::devmem_malloc(16 * MIB, 1, &mut on1));
    fill(on0 as u64, 8 * MIB, 100);
    fill(on1 as u64, 16 * MIB, 101);
    let info = |d: i32| {
        let (mut f, mut t) = (0usize, 0usize);
        ok(ffi::devmem_mem_get_info(d, &mut f, &mut t));
        f
    };
    assert_eq!((info(0), info(1)), (56 * MIB, 48 * MIB));
    ok(sleep(&["weights", "kv_cache"]));
    assert_eq!((info(0), info(1)), (64 * MIB, 64 * MIB));
    ok(wake(None));
    assert_eq!((info(0), info(1)), (56 * MIB, 48 * MIB));
    assert_eq!(mismatches(on0 as u64, 8 * MIB, 100), 0);
    assert_eq!(mismatches(on1 as u64, 16 * MIB, 101), 0);
    // SAFETY: zero is a valid value of the C struct.
    let mut i1: devmem::devmem_allocation_info = unsafe { std::mem::zeroed() };
    ok(ffi::devmem_get_allocation_info(on1, &mut i1));
    assert_eq!(i1.device, 1);
    free_all(&[on0 as u64, on1 as u64]);
    assert_no_device_leaks();
}

#[test]
fn a_fresh_thread_gets_the_primary_context() {
    setup(&[]);
    let p = std::thread::spawn(|| alloc(2 * MIB, "t"))
        .join()
        .expect("thread");
    std::thread::spawn(move || {
        ok(sleep(&["t"]));
        ok(wake(None));
        free_all(&[p]);
    })
    .join()
    .expect("thread");
    assert_no_device_leaks();
}

/// Eight threads allocate, write, check and free while another sleeps and wakes: every byte
/// of every allocation survives. The writes and checks run under a read lock that the sleeper
/// takes for writing around each sleep-and-wake (the bytes can only be touched while mapped);
/// malloc and free run outside it, concurrently with sleep and wake.
#[test]
fn concurrent_malloc_free_while_another_thread_sleeps_and_wakes() {
    setup(&[("DEVMEM_EMU_CAPACITY", "512M")]);
    let keep = alloc(4 * MIB, "weights");
    fill(keep, 4 * MIB, 42);
    let mapped = std::sync::Arc::new(std::sync::RwLock::new(()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sleeper = {
        let stop = stop.clone();
        let mapped = mapped.clone();
        std::thread::spawn(move || {
            let mut offload: Vec<String> = (0..8).map(|w| format!("worker{w}")).collect();
            offload.push("weights".into());
            let names: Vec<&str> = offload.iter().map(String::as_str).collect();
            let mut cycles = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && cycles < 200 {
                let _all_asleep = mapped.write().expect("lock");
                ok(sleep(&names));
                ok(wake(None));
                cycles += 1;
            }
            cycles
        })
    };
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let mapped = mapped.clone();
            std::thread::spawn(move || {
                let tag = format!("worker{w}");
                let mut checked = 0;
                for i in 0..50u64 {
                    let seed = 1000 * (w as u64 + 1) + i;
                    let p = alloc(2 * MIB, &tag);
                    {
                        let _awake = mapped.read().expect("lock");
                        fill(p, 2 * MIB, seed);
                    }
                    std::thread::yield_now();
                    {
                        let _awake = mapped.read().expect("lock");
                        assert_eq!(mismatches(p, 2 * MIB, seed), 0, "worker {w} round {i}");
                        checked += 1;
                    }
                    ok(ffi::devmem_free(p as *mut c_void));
                }
                checked
            })
        })
        .collect();
    let checked: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cycles = sleeper.join().expect("sleeper");
    assert!(cycles > 0);
    assert_eq!(
        checked, 400,
        "every worker allocation was written and checked"
    );
    ok(wake(None));
    assert_eq!(mismatches(keep, 4 * MIB, 42), 0);
    free_all(&[keep]);
    assert_no_device_leaks();
    assert_eq!(stats(None).allocations.total, 401);
}
