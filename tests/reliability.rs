//! Reliability guarantees, each tested against the emulator (docs/guarantees.md):
//! synchronisation (every sync point has a test that fails without it), failure paths that
//! leave every allocation consistent, the bound on host memory, and thread creation that may
//! fail. Tests whose names start with `cuda_only_` or `needs_` are filtered out by
//! scripts/test.sh where they cannot run (and reported as skipped there); run directly in such
//! a place they fail instead of passing silently.

mod common;

use std::ffi::c_void;
use std::ptr;

use common::*;
use devmem::{devmem_state, devmem_status, ffi};

fn fill_byte(ptr: u64, len: usize, byte: u8) -> usize {
    // SAFETY: emulated device memory is host memory, mapped read-write while awake.
    let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    bytes.iter().filter(|b| **b != byte).count()
}

fn reserve(bytes: usize, wait: bool) -> devmem_status {
    ffi::devmem_reserve_host_store(bytes, i32::from(wait))
}

fn alloc_on(size: usize, device: i32, tag: &str) -> u64 {
    set_tag(tag);
    let mut p: *mut c_void = ptr::null_mut();
    ok(ffi::devmem_malloc(size, device, &mut p));
    p as u64
}

fn offload(list: &[&str]) -> devmem_status {
    let (_owned, ptrs) = tags(list);
    ffi::devmem_offload(ptrs.as_ptr(), ptrs.len())
}

#[track_caller]
fn require_cuda() {
    assert!(
        !level_zero() && !hip(),
        "a CUDA-only test ran on another backend: scripts/test.sh filters cuda_only_* out there"
    );
}

// --- Synchronisation -------------------------------------------------------------------------

