//! The Level Zero face: the same memory, reached through the loader's `ze*` entry points.

use std::ffi::c_void;

use crate::*;

pub(crate) type Z = u32;
pub(crate) const ZE_SUCCESS: Z = 0;
pub(crate) const ZE_OUT_OF_HOST_MEMORY: Z = 0x7000_0002;
pub(crate) const ZE_OUT_OF_DEVICE_MEMORY: Z = 0x7000_0003;
pub(crate) const ZE_UNINITIALIZED: Z = 0x7800_0001;
pub(crate) const ZE_UNSUPPORTED_FEATURE: Z = 0x7800_0003;
pub(crate) const ZE_INVALID_ARGUMENT: Z = 0x7800_0004;
pub(crate) const ZE_INVALID_NULL_HANDLE: Z = 0x7800_0005;
pub(crate) const ZE_INVALID_NULL_POINTER: Z = 0x7800_0007;

pub(crate) const ZE_DRIVER: usize = 0x7c00_0000;
pub(crate) const ZE_DEFAULT_CONTEXT: usize = 0x7b00_0000;

pub(crate) fn ze_device(i: i32) -> usize {
    0x7d00_0000 + usize::try_from(i).unwrap_or(0) * 0x100
}

pub(crate) fn ze_device_index(emu: &Emu, handle: *mut c_void) -> Option<i32> {
    (0..emu.config.devices).find(|d| ze_device(*d) == handle as usize)
}

/// Maps the CUDA-face result codes of the shared helpers to `ze_result_t`.
pub(crate) fn ze_code(rc: R) -> Z {
    match rc {
        SUCCESS => ZE_SUCCESS,
        OUT_OF_MEMORY => ZE_OUT_OF_DEVICE_MEMORY,
        INVALID_HANDLE => ZE_INVALID_NULL_HANDLE,
        _ => ZE_INVALID_ARGUMENT,
    }
}

pub(crate) fn ze_call(name: &str, f: impl FnOnce(&mut Emu) -> Z) -> Z {
    call(name, |emu| {
        if !emu.ze_initialized && name != "zeInit" {
            return ZE_UNINITIALIZED;
        }
        f(emu)
    })
}

pub(crate) fn ze_context_ok(emu: &Emu, ctx: *mut c_void) -> bool {
    let c = ctx as usize;
    (c == ZE_DEFAULT_CONTEXT && emu.config.ze_default_context) || emu.ze_contexts.contains(&c)
}

