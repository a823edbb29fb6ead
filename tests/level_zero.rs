//! Level Zero specifics on the emulator's Level Zero face: backend selection, the context
//! devmem works in (handed over, the driver's default, or its own), and a loader without
//! drivers or devices. The rest of the conformance suite runs on Level Zero with
//! `DEVMEM_TEST_BACKEND=level_zero`.

mod common;

use std::ffi::c_void;
use std::ptr;

use common::*;
use devmem::{devmem_backend, devmem_status as S, ffi};

const DEFAULT_CONTEXT: usize = 0x7b00_0000;
const DEVICE0: usize = 0x7d00_0000;

fn level_zero_env(extra: &[(&str, &str)]) {
    setup(extra);
    let emu = emulator_path();
    std::env::set_var("DEVMEM_BACKEND", "level_zero");
    std::env::set_var("DEVMEM_ZE_LIBRARY", &emu);
}

fn round_trip() {
    let p = alloc(4 * MIB, "weights");
    fill(p, 4 * MIB, 77);
    ok(sleep(&["weights"]));
    assert_eq!(emu().mapping(p), 0);
    ok(wake(None));
    assert_eq!(mismatches(p, 4 * MIB, 77), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

#[test]
fn forced_by_environment_and_reported() {
    level_zero_env(&[]);
    let mut kind = devmem_backend::Cuda;
    ok(ffi::devmem_get_backend(&mut kind));
    assert_eq!(kind, devmem_backend::LevelZero);
    round_trip();
    assert!(emu().calls_exactly("zeVirtualMemMap") > 0);
    assert_eq!(emu().calls_exactly("cuMemMap"), 0);
}

#[test]
fn auto_falls_back_to_level_zero_without_a_cuda_driver() {
    setup(&[("DEVMEM_CUDA_LIBRARY", "/nonexistent/libcuda.so.1")]);
    std::env::remove_var("DEVMEM_BACKEND");
    std::env::set_var("DEVMEM_ZE_LIBRARY", emulator_path());
    let mut kind = devmem_backend::Cuda;
    ok(ffi::devmem_get_backend(&mut kind));
    assert_eq!(kind, devmem_backend::LevelZero);
    round_trip();
}

#[test]
fn auto_prefers_cuda() {
    setup(&[]);
    std::env::remove_var("DEVMEM_BACKEND");
    let mut kind = devmem_backend::LevelZero;
    ok(ffi::devmem_get_backend(&mut kind));
    assert_eq!(kind, devmem_backend::Cuda);
}

#[test]
fn forced_by_api_and_refused_once_loaded() {
    setup(&[]);
    std::env::remove_var("DEVMEM_BACKEND");
    std::env::set_var("DEVMEM_ZE_LIBRARY", emulator_path());
    expect_err(
        ffi::devmem_select_backend(9),
        S::InvalidArgument,
        "backend 9",
    );
    ok(ffi::devmem_select_backend(devmem_backend::LevelZero as i32));
    let p = alloc(2 * MIB, "x");
    expect_err(
        ffi::devmem_select_backend(devmem_backend::Cuda as i32),
        S::InvalidState,
        "already in use",
    );
    ok(ffi::devmem_select_backend(devmem_backend::LevelZero as i32));
    ok(ffi::devmem_select_backend(devmem_backend::Auto as i32));
    free_all(&[p]);
}

#[test]
fn bad_backend_in_the_environment() {
    setup(&[]);
    std::env::set_var("DEVMEM_BACKEND", "opencl");
    expect_err(
        ffi::devmem_device_count(&mut 0),
        S::InvalidArgument,
        "DEVMEM_BACKEND=opencl",
    );
}

#[test]
fn a_handed_over_context_is_used() {
    level_zero_env(&[]);
    let devices = [DEVICE0 as *mut c_void];
    // The emulator's default context stands in for SYCL's: devmem uses it as handed over,
    // without asking the driver for its default or creating one.
    ok(ffi::devmem_set_level_zero_context(
        DEFAULT_CONTEXT as *mut c_void,
        devices.as_ptr(),
        1,
    ));
    round_trip();
    assert_eq!(emu().calls("zeContextCreate"), 0);
    assert_eq!(emu().calls("zeDriverGetDefaultContext"), 0);
    expect_err(
        ffi::devmem_set_level_zero_context(DEFAULT_CONTEXT as *mut c_void, devices.as_ptr(), 1),
        S::InvalidState,
        "already loaded",
    );
}

#[test]
fn the_default_context_is_used_when_nothing_is_handed_over() {
    level_zero_env(&[]);
    round_trip();
    assert_eq!(emu().calls("zeDriverGetDefaultContext"), 1);
    assert_eq!(emu().calls("zeContextCreate"), 0);
}

#[test]
fn devmem_creates_a_context_only_as_the_last_resort() {
    level_zero_env(&[("DEVMEM_EMU_ZE_NO_DEFAULT_CONTEXT", "1")]);
    round_trip();
    assert_eq!(emu().calls("zeContextCreate"), 1);
}

#[test]
fn a_context_the_driver_does_not_know_fails_clearly() {
    level_zero_env(&[]);
    let devices = [DEVICE0 as *mut c_void];
    ok(ffi::devmem_set_level_zero_context(
        0x1234_5000 as *mut c_void,
        devices.as_ptr(),
        1,
    ));
    expect_err(
        ffi::devmem_malloc(MIB, 0, &mut ptr::null_mut()),
        S::Driver,
        "zeVirtualMemQueryPageSize",
    );
}

#[test]
fn handing_over_bad_arguments() {
    level_zero_env(&[]);
    let devices = [DEVICE0 as *mut c_void];
    let null_device = [ptr::null_mut::<c_void>()];
    expect_err(
        ffi::devmem_set_level_zero_context(ptr::null_mut(), devices.as_ptr(), 1),
        S::NullPointer,
        "context is NULL",
    );
    expect_err(
        ffi::devmem_set_level_zero_context(DEFAULT_CONTEXT as *mut c_void, ptr::null(), 1),
        S::NullPointer,
        "devices",
    );
    expect_err(
        ffi::devmem_set_level_zero_context(DEFAULT_CONTEXT as *mut c_void, devices.as_ptr(), 0),
        S::NullPointer,
        "n is 0",
    );
    expect_err(
        ffi::devmem_set_level_zero_context(DEFAULT_CONTEXT as *mut c_void, null_device.as_ptr(), 1),
        S::NullPointer,
        "device handle is NULL",
    );
}

#[test]
fn a_loader_without_drivers() {
    level_zero_env(&[("DEVMEM_EMU_ZE_DRIVERS", "0")]);
    expect_err(
        ffi::devmem_device_count(&mut 0),
        S::DriverNotFound,
        "found no driver",
    );
}

#[test]
fn a_driver_without_devices() {
    level_zero_env(&[("DEVMEM_EMU_DEVICES", "0")]);
    expect_err(
        ffi::devmem_device_count(&mut 0),
        S::InvalidDevice,
        "no device",
    );
}

#[test]
fn a_device_without_virtual_memory() {
    level_zero_env(&[("DEVMEM_EMU_NO_VMM", "1")]);
    expect_err(
        ffi::devmem_device_count(&mut 0),
        S::Unsupported,
        "no virtual memory support",
    );
}

#[test]
fn vllm_primitives_over_a_level_zero_reservation() {
    level_zero_env(&[]);
    let p = alloc(2 * MIB, "x"); // loads the backend in the default context
    type Reserve = unsafe extern "C" fn(*mut c_void, *const c_void, usize, *mut *mut c_void) -> u32;
    type Free = unsafe extern "C" fn(*mut c_void, *const c_void, usize) -> u32;
    // SAFETY: the emulator library, for its Level Zero entry points.
    let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("emulator");
    // SAFETY: types match the Level Zero prototypes.
    let reserve: libloading::Symbol<Reserve> =
        unsafe { lib.get(b"zeVirtualMemReserve\0") }.expect("sym");
    // SAFETY: as above.
    let free_va: libloading::Symbol<Free> = unsafe { lib.get(b"zeVirtualMemFree\0") }.expect("sym");
    let ctx = DEFAULT_CONTEXT as *mut c_void;
    let mut va: *mut c_void = ptr::null_mut();
    // SAFETY: valid out-pointer, the context devmem uses.
    assert_eq!(unsafe { reserve(ctx, ptr::null(), 4 * MIB, &mut va) }, 0);
    let mut handle: std::ffi::c_ulonglong = 0;
    assert_eq!(
        ffi::create_and_map(0, 4 * MIB as isize, va as u64, &mut handle),
        0,
        "{}",
        message()
    );
    fill(va as u64, 4 * MIB, 5);
    assert_eq!(mismatches(va as u64, 4 * MIB, 5), 0);
    assert_eq!(
        ffi::unmap_and_release(0, 4 * MIB as isize, va as u64, &mut handle),
        0,
        "{}",
        message()
    );
    // SAFETY: frees the reservation made above.
    assert_eq!(unsafe { free_va(ctx, va, 4 * MIB) }, 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// A hand-over during the first load: the load is held inside the loader (in `zeDeviceGet`,
/// after it read the handed-over context, holding devmem's backend slot) while another thread
/// hands a context over. The hand-over must wait for the load and then fail with
/// `INVALID_STATE`, never return `SUCCESS` for a context the loaded backend ignores. (The
/// window of the old race, between the hand-over's "is a backend loaded?" check and its
/// record, cannot be held open from outside; the fix closes it by doing both under the slot's
/// lock, which this test relies on.)
#[test]
fn a_hand_over_racing_the_first_load_is_refused_not_ignored() {
    level_zero_env(&[]);
    // SAFETY: the emulator library devmem loads, opened for its test controls.
    let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("emulator");
    // SAFETY: the controls' prototypes.
    let (hold, wait_held, release) = unsafe {
        (
            *lib.get::<unsafe extern "C" fn(*const std::ffi::c_char) -> u32>(b"cuemu_hold\0")
                .expect("cuemu_hold"),
            *lib.get::<unsafe extern "C" fn(u64) -> i32>(b"cuemu_wait_held\0")
                .expect("cuemu_wait_held"),
            *lib.get::<unsafe extern "C" fn() -> u32>(b"cuemu_release_held\0")
                .expect("cuemu_release_held"),
        )
    };
    // SAFETY: a NUL-terminated name.
    assert_eq!(unsafe { hold(c"zeDeviceGet".as_ptr()) }, 0);
    let loader = std::thread::spawn(|| {
        let mut n = 0;
        ffi::devmem_device_count(&mut n)
    });
    // SAFETY: plain value.
    assert_eq!(
        unsafe { wait_held(10_000) },
        1,
        "the load reached zeDeviceGet"
    );
    let handing = std::thread::spawn(|| {
        let devices = [DEVICE0 as *mut c_void];
        let status =
            ffi::devmem_set_level_zero_context(DEFAULT_CONTEXT as *mut c_void, devices.as_ptr(), 1);
        (status, message())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !handing.is_finished(),
        "the hand-over must wait for the load in progress"
    );
    // SAFETY: no arguments.
    assert_eq!(unsafe { release() }, 0);
    ok(loader.join().expect("loader"));
    let (status, msg) = handing.join().expect("hand-over");
    assert_eq!(status, S::InvalidState, "{msg}");
    assert!(msg.contains("already loaded"), "{msg}");
}