/// Guards the device wait at the start of a sleep: application work still queued on the
/// device must land before the bytes are saved and the memory unmapped.
#[test]
fn cuda_only_sleep_waits_for_application_work_before_saving() {
    setup(&[]);
    require_cuda();
    let p = alloc(4 * MIB, "weights");
    fill(p, 4 * MIB, 1);
    emu().launch_fill(p, 4 * MIB, 0xab);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(
        fill_byte(p, 4 * MIB, 0xab),
        0,
        "the kernel's bytes were saved"
    );
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// Guards the device wait in free: queued application work must finish before the memory it
/// writes is unmapped.
#[test]
fn cuda_only_free_waits_for_application_work() {
    setup(&[]);
    require_cuda();
    let p = alloc(4 * MIB, "weights");
    emu().launch_fill(p, 4 * MIB, 0x5a);
    ok(ffi::devmem_free(p as *mut c_void));
    assert_eq!(emu().counters().pending, 0);
    assert_no_device_leaks();
}

/// Guards the batch marker waits: with batches of 4 MiB each allocation is unmapped right
/// after its own batch's copies, while later batches still copy.
#[test]
fn each_batch_is_unmapped_only_after_its_copies() {
    setup(&[("DEVMEM_COPY_BATCH_MB", "4")]);
    let ptrs: Vec<u64> = (0..4).map(|_| alloc(4 * MIB, "weights")).collect();
    for (i, p) in ptrs.iter().enumerate() {
        fill(*p, 4 * MIB, 10 + i as u64);
    }
    ok(sleep(&["weights"]));
    ok(wake(None));
    for (i, p) in ptrs.iter().enumerate() {
        assert_eq!(mismatches(*p, 4 * MIB, 10 + i as u64), 0, "allocation {i}");
    }
    free_all(&ptrs);
    release_store_and_assert_clean();
}

/// Guards wake's copy wait: wake returns only when every byte is back.
#[test]
fn wake_returns_only_after_its_copies() {
    setup(&[]);
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 3);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(emu().counters().pending, 0, "no copy is still queued");
    assert_eq!(mismatches(p, 8 * MIB, 3), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// A sleep that fails halfway waits for every marker it recorded (returning each to the
/// backend's pool) and finishes every copy before backups go back to the store.
#[test]
fn failed_sleep_returns_every_marker_and_finishes_its_copies() {
    setup(&[("DEVMEM_COPY_BATCH_MB", "4")]);
    let mut ptrs: Vec<u64> = (0..3).map(|_| alloc(4 * MIB, "weights")).collect();
    ptrs.sort_unstable(); // sleep works in address order
    for (i, p) in ptrs.iter().enumerate() {
        fill(*p, 4 * MIB, 20 + i as u64);
    }
    emu().inject("cuMemUnmap", 2, 999);
    expect_err(sleep(&["weights"]), devmem_status::Driver, "cuMemUnmap");
    let markers = emu().counters().events;
    assert_eq!(emu().counters().pending, 0, "every queued copy ran");
    assert_eq!(state(ptrs[0]), devmem_state::Offloaded);
    assert_eq!(state(ptrs[1]), devmem_state::Mapped);
    assert_eq!(state(ptrs[2]), devmem_state::Mapped);
    assert_eq!(mismatches(ptrs[1], 4 * MIB, 21), 0);
    assert_eq!(mismatches(ptrs[2], 4 * MIB, 22), 0);
    ok(wake(None));
    ok(sleep(&["weights"]));
    assert_eq!(
        emu().counters().events,
        markers,
        "the second sleep reused the markers of the first: none leaked"
    );
    ok(wake(None));
    for (i, p) in ptrs.iter().enumerate() {
        assert_eq!(mismatches(*p, 4 * MIB, 20 + i as u64), 0, "allocation {i}");
    }
    free_all(&ptrs);
    release_store_and_assert_clean();
}

/// The emulator catches what it is meant to: unmapping memory with queued work is recorded.
#[test]
fn cuda_only_the_emulator_records_unsynchronised_unmaps() {
    setup(&[("DEVMEM_EMU_STRICT", "0")]);
    require_cuda();
    let p = alloc(2 * MIB, "weights");
    emu().launch_fill(p, 2 * MIB, 1);
    // vLLM's primitive would wait; unmap through the driver directly, as a buggy caller.
    // SAFETY: the emulator library, already loaded by devmem.
    let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("emulator");
    type Unmap = unsafe extern "C" fn(u64, usize) -> u32;
    // SAFETY: the prototype of cuMemUnmap.
    let unmap: libloading::Symbol<Unmap> = unsafe { lib.get(b"cuMemUnmap\0") }.expect("sym");
    // SAFETY: a range the emulator mapped for devmem.
    assert_eq!(unsafe { unmap(p, 2 * MIB) }, 0);
    let v = emu().violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("unmapped device memory"), "{v:?}");
}

// --- Failure paths ---------------------------------------------------------------------------

/// Wake maps the first allocation, fails to map the second, and the rollback cannot unmap the
/// first either: the first stays asleep but mapped, a later wake restores it, free releases it.
#[test]
fn wake_rollback_that_cannot_unmap_leaves_a_usable_allocation() {
    setup(&[]);
    let a = alloc(2 * MIB, "weights");
    let b = alloc(2 * MIB, "weights");
    fill(a, 2 * MIB, 31);
    fill(b, 2 * MIB, 32);
    ok(sleep(&["weights"]));
    emu().inject("cuMemMap", 2, 999);
    emu().inject("cuMemUnmap", 1, 999);
    let status = wake(None);
    assert_eq!(status, devmem_status::Driver);
    let msg = message();
    assert!(msg.contains("could not be undone"), "{msg}");
    assert!(!msg.contains("a later wake can retry"), "{msg}");
    assert_eq!(state(a), devmem_state::Offloaded);
    assert_eq!(state(b), devmem_state::Offloaded);
    ok(wake(None));
    assert_eq!(mismatches(a, 2 * MIB, 31), 0);
    assert_eq!(mismatches(b, 2 * MIB, 32), 0);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(a, 2 * MIB, 31), 0);
    free_all(&[a, b]);
    release_store_and_assert_clean();
}

