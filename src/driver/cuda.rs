//! The CUDA driver's symbol table, opened at run time from `libcuda.so.1` (or the path in
//! `DEVMEM_CUDA_LIBRARY`), and thin wrappers that turn each `CUresult` into an [`Error`] naming
//! the call and the driver's error name.
//!
//! This module never panics when the library or a symbol is missing: it returns
//! `DRIVER_NOT_FOUND` or `DRIVER`. Results come back as raw integers, never as a Rust enum, so
//! a value this build does not know cannot be undefined behaviour.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUfunction, CUmemAccessDesc,
    CUmemAllocationHandleType, CUmemAllocationProp, CUmemGenericAllocationHandle, CUmodule,
    CUresult, CUstream,
};

use super::symbol_table;
use crate::error::{devmem_status, Error, Result};

/// A `CUresult` as the driver returns it.
pub(crate) type RawResult = c_uint;

/// `CUDA_SUCCESS`.
pub(crate) const CUDA_SUCCESS: RawResult = CUresult::CUDA_SUCCESS as RawResult;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub(crate) const CUDA_ERROR_OUT_OF_MEMORY: RawResult =
    CUresult::CUDA_ERROR_OUT_OF_MEMORY as RawResult;
/// `CUDA_ERROR_NOT_PERMITTED`.
pub(crate) const CUDA_ERROR_NOT_PERMITTED: RawResult =
    CUresult::CUDA_ERROR_NOT_PERMITTED as RawResult;
/// `CUDA_ERROR_NOT_SUPPORTED`.
pub(crate) const CUDA_ERROR_NOT_SUPPORTED: RawResult =
    CUresult::CUDA_ERROR_NOT_SUPPORTED as RawResult;

/// The library name tried when `DEVMEM_CUDA_LIBRARY` is unset.
pub(crate) const DEFAULT_LIBRARY: &str = "libcuda.so.1";
/// Environment variable that overrides the driver library path.
pub(crate) const LIBRARY_ENV: &str = "DEVMEM_CUDA_LIBRARY";