#[no_mangle]
pub extern "C" fn zeInit(_flags: u32) -> Z {
    call("zeInit", |emu| {
        emu.ze_initialized = true;
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeDriverGet(count: *mut u32, drivers: *mut *mut c_void) -> Z {
    ze_call("zeDriverGet", |emu| {
        if count.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        let n = emu.config.ze_drivers;
        // SAFETY: out-pointers per the specification; `drivers` has `*count` entries.
        unsafe {
            if !drivers.is_null() {
                for i in 0..(*count).min(n) {
                    *drivers.add(i as usize) = (ZE_DRIVER + i as usize * 0x100) as *mut c_void;
                }
            }
            *count = n;
        }
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeDeviceGet(
    driver: *mut c_void,
    count: *mut u32,
    devices: *mut *mut c_void,
) -> Z {
    ze_call("zeDeviceGet", |emu| {
        if driver.is_null() {
            return ZE_INVALID_NULL_HANDLE;
        }
        if count.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        // Only the first driver has devices.
        let n = if driver as usize == ZE_DRIVER {
            emu.config.devices.max(0) as u32
        } else {
            0
        };
        // SAFETY: out-pointers per the specification.
        unsafe {
            if !devices.is_null() {
                for i in 0..(*count).min(n) {
                    *devices.add(i as usize) = ze_device(i as i32) as *mut c_void;
                }
            }
            *count = n;
        }
        ZE_SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn zeDriverGetDefaultContext(driver: *mut c_void) -> *mut c_void {
    let mut out = std::ptr::null_mut();
    call("zeDriverGetDefaultContext", |emu| {
        if emu.config.ze_default_context && driver as usize == ZE_DRIVER {
            out = ZE_DEFAULT_CONTEXT as *mut c_void;
        }
        SUCCESS
    });
    out
}

#[no_mangle]
pub unsafe extern "C" fn zeContextCreate(
    driver: *mut c_void,
    desc: *const c_void,
    ctx: *mut *mut c_void,
) -> Z {
    ze_call("zeContextCreate", |emu| {
        if driver.is_null() {
            return ZE_INVALID_NULL_HANDLE;
        }
        if desc.is_null() || ctx.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        let c = ZE_DEFAULT_CONTEXT + 0x1000 + emu.ze_contexts.len() * 0x100;
        emu.ze_contexts.push(c);
        // SAFETY: out-pointer per the specification.
        unsafe { *ctx = c as *mut c_void };
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeDeviceGetMemoryProperties(
    device: *mut c_void,
    count: *mut u32,
    props: *mut u8,
) -> Z {
    ze_call("zeDeviceGetMemoryProperties", |emu| {
        let Some(d) = ze_device_index(emu, device) else {
            return ZE_INVALID_NULL_HANDLE;
        };
        if count.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        // SAFETY: ze_device_memory_properties_t: stype(4) pNext(8, at 8) flags(4, at 16)
        // maxClockRate(4) maxBusWidth(4) totalSize(8, at 32) name[256]: 296 bytes each.
        unsafe {
            if !props.is_null() && *count >= 1 {
                (props.add(32) as *mut u64).write_unaligned(emu.capacity[d as usize] as u64);
            }
            *count = 1;
        }
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeDeviceGetCommandQueueGroupProperties(
    device: *mut c_void,
    count: *mut u32,
    props: *mut u8,
) -> Z {
    ze_call("zeDeviceGetCommandQueueGroupProperties", |emu| {
        if ze_device_index(emu, device).is_none() {
            return ZE_INVALID_NULL_HANDLE;
        }
        if count.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        // ze_command_queue_group_properties_t: stype(4) pNext(8, at 8) flags(4, at 16)
        // maxMemoryFillPatternSize(8, at 24) numQueues(4, at 32): 40 bytes each. Group 0
        // computes (flag 1), group 1 copies (flag 2).
        // SAFETY: the caller passes `*count` entries.
        unsafe {
            if !props.is_null() {
                for (i, flags) in [1u32, 2u32].iter().enumerate().take(*count as usize) {
                    (props.add(i * 40 + 16) as *mut u32).write_unaligned(*flags);
                    (props.add(i * 40 + 32) as *mut u32).write_unaligned(1);
                }
            }
            *count = 2;
        }
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeVirtualMemQueryPageSize(
    ctx: *mut c_void,
    device: *mut c_void,
    _size: usize,
    page: *mut usize,
) -> Z {
    ze_call("zeVirtualMemQueryPageSize", |emu| {
        if !ze_context_ok(emu, ctx) || ze_device_index(emu, device).is_none() {
            return ZE_INVALID_NULL_HANDLE;
        }
        if !emu.config.vmm {
            return ZE_UNSUPPORTED_FEATURE;
        }
        // SAFETY: out-pointer per the specification.
        unsafe { put(page, emu.config.granularity) };
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeVirtualMemReserve(
    ctx: *mut c_void,
    start: *const c_void,
    size: usize,
    out: *mut *mut c_void,
) -> Z {
    ze_call("zeVirtualMemReserve", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        if out.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        match emu.reserve(size, 0, ctx as usize, start as u64) {
            Ok(va) => {
                // SAFETY: out-pointer per the specification.
                unsafe { *out = va as *mut c_void };
                ZE_SUCCESS
            }
            Err(rc) => ze_code(rc),
        }
    })
}

#[no_mangle]
pub extern "C" fn zeVirtualMemFree(ctx: *mut c_void, ptr: *const c_void, size: usize) -> Z {
    ze_call("zeVirtualMemFree", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        if emu.reservations.get(&(ptr as u64)).map(|r| r.1) != Some(ctx as usize) {
            return ZE_INVALID_ARGUMENT;
        }
        ze_code(emu.free_va(ptr as u64, size))
    })
}

#[no_mangle]
pub unsafe extern "C" fn zePhysicalMemCreate(
    ctx: *mut c_void,
    device: *mut c_void,
    desc: *const u8,
    out: *mut *mut c_void,
) -> Z {
    ze_call("zePhysicalMemCreate", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        let Some(d) = ze_device_index(emu, device) else {
            return ZE_INVALID_NULL_HANDLE;
        };
        if desc.is_null() || out.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        // SAFETY: ze_physical_mem_desc_t: stype(4) pNext(8, at 8) flags(4, at 16) size(8, at 24).
        let size = unsafe { (desc.add(24) as *const usize).read_unaligned() };
        match emu.create(d, size, ctx as usize) {
            Ok(id) => {
                // SAFETY: out-pointer per the specification.
                unsafe { *out = id as usize as *mut c_void };
                ZE_SUCCESS
            }
            Err(rc) => ze_code(rc),
        }
    })
}

#[no_mangle]
pub extern "C" fn zePhysicalMemDestroy(ctx: *mut c_void, handle: *mut c_void) -> Z {
    ze_call("zePhysicalMemDestroy", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        ze_code(emu.release(handle as u64))
    })
}

#[no_mangle]
pub extern "C" fn zeVirtualMemMap(
    ctx: *mut c_void,
    ptr: *const c_void,
    size: usize,
    handle: *mut c_void,
    offset: usize,
    access: u32,
) -> Z {
    ze_call("zeVirtualMemMap", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        // Memory of one context is invisible in another: both sides must be this context's.
        let va = ptr as u64;
        let reservation_ctx = emu
            .reservations
            .range(..=va)
            .next_back()
            .map(|(_, (_, c))| *c);
        let handle_ctx = emu.handles.get(&(handle as u64)).map(|p| p.context);
        if reservation_ctx != Some(ctx as usize) || handle_ctx != Some(ctx as usize) || offset != 0
        {
            return ZE_INVALID_ARGUMENT;
        }
        let rc = emu.map(va, size, handle as u64);
        if rc != SUCCESS {
            return ze_code(rc);
        }
        if access == 1 {
            return ze_code(emu.set_access(va, size));
        }
        ZE_SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn zeVirtualMemUnmap(ctx: *mut c_void, ptr: *const c_void, size: usize) -> Z {
    ze_call("zeVirtualMemUnmap", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        ze_code(emu.unmap(ptr as u64, size))
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeMemAllocHost(
    ctx: *mut c_void,
    desc: *const c_void,
    size: usize,
    _align: usize,
    out: *mut *mut c_void,
) -> Z {
    ze_call("zeMemAllocHost", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        if desc.is_null() || out.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        match emu.alloc_host(size) {
            Ok(raw) => {
                // SAFETY: out-pointer per the specification.
                unsafe { *out = raw };
                ZE_SUCCESS
            }
            Err(OUT_OF_MEMORY) => ZE_OUT_OF_HOST_MEMORY,
            Err(rc) => ze_code(rc),
        }
    })
}

#[no_mangle]
pub extern "C" fn zeMemFree(ctx: *mut c_void, p: *mut c_void) -> Z {
    ze_call("zeMemFree", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        ze_code(emu.free_host(p))
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeCommandListCreateImmediate(
    ctx: *mut c_void,
    device: *mut c_void,
    desc: *const c_void,
    out: *mut *mut c_void,
) -> Z {
    ze_call("zeCommandListCreateImmediate", |emu| {
        if !ze_context_ok(emu, ctx) || ze_device_index(emu, device).is_none() {
            return ZE_INVALID_NULL_HANDLE;
        }
        if desc.is_null() || out.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        let Some(index) = ze_device_index(emu, device) else {
            return ZE_INVALID_NULL_HANDLE;
        };
        emu.streams += 1;
        let list = 0x5d00_0000 + emu.streams as usize * 0x10;
        emu.lists.insert(list, index);
        // SAFETY: out-pointer per the specification.
        unsafe { *out = list as *mut c_void };
        ZE_SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn zeCommandListAppendMemoryCopy(
    list: *mut c_void,
    dst: *mut c_void,
    src: *const c_void,
    size: usize,
    _signal: *mut c_void,
    _waits: u32,
    _wait_events: *mut *mut c_void,
) -> Z {
    ze_call("zeCommandListAppendMemoryCopy", |emu| {
        let Some(device) = emu.lists.get(&(list as usize)).copied() else {
            return ZE_INVALID_NULL_HANDLE;
        };
        let work = Work::Copy {
            dst: dst as u64,
            src: src as u64,
            len: size,
        };
        ze_code(emu.enqueue((device, list as usize), work))
    })
}

#[no_mangle]
pub extern "C" fn zeCommandListAppendSignalEvent(list: *mut c_void, event: *mut c_void) -> Z {
    ze_call("zeCommandListAppendSignalEvent", |emu| {
        let Some(device) = emu.lists.get(&(list as usize)).copied() else {
            return ZE_INVALID_NULL_HANDLE;
        };
        if event.is_null() {
            return ZE_INVALID_NULL_HANDLE;
        }
        emu.record_event(event as usize, (device, list as usize));
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeEventPoolCreate(
    ctx: *mut c_void,
    desc: *const c_void,
    _n: u32,
    _devices: *mut *mut c_void,
    out: *mut *mut c_void,
) -> Z {
    ze_call("zeEventPoolCreate", |emu| {
        if !ze_context_ok(emu, ctx) {
            return ZE_INVALID_NULL_HANDLE;
        }
        if desc.is_null() || out.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        emu.next_event += 0x1000;
        // SAFETY: out-pointer per the specification.
        unsafe { *out = emu.next_event as *mut c_void };
        ZE_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn zeEventCreate(
    pool: *mut c_void,
    desc: *const u8,
    out: *mut *mut c_void,
) -> Z {
    ze_call("zeEventCreate", |emu| {
        if pool.is_null() {
            return ZE_INVALID_NULL_HANDLE;
        }
        if desc.is_null() || out.is_null() {
            return ZE_INVALID_NULL_POINTER;
        }
        // SAFETY: ze_event_desc_t: stype(4) pNext(8, at 8) index(4, at 16).
        let index = unsafe { (desc.add(16) as *const u32).read_unaligned() } as usize;
        emu.events += 1;
        // SAFETY: out-pointer per the specification.
        unsafe { *out = (pool as usize + 0x10 + index * 0x10) as *mut c_void };
        ZE_SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn zeEventHostSynchronize(event: *mut c_void, _timeout: u64) -> Z {
    ze_call("zeEventHostSynchronize", |emu| {
        if event.is_null() {
            return ZE_INVALID_NULL_HANDLE;
        }
        emu.synchronize_event(event as usize);
        ZE_SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn zeEventHostReset(event: *mut c_void) -> Z {
    ze_call("zeEventHostReset", |_| {
        if event.is_null() {
            ZE_INVALID_NULL_HANDLE
        } else {
            ZE_SUCCESS
        }
    })
}
