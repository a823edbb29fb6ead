//! Random sequences of C-ABI calls with random arguments, on the driver emulator: malloc,
//! free (also of unknown and interior pointers), sleep, offload, discard, sleep_tags, wake,
//! wake_except, trim, writes, backup reads, host policies, host limits and injected driver
//! faults. After every call the invariants of the model test hold:
//!
//! * every live allocation is reported, in a state that call could have produced: a failed
//!   call never discards an allocation it was asked to save, and a call never touches an
//!   allocation outside the tags it names;
//! * a mapped allocation whose contents are known holds exactly those bytes (nothing lost),
//!   and an offloaded one's backup holds them too;
//! * the statistics add up to the allocations' sizes per state;
//! * at the end of every input, once faults are cleared and everything is freed, the emulator
//!   holds no handle, mapping or reservation, and it never saw a synchronisation violation
//!   (`DEVMEM_EMU_STRICT=1` stops the process on the first one, which libFuzzer reports as a
//!   crash with the input).
//!
//! Run: `scripts/fuzz.sh [seconds]` (builds the emulator, then `cargo fuzz run api_sequence`).

#![no_main]

use std::ffi::{c_char, c_void, CString};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use devmem::{devmem_allocation_info, devmem_state, devmem_stats, devmem_status, ffi};
use libfuzzer_sys::fuzz_target;

const MIB: usize = 1 << 20;
const TAGS: [&str; 4] = ["weights", "kv", "graph", "misc"];
/// Driver calls faults are injected into.
const CALLS: [&str; 10] = [
    "cuMemCreate",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemSetAccess",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuEventSynchronize",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
];

#[derive(Arbitrary, Debug)]
enum Op {
    Malloc { blocks: u8, tag: u8 },
    Free { idx: u8 },
    FreeBogus { idx: u8, offset: u16 },
    Write { idx: u8, seed: u8 },
    Sleep { offload: u8 },
    Offload { tags: u8 },
    Discard { tags: u8 },
    SleepTags { offload: u8, discard: u8 },
    Wake { tags: Option<u8> },
    WakeExcept { deferred: u8 },
    Trim { idx: u8 },
    ReadBackup { idx: u8 },
    Inject { call: u8, nth: u8 },
    Policy { release: bool },
    ReleaseStore,
    Limit { mib: u8 },
    BadTag { long: bool },
}

#[derive(Debug)]
struct Alloc {
    ptr: u64,
    size: usize,
    tag: usize,
    /// The seed of the bytes it must hold, when known.
    contents: Option<u8>,
    state: devmem_state,
}

struct Emu {
    _lib: libloading::Library,
    inject: unsafe extern "C" fn(*const c_char, u64, u32) -> u32,
    clear: unsafe extern "C" fn() -> u32,
    counters: unsafe extern "C" fn(*mut [u64; 9]) -> u32,
}

fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| {
        let path = std::env::var("DEVMEM_FUZZ_EMULATOR").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/libdevmem_cuda_emu.so"
            )
            .into()
        });
        assert!(
            std::path::Path::new(&path).exists(),
            "{path} is missing: cargo build -p devmem-cuda-emu --release (scripts/fuzz.sh does)"
        );
        // SAFETY (of set_var): set before devmem or any thread reads them.
        std::env::set_var("DEVMEM_CUDA_LIBRARY", &path);
        std::env::set_var("DEVMEM_EMU_STRICT", "1");
        std::env::set_var("DEVMEM_EMU_CAPACITY", "256M");
        std::env::set_var("DEVMEM_HOST_CHUNK_MB", "8");
        std::env::set_var("DEVMEM_HOST_THREADS", "2");
        std::env::set_var("DEVMEM_COPY_BATCH_MB", "4");
        // SAFETY: the emulator library, opened for its test-control symbols.
        let lib = unsafe { libloading::Library::new(&path) }.expect("emulator");
        // SAFETY: the symbols' types match the emulator's definitions.
        unsafe {
            Emu {
                inject: *lib.get(b"cuemu_inject\0").expect("cuemu_inject"),
                clear: *lib
                    .get(b"cuemu_clear_faults\0")
                    .expect("cuemu_clear_faults"),
                counters: *lib.get(b"cuemu_counters\0").expect("cuemu_counters"),
                _lib: lib,
            }
        }
    })
}

fn tag_list(mask: u8) -> Vec<CString> {
    TAGS.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, t)| CString::new(*t).expect("tag"))
        .collect()
}

fn ptrs(list: &[CString]) -> Vec<*const c_char> {
    list.iter().map(|c| c.as_ptr()).collect()
}

fn fill(ptr: u64, len: usize, seed: u8) {
    // SAFETY: emulated device memory is host memory, mapped read-write while awake.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
    for (i, b) in bytes.iter_mut().enumerate().step_by(4096) {
        *b = seed.wrapping_add((i >> 12) as u8);
    }
}

fn matches(bytes: &[u8], seed: u8) -> bool {
    bytes
        .iter()
        .enumerate()
        .step_by(4096)
        .all(|(i, b)| *b == seed.wrapping_add((i >> 12) as u8))
}

