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
#[derive(Clone)]
pub(crate) struct CommandQueueGroupProperties {
    pub stype: u32,
    pub p_next: *mut c_void,
    pub flags: u32,
    pub max_memory_fill_pattern_size: usize,
    pub num_queues: u32,
}

/// `ze_device_memory_properties_t`.
#[repr(C)]
#[derive(Clone)]
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
        Err(self.error(call, code))
    }

    /// The error for a failed `call` that returned `code`.
    pub(crate) fn error(&self, call: &str, code: ZeResult) -> Error {
        let status = match code {
            ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY => devmem_status::OutOfMemory,
            ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY => devmem_status::HostOutOfMemory,
            _ => devmem_status::Driver,
        };
        Error::new(
            status,
            format!("{call} failed: {} ({code:#x})", result_name(code)),
        )
    }
}

/// Thin `Result` wrappers, one per entry point devmem calls: the only place the Level Zero
/// backend's calls are made. Calls that take raw memory addresses whose validity the loader
/// cannot check are `unsafe`. Handles travel as [`Handle`].
impl ZeApi {
    /// Runs a two-call enumeration (count, then fill) of up to `u32::MAX` entries.
    fn enumerate<T: Clone>(
        &self,
        call: &str,
        blank: T,
        mut get: impl FnMut(*mut u32, *mut T) -> ZeResult,
    ) -> Result<Vec<T>> {
        let mut count = 0u32;
        self.check(call, get(&mut count, std::ptr::null_mut()))?;
        let mut items = vec![blank; count as usize];
        if count > 0 {
            self.check(call, get(&mut count, items.as_mut_ptr()))?;
        }
        items.truncate(count as usize);
        Ok(items)
    }

    /// `zeInitDrivers` for GPU drivers (Level Zero 1.10+), when the loader has it and it finds
    /// one; `None` otherwise.
    pub(crate) fn init_gpu_drivers(&self) -> Option<Result<Vec<Handle>>> {
        let init_drivers = self.init_drivers?;
        // ze_init_driver_type_desc_t { stype = ZE_STRUCTURE_TYPE_INIT_DRIVER_TYPE_DESC
        // (0x00020021), pNext, flags = ZE_INIT_DRIVER_TYPE_FLAG_GPU (1) }.
        #[repr(C)]
        struct InitDesc {
            stype: u32,
            p_next: *const c_void,
            flags: u32,
        }
        let mut desc = InitDesc {
            stype: 0x0002_0021,
            p_next: std::ptr::null(),
            flags: 1,
        };
        let desc_ptr = (&mut desc as *mut InitDesc).cast::<c_void>();
        let mut count = 0u32;
        // SAFETY: valid out-pointer and descriptor; a NULL array asks for the count.
        let rc = unsafe { init_drivers(&mut count, std::ptr::null_mut(), desc_ptr) };
        if rc != ZE_RESULT_SUCCESS || count == 0 {
            return None;
        }
        let mut handles: Vec<Handle> = vec![std::ptr::null_mut(); count as usize];
        // SAFETY: the array has `count` entries.
        let rc = unsafe { init_drivers(&mut count, handles.as_mut_ptr(), desc_ptr) };
        Some(self.check("zeInitDrivers", rc).map(|()| {
            handles.truncate(count as usize);
            handles
        }))
    }

    /// `zeInit(0)` (every driver type).
    pub(crate) fn init_all(&self) -> Result<()> {
        // SAFETY: flags 0 initialises every driver type.
        self.check("zeInit", unsafe { (self.init)(0) })
    }

    /// `zeDriverGet`: every driver.
    pub(crate) fn drivers(&self) -> Result<Vec<Handle>> {
        // SAFETY (of each call): `enumerate` passes a valid count and an array of that many.
        self.enumerate("zeDriverGet", std::ptr::null_mut(), |n, out| unsafe {
            (self.driver_get)(n, out)
        })
    }

    /// `zeDeviceGet`: the devices of `driver`.
    pub(crate) fn devices(&self, driver: Handle) -> Result<Vec<Handle>> {
        // SAFETY (of each call): as in `drivers`.
        self.enumerate("zeDeviceGet", std::ptr::null_mut(), |n, out| unsafe {
            (self.device_get)(driver, n, out)
        })
    }

    /// `zeDriverGetDefaultContext`, when the loader has it and the driver answers.
    pub(crate) fn driver_default_context(&self, driver: Handle) -> Option<Handle> {
        let default_context = self.default_context?;
        // SAFETY: a driver handle from zeDriverGet.
        let ctx = unsafe { default_context(driver) };
        (!ctx.is_null()).then_some(ctx)
    }

