//! The Level Zero loader's symbol table, opened at run time from `libze_loader.so.1` (or the
//! path in `DEVMEM_ZE_LIBRARY`), the few spec structs devmem passes, and result checking that
//! names the call and the `ze_result_t`.
//!
//! Required entry points fail the load with `DRIVER` when missing; optional ones
//! (`zeInitDrivers`, `zeDriverGetDefaultContext`) are `None` when the loader predates them.

use std::ffi::{c_char, c_void};

use super::symbol_table;
use crate::error::{devmem_status, Error, Result};

/// A `ze_result_t`.
pub(crate) type ZeResult = u32;
/// An opaque Level Zero handle.
pub(crate) type Handle = *mut c_void;

pub(crate) const ZE_RESULT_SUCCESS: ZeResult = 0;
pub(crate) const ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY: ZeResult = 0x7000_0002;
pub(crate) const ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY: ZeResult = 0x7000_0003;
pub(crate) const ZE_RESULT_ERROR_UNSUPPORTED_FEATURE: ZeResult = 0x7800_0003;

pub(crate) const STYPE_COMMAND_QUEUE_GROUP_PROPERTIES: u32 = 0x6;
pub(crate) const STYPE_DEVICE_MEMORY_PROPERTIES: u32 = 0x7;
pub(crate) const STYPE_CONTEXT_DESC: u32 = 0xd;
pub(crate) const STYPE_COMMAND_QUEUE_DESC: u32 = 0xe;
pub(crate) const STYPE_EVENT_POOL_DESC: u32 = 0x10;
pub(crate) const STYPE_EVENT_DESC: u32 = 0x11;
pub(crate) const STYPE_HOST_MEM_ALLOC_DESC: u32 = 0x16;
pub(crate) const STYPE_PHYSICAL_MEM_DESC: u32 = 0x20;

/// `ZE_MEMORY_ACCESS_ATTRIBUTE_READWRITE`.
pub(crate) const ACCESS_READWRITE: u32 = 1;
/// `ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COPY`.
pub(crate) const GROUP_FLAG_COPY: u32 = 2;
/// `ZE_COMMAND_QUEUE_MODE_ASYNCHRONOUS`.
pub(crate) const QUEUE_MODE_ASYNCHRONOUS: u32 = 2;
/// `ZE_EVENT_POOL_FLAG_HOST_VISIBLE`.
pub(crate) const EVENT_POOL_HOST_VISIBLE: u32 = 1;
/// `ZE_EVENT_SCOPE_FLAG_HOST`.
pub(crate) const EVENT_SCOPE_HOST: u32 = 4;

/// `ze_context_desc_t`.
#[repr(C)]
pub(crate) struct ContextDesc {
    pub stype: u32,
    pub p_next: *const c_void,
    pub flags: u32,
}

/// `ze_physical_mem_desc_t`.
#[repr(C)]
pub(crate) struct PhysicalMemDesc {
    pub stype: u32,
    pub p_next: *const c_void,
    pub flags: u32,
    pub size: usize,
}

/// `ze_host_mem_alloc_desc_t`.
#[repr(C)]
pub(crate) struct HostMemAllocDesc {
    pub stype: u32,
    pub p_next: *const c_void,
    pub flags: u32,
}

/// `ze_command_queue_desc_t`.
#[repr(C)]
pub(crate) struct CommandQueueDesc {
    pub stype: u32,
    pub p_next: *const c_void,
    pub ordinal: u32,
    pub index: u32,
    pub flags: u32,
    pub mode: u32,
    pub priority: u32,
}

/// `ze_command_queue_group_properties_t`.
#[repr(C)]
pub(crate) struct CommandQueueGroupProperties {
    pub stype: u32,
    pub p_next: *mut c_void,
    pub flags: u32,
    pub max_memory_fill_pattern_size: usize,
    pub num_queues: u32,
}

/// `ze_device_memory_properties_t`.
#[repr(C)]
pub(crate) struct DeviceMemoryProperties {
    pub stype: u32,
    pub p_next: *mut c_void,
    pub flags: u32,
    pub max_clock_rate: u32,
    pub max_bus_width: u32,
    pub total_size: u64,
    pub name: [c_char; 256],
}

/// `ze_event_pool_desc_t`.
#[repr(C)]
pub(crate) struct EventPoolDesc {
    pub stype: u32,
    pub p_next: *const c_void,
    pub flags: u32,
    pub count: u32,
}

/// `ze_event_desc_t`.
#[repr(C)]
pub(crate) struct EventDesc {
    pub stype: u32,
    pub p_next: *const c_void,
    pub index: u32,
    pub signal: u32,
    pub wait: u32,
}

/// The library name tried when `DEVMEM_ZE_LIBRARY` is unset.
pub(crate) const DEFAULT_LIBRARY: &str = "libze_loader.so.1";
/// Environment variable that overrides the loader path.
pub(crate) const LIBRARY_ENV: &str = "DEVMEM_ZE_LIBRARY";