symbol_table! {
    /// Every driver entry point devmem uses, resolved once when the library is opened.
    pub struct CudaApi returns RawResult, named "driver library" {
        init = "cuInit": fn(c_uint);
        driver_get_version = "cuDriverGetVersion": fn(*mut c_int);
        get_error_name = "cuGetErrorName": fn(RawResult, *mut *const c_char);
        get_error_string = "cuGetErrorString": fn(RawResult, *mut *const c_char);
        device_get_count = "cuDeviceGetCount": fn(*mut c_int);
        device_get = "cuDeviceGet": fn(*mut CUdevice, c_int);
        device_get_attribute = "cuDeviceGetAttribute":
            fn(*mut c_int, CUdevice_attribute, CUdevice);
        primary_ctx_retain = "cuDevicePrimaryCtxRetain": fn(*mut CUcontext, CUdevice);
        ctx_get_current = "cuCtxGetCurrent": fn(*mut CUcontext);
        ctx_set_current = "cuCtxSetCurrent": fn(CUcontext);
        ctx_get_device = "cuCtxGetDevice": fn(*mut CUdevice);
        ctx_synchronize = "cuCtxSynchronize": fn();
        mem_get_info = "cuMemGetInfo_v2": fn(*mut usize, *mut usize);
        mem_get_allocation_granularity = "cuMemGetAllocationGranularity":
            fn(*mut usize, *const CUmemAllocationProp, c_uint);
        mem_address_reserve = "cuMemAddressReserve":
            fn(*mut CUdeviceptr, usize, usize, CUdeviceptr, u64);
        mem_address_free = "cuMemAddressFree": fn(CUdeviceptr, usize);
        mem_create = "cuMemCreate":
            fn(*mut CUmemGenericAllocationHandle, usize, *const CUmemAllocationProp, u64);
        mem_release = "cuMemRelease": fn(CUmemGenericAllocationHandle);
        mem_map = "cuMemMap": fn(CUdeviceptr, usize, usize, CUmemGenericAllocationHandle, u64);
        mem_unmap = "cuMemUnmap": fn(CUdeviceptr, usize);
        mem_set_access = "cuMemSetAccess":
            fn(CUdeviceptr, usize, *const CUmemAccessDesc, usize);
        memcpy_dtoh_async = "cuMemcpyDtoHAsync_v2":
            fn(*mut c_void, CUdeviceptr, usize, CUstream);
        memcpy_htod_async = "cuMemcpyHtoDAsync_v2":
            fn(CUdeviceptr, *const c_void, usize, CUstream);
        stream_create = "cuStreamCreate": fn(*mut CUstream, c_uint);
        stream_synchronize = "cuStreamSynchronize": fn(CUstream);
        mem_host_register = "cuMemHostRegister_v2": fn(*mut c_void, usize, c_uint);
        mem_host_unregister = "cuMemHostUnregister": fn(*mut c_void);
        event_create = "cuEventCreate": fn(*mut CUevent, c_uint);
        event_record = "cuEventRecord": fn(CUevent, CUstream);
        event_synchronize = "cuEventSynchronize": fn(CUevent);
    }
    optional {
        module_load_data = "cuModuleLoadData": fn(*mut CUmodule, *const c_void) -> RawResult;
        module_get_function = "cuModuleGetFunction":
            fn(*mut CUfunction, CUmodule, *const c_char) -> RawResult;
        mem_export = "cuMemExportToShareableHandle":
            fn(*mut c_void, CUmemGenericAllocationHandle, CUmemAllocationHandleType, u64)
                -> RawResult;
        mem_import = "cuMemImportFromShareableHandle":
            fn(*mut CUmemGenericAllocationHandle, *mut c_void, CUmemAllocationHandleType)
                -> RawResult;
        memset_d8_async = "cuMemsetD8Async":
            fn(CUdeviceptr, u8, usize, CUstream) -> RawResult;
        launch_kernel = "cuLaunchKernel":
            fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream,
               *mut *mut c_void, *mut *mut c_void) -> RawResult;
    }
}

impl CudaApi {
    /// Opens the driver library (`DEVMEM_CUDA_LIBRARY` or `libcuda.so.1`), resolves every symbol
    /// and calls `cuInit(0)`.
    pub fn load() -> Result<Self> {
        let (lib, path) = super::open(LIBRARY_ENV, DEFAULT_LIBRARY, "the CUDA driver library")?;
        let api = Self::resolve(lib, path)?;
        // SAFETY: cuInit takes flags by value and has no other preconditions.
        api.check("cuInit", unsafe { (api.init)(0) })?;
        Ok(api)
    }

    /// The driver's name for an error code, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
    pub fn error_name(&self, code: RawResult) -> String {
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: the out-pointer is valid; the driver writes a static string or leaves NULL.
        let rc = unsafe { (self.get_error_name)(code, &mut name) };
        if rc != CUDA_SUCCESS || name.is_null() {
            return format!("CUresult {code}");
        }
        // SAFETY: the driver returned a NUL-terminated static string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    fn error_description(&self, code: RawResult) -> String {
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: as in `error_name`.
        let rc = unsafe { (self.get_error_string)(code, &mut text) };
        if rc != CUDA_SUCCESS || text.is_null() {
            return String::new();
        }
        // SAFETY: the driver returned a NUL-terminated static string.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    /// Turns a driver result into `Ok` or an error naming `call` and the driver's error.
    pub fn check(&self, call: &str, code: RawResult) -> Result<()> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        let status = if code == CUDA_ERROR_OUT_OF_MEMORY {
            devmem_status::OutOfMemory
        } else {
            devmem_status::Driver
        };
        let desc = self.error_description(code);
        let name = self.error_name(code);
        let message = if desc.is_empty() {
            format!("{call} failed: {name} ({code})")
        } else {
            format!("{call} failed: {name} ({code}): {desc}")
        };
        Err(Error::new(status, message))
    }

