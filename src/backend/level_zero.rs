//! The Level Zero implementation of [`Backend`], for Intel GPUs, on the loader's virtual memory
//! API (`zeVirtualMemReserve`, `zePhysicalMemCreate`, `zeVirtualMemMap`, ...).
//!
//! Context: memory mapped in one Level Zero context is invisible in another, and PyTorch's XPU
//! streams use the SYCL runtime's context. devmem uses, in order: a context handed over with
//! `devmem_set_level_zero_context` (what SYCL's `get_native` returns), the driver's default
//! context (`zeDriverGetDefaultContext`, when the loader has it), and only as the last resort a
//! context of its own, which it logs as a warning.
//!
//! Level Zero has no device-wide synchronise: `synchronize` waits for devmem's own copies, and
//! the caller must have finished its queues before a sleep, a free or `unmap_and_release` (the
//! Python package calls `torch.xpu.synchronize()` before a sleep; PyTorch's caching allocator
//! frees only memory whose streams are done). Backups live in `zeMemAllocHost` memory, there being no
//! registration of ordinary host memory in the core API.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{Backend, HostMemory};
use crate::driver::ze::{self, Handle, ZeApi};
use crate::error::{bail, devmem_status, Error, Result};

/// A context and devices handed over by the application before devmem loads its backend.
#[derive(Clone, Default)]
pub struct HandedOver {
    /// `ze_context_handle_t`, as an address.
    pub context: usize,
    /// `ze_device_handle_t`s, as addresses; device ordinal i is `devices[i]`.
    pub devices: Vec<usize>,
}

static HANDED_OVER: Mutex<Option<HandedOver>> = Mutex::new(None);

/// Records the application's context and devices for the Level Zero backend to use.
pub fn hand_over(context: usize, devices: Vec<usize>) {
    *HANDED_OVER.lock() = Some(HandedOver { context, devices });
}

/// Devmem's copy engine for one device: an immediate command list on a copy-capable queue
/// group and a pool of host-visible events for markers.
struct CopyEngine {
    list: usize,
    pools: Vec<usize>,
    idle_events: Vec<usize>,
}

struct Device {
    handle: usize,
    page_size: usize,
    total: u64,
    /// Physical bytes devmem created and has not destroyed.
    created: AtomicU64,
    copy: Mutex<Option<CopyEngine>>,
}

/// The Level Zero backend.
pub struct LevelZeroBackend {
    api: ZeApi,
    context: usize,
    context_source: &'static str,
    devices: Vec<Device>,
}

const EVENTS_PER_POOL: u32 = 64;

impl LevelZeroBackend {
    /// Initialises the loader, finds a driver with devices, and picks the context.
    pub fn load() -> Result<Self> {
        let api = ZeApi::load()?;
        let drivers = Self::drivers(&api)?;
        let handed = HANDED_OVER.lock().clone();
        let (driver, device_handles) = match &handed {
            Some(h) => {
                if h.context == 0 {
                    bail!(NullPointer, "the handed-over Level Zero context is NULL");
                }
                if h.devices.is_empty() {
                    bail!(
                        InvalidDevice,
                        "no Level Zero devices were handed over with the context"
                    );
                }
                (drivers[0], h.devices.clone())
            }
            None => {
                let mut found = None;
                for d in &drivers {
                    let devices = Self::devices_of(&api, *d)?;
                    if !devices.is_empty() {
                        found = Some((*d, devices));
                        break;
                    }
                }
                found.ok_or_else(|| {
                    Error::new(
                        devmem_status::InvalidDevice,
                        format!(
                            "the Level Zero loader {} reports {} driver(s) and no device",
                            api.path(),
                            drivers.len()
                        ),
                    )
                })?
            }
        };
        let (context, context_source) = match &handed {
            Some(h) => (h.context, "handed over by the application"),
            None => Self::default_or_new_context(&api, driver)?,
        };
        if context_source.starts_with("created") {
            log::warn!("devmem: Level Zero: using a context devmem {context_source}: memory it maps is invisible to other contexts (hand yours over with devmem_set_level_zero_context)");
        } else {
            log::info!("devmem: Level Zero: using the context {context_source}");
        }
        let mut devices = Vec::with_capacity(device_handles.len());
        for handle in device_handles {
            let page_size = Self::query_page_size(&api, context, handle)?;
            let total = Self::total_memory(&api, handle)?;
            devices.push(Device {
                handle,
                page_size,
                total,
                created: AtomicU64::new(0),
                copy: Mutex::new(None),
            });
        }
        Ok(Self {
            api,
            context,
            context_source,
            devices,
        })
    }

