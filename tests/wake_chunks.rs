//! Large allocations in chunks so a wake overlaps mapping with copying (issue 23, part 2), on
//! every face of the emulator (`DEVMEM_TEST_BACKEND`): the order of maps and copies from the
//! emulator's event log, a rollback that waits for the copies queued into mapped chunks, bytes
//! after a wake of a size that is not a multiple of the chunk, small allocations in one piece,
//! and `DEVMEM_WAKE_CHUNK_MB` parsed strictly.
//!
//! The tests use 4 MiB chunks (`DEVMEM_WAKE_CHUNK_MB=4`: allocations of 8 MiB or more are
//! chunked) and turn HIP's every-allocation chunking off (`DEVMEM_CHUNK_SIZE=0`), so each face
//! runs the same layer.

mod common;

use std::ffi::c_void;
use std::ptr;
use std::sync::OnceLock;

use common::*;
use devmem::{devmem_state, devmem_status as S, ffi};

/// Mirrors the emulator's `CuemuEvent`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Event {
    kind: u32,
    addr: u64,
    len: u64,
}

const MAP: u32 = 1;
const COPY_QUEUED: u32 = 2;
const COPY_DONE: u32 = 3;
const UNMAP: u32 = 4;

type EventLog = unsafe extern "C" fn(*mut Event, usize) -> u64;
type ClearLog = unsafe extern "C" fn() -> u32;

fn log_fns() -> &'static (libloading::Library, EventLog, ClearLog) {
    static FNS: OnceLock<(libloading::Library, EventLog, ClearLog)> = OnceLock::new();
    FNS.get_or_init(|| {
        // SAFETY: the emulator library devmem loaded, opened again for its test controls.
        let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("open emulator");
        // SAFETY: the types match the emulator's definitions.
        let (log, clear) = unsafe {
            (
                *lib.get::<EventLog>(b"cuemu_event_log\0")
                    .expect("cuemu_event_log"),
                *lib.get::<ClearLog>(b"cuemu_clear_event_log\0")
                    .expect("cuemu_clear_event_log"),
            )
        };
        (lib, log, clear)
    })
}

fn clear_log() {
    // SAFETY: no arguments.
    assert_eq!(unsafe { (log_fns().2)() }, 0);
}

/// The emulator's events touching `[va, va+len)`, in order.
fn events_in(va: u64, len: usize) -> Vec<Event> {
    let log = log_fns().1;
    // SAFETY: a null buffer with no room only asks for the count.
    let n = unsafe { log(ptr::null_mut(), 0) } as usize;
    let mut out = vec![Event::default(); n];
    // SAFETY: `out` has room for `n` entries.
    unsafe { log(out.as_mut_ptr(), n) };
    out.retain(|e| e.addr >= va && e.addr < va + len as u64);
    out
}

const CHUNK: usize = 4 * MIB;

fn chunked_setup(extra: &[(&str, &str)]) {
    let mut env = vec![("DEVMEM_WAKE_CHUNK_MB", "4"), ("DEVMEM_CHUNK_SIZE", "0")];
    env.extend_from_slice(extra);
    setup(&env);
}

/// The allocation's chunks as `devmem_get_allocation_chunks` lists them: sizes only.
fn chunk_sizes(p: u64) -> Vec<usize> {
    let mut count = 0usize;
    let st = ffi::devmem_get_allocation_chunks(
        p as *const c_void,
        ptr::null_mut(),
        ptr::null_mut(),
        0,
        &mut count,
    );
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
    assert!(handles.iter().all(|h| *h != 0), "{handles:?}");
    sizes
}

