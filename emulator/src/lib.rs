//! A GPU driver emulator: a shared library exporting the CUDA driver and Level Zero entry points
//! devmem uses (both faces share one emulated memory),
//! implemented on host memory with real virtual-memory semantics, so devmem's real backend code
//! runs in CI without a GPU.
//!
//! * reserve = an inaccessible anonymous mapping; create = a memfd; map = a shared fixed
//!   mapping of the memfd; set access = mprotect read-write; unmap = inaccessible again;
//!   release = close. Device pointers are host addresses, so tests read and write through them.
//! * Each device has a capacity (`DEVMEM_EMU_CAPACITY`, default 1 GiB, suffixes K/M/G), so
//!   out-of-memory is real. `DEVMEM_EMU_DEVICES` (default 1), `DEVMEM_EMU_GRANULARITY`
//!   (default 2 MiB), `DEVMEM_EMU_FABRIC=1` (the device claims fabric handles but creating them
//!   is not permitted, as without IMEX), `DEVMEM_EMU_RDMA=1`, `DEVMEM_EMU_NO_VMM=1`.
//! * Fault injection: `DEVMEM_EMU_FAIL="cuMemCreate:3:2,cuMemMap:1:999"` fails the 3rd call of
//!   cuMemCreate with error 2 and the 1st cuMemMap with 999; or `cuemu_inject` at run time.
//! * Counters of live handles, mappings, reservations and host buffers for leak checks
//!   (`cuemu_counters`).
//!
//! Calls that need a context fail with `CUDA_ERROR_INVALID_CONTEXT` when the thread has none,
//! and `cuMemGetInfo` reports the current context's device, as the real driver does.

#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]
// These are C entry points; the driver API documents their pointer contracts.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, MutexGuard};

use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdeviceptr, CUevent, CUmemAccessDesc, CUmemAllocationHandleType,
    CUmemAllocationProp, CUmemAllocationType, CUmemGenericAllocationHandle, CUmemLocationType,
    CUstream,
};

type R = c_uint;
const SUCCESS: R = 0;
const INVALID_VALUE: R = 1;
const OUT_OF_MEMORY: R = 2;
const NOT_INITIALIZED: R = 3;
const INVALID_DEVICE: R = 101;
const INVALID_CONTEXT: R = 201;
const INVALID_HANDLE: R = 400;
const NOT_PERMITTED: R = 800;
const NOT_SUPPORTED: R = 801;

const ERROR_NAMES: &[(R, &CStr, &CStr)] = &[
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
    (999, c"CUDA_ERROR_UNKNOWN", c"unknown error"),
];

struct Config {
    devices: i32,
    capacity: usize,
    granularity: usize,
    fabric: bool,
    rdma: bool,
    vmm: bool,
    /// Level Zero drivers the loader reports (`DEVMEM_EMU_ZE_DRIVERS`, default 1).
    ze_drivers: u32,
    /// Whether zeDriverGetDefaultContext answers (`DEVMEM_EMU_ZE_NO_DEFAULT_CONTEXT=1`: no).
    ze_default_context: bool,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Parses "123", "64K", "256M", "2G".
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, mult) = match text.chars().last()?.to_ascii_uppercase() {
        'K' => (&text[..text.len() - 1], 1usize << 10),
        'M' => (&text[..text.len() - 1], 1 << 20),
        'G' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    digits.trim().parse::<usize>().ok()?.checked_mul(mult)
}

impl Config {
    fn from_env() -> Self {
        let size = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| parse_size(&v))
                .unwrap_or(default)
        };
        Self {
            devices: std::env::var("DEVMEM_EMU_DEVICES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            capacity: size("DEVMEM_EMU_CAPACITY", 1 << 30),
            granularity: size("DEVMEM_EMU_GRANULARITY", 2 << 20),
            fabric: env_flag("DEVMEM_EMU_FABRIC"),
            rdma: env_flag("DEVMEM_EMU_RDMA"),
            vmm: !env_flag("DEVMEM_EMU_NO_VMM"),
            ze_drivers: std::env::var("DEVMEM_EMU_ZE_DRIVERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            ze_default_context: !env_flag("DEVMEM_EMU_ZE_NO_DEFAULT_CONTEXT"),
        }
    }
}

