//! The HIP runtime's symbol table, opened at run time from `libamdhip64.so` (or the path in
//! `DEVMEM_HIP_LIBRARY`), and thin wrappers that turn each `hipError_t` into an [`Error`]
//! naming the call and the runtime's error name.
//!
//! No HIP crate loads the runtime at run time, so the few types devmem passes by pointer are
//! declared here from the HIP API reference (`hip_runtime_api.h`): [`HipMemAllocationProp`]
//! (32 bytes), [`HipMemLocation`] and [`HipMemAccessDesc`]. Results come back as raw integers,
//! never as a Rust enum, so a value this build does not know cannot be undefined behaviour.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use super::symbol_table;
use crate::error::{devmem_status, Error, Result};

/// A `hipError_t` as the runtime returns it.
pub(crate) type RawResult = c_int;

/// `hipSuccess`.
pub(crate) const HIP_SUCCESS: RawResult = 0;
/// `hipErrorOutOfMemory`.
pub(crate) const HIP_ERROR_OUT_OF_MEMORY: RawResult = 2;
/// `hipErrorNotSupported` (e.g. a device without virtual memory management).
pub(crate) const HIP_ERROR_NOT_SUPPORTED: RawResult = 801;

/// `hipMemAllocationTypePinned`.
pub(crate) const MEM_ALLOCATION_TYPE_PINNED: c_uint = 1;
/// `hipMemLocationTypeDevice`.
pub(crate) const MEM_LOCATION_TYPE_DEVICE: c_uint = 1;
/// `hipMemAccessFlagsProtReadWrite`.
pub(crate) const MEM_ACCESS_PROT_READ_WRITE: c_uint = 3;
/// `hipMemAccessFlagsProtRead`.
pub(crate) const MEM_ACCESS_PROT_READ: c_uint = 1;
/// `hipMemHandleTypePosixFileDescriptor`.
pub(crate) const MEM_HANDLE_TYPE_POSIX_FD: c_uint = 1;
/// `hipMemAllocationGranularityMinimum`.
pub(crate) const GRANULARITY_MINIMUM: c_uint = 0;
/// `hipStreamNonBlocking`.
pub(crate) const STREAM_NON_BLOCKING: c_uint = 1;
/// `hipEventDisableTiming`.
pub(crate) const EVENT_DISABLE_TIMING: c_uint = 2;
/// `hipHostRegisterPortable`.
pub(crate) const HOST_REGISTER_PORTABLE: c_uint = 1;

/// The library names tried when `DEVMEM_HIP_LIBRARY` is unset and the process has no HIP
/// runtime loaded yet.
pub(crate) const DEFAULT_LIBRARIES: [&str; 3] =
    ["libamdhip64.so", "libamdhip64.so.7", "libamdhip64.so.6"];
/// Environment variable that overrides the runtime library path.
pub(crate) const LIBRARY_ENV: &str = "DEVMEM_HIP_LIBRARY";

/// `hipMemLocation`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HipMemLocation {
    /// `hipMemLocationType`.
    pub(crate) kind: c_uint,
    /// The device ordinal.
    pub(crate) id: c_int,
}

/// `hipMemAllocationProp`'s `allocFlags`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HipAllocFlags {
    pub(crate) compression_type: u8,
    pub(crate) gpu_direct_rdma_capable: u8,
    pub(crate) usage: u16,
}

/// `hipMemAllocationProp`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct HipMemAllocationProp {
    /// `hipMemAllocationType`.
    pub(crate) kind: c_uint,
    /// `hipMemAllocationHandleType` (`hipMemHandleTypeNone`, 0).
    pub(crate) requested_handle_type: c_uint,
    pub(crate) location: HipMemLocation,
    pub(crate) win32_handle_meta_data: *mut c_void,
    pub(crate) alloc_flags: HipAllocFlags,
}

/// `hipMemAccessDesc`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HipMemAccessDesc {
    pub(crate) location: HipMemLocation,
    /// `hipMemAccessFlags`.
    pub(crate) flags: c_uint,
}

const _: () = assert!(std::mem::size_of::<HipMemAllocationProp>() == 32);
const _: () = assert!(std::mem::size_of::<HipMemAccessDesc>() == 12);

