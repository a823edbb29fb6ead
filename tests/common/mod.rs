//! Shared helpers for tests that run devmem against the driver emulator.
//!
//! Each test must run in its own process (cargo nextest does this): devmem and the emulator keep
//! process-wide state, and the emulator reads its configuration from the environment once.
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use devmem::devmem_status;
use devmem::ffi;

/// Path of the emulator library built next to the test binary.
pub fn emulator_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join("libdevmem_cuda_emu.so");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// Whether this run drives the Level Zero backend (`DEVMEM_TEST_BACKEND=level_zero`): the
/// conformance suite runs once per backend against the emulator's three faces.
pub fn level_zero() -> bool {
    std::env::var("DEVMEM_TEST_BACKEND").as_deref() == Ok("level_zero")
}

/// Whether this run drives the HIP backend (`DEVMEM_TEST_BACKEND=hip`).
pub fn hip() -> bool {
    std::env::var("DEVMEM_TEST_BACKEND").as_deref() == Ok("hip")
}

/// Whether the backend under test has a device checksum (CUDA only: its kernel is PTX).
pub fn has_checksum() -> bool {
    !level_zero() && !hip()
}

/// CUDA driver names and texts the tests use, and their HIP counterparts.
const HIP_NAMES: &[(&str, &str)] = &[
    ("cuMemAddressReserve", "hipMemAddressReserve"),
    ("cuMemAddressFree", "hipMemAddressFree"),
    ("cuMemCreate", "hipMemCreate"),
    ("cuMemRelease", "hipMemRelease"),
    ("cuMemMap", "hipMemMap"),
    (
        "cuMemImportFromShareableHandle",
        "hipMemImportFromShareableHandle",
    ),
    ("cuMemUnmap", "hipMemUnmap"),
    ("cuMemSetAccess", "hipMemSetAccess"),
    ("cuMemcpyDtoHAsync_v2", "hipMemcpyDtoHAsync"),
    ("cuMemcpyHtoDAsync_v2", "hipMemcpyHtoDAsync"),
    ("cuMemcpyDtoHAsync", "hipMemcpyDtoHAsync"),
    ("cuMemcpyHtoDAsync", "hipMemcpyHtoDAsync"),
    ("cuEventSynchronize", "hipEventSynchronize"),
    ("cuEventRecord", "hipEventRecord"),
    ("cuEventCreate", "hipEventCreateWithFlags"),
    ("cuStreamSynchronize", "hipStreamSynchronize"),
    ("cuStreamCreate", "hipStreamCreateWithFlags"),
    ("cuCtxSynchronize", "hipDeviceSynchronize"),
    ("cuMemGetInfo_v2", "hipMemGetInfo"),
    ("cuMemHostRegister_v2", "hipHostRegister"),
    ("cuMemHostRegister", "hipHostRegister"),
    ("cuMemHostUnregister", "hipHostUnregister"),
    ("CUDA_ERROR_OUT_OF_MEMORY", "hipErrorOutOfMemory"),
    ("CUDA_ERROR_UNKNOWN", "hipErrorUnknown"),
    ("DEVMEM_CUDA_LIBRARY", "DEVMEM_HIP_LIBRARY"),
];

/// CUDA driver names and texts the tests use, and their Level Zero counterparts.
const LEVEL_ZERO_NAMES: &[(&str, &str)] = &[
    ("cuMemAddressReserve", "zeVirtualMemReserve"),
    ("cuMemAddressFree", "zeVirtualMemFree"),
    ("cuMemCreate", "zePhysicalMemCreate"),
    ("cuMemRelease", "zePhysicalMemDestroy"),
    ("cuMemMap", "zeVirtualMemMap"),
    ("cuMemUnmap", "zeVirtualMemUnmap"),
    ("cuMemcpyDtoHAsync_v2", "zeCommandListAppendMemoryCopy"),
    ("cuMemcpyHtoDAsync_v2", "zeCommandListAppendMemoryCopy"),
    ("cuMemcpyDtoHAsync", "zeCommandListAppendMemoryCopy"),
    ("cuMemcpyHtoDAsync", "zeCommandListAppendMemoryCopy"),
    ("cuEventSynchronize", "zeEventHostSynchronize"),
    ("cuEventRecord", "zeCommandListAppendSignalEvent"),
    ("cuMemHostRegister_v2", "zeMemAllocHost"),
    ("cuMemHostRegister", "zeMemAllocHost"),
    ("cuMemHostUnregister", "zeMemFree"),
    (
        "CUDA_ERROR_OUT_OF_MEMORY",
        "ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
    ),
    ("CUDA_ERROR_UNKNOWN", "ZE_RESULT_ERROR_UNKNOWN"),
    ("DEVMEM_CUDA_LIBRARY", "DEVMEM_ZE_LIBRARY"),
];