fn info(ptr: u64) -> Option<devmem_allocation_info> {
    // SAFETY: plain C struct; zero is a valid value.
    let mut out: devmem_allocation_info = unsafe { std::mem::zeroed() };
    (ffi::devmem_get_allocation_info(ptr as *const c_void, &mut out) == devmem_status::Success)
        .then_some(out)
}

/// Reads every allocation's state back from devmem and checks it against what the last call
/// was allowed to do: `touched` says which tags it named, `saving` which of them it saves.
fn check(model: &mut [Alloc], touched: u8, saving: u8, ok: bool) {
    let mut stats = devmem_stats::default();
    assert_eq!(
        ffi::devmem_get_stats(std::ptr::null(), &mut stats),
        devmem_status::Success
    );
    let mut by_state = [0u64; 3];
    for a in model.iter_mut() {
        let i = info(a.ptr).unwrap_or_else(|| panic!("live allocation {:#x} not reported", a.ptr));
        let named = touched & (1 << a.tag) != 0;
        if !named {
            assert_eq!(
                i.state, a.state,
                "{a:?}: a call changed an allocation it did not name"
            );
        }
        if i.state == devmem_state::Discarded && a.state != devmem_state::Discarded {
            assert!(
                named && saving & (1 << a.tag) == 0 && (ok || touched != saving),
                "{a:?} was discarded by a call that had to save it (ok={ok})"
            );
            a.contents = None;
        }
        a.state = i.state;
        by_state[i.state as usize] += a.size as u64;
        if let Some(seed) = a.contents {
            match i.state {
                devmem_state::Mapped => {
                    // SAFETY: mapped emulated memory is readable host memory.
                    let bytes = unsafe { std::slice::from_raw_parts(a.ptr as *const u8, a.size) };
                    assert!(matches(bytes, seed), "{a:?} lost its bytes");
                }
                devmem_state::Offloaded => {
                    let mut copy = vec![0u8; a.size];
                    let mut copied = 0;
                    let rc = ffi::devmem_copy_backup(
                        a.ptr as *const c_void,
                        a.size,
                        copy.as_mut_ptr().cast(),
                        &mut copied,
                    );
                    assert_eq!(rc, devmem_status::Success);
                    assert_eq!(copied, 1);
                    assert!(matches(&copy, seed), "{a:?}: the backup lost its bytes");
                }
                devmem_state::Discarded => {}
            }
        }
    }
    assert_eq!(stats.mapped_bytes.current, by_state[0], "mapped bytes");
    assert_eq!(
        stats.offloaded_bytes.current, by_state[1],
        "offloaded bytes"
    );
    assert_eq!(
        stats.discarded_bytes.current, by_state[2],
        "discarded bytes"
    );
}