struct Physical {
    fd: c_int,
    size: usize,
    device: i32,
    /// The Level Zero context it was created in (0 for CUDA).
    context: usize,
}

struct Mapping {
    size: usize,
    accessible: bool,
}

struct Fault {
    name: String,
    /// Calls of `name` still to let through before failing.
    skip: u64,
    code: R,
}

struct Emu {
    config: Config,
    capacity: Vec<usize>,
    used: Vec<usize>,
    /// start -> (size, Level Zero context or 0 for CUDA)
    reservations: BTreeMap<u64, (usize, usize)>,
    handles: HashMap<u64, Physical>,
    mappings: BTreeMap<u64, Mapping>,
    host: HashMap<usize, usize>,
    registered: HashMap<usize, usize>,
    ze_initialized: bool,
    ze_contexts: Vec<usize>,
    events: u64,
    next_event: usize,
    streams: u64,
    next_handle: u64,
    calls: HashMap<String, u64>,
    faults: Vec<Fault>,
}

static EMU: Mutex<Option<Emu>> = Mutex::new(None);

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

fn parse_faults(spec: &str) -> Vec<Fault> {
    spec.split(',')
        .filter_map(|item| {
            let mut parts = item.trim().split(':');
            let name = parts.next()?.to_string();
            let nth: u64 = parts.next()?.parse().ok()?;
            let code: R = parts.next()?.parse().ok()?;
            Some(Fault {
                name,
                skip: nth.checked_sub(1)?,
                code,
            })
        })
        .collect()
}