    /// Like [`check`](Self::check) but keeps the raw code, for callers that fall back on
    /// particular codes.
    pub fn check_raw(&self, call: &str, code: RawResult) -> std::result::Result<(), DriverError> {
        match self.check(call, code) {
            Ok(()) => Ok(()),
            Err(error) => Err(DriverError { code, error }),
        }
    }
}

/// A driver error with the raw code kept beside the formatted error.
#[derive(Debug)]
pub struct DriverError {
    /// The raw `CUresult`.
    pub code: RawResult,
    /// The error with its message.
    pub error: Error,
}

/// Thin `Result` wrappers, one per entry point devmem calls: the only place the CUDA backend's
/// driver calls are made. Each names the call in its error. Calls that take raw memory
/// addresses whose validity the driver cannot check are `unsafe`.
impl CudaApi {
    /// `cuDriverGetVersion`, when it answers.
    pub(crate) fn driver_version(&self) -> Option<c_int> {
        let mut version: c_int = 0;
        // SAFETY: the out-pointer is valid for one c_int.
        let rc = unsafe { (self.driver_get_version)(&mut version) };
        (rc == CUDA_SUCCESS).then_some(version)
    }

    /// `cuDeviceGetCount`.
    pub(crate) fn device_count(&self) -> Result<c_int> {
        let mut count: c_int = 0;
        // SAFETY: the out-pointer is valid for one c_int.
        self.check("cuDeviceGetCount", unsafe {
            (self.device_get_count)(&mut count)
        })?;
        Ok(count)
    }

    /// `cuDeviceGet`.
    pub(crate) fn device(&self, ordinal: c_int) -> Result<CUdevice> {
        let mut device: CUdevice = 0;
        // SAFETY: the out-pointer is valid; the driver checks the ordinal.
        self.check("cuDeviceGet", unsafe {
            (self.device_get)(&mut device, ordinal)
        })?;
        Ok(device)
    }

    /// `cuDeviceGetAttribute`.
    pub(crate) fn attribute(&self, device: CUdevice, attr: CUdevice_attribute) -> Result<c_int> {
        let mut value: c_int = 0;
        // SAFETY: the out-pointer is valid; the attribute is a driver enum value.
        self.check("cuDeviceGetAttribute", unsafe {
            (self.device_get_attribute)(&mut value, attr, device)
        })?;
        Ok(value)
    }

    /// `cuDevicePrimaryCtxRetain` (never released: see the backend's module docs).
    pub(crate) fn retain_primary_context(&self, device: CUdevice) -> Result<CUcontext> {
        let mut context: CUcontext = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid; `device` came from cuDeviceGet.
        self.check("cuDevicePrimaryCtxRetain", unsafe {
            (self.primary_ctx_retain)(&mut context, device)
        })?;
        Ok(context)
    }

    /// `cuCtxGetCurrent`: the calling thread's context (NULL when it has none).
    pub(crate) fn current_context(&self) -> Result<CUcontext> {
        let mut context: CUcontext = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        self.check("cuCtxGetCurrent", unsafe {
            (self.ctx_get_current)(&mut context)
        })?;
        Ok(context)
    }

    /// `cuCtxSetCurrent`. The driver validates the handle.
    pub(crate) fn set_current_context(&self, context: CUcontext) -> Result<()> {
        // SAFETY: plain handle argument, checked by the driver.
        self.check("cuCtxSetCurrent", unsafe {
            (self.ctx_set_current)(context)
        })
    }

    /// `cuCtxGetDevice`: the device of the calling thread's current context.
    pub(crate) fn current_context_device(&self) -> Result<CUdevice> {
        let mut device: CUdevice = 0;
        // SAFETY: the out-pointer is valid.
        self.check("cuCtxGetDevice", unsafe {
            (self.ctx_get_device)(&mut device)
        })?;
        Ok(device)
    }

