//! The HIP face: the `hip*` runtime entry points devmem uses, over the shared memory model.
//!
//! What ROCm does differently from CUDA, modelled here because devmem's code depends on it:
//! * a thread always has a current device (0 until `hipSetDevice`), no contexts;
//! * released physical memory stays in use on the device while the reservation it was last
//!   mapped in is held; freeing the reservation gives it back (vLLM PRs 37533, 43022);
//! * `hipMemCreate` larger than `DEVMEM_EMU_HIP_MAX_CREATE` fails with `hipErrorInvalidValue`
//!   (the per-call limit older ROCm releases have, which is why callers chunk);
//! * `hipMemAddressReserve` honours its address argument when the range is free.
//!
//! `hipError_t` codes match CUDA's for every error used here, so the emulator's codes serve
//! both faces; the names differ.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use crate::*;

/// `hipErrorNoDevice`.
const NO_DEVICE: R = 100;

const HIP_ERROR_NAMES: &[(R, &CStr, &CStr)] = &[
    (SUCCESS, c"hipSuccess", c"no error"),
    (INVALID_VALUE, c"hipErrorInvalidValue", c"invalid argument"),
    (OUT_OF_MEMORY, c"hipErrorOutOfMemory", c"out of memory"),
    (
        NOT_INITIALIZED,
        c"hipErrorNotInitialized",
        c"initialization error",
    ),
    (
        NO_DEVICE,
        c"hipErrorNoDevice",
        c"no ROCm-capable device is detected",
    ),
    (
        INVALID_DEVICE,
        c"hipErrorInvalidDevice",
        c"invalid device ordinal",
    ),
    (
        INVALID_HANDLE,
        c"hipErrorInvalidHandle",
        c"invalid resource handle",
    ),
    (
        NOT_SUPPORTED,
        c"hipErrorNotSupported",
        c"operation not supported",
    ),
    (
        712,
        c"hipErrorHostMemoryAlreadyRegistered",
        c"part or all of the requested memory range is already mapped",
    ),
    (
        713,
        c"hipErrorHostMemoryNotRegistered",
        c"pointer does not correspond to a registered memory region",
    ),
    (999, c"hipErrorUnknown", c"unknown error"),
];

/// Runs `f` with the calling thread's HIP device (0 until `hipSetDevice`).
fn with_device(name: &str, f: impl FnOnce(&mut Emu, i32) -> R) -> R {
    call(name, |emu| {
        let device = current_device(emu).unwrap_or(0);
        if !emu.device_ok(device) {
            return NO_DEVICE;
        }
        f(emu, device)
    })
}

#[no_mangle]
pub extern "C" fn hipInit(flags: c_uint) -> R {
    call("hipInit", |emu| {
        if flags != 0 {
            INVALID_VALUE
        } else if emu.config.devices == 0 {
            NO_DEVICE
        } else {
            SUCCESS
        }
    })
}

#[no_mangle]
pub extern "C" fn hipGetErrorName(code: R) -> *const c_char {
    HIP_ERROR_NAMES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or(c"hipErrorUnknown".as_ptr(), |(_, name, _)| name.as_ptr())
}

#[no_mangle]
pub extern "C" fn hipGetErrorString(code: R) -> *const c_char {
    HIP_ERROR_NAMES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or(c"unknown error".as_ptr(), |(_, _, text)| text.as_ptr())
}

#[no_mangle]
pub unsafe extern "C" fn hipRuntimeGetVersion(version: *mut c_int) -> R {
    // SAFETY: out-pointer per the runtime contract. ROCm 6.4's encoding.
    call("hipRuntimeGetVersion", |_| unsafe {
        put(version, 60_443_483)
    })
}

#[no_mangle]
pub unsafe extern "C" fn hipGetDeviceCount(count: *mut c_int) -> R {
    // SAFETY: out-pointer per the runtime contract.
    call("hipGetDeviceCount", |emu| unsafe {
        put(count, emu.config.devices)
    })
}

#[no_mangle]
pub unsafe extern "C" fn hipGetDevice(device: *mut c_int) -> R {
    // SAFETY: out-pointer per the runtime contract.
    with_device("hipGetDevice", |_, d| unsafe { put(device, d) })
}

#[no_mangle]
pub extern "C" fn hipSetDevice(device: c_int) -> R {
    call("hipSetDevice", |emu| {
        if !emu.device_ok(device) {
            return INVALID_DEVICE;
        }
        CURRENT.with(|c| c.set(context_of(device)));
        SUCCESS
    })
}