    fn drivers(api: &ZeApi) -> Result<Vec<Handle>> {
        let mut count = 0u32;
        if let Some(init_drivers) = api.init_drivers {
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
                p_next: ptr::null(),
                flags: 1,
            };
            // SAFETY: valid out-pointer and descriptor; a NULL array asks for the count.
            let rc = unsafe {
                init_drivers(
                    &mut count,
                    ptr::null_mut(),
                    (&mut desc as *mut InitDesc).cast(),
                )
            };
            if rc == ze::ZE_RESULT_SUCCESS && count > 0 {
                let mut handles = vec![ptr::null_mut(); count as usize];
                // SAFETY: the array has `count` entries.
                let rc = unsafe {
                    init_drivers(
                        &mut count,
                        handles.as_mut_ptr(),
                        (&mut desc as *mut InitDesc).cast(),
                    )
                };
                api.check("zeInitDrivers", rc)?;
                handles.truncate(count as usize);
                return Ok(handles);
            }
        }
        // SAFETY: flags 0 initialises every driver type.
        api.check("zeInit", unsafe { (api.init)(0) })?;
        // SAFETY: valid out-pointer; NULL array asks for the count.
        api.check("zeDriverGet", unsafe {
            (api.driver_get)(&mut count, ptr::null_mut())
        })?;
        if count == 0 {
            bail!(
                DriverNotFound,
                "the Level Zero loader {} found no driver",
                api.path()
            );
        }
        let mut handles = vec![ptr::null_mut(); count as usize];
        // SAFETY: the array has `count` entries.
        api.check("zeDriverGet", unsafe {
            (api.driver_get)(&mut count, handles.as_mut_ptr())
        })?;
        handles.truncate(count as usize);
        Ok(handles)
    }

    fn devices_of(api: &ZeApi, driver: Handle) -> Result<Vec<usize>> {
        let mut count = 0u32;
        // SAFETY: valid out-pointer; NULL array asks for the count.
        api.check("zeDeviceGet", unsafe {
            (api.device_get)(driver, &mut count, ptr::null_mut())
        })?;
        let mut handles: Vec<Handle> = vec![ptr::null_mut(); count as usize];
        if count > 0 {
            // SAFETY: the array has `count` entries.
            api.check("zeDeviceGet", unsafe {
                (api.device_get)(driver, &mut count, handles.as_mut_ptr())
            })?;
        }
        Ok(handles
            .into_iter()
            .take(count as usize)
            .map(|h| h as usize)
            .collect())
    }

    fn default_or_new_context(api: &ZeApi, driver: Handle) -> Result<(usize, &'static str)> {
        if let Some(default_context) = api.default_context {
            // SAFETY: a driver handle from zeDriverGet.
            let ctx = unsafe { default_context(driver) };
            if !ctx.is_null() {
                return Ok((
                    ctx as usize,
                    "the driver's default context (zeDriverGetDefaultContext)",
                ));
            }
        }
        let desc = ze::ContextDesc {
            stype: ze::STYPE_CONTEXT_DESC,
            p_next: ptr::null(),
            flags: 0,
        };
        let mut ctx: Handle = ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        api.check("zeContextCreate", unsafe {
            (api.context_create)(driver, &desc, &mut ctx)
        })?;
        Ok((ctx as usize, "created itself (zeContextCreate)"))
    }

    fn query_page_size(api: &ZeApi, context: usize, device: usize) -> Result<usize> {
        let mut page = 0usize;
        // SAFETY: handles from the loader; valid out-pointer.
        let rc =
            unsafe { (api.page_size)(context as Handle, device as Handle, 2 << 20, &mut page) };
        if rc == ze::ZE_RESULT_ERROR_UNSUPPORTED_FEATURE {
            bail!(
                Unsupported,
                "the Level Zero device has no virtual memory support (zeVirtualMemQueryPageSize: {})",
                ze::result_name(rc)
            );
        }
        api.check("zeVirtualMemQueryPageSize", rc)?;
        if page == 0 || !page.is_power_of_two() {
            bail!(Driver, "zeVirtualMemQueryPageSize returned {page}");
        }
        Ok(page)
    }

    fn total_memory(api: &ZeApi, device: usize) -> Result<u64> {
        let mut count = 0u32;
        // SAFETY: valid out-pointer; NULL array asks for the count.
        let rc = unsafe {
            (api.device_get_memory_properties)(device as Handle, &mut count, ptr::null_mut())
        };
        api.check("zeDeviceGetMemoryProperties", rc)?;
        let mut props: Vec<ze::DeviceMemoryProperties> = (0..count)
            .map(|_| ze::DeviceMemoryProperties {
                stype: ze::STYPE_DEVICE_MEMORY_PROPERTIES,
                p_next: ptr::null_mut(),
                flags: 0,
                max_clock_rate: 0,
                max_bus_width: 0,
                total_size: 0,
                name: [0; 256],
            })
            .collect();
        if count > 0 {
            // SAFETY: the array has `count` initialised entries.
            let rc = unsafe {
                (api.device_get_memory_properties)(device as Handle, &mut count, props.as_mut_ptr())
            };
            api.check("zeDeviceGetMemoryProperties", rc)?;
        }
        Ok(props.iter().map(|p| p.total_size).sum())
    }

    fn device(&self, ordinal: i32) -> Result<&Device> {
        usize::try_from(ordinal)
            .ok()
            .and_then(|i| self.devices.get(i))
            .ok_or_else(|| {
                Error::new(
                    devmem_status::InvalidDevice,
                    format!(
                        "device {ordinal} is out of range: Level Zero reports {} device(s)",
                        self.devices.len()
                    ),
                )
            })
    }

    fn ctx(&self) -> Handle {
        self.context as Handle
    }

    /// Runs `f` with the device's copy engine, creating it on first use.
    fn with_copy<T>(
        &self,
        ordinal: i32,
        f: impl FnOnce(&mut CopyEngine) -> Result<T>,
    ) -> Result<T> {
        let device = self.device(ordinal)?;
        let mut slot = device.copy.lock();
        if slot.is_none() {
            *slot = Some(self.create_copy_engine(device)?);
        }
        match slot.as_mut() {
            Some(engine) => f(engine),
            None => bail!(Driver, "the Level Zero copy engine is missing"),
        }
    }

    fn create_copy_engine(&self, device: &Device) -> Result<CopyEngine> {
        let api = &self.api;
        let mut count = 0u32;
        // SAFETY: valid out-pointer; NULL array asks for the count.
        let rc = unsafe {
            (api.device_get_queue_groups)(device.handle as Handle, &mut count, ptr::null_mut())
        };
        api.check("zeDeviceGetCommandQueueGroupProperties", rc)?;
        let mut groups: Vec<ze::CommandQueueGroupProperties> = (0..count)
            .map(|_| ze::CommandQueueGroupProperties {
                stype: ze::STYPE_COMMAND_QUEUE_GROUP_PROPERTIES,
                p_next: ptr::null_mut(),
                flags: 0,
                max_memory_fill_pattern_size: 0,
                num_queues: 0,
            })
            .collect();
        if count > 0 {
            // SAFETY: the array has `count` initialised entries.
            let rc = unsafe {
                (api.device_get_queue_groups)(
                    device.handle as Handle,
                    &mut count,
                    groups.as_mut_ptr(),
                )
            };
            api.check("zeDeviceGetCommandQueueGroupProperties", rc)?;
        }
        let ordinal = groups
            .iter()
            .position(|g| g.flags & ze::GROUP_FLAG_COPY != 0)
            .unwrap_or(0) as u32;
        let desc = ze::CommandQueueDesc {
            stype: ze::STYPE_COMMAND_QUEUE_DESC,
            p_next: ptr::null(),
            ordinal,
            index: 0,
            flags: 0,
            mode: ze::QUEUE_MODE_ASYNCHRONOUS,
            priority: 0,
        };
        let mut list: Handle = ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        let rc = unsafe {
            (api.list_create_immediate)(self.ctx(), device.handle as Handle, &desc, &mut list)
        };
        api.check("zeCommandListCreateImmediate", rc)?;
        Ok(CopyEngine {
            list: list as usize,
            pools: Vec::new(),
            idle_events: Vec::new(),
        })
    }

    fn take_event(&self, device: &Device, engine: &mut CopyEngine) -> Result<usize> {
        if let Some(event) = engine.idle_events.pop() {
            return Ok(event);
        }
        let api = &self.api;
        let desc = ze::EventPoolDesc {
            stype: ze::STYPE_EVENT_POOL_DESC,
            p_next: ptr::null(),
            flags: ze::EVENT_POOL_HOST_VISIBLE,
            count: EVENTS_PER_POOL,
        };
        let mut pool: Handle = ptr::null_mut();
        let mut dev = device.handle as Handle;
        // SAFETY: valid descriptor, one device, valid out-pointer.
        let rc = unsafe { (api.event_pool_create)(self.ctx(), &desc, 1, &mut dev, &mut pool) };
        api.check("zeEventPoolCreate", rc)?;
        engine.pools.push(pool as usize);
        for index in 0..EVENTS_PER_POOL {
            let desc = ze::EventDesc {
                stype: ze::STYPE_EVENT_DESC,
                p_next: ptr::null(),
                index,
                signal: ze::EVENT_SCOPE_HOST,
                wait: ze::EVENT_SCOPE_HOST,
            };
            let mut event: Handle = ptr::null_mut();
            // SAFETY: a pool from above with EVENTS_PER_POOL slots.
            let rc = unsafe { (api.event_create)(pool, &desc, &mut event) };
            api.check("zeEventCreate", rc)?;
            engine.idle_events.push(event as usize);
        }
        engine
            .idle_events
            .pop()
            .ok_or_else(|| Error::new(devmem_status::Driver, "zeEventPoolCreate gave no events"))
    }

    /// Signals an event after everything queued so far and returns it.
    fn signal(&self, ordinal: i32) -> Result<u64> {
        let device = self.device(ordinal)?;
        self.with_copy(ordinal, |engine| {
            let event = self.take_event(device, engine)?;
            // SAFETY: the list and event belong to this context.
            let rc = unsafe { (self.api.append_signal)(engine.list as Handle, event as Handle) };
            if let Err(err) = self.api.check("zeCommandListAppendSignalEvent", rc) {
                engine.idle_events.push(event);
                return Err(err);
            }
            Ok(event as u64)
        })
    }

    fn wait_event(&self, ordinal: i32, event: u64) -> Result<()> {
        let api = &self.api;
        // SAFETY: an event from `signal`.
        let waited = api.check("zeEventHostSynchronize", unsafe {
            (api.event_host_synchronize)(event as usize as Handle, u64::MAX)
        });
        // SAFETY: as above.
        let reset = api.check("zeEventHostReset", unsafe {
            (api.event_host_reset)(event as usize as Handle)
        });
        self.with_copy(ordinal, |engine| {
            engine.idle_events.push(event as usize);
            Ok(())
        })?;
        waited.and(reset)
    }

    fn copy(
        &self,
        ordinal: i32,
        dst: *mut c_void,
        src: *const c_void,
        len: usize,
        what: &str,
    ) -> Result<()> {
        self.with_copy(ordinal, |engine| {
            // SAFETY: both ranges are valid for `len` bytes until the copy is waited for.
            let rc = unsafe {
                (self.api.append_copy)(
                    engine.list as Handle,
                    dst,
                    src,
                    len,
                    ptr::null_mut(),
                    0,
                    ptr::null_mut(),
                )
            };
            self.api
                .check("zeCommandListAppendMemoryCopy", rc)
                .map_err(|e| e.context(what))
        })
    }
}

