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
        if let Some(found) = api.init_gpu_drivers() {
            return found;
        }
        api.init_all()?;
        let drivers = api.drivers()?;
        if drivers.is_empty() {
            bail!(
                DriverNotFound,
                "the Level Zero loader {} found no driver",
                api.path()
            );
        }
        Ok(drivers)
    }

    fn devices_of(api: &ZeApi, driver: Handle) -> Result<Vec<usize>> {
        Ok(api
            .devices(driver)?
            .into_iter()
            .map(|h| h as usize)
            .collect())
    }

    fn default_or_new_context(api: &ZeApi, driver: Handle) -> Result<(usize, &'static str)> {
        if let Some(ctx) = api.driver_default_context(driver) {
            return Ok((
                ctx as usize,
                "the driver's default context (zeDriverGetDefaultContext)",
            ));
        }
        let ctx = api.create_context(driver)?;
        Ok((ctx as usize, "created itself (zeContextCreate)"))
    }

    fn query_page_size(api: &ZeApi, context: usize, device: usize) -> Result<usize> {
        let page = match api.page_size(context as Handle, device as Handle, 2 << 20) {
            Ok(page) => page,
            Err(ze::ZE_RESULT_ERROR_UNSUPPORTED_FEATURE) => bail!(
                Unsupported,
                "the Level Zero device has no virtual memory support (zeVirtualMemQueryPageSize: {})",
                ze::result_name(ze::ZE_RESULT_ERROR_UNSUPPORTED_FEATURE)
            ),
            Err(code) => return Err(api.error("zeVirtualMemQueryPageSize", code)),
        };
        if page == 0 || !page.is_power_of_two() {
            bail!(Driver, "zeVirtualMemQueryPageSize returned {page}");
        }
        Ok(page)
    }

    fn total_memory(api: &ZeApi, device: usize) -> Result<u64> {
        let props = api.memory_properties(device as Handle)?;
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
        let groups = self.api.queue_groups(device.handle as Handle)?;
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
        let list = self
            .api
            .create_immediate_list(self.ctx(), device.handle as Handle, &desc)?;
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
        let desc = ze::EventPoolDesc {
            stype: ze::STYPE_EVENT_POOL_DESC,
            p_next: ptr::null(),
            flags: ze::EVENT_POOL_HOST_VISIBLE,
            count: EVENTS_PER_POOL,
        };
        let pool = self
            .api
            .create_event_pool(self.ctx(), device.handle as Handle, &desc)?;
        engine.pools.push(pool as usize);
        for index in 0..EVENTS_PER_POOL {
            let desc = ze::EventDesc {
                stype: ze::STYPE_EVENT_DESC,
                p_next: ptr::null(),
                index,
                signal: ze::EVENT_SCOPE_HOST,
                wait: ze::EVENT_SCOPE_HOST,
            };
            let event = self.api.create_event(pool, &desc)?;
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
            let signalled = self
                .api
                .append_signal_event(engine.list as Handle, event as Handle);
            if let Err(err) = signalled {
                engine.idle_events.push(event);
                return Err(err);
            }
            Ok(event as u64)
        })
    }

    fn wait_event(&self, ordinal: i32, event: u64) -> Result<()> {
        let handle = event as usize as Handle;
        let waited = self.api.host_synchronize_event(handle);
        let reset = self.api.host_reset_event(handle);
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
            // SAFETY: both ranges are valid for `len` bytes until the copy is waited for (the
            // store and the pipeline keep backups and mappings until then).
            unsafe {
                self.api
                    .append_memory_copy(engine.list as Handle, dst, src, len)
            }
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
        self.api.reserve_va(self.ctx(), size)
    }

    fn free_va(&self, _device: i32, va: u64, size: usize) -> Result<()> {
        // SAFETY: a reservation devmem made and no longer maps.
        unsafe { self.api.free_va_range(self.ctx(), va, size) }
    }

    fn create(&self, device: i32, size: usize) -> Result<u64> {
        let dev = self.device(device)?;
        let handle = self
            .api
            .create_physical(self.ctx(), dev.handle as Handle, size)
            .map_err(|e| e.context(format!("device {device}, {size} bytes")))?;
        dev.created.fetch_add(size as u64, Ordering::Relaxed);
        // Level Zero handles do not carry their size; `release` needs it for mem_get_info.
        SIZES.lock().insert(handle, (size, device));
        Ok(handle)
    }

    fn release(&self, _device: i32, handle: u64) -> Result<()> {
        self.api.destroy_physical(self.ctx(), handle)?;
        if let Some((size, device)) = SIZES.lock().remove(&handle) {
            if let Ok(dev) = self.device(device) {
                dev.created.fetch_sub(size as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn map(&self, _device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
        self.api.map_va(self.ctx(), va, size, handle)
    }

    fn set_access(&self, _device: i32, _va: u64, _size: usize) -> Result<()> {
        Ok(()) // zeVirtualMemMap grants read-write access itself
    }

    fn export_fd(&self, _device: i32, handle: u64) -> Result<std::os::fd::OwnedFd> {
        Err(Error::new(
            devmem_status::Unsupported,
            format!(
                "Level Zero cannot export physical memory ({handle:#x}) as a file descriptor: \
                 zeMemGetIpcHandle shares zeMemAllocDevice allocations only, not the \
                 zePhysicalMemCreate memory devmem maps, so it cannot be kept by the keeper"
            ),
        ))
    }

    fn import_fd(&self, _device: i32, _fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
        Err(Error::new(
            devmem_status::Unsupported,
            "Level Zero cannot import physical memory from a file descriptor: \
             zePhysicalMemCreate memory has no shareable handle"
                .to_string(),
        ))
    }

    fn unmap(&self, _device: i32, va: u64, size: usize) -> Result<()> {
        // SAFETY: a range devmem mapped; callers waited for devmem's copies (and the caller for
        // its own queues, see the module docs).
        unsafe { self.api.unmap_va(self.ctx(), va, size) }
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
        self.api
            .alloc_host(self.ctx(), len, 2 << 20)
            .map_err(|e| e.context(format!("{len} bytes of host memory for backups")))
    }

    fn free_host(&self, _device: i32, ptr_in: *mut u8) -> Result<()> {
        // SAFETY: memory from zeMemAllocHost, freed once, after every copy into it was waited
        // for (the store frees only chunks no backup uses).
        unsafe { self.api.free_host(self.ctx(), ptr_in) }
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
