//! HIP specifics on the emulator's HIP face: backend selection, chunked physical memory (and
//! its vLLM-form listing), re-reserving address ranges so released memory goes back to the
//! device, zeroing discarded allocations on wake, the thread's current device, and the
//! switches' bad values. The rest of the conformance suite runs on HIP with
//! `DEVMEM_TEST_BACKEND=hip` (scripts/test.sh).

mod common;

use std::ffi::{c_int, c_void};
use std::ptr;

use common::*;
use devmem::{devmem_backend, devmem_state, devmem_status as S, ffi};

/// The emulator's HIP face with `extra` environment, whatever pass this is.
fn hip_env(extra: &[(&str, &str)]) {
    setup(extra);
    std::env::set_var("DEVMEM_BACKEND", "hip");
    std::env::set_var("DEVMEM_HIP_LIBRARY", emulator_path());
    for (k, v) in extra {
        std::env::set_var(k, v);
    }
}

fn chunks(p: u64) -> Vec<(u64, usize)> {
    let mut count = 0usize;
    let st = ffi::devmem_get_allocation_chunks(
        p as *const c_void,
        ptr::null_mut(),
        ptr::null_mut(),
        0,
        &mut count,
    );
    if count == 0 {
        ok(st);
        return Vec::new();
    }
    assert_eq!(st, S::BufferTooSmall, "{}", message());
    let mut handles = vec![0u64; count];
    let mut sizes = vec![0usize; count];
    ok(ffi::devmem_get_allocation_chunks(
        p as *const c_void,
        handles.as_mut_ptr().cast(),
        sizes.as_mut_ptr(),
        count,
        &mut count,
    ));
    handles.into_iter().zip(sizes).collect()
}