/// Runs every queued piece of work of the current device, on every stream.
#[no_mangle]
pub extern "C" fn hipDeviceSynchronize() -> R {
    with_device("hipDeviceSynchronize", |emu, device| {
        emu.complete_device(device);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn hipMemGetInfo(free: *mut usize, total: *mut usize) -> R {
    // SAFETY: out-pointers per the runtime contract.
    with_device("hipMemGetInfo", |emu, device| unsafe {
        emu.put_mem_info(device, free, total)
    })
}

/// `hipMemAllocationProp`, as devmem's driver table declares it (32 bytes).
#[repr(C)]
pub struct HipProp {
    kind: c_uint,
    handle_type: c_uint,
    location_kind: c_uint,
    location_id: c_int,
    win32: *mut c_void,
    flags: u32,
}

#[no_mangle]
pub unsafe extern "C" fn hipMemGetAllocationGranularity(
    granularity: *mut usize,
    prop: *const HipProp,
    _flags: c_uint,
) -> R {
    with_device("hipMemGetAllocationGranularity", |emu, _| {
        if prop.is_null() {
            return INVALID_VALUE;
        }
        if !emu.config.vmm {
            return NOT_SUPPORTED;
        }
        // SAFETY: out-pointer per the runtime contract.
        unsafe { put(granularity, emu.config.granularity) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn hipMemAddressReserve(
    ptr: *mut *mut c_void,
    size: usize,
    alignment: usize,
    addr: *mut c_void,
    _flags: u64,
) -> R {
    with_device("hipMemAddressReserve", |emu, _| {
        if ptr.is_null() {
            return INVALID_VALUE;
        }
        match emu.reserve(size, alignment, 0, addr as u64) {
            // SAFETY: checked non-NULL above.
            Ok(va) => unsafe { put(ptr, va as *mut c_void) },
            Err(rc) => rc,
        }
    })
}

#[no_mangle]
pub extern "C" fn hipMemAddressFree(ptr: *mut c_void, size: usize) -> R {
    with_device("hipMemAddressFree", |emu, _| emu.free_va(ptr as u64, size))
}

#[no_mangle]
pub unsafe extern "C" fn hipMemCreate(
    handle: *mut *mut c_void,
    size: usize,
    prop: *const HipProp,
    flags: u64,
) -> R {
    with_device("hipMemCreate", |emu, _| {
        if handle.is_null() || prop.is_null() || flags != 0 {
            return INVALID_VALUE;
        }
        // SAFETY: non-NULL, and the caller passes a valid struct.
        let prop = unsafe { &*prop };
        if prop.kind != 1 || prop.location_kind != 1 {
            return INVALID_VALUE; // pinned device memory only
        }
        if !emu.device_ok(prop.location_id) {
            return INVALID_DEVICE;
        }
        if emu.config.hip_max_create > 0 && size > emu.config.hip_max_create {
            return INVALID_VALUE;
        }
        // hipMemHandleTypeNone (0) or hipMemHandleTypePosixFileDescriptor (1).
        if prop.handle_type > 1 {
            return NOT_SUPPORTED;
        }
        match emu.create(prop.location_id, size, 0) {
            Ok(id) => {
                if let Some(physical) = emu.handles.get_mut(&id) {
                    physical.hip = true;
                    physical.exportable = prop.handle_type == 1;
                }
                // SAFETY: checked non-NULL above.
                unsafe { put(handle, id as *mut c_void) }
            }
            Err(rc) => rc,
        }
    })
}

/// `hipMemExportToShareableHandle`: POSIX file descriptors only (`hipMemHandleTypePosixFileDescriptor`).
#[no_mangle]
pub unsafe extern "C" fn hipMemExportToShareableHandle(
    out: *mut c_void,
    handle: *mut c_void,
    kind: c_uint,
    flags: u64,
) -> R {
    with_device("hipMemExportToShareableHandle", |emu, _| {
        if out.is_null() || flags != 0 || kind != 1 {
            return INVALID_VALUE;
        }
        match emu.export_fd(handle as u64) {
            // SAFETY: for POSIX file descriptors the caller passes an int to write.
            Ok(fd) => unsafe { put(out.cast::<c_int>(), fd) },
            Err(rc) => rc,
        }
    })
}

/// `hipMemImportFromShareableHandle`: the descriptor's value is passed as the pointer.
#[no_mangle]
pub unsafe extern "C" fn hipMemImportFromShareableHandle(
    handle: *mut *mut c_void,
    os_handle: *mut c_void,
    kind: c_uint,
) -> R {
    with_device("hipMemImportFromShareableHandle", |emu, device| {
        if handle.is_null() || kind != 1 {
            return INVALID_VALUE;
        }
        let Ok(fd) = c_int::try_from(os_handle as isize) else {
            return INVALID_VALUE;
        };
        match emu.import_fd(device, fd, true) {
            // SAFETY: checked non-NULL above.
            Ok(id) => unsafe { put(handle, id as *mut c_void) },
            Err(rc) => rc,
        }
    })
}

#[no_mangle]
pub extern "C" fn hipMemRelease(handle: *mut c_void) -> R {
    with_device("hipMemRelease", |emu, _| emu.release(handle as u64))
}

#[no_mangle]
pub extern "C" fn hipMemMap(
    ptr: *mut c_void,
    size: usize,
    offset: usize,
    handle: *mut c_void,
    flags: u64,
) -> R {
    with_device("hipMemMap", |emu, _| {
        if offset != 0 || flags != 0 {
            return INVALID_VALUE;
        }
        emu.map(ptr as u64, size, handle as u64)
    })
}

/// `hipMemAccessDesc`: location (kind, id) and flags.
#[repr(C)]
pub struct HipAccess {
    location_kind: c_uint,
    location_id: c_int,
    flags: c_uint,
}

#[no_mangle]
pub unsafe extern "C" fn hipMemSetAccess(
    ptr: *mut c_void,
    size: usize,
    desc: *const HipAccess,
    count: usize,
) -> R {
    with_device("hipMemSetAccess", |emu, _| {
        if desc.is_null() || count == 0 {
            return INVALID_VALUE;
        }
        // SAFETY: `count` descriptors per the runtime contract.
        let descs = unsafe { std::slice::from_raw_parts(desc, count) };
        if descs.iter().any(|d| !emu.device_ok(d.location_id)) {
            return INVALID_DEVICE;
        }
        // hipMemAccessFlagsProtRead (1) or ProtReadWrite (3).
        match descs[0].flags {
            3 => emu.set_access(ptr as u64, size),
            1 => emu.set_protection(ptr as u64, size, true),
            _ => INVALID_VALUE,
        }
    })
}

#[no_mangle]
pub extern "C" fn hipMemUnmap(ptr: *mut c_void, size: usize) -> R {
    with_device("hipMemUnmap", |emu, _| emu.unmap(ptr as u64, size))
}

#[no_mangle]
pub extern "C" fn hipMemcpyDtoHAsync(
    dst: *mut c_void,
    src: *mut c_void,
    len: usize,
    stream: *mut c_void,
) -> R {
    with_device("hipMemcpyDtoHAsync", |emu, device| {
        let (dst, src) = (dst as u64, src as u64);
        emu.queue_copy(device, dst, src, len, src, Some(stream as usize))
    })
}

#[no_mangle]
pub extern "C" fn hipMemcpyHtoDAsync(
    dst: *mut c_void,
    src: *mut c_void,
    len: usize,
    stream: *mut c_void,
) -> R {
    with_device("hipMemcpyHtoDAsync", |emu, device| {
        let (dst, src) = (dst as u64, src as u64);
        emu.queue_copy(device, dst, src, len, dst, Some(stream as usize))
    })
}

#[no_mangle]
pub extern "C" fn hipMemsetD8Async(
    dst: *mut c_void,
    byte: u8,
    len: usize,
    stream: *mut c_void,
) -> R {
    with_device("hipMemsetD8Async", |emu, device| {
        emu.queue_fill(device, dst as u64, len, byte, stream as usize)
    })
}

#[no_mangle]
pub unsafe extern "C" fn hipStreamCreateWithFlags(stream: *mut *mut c_void, _flags: c_uint) -> R {
    with_device("hipStreamCreateWithFlags", |emu, _| {
        emu.streams += 1;
        // SAFETY: out-pointer per the runtime contract.
        unsafe {
            put(
                stream,
                (0x5f00_0000 + emu.streams as usize * 0x10) as *mut c_void,
            )
        }
    })
}

#[no_mangle]
pub extern "C" fn hipStreamSynchronize(stream: *mut c_void) -> R {
    with_device("hipStreamSynchronize", |emu, device| {
        emu.complete_stream((device, stream as usize), u64::MAX);
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn hipHostRegister(p: *mut c_void, size: usize, _flags: c_uint) -> R {
    with_device("hipHostRegister", |emu, _| emu.register_host(p, size))
}

#[no_mangle]
pub extern "C" fn hipHostUnregister(p: *mut c_void) -> R {
    with_device("hipHostUnregister", |emu, _| emu.unregister_host(p))
}

#[no_mangle]
pub unsafe extern "C" fn hipEventCreateWithFlags(event: *mut *mut c_void, _flags: c_uint) -> R {
    with_device("hipEventCreateWithFlags", |emu, _| {
        emu.events += 1;
        emu.next_event += 0x10;
        // SAFETY: out-pointer per the runtime contract.
        unsafe { put(event, emu.next_event as *mut c_void) }
    })
}

#[no_mangle]
pub extern "C" fn hipEventRecord(event: *mut c_void, stream: *mut c_void) -> R {
    with_device("hipEventRecord", |emu, device| {
        if event.is_null() {
            return INVALID_HANDLE;
        }
        emu.record_event(event as usize, (device, stream as usize));
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn hipEventSynchronize(event: *mut c_void) -> R {
    with_device("hipEventSynchronize", |emu, _| {
        if event.is_null() {
            return INVALID_HANDLE;
        }
        emu.synchronize_event(event as usize);
        SUCCESS
    })
}