    /// `zeContextCreate`.
    pub(crate) fn create_context(&self, driver: Handle) -> Result<Handle> {
        let desc = ContextDesc {
            stype: STYPE_CONTEXT_DESC,
            p_next: std::ptr::null(),
            flags: 0,
        };
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        self.check("zeContextCreate", unsafe {
            (self.context_create)(driver, &desc, &mut ctx)
        })?;
        Ok(ctx)
    }

    /// `zeVirtualMemQueryPageSize` for `size`, keeping the raw code (callers tell
    /// `UNSUPPORTED_FEATURE` apart).
    pub(crate) fn page_size(
        &self,
        context: Handle,
        device: Handle,
        size: usize,
    ) -> std::result::Result<usize, ZeResult> {
        let mut page = 0usize;
        // SAFETY: handles from the loader; valid out-pointer.
        let rc = unsafe { (self.page_size)(context, device, size, &mut page) };
        if rc == ZE_RESULT_SUCCESS {
            Ok(page)
        } else {
            Err(rc)
        }
    }

    /// `zeDeviceGetMemoryProperties`: every memory of `device`.
    pub(crate) fn memory_properties(&self, device: Handle) -> Result<Vec<DeviceMemoryProperties>> {
        let blank = DeviceMemoryProperties {
            stype: STYPE_DEVICE_MEMORY_PROPERTIES,
            p_next: std::ptr::null_mut(),
            flags: 0,
            max_clock_rate: 0,
            max_bus_width: 0,
            total_size: 0,
            name: [0; 256],
        };
        // SAFETY (of each call): as in `drivers`, with initialised entries.
        self.enumerate("zeDeviceGetMemoryProperties", blank, |n, out| unsafe {
            (self.device_get_memory_properties)(device, n, out)
        })
    }

    /// `zeDeviceGetCommandQueueGroupProperties`: every queue group of `device`.
    pub(crate) fn queue_groups(&self, device: Handle) -> Result<Vec<CommandQueueGroupProperties>> {
        let blank = CommandQueueGroupProperties {
            stype: STYPE_COMMAND_QUEUE_GROUP_PROPERTIES,
            p_next: std::ptr::null_mut(),
            flags: 0,
            max_memory_fill_pattern_size: 0,
            num_queues: 0,
        };
        // SAFETY (of each call): as in `drivers`, with initialised entries.
        self.enumerate(
            "zeDeviceGetCommandQueueGroupProperties",
            blank,
            |n, out| unsafe { (self.device_get_queue_groups)(device, n, out) },
        )
    }

    /// `zeCommandListCreateImmediate`.
    pub(crate) fn create_immediate_list(
        &self,
        context: Handle,
        device: Handle,
        desc: &CommandQueueDesc,
    ) -> Result<Handle> {
        let mut list: Handle = std::ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        self.check("zeCommandListCreateImmediate", unsafe {
            (self.list_create_immediate)(context, device, desc, &mut list)
        })?;
        Ok(list)
    }

    /// `zeEventPoolCreate` for one device.
    pub(crate) fn create_event_pool(
        &self,
        context: Handle,
        device: Handle,
        desc: &EventPoolDesc,
    ) -> Result<Handle> {
        let mut pool: Handle = std::ptr::null_mut();
        let mut dev = device;
        // SAFETY: valid descriptor, one device, valid out-pointer.
        self.check("zeEventPoolCreate", unsafe {
            (self.event_pool_create)(context, desc, 1, &mut dev, &mut pool)
        })?;
        Ok(pool)
    }

    /// `zeEventCreate` in `pool`.
    pub(crate) fn create_event(&self, pool: Handle, desc: &EventDesc) -> Result<Handle> {
        let mut event: Handle = std::ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer; the loader checks the index.
        self.check("zeEventCreate", unsafe {
            (self.event_create)(pool, desc, &mut event)
        })?;
        Ok(event)
    }

    /// `zeCommandListAppendSignalEvent`.
    pub(crate) fn append_signal_event(&self, list: Handle, event: Handle) -> Result<()> {
        // SAFETY: handles the loader validates.
        self.check("zeCommandListAppendSignalEvent", unsafe {
            (self.append_signal)(list, event)
        })
    }

