//! Fault-injection sweep on the emulator: for every driver call devmem makes during malloc,
//! free, sleep, offload, discard and wake, fail it at every position (1st call, 2nd call, ...)
//! with out-of-memory and with a generic driver error. After each failure: the status is right
//! and the message names the call; every allocation is consistent (mapped exactly when its
//! state says so, mapped ones still hold their bytes); a retry after the fault clears succeeds
//! and every offloaded byte comes back; after freeing everything no handle, mapping,
//! reservation or registered host memory is left.
//!
//! `DEVMEM_SWEEP_ALLOCS` sets the allocations per tag (default 6 in CI; the documented longer
//! run uses 150, i.e. 300 allocations).

mod common;

use std::ffi::c_void;

use common::*;
use devmem::{devmem_state, devmem_status, ffi};

const FUNCTIONS: &[&str] = &[
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuStreamSynchronize",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
];
/// The same for the Level Zero backend.
const ZE_FUNCTIONS: &[&str] = &[
    "zeVirtualMemReserve",
    "zeVirtualMemFree",
    "zePhysicalMemCreate",
    "zePhysicalMemDestroy",
    "zeVirtualMemMap",
    "zeVirtualMemUnmap",
    "zeMemAllocHost",
    "zeMemFree",
    "zeCommandListAppendMemoryCopy",
    "zeCommandListAppendSignalEvent",
    "zeEventHostSynchronize",
    "zeEventHostReset",
    "zeEventPoolCreate",
    "zeEventCreate",
    "zeCommandListCreateImmediate",
];
/// The same for the HIP backend (whose re-reserve and chunk layer is on by default).
const HIP_FUNCTIONS: &[&str] = &[
    "hipGetDevice",
    "hipSetDevice",
    "hipDeviceSynchronize",
    "hipMemAddressReserve",
    "hipMemAddressFree",
    "hipMemCreate",
    "hipMemRelease",
    "hipMemMap",
    "hipMemUnmap",
    "hipMemSetAccess",
    "hipMemcpyDtoHAsync",
    "hipMemcpyHtoDAsync",
    "hipStreamSynchronize",
    "hipHostRegister",
    "hipHostUnregister",
    "hipEventCreateWithFlags",
    "hipEventRecord",
    "hipEventSynchronize",
];
const CODES: &[u32] = &[2, 999];

fn functions() -> &'static [&'static str] {
    if level_zero() {
        ZE_FUNCTIONS
    } else if hip() {
        HIP_FUNCTIONS
    } else {
        FUNCTIONS
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Malloc,
    FreeMapped,
    FreeOffloaded,
    Sleep,
    Offload,
    Discard,
    Wake,
}

struct World {
    weights: Vec<u64>,
    kv: Vec<u64>,
    extra: Vec<u64>,
}

fn size_of(i: usize) -> usize {
    [2 * MIB, 4 * MIB, 6 * MIB][i % 3]
}

fn build(n: usize) -> World {
    let weights: Vec<u64> = (0..n).map(|i| alloc(size_of(i), "w")).collect();
    let kv: Vec<u64> = (0..n).map(|i| alloc(size_of(i + 1), "kv")).collect();
    for (i, p) in weights.iter().enumerate() {
        fill(*p, size_of(i), i as u64);
    }
    for (i, p) in kv.iter().enumerate() {
        fill(*p, size_of(i + 1), 500 + i as u64);
    }
    World {
        weights,
        kv,
        extra: Vec::new(),
    }
}

/// Puts the world in the state the operation starts from.
fn prepare(op: Op) {
    match op {
        Op::Wake => ok(sleep(&["w"])),
        Op::FreeOffloaded => {
            let (_o, t) = tags(&["w"]);
            ok(ffi::devmem_offload(t.as_ptr(), 1));
        }
        _ => {}
    }
}

fn run(op: Op, world: &mut World) -> devmem_status {
    match op {
        Op::Malloc => {
            set_tag("extra");
            let mut p: *mut c_void = std::ptr::null_mut();
            let st = ffi::devmem_malloc(8 * MIB, 0, &mut p);
            if st == devmem_status::Success {
                world.extra.push(p as u64);
            }
            st
        }
        Op::FreeMapped | Op::FreeOffloaded => {
            let st = ffi::devmem_free(world.weights[0] as *mut c_void);
            if st == devmem_status::Success {
                world.weights.remove(0);
            }
            st
        }
        Op::Sleep => sleep(&["w"]),
        Op::Offload => {
            let (_o, t) = tags(&["w"]);
            ffi::devmem_offload(t.as_ptr(), 1)
        }
        Op::Discard => {
            let (_o, t) = tags(&["kv"]);
            ffi::devmem_discard(t.as_ptr(), 1)
        }
        Op::Wake => wake(None),
    }
}

fn counts() -> Vec<u64> {
    functions().iter().map(|f| emu().calls(f)).collect()
}

/// Every allocation is mapped exactly when its state says so, and mapped ones hold their bytes.
fn check_consistent(seeds: &[(u64, u64, usize)], what: &str) {
    for &(ptr, seed, size) in seeds {
        // SAFETY: zero is a valid value of the C struct.
        let mut info: devmem::devmem_allocation_info = unsafe { std::mem::zeroed() };
        if ffi::devmem_get_allocation_info(ptr as *const c_void, &mut info)
            != devmem_status::Success
        {
            continue; // freed by the operation
        }
        let mapping = emu().mapping(ptr);
        if info.state == devmem_state::Mapped {
            assert_eq!(
                mapping, 2,
                "{what}: {ptr:#x} says mapped but is not accessible"
            );
            assert_eq!(
                mismatches(ptr, size, seed),
                0,
                "{what}: {ptr:#x} lost bytes while mapped"
            );
        } else {
            assert_eq!(
                mapping, 0,
                "{what}: {ptr:#x} says {:?} but is still mapped",
                info.state
            );
        }
    }
}

fn cleanup(world: World) {
    ok(wake(None));
    free_all(&world.weights);
    free_all(&world.kv);
    free_all(&world.extra);
    release_store_and_assert_clean();
}

fn seeds_of(world: &World) -> Vec<(u64, u64, usize)> {
    let mut out: Vec<(u64, u64, usize)> = world
        .weights
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, i as u64, size_of(i)))
        .collect();
    out.extend(
        world
            .kv
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, 500 + i as u64, size_of(i + 1))),
    );
    out
}