impl HipMemAllocationProp {
    /// Pinned device memory on `device`, no shareable handle.
    pub(crate) fn device(device: c_int) -> Self {
        Self {
            kind: MEM_ALLOCATION_TYPE_PINNED,
            requested_handle_type: 0,
            location: HipMemLocation {
                kind: MEM_LOCATION_TYPE_DEVICE,
                id: device,
            },
            win32_handle_meta_data: std::ptr::null_mut(),
            alloc_flags: HipAllocFlags::default(),
        }
    }
}

/// A `hipStream_t` / `hipEvent_t` / `hipMemGenericAllocationHandle_t` (opaque pointers).
type Opaque = *mut c_void;

symbol_table! {
    /// Every HIP entry point devmem uses, resolved once when the library is opened.
    pub struct HipApi returns RawResult, named "HIP runtime library" {
        init = "hipInit": fn(c_uint);
        get_device_count = "hipGetDeviceCount": fn(*mut c_int);
        get_device = "hipGetDevice": fn(*mut c_int);
        set_device = "hipSetDevice": fn(c_int);
        device_synchronize = "hipDeviceSynchronize": fn();
        mem_get_info = "hipMemGetInfo": fn(*mut usize, *mut usize);
        mem_get_allocation_granularity = "hipMemGetAllocationGranularity":
            fn(*mut usize, *const HipMemAllocationProp, c_uint);
        mem_address_reserve = "hipMemAddressReserve":
            fn(*mut *mut c_void, usize, usize, *mut c_void, u64);
        mem_address_free = "hipMemAddressFree": fn(*mut c_void, usize);
        mem_create = "hipMemCreate":
            fn(*mut Opaque, usize, *const HipMemAllocationProp, u64);
        mem_release = "hipMemRelease": fn(Opaque);
        mem_map = "hipMemMap": fn(*mut c_void, usize, usize, Opaque, u64);
        mem_unmap = "hipMemUnmap": fn(*mut c_void, usize);
        mem_set_access = "hipMemSetAccess":
            fn(*mut c_void, usize, *const HipMemAccessDesc, usize);
        memcpy_dtoh_async = "hipMemcpyDtoHAsync": fn(*mut c_void, *mut c_void, usize, Opaque);
        memcpy_htod_async = "hipMemcpyHtoDAsync": fn(*mut c_void, *mut c_void, usize, Opaque);
        memset_d8_async = "hipMemsetD8Async": fn(*mut c_void, u8, usize, Opaque);
        stream_create_with_flags = "hipStreamCreateWithFlags": fn(*mut Opaque, c_uint);
        stream_synchronize = "hipStreamSynchronize": fn(Opaque);
        host_register = "hipHostRegister": fn(*mut c_void, usize, c_uint);
        host_unregister = "hipHostUnregister": fn(*mut c_void);
        event_create_with_flags = "hipEventCreateWithFlags": fn(*mut Opaque, c_uint);
        event_record = "hipEventRecord": fn(Opaque, Opaque);
        event_synchronize = "hipEventSynchronize": fn(Opaque);
    }
    optional {
        get_error_name = "hipGetErrorName": fn(RawResult) -> *const c_char;
        get_error_string = "hipGetErrorString": fn(RawResult) -> *const c_char;
        runtime_get_version = "hipRuntimeGetVersion": fn(*mut c_int) -> RawResult;
        mem_export = "hipMemExportToShareableHandle":
            fn(*mut c_void, Opaque, c_uint, u64) -> RawResult;
        mem_import = "hipMemImportFromShareableHandle":
            fn(*mut Opaque, *mut c_void, c_uint) -> RawResult;
    }
}

/// The path of a HIP runtime already mapped into this process, if any.
fn loaded_runtime() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|name| name.starts_with("libamdhip64"))
        })
        .map(str::to_string)
}

fn text(pointer: *const c_char) -> Option<String> {
    // SAFETY: the runtime returns NULL or a NUL-terminated static string.
    (!pointer.is_null()).then(|| {
        unsafe { CStr::from_ptr(pointer) }
            .to_string_lossy()
            .into_owned()
    })
}