symbol_table! {
    /// Every Level Zero entry point devmem uses; `zeInitDrivers` (Level Zero 1.10+) and
    /// `zeDriverGetDefaultContext` only when the loader has them.
    pub(crate) struct ZeApi returns ZeResult, named "Level Zero loader" {
        init = "zeInit": fn(u32);
        driver_get = "zeDriverGet": fn(*mut u32, *mut Handle);
        device_get = "zeDeviceGet": fn(Handle, *mut u32, *mut Handle);
        device_get_memory_properties = "zeDeviceGetMemoryProperties":
            fn(Handle, *mut u32, *mut DeviceMemoryProperties);
        device_get_queue_groups = "zeDeviceGetCommandQueueGroupProperties":
            fn(Handle, *mut u32, *mut CommandQueueGroupProperties);
        context_create = "zeContextCreate": fn(Handle, *const ContextDesc, *mut Handle);
        page_size = "zeVirtualMemQueryPageSize": fn(Handle, Handle, usize, *mut usize);
        reserve = "zeVirtualMemReserve": fn(Handle, *const c_void, usize, *mut *mut c_void);
        free_va = "zeVirtualMemFree": fn(Handle, *const c_void, usize);
        physical_create = "zePhysicalMemCreate":
            fn(Handle, Handle, *const PhysicalMemDesc, *mut Handle);
        physical_destroy = "zePhysicalMemDestroy": fn(Handle, Handle);
        map = "zeVirtualMemMap": fn(Handle, *const c_void, usize, Handle, usize, u32);
        unmap = "zeVirtualMemUnmap": fn(Handle, *const c_void, usize);
        mem_alloc_host = "zeMemAllocHost":
            fn(Handle, *const HostMemAllocDesc, usize, usize, *mut *mut c_void);
        mem_free = "zeMemFree": fn(Handle, *mut c_void);
        list_create_immediate = "zeCommandListCreateImmediate":
            fn(Handle, Handle, *const CommandQueueDesc, *mut Handle);
        append_copy = "zeCommandListAppendMemoryCopy":
            fn(Handle, *mut c_void, *const c_void, usize, Handle, u32, *mut Handle);
        append_signal = "zeCommandListAppendSignalEvent": fn(Handle, Handle);
        event_pool_create = "zeEventPoolCreate":
            fn(Handle, *const EventPoolDesc, u32, *mut Handle, *mut Handle);
        event_create = "zeEventCreate": fn(Handle, *const EventDesc, *mut Handle);
        event_host_synchronize = "zeEventHostSynchronize": fn(Handle, u64);
        event_host_reset = "zeEventHostReset": fn(Handle);
    }
    optional {
        init_drivers = "zeInitDrivers": fn(*mut u32, *mut Handle, *mut c_void) -> ZeResult;
        default_context = "zeDriverGetDefaultContext": fn(Handle) -> Handle;
    }
}

/// The specification's name for a `ze_result_t`.
pub(crate) fn result_name(code: ZeResult) -> &'static str {
    match code {
        0 => "ZE_RESULT_SUCCESS",
        1 => "ZE_RESULT_NOT_READY",
        0x7000_0001 => "ZE_RESULT_ERROR_DEVICE_LOST",
        0x7000_0002 => "ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY",
        0x7000_0003 => "ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
        0x7800_0001 => "ZE_RESULT_ERROR_UNINITIALIZED",
        0x7800_0002 => "ZE_RESULT_ERROR_UNSUPPORTED_VERSION",
        0x7800_0003 => "ZE_RESULT_ERROR_UNSUPPORTED_FEATURE",
        0x7800_0004 => "ZE_RESULT_ERROR_INVALID_ARGUMENT",
        0x7800_0005 => "ZE_RESULT_ERROR_INVALID_NULL_HANDLE",
        0x7800_0006 => "ZE_RESULT_ERROR_HANDLE_OBJECT_IN_USE",
        0x7800_0007 => "ZE_RESULT_ERROR_INVALID_NULL_POINTER",
        0x7800_0008 => "ZE_RESULT_ERROR_INVALID_SIZE",
        0x7800_0009 => "ZE_RESULT_ERROR_UNSUPPORTED_SIZE",
        0x7800_000a => "ZE_RESULT_ERROR_UNSUPPORTED_ALIGNMENT",
        0x7fff_fffe => "ZE_RESULT_ERROR_UNKNOWN",
        _ => "ze_result_t",
    }
}

impl ZeApi {
    /// Opens the loader (`DEVMEM_ZE_LIBRARY` or `libze_loader.so.1`) and resolves its symbols.
    pub(crate) fn load() -> Result<Self> {
        let (lib, path) = super::open(LIBRARY_ENV, DEFAULT_LIBRARY, "the Level Zero loader")?;
        Self::resolve(lib, path)
    }

    /// Turns a result into `Ok` or an error naming `call`.
    pub(crate) fn check(&self, call: &str, code: ZeResult) -> Result<()> {
        if code == ZE_RESULT_SUCCESS {
            return Ok(());
        }
        let status = match code {
            ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY => devmem_status::OutOfMemory,
            ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY => devmem_status::HostOutOfMemory,
            _ => devmem_status::Driver,
        };
        Err(Error::new(
            status,
            format!("{call} failed: {} ({code:#x})", result_name(code)),
        ))
    }
}