/// A CUDA driver name or error text as the backend under test spells it.
pub fn tr(text: &str) -> String {
    let names = if level_zero() {
        LEVEL_ZERO_NAMES
    } else if hip() {
        HIP_NAMES
    } else {
        return text.to_string();
    };
    names
        .iter()
        .find(|(cuda, _)| *cuda == text)
        .map_or_else(|| text.to_string(), |(_, ze)| ze.to_string())
}

/// A CUDA error code as the backend under test returns it (2: out of memory, 999: unknown).
fn tr_code(code: u32) -> u32 {
    match (level_zero(), code) {
        (true, 2) => 0x7000_0003,
        (true, 999) => 0x7fff_fffe,
        _ => code,
    }
}

/// Points devmem at the emulator with the given extra environment. Call before any devmem call.
pub fn setup(extra: &[(&str, &str)]) {
    // SAFETY (of set_var): called at the start of a single-threaded test process.
    std::env::set_var("DEVMEM_CUDA_LIBRARY", emulator_path());
    if level_zero() {
        std::env::set_var("DEVMEM_BACKEND", "level_zero");
        std::env::set_var("DEVMEM_ZE_LIBRARY", emulator_path());
        for (k, v) in extra {
            if *k == "DEVMEM_CUDA_LIBRARY" {
                std::env::set_var("DEVMEM_ZE_LIBRARY", v);
            }
        }
    }
    if hip() {
        std::env::set_var("DEVMEM_BACKEND", "hip");
        std::env::set_var("DEVMEM_HIP_LIBRARY", emulator_path());
        for (k, v) in extra {
            if *k == "DEVMEM_CUDA_LIBRARY" {
                std::env::set_var("DEVMEM_HIP_LIBRARY", v);
            }
        }
    }
    // Small host-store chunks keep the tests' host memory low; tests may override.
    std::env::set_var("DEVMEM_HOST_CHUNK_MB", "32");
    std::env::set_var("DEVMEM_HOST_THREADS", "2");
    // The tests count the host store's bytes and registrations exactly: growing it ahead of
    // need in the background would race with those counts. Tests of growing ahead turn it on.
    std::env::set_var("DEVMEM_HOST_GROW_AHEAD", "0");
    // Any synchronisation violation stops the test process (tests that provoke one on
    // purpose pass DEVMEM_EMU_STRICT=0 and count them).
    std::env::set_var("DEVMEM_EMU_STRICT", "1");
    for (k, v) in extra {
        std::env::set_var(k, v);
    }
}

/// The emulator's test-control functions, from the same library instance devmem loaded.
pub struct Emu {
    _lib: libloading::Library,
    counters: unsafe extern "C" fn(*mut Counters) -> c_uint,
    inject: unsafe extern "C" fn(*const c_char, u64, c_uint) -> c_uint,
    calls: unsafe extern "C" fn(*const c_char) -> u64,
    set_capacity: unsafe extern "C" fn(c_int, usize) -> c_uint,
    clear_faults: unsafe extern "C" fn() -> c_uint,
    mapping: unsafe extern "C" fn(u64) -> c_int,
    violation: unsafe extern "C" fn(u64, *mut c_char, usize) -> usize,
    launch_fill: unsafe extern "C" fn(u64, usize, u8) -> c_uint,
    hold: unsafe extern "C" fn(*const c_char) -> c_uint,
    wait_held: unsafe extern "C" fn(u64) -> c_int,
}