impl Backend for LevelZeroBackend {
    fn kind(&self) -> super::devmem_backend {
        super::devmem_backend::LevelZero
    }

    fn device_count(&self) -> i32 {
        i32::try_from(self.devices.len()).unwrap_or(i32::MAX)
    }

    fn granularity(&self, device: i32) -> Result<usize> {
        Ok(self.device(device)?.page_size)
    }

    fn reserve(&self, device: i32, size: usize) -> Result<u64> {
        self.device(device)?;
        let mut va: *mut c_void = ptr::null_mut();
        // SAFETY: valid out-pointer; no placement hint.
        let rc = unsafe { (self.api.reserve)(self.ctx(), ptr::null(), size, &mut va) };
        self.api.check("zeVirtualMemReserve", rc)?;
        Ok(va as u64)
    }

    fn free_va(&self, _device: i32, va: u64, size: usize) -> Result<()> {
        // SAFETY: a reservation devmem made and no longer maps.
        let rc = unsafe { (self.api.free_va)(self.ctx(), va as *const c_void, size) };
        self.api.check("zeVirtualMemFree", rc)
    }

    fn create(&self, device: i32, size: usize) -> Result<u64> {
        let dev = self.device(device)?;
        let desc = ze::PhysicalMemDesc {
            stype: ze::STYPE_PHYSICAL_MEM_DESC,
            p_next: ptr::null(),
            flags: 0,
            size,
        };
        let mut handle: Handle = ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        let rc = unsafe {
            (self.api.physical_create)(self.ctx(), dev.handle as Handle, &desc, &mut handle)
        };
        self.api
            .check("zePhysicalMemCreate", rc)
            .map_err(|e| e.context(format!("device {device}, {size} bytes")))?;
        dev.created.fetch_add(size as u64, Ordering::Relaxed);
        // Level Zero handles do not carry their size; `release` needs it for mem_get_info.
        SIZES.lock().insert(handle as u64, (size, device));
        Ok(handle as u64)
    }