/// The same double fault, then free straight away: free unmaps the stray mapping.
#[test]
fn free_after_a_double_fault_releases_everything() {
    setup(&[]);
    let a = alloc(2 * MIB, "weights");
    let b = alloc(2 * MIB, "weights");
    ok(sleep(&["weights"]));
    emu().inject("cuMemMap", 2, 999);
    emu().inject("cuMemUnmap", 1, 999);
    assert_eq!(wake(None), devmem_status::Driver);
    free_all(&[a, b]);
    release_store_and_assert_clean();
}

/// Reserving ahead pins host memory through a context of the device the process uses, not
/// device 0's (which would cost device 0 memory, or fail in EXCLUSIVE_PROCESS mode).
#[test]
fn cuda_only_reserve_uses_the_device_in_use() {
    setup(&[("DEVMEM_EMU_DEVICES", "2")]);
    require_cuda();
    let p = alloc_on(2 * MIB, 1, "weights");
    ok(reserve(32 * MIB, true));
    assert_eq!(
        emu().calls("cuDevicePrimaryCtxRetain"),
        1,
        "only device 1's context was retained"
    );
    free_all(&[p]);
    // No allocation left: the calling thread's current context (device 1) decides.
    ok(reserve(64 * MIB, true));
    assert_eq!(emu().calls("cuDevicePrimaryCtxRetain"), 1);
    release_store_and_assert_clean();
}

/// A failed unregister keeps the chunk and the counts exact: later sleeps work and a later
/// release frees it.
#[test]
fn failed_host_unregister_keeps_the_store_consistent() {
    setup(&[]);
    let p = alloc(4 * MIB, "weights");
    fill(p, 4 * MIB, 40);
    ok(sleep(&["weights"]));
    ok(wake(None));
    let held = stats(None).host_store_bytes;
    assert!(held > 0);
    emu().inject("cuMemHostUnregister", 1, 999);
    let mut freed = 0usize;
    expect_err(
        ffi::devmem_release_host_store(&mut freed),
        devmem_status::Driver,
        "cuMemHostUnregister",
    );
    assert_eq!(
        stats(None).host_store_bytes,
        held,
        "the chunk is still held"
    );
    for _ in 0..3 {
        ok(sleep(&["weights"]));
        ok(wake(None));
    }
    assert_eq!(mismatches(p, 4 * MIB, 40), 0);
    assert_eq!(stats(None).host_store_bytes, held);
    free_all(&[p]);
    release_store_and_assert_clean();
    assert_eq!(stats(None).host_store_bytes, 0);
}

struct Refree {
    target: u64,
    size: usize,
    reused: u64,
}

unsafe extern "C" fn free_and_reuse(
    info: *const devmem::devmem_allocation_info,
    data: *mut c_void,
) {
    // SAFETY: the test passes a Refree and devmem a valid info.
    let (r, info) = unsafe { (&mut *data.cast::<Refree>(), &*info) };
    if info.ptr != r.target || r.reused != 0 {
        return;
    }
    // Another thread frees the same pointer meanwhile, and a new allocation takes the
    // address. (Same thread here, inside the callback, to make the interleaving exact.)
    r.reused = 1;
    ok(ffi::devmem_set_callbacks(None, None, ptr::null_mut()));
    ok(ffi::devmem_free(r.target as *mut c_void));
    r.reused = alloc(r.size, "new");
}