/// Chunk k+1 is mapped after chunk k's copy was queued and before any copy ran: the copy
/// engine has chunk k's bytes while the next chunk is created and mapped.
#[test]
fn wake_maps_each_chunk_after_queueing_the_previous_chunks_copy() {
    chunked_setup(&[]);
    let size = 14 * MIB; // 4 + 4 + 4 + 2 MiB
    let p = alloc(size, "weights");
    assert_eq!(chunk_sizes(p), vec![CHUNK, CHUNK, CHUNK, 2 * MIB]);
    fill(p, size, 7);
    ok(sleep(&["weights"]));
    clear_log();
    ok(wake(None));
    assert_eq!(mismatches(p, size, 7), 0);
    let events = events_in(p, size);
    let maps: Vec<usize> = (0..events.len())
        .filter(|&i| events[i].kind == MAP)
        .collect();
    let starts: Vec<u64> = maps.iter().map(|&i| events[i].addr).collect();
    let want: Vec<u64> = (0..4).map(|k| p + (k * CHUNK) as u64).collect();
    assert_eq!(
        starts, want,
        "one map per chunk, in address order: {events:?}"
    );
    for k in 1..4 {
        let previous = want[k - 1]..want[k];
        let queued_before = events[..maps[k]]
            .iter()
            .any(|e| e.kind == COPY_QUEUED && previous.contains(&e.addr));
        assert!(
            queued_before,
            "chunk {k} was mapped before chunk {}'s copy was queued: {events:?}",
            k - 1
        );
        let crosses = events
            .iter()
            .filter(|e| e.kind == COPY_QUEUED && previous.contains(&e.addr))
            .any(|e| e.addr + e.len > want[k]);
        assert!(!crosses, "a copy crosses into chunk {k}: {events:?}");
    }
    let first_done = events.iter().position(|e| e.kind == COPY_DONE);
    assert!(
        first_done.is_some_and(|d| d > maps[3]),
        "copies run at the wait after the last map (the emulator's asynchrony): {events:?}"
    );
    free_all(&[p]);
    assert_no_device_leaks();
}

/// Bytes come back exactly for sizes that are not a multiple of the chunk (nor of the
/// granularity), and across several chunked and unchunked allocations in one wake.
#[test]
fn bytes_survive_a_chunked_wake_for_uneven_sizes() {
    chunked_setup(&[]);
    let sizes = [13 * MIB + 4097, 8 * MIB, 3 * MIB + 1, 9 * MIB - 1];
    let ptrs: Vec<u64> = sizes.iter().map(|&n| alloc(n, "weights")).collect();
    for (i, (&p, &n)) in ptrs.iter().zip(&sizes).enumerate() {
        fill(p, n, 100 + i as u64);
    }
    for _ in 0..2 {
        ok(sleep(&["weights"]));
        ok(wake(None));
        for (i, (&p, &n)) in ptrs.iter().zip(&sizes).enumerate() {
            assert_eq!(mismatches(p, n, 100 + i as u64), 0, "allocation {i}");
        }
    }
    assert_eq!(chunk_sizes(ptrs[0]).len(), 4);
    assert_eq!(chunk_sizes(ptrs[1]), vec![CHUNK, CHUNK]);
    assert_eq!(chunk_sizes(ptrs[2]).len(), 1);
    free_all(&ptrs);
    assert_no_device_leaks();
}

/// Allocations under two chunks stay one driver handle: one create per `my_malloc`.
#[test]
fn allocations_under_two_chunks_stay_one_piece() {
    chunked_setup(&[]);
    let before = emu().calls("cuMemCreate");
    let p = ffi::my_malloc((2 * CHUNK - 2 * MIB) as isize, 0, ptr::null_mut());
    assert!(!p.is_null(), "{}", message());
    assert_eq!(emu().calls("cuMemCreate") - before, 1);
    assert_eq!(chunk_sizes(p as u64), vec![2 * CHUNK - 2 * MIB]);
    let q = ffi::my_malloc((2 * CHUNK) as isize, 0, ptr::null_mut());
    assert!(!q.is_null(), "{}", message());
    assert_eq!(emu().calls("cuMemCreate") - before, 3);
    ffi::my_free(p, (2 * CHUNK - 2 * MIB) as isize, 0, ptr::null_mut());
    ffi::my_free(q, (2 * CHUNK) as isize, 0, ptr::null_mut());
    assert_no_device_leaks();
}

/// With no setting, CUDA and HIP chunk at 512 MiB (so test-sized allocations are one piece)
/// and Level Zero not at all; `0` turns it off.
#[test]
fn the_default_chunk_leaves_test_sized_allocations_whole_and_zero_turns_it_off() {
    setup(&[("DEVMEM_CHUNK_SIZE", "0"), ("DEVMEM_EMU_CAPACITY", "3G")]);
    let p = alloc(1022 * MIB, "weights");
    assert_eq!(chunk_sizes(p), vec![1022 * MIB]);
    let q = alloc(1024 * MIB, "weights");
    let want = if level_zero() {
        vec![1024 * MIB]
    } else {
        vec![512 * MIB, 512 * MIB]
    };
    assert_eq!(chunk_sizes(q), want);
    free_all(&[p, q]);
    assert_no_device_leaks();
}