    fn release(&self, _device: i32, handle: u64) -> Result<()> {
        // SAFETY: a handle from zePhysicalMemCreate, destroyed once.
        let rc = unsafe { (self.api.physical_destroy)(self.ctx(), handle as usize as Handle) };
        self.api.check("zePhysicalMemDestroy", rc)?;
        if let Some((size, device)) = SIZES.lock().remove(&handle) {
            if let Ok(dev) = self.device(device) {
                dev.created.fetch_sub(size as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn map(&self, _device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
        // SAFETY: the range lies in a reservation devmem owns and is unmapped.
        let rc = unsafe {
            (self.api.map)(
                self.ctx(),
                va as *const c_void,
                size,
                handle as usize as Handle,
                0,
                ze::ACCESS_READWRITE,
            )
        };
        self.api.check("zeVirtualMemMap", rc)
    }

    fn set_access(&self, _device: i32, _va: u64, _size: usize) -> Result<()> {
        Ok(()) // zeVirtualMemMap grants read-write access itself
    }

    fn unmap(&self, _device: i32, va: u64, size: usize) -> Result<()> {
        // SAFETY: a range devmem mapped.
        let rc = unsafe { (self.api.unmap)(self.ctx(), va as *const c_void, size) };
        self.api.check("zeVirtualMemUnmap", rc)
    }

    fn synchronize(&self, device: i32) -> Result<()> {
        self.wait_copies(device)
    }

    fn copy_to_host_async(&self, device: i32, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        self.copy(
            device,
            dst.cast(),
            src as *const c_void,
            len,
            "device to host",
        )
    }

    fn copy_to_device_async(
        &self,
        device: i32,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<()> {
        self.copy(
            device,
            dst as *mut c_void,
            src.cast(),
            len,
            "host to device",
        )
    }

    fn wait_copies(&self, device: i32) -> Result<()> {
        let event = self.signal(device)?;
        self.wait_event(device, event)
    }

    fn mem_get_info(&self, device: i32) -> Result<(usize, usize)> {
        let dev = self.device(device)?;
        let created = dev.created.load(Ordering::Relaxed);
        let total = dev.total;
        Ok((total.saturating_sub(created) as usize, total as usize))
    }

    fn host_memory(&self) -> HostMemory {
        HostMemory::Allocate
    }

    fn alloc_host(&self, _device: i32, len: usize) -> Result<*mut u8> {
        let desc = ze::HostMemAllocDesc {
            stype: ze::STYPE_HOST_MEM_ALLOC_DESC,
            p_next: ptr::null(),
            flags: 0,
        };
        let mut ptr_out: *mut c_void = ptr::null_mut();
        // SAFETY: valid descriptor and out-pointer.
        let rc =
            unsafe { (self.api.mem_alloc_host)(self.ctx(), &desc, len, 2 << 20, &mut ptr_out) };
        self.api
            .check("zeMemAllocHost", rc)
            .map_err(|e| e.context(format!("{len} bytes of host memory for backups")))?;
        Ok(ptr_out.cast())
    }

    fn free_host(&self, _device: i32, ptr_in: *mut u8) -> Result<()> {
        // SAFETY: memory from zeMemAllocHost, freed once.
        let rc = unsafe { (self.api.mem_free)(self.ctx(), ptr_in.cast()) };
        self.api.check("zeMemFree", rc)
    }

    fn host_register(&self, _device: i32, _ptr: *mut u8, _len: usize) -> Result<()> {
        bail!(
            Unsupported,
            "Level Zero has no registration of ordinary host memory"
        )
    }

    fn host_unregister(&self, _device: i32, _ptr: *mut u8) -> Result<()> {
        bail!(
            Unsupported,
            "Level Zero has no registration of ordinary host memory"
        )
    }

    fn record_copy_marker(&self, device: i32) -> Result<u64> {
        self.signal(device)
    }

    fn wait_copy_marker(&self, device: i32, marker: u64) -> Result<()> {
        self.wait_event(device, marker)
    }

    fn describe(&self) -> String {
        format!(
            "level_zero ({}; context {})",
            self.api.path(),
            self.context_source
        )
    }
}

/// physical handle -> (bytes, device) of every live Level Zero physical allocation.
static SIZES: Mutex<BTreeMap<u64, (usize, i32)>> = Mutex::new(BTreeMap::new());