    /// `cuCtxSynchronize`: waits for every stream of the current context.
    pub(crate) fn synchronize_context(&self) -> Result<()> {
        // SAFETY: no arguments; fails cleanly without a current context.
        self.check("cuCtxSynchronize", unsafe { (self.ctx_synchronize)() })
    }

    /// `cuStreamCreate` in the current context.
    pub(crate) fn create_stream(&self, flags: c_uint) -> Result<CUstream> {
        let mut stream: CUstream = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        self.check("cuStreamCreate", unsafe {
            (self.stream_create)(&mut stream, flags)
        })?;
        Ok(stream)
    }

    /// `cuStreamSynchronize`.
    pub(crate) fn synchronize_stream(&self, stream: CUstream) -> Result<()> {
        // SAFETY: a stream handle devmem created and never destroys.
        self.check("cuStreamSynchronize", unsafe {
            (self.stream_synchronize)(stream)
        })
    }

    /// `cuMemGetAllocationGranularity` (minimum granularity).
    pub(crate) fn granularity(&self, prop: &CUmemAllocationProp, flags: c_uint) -> Result<usize> {
        let mut granularity = 0usize;
        // SAFETY: both pointers are valid for the call.
        self.check("cuMemGetAllocationGranularity", unsafe {
            (self.mem_get_allocation_granularity)(&mut granularity, prop, flags)
        })?;
        Ok(granularity)
    }

    /// `cuMemAddressReserve` of `size` bytes aligned to `alignment`, at `hint` when it is free
    /// (0: anywhere). The driver may place it elsewhere than the hint.
    pub(crate) fn address_reserve(
        &self,
        size: usize,
        alignment: usize,
        hint: CUdeviceptr,
    ) -> Result<CUdeviceptr> {
        let mut va: CUdeviceptr = 0;
        // SAFETY: the out-pointer is valid; the hint is only a request.
        self.check("cuMemAddressReserve", unsafe {
            (self.mem_address_reserve)(&mut va, size, alignment, hint, 0)
        })?;
        Ok(va)
    }

    /// `cuMemsetD8Async` of zeros on `stream`.
    ///
    /// # Safety
    /// `[dst, dst+len)` must be mapped device memory nothing else writes until the stream is
    /// waited for.
    pub(crate) unsafe fn zero_async(
        &self,
        dst: CUdeviceptr,
        len: usize,
        stream: CUstream,
    ) -> Result<()> {
        let memset = self.optional(self.memset_d8_async, "cuMemsetD8Async")?;
        // SAFETY: the caller's contract.
        self.check("cuMemsetD8Async", unsafe { memset(dst, 0, len, stream) })
    }

    /// `cuMemAddressFree`.
    ///
    /// # Safety
    /// Nothing may use `[va, va+size)` afterwards.
    pub(crate) unsafe fn address_free(&self, va: CUdeviceptr, size: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("cuMemAddressFree", unsafe {
            (self.mem_address_free)(va, size)
        })
    }

    /// `cuMemCreate`, keeping the raw code for callers that fall back on particular codes.
    /// `handle_types` is the raw `requestedHandleTypes` bit mask (`FABRIC|POSIX_FD` is no
    /// variant of the Rust enum, so it is written into the struct as bits).
    pub(crate) fn create(
        &self,
        size: usize,
        prop: &CUmemAllocationProp,
        handle_types: u32,
    ) -> std::result::Result<u64, DriverError> {
        let mut raw = std::mem::MaybeUninit::new(*prop);
        // SAFETY: the field is a 32-bit C enum; the struct is only read by the driver, through
        // the pointer below, never as a Rust value again.
        unsafe {
            std::ptr::addr_of_mut!((*raw.as_mut_ptr()).requestedHandleTypes)
                .cast::<u32>()
                .write(handle_types);
        }
        let mut handle = 0u64;
        // SAFETY: both pointers are valid for the call.
        let rc = unsafe { (self.mem_create)(&mut handle, size, raw.as_ptr(), 0) };
        self.check_raw("cuMemCreate", rc).map(|()| handle)
    }

