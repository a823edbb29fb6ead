//! The control interface for tests (`cuemu_*`, not part of any driver API): counters,
//! fault injection, call counts, capacity, and the record of synchronisation violations.

use std::ffi::{c_char, c_int, c_uint, CStr};

use crate::*;

/// Live resources, for leak checks.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CuemuCounters {
    /// Physical handles created and not released.
    pub handles: u64,
    /// Mapped ranges.
    pub mappings: u64,
    /// Reserved address ranges.
    pub reservations: u64,
    /// Host buffers from cuMemHostAlloc.
    pub host_buffers: u64,
    /// Device bytes in use, all devices.
    pub used_bytes: u64,
    /// Host ranges registered with cuMemHostRegister.
    pub host_registered: u64,
    /// Events created and not destroyed.
    pub events: u64,
    /// Synchronisation violations recorded so far (see `cuemu_violation`).
    pub violations: u64,
    /// Queued work that has not run yet.
    pub pending: u64,
}

/// Writes the live-resource counters.
#[no_mangle]
pub unsafe extern "C" fn cuemu_counters(out: *mut CuemuCounters) -> R {
    let guard = lock();
    let counters = guard
        .as_ref()
        .map_or_else(CuemuCounters::default, |emu| CuemuCounters {
            handles: emu.handles.len() as u64,
            mappings: emu.mappings.len() as u64,
            reservations: emu.reservations.len() as u64,
            host_buffers: emu.host.len() as u64,
            used_bytes: emu.used.iter().sum::<usize>() as u64,
            host_registered: emu.registered.len() as u64,
            events: emu.events,
            violations: emu.violations.len() as u64,
            pending: emu.pending.len() as u64,
        });
    // SAFETY: out-pointer per this function's contract.
    unsafe { put(out, counters) }
}

/// One entry of the event log (`cuemu_event_log`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CuemuEvent {
    /// [`EVENT_MAP`], [`EVENT_UNMAP`], [`EVENT_COPY_QUEUED`] or [`EVENT_COPY_DONE`].
    pub kind: u32,
    /// The mapping's start, or the copy's device destination.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

/// A mapping was made (`cuMemMap`, `hipMemMap`, `zeVirtualMemMap`).
pub const EVENT_MAP: u32 = 1;
/// A copy to device memory was queued.
pub const EVENT_COPY_QUEUED: u32 = 2;
/// A copy to device memory ran (at a synchronisation point).
pub const EVENT_COPY_DONE: u32 = 3;
/// A mapping was removed.
pub const EVENT_UNMAP: u32 = 4;

/// Copies up to `cap` entries of the event log (maps, unmaps, device-bound copies queued and
/// run, in the order they happened) into `out`; returns how many entries the log holds. The
/// log keeps the first 65536 events.
#[no_mangle]
pub unsafe extern "C" fn cuemu_event_log(out: *mut CuemuEvent, cap: usize) -> u64 {
    let guard = lock();
    let Some(emu) = guard.as_ref() else {
        return 0;
    };
    let n = emu.event_log.len().min(cap);
    if !out.is_null() && n > 0 {
        // SAFETY: the caller passes room for `cap` entries at `out`.
        unsafe { std::ptr::copy_nonoverlapping(emu.event_log.as_ptr(), out, n) };
    }
    emu.event_log.len() as u64
}

/// Empties the event log.
#[no_mangle]
pub extern "C" fn cuemu_clear_event_log() -> R {
    call("cuemu_clear_event_log", |emu| {
        emu.event_log.clear();
        SUCCESS
    })
}

/// Makes the `nth` next call (1 = the next one) of `name` fail with `code`.
#[no_mangle]
pub unsafe extern "C" fn cuemu_inject(name: *const c_char, nth: u64, code: c_uint) -> R {
    if name.is_null() || nth == 0 {
        return INVALID_VALUE;
    }
    // SAFETY: NUL-terminated by this function's contract.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    call("cuemu_inject", |emu| {
        emu.faults.push(Fault {
            name,
            skip: nth - 1,
            code,
        });
        SUCCESS
    })
}

/// Removes every pending injected fault.
#[no_mangle]
pub extern "C" fn cuemu_clear_faults() -> R {
    call("cuemu_clear_faults", |emu| {
        emu.faults.clear();
        SUCCESS
    })
}