    /// `zeEventHostSynchronize` without a timeout.
    pub(crate) fn host_synchronize_event(&self, event: Handle) -> Result<()> {
        // SAFETY: a handle the loader validates.
        self.check("zeEventHostSynchronize", unsafe {
            (self.event_host_synchronize)(event, u64::MAX)
        })
    }

    /// `zeEventHostReset`.
    pub(crate) fn host_reset_event(&self, event: Handle) -> Result<()> {
        // SAFETY: a handle the loader validates.
        self.check("zeEventHostReset", unsafe {
            (self.event_host_reset)(event)
        })
    }

    /// `zeCommandListAppendMemoryCopy` with no events.
    ///
    /// # Safety
    /// Both ranges must stay valid for `len` bytes until the copy is waited for.
    pub(crate) unsafe fn append_memory_copy(
        &self,
        list: Handle,
        dst: *mut c_void,
        src: *const c_void,
        len: usize,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("zeCommandListAppendMemoryCopy", unsafe {
            (self.append_copy)(
                list,
                dst,
                src,
                len,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
            )
        })
    }

    /// `zeVirtualMemReserve` anywhere.
    pub(crate) fn reserve_va(&self, context: Handle, size: usize) -> Result<u64> {
        let mut va: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; no placement hint.
        self.check("zeVirtualMemReserve", unsafe {
            (self.reserve)(context, std::ptr::null(), size, &mut va)
        })?;
        Ok(va as u64)
    }

    /// `zeVirtualMemFree`.
    ///
    /// # Safety
    /// Nothing may use `[va, va+size)` afterwards.
    pub(crate) unsafe fn free_va_range(&self, context: Handle, va: u64, size: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("zeVirtualMemFree", unsafe {
            (self.free_va)(context, va as *const c_void, size)
        })
    }

    /// `zePhysicalMemCreate` of `size` bytes on `device`.
    pub(crate) fn create_physical(
        &self,
        context: Handle,
        device: Handle,
        size: usize,
    ) -> Result<u64> {
        let desc = PhysicalMemDesc {
            stype: STYPE_PHYSICAL_MEM_DESC,
            p_next: std::ptr::null(),
            flags: 0,
            size,
        };
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        self.check("zePhysicalMemCreate", unsafe {
            (self.physical_create)(context, device, &desc, &mut handle)
        })?;
        Ok(handle as u64)
    }

    /// `zePhysicalMemDestroy`.
    pub(crate) fn destroy_physical(&self, context: Handle, handle: u64) -> Result<()> {
        // SAFETY: a handle the loader validates; a mapping keeps its memory until unmapped.
        self.check("zePhysicalMemDestroy", unsafe {
            (self.physical_destroy)(context, handle as usize as Handle)
        })
    }

    /// `zeVirtualMemMap` read-write.
    pub(crate) fn map_va(&self, context: Handle, va: u64, size: usize, handle: u64) -> Result<()> {
        // SAFETY: the loader checks that the range is reserved and unmapped.
        self.check("zeVirtualMemMap", unsafe {
            (self.map)(
                context,
                va as *const c_void,
                size,
                handle as usize as Handle,
                0,
                ACCESS_READWRITE,
            )
        })
    }

    /// `zeVirtualMemUnmap`.
    ///
    /// # Safety
    /// No work may still use the range, and nothing may use it after.
    pub(crate) unsafe fn unmap_va(&self, context: Handle, va: u64, size: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("zeVirtualMemUnmap", unsafe {
            (self.unmap)(context, va as *const c_void, size)
        })
    }

    /// `zeMemAllocHost` of `len` bytes aligned to `alignment`.
    pub(crate) fn alloc_host(
        &self,
        context: Handle,
        len: usize,
        alignment: usize,
    ) -> Result<*mut u8> {
        let desc = HostMemAllocDesc {
            stype: STYPE_HOST_MEM_ALLOC_DESC,
            p_next: std::ptr::null(),
            flags: 0,
        };
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        self.check("zeMemAllocHost", unsafe {
            (self.mem_alloc_host)(context, &desc, len, alignment, &mut out)
        })?;
        Ok(out.cast())
    }

    /// `zeMemFree`.
    ///
    /// # Safety
    /// `ptr` came from `alloc_host`, and no queued copy may still use it.
    pub(crate) unsafe fn free_host(&self, context: Handle, ptr: *mut u8) -> Result<()> {
        // SAFETY: the caller's contract.
        self.check("zeMemFree", unsafe { (self.mem_free)(context, ptr.cast()) })
    }
}
