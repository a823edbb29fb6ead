//! The CUDA driver face: `cu*` entry points over the shared memory model.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdeviceptr, CUevent, CUmemAccessDesc, CUmemAllocationProp,
    CUmemAllocationType, CUmemGenericAllocationHandle, CUmemLocationType, CUstream,
};

use std::cell::Cell;

use crate::*;

pub(crate) type R = c_uint;
pub(crate) const SUCCESS: R = 0;
pub(crate) const INVALID_VALUE: R = 1;
pub(crate) const OUT_OF_MEMORY: R = 2;
pub(crate) const NOT_INITIALIZED: R = 3;
pub(crate) const INVALID_DEVICE: R = 101;
pub(crate) const INVALID_CONTEXT: R = 201;
pub(crate) const INVALID_HANDLE: R = 400;
pub(crate) const NOT_PERMITTED: R = 800;
pub(crate) const NOT_SUPPORTED: R = 801;
pub(crate) const INVALID_IMAGE: R = 200;
pub(crate) const NOT_FOUND: R = 500;

pub(crate) const ERROR_NAMES: &[(R, &CStr, &CStr)] = &[
    (SUCCESS, c"CUDA_SUCCESS", c"no error"),
    (
        INVALID_VALUE,
        c"CUDA_ERROR_INVALID_VALUE",
        c"invalid argument",
    ),
    (OUT_OF_MEMORY, c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
    (
        NOT_INITIALIZED,
        c"CUDA_ERROR_NOT_INITIALIZED",
        c"initialization error",
    ),
    (
        INVALID_DEVICE,
        c"CUDA_ERROR_INVALID_DEVICE",
        c"invalid device ordinal",
    ),
    (
        INVALID_CONTEXT,
        c"CUDA_ERROR_INVALID_CONTEXT",
        c"invalid device context",
    ),
    (
        INVALID_HANDLE,
        c"CUDA_ERROR_INVALID_HANDLE",
        c"invalid resource handle",
    ),
    (
        NOT_PERMITTED,
        c"CUDA_ERROR_NOT_PERMITTED",
        c"operation not permitted",
    ),
    (
        NOT_SUPPORTED,
        c"CUDA_ERROR_NOT_SUPPORTED",
        c"operation not supported",
    ),
    (
        712,
        c"CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
        c"part or all of the requested memory range is already mapped",
    ),
    (
        713,
        c"CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
        c"pointer does not correspond to a registered memory region",
    ),
    (
        INVALID_IMAGE,
        c"CUDA_ERROR_INVALID_IMAGE",
        c"device kernel image is invalid",
    ),
    (
        NOT_FOUND,
        c"CUDA_ERROR_NOT_FOUND",
        c"named symbol not found",
    ),
    (999, c"CUDA_ERROR_UNKNOWN", c"unknown error"),
];

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> R {
    call(
        "cuInit",
        |_| if flags == 0 { SUCCESS } else { INVALID_VALUE },
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> R {
    // SAFETY: out-pointer per the driver contract.
    call("cuDriverGetVersion", |_| unsafe { put(version, 13000) })
}

fn error_entry(code: R) -> Option<&'static (R, &'static CStr, &'static CStr)> {
    ERROR_NAMES.iter().find(|(c, _, _)| *c == code)
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: R, out: *mut *const c_char) -> R {
    match error_entry(code) {
        // SAFETY: out-pointer per the driver contract.
        Some((_, name, _)) => unsafe { put(out, name.as_ptr()) },
        None => INVALID_VALUE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: R, out: *mut *const c_char) -> R {
    match error_entry(code) {
        // SAFETY: out-pointer per the driver contract.
        Some((_, _, text)) => unsafe { put(out, text.as_ptr()) },
        None => INVALID_VALUE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> R {
    // SAFETY: out-pointer per the driver contract.
    call("cuDeviceGetCount", |emu| unsafe {
        put(count, emu.config.devices)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> R {
    call("cuDeviceGet", |emu| {
        if !emu.device_ok(ordinal) {
            return INVALID_DEVICE;
        }
        // SAFETY: out-pointer per the driver contract.
        unsafe { put(device, ordinal) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: c_int,
    device: CUdevice,
) -> R {
    call("cuDeviceGetAttribute", |emu| {
        if !emu.device_ok(device) {
            return INVALID_DEVICE;
        }
        let v = match attribute {
            102 => i32::from(emu.config.vmm), // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
            103 => 1,                         // HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
            110 => i32::from(emu.config.rdma), // GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED
            128 => i32::from(emu.config.fabric), // HANDLE_TYPE_FABRIC_SUPPORTED
            _ => 0,
        };
        // SAFETY: out-pointer per the driver contract.
        unsafe { put(value, v) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, device: CUdevice) -> R {
    call("cuDevicePrimaryCtxRetain", |emu| {
        if !emu.device_ok(device) {
            return INVALID_DEVICE;
        }
        // SAFETY: out-pointer per the driver contract.
        unsafe { put(ctx, context_of(device) as CUcontext) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut CUcontext) -> R {
    // SAFETY: out-pointer per the driver contract.
    call("cuCtxGetCurrent", |_| unsafe {
        put(ctx, CURRENT.with(Cell::get) as CUcontext)
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> R {
    call("cuCtxSetCurrent", |emu| {
        let value = ctx as usize;
        if value != 0 && !(0..emu.config.devices).any(|d| context_of(d) == value) {
            return INVALID_CONTEXT;
        }
        CURRENT.with(|c| c.set(value));
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> R {
    // SAFETY: out-pointer per the driver contract.
    with_context("cuCtxGetDevice", |_, d| unsafe { put(device, d) })
}

/// Runs every queued piece of work of the current device, on every stream.
#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> R {
    with_context("cuCtxSynchronize", |emu, device| {
        emu.complete_device(device);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> R {
    // SAFETY: out-pointers per the driver contract.
    with_context("cuMemGetInfo_v2", |emu, device| unsafe {
        emu.put_mem_info(device, free, total)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    prop: *const CUmemAllocationProp,
    _flags: c_uint,
) -> R {
    call("cuMemGetAllocationGranularity", |emu| {
        if prop.is_null() {
            return INVALID_VALUE;
        }
        // SAFETY: out-pointer per the driver contract.
        unsafe { put(granularity, emu.config.granularity) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    alignment: usize,
    addr: CUdeviceptr,
    _flags: u64,
) -> R {
    with_context("cuMemAddressReserve", |emu, _| {
        if ptr.is_null() {
            return INVALID_VALUE;
        }
        match emu.reserve(size, alignment, 0, addr) {
            // SAFETY: checked non-NULL above.
            Ok(va) => unsafe { put(ptr, va) },
            Err(rc) => rc,
        }
    })
}

#[no_mangle]
pub extern "C" fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> R {
    with_context("cuMemAddressFree", |emu, _| emu.free_va(ptr, size))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> R {
    with_context("cuMemCreate", |emu, _| {
        if handle.is_null() || prop.is_null() || flags != 0 {
            return INVALID_VALUE;
        }
        // SAFETY: non-NULL, and the caller passes a valid struct.
        let prop = unsafe { &*prop };
        if prop.type_ != CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED
            || prop.location.type_ != CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
        {
            return INVALID_VALUE;
        }
        if !emu.device_ok(prop.location.id) {
            return INVALID_DEVICE;
        }
        // A bit mask (FABRIC|POSIX_FD is no variant of the Rust enum): read as bits.
        // SAFETY: the field is a 32-bit C enum inside the caller's struct.
        let types = unsafe {
            std::ptr::addr_of!(prop.requestedHandleTypes)
                .cast::<u32>()
                .read()
        };
        if types & FABRIC_BIT != 0 {
            return if emu.config.fabric {
                NOT_PERMITTED
            } else {
                NOT_SUPPORTED
            };
        }
        if types & !POSIX_FD_BIT != 0 {
            return INVALID_VALUE;
        }
        match emu.create(prop.location.id, size, 0) {
            Ok(id) => {
                if let Some(physical) = emu.handles.get_mut(&id) {
                    physical.exportable = types & POSIX_FD_BIT != 0;
                }
                // SAFETY: checked non-NULL above.
                unsafe { put(handle, id) }
            }
            Err(rc) => rc,
        }
    })
}

/// `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`.
pub(crate) const POSIX_FD_BIT: u32 = 0x1;
/// `CU_MEM_HANDLE_TYPE_FABRIC`.
pub(crate) const FABRIC_BIT: u32 = 0x8;

/// `cuMemExportToShareableHandle`: POSIX file descriptors only (a close-on-exec duplicate of
/// the handle's memfd, written as an int).
#[no_mangle]
pub unsafe extern "C" fn cuMemExportToShareableHandle(
    out: *mut c_void,
    handle: CUmemGenericAllocationHandle,
    kind: c_uint,
    flags: u64,
) -> R {
    with_context("cuMemExportToShareableHandle", |emu, _| {
        if out.is_null() || flags != 0 || kind != POSIX_FD_BIT {
            return INVALID_VALUE;
        }
        match emu.export_fd(handle) {
            // SAFETY: for POSIX file descriptors the caller passes an int to write.
            Ok(fd) => unsafe { put(out.cast::<c_int>(), fd) },
            Err(rc) => rc,
        }
    })
}

/// `cuMemImportFromShareableHandle`: the descriptor's value is passed as the pointer.
#[no_mangle]
pub unsafe extern "C" fn cuMemImportFromShareableHandle(
    handle: *mut CUmemGenericAllocationHandle,
    os_handle: *mut c_void,
    kind: c_uint,
) -> R {
    with_context("cuMemImportFromShareableHandle", |emu, device| {
        if handle.is_null() || kind != POSIX_FD_BIT {
            return INVALID_VALUE;
        }
        let Ok(fd) = c_int::try_from(os_handle as isize) else {
            return INVALID_VALUE;
        };
        match emu.import_fd(device, fd, false) {
            // SAFETY: checked non-NULL above.
            Ok(id) => unsafe { put(handle, id) },
            Err(rc) => rc,
        }
    })
}

#[no_mangle]
pub extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> R {
    with_context("cuMemRelease", |emu, _| emu.release(handle))
}

#[no_mangle]
pub extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    flags: u64,
) -> R {
    with_context("cuMemMap", |emu, _| {
        if offset != 0 || flags != 0 {
            return INVALID_VALUE;
        }
        emu.map(ptr, size, handle)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemSetAccess(
    ptr: CUdeviceptr,
    size: usize,
    desc: *const CUmemAccessDesc,
    count: usize,
) -> R {
    with_context("cuMemSetAccess", |emu, _| {
        if desc.is_null() || count == 0 {
            return INVALID_VALUE;
        }
        // SAFETY: `count` descriptors per the driver contract.
        let descs = unsafe { std::slice::from_raw_parts(desc, count) };
        if descs.iter().any(|d| !emu.device_ok(d.location.id)) {
            return INVALID_DEVICE;
        }
        // SAFETY: the flags field is a 32-bit C enum of the caller's descriptor; read as bits
        // so a value the Rust enum lacks is refused, not undefined behaviour.
        let flags = unsafe { std::ptr::addr_of!(descs[0].flags).cast::<u32>().read() };
        match flags {
            3 => emu.set_access(ptr, size),
            1 => emu.set_protection(ptr, size, true),
            _ => INVALID_VALUE,
        }
    })
}

#[no_mangle]
pub extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> R {
    with_context("cuMemUnmap", |emu, _| emu.unmap(ptr, size))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, size: usize, _flags: c_uint) -> R {
    with_context("cuMemHostAlloc", |emu, _| {
        if pp.is_null() {
            return INVALID_VALUE;
        }
        match emu.alloc_host(size) {
            // SAFETY: checked non-NULL above.
            Ok(raw) => unsafe { put(pp, raw) },
            Err(rc) => rc,
        }
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> R {
    with_context("cuMemFreeHost", |emu, _| emu.free_host(p))
}

/// Every copy entry point of the CUDA face: [`Emu::queue_copy`] on the current context's
/// device.
fn memcpy(
    name: &str,
    dst: u64,
    src: u64,
    len: usize,
    device_side: u64,
    stream: Option<CUstream>,
) -> R {
    with_context(name, |emu, device| {
        emu.queue_copy(
            device,
            dst,
            src,
            len,
            device_side,
            stream.map(|s| s as usize),
        )
    })
}

impl Emu {
    /// Writes `device`'s free and total bytes.
    ///
    /// # Safety
    /// Each pointer must be NULL or valid for a write.
    pub(crate) unsafe fn put_mem_info(
        &self,
        device: i32,
        free: *mut usize,
        total: *mut usize,
    ) -> R {
        let d = device as usize;
        // SAFETY: the caller's contract.
        unsafe {
            let rc = put(free, self.capacity[d].saturating_sub(self.used[d]));
            if rc != SUCCESS {
                return rc;
            }
            put(total, self.capacity[d])
        }
    }

    /// Checks that `device_side` is device memory, queues the copy on `stream` of `device`,
    /// and for a synchronous copy (`stream` `None`, the legacy stream) runs the legacy
    /// stream's work up to and including it before returning.
    pub(crate) fn queue_copy(
        &mut self,
        device: i32,
        dst: u64,
        src: u64,
        len: usize,
        device_side: u64,
        stream: Option<usize>,
    ) -> R {
        if !self.is_device_range(device_side, len) {
            return INVALID_VALUE;
        }
        // As on the H100 (bench/shm_pin_probe.py): a host range that is partly registered
        // memory must lie inside one registration; the driver refuses a copy that crosses
        // from one registration into another (or out of one).
        let host = if device_side == dst { src } else { dst } as usize;
        if self.crosses_registrations(host, len) {
            return INVALID_VALUE;
        }
        let key = (device, stream.unwrap_or(0));
        let rc = self.enqueue(key, Work::Copy { dst, src, len });
        if rc == SUCCESS && stream.is_none() {
            self.complete_stream(key, u64::MAX);
        }
        rc
    }

    /// Queues writing `byte` over `[dst, dst+len)` of device memory on `stream` of `device`.
    pub(crate) fn queue_fill(
        &mut self,
        device: i32,
        dst: u64,
        len: usize,
        byte: u8,
        stream: usize,
    ) -> R {
        if len == 0 || !self.is_device_range(dst, len) {
            return INVALID_VALUE;
        }
        self.enqueue((device, stream), Work::Fill { dst, len, byte })
    }
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, byte: u8, len: usize, stream: CUstream) -> R {
    with_context("cuMemsetD8Async", |emu, device| {
        emu.queue_fill(device, dst, len, byte, stream as usize)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> R {
    memcpy(
        "cuMemcpyDtoHAsync_v2",
        dst as u64,
        src,
        len,
        src,
        Some(stream),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
    stream: CUstream,
) -> R {
    memcpy(
        "cuMemcpyHtoDAsync_v2",
        dst,
        src as u64,
        len,
        dst,
        Some(stream),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, len: usize) -> R {
    memcpy("cuMemcpyHtoD_v2", dst, src as u64, len, dst, None)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, len: usize) -> R {
    memcpy("cuMemcpyDtoH_v2", dst as u64, src, len, src, None)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut CUstream, _flags: c_uint) -> R {
    with_context("cuStreamCreate", |emu, _| {
        emu.streams += 1;
        // SAFETY: out-pointer per the driver contract.
        unsafe {
            put(
                stream,
                (0x5e00_0000 + emu.streams as usize * 0x10) as CUstream,
            )
        }
    })
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(stream: CUstream) -> R {
    with_context("cuStreamSynchronize", |emu, device| {
        emu.complete_stream((device, stream as usize), u64::MAX);
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn cuMemHostRegister_v2(p: *mut c_void, size: usize, _flags: c_uint) -> R {
    with_context("cuMemHostRegister_v2", |emu, _| emu.register_host(p, size))
}

#[no_mangle]
pub extern "C" fn cuMemHostUnregister(p: *mut c_void) -> R {
    with_context("cuMemHostUnregister", |emu, _| emu.unregister_host(p))
}

impl Emu {
    /// Page-locks (records) `[p, p+size)`; overlapping an earlier registration is refused.
    pub(crate) fn register_host(&mut self, p: *mut c_void, size: usize) -> R {
        let start = p as usize;
        if p.is_null() || size == 0 {
            return INVALID_VALUE;
        }
        let overlaps = self
            .registered
            .iter()
            .any(|(base, len)| start < base + len && *base < start + size);
        if overlaps {
            return 712; // HOST_MEMORY_ALREADY_REGISTERED
        }
        self.registered.insert(start, size);
        SUCCESS
    }

    /// Undoes [`register_host`](Self::register_host) of the registration starting at `p`.
    pub(crate) fn unregister_host(&mut self, p: *mut c_void) -> R {
        match self.registered.remove(&(p as usize)) {
            Some(len) => {
                self.check_release(p as u64, len, "unregistered host memory");
                SUCCESS
            }
            None => 713, // HOST_MEMORY_NOT_REGISTERED
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(event: *mut CUevent, _flags: c_uint) -> R {
    with_context("cuEventCreate", |emu, _| {
        emu.events += 1;
        emu.next_event += 0x10;
        // SAFETY: out-pointer per the driver contract.
        unsafe { put(event, emu.next_event as CUevent) }
    })
}

#[no_mangle]
pub extern "C" fn cuEventRecord(event: CUevent, stream: CUstream) -> R {
    with_context("cuEventRecord", |emu, device| {
        if event.is_null() {
            return INVALID_HANDLE;
        }
        emu.record_event(event as usize, (device, stream as usize));
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(event: CUevent) -> R {
    with_context("cuEventSynchronize", |emu, _| {
        if event.is_null() {
            return INVALID_HANDLE;
        }
        emu.synchronize_event(event as usize);
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(event: CUevent) -> R {
    with_context("cuEventDestroy_v2", |emu, _| {
        if event.is_null() {
            return INVALID_HANDLE;
        }
        emu.events = emu.events.saturating_sub(1);
        SUCCESS
    })
}

/// The one module the emulator loads: devmem's checksum PTX.
const CHECKSUM_MODULE: usize = 0xc4ec_0000;
/// Its `devmem_checksum` function.
const CHECKSUM_FUNCTION: usize = 0xc4ec_0010;

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut *mut c_void, image: *const c_void) -> R {
    with_context("cuModuleLoadData", |_, _| {
        if module.is_null() || image.is_null() {
            return INVALID_VALUE;
        }
        // SAFETY: a PTX image is a NUL-terminated string, per the driver contract.
        let text = unsafe { CStr::from_ptr(image.cast()) }.to_string_lossy();
        if !text.contains(".entry devmem_checksum(") {
            return INVALID_IMAGE;
        }
        // SAFETY: out-pointer per the driver contract.
        unsafe { put(module, CHECKSUM_MODULE as *mut c_void) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> R {
    with_context("cuModuleGetFunction", |_, _| {
        if function.is_null() || name.is_null() || module as usize != CHECKSUM_MODULE {
            return INVALID_VALUE;
        }
        // SAFETY: a NUL-terminated name, per the driver contract.
        if unsafe { CStr::from_ptr(name) } != c"devmem_checksum" {
            return NOT_FOUND;
        }
        // SAFETY: out-pointer per the driver contract.
        unsafe { put(function, CHECKSUM_FUNCTION as *mut c_void) }
    })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    function: *mut c_void,
    grid_x: c_uint,
    _grid_y: c_uint,
    _grid_z: c_uint,
    block_x: c_uint,
    _block_y: c_uint,
    _block_z: c_uint,
    _shared: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> R {
    with_context("cuLaunchKernel", |emu, device| {
        if function as usize != CHECKSUM_FUNCTION || params.is_null() {
            return INVALID_VALUE;
        }
        if grid_x as usize != CHECKSUM_PARTIALS || block_x == 0 || block_x > 1024 {
            return INVALID_VALUE;
        }
        // SAFETY: the kernel's three parameters (words, count, partials), each a pointer to a
        // u64, per cuLaunchKernel's contract.
        let (src, count, partials) = unsafe {
            let arg = |i: usize| *(*params.add(i)).cast::<u64>();
            (arg(0), arg(1), arg(2))
        };
        let Some(len) = usize::try_from(count).ok().and_then(|c| c.checked_mul(8)) else {
            return INVALID_VALUE;
        };
        if !emu.is_device_range(src, len) || !emu.is_device_range(partials, CHECKSUM_PARTIALS * 8) {
            return INVALID_VALUE;
        }
        emu.enqueue(
            (device, stream as usize),
            Work::Checksum { src, len, partials },
        )
    })
}