#[test]
fn forced_by_environment_and_reported() {
    hip_env(&[]);
    let mut kind = devmem_backend::Cuda;
    ok(ffi::devmem_get_backend(&mut kind));
    assert_eq!(kind, devmem_backend::Hip);
    let p = alloc(4 * MIB, "weights");
    fill(p, 4 * MIB, 3);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 4 * MIB, 3), 0);
    assert!(emu().calls_exactly("hipMemMap") > 0);
    assert_eq!(emu().calls_exactly("cuMemMap"), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

#[test]
fn auto_picks_hip_without_a_cuda_driver_and_cuda_when_there_is_one() {
    hip_env(&[("DEVMEM_CUDA_LIBRARY", "/nonexistent/libcuda.so.1")]);
    std::env::set_var("DEVMEM_HIP_LIBRARY", emulator_path());
    std::env::remove_var("DEVMEM_BACKEND");
    let mut kind = devmem_backend::Cuda;
    ok(ffi::devmem_get_backend(&mut kind));
    assert_eq!(kind, devmem_backend::Hip);
}

#[test]
fn auto_prefers_cuda_over_hip() {
    hip_env(&[]);
    std::env::set_var("DEVMEM_CUDA_LIBRARY", emulator_path());
    std::env::remove_var("DEVMEM_BACKEND");
    let mut kind = devmem_backend::Hip;
    ok(ffi::devmem_get_backend(&mut kind));
    assert_eq!(kind, devmem_backend::Cuda);
}

#[test]
fn select_backend_chooses_hip_and_a_missing_runtime_is_named() {
    hip_env(&[("DEVMEM_HIP_LIBRARY", "/nonexistent/libamdhip64.so")]);
    std::env::remove_var("DEVMEM_BACKEND");
    ok(ffi::devmem_select_backend(devmem_backend::Hip as i32));
    let mut p: *mut c_void = ptr::null_mut();
    expect_err(
        ffi::devmem_malloc(2 * MIB, 0, &mut p),
        S::DriverNotFound,
        "DEVMEM_HIP_LIBRARY",
    );
    std::env::set_var("DEVMEM_HIP_LIBRARY", emulator_path());
    ok(ffi::devmem_malloc(2 * MIB, 0, &mut p)); // a failed load is retried
    let mut kind = devmem_backend::Cuda;
    ok(ffi::devmem_get_backend(&mut kind));
    assert_eq!(kind, devmem_backend::Hip);
    ok(ffi::devmem_free(p));
}

/// 10 MiB in 4 MiB chunks is three hipMemCreate calls, listed in vLLM's ROCm form; the bytes
/// survive a sleep across the chunk boundaries, and the listing follows the state.
#[test]
fn chunked_allocations_keep_their_bytes_and_list_their_chunks() {
    hip_env(&[("DEVMEM_CHUNK_SIZE", "4M")]);
    let before = emu().calls_exactly("hipMemCreate");
    let p = alloc(10 * MIB, "weights");
    assert_eq!(emu().calls_exactly("hipMemCreate") - before, 3);
    let listed = chunks(p);
    let sizes: Vec<usize> = listed.iter().map(|c| c.1).collect();
    assert_eq!(sizes, [4 * MIB, 4 * MIB, 2 * MIB]);
    assert!(listed.iter().all(|c| c.0 != 0));
    fill(p, 10 * MIB, 11);

    // One slot is too few: BUFFER_TOO_SMALL with the count written.
    let (mut h, mut s, mut count) = ([0u64; 1], [0usize; 1], 0usize);
    expect_err(
        ffi::devmem_get_allocation_chunks(
            p as *const c_void,
            h.as_mut_ptr().cast(),
            s.as_mut_ptr(),
            1,
            &mut count,
        ),
        S::BufferTooSmall,
        "3 chunks",
    );
    assert_eq!(count, 3);
    expect_err(
        ffi::devmem_get_allocation_chunks(
            p as *const c_void,
            ptr::null_mut(),
            ptr::null_mut(),
            4,
            &mut count,
        ),
        S::NullPointer,
        "must not be NULL",
    );
    expect_err(
        ffi::devmem_get_allocation_chunks(
            ptr::null(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
            &mut count,
        ),
        S::NullPointer,
        "must not be NULL",
    );
    expect_err(
        ffi::devmem_get_allocation_chunks(
            8 as *const c_void,
            ptr::null_mut(),
            ptr::null_mut(),
            0,
            &mut count,
        ),
        S::UnknownPointer,
        "not inside any live devmem allocation",
    );

    ok(sleep(&["weights"]));
    assert_eq!(emu().mapping(p), 0);
    assert!(chunks(p).is_empty(), "asleep: no physical memory");
    let creates = emu().calls_exactly("hipMemCreate");
    ok(wake(None));
    assert_eq!(emu().calls_exactly("hipMemCreate") - creates, 3);
    assert_eq!(mismatches(p, 10 * MIB, 11), 0);
    assert_eq!(chunks(p).len(), 3);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// A runtime that refuses large hipMemCreate calls (older ROCm): one piece fails with an error
/// naming the call; chunks below the limit work.
#[test]
fn chunks_get_under_a_per_call_create_limit() {
    hip_env(&[
        ("DEVMEM_EMU_HIP_MAX_CREATE", "4M"),
        ("DEVMEM_CHUNK_SIZE", "0"),
    ]);
    let mut p: *mut c_void = ptr::null_mut();
    expect_err(
        ffi::devmem_malloc(8 * MIB, 0, &mut p),
        S::Driver,
        "hipMemCreate failed: hipErrorInvalidValue",
    );
    assert_no_device_leaks();
}

#[test]
fn chunks_of_the_limit_allocate_what_one_piece_cannot() {
    hip_env(&[
        ("DEVMEM_EMU_HIP_MAX_CREATE", "4M"),
        ("VLLM_ROCM_SLEEP_MEM_CHUNK_SIZE", "4"),
    ]);
    let p = alloc(16 * MIB, "kv_cache");
    assert_eq!(chunks(p).len(), 4);
    fill(p, 16 * MIB, 5);
    ok(sleep(&["kv_cache"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 16 * MIB, 5), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// A chunk that cannot be created undoes the chunks made before it.
#[test]
fn a_failed_chunk_releases_the_chunks_before_it() {
    hip_env(&[("DEVMEM_CHUNK_SIZE", "2M")]);
    emu().inject_exactly("hipMemCreate", 3, 2);
    let mut p: *mut c_void = ptr::null_mut();
    expect_err(
        ffi::devmem_malloc(8 * MIB, 0, &mut p),
        S::OutOfMemory,
        "chunk 3 of 4",
    );
    assert_no_device_leaks();
    // A wake that fails on its third chunk keeps the backup and leaves nothing mapped.
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 8);
    ok(sleep(&["weights"]));
    emu().inject_exactly("hipMemMap", 3, 999);
    expect_err(wake(None), S::Driver, "hipMemMap");
    assert_eq!(state(p), devmem_state::Offloaded);
    assert_eq!(emu().mapping(p), 0);
    assert_eq!(emu().counters().handles, 0);
    ok(wake(None));
    assert_eq!(mismatches(p, 8 * MIB, 8), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

fn used_bytes() -> u64 {
    emu().counters().used_bytes
}

/// ROCm keeps released memory while its reservation is held: without re-reserving, a sleep
/// gives nothing back to the device (the emulator models it).
#[test]
fn without_rereserve_a_sleep_returns_no_device_memory() {
    hip_env(&[("DEVMEM_RERESERVE", "0")]);
    let p = alloc(64 * MIB, "kv_cache");
    assert_eq!(used_bytes(), 64 * MIB as u64);
    ok(sleep(&[]));
    assert_eq!(state(p), devmem_state::Discarded);
    assert_eq!(used_bytes(), 64 * MIB as u64, "held by the reservation");
    free_all(&[p]); // freeing the reservation returns it
    assert_eq!(used_bytes(), 0);
    release_store_and_assert_clean();
}

/// With the default (re-reserve on), a sleep returns the memory and keeps every address.
#[test]
fn rereserve_returns_device_memory_at_the_same_addresses() {
    hip_env(&[]);
    let w = alloc(32 * MIB, "weights");
    let kv = alloc(64 * MIB, "kv_cache");
    fill(w, 32 * MIB, 41);
    let frees = emu().calls_exactly("hipMemAddressFree");
    let mut free_before = 0usize;
    let mut total = 0usize;
    ok(ffi::devmem_mem_get_info(0, &mut free_before, &mut total));
    ok(sleep(&["weights"]));
    assert_eq!(used_bytes(), 0, "every byte back on the device");
    let mut free_after = 0usize;
    ok(ffi::devmem_mem_get_info(0, &mut free_after, &mut total));
    assert_eq!(free_after - free_before, 96 * MIB);
    assert_eq!(emu().calls_exactly("hipMemAddressFree") - frees, 2);
    ok(wake(None));
    assert_eq!(mismatches(w, 32 * MIB, 41), 0);
    assert_eq!(emu().mapping(kv), 2);
    free_all(&[w, kv]);
    release_store_and_assert_clean();
}

/// The re-reserve fails once: the sleep still succeeds; the wake reserves the range again
/// first. Failing again there, the wake fails cleanly with the backup kept, and works later.
#[test]
fn a_lost_range_is_reserved_again_by_the_wake_or_the_wake_fails_cleanly() {
    hip_env(&[]);
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 9);
    emu().inject_exactly("hipMemAddressReserve", 1, 2);
    ok(sleep(&["weights"]));
    assert_eq!(state(p), devmem_state::Offloaded);
    ok(wake(None));
    assert_eq!(mismatches(p, 8 * MIB, 9), 0);

    emu().inject_exactly("hipMemAddressReserve", 1, 2);
    ok(sleep(&["weights"]));
    emu().inject_exactly("hipMemAddressReserve", 1, 999);
    expect_err(wake(None), S::Driver, "could not be reserved again");
    assert_eq!(state(p), devmem_state::Offloaded);
    assert_eq!(emu().mapping(p), 0);
    ok(wake(None));
    assert_eq!(mismatches(p, 8 * MIB, 9), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// A range lost while its allocation sleeps is never handed to a new allocation, and freeing
/// the sleeping allocation frees nothing twice.
#[test]
fn a_lost_range_is_never_given_to_another_allocation() {
    hip_env(&[]);
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 12);
    emu().inject_exactly("hipMemAddressReserve", 1, 2);
    ok(sleep(&["weights"]));
    let mut others = Vec::new();
    for _ in 0..4 {
        let q = alloc(8 * MIB, "other");
        assert!(
            q + 8 * MIB as u64 <= p || p + 8 * MIB as u64 <= q,
            "{q:#x} overlaps {p:#x}"
        );
        others.push(q);
    }
    ok(wake(Some(&["weights"])));
    assert_eq!(mismatches(p, 8 * MIB, 12), 0);
    // Lost again, then freed while asleep: no double free, nothing left.
    emu().inject_exactly("hipMemAddressReserve", 1, 2);
    ok(sleep(&["weights"]));
    free_all(&[p]);
    free_all(&others);
    release_store_and_assert_clean();
}

/// Stale VRAM (emulated): a discarded allocation wakes with old bytes unless zeroing is on.
#[test]
fn zero_on_wake_clears_discarded_allocations() {
    hip_env(&[("DEVMEM_EMU_STALE_VRAM", "1"), ("DEVMEM_ZERO_ON_WAKE", "1")]);
    let kv = alloc(8 * MIB, "kv_cache");
    let w = alloc(4 * MIB, "weights");
    fill(w, 4 * MIB, 4);
    ok(sleep(&["weights"]));
    let fills = emu().calls_exactly("hipMemsetD8Async");
    ok(wake(None));
    assert_eq!(
        emu().calls_exactly("hipMemsetD8Async") - fills,
        1,
        "only the discard"
    );
    // SAFETY: emulated device memory, mapped read-write after the wake.
    let bytes = unsafe { std::slice::from_raw_parts(kv as *const u8, 8 * MIB) };
    assert!(bytes.iter().all(|b| *b == 0));
    assert_eq!(mismatches(w, 4 * MIB, 4), 0);
    free_all(&[kv, w]);
    release_store_and_assert_clean();
}

#[test]
fn without_zero_on_wake_discarded_allocations_hold_stale_bytes() {
    hip_env(&[("DEVMEM_EMU_STALE_VRAM", "1"), ("DEVMEM_ZERO_ON_WAKE", "0")]);
    let kv = alloc(2 * MIB, "kv_cache");
    ok(sleep(&[]));
    ok(wake(None));
    // SAFETY: as above.
    let bytes = unsafe { std::slice::from_raw_parts(kv as *const u8, 2 * MIB) };
    assert!(
        bytes.iter().all(|b| *b == 0xA5),
        "the emulator models stale VRAM"
    );
    assert_eq!(emu().calls_exactly("hipMemsetD8Async"), 0);
    free_all(&[kv]);
}

/// devmem switches to the device it works on and gives the thread its device back.
#[test]
fn the_threads_current_device_is_given_back() {
    hip_env(&[("DEVMEM_EMU_DEVICES", "2")]);
    // SAFETY: the emulator's HIP entry points, from the library devmem loaded.
    let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("emulator");
    // SAFETY: the symbols' C prototypes.
    let (set, get) = unsafe {
        (
            *lib.get::<unsafe extern "C" fn(c_int) -> c_int>(b"hipSetDevice\0")
                .expect("hipSetDevice"),
            *lib.get::<unsafe extern "C" fn(*mut c_int) -> c_int>(b"hipGetDevice\0")
                .expect("hipGetDevice"),
        )
    };
    // SAFETY: plain values and a valid out-pointer.
    unsafe { assert_eq!(set(1), 0) };
    set_tag("x");
    let mut p: *mut c_void = ptr::null_mut();
    ok(ffi::devmem_malloc(2 * MIB, 0, &mut p));
    let mut device: c_int = -1;
    // SAFETY: as above.
    unsafe { assert_eq!(get(&mut device), 0) };
    assert_eq!(device, 1);
    ok(ffi::devmem_free(p));
}

#[test]
fn bad_switch_values_fail_the_load_naming_the_variable() {
    for (name, value) in [
        ("DEVMEM_CHUNK_SIZE", "lots"),
        ("DEVMEM_RERESERVE", "maybe"),
        ("DEVMEM_ZERO_ON_WAKE", "2"),
    ] {
        switch_refused(name, value, "hip", "INVALID_ARGUMENT");
    }
}

/// Only HIP re-reserves (CUDA's driver did not always give a freed range back on the H100),
/// and Level Zero cannot zero: asking fails the load instead of being ignored.
#[test]
fn other_backends_refuse_what_they_cannot_do() {
    switch_refused("DEVMEM_RERESERVE", "1", "cuda", "UNSUPPORTED");
    switch_refused("DEVMEM_RERESERVE", "1", "level_zero", "UNSUPPORTED");
    switch_refused("DEVMEM_ZERO_ON_WAKE", "1", "level_zero", "UNSUPPORTED");
}

/// Runs `switch_child` with `name=value` on `backend`: the first allocation must fail with
/// `status`, naming the variable and its value.
fn switch_refused(name: &str, value: &str, backend: &str, status: &str) {
    let out = run_child_test(
        &[],
        "switch_child",
        &[
            ("DEVMEM_TEST_SWITCH", name),
            ("DEVMEM_TEST_VALUE", value),
            ("DEVMEM_TEST_ON", backend),
        ],
        std::time::Duration::from_secs(60),
    );
    let expected = format!("DEVMEM_STATUS_{status}");
    assert!(out.contains(&expected), "{expected} missing: {out}");
    assert!(out.contains(&format!("{name}={value}")), "{out}");
}

#[test]
#[ignore = "run by switch_refused"]
fn switch_child() {
    let var = |k: &str| std::env::var(k).expect(k);
    let (name, value, backend) = (
        var("DEVMEM_TEST_SWITCH"),
        var("DEVMEM_TEST_VALUE"),
        var("DEVMEM_TEST_ON"),
    );
    hip_env(&[(name.as_str(), value.as_str())]);
    std::env::set_var("DEVMEM_BACKEND", &backend);
    std::env::set_var("DEVMEM_CUDA_LIBRARY", emulator_path());
    std::env::set_var("DEVMEM_ZE_LIBRARY", emulator_path());
    let mut p: *mut c_void = ptr::null_mut();
    let status = ffi::devmem_malloc(2 * MIB, 0, &mut p);
    assert_ne!(status, S::Success);
    let name = ffi::devmem_status_string(status as i32);
    // SAFETY: a static NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    println!("{name}: {}", message());
}

/// The layer works over CUDA too: chunks and zeroing by request.
#[test]
fn the_layer_works_over_cuda_on_request() {
    setup(&[
        ("DEVMEM_CHUNK_SIZE", "2M"),
        ("DEVMEM_ZERO_ON_WAKE", "1"),
        ("DEVMEM_EMU_STALE_VRAM", "1"),
    ]);
    std::env::set_var("DEVMEM_BACKEND", "cuda");
    std::env::set_var("DEVMEM_CUDA_LIBRARY", emulator_path());
    let w = alloc(6 * MIB, "weights");
    let kv = alloc(2 * MIB, "kv_cache");
    assert_eq!(chunks(w).len(), 3);
    fill(w, 6 * MIB, 30);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(w, 6 * MIB, 30), 0);
    // SAFETY: emulated device memory, mapped read-write after the wake.
    let bytes = unsafe { std::slice::from_raw_parts(kv as *const u8, 2 * MIB) };
    assert!(bytes.iter().all(|b| *b == 0));
    assert!(emu().calls_exactly("cuMemsetD8Async") > 0);
    free_all(&[w, kv]);
    release_store_and_assert_clean();
}

/// A release that fails on the second of four chunks: the sleep reports it, the allocation
/// keeps what is still held, the wake recreates the chunks already given back, and nothing is
/// left after the free.
#[test]
fn a_release_failing_midway_keeps_the_rest_and_the_wake_completes_the_set() {
    hip_env(&[("DEVMEM_CHUNK_SIZE", "2M")]);
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 17);
    emu().inject_exactly("hipMemRelease", 2, 999);
    expect_err(sleep(&["weights"]), S::Driver, "hipMemRelease");
    assert_eq!(state(p), devmem_state::Offloaded);
    assert_eq!(emu().counters().handles, 3, "chunks 2 to 4 still held");
    let creates = emu().calls_exactly("hipMemCreate");
    ok(wake(None));
    assert_eq!(
        emu().calls_exactly("hipMemCreate") - creates,
        1,
        "only chunk 1 anew"
    );
    assert_eq!(mismatches(p, 8 * MIB, 17), 0);
    assert_eq!(chunks(p).len(), 4);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// An unmap that fails on the second of three chunks maps the first back: the allocation is
/// mapped whole with its bytes, as its state says, and a later sleep works.
#[test]
fn an_unmap_failing_midway_maps_the_chunks_back() {
    hip_env(&[("DEVMEM_CHUNK_SIZE", "2M")]);
    let p = alloc(6 * MIB, "weights");
    fill(p, 6 * MIB, 19);
    emu().inject_exactly("hipMemUnmap", 2, 999);
    expect_err(sleep(&["weights"]), S::Driver, "hipMemUnmap");
    assert_eq!(state(p), devmem_state::Mapped);
    for offset in [0, 2 * MIB, 4 * MIB] {
        assert_eq!(emu().mapping(p + offset as u64), 2, "chunk at +{offset}");
    }
    assert_eq!(mismatches(p, 6 * MIB, 19), 0);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 6 * MIB, 19), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// PyTorch's ROCm build loads its own HIP runtime: devmem must use that copy (one runtime, one
/// set of devices and streams), not load another from the library path.
#[test]
fn a_hip_runtime_already_in_the_process_is_the_one_used() {
    hip_env(&[]);
    let dir = std::env::temp_dir().join(format!("devmem-hip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let copy = dir.join("libamdhip64.so.6");
    std::fs::copy(emulator_path(), &copy).expect("copy");
    std::env::remove_var("DEVMEM_HIP_LIBRARY");
    // SAFETY: the emulator, loaded as the application's runtime.
    let app = unsafe { libloading::Library::new(&copy) }.expect("runtime");
    // SAFETY: cuemu_calls' prototype.
    let calls = unsafe {
        *app.get::<unsafe extern "C" fn(*const std::ffi::c_char) -> u64>(b"cuemu_calls\0")
            .expect("cuemu_calls")
    };
    let p = alloc(2 * MIB, "x");
    // SAFETY: a NUL-terminated name.
    assert_eq!(
        unsafe { calls(c"hipMemCreate".as_ptr()) },
        1,
        "the process's runtime"
    );
    assert_eq!(emu().calls_exactly("hipMemCreate"), 0, "no second runtime");
    ok(ffi::devmem_free(p as *mut c_void));
    let _ = std::fs::remove_dir_all(&dir);
}

/// vLLM's primitives over a range the caller reserved through HIP: chunked memory is mapped
/// and released as one handle, and the caller's range, cycled to return the memory, is still
/// the caller's to free.
#[test]
fn the_low_level_primitives_work_over_a_caller_reservation() {
    hip_env(&[("DEVMEM_CHUNK_SIZE", "2M")]);
    // SAFETY: the emulator's HIP entry points, from the library devmem loads.
    let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("emulator");
    type Reserve = unsafe extern "C" fn(*mut u64, usize, usize, u64, u64) -> c_int;
    type FreeVa = unsafe extern "C" fn(u64, usize) -> c_int;
    // SAFETY: the types match the runtime's prototypes.
    let (reserve, free_va) = unsafe {
        (
            *lib.get::<Reserve>(b"hipMemAddressReserve\0").expect("sym"),
            *lib.get::<FreeVa>(b"hipMemAddressFree\0").expect("sym"),
        )
    };
    let mut va = 0u64;
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { reserve(&mut va, 6 * MIB, 0, 0, 0) }, 0);
    let mut handle: std::ffi::c_ulonglong = 0;
    assert_eq!(
        ffi::create_and_map(0, 6 * MIB as isize, va, &mut handle),
        0,
        "{}",
        message()
    );
    assert_eq!(emu().counters().handles, 3, "three chunks");
    fill(va, 6 * MIB, 23);
    assert_eq!(mismatches(va, 6 * MIB, 23), 0);
    assert_eq!(
        ffi::unmap_and_release(0, 6 * MIB as isize, va, &mut handle),
        0,
        "{}",
        message()
    );
    assert_eq!(used_bytes(), 0, "the memory went back to the device");
    // SAFETY: the caller's range, still reserved at the same address.
    assert_eq!(unsafe { free_va(va, 6 * MIB) }, 0);
    assert_no_device_leaks();
}

/// Chunks over Level Zero (`zeVirtualMemMap` per chunk), by request.
#[test]
fn the_chunk_layer_works_over_level_zero_on_request() {
    setup(&[("DEVMEM_CHUNK_SIZE", "2M")]);
    std::env::set_var("DEVMEM_BACKEND", "level_zero");
    std::env::set_var("DEVMEM_ZE_LIBRARY", emulator_path());
    let before = emu().calls_exactly("zePhysicalMemCreate");
    let w = alloc(6 * MIB, "weights");
    assert_eq!(emu().calls_exactly("zePhysicalMemCreate") - before, 3);
    assert_eq!(chunks(w).len(), 3);
    fill(w, 6 * MIB, 31);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(w, 6 * MIB, 31), 0);
    free_all(&[w]);
    release_store_and_assert_clean();
}