/// Mirrors the emulator's CuemuCounters.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub handles: u64,
    pub mappings: u64,
    pub reservations: u64,
    pub host_buffers: u64,
    pub used_bytes: u64,
    pub host_registered: u64,
    pub events: u64,
    pub violations: u64,
    pub pending: u64,
}

pub fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| {
        // SAFETY: the emulator library, opened for its test-control symbols.
        let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("open emulator");
        // SAFETY: symbol types match the emulator's definitions.
        unsafe {
            Emu {
                counters: *lib.get(b"cuemu_counters\0").expect("cuemu_counters"),
                inject: *lib.get(b"cuemu_inject\0").expect("cuemu_inject"),
                calls: *lib.get(b"cuemu_calls\0").expect("cuemu_calls"),
                set_capacity: *lib
                    .get(b"cuemu_set_capacity\0")
                    .expect("cuemu_set_capacity"),
                clear_faults: *lib
                    .get(b"cuemu_clear_faults\0")
                    .expect("cuemu_clear_faults"),
                mapping: *lib.get(b"cuemu_mapping\0").expect("cuemu_mapping"),
                violation: *lib.get(b"cuemu_violation\0").expect("cuemu_violation"),
                launch_fill: *lib.get(b"cuemu_launch_fill\0").expect("cuemu_launch_fill"),
                hold: *lib.get(b"cuemu_hold\0").expect("cuemu_hold"),
                wait_held: *lib.get(b"cuemu_wait_held\0").expect("cuemu_wait_held"),
                _lib: lib,
            }
        }
    })
}

impl Emu {
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { (self.counters)(&mut c) }, 0);
        c
    }

    /// Fails the `nth` next call of `name` with `code`.
    pub fn inject(&self, name: &str, nth: u64, code: u32) {
        let name = CString::new(tr(name)).expect("name");
        // SAFETY: valid NUL-terminated name.
        assert_eq!(
            unsafe { (self.inject)(name.as_ptr(), nth, tr_code(code)) },
            0
        );
    }

    /// Fails the `nth` next call of exactly `name` with exactly `code` (no translation to the
    /// backend under test).
    pub fn inject_exactly(&self, name: &str, nth: u64, code: u32) {
        let name = CString::new(name).expect("name");
        // SAFETY: valid NUL-terminated name.
        assert_eq!(unsafe { (self.inject)(name.as_ptr(), nth, code) }, 0);
    }

    pub fn calls(&self, name: &str) -> u64 {
        self.calls_exactly(&tr(name))
    }

    /// Calls of exactly `name` (no translation to the backend under test).
    pub fn calls_exactly(&self, name: &str) -> u64 {
        let name = CString::new(name).expect("name");
        // SAFETY: valid NUL-terminated name.
        unsafe { (self.calls)(name.as_ptr()) }
    }

    pub fn set_capacity(&self, device: i32, bytes: usize) {
        // SAFETY: plain values.
        assert_eq!(unsafe { (self.set_capacity)(device, bytes) }, 0);
    }

    /// 0: nothing mapped at `va`; 1: mapped without access; 2: mapped read-write.
    pub fn mapping(&self, va: u64) -> i32 {
        // SAFETY: plain value.
        unsafe { (self.mapping)(va) }
    }

    /// Every synchronisation violation the emulator recorded, described.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0.. {
            let mut buf = vec![0 as c_char; 512];
            // SAFETY: buf is writable for its length.
            let n = unsafe { (self.violation)(i, buf.as_mut_ptr(), buf.len()) };
            if n == 0 {
                break;
            }
            // SAFETY: NUL-terminated by the emulator.
            out.push(
                unsafe { CStr::from_ptr(buf.as_ptr()) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        out
    }

    /// Queues application work (a kernel writing `byte` over the range) on the current
    /// device's legacy stream; it runs at the next synchronisation with that stream.
    pub fn launch_fill(&self, ptr: u64, len: usize, byte: u8) {
        // SAFETY: plain values; the emulator checks the range.
        assert_eq!(unsafe { (self.launch_fill)(ptr, len, byte) }, 0);
    }

    /// Makes the next call of exactly `name` wait until the process ends (or is killed).
    pub fn hold(&self, name: &str) {
        let name = CString::new(name).expect("name");
        // SAFETY: valid NUL-terminated name.
        assert_eq!(unsafe { (self.hold)(name.as_ptr()) }, 0);
    }

    /// Waits up to `millis` for a thread to be held by [`hold`](Self::hold).
    pub fn wait_held(&self, millis: u64) -> bool {
        // SAFETY: plain value.
        unsafe { (self.wait_held)(millis) == 1 }
    }

    pub fn clear_faults(&self) {
        // SAFETY: no arguments.
        assert_eq!(unsafe { (self.clear_faults)() }, 0);
    }
}

