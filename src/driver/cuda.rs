//! The CUDA driver's symbol table, opened at run time from `libcuda.so.1` (or the path in
//! `DEVMEM_CUDA_LIBRARY`), and thin wrappers that turn each `CUresult` into an [`Error`] naming
//! the call and the driver's error name.
//!
//! This module never panics when the library or a symbol is missing: it returns
//! `DRIVER_NOT_FOUND` or `DRIVER`. Results come back as raw integers, never as a Rust enum, so
//! a value this build does not know cannot be undefined behaviour.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUmemAccessDesc,
    CUmemAllocationProp, CUmemGenericAllocationHandle, CUresult, CUstream,
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
    optional {}
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