/// free looks the allocation up once, carries its id across the unlocked on_free callback,
/// and never frees a new allocation that took the address meanwhile.
#[test]
fn free_never_frees_a_new_allocation_at_a_reused_address() {
    setup(&[]);
    let size = 64 * MIB;
    let p = alloc(size, "old");
    let mut r = Refree {
        target: p,
        size,
        reused: 0,
    };
    ok(ffi::devmem_set_callbacks(
        None,
        Some(free_and_reuse),
        (&mut r as *mut Refree).cast(),
    ));
    expect_err(
        ffi::devmem_free(p as *mut c_void),
        devmem_status::UnknownPointer,
        "freed by another thread",
    );
    assert_eq!(r.reused, p, "the emulator handed the address out again");
    assert_eq!(
        state(p),
        devmem_state::Mapped,
        "the new allocation is intact"
    );
    fill(p, size, 50);
    assert_eq!(mismatches(p, size, 50), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

// --- Bound on host memory --------------------------------------------------------------------

#[test]
fn absurd_reservation_fails_at_once() {
    setup(&[]);
    let p = alloc(2 * MIB, "weights");
    expect_err(
        reserve(usize::MAX, true),
        devmem_status::HostOutOfMemory,
        "host memory",
    );
    expect_err(
        reserve(usize::MAX / 4, false),
        devmem_status::HostOutOfMemory,
        "more than this machine has (MemTotal",
    );
    assert_eq!(stats(None).host_store_bytes, 0, "nothing was faulted in");
    free_all(&[p]);
    assert_no_device_leaks();
}

/// Over the cap, a sleep fails before anything is copied or released, and says why.
#[test]
fn host_limit_fails_a_sleep_before_anything_is_released() {
    setup(&[]);
    let a = alloc(32 * MIB, "weights");
    let b = alloc(16 * MIB, "kv");
    fill(a, 32 * MIB, 60);
    fill(b, 16 * MIB, 61);
    ok(ffi::devmem_set_host_limit(32 * MIB as u64));
    let mut limit = 0u64;
    ok(ffi::devmem_get_host_limit(&mut limit));
    assert_eq!(limit, 32 * MIB as u64);
    expect_err(
        offload(&["weights", "kv"]),
        devmem_status::HostOutOfMemory,
        "over its cap of 33554432 bytes",
    );
    assert_eq!(state(a), devmem_state::Mapped);
    assert_eq!(state(b), devmem_state::Mapped);
    assert_eq!(mismatches(a, 32 * MIB, 60), 0);
    assert_eq!(mismatches(b, 16 * MIB, 61), 0);
    assert_eq!(stats(None).host_store_bytes, 0, "nothing was faulted in");
    ok(offload(&["weights"])); // fits the cap exactly
    ok(wake(None));
    ok(ffi::devmem_set_host_limit(0));
    ok(ffi::devmem_get_host_limit(&mut limit));
    assert_eq!(limit, 0);
    ok(offload(&["weights", "kv"]));
    ok(wake(None));
    assert_eq!(mismatches(a, 32 * MIB, 60), 0);
    assert_eq!(mismatches(b, 16 * MIB, 61), 0);
    free_all(&[a, b]);
    release_store_and_assert_clean();
}

#[test]
fn host_limit_from_the_environment() {
    setup(&[("DEVMEM_HOST_LIMIT", "64M")]);
    let mut limit = 0u64;
    ok(ffi::devmem_get_host_limit(&mut limit));
    assert_eq!(limit, 64 * MIB as u64);
    expect_err(
        reserve(128 * MIB, true),
        devmem_status::HostOutOfMemory,
        "DEVMEM_HOST_LIMIT",
    );
    ok(reserve(32 * MIB, true));
    release_store_and_assert_clean();
}

#[test]
fn a_malformed_host_limit_is_an_error_not_ignored() {
    setup(&[("DEVMEM_HOST_LIMIT", "lots")]);
    let mut limit = 0u64;
    expect_err(
        ffi::devmem_get_host_limit(&mut limit),
        devmem_status::InvalidArgument,
        "DEVMEM_HOST_LIMIT=\"lots\"",
    );
    let p = alloc(2 * MIB, "weights");
    expect_err(
        sleep(&["weights"]),
        devmem_status::InvalidArgument,
        "DEVMEM_HOST_LIMIT",
    );
    assert_eq!(state(p), devmem_state::Mapped);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// A real memory cgroup (v1 here, v2 where mounted so): the process moves itself into a
/// cgroup with room for its device memory but not for the backups, and a sleep fails cleanly
/// instead of the OOM killer ending the test. scripts/test.sh runs it only where a memory
/// cgroup can be created.
#[test]
fn needs_cgroup_a_memory_cgroup_bounds_the_store() {
    setup(&[]);
    let cg = Cgroup::create(256 * MIB as u64).expect("a writable memory cgroup");
    let a = alloc(128 * MIB, "weights");
    fill(a, 128 * MIB, 70);
    let status = sleep(&["weights"]);
    let msg = message();
    drop(cg);
    assert_eq!(status, devmem_status::HostOutOfMemory, "{msg}");
    assert!(msg.contains("memory cgroup"), "{msg}");
    assert_eq!(state(a), devmem_state::Mapped);
    assert_eq!(mismatches(a, 128 * MIB, 70), 0);
    ok(sleep(&["weights"])); // back in the parent cgroup, it fits
    ok(wake(None));
    assert_eq!(mismatches(a, 128 * MIB, 70), 0);
    free_all(&[a]);
    release_store_and_assert_clean();
}

/// A child memory cgroup holding this process until dropped.
struct Cgroup {
    dir: std::path::PathBuf,
    parent_procs: std::path::PathBuf,
}

impl Cgroup {
    fn create(limit: u64) -> std::io::Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let mut found = None;
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next());
            let path = path.unwrap_or("/").trim_start_matches('/');
            if controllers.split(',').any(|c| c == "memory") {
                let base = std::path::Path::new("/sys/fs/cgroup/memory").join(path);
                found = Some((base, "memory.limit_in_bytes"));
            } else if controllers.is_empty() && found.is_none() {
                let base = std::path::Path::new("/sys/fs/cgroup").join(path);
                if base.join("memory.max").exists() {
                    found = Some((base, "memory.max"));
                }
            }
        }
        let (base, limit_file) = found.ok_or_else(|| std::io::Error::other("no memory cgroup"))?;
        let dir = base.join(format!("devmem-test-{}", std::process::id()));
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join(limit_file), limit.to_string())?;
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(Self {
            dir,
            parent_procs: base.join("cgroup.procs"),
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.parent_procs, std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

// --- Thread creation -------------------------------------------------------------------------

/// The OS refuses the host-store thread: the sleep fails with a message and releases nothing,
/// nothing hangs, and the next sleep works.
#[test]
fn refused_grower_thread_fails_the_sleep_cleanly() {
    setup(&[]);
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 80);
    devmem::threads::fail_spawns(0, 1);
    expect_err(
        sleep(&["weights"]),
        devmem_status::HostOutOfMemory,
        "could not start the host-store thread",
    );
    assert_eq!(state(p), devmem_state::Mapped);
    assert_eq!(mismatches(p, 8 * MIB, 80), 0);
    devmem::threads::fail_spawns(0, 1);
    expect_err(
        reserve(16 * MIB, true),
        devmem_status::HostOutOfMemory,
        "could not start the host-store thread",
    );
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, 8 * MIB, 80), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// Every worker and fault-in thread refused: the grower does all the work itself.
#[test]
fn refused_workers_only_slow_growth() {
    setup(&[("DEVMEM_HOST_WORKERS", "4"), ("DEVMEM_HOST_THREADS", "4")]);
    let p = alloc(96 * MIB, "weights");
    fill(p, 96 * MIB, 81);
    devmem::threads::fail_spawns(1, usize::MAX);
    ok(sleep(&["weights"]));
    ok(wake(None));
    devmem::threads::fail_spawns(0, 0);
    assert_eq!(mismatches(p, 96 * MIB, 81), 0);
    free_all(&[p]);
    release_store_and_assert_clean();
}

/// The child half of the RLIMIT_NPROC test: run only inside the limited process.
#[test]
#[ignore = "run by needs_unprivileged_nproc_limit_never_hangs inside a process limited to one task"]
fn nproc_child() {
    assert_eq!(std::env::var("DEVMEM_NPROC_CHILD").as_deref(), Ok("1"));
    setup(&[]);
    assert!(
        std::thread::Builder::new().spawn(|| ()).is_err(),
        "the limit should refuse every thread"
    );
    let p = alloc(8 * MIB, "weights");
    fill(p, 8 * MIB, 90);
    expect_err(
        sleep(&["weights"]),
        devmem_status::HostOutOfMemory,
        "could not start the host-store thread",
    );
    assert_eq!(state(p), devmem_state::Mapped);
    assert_eq!(mismatches(p, 8 * MIB, 90), 0);
    ok(sleep(&[])); // discarding needs no host memory and no thread
    ok(wake(None));
    free_all(&[p]);
    assert_no_device_leaks();
}

/// `prlimit --nproc=1` as an unprivileged user (through setpriv when run as root): devmem
/// meets a real refusal from the kernel, fails the sleep and never hangs or panics.
#[test]
fn needs_setpriv_unprivileged_nproc_limit_never_hangs() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let prefix: &[&str] = if root {
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "prlimit",
            "--nproc=1",
        ]
    } else {
        &["prlimit", "--nproc=1"]
    };
    run_child_test(
        prefix,
        "nproc_child",
        &[("DEVMEM_NPROC_CHILD", "1")],
        std::time::Duration::from_secs(120),
    );
}