impl HipApi {
    /// Opens the runtime library (`DEVMEM_HIP_LIBRARY` or `libamdhip64.so`), resolves every
    /// symbol and calls `hipInit(0)`.
    ///
    /// Without `DEVMEM_HIP_LIBRARY`, a HIP runtime already mapped into the process (PyTorch's
    /// ROCm build loads its own copy) is used first, so devmem and the application share one
    /// runtime, its devices and its streams; then the names in [`DEFAULT_LIBRARIES`].
    pub fn load() -> Result<Self> {
        let set = crate::env::path(LIBRARY_ENV).is_some();
        let mut candidates: Vec<String> = Vec::new();
        if !set {
            candidates.extend(loaded_runtime());
            candidates.extend(DEFAULT_LIBRARIES.iter().map(|s| s.to_string()));
        }
        let mut failures = Vec::new();
        let mut opened = None;
        if set {
            opened = Some(super::open(LIBRARY_ENV, "", "the HIP runtime library")?);
        } else {
            for name in &candidates {
                match super::open(LIBRARY_ENV, name, "the HIP runtime library") {
                    Ok(found) => {
                        opened = Some(found);
                        break;
                    }
                    Err(err) => failures.push(err.message),
                }
            }
        }
        let Some((lib, path)) = opened else {
            return Err(Error::new(
                devmem_status::DriverNotFound,
                failures.join("; "),
            ));
        };
        let api = Self::resolve(lib, path)?;
        // SAFETY: hipInit takes flags by value and has no other preconditions.
        api.check("hipInit", unsafe { (api.init)(0) })?;
        Ok(api)
    }

    /// The runtime's name for an error code, e.g. `hipErrorOutOfMemory`.
    pub fn error_name(&self, code: RawResult) -> String {
        // SAFETY: takes the code by value and returns a static string or NULL.
        let name = self.get_error_name.and_then(|f| text(unsafe { f(code) }));
        name.unwrap_or_else(|| format!("hipError_t {code}"))
    }

    /// Turns a runtime result into `Ok` or an error naming `call` and the runtime's error.
    pub fn check(&self, call: &str, code: RawResult) -> Result<()> {
        if code == HIP_SUCCESS {
            return Ok(());
        }
        let status = match code {
            HIP_ERROR_OUT_OF_MEMORY => devmem_status::OutOfMemory,
            HIP_ERROR_NOT_SUPPORTED => devmem_status::Unsupported,
            _ => devmem_status::Driver,
        };
        let name = self.error_name(code);
        // SAFETY: as in `error_name`.
        let desc = self.get_error_string.and_then(|f| text(unsafe { f(code) }));
        let message = match desc {
            Some(desc) if !desc.is_empty() => format!("{call} failed: {name} ({code}): {desc}"),
            _ => format!("{call} failed: {name} ({code})"),
        };
        Err(Error::new(status, message))
    }
}

/// Thin `Result` wrappers, one per entry point devmem calls: the only place the HIP backend's
/// runtime calls are made. Calls that take raw memory addresses whose validity the runtime
/// cannot check are `unsafe`.
impl HipApi {
    /// `hipRuntimeGetVersion`, when it answers (e.g. 60443483 for ROCm 6.4).
    pub(crate) fn runtime_version(&self) -> Option<c_int> {
        let get = self.runtime_get_version?;
        let mut version: c_int = 0;
        // SAFETY: the out-pointer is valid for one c_int.
        (unsafe { get(&mut version) } == HIP_SUCCESS).then_some(version)
    }

    /// `hipGetDeviceCount`.
    pub(crate) fn device_count(&self) -> Result<c_int> {
        let mut count: c_int = 0;
        // SAFETY: the out-pointer is valid for one c_int.
        self.check("hipGetDeviceCount", unsafe {
            (self.get_device_count)(&mut count)
        })?;
        Ok(count)
    }

    /// `hipGetDevice`: the calling thread's device.
    pub(crate) fn current_device(&self) -> Result<c_int> {
        let mut device: c_int = 0;
        // SAFETY: the out-pointer is valid for one c_int.
        self.check("hipGetDevice", unsafe { (self.get_device)(&mut device) })?;
        Ok(device)
    }

    /// `hipSetDevice`. The runtime validates the ordinal.
    pub(crate) fn set_device(&self, device: c_int) -> Result<()> {
        // SAFETY: plain value.
        self.check("hipSetDevice", unsafe { (self.set_device)(device) })
    }

    /// `hipDeviceSynchronize`: waits for every stream of the current device.
    pub(crate) fn synchronize_device(&self) -> Result<()> {
        // SAFETY: no arguments.
        self.check("hipDeviceSynchronize", unsafe {
            (self.device_synchronize)()
        })
    }