#[test]
fn zero_turns_wake_chunks_off() {
    setup(&[
        ("DEVMEM_CHUNK_SIZE", "0"),
        ("DEVMEM_WAKE_CHUNK_MB", "0"),
        ("DEVMEM_EMU_CAPACITY", "2G"),
    ]);
    let p = alloc(1024 * MIB, "weights");
    assert_eq!(chunk_sizes(p), vec![1024 * MIB]);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// `DEVMEM_WAKE_CHUNK_MB` takes a whole number of MiB and nothing else: each bad value fails
/// the backend's load naming the variable (a failed load is not cached).
#[test]
fn wake_chunk_setting_is_parsed_strictly() {
    setup(&[]);
    for bad in [
        "lots",
        "-1",
        "4.5",
        "4M",
        "+4",
        "0x10",
        "1048577",
        "99999999999999999999",
    ] {
        // SAFETY (of set_var): single-threaded test process.
        std::env::set_var("DEVMEM_WAKE_CHUNK_MB", bad);
        let mut p: *mut c_void = ptr::null_mut();
        expect_err(
            ffi::devmem_malloc(2 * MIB, 0, &mut p),
            S::InvalidArgument,
            &format!("DEVMEM_WAKE_CHUNK_MB={bad} is not a whole number of MiB"),
        );
        assert!(p.is_null());
    }
    std::env::set_var("DEVMEM_WAKE_CHUNK_MB", " 6 ");
    std::env::set_var("DEVMEM_CHUNK_SIZE", "0");
    let p = alloc(12 * MIB, "weights");
    assert_eq!(chunk_sizes(p), vec![6 * MIB, 6 * MIB]);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// A wake that fails on the third chunk's create (`nth` = 3) or map waits for the copies
/// already queued into chunks 1 and 2 before unmapping them (no violation), releases every
/// chunk, keeps the backup, leaves the allocation asleep and names the call; a retry restores
/// every byte.
fn rollback_on_third_chunk(call: &str, code: u32, status: S) {
    chunked_setup(&[("DEVMEM_EMU_STRICT", "0")]);
    let size = 14 * MIB;
    let p = alloc(size, "weights");
    fill(p, size, 9);
    ok(sleep(&["weights"]));
    let before = emu().counters();
    clear_log();
    emu().inject(call, 3, code);
    expect_err(wake(None), status, call);
    assert!(message().contains("every backup is kept"), "{}", message());
    assert_eq!(emu().violations(), Vec::<String>::new());
    assert_eq!(state(p), devmem_state::Offloaded);
    let after = emu().counters();
    assert_eq!(
        (after.handles, after.mappings, after.pending),
        (before.handles, before.mappings, 0)
    );
    let events = events_in(p, size);
    let first_unmap = events.iter().position(|e| e.kind == UNMAP);
    let last_done = events.iter().rposition(|e| e.kind == COPY_DONE);
    assert!(
        first_unmap.is_some() && last_done.is_some() && last_done < first_unmap,
        "the queued copies ran before the first unmap: {events:?}"
    );
    emu().clear_faults();
    ok(wake(None));
    assert_eq!(mismatches(p, size, 9), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn wake_failing_on_the_third_chunks_create_waits_for_queued_copies_before_undoing() {
    rollback_on_third_chunk("cuMemCreate", 2, S::OutOfMemory);
}

#[test]
fn wake_failing_on_the_third_chunks_map_waits_for_queued_copies_before_undoing() {
    rollback_on_third_chunk("cuMemMap", 999, S::Driver);
}

/// Real out-of-memory part way through a chunked wake: something else took the memory while
/// devmem slept, so only two of the four chunks fit.
#[test]
fn wake_out_of_memory_part_way_through_a_chunked_allocation_rolls_back() {
    chunked_setup(&[("DEVMEM_EMU_CAPACITY", "64M"), ("DEVMEM_EMU_STRICT", "0")]);
    let size = 14 * MIB;
    let p = alloc(size, "weights");
    fill(p, size, 11);
    ok(sleep(&["weights"]));
    let blocker = alloc(56 * MIB, "other"); // 8 MiB left: chunks 1 and 2
    expect_err(wake(Some(&["weights"])), S::OutOfMemory, "cuMemCreate");
    assert!(message().contains("piece 3 of 4"), "{}", message());
    assert_eq!(emu().violations(), Vec::<String>::new());
    assert_eq!(state(p), devmem_state::Offloaded);
    assert_eq!(
        emu().counters().used_bytes,
        56 * MIB as u64,
        "only the blocker holds memory"
    );
    ok(ffi::devmem_free(blocker as *mut c_void));
    ok(wake(None));
    assert_eq!(mismatches(p, size, 11), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// vLLM's pair over a range the caller reserved (CUDA's form): `create_and_map` of a large
/// range creates chunks, `unmap_and_release` drops every one of them.
#[test]
fn cuda_only_vllm_create_and_map_and_unmap_and_release_handle_chunks() {
    chunked_setup(&[]);
    assert!(
        !level_zero() && !hip(),
        "CUDA-only test run on another backend (the caller reserves through the CUDA face)"
    );
    let p = alloc(2 * MIB, "x"); // gives this thread the primary context
                                 // SAFETY: the emulator library, for the driver's reservation calls.
    let lib = unsafe { libloading::Library::new(emulator_path()) }.expect("emulator");
    type Reserve = unsafe extern "C" fn(*mut u64, usize, usize, u64, u64) -> u32;
    type FreeVa = unsafe extern "C" fn(u64, usize) -> u32;
    // SAFETY: the types match the driver prototypes.
    let (reserve, free_va) = unsafe {
        (
            *lib.get::<Reserve>(b"cuMemAddressReserve\0").expect("sym"),
            *lib.get::<FreeVa>(b"cuMemAddressFree\0").expect("sym"),
        )
    };
    let size = 12 * MIB;
    let mut va = 0u64;
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { reserve(&mut va, size, 0, 0, 0) }, 0);
    let handles_before = emu().counters().handles;
    let mut handle: std::ffi::c_ulonglong = 0;
    assert_eq!(
        ffi::create_and_map(0, size as isize, va, &mut handle),
        0,
        "{}",
        message()
    );
    assert_eq!(
        emu().counters().handles - handles_before,
        3,
        "three 4 MiB chunks"
    );
    fill(va, size, 12);
    assert_eq!(mismatches(va, size, 12), 0);
    assert_eq!(
        ffi::unmap_and_release(0, size as isize, va, &mut handle),
        0,
        "{}",
        message()
    );
    assert_eq!(emu().counters().handles, handles_before);
    // SAFETY: frees the reservation made above.
    assert_eq!(unsafe { free_va(va, size) }, 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// A restore copy that fails after another copy into the same allocation was queued: the undo
/// waits for that copy before unmapping (chunked: the copies queued into earlier chunks; one
/// piece: the backup's first host piece, the allocation spanning two 32 MiB host chunks).
fn copy_failure_after_a_queued_copy(chunk_mb: &str, size: usize) {
    setup(&[
        ("DEVMEM_WAKE_CHUNK_MB", chunk_mb),
        ("DEVMEM_CHUNK_SIZE", "0"),
        ("DEVMEM_EMU_STRICT", "0"),
    ]);
    let p = alloc(size, "weights");
    fill(p, size, 5);
    ok(sleep(&["weights"]));
    emu().inject("cuMemcpyHtoDAsync_v2", 2, 999);
    expect_err(wake(None), S::Driver, "cuMemcpyHtoDAsync");
    assert_eq!(emu().violations(), Vec::<String>::new());
    assert_eq!(state(p), devmem_state::Offloaded);
    assert_eq!(emu().counters().mappings, 0);
    emu().clear_faults();
    ok(wake(None));
    assert_eq!(mismatches(p, size, 5), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn a_failed_copy_into_a_later_chunk_waits_for_the_earlier_chunks_copies() {
    copy_failure_after_a_queued_copy("4", 14 * MIB);
}

#[test]
fn a_failed_copy_into_one_piece_waits_for_its_first_copy() {
    copy_failure_after_a_queued_copy("0", 48 * MIB);
}

/// Review sweep: a wake of one chunked allocation between two others (one chunked, one
/// whole) failing at the `nth` call of `call`, for every `nth` the wake makes: nothing held
/// afterwards, every allocation asleep with its backup, no violation, and a retry restores
/// every byte.
fn sweep_failures(call: &str, code: u32) {
    chunked_setup(&[("DEVMEM_EMU_STRICT", "0")]);
    let sizes = [9 * MIB, 2 * MIB, 14 * MIB + 4096];
    let ptrs: Vec<u64> = sizes.iter().map(|&n| alloc(n, "weights")).collect();
    for (i, (&p, &n)) in ptrs.iter().zip(&sizes).enumerate() {
        fill(p, n, 40 + i as u64);
    }
    ok(sleep(&["weights"]));
    let before = emu().counters();
    let calls_before = emu().calls(call);
    ok(wake(None));
    let per_wake = emu().calls(call) - calls_before;
    assert!(per_wake > 0, "{call} is not called by a wake");
    ok(sleep(&["weights"]));
    for nth in 1..=per_wake {
        emu().inject(call, nth, code);
        assert_ne!(wake(None), S::Success, "{call} #{nth}");
        emu().clear_faults();
        assert_eq!(emu().violations(), Vec::<String>::new(), "{call} #{nth}");
        for &p in &ptrs {
            assert_eq!(state(p), devmem_state::Offloaded, "{call} #{nth}");
        }
        let after = emu().counters();
        assert_eq!(
            (
                after.handles,
                after.mappings,
                after.pending,
                after.used_bytes
            ),
            (before.handles, before.mappings, 0, before.used_bytes),
            "{call} #{nth}: {}",
            message()
        );
        ok(wake(None));
        for (i, (&p, &n)) in ptrs.iter().zip(&sizes).enumerate() {
            assert_eq!(mismatches(p, n, 40 + i as u64), 0, "{call} #{nth}: {i}");
        }
        ok(sleep(&["weights"]));
    }
    ok(wake(None));
    free_all(&ptrs);
    assert_no_device_leaks();
}

#[test]
fn sweep_create_failure_at_every_chunk() {
    sweep_failures("cuMemCreate", 2);
}

#[test]
fn sweep_map_failure_at_every_chunk() {
    sweep_failures("cuMemMap", 999);
}

#[test]
fn sweep_set_access_failure_at_every_chunk() {
    if level_zero() {
        return;
    }
    sweep_failures("cuMemSetAccess", 999);
}

#[test]
fn sweep_copy_failure_at_every_chunk() {
    sweep_failures("cuMemcpyHtoDAsync_v2", 999);
}

/// Review: a wake whose rollback cannot unmap (or release) a chunk: the allocation must stay
/// asleep with its backup, and freeing it must give every chunk back.
fn undo_fails_then(call: &str, free_first: bool) {
    chunked_setup(&[("DEVMEM_EMU_STRICT", "0")]);
    let size = 14 * MIB;
    let p = alloc(size, "weights");
    fill(p, size, 3);
    ok(sleep(&["weights"]));
    // The 3rd chunk's create fails; the undo's first `call` fails too.
    emu().inject("cuMemCreate", 3, 2);
    emu().inject(call, 1, 999);
    assert_ne!(wake(None), S::Success);
    emu().clear_faults();
    assert_eq!(emu().violations(), Vec::<String>::new());
    assert_ne!(state(p), devmem_state::Mapped);
    if free_first {
        ok(ffi::devmem_free(p as *mut c_void));
        assert_no_device_leaks();
        return;
    }
    ok(wake(None));
    assert_eq!(mismatches(p, size, 3), 0);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, size, 3), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn undo_unmap_failure_then_wake() {
    undo_fails_then("cuMemUnmap", false);
}

#[test]
fn undo_unmap_failure_then_free() {
    undo_fails_then("cuMemUnmap", true);
}

#[test]
fn undo_release_failure_then_wake() {
    undo_fails_then("cuMemRelease", false);
}

#[test]
fn undo_release_failure_then_free() {
    undo_fails_then("cuMemRelease", true);
}

/// Review: discard and free of a chunked allocation in each state.
#[test]
fn chunked_discard_and_free_in_every_state() {
    chunked_setup(&[]);
    let size = 10 * MIB;
    let a = alloc(size, "a");
    let b = alloc(size, "b");
    let c = alloc(size, "c");
    fill(a, size, 1);
    fill(b, size, 2);
    fill(c, size, 3);
    // a and c offloaded, b discarded: free a asleep, b discarded, c after its wake.
    ok(sleep(&["a", "c"]));
    assert_eq!(state(a), devmem_state::Offloaded);
    assert_eq!(state(b), devmem_state::Discarded);
    ok(ffi::devmem_free(a as *mut c_void));
    ok(ffi::devmem_free(b as *mut c_void));
    ok(wake(None));
    assert_eq!(mismatches(c, size, 3), 0);
    free_all(&[c]);
    assert_no_device_leaks();
}

/// Review: a chunked allocation woken piece by piece exports one descriptor per chunk, another
/// chunked allocation adopts them, and both sleep, wake and free cleanly.
#[test]
fn a_woken_chunked_allocation_is_exported_and_adopted_piece_by_piece() {
    if level_zero() {
        return;
    }
    chunked_setup(&[]);
    let size = 14 * MIB;
    let a = alloc(size, "a");
    let b = alloc(size, "b");
    fill(a, size, 21);
    fill(b, size, 22);
    ok(sleep(&["a", "b"]));
    ok(wake(None));
    let pieces = devmem::core::export_allocation(a).expect("export");
    assert_eq!(
        pieces.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![CHUNK, CHUNK, CHUNK, 2 * MIB]
    );
    let borrowed: Vec<(usize, std::os::fd::BorrowedFd<'_>)> = pieces
        .iter()
        .map(|(n, fd)| (*n, std::os::fd::AsFd::as_fd(fd)))
        .collect();
    devmem::core::adopt_allocation(b, &borrowed, false).expect("adopt");
    drop(borrowed);
    drop(pieces);
    assert_eq!(mismatches(b, size, 21), 0);
    fill(a, size, 23);
    assert_eq!(mismatches(b, size, 23), 0, "the same memory");
    ok(sleep(&["a", "b"]));
    ok(wake(None));
    assert_eq!(mismatches(a, size, 23), 0);
    assert_eq!(mismatches(b, size, 23), 0);
    assert_eq!(chunk_sizes(b), vec![CHUNK, CHUNK, CHUNK, 2 * MIB]);
    free_all(&[a, b]);
    assert_no_device_leaks();
}

/// Review: the undo of a failed chunked wake and the rollback after it both fail to unmap
/// the same chunk: the allocation stays asleep but partly mapped (one chunk of four). The next
/// wake must map the other chunks before copying into them, and restore every byte.
#[test]
fn a_partly_mapped_chunked_allocation_wakes_whole() {
    chunked_setup(&[("DEVMEM_EMU_STRICT", "0")]);
    let size = 14 * MIB;
    let p = alloc(size, "weights");
    fill(p, size, 17);
    ok(sleep(&["weights"]));
    emu().inject("cuMemCreate", 3, 2);
    // Unmap calls: the undo's first (chunk 2) fails, its second (chunk 1) works, the
    // rollback's (chunk 2 again) fails.
    emu().inject("cuMemUnmap", 1, 999);
    emu().inject("cuMemUnmap", 2, 999);
    assert_ne!(wake(None), S::Success);
    emu().clear_faults();
    assert_eq!(emu().mapping(p + CHUNK as u64), 2, "chunk 2 still mapped");
    assert_eq!(emu().mapping(p), 0, "chunk 1 unmapped");
    assert_ne!(state(p), devmem_state::Mapped);
    let woke = wake(None);
    assert_eq!(woke, S::Success, "{}", message());
    assert_eq!(emu().violations(), Vec::<String>::new());
    assert_eq!(mismatches(p, size, 17), 0);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(p, size, 17), 0);
    free_all(&[p]);
    assert_no_device_leaks();
}

/// Review: a chunk that is not a multiple of the granularity (3 MiB on 2 MiB pages) is
/// rounded up to 4 MiB, while the threshold stays two chunks of the setting (6 MiB): sizes on
/// both sides of it keep their bytes across sleeps.
#[test]
fn a_chunk_off_the_granularity_rounds_up_and_keeps_bytes() {
    setup(&[("DEVMEM_WAKE_CHUNK_MB", "3"), ("DEVMEM_CHUNK_SIZE", "0")]);
    let sizes = [4 * MIB, 6 * MIB, 8 * MIB, 11 * MIB + 1];
    let ptrs: Vec<u64> = sizes.iter().map(|&n| alloc(n, "weights")).collect();
    for (i, (&p, &n)) in ptrs.iter().zip(&sizes).enumerate() {
        fill(p, n, 60 + i as u64);
    }
    for _ in 0..2 {
        ok(sleep(&["weights"]));
        ok(wake(None));
        for (i, (&p, &n)) in ptrs.iter().zip(&sizes).enumerate() {
            assert_eq!(mismatches(p, n, 60 + i as u64), 0, "allocation {i}");
        }
    }
    assert_eq!(chunk_sizes(ptrs[0]), vec![4 * MIB]);
    assert_eq!(chunk_sizes(ptrs[1]), vec![4 * MIB, 2 * MIB]);
    assert_eq!(chunk_sizes(ptrs[3]), vec![4 * MIB, 4 * MIB, 4 * MIB]);
    free_all(&ptrs);
    assert_no_device_leaks();
}