fn sweep(op: Op) -> usize {
    let n: usize = std::env::var("DEVMEM_SWEEP_ALLOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    // Dry run: how often the operation calls each driver function.
    let mut world = build(n);
    prepare(op);
    let before = counts();
    ok(run(op, &mut world));
    let after = counts();
    cleanup(world);
    let mut injected = 0;
    let mut runs = 0;
    for (f, name) in functions().iter().enumerate() {
        let calls = after[f] - before[f];
        for nth in 1..=calls {
            for &code in CODES {
                runs += 1;
                let mut world = build(n);
                prepare(op);
                let seeds = seeds_of(&world);
                emu().inject(name, nth, code);
                let st = run(op, &mut world);
                emu().clear_faults();
                let what = format!("{op:?} with {name} #{nth} failing with {code}");
                if st != devmem_status::Success {
                    injected += 1;
                    let expected = if code == 2 {
                        [devmem_status::OutOfMemory, devmem_status::HostOutOfMemory]
                    } else {
                        [devmem_status::Driver, devmem_status::Driver]
                    };
                    assert!(
                        expected.contains(&st),
                        "{what}: status {st:?}: {}",
                        message()
                    );
                    let base = name.trim_end_matches("_v2");
                    let base = if level_zero() || hip() { name } else { base };
                    assert!(
                        message().contains(base),
                        "{what}: message {:?} does not name {base}",
                        message()
                    );
                }
                check_consistent(&seeds, &what);
                if op == Op::Wake && st != devmem_status::Success {
                    for (ptr, _, _) in &seeds {
                        assert_ne!(
                            state(*ptr),
                            devmem_state::Mapped,
                            "{what}: wake was not rolled back"
                        );
                    }
                }
                // A retry after the fault clears succeeds and brings every offloaded byte back.
                if st != devmem_status::Success {
                    let retry = run(op, &mut world);
                    assert_eq!(
                        retry,
                        devmem_status::Success,
                        "{what}: retry failed: {}",
                        message()
                    );
                }
                ok(wake(None));
                for (i, p) in world.weights.iter().enumerate() {
                    let (seed, size) = seeds
                        .iter()
                        .find(|(ptr, _, _)| ptr == p)
                        .map(|(_, s, z)| (*s, *z))
                        .unwrap_or((i as u64, size_of(i)));
                    assert_eq!(
                        mismatches(*p, size, seed),
                        0,
                        "{what}: weights at {p:#x} lost after retry"
                    );
                }
                cleanup(world);
            }
        }
    }
    eprintln!(
        "{op:?}: {runs} injected runs, {injected} surfaced as errors, {n} allocations per tag"
    );
    injected
}

#[test]
fn sweep_malloc() {
    setup(&[]);
    assert!(sweep(Op::Malloc) > 0);
}

#[test]
fn sweep_free_mapped() {
    setup(&[]);
    assert!(sweep(Op::FreeMapped) > 0);
}

#[test]
fn sweep_free_offloaded() {
    setup(&[]);
    assert!(sweep(Op::FreeOffloaded) > 0);
}

#[test]
fn sweep_sleep() {
    setup(&[]);
    assert!(sweep(Op::Sleep) > 0);
}

#[test]
fn sweep_offload() {
    setup(&[]);
    assert!(sweep(Op::Offload) > 0);
}

#[test]
fn sweep_discard() {
    setup(&[]);
    assert!(sweep(Op::Discard) > 0);
}

#[test]
fn sweep_wake() {
    setup(&[]);
    assert!(sweep(Op::Wake) > 0);
}

/// Chunked wakes (issue 23): 2 MiB chunks, so the 4 and 6 MiB allocations are two and three
/// chunks, each filled as it is mapped; every fault part way through must roll back.
const CHUNKED: &[(&str, &str)] = &[("DEVMEM_WAKE_CHUNK_MB", "2"), ("DEVMEM_CHUNK_SIZE", "0")];

#[test]
fn sweep_wake_chunked() {
    setup(CHUNKED);
    assert!(sweep(Op::Wake) > 0);
}

#[test]
fn sweep_sleep_chunked() {
    setup(CHUNKED);
    assert!(sweep(Op::Sleep) > 0);
}

#[test]
fn sweep_malloc_chunked() {
    setup(CHUNKED);
    assert!(sweep(Op::Malloc) > 0);
}