    /// `hipMemGetInfo` of the current device.
    pub(crate) fn memory_info(&self) -> Result<(usize, usize)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid.
        self.check("hipMemGetInfo", unsafe {
            (self.mem_get_info)(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// `hipMemGetAllocationGranularity` (minimum granularity).
    pub(crate) fn granularity(&self, prop: &HipMemAllocationProp) -> Result<usize> {
        let mut granularity = 0usize;
        // SAFETY: both pointers are valid for the call.
        self.check("hipMemGetAllocationGranularity", unsafe {
            (self.mem_get_allocation_granularity)(&mut granularity, prop, GRANULARITY_MINIMUM)
        })?;
        Ok(granularity)
    }

    /// `hipMemAddressReserve` of `size` bytes aligned to `alignment`, at `hint` when it is
    /// free (0: anywhere). The runtime may return another address than the hint.
    pub(crate) fn address_reserve(&self, size: usize, alignment: usize, hint: u64) -> Result<u64> {
        let mut va: *mut c_void = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid; the hint is only a request.
        self.check("hipMemAddressReserve", unsafe {
            (self.mem_address_reserve)(&mut va, size, alignment, hint as *mut c_void, 0)
        })?;
        Ok(va as u64)
    }

    /// `hipMemAddressFree`.
    ///
    /// # Safety
    /// Nothing may use `[va, va+size)` afterwards.
    pub(crate) unsafe fn address_free(&self, va: u64, size: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("hipMemAddressFree", unsafe {
            (self.mem_address_free)(va as *mut c_void, size)
        })
    }

    /// `hipMemCreate`.
    pub(crate) fn create(&self, size: usize, prop: &HipMemAllocationProp) -> Result<u64> {
        let mut handle: Opaque = std::ptr::null_mut();
        // SAFETY: both pointers are valid for the call.
        self.check("hipMemCreate", unsafe {
            (self.mem_create)(&mut handle, size, prop, 0)
        })?;
        Ok(handle as u64)
    }

    /// `hipMemExportToShareableHandle` as a POSIX file descriptor (owned by the caller).
    pub(crate) fn export_fd(&self, handle: u64) -> Result<std::os::fd::OwnedFd> {
        let Some(export) = self.mem_export else {
            return Err(Error::new(
                devmem_status::Unsupported,
                format!(
                    "hipMemExportToShareableHandle is missing from {}",
                    self.path()
                ),
            ));
        };
        let mut fd: c_int = -1;
        // SAFETY: for POSIX file descriptors the runtime writes one int through the pointer.
        let rc = unsafe {
            export(
                (&raw mut fd).cast(),
                handle as Opaque,
                MEM_HANDLE_TYPE_POSIX_FD,
                0,
            )
        };
        self.check("hipMemExportToShareableHandle", rc)?;
        if fd < 0 {
            return Err(Error::new(
                devmem_status::Driver,
                format!("hipMemExportToShareableHandle returned file descriptor {fd}"),
            ));
        }
        // SAFETY: the runtime created this descriptor for the caller, who now owns it.
        Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    /// `hipMemImportFromShareableHandle` of a POSIX file descriptor (the caller keeps `fd`).
    pub(crate) fn import_fd(&self, fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
        let Some(import) = self.mem_import else {
            return Err(Error::new(
                devmem_status::Unsupported,
                format!(
                    "hipMemImportFromShareableHandle is missing from {}",
                    self.path()
                ),
            ));
        };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let mut handle: Opaque = std::ptr::null_mut();
        // SAFETY: the descriptor's value is passed as the pointer argument; one handle is
        // written.
        let rc = unsafe {
            import(
                &mut handle,
                raw as isize as *mut c_void,
                MEM_HANDLE_TYPE_POSIX_FD,
            )
        };
        self.check("hipMemImportFromShareableHandle", rc)?;
        Ok(handle as u64)
    }

    /// `hipMemRelease`.
    pub(crate) fn release(&self, handle: u64) -> Result<()> {
        // SAFETY: a handle the runtime validates; a mapping keeps its memory until unmapped.
        self.check("hipMemRelease", unsafe {
            (self.mem_release)(handle as Opaque)
        })
    }

    /// `hipMemMap` of the whole handle at `va`.
    pub(crate) fn map(&self, va: u64, size: usize, handle: u64) -> Result<()> {
        // SAFETY: the runtime checks that the range is reserved and unmapped.
        self.check("hipMemMap", unsafe {
            (self.mem_map)(va as *mut c_void, size, 0, handle as Opaque, 0)
        })
    }

    /// `hipMemSetAccess` with one descriptor.
    pub(crate) fn set_access(&self, va: u64, size: usize, desc: &HipMemAccessDesc) -> Result<()> {
        // SAFETY: one valid descriptor is passed.
        self.check("hipMemSetAccess", unsafe {
            (self.mem_set_access)(va as *mut c_void, size, desc, 1)
        })
    }

    /// `hipMemUnmap`.
    ///
    /// # Safety
    /// No work may still use the range (the caller synchronised), and nothing may use it after.
    pub(crate) unsafe fn unmap(&self, va: u64, size: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("hipMemUnmap", unsafe {
            (self.mem_unmap)(va as *mut c_void, size)
        })
    }

    /// `hipMemcpyDtoHAsync` on `stream`.
    ///
    /// # Safety
    /// `dst` must be pinned host memory valid for `len` bytes until the copy is waited for.
    pub(crate) unsafe fn copy_to_host_async(
        &self,
        dst: *mut c_void,
        src: u64,
        len: usize,
        stream: Opaque,
    ) -> Result<()> {
        // SAFETY: the caller's contract; the runtime checks the device range.
        self.check("hipMemcpyDtoHAsync", unsafe {
            (self.memcpy_dtoh_async)(dst, src as *mut c_void, len, stream)
        })
    }

    /// `hipMemcpyHtoDAsync` on `stream`.
    ///
    /// # Safety
    /// `src` must be pinned host memory valid for `len` bytes until the copy is waited for.
    pub(crate) unsafe fn copy_to_device_async(
        &self,
        dst: u64,
        src: *const c_void,
        len: usize,
        stream: Opaque,
    ) -> Result<()> {
        // SAFETY: the caller's contract; the runtime checks the device range.
        self.check("hipMemcpyHtoDAsync", unsafe {
            (self.memcpy_htod_async)(dst as *mut c_void, src.cast_mut(), len, stream)
        })
    }

    /// `hipMemsetD8Async` of zeros on `stream`.
    ///
    /// # Safety
    /// `[dst, dst+len)` must be mapped device memory nothing else writes until the stream is
    /// waited for.
    pub(crate) unsafe fn zero_async(&self, dst: u64, len: usize, stream: Opaque) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("hipMemsetD8Async", unsafe {
            (self.memset_d8_async)(dst as *mut c_void, 0, len, stream)
        })
    }

    /// `hipStreamCreateWithFlags` on the current device.
    pub(crate) fn create_stream(&self, flags: c_uint) -> Result<Opaque> {
        let mut stream: Opaque = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        self.check("hipStreamCreateWithFlags", unsafe {
            (self.stream_create_with_flags)(&mut stream, flags)
        })?;
        Ok(stream)
    }

    /// `hipStreamSynchronize`.
    pub(crate) fn synchronize_stream(&self, stream: Opaque) -> Result<()> {
        // SAFETY: a stream devmem created and never destroys.
        self.check("hipStreamSynchronize", unsafe {
            (self.stream_synchronize)(stream)
        })
    }

    /// `hipHostRegister`.
    ///
    /// # Safety
    /// `[ptr, ptr+len)` must be host memory the caller owns and keeps mapped while registered.
    pub(crate) unsafe fn register_host(&self, ptr: *mut c_void, len: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("hipHostRegister", unsafe {
            (self.host_register)(ptr, len, HOST_REGISTER_PORTABLE)
        })
    }

    /// `hipHostUnregister`.
    ///
    /// # Safety
    /// No queued copy may still use the memory.
    pub(crate) unsafe fn unregister_host(&self, ptr: *mut c_void) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("hipHostUnregister", unsafe { (self.host_unregister)(ptr) })
    }

    /// `hipEventCreateWithFlags` on the current device.
    pub(crate) fn create_event(&self) -> Result<Opaque> {
        let mut event: Opaque = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        self.check("hipEventCreateWithFlags", unsafe {
            (self.event_create_with_flags)(&mut event, EVENT_DISABLE_TIMING)
        })?;
        Ok(event)
    }

    /// `hipEventRecord`.
    pub(crate) fn record_event(&self, event: Opaque, stream: Opaque) -> Result<()> {
        // SAFETY: handles the runtime validates.
        self.check("hipEventRecord", unsafe {
            (self.event_record)(event, stream)
        })
    }

    /// `hipEventSynchronize`.
    pub(crate) fn synchronize_event(&self, event: Opaque) -> Result<()> {
        // SAFETY: a handle the runtime validates.
        self.check("hipEventSynchronize", unsafe {
            (self.event_synchronize)(event)
        })
    }
}