// --- Double faults found by fuzzing ----------------------------------------------------------

/// malloc's map fails and so does the release of the memory it created (found by
/// `fuzz/fuzz_targets/api_sequence.rs`: the handle leaked for the life of the process). The
/// handle is kept and released by the next operation.
#[test]
fn malloc_keeps_what_a_failed_undo_leaves_and_releases_it_later() {
    setup(&[]);
    emu().inject("cuMemMap", 1, 999);
    emu().inject("cuMemRelease", 1, 999);
    set_tag("x");
    let mut p: *mut c_void = ptr::null_mut();
    expect_err(
        ffi::devmem_malloc(2 * MIB, 0, &mut p),
        devmem_status::Driver,
        "cuMemMap",
    );
    assert_eq!(emu().counters().handles, 1, "the handle is still held");
    let q = alloc(2 * MIB, "x");
    ok(ffi::devmem_free(q as *mut c_void)); // releases the stray handle first
    assert_no_device_leaks();
}

/// The same inside a wake: the second allocation's fresh memory cannot be mapped nor released.
/// The allocation keeps that handle; the next wake maps it, free releases it.
#[test]
fn wake_keeps_what_a_failed_undo_leaves_on_the_allocation() {
    setup(&[]);
    let a = alloc(2 * MIB, "weights");
    let b = alloc(2 * MIB, "weights");
    fill(a, 2 * MIB, 91);
    fill(b, 2 * MIB, 92);
    ok(sleep(&["weights"]));
    emu().inject("cuMemMap", 2, 999);
    emu().inject("cuMemRelease", 1, 999);
    assert_eq!(wake(None), devmem_status::Driver);
    assert_eq!(
        emu().counters().handles,
        1,
        "the failed map's handle is kept"
    );
    ok(wake(None));
    assert_eq!(mismatches(a, 2 * MIB, 91), 0);
    assert_eq!(mismatches(b, 2 * MIB, 92), 0);
    free_all(&[a, b]);
    release_store_and_assert_clean();
}

/// set_access fails and so does the unmap that undoes the map: the mapping stays until the
/// next operation unmaps it, releases the memory and frees the reservation.
#[test]
fn malloc_keeps_a_mapping_whose_undo_failed() {
    setup(&[]);
    if level_zero() {
        // zeVirtualMemMap grants access itself: there is no separate access step to fail.
        emu().inject("cuMemMap", 1, 999);
    } else {
        emu().inject("cuMemSetAccess", 1, 999);
        emu().inject("cuMemUnmap", 1, 999);
    }
    set_tag("x");
    let mut p: *mut c_void = ptr::null_mut();
    assert_ne!(
        ffi::devmem_malloc(2 * MIB, 0, &mut p),
        devmem_status::Success
    );
    let q = alloc(2 * MIB, "x");
    ok(ffi::devmem_free(q as *mut c_void));
    assert_no_device_leaks();
}