/// Number of calls of `name` so far.
#[no_mangle]
pub unsafe extern "C" fn cuemu_calls(name: *const c_char) -> u64 {
    if name.is_null() {
        return 0;
    }
    // SAFETY: NUL-terminated by this function's contract.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    lock()
        .as_ref()
        .and_then(|emu| emu.calls.get(&name).copied())
        .unwrap_or(0)
}

/// What is mapped at `va`: 0 nothing, 1 mapped without access, 2 mapped read-write.
#[no_mangle]
pub extern "C" fn cuemu_mapping(va: u64) -> c_int {
    lock()
        .as_ref()
        .map_or(0, |emu| match emu.mappings.get(&va) {
            Some(m) if m.accessible => 2,
            Some(_) => 1,
            None => 0,
        })
}

/// Sets a device's capacity in bytes.
#[no_mangle]
pub extern "C" fn cuemu_set_capacity(device: c_int, bytes: usize) -> R {
    call("cuemu_set_capacity", |emu| {
        if !emu.device_ok(device) {
            return INVALID_DEVICE;
        }
        emu.capacity[device as usize] = bytes;
        SUCCESS
    })
}

/// Copies the description of the `index`th violation (0 = first), NUL-terminated and
/// truncated to `len` bytes, into `buf`; returns its full length, or 0 when there is none.
#[no_mangle]
pub unsafe extern "C" fn cuemu_violation(index: u64, buf: *mut c_char, len: usize) -> usize {
    let guard = lock();
    let Some(text) = guard
        .as_ref()
        .and_then(|emu| emu.violations.get(usize::try_from(index).ok()?))
    else {
        return 0;
    };
    if !buf.is_null() && len > 0 {
        let n = text.len().min(len - 1);
        // SAFETY: the caller passes `len` writable bytes at `buf`.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
    }
    text.len()
}

/// Queues a "kernel" on the current device's legacy stream that writes `byte` over
/// `[ptr, ptr+len)` when it runs: work of the application that a sleep or free must wait for.
#[no_mangle]
pub extern "C" fn cuemu_launch_fill(ptr: u64, len: usize, byte: u8) -> R {
    with_context("cuemu_launch_fill", |emu, device| {
        emu.enqueue(
            (device, 0),
            Work::Fill {
                dst: ptr,
                len,
                byte,
            },
        )
    })
}

/// A call that is held: the next call of `name` waits, before taking the emulator's lock,
/// until `cuemu_release_held` (tests use it to make an interleaving of threads exact).
struct Hold {
    name: Option<String>,
    waiting: bool,
}

static HOLD: std::sync::Mutex<Hold> = std::sync::Mutex::new(Hold {
    name: None,
    waiting: false,
});
static HOLD_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

fn hold_lock() -> std::sync::MutexGuard<'static, Hold> {
    HOLD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Blocks the calling thread while `name` is the held call (see `cuemu_hold`).
pub(crate) fn wait_if_held(name: &str) {
    let mut hold = hold_lock();
    if hold.name.as_deref() != Some(name) {
        return;
    }
    hold.waiting = true;
    HOLD_CHANGED.notify_all();
    while hold.name.as_deref() == Some(name) {
        hold = HOLD_CHANGED
            .wait(hold)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    hold.waiting = false;
}

/// Makes the next call of `name` wait until `cuemu_release_held`.
#[no_mangle]
pub unsafe extern "C" fn cuemu_hold(name: *const c_char) -> R {
    if name.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: NUL-terminated by this function's contract.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let mut hold = hold_lock();
    hold.name = Some(name);
    hold.waiting = false;
    SUCCESS
}

/// Waits up to `millis` for a thread to be held; returns 1 when one is, else 0.
#[no_mangle]
pub extern "C" fn cuemu_wait_held(millis: u64) -> c_int {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(millis);
    let mut hold = hold_lock();
    while !hold.waiting {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return 0;
        }
        hold = HOLD_CHANGED
            .wait_timeout(hold, left)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner().0);
    }
    1
}

/// Lets the held call go on.
#[no_mangle]
pub extern "C" fn cuemu_release_held() -> R {
    hold_lock().name = None;
    HOLD_CHANGED.notify_all();
    SUCCESS
}