    /// `cuMemExportToShareableHandle` as a POSIX file descriptor (owned by the caller).
    pub(crate) fn export_fd(&self, handle: u64) -> Result<std::os::fd::OwnedFd> {
        let export = self.optional(self.mem_export, "cuMemExportToShareableHandle")?;
        let mut fd: c_int = -1;
        // SAFETY: for POSIX file descriptors the driver writes one int through the pointer.
        let rc = unsafe {
            export(
                (&raw mut fd).cast(),
                handle,
                CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        };
        self.check("cuMemExportToShareableHandle", rc)?;
        if fd < 0 {
            return Err(Error::new(
                devmem_status::Driver,
                format!("cuMemExportToShareableHandle returned file descriptor {fd}"),
            ));
        }
        // SAFETY: the driver created this descriptor for the caller, who now owns it.
        Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    /// `cuMemImportFromShareableHandle` of a POSIX file descriptor (the caller keeps `fd`).
    pub(crate) fn import_fd(&self, fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
        let import = self.optional(self.mem_import, "cuMemImportFromShareableHandle")?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let mut handle = 0u64;
        // SAFETY: for POSIX file descriptors the driver takes the descriptor's value as the
        // pointer argument and writes one handle.
        let rc = unsafe {
            import(
                &mut handle,
                raw as isize as *mut c_void,
                CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        };
        self.check("cuMemImportFromShareableHandle", rc)
            .map(|()| handle)
    }

    /// `cuMemRelease`.
    pub(crate) fn release(&self, handle: u64) -> Result<()> {
        // SAFETY: a handle the driver validates; a mapping keeps its memory until unmapped.
        self.check("cuMemRelease", unsafe { (self.mem_release)(handle) })
    }

    /// `cuMemMap` of the whole handle at `va`.
    pub(crate) fn map(&self, va: CUdeviceptr, size: usize, handle: u64) -> Result<()> {
        // SAFETY: the driver checks that the range is reserved and unmapped.
        self.check("cuMemMap", unsafe {
            (self.mem_map)(va, size, 0, handle, 0)
        })
    }

    /// `cuMemSetAccess` with one descriptor.
    pub(crate) fn set_access(
        &self,
        va: CUdeviceptr,
        size: usize,
        desc: &CUmemAccessDesc,
    ) -> Result<()> {
        // SAFETY: one valid descriptor is passed.
        self.check("cuMemSetAccess", unsafe {
            (self.mem_set_access)(va, size, desc, 1)
        })
    }

    /// `cuMemUnmap`.
    ///
    /// # Safety
    /// No work may still use the range (the caller synchronised), and nothing may use it after.
    pub(crate) unsafe fn unmap(&self, va: CUdeviceptr, size: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("cuMemUnmap", unsafe { (self.mem_unmap)(va, size) })
    }

    /// `cuMemcpyDtoHAsync` on `stream`.
    ///
    /// # Safety
    /// `dst` must be pinned host memory valid for `len` bytes until the copy is waited for.
    pub(crate) unsafe fn copy_to_host_async(
        &self,
        dst: *mut c_void,
        src: CUdeviceptr,
        len: usize,
        stream: CUstream,
    ) -> Result<()> {
        // SAFETY: the caller's contract; the driver checks the device range.
        self.check("cuMemcpyDtoHAsync", unsafe {
            (self.memcpy_dtoh_async)(dst, src, len, stream)
        })
    }

    /// `cuMemcpyHtoDAsync` on `stream`.
    ///
    /// # Safety
    /// `src` must be pinned host memory valid for `len` bytes until the copy is waited for.
    pub(crate) unsafe fn copy_to_device_async(
        &self,
        dst: CUdeviceptr,
        src: *const c_void,
        len: usize,
        stream: CUstream,
    ) -> Result<()> {
        // SAFETY: the caller's contract; the driver checks the device range.
        self.check("cuMemcpyHtoDAsync", unsafe {
            (self.memcpy_htod_async)(dst, src, len, stream)
        })
    }

    /// `cuMemGetInfo`: free and total memory of the current context's device.
    pub(crate) fn memory_info(&self) -> Result<(usize, usize)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid.
        self.check("cuMemGetInfo", unsafe {
            (self.mem_get_info)(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// `cuMemHostRegister`.
    ///
    /// # Safety
    /// `[ptr, ptr+len)` must be host memory the caller owns and keeps mapped while registered.
    pub(crate) unsafe fn host_register(
        &self,
        ptr: *mut c_void,
        len: usize,
        flags: c_uint,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("cuMemHostRegister", unsafe {
            (self.mem_host_register)(ptr, len, flags)
        })
    }

    /// `cuMemHostUnregister`.
    ///
    /// # Safety
    /// No queued copy may still use the memory.
    pub(crate) unsafe fn host_unregister(&self, ptr: *mut c_void) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("cuMemHostUnregister", unsafe {
            (self.mem_host_unregister)(ptr)
        })
    }

    /// `cuEventCreate` in the current context.
    pub(crate) fn create_event(&self, flags: c_uint) -> Result<CUevent> {
        let mut event: CUevent = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        self.check("cuEventCreate", unsafe {
            (self.event_create)(&mut event, flags)
        })?;
        Ok(event)
    }

    /// `cuEventRecord`.
    pub(crate) fn record_event(&self, event: CUevent, stream: CUstream) -> Result<()> {
        // SAFETY: handles the driver validates.
        self.check("cuEventRecord", unsafe {
            (self.event_record)(event, stream)
        })
    }

    /// `cuEventSynchronize`.
    pub(crate) fn synchronize_event(&self, event: CUevent) -> Result<()> {
        // SAFETY: a handle the driver validates.
        self.check("cuEventSynchronize", unsafe {
            (self.event_synchronize)(event)
        })
    }

    fn optional<F>(&self, entry: Option<F>, call: &str) -> Result<F> {
        entry.ok_or_else(|| {
            Error::new(
                devmem_status::Unsupported,
                format!("{call} is missing from {}", self.path()),
            )
        })
    }

    /// Whether the module and launch entry points were found.
    pub(crate) fn can_launch(&self) -> bool {
        self.module_load_data.is_some()
            && self.module_get_function.is_some()
            && self.launch_kernel.is_some()
    }

    /// `cuModuleLoadData` with a NUL-terminated PTX image, in the current context.
    pub(crate) fn load_module(&self, image: &CStr) -> Result<CUmodule> {
        let load = self.optional(self.module_load_data, "cuModuleLoadData")?;
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid; the image is NUL-terminated and outlives the call.
        self.check("cuModuleLoadData", unsafe {
            load(&mut module, image.as_ptr().cast())
        })?;
        Ok(module)
    }

    /// `cuModuleGetFunction`.
    pub(crate) fn function(&self, module: CUmodule, name: &CStr) -> Result<CUfunction> {
        let get = self.optional(self.module_get_function, "cuModuleGetFunction")?;
        let mut function: CUfunction = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid; `module` came from `load_module`.
        self.check("cuModuleGetFunction", unsafe {
            get(&mut function, module, name.as_ptr())
        })?;
        Ok(function)
    }

    /// `cuLaunchKernel` on a one-dimensional grid, without dynamic shared memory.
    ///
    /// # Safety
    /// `params` must match the kernel's parameters, and every pointer they carry must stay
    /// valid until the launch has completed on `stream`.
    pub(crate) unsafe fn launch(
        &self,
        function: CUfunction,
        grid: c_uint,
        block: c_uint,
        stream: CUstream,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let launch = self.optional(self.launch_kernel, "cuLaunchKernel")?;
        // SAFETY: the caller guarantees the parameters; the grid is checked by the driver.
        self.check("cuLaunchKernel", unsafe {
            launch(
                function,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}