fn run(ops: &[Op]) {
    let emu = emu();
    let mut model: Vec<Alloc> = Vec::new();
    let mut trimmed: Vec<u64> = Vec::new();
    for op in ops.iter().take(64) {
        let (touched, saving, status) = match *op {
            Op::Malloc { blocks, tag } => {
                if model.len() >= 12 {
                    continue;
                }
                let tag = usize::from(tag) % TAGS.len();
                let size = (usize::from(blocks % 4) + 1) * 2 * MIB - usize::from(blocks / 4) * 4096;
                let t = CString::new(TAGS[tag]).expect("tag");
                assert_eq!(
                    ffi::devmem_set_current_tag(t.as_ptr()),
                    devmem_status::Success
                );
                let mut p: *mut c_void = std::ptr::null_mut();
                let rc = ffi::devmem_malloc(size, 0, &mut p);
                if rc == devmem_status::Success {
                    let granted = info(p as u64).expect("new allocation").size as usize;
                    model.push(Alloc {
                        ptr: p as u64,
                        size: granted,
                        tag,
                        contents: None,
                        state: devmem_state::Mapped,
                    });
                } else {
                    assert!(p.is_null(), "a failed malloc wrote its out-pointer");
                }
                (0, 0, rc)
            }
            Op::Free { idx } => {
                if model.is_empty() {
                    continue;
                }
                let i = usize::from(idx) % model.len();
                let rc = ffi::devmem_free(model[i].ptr as *mut c_void);
                if rc == devmem_status::Success {
                    model.swap_remove(i);
                }
                (0xff, 0, rc)
            }
            Op::FreeBogus { idx, offset } => {
                let target = match model.get(usize::from(idx)) {
                    Some(a) => a.ptr + u64::from(offset).max(1),
                    None => 0x1000 + u64::from(offset),
                };
                let rc = ffi::devmem_free(target as *mut c_void);
                assert_eq!(rc, devmem_status::UnknownPointer, "free of {target:#x}");
                (0, 0, devmem_status::Success)
            }
            Op::Write { idx, seed } => {
                if let Some(a) = model.get_mut(usize::from(idx)) {
                    if a.state == devmem_state::Mapped {
                        fill(a.ptr, a.size, seed);
                        a.contents = Some(seed);
                    }
                }
                (0, 0, devmem_status::Success)
            }
            Op::Sleep { offload } => {
                let list = tag_list(offload);
                let p = ptrs(&list);
                (0xff, offload, ffi::devmem_sleep(p.as_ptr(), p.len()))
            }
            Op::Offload { tags } => {
                let list = tag_list(tags);
                let p = ptrs(&list);
                (tags, tags, ffi::devmem_offload(p.as_ptr(), p.len()))
            }
            Op::Discard { tags } => {
                let list = tag_list(tags);
                let p = ptrs(&list);
                (tags, 0, ffi::devmem_discard(p.as_ptr(), p.len()))
            }
            Op::SleepTags { offload, discard } => {
                let (keep, drop) = (tag_list(offload), tag_list(discard));
                let (pk, pd) = (ptrs(&keep), ptrs(&drop));
                let rc = ffi::devmem_sleep_tags(pk.as_ptr(), pk.len(), pd.as_ptr(), pd.len());
                if offload & discard & 0xf != 0 {
                    assert_eq!(rc, devmem_status::InvalidArgument);
                    (0, 0, devmem_status::Success)
                } else {
                    (offload | discard, offload, rc)
                }
            }
            Op::Wake { tags } => match tags {
                None => (0xff, 0xff, ffi::devmem_wake_up(std::ptr::null(), 0)),
                Some(mask) => {
                    let list = tag_list(mask);
                    let p = ptrs(&list);
                    if p.is_empty() {
                        continue;
                    }
                    (mask, mask, ffi::devmem_wake_up(p.as_ptr(), p.len()))
                }
            },
            Op::WakeExcept { deferred } => {
                let list = tag_list(deferred);
                let p = ptrs(&list);
                (
                    !deferred,
                    !deferred,
                    ffi::devmem_wake_up_except(p.as_ptr(), p.len()),
                )
            }
            Op::Trim { idx } => {
                if model.is_empty() {
                    continue;
                }
                let i = usize::from(idx) % model.len();
                let mut freed = 0usize;
                let rc = ffi::devmem_trim(model[i].ptr as *mut c_void, &mut freed);
                if rc == devmem_status::Success {
                    let a = model.swap_remove(i);
                    assert!(
                        info(a.ptr).is_none(),
                        "a trimmed allocation is still reported"
                    );
                    trimmed.push(a.ptr);
                }
                (0xff, 0, rc)
            }
            Op::ReadBackup { idx } => {
                if let Some(a) = model.get(usize::from(idx)) {
                    let mut host: *mut c_void = std::ptr::null_mut();
                    let rc = ffi::devmem_backup_pointer(a.ptr as *const c_void, 4096, &mut host);
                    assert_eq!(rc, devmem_status::Success);
                    assert_eq!(host.is_null(), a.state != devmem_state::Offloaded);
                }
                (0, 0, devmem_status::Success)
            }
            Op::Inject { call, nth } => {
                let name = CString::new(CALLS[usize::from(call) % CALLS.len()]).expect("name");
                // SAFETY: a NUL-terminated name.
                unsafe { (emu.inject)(name.as_ptr(), u64::from(nth % 4) + 1, 999) };
                (0, 0, devmem_status::Success)
            }
            Op::Policy { release } => {
                let rc = ffi::devmem_set_host_policy(i32::from(release));
                assert_eq!(rc, devmem_status::Success);
                (0, 0, rc)
            }
            Op::ReleaseStore => {
                let mut freed = 0usize;
                (0, 0, ffi::devmem_release_host_store(&mut freed))
            }
            Op::Limit { mib } => {
                let rc = ffi::devmem_set_host_limit(u64::from(mib / 8) * 8 * MIB as u64);
                assert_eq!(rc, devmem_status::Success);
                (0, 0, rc)
            }
            Op::BadTag { long } => {
                let text = if long { "x".repeat(300) } else { String::new() };
                let t = CString::new(text).expect("tag");
                assert_eq!(
                    ffi::devmem_set_current_tag(t.as_ptr()),
                    devmem_status::InvalidTag
                );
                (0, 0, devmem_status::Success)
            }
        };
        check(
            &mut model,
            touched,
            saving,
            status == devmem_status::Success,
        );
    }
    // Clean up: no faults, no cap, everything awake and freed.
    // SAFETY: no arguments.
    unsafe { (emu.clear)() };
    assert_eq!(ffi::devmem_set_host_limit(0), devmem_status::Success);
    let rc = ffi::devmem_wake_up(std::ptr::null(), 0);
    assert_eq!(rc, devmem_status::Success, "wake with no fault injected");
    check(&mut model, 0xff, 0xff, true);
    for a in model.drain(..) {
        assert_eq!(
            ffi::devmem_free(a.ptr as *mut c_void),
            devmem_status::Success
        );
    }
    for p in trimmed {
        assert_eq!(ffi::devmem_free(p as *mut c_void), devmem_status::Success);
    }
    let mut c = [0u64; 9];
    // SAFETY: the emulator's counters struct is nine u64s.
    unsafe { (emu.counters)(&mut c) };
    assert_eq!((c[0], c[1], c[2], c[4]), (0, 0, 0, 0), "leak: {c:?}");
    assert_eq!(c[7], 0, "synchronisation violations");
}

fuzz_target!(|ops: Vec<Op>| run(&ops));