fn lock() -> MutexGuard<'static, Option<Emu>> {
    EMU.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` on the emulator state, after counting the call and applying injected faults.
fn call(name: &str, f: impl FnOnce(&mut Emu) -> R) -> R {
    let mut guard = lock();
    let emu = guard.get_or_insert_with(|| {
        let config = Config::from_env();
        let n = usize::try_from(config.devices).unwrap_or(0);
        Emu {
            capacity: vec![config.capacity; n],
            used: vec![0; n],
            config,
            reservations: BTreeMap::new(),
            handles: HashMap::new(),
            mappings: BTreeMap::new(),
            host: HashMap::new(),
            registered: HashMap::new(),
            ze_initialized: false,
            ze_contexts: Vec::new(),
            events: 0,
            next_event: 0x4e00_0000,
            streams: 0,
            next_handle: 0x1000,
            calls: HashMap::new(),
            faults: std::env::var("DEVMEM_EMU_FAIL")
                .map(|s| parse_faults(&s))
                .unwrap_or_default(),
        }
    });
    *emu.calls.entry(name.to_string()).or_insert(0) += 1;
    if let Some(i) = emu.faults.iter().position(|f| f.name == name) {
        if emu.faults[i].skip == 0 {
            return emu.faults.remove(i).code;
        }
        emu.faults[i].skip -= 1;
    }
    f(emu)
}

fn context_of(device: i32) -> usize {
    0x7e00_0000 + usize::try_from(device).unwrap_or(0) * 0x100
}

fn current_device(emu: &Emu) -> Option<i32> {
    let ctx = CURRENT.with(Cell::get);
    (0..emu.config.devices).find(|d| context_of(*d) == ctx)
}

/// Runs `f` with the current context's device, or fails with INVALID_CONTEXT.
fn with_context(name: &str, f: impl FnOnce(&mut Emu, i32) -> R) -> R {
    call(name, |emu| match current_device(emu) {
        Some(device) => f(emu, device),
        None => INVALID_CONTEXT,
    })
}

/// # Safety
/// `out` must be NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T) -> R {
    if out.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-NULL and valid by the caller's contract.
    unsafe { out.write(value) };
    SUCCESS
}

impl Emu {
    fn device_ok(&self, device: i32) -> bool {
        device >= 0 && device < self.config.devices
    }

    /// The mapping that fully contains [va, va+len) and is accessible.
    fn accessible(&self, va: u64, len: usize) -> bool {
        self.mappings
            .range(..=va)
            .next_back()
            .is_some_and(|(base, m)| m.accessible && va + len as u64 <= base + m.size as u64)
    }

    fn in_reservation(&self, va: u64, size: usize) -> bool {
        self.reservations
            .range(..=va)
            .next_back()
            .is_some_and(|(base, (len, _))| va + size as u64 <= base + *len as u64)
    }

    fn overlaps_mapping(&self, va: u64, size: usize) -> bool {
        let end = va + size as u64;
        self.mappings
            .range(..end)
            .next_back()
            .is_some_and(|(base, m)| base + m.size as u64 > va)
    }
}

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
pub extern "C" fn cuCtxSynchronize() -> R {
    with_context("cuCtxSynchronize", |_, _| SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> R {
    with_context("cuMemGetInfo_v2", |emu, device| {
        let d = device as usize;
        // SAFETY: out-pointers per the driver contract.
        unsafe {
            let rc = put(free, emu.capacity[d].saturating_sub(emu.used[d]));
            if rc != SUCCESS {
                return rc;
            }
            put(total, emu.capacity[d])
        }
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

impl Emu {
    /// Reserves `size` bytes aligned to `alignment` (at least the granularity).
    fn reserve(&mut self, size: usize, alignment: usize, context: usize) -> Result<u64, R> {
        let granularity = self.config.granularity;
        if size == 0 || !size.is_multiple_of(granularity) {
            return Err(INVALID_VALUE);
        }
        let align = alignment.max(granularity);
        let span = size.checked_add(align).ok_or(OUT_OF_MEMORY)?;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(OUT_OF_MEMORY);
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        // SAFETY: trimming the unaligned head and the tail of the mapping made just above.
        unsafe {
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            let tail = start + span - (aligned + size);
            if tail > 0 {
                libc::munmap((aligned + size) as *mut c_void, tail);
            }
        }
        self.reservations.insert(aligned as u64, (size, context));
        Ok(aligned as u64)
    }

    fn free_va(&mut self, ptr: u64, size: usize) -> R {
        if self.reservations.get(&ptr).map(|r| r.0) != Some(size)
            || self.overlaps_mapping(ptr, size)
        {
            return INVALID_VALUE;
        }
        self.reservations.remove(&ptr);
        // SAFETY: the range is a reservation this emulator made and nothing maps it.
        unsafe { libc::munmap(ptr as *mut c_void, size) };
        SUCCESS
    }

    /// Creates `size` bytes of "device memory" (a memfd) on `device`.
    fn create(&mut self, device: i32, size: usize, context: usize) -> Result<u64, R> {
        if !self.device_ok(device) {
            return Err(INVALID_DEVICE);
        }
        if size == 0 || !size.is_multiple_of(self.config.granularity) {
            return Err(INVALID_VALUE);
        }
        let d = device as usize;
        if self.used[d] + size > self.capacity[d] {
            return Err(OUT_OF_MEMORY);
        }
        // SAFETY: memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"cuemu".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(OUT_OF_MEMORY);
        }
        // SAFETY: fd was just created.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            // SAFETY: closing the fd created above.
            unsafe { libc::close(fd) };
            return Err(OUT_OF_MEMORY);
        }
        self.used[d] += size;
        self.next_handle += 1;
        let id = self.next_handle;
        self.handles.insert(
            id,
            Physical {
                fd,
                size,
                device,
                context,
            },
        );
        Ok(id)
    }

    fn release(&mut self, handle: u64) -> R {
        let Some(physical) = self.handles.remove(&handle) else {
            return INVALID_VALUE;
        };
        self.used[physical.device as usize] -= physical.size;
        // SAFETY: the fd belongs to this handle and is closed once; mappings keep their pages.
        unsafe { libc::close(physical.fd) };
        SUCCESS
    }

    /// Maps a handle at `ptr` inside a reservation, without access.
    fn map(&mut self, ptr: u64, size: usize, handle: u64) -> R {
        let Some(physical) = self.handles.get(&handle) else {
            return INVALID_HANDLE;
        };
        if size != physical.size {
            return INVALID_VALUE;
        }
        if !self.in_reservation(ptr, size) || self.overlaps_mapping(ptr, size) {
            return INVALID_VALUE;
        }
        // SAFETY: the range lies inside a reservation of this emulator and is not mapped.
        let raw = unsafe {
            libc::mmap(
                ptr as *mut c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                physical.fd,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return OUT_OF_MEMORY;
        }
        self.mappings.insert(
            ptr,
            Mapping {
                size,
                accessible: false,
            },
        );
        SUCCESS
    }

    fn set_access(&mut self, ptr: u64, size: usize) -> R {
        match self.mappings.get_mut(&ptr) {
            Some(m) if m.size == size => {
                // SAFETY: the range is a mapping this emulator made.
                let rc = unsafe {
                    libc::mprotect(ptr as *mut c_void, size, libc::PROT_READ | libc::PROT_WRITE)
                };
                if rc != 0 {
                    return INVALID_VALUE;
                }
                m.accessible = true;
                SUCCESS
            }
            _ => INVALID_VALUE,
        }
    }

    fn unmap(&mut self, ptr: u64, size: usize) -> R {
        if self.mappings.get(&ptr).map(|m| m.size) != Some(size) {
            return INVALID_VALUE;
        }
        // SAFETY: replacing a mapping this emulator made with an inaccessible one, keeping the
        // reservation.
        let raw = unsafe {
            libc::mmap(
                ptr as *mut c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return INVALID_VALUE;
        }
        self.mappings.remove(&ptr);
        SUCCESS
    }

    /// Allocates `size` bytes of page-locked-looking host memory.
    fn alloc_host(&mut self, size: usize) -> Result<*mut c_void, R> {
        if size == 0 {
            return Err(INVALID_VALUE);
        }
        // SAFETY: a fresh anonymous mapping.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(OUT_OF_MEMORY);
        }
        self.host.insert(raw as usize, size);
        Ok(raw)
    }

    fn free_host(&mut self, p: *mut c_void) -> R {
        match self.host.remove(&(p as usize)) {
            Some(size) => {
                // SAFETY: a mapping made by `alloc_host`, freed once.
                unsafe { libc::munmap(p, size) };
                SUCCESS
            }
            None => INVALID_VALUE,
        }
    }

    /// Whether `[p, p+len)` touches a reservation (device address space).
    fn is_device_range(&self, p: u64, len: usize) -> bool {
        let end = p + len as u64;
        self.reservations
            .range(..end)
            .next_back()
            .is_some_and(|(base, (size, _))| base + *size as u64 > p)
    }

    /// Copies `len` bytes; device ranges must be mapped with access.
    fn copy(&self, dst: u64, src: u64, len: usize) -> R {
        if dst == 0 || src == 0 {
            return INVALID_VALUE;
        }
        for p in [dst, src] {
            if self.is_device_range(p, len) && !self.accessible(p, len) {
                return INVALID_VALUE;
            }
        }
        // SAFETY: device ranges were checked to be accessible mappings; host ranges belong to
        // the caller.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
        SUCCESS
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    alignment: usize,
    _addr: CUdeviceptr,
    _flags: u64,
) -> R {
    with_context("cuMemAddressReserve", |emu, _| {
        if ptr.is_null() {
            return INVALID_VALUE;
        }
        match emu.reserve(size, alignment, 0) {
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
        if prop.requestedHandleTypes == CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_FABRIC {
            return if emu.config.fabric {
                NOT_PERMITTED
            } else {
                NOT_SUPPORTED
            };
        }
        match emu.create(prop.location.id, size, 0) {
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
        emu.set_access(ptr, size)
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

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
    _stream: CUstream,
) -> R {
    with_context("cuMemcpyDtoHAsync_v2", |emu, _| {
        if !emu.is_device_range(src, len) {
            return INVALID_VALUE;
        }
        emu.copy(dst as u64, src, len)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
    _stream: CUstream,
) -> R {
    with_context("cuMemcpyHtoDAsync_v2", |emu, _| {
        if !emu.is_device_range(dst, len) {
            return INVALID_VALUE;
        }
        emu.copy(dst, src as u64, len)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, len: usize) -> R {
    // SAFETY: same contract as the async form.
    unsafe { cuMemcpyHtoDAsync_v2(dst, src, len, std::ptr::null_mut()) }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, len: usize) -> R {
    // SAFETY: same contract as the async form.
    unsafe { cuMemcpyDtoHAsync_v2(dst, src, len, std::ptr::null_mut()) }
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
pub extern "C" fn cuStreamSynchronize(_stream: CUstream) -> R {
    with_context("cuStreamSynchronize", |_, _| SUCCESS)
}

#[no_mangle]
pub extern "C" fn cuMemHostRegister_v2(p: *mut c_void, size: usize, _flags: c_uint) -> R {
    with_context("cuMemHostRegister_v2", |emu, _| {
        let start = p as usize;
        if p.is_null() || size == 0 {
            return INVALID_VALUE;
        }
        let overlaps = emu
            .registered
            .iter()
            .any(|(base, len)| start < base + len && *base < start + size);
        if overlaps {
            return 712; // CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
        }
        emu.registered.insert(start, size);
        SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn cuMemHostUnregister(p: *mut c_void) -> R {
    with_context("cuMemHostUnregister", |emu, _| {
        match emu.registered.remove(&(p as usize)) {
            Some(_) => SUCCESS,
            None => 713, // CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
        }
    })
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
pub extern "C" fn cuEventRecord(event: CUevent, _stream: CUstream) -> R {
    with_context("cuEventRecord", |_, _| {
        if event.is_null() {
            INVALID_HANDLE
        } else {
            SUCCESS
        }
    })
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(event: CUevent) -> R {
    with_context("cuEventSynchronize", |_, _| {
        if event.is_null() {
            INVALID_HANDLE
        } else {
            SUCCESS
        }
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

// ---------------------------------------------------------------------------------------------
// Level Zero face: the same memory, reached through the loader's entry points
// ---------------------------------------------------------------------------------------------

type Z = u32;
const ZE_SUCCESS: Z = 0;
const ZE_OUT_OF_HOST_MEMORY: Z = 0x7000_0002;
const ZE_OUT_OF_DEVICE_MEMORY: Z = 0x7000_0003;
const ZE_UNINITIALIZED: Z = 0x7800_0001;
const ZE_UNSUPPORTED_FEATURE: Z = 0x7800_0003;
const ZE_INVALID_ARGUMENT: Z = 0x7800_0004;
const ZE_INVALID_NULL_HANDLE: Z = 0x7800_0005;
const ZE_INVALID_NULL_POINTER: Z = 0x7800_0007;

const ZE_DRIVER: usize = 0x7c00_0000;
const ZE_DEFAULT_CONTEXT: usize = 0x7b00_0000;

fn ze_device(i: i32) -> usize {
    0x7d00_0000 + usize::try_from(i).unwrap_or(0) * 0x100
}

fn ze_device_index(emu: &Emu, handle: *mut c_void) -> Option<i32> {
    (0..emu.config.devices).find(|d| ze_device(*d) == handle as usize)
}

/// Maps the CUDA-face result codes of the shared helpers to `ze_result_t`.
fn ze_code(rc: R) -> Z {
    match rc {
        SUCCESS => ZE_SUCCESS,
        OUT_OF_MEMORY => ZE_OUT_OF_DEVICE_MEMORY,
        INVALID_HANDLE => ZE_INVALID_NULL_HANDLE,
        _ => ZE_INVALID_ARGUMENT,
    }
}

fn ze_call(name: &str, f: impl FnOnce(&mut Emu) -> Z) -> Z {
    call(name, |emu| {
        if !emu.ze_initialized && name != "zeInit" {
            return ZE_UNINITIALIZED;
        }
        f(emu)
    })
}

fn ze_context_ok(emu: &Emu, ctx: *mut c_void) -> bool {
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
    _start: *const c_void,
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
        match emu.reserve(size, 0, ctx as usize) {
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
        emu.streams += 1;
        // SAFETY: out-pointer per the specification.
        unsafe { *out = (0x5d00_0000 + emu.streams as usize * 0x10) as *mut c_void };
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
        if list.is_null() {
            return ZE_INVALID_NULL_HANDLE;
        }
        ze_code(emu.copy(dst as u64, src as u64, size))
    })
}

#[no_mangle]
pub extern "C" fn zeCommandListAppendSignalEvent(list: *mut c_void, event: *mut c_void) -> Z {
    ze_call("zeCommandListAppendSignalEvent", |_| {
        if list.is_null() || event.is_null() {
            ZE_INVALID_NULL_HANDLE
        } else {
            ZE_SUCCESS
        }
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
    ze_call("zeEventHostSynchronize", |_| {
        if event.is_null() {
            ZE_INVALID_NULL_HANDLE
        } else {
            ZE_SUCCESS
        }
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

// ---------------------------------------------------------------------------------------------
// Control interface for tests (not part of the CUDA API)
// ---------------------------------------------------------------------------------------------

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
        });
    // SAFETY: out-pointer per this function's contract.
    unsafe { put(out, counters) }
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