pub const MIB: usize = 1 << 20;

/// The calling thread's last error message.
pub fn message() -> String {
    let mut buf = vec![0 as c_char; 1024];
    let n = ffi::devmem_last_error_message(buf.as_mut_ptr(), buf.len());
    // SAFETY: devmem wrote a NUL-terminated string into buf.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert_eq!(n, text.len().min(n));
    text
}

/// Asserts `status` and that the message contains `needle`.
#[track_caller]
pub fn expect_err(status: devmem_status, expected: devmem_status, needle: &str) {
    assert_eq!(status, expected, "message: {}", message());
    let needle = tr(needle);
    let needle = needle.as_str();
    let msg = message();
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

#[track_caller]
pub fn ok(status: devmem_status) {
    assert_eq!(status, devmem_status::Success, "message: {}", message());
}

pub fn set_tag(tag: &str) {
    let tag = CString::new(tag).expect("tag");
    ok(ffi::devmem_set_current_tag(tag.as_ptr()));
}

#[track_caller]
pub fn alloc(size: usize, tag: &str) -> u64 {
    set_tag(tag);
    let mut p: *mut c_void = std::ptr::null_mut();
    ok(ffi::devmem_malloc(size, 0, &mut p));
    assert!(!p.is_null());
    p as u64
}

/// A byte pattern that differs per allocation and per position.
pub fn pattern(seed: u64, i: usize) -> u8 {
    (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8
}

/// The pattern for `seed` repeats every 251 bytes; this is one period starting at `offset`.
fn period(seed: u64) -> [u8; 251] {
    let mut p = [0u8; 251];
    for (i, b) in p.iter_mut().enumerate() {
        *b = pattern(seed, i);
    }
    p
}

/// Fills an emulated device range with the pattern for `seed`.
pub fn fill(ptr: u64, len: usize, seed: u64) {
    // SAFETY: emulated device memory is host memory, mapped read-write while awake.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
    let p = period(seed);
    for chunk in bytes.chunks_mut(251) {
        chunk.copy_from_slice(&p[..chunk.len()]);
    }
}

/// Counts bytes that differ from the pattern for `seed`.
pub fn mismatches(ptr: u64, len: usize, seed: u64) -> usize {
    // SAFETY: as in `fill`.
    let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    let p = period(seed);
    bytes
        .chunks(251)
        .filter(|chunk| *chunk != &p[..chunk.len()])
        .map(|chunk| chunk.iter().zip(p.iter()).filter(|(a, b)| a != b).count())
        .sum()
}

pub fn tags(list: &[&str]) -> (Vec<CString>, Vec<*const c_char>) {
    let owned: Vec<CString> = list
        .iter()
        .map(|t| CString::new(*t).expect("tag"))
        .collect();
    let ptrs = owned.iter().map(|c| c.as_ptr()).collect();
    (owned, ptrs)
}

pub fn sleep(offload: &[&str]) -> devmem_status {
    let (_owned, ptrs) = tags(offload);
    ffi::devmem_sleep(ptrs.as_ptr(), ptrs.len())
}

pub fn wake(which: Option<&[&str]>) -> devmem_status {
    match which {
        None => ffi::devmem_wake_up(std::ptr::null(), 0),
        Some(list) => {
            let (_owned, ptrs) = tags(list);
            ffi::devmem_wake_up(ptrs.as_ptr(), ptrs.len())
        }
    }
}

pub fn stats(tag: Option<&str>) -> devmem::devmem_stats {
    let mut out = devmem::devmem_stats::default();
    match tag {
        None => ok(ffi::devmem_get_stats(std::ptr::null(), &mut out)),
        Some(t) => {
            let t = CString::new(t).expect("tag");
            ok(ffi::devmem_get_stats(t.as_ptr(), &mut out));
        }
    }
    out
}

pub fn state(ptr: u64) -> devmem::devmem_state {
    // SAFETY: plain C struct; zero is a valid value.
    let mut info: devmem::devmem_allocation_info = unsafe { std::mem::zeroed() };
    ok(ffi::devmem_get_allocation_info(
        ptr as *const c_void,
        &mut info,
    ));
    info.state
}

pub fn free_all(ptrs: &[u64]) {
    for p in ptrs {
        ok(ffi::devmem_free(*p as *mut c_void));
    }
}

/// Asserts the emulator recorded no synchronisation violation: no memory unmapped, freed or
/// reused while queued work still used it.
#[track_caller]
pub fn assert_no_violations() {
    let v = emu().violations();
    assert!(v.is_empty(), "synchronisation violations: {v:#?}");
}

/// Asserts the emulator holds nothing but pinned host buffers (kept by the host store), and
/// recorded no synchronisation violation.
#[track_caller]
pub fn assert_no_device_leaks() {
    assert_no_violations();
    let c = emu().counters();
    assert_eq!(
        (c.handles, c.mappings, c.reservations, c.used_bytes),
        (0, 0, 0, 0),
        "{c:?}"
    );
}

/// Frees the host store and asserts the emulator holds nothing at all: no handle, mapping,
/// reservation, device byte or registered host range.
#[track_caller]
pub fn release_store_and_assert_clean() {
    assert_no_violations();
    let mut freed = 0usize;
    ok(ffi::devmem_release_host_store(&mut freed));
    let c = emu().counters();
    assert_eq!(
        (
            c.handles,
            c.mappings,
            c.reservations,
            c.used_bytes,
            c.host_registered
        ),
        (0, 0, 0, 0, 0),
        "leak: {c:?}"
    );
}

/// Runs the ignored test `name` of this test binary in a child process, behind `prefix` (a
/// command and its arguments, e.g. `prlimit --nproc=1`; empty for none), with `env` added and
/// `DEVMEM_TEST_BACKEND` passed on. Fails the calling test when the child runs longer than
/// `timeout`, fails, or did not run exactly that one test; returns everything it printed.
pub fn run_child_test(
    prefix: &[&str],
    name: &str,
    env: &[(&str, &str)],
    timeout: std::time::Duration,
) -> String {
    let mut cmd = child_test_command(prefix, name, env);
    // One file for both streams: the child may run as another user, so no pipes to drain.
    let out = std::env::temp_dir().join(format!("devmem-child-{}-{name}.log", std::process::id()));
    let log = std::fs::File::create(&out).expect("log file");
    cmd.stdout(log.try_clone().expect("log")).stderr(log);
    let status = wait_for_child(cmd.spawn().expect("child process"), timeout, name);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    assert!(
        status.success(),
        "the child running {name} failed: {status}\n{text}"
    );
    assert!(
        text.contains("test result: ok. 1 passed"),
        "the child did not run {name}:\n{text}"
    );
    text
}

/// The command that runs the ignored test `name` of this test binary behind `prefix`, with
/// `env` added and `DEVMEM_TEST_BACKEND` passed on.
pub fn child_test_command(
    prefix: &[&str],
    name: &str,
    env: &[(&str, &str)],
) -> std::process::Command {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => std::process::Command::new(&exe),
    };
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--test-threads=1",
        "--nocapture",
    ])
    .env(
        "DEVMEM_TEST_BACKEND",
        std::env::var("DEVMEM_TEST_BACKEND").unwrap_or_default(),
    )
    .envs(env.iter().copied());
    cmd
}

/// Waits for a child test process, killing it and failing when it runs past `timeout`.
pub fn wait_for_child(
    mut child: std::process::Child,
    timeout: std::time::Duration,
    name: &str,
) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("the child running {name} hung for {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
