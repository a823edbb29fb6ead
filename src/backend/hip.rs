//! The HIP implementation of [`Backend`], for AMD GPUs, on the HIP runtime's virtual memory
//! management API (`hipMemAddressReserve`, `hipMemCreate`, `hipMemMap`, `hipMemSetAccess`,
//! ...), which mirrors CUDA's.
//!
//! * Device: HIP's runtime has a current device per thread instead of contexts. Each call on
//!   a device makes it current (`hipSetDevice`) for the call and gives the thread its previous
//!   device back, so PyTorch's current device is never changed under it.
//! * Physical memory: pinned device memory without a shareable handle. What ROCm needs beyond
//!   CUDA (chunks, re-reserving ranges so released memory is returned, zeroing discarded
//!   memory on wake) is not here but in [`super::layer`] and the pipeline, switched by
//!   [`super::Settings`].
//! * Host backups: devmem's own host memory, page-locked with `hipHostRegister` (portable).
//! * Copies: `hipMemcpyDtoHAsync` / `hipMemcpyHtoDAsync` on one non-blocking stream per
//!   device; markers are `hipEvent`s without timing, reused.
//! * No device checksum: devmem's checksum kernel is PTX, which HIP cannot load, so read-only
//!   `VERIFY` is `UNSUPPORTED` here (as on Level Zero).
//!
//! Verified against the driver emulator's HIP face only; no AMD hardware was available.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::Backend;
use crate::driver::hip::{
    HipApi, HipMemAccessDesc, HipMemAllocationProp, HipMemLocation, MEM_ACCESS_PROT_READ,
    MEM_ACCESS_PROT_READ_WRITE, MEM_HANDLE_TYPE_POSIX_FD, MEM_LOCATION_TYPE_DEVICE,
    STREAM_NON_BLOCKING,
};
use crate::error::{bail, Error, Result};

/// Per-device state, created on first use of the device.
struct DeviceState {
    /// devmem's non-blocking stream for copies, as an address.
    stream: usize,
    granularity: usize,
}

impl DeviceState {
    fn stream(&self) -> *mut c_void {
        self.stream as *mut c_void
    }
}

/// The HIP runtime backend.
pub struct HipBackend {
    api: HipApi,
    device_count: i32,
    devices: Mutex<Vec<Option<Arc<DeviceState>>>>,
    /// Idle events, reused by copy markers.
    idle_events: super::IdleEvents,
    /// Whether memory is created with POSIX file descriptor handles (exportable to the
    /// keeper); cleared once the runtime refuses them.
    posix_fd: AtomicBool,
}

impl HipBackend {
    /// Loads the runtime and counts its devices.
    pub fn load() -> Result<Self> {
        let api = HipApi::load()?;
        let count = api.device_count()?;
        log::info!(
            "devmem: HIP runtime {} (version {}), {count} device(s)",
            api.path(),
            api.runtime_version()
                .map_or_else(|| "unknown".to_string(), |v| v.to_string())
        );
        Ok(Self {
            api,
            device_count: count,
            devices: Mutex::new(vec![None; usize::try_from(count).unwrap_or(0)]),
            idle_events: super::IdleEvents::default(),
            posix_fd: AtomicBool::new(true),
        })
    }

    fn device(&self, ordinal: i32) -> Result<Arc<DeviceState>> {
        let index = match usize::try_from(ordinal) {
            Ok(i) if ordinal < self.device_count => i,
            _ => bail!(
                InvalidDevice,
                "device {ordinal} is out of range: the HIP runtime reports {} device(s)",
                self.device_count
            ),
        };
        let mut devices = self.devices.lock();
        if let Some(state) = &devices[index] {
            return Ok(Arc::clone(state));
        }
        let state = Arc::new(self.on_device(ordinal, || self.init_device(ordinal))?);
        devices[index] = Some(Arc::clone(&state));
        Ok(state)
    }

    fn init_device(&self, ordinal: i32) -> Result<DeviceState> {
        let granularity = self
            .api
            .granularity(&HipMemAllocationProp::device(ordinal))
            .map_err(|e| {
                e.context(format!(
                    "device {ordinal}: virtual memory management (needed for sleep mode)"
                ))
            })?;
        if granularity == 0 || !granularity.is_power_of_two() {
            bail!(
                Driver,
                "hipMemGetAllocationGranularity returned {granularity} for device {ordinal}"
            );
        }
        let stream = self.api.create_stream(STREAM_NON_BLOCKING)?;
        log::info!("devmem: HIP device {ordinal}: granularity {granularity} bytes");
        Ok(DeviceState {
            stream: stream as usize,
            granularity,
        })
    }

    /// Runs `f` with `device` current, giving the thread its previous device back.
    fn on_device<T>(&self, device: i32, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let previous = self.api.current_device()?;
        if previous != device {
            self.api.set_device(device)?;
        }
        let out = f();
        if previous != device {
            if let Err(err) = self.api.set_device(previous) {
                log::warn!("devmem: giving the thread back HIP device {previous}: {err}");
            }
        }
        out
    }

    fn with_device<T>(&self, ordinal: i32, f: impl FnOnce(&DeviceState) -> Result<T>) -> Result<T> {
        let state = self.device(ordinal)?;
        self.on_device(ordinal, || f(&state))
    }
}

impl Backend for HipBackend {
    fn kind(&self) -> super::devmem_backend {
        super::devmem_backend::Hip
    }

    fn device_count(&self) -> i32 {
        self.device_count
    }

    fn current_device(&self) -> Option<i32> {
        let device = self.api.current_device().ok()?;
        (0..self.device_count).contains(&device).then_some(device)
    }

    fn granularity(&self, device: i32) -> Result<usize> {
        Ok(self.device(device)?.granularity)
    }

    fn reserve(&self, device: i32, size: usize) -> Result<u64> {
        self.with_device(device, |state| {
            self.api.address_reserve(size, state.granularity, 0)
        })
    }

    fn reserve_at(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |state| {
            let got = self.api.address_reserve(size, state.granularity, va)?;
            if got == va {
                return Ok(());
            }
            // SAFETY: `got` is the reservation just made; nothing uses it.
            if let Err(err) = unsafe { self.api.address_free(got, size) } {
                log::error!("devmem: freeing the misplaced reservation {got:#x}: {err}");
            }
            Err(Error::new(
                crate::error::devmem_status::Driver,
                format!(
                    "hipMemAddressReserve placed {size} bytes at {got:#x}, not at the requested \
                     {va:#x}: the range is taken"
                ),
            ))
        })
    }

    fn free_va(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `va`/`size` describe a reservation devmem made and no longer maps.
            unsafe { self.api.address_free(va, size) }
        })
    }

    fn create(&self, device: i32, size: usize) -> Result<u64> {
        self.with_device(device, |_| {
            let mut prop = HipMemAllocationProp::device(device);
            if self.posix_fd.load(Ordering::Relaxed) {
                prop.requested_handle_type = MEM_HANDLE_TYPE_POSIX_FD;
                match self.api.create(size, &prop) {
                    Ok(handle) => return Ok(handle),
                    // Only a refusal of the handle type (hipErrorNotSupported or
                    // hipErrorInvalidValue) gets a second try without it.
                    Err(err)
                        if err.status != crate::error::devmem_status::Unsupported
                            && !err.message.contains("hipErrorInvalidValue") =>
                    {
                        return Err(err.context(format!("device {device}, {size} bytes")));
                    }
                    Err(err) => {
                        // A runtime without shareable handles: create without, from now on
                        // (the keeper then cannot export this memory).
                        log::info!(
                            "devmem: device {device}: POSIX file descriptor handles refused \
                             ({err}); creating memory without them"
                        );
                        prop.requested_handle_type = 0;
                    }
                }
                let handle = self
                    .api
                    .create(size, &prop)
                    .map_err(|e| e.context(format!("device {device}, {size} bytes")))?;
                self.posix_fd.store(false, Ordering::Relaxed);
                return Ok(handle);
            }
            self.api
                .create(size, &prop)
                .map_err(|e| e.context(format!("device {device}, {size} bytes")))
        })
    }

    fn export_fd(&self, device: i32, handle: u64) -> Result<std::os::fd::OwnedFd> {
        self.with_device(device, |_| {
            self.api
                .export_fd(handle)
                .map_err(|e| e.context(format!("device {device}")))
        })
    }

    fn import_fd(&self, device: i32, fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
        self.with_device(device, |_| {
            self.api
                .import_fd(fd)
                .map_err(|e| e.context(format!("device {device}")))
        })
    }

    fn set_access_read_only(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            let desc = HipMemAccessDesc {
                location: HipMemLocation {
                    kind: MEM_LOCATION_TYPE_DEVICE,
                    id: device,
                },
                flags: MEM_ACCESS_PROT_READ,
            };
            self.api.set_access(va, size, &desc)
        })
    }

    fn release(&self, device: i32, handle: u64) -> Result<()> {
        self.with_device(device, |_| self.api.release(handle))
    }

    fn map(&self, device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
        self.with_device(device, |_| self.api.map(va, size, handle))
    }

    fn set_access(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            let desc = HipMemAccessDesc {
                location: HipMemLocation {
                    kind: MEM_LOCATION_TYPE_DEVICE,
                    id: device,
                },
                flags: MEM_ACCESS_PROT_READ_WRITE,
            };
            self.api.set_access(va, size, &desc)
        })
    }

    fn unmap(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: the range was mapped by devmem; callers synchronised the device first.
            unsafe { self.api.unmap(va, size) }
        })
    }

    fn synchronize(&self, device: i32) -> Result<()> {
        self.with_device(device, |_| self.api.synchronize_device())
    }

    fn copy_to_host_async(&self, device: i32, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: `dst` is registered host memory of at least `len` bytes that stays alive
            // until `wait_copies`; `src` is a mapped device range of at least `len` bytes.
            unsafe {
                self.api
                    .copy_to_host_async(dst.cast(), src, len, state.stream())
            }
        })
    }

    fn copy_to_device_async(
        &self,
        device: i32,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: as in `copy_to_host_async`, in the other direction.
            unsafe {
                self.api
                    .copy_to_device_async(dst, src.cast(), len, state.stream())
            }
        })
    }

    fn zero_async(&self, device: i32, dst: u64, len: usize) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: `dst..dst+len` is a freshly mapped allocation nothing else uses until
            // the wake waits for devmem's stream.
            unsafe { self.api.zero_async(dst, len, state.stream()) }
        })
    }

    fn wait_copies(&self, device: i32) -> Result<()> {
        self.with_device(device, |state| self.api.synchronize_stream(state.stream()))
    }

    fn mem_get_info(&self, device: i32) -> Result<(usize, usize)> {
        self.with_device(device, |_| self.api.memory_info())
    }

    fn host_register(&self, device: i32, ptr: *mut u8, len: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `ptr..ptr+len` is host memory the host store mapped, owns and keeps
            // mapped until it is unregistered.
            unsafe { self.api.register_host(ptr.cast(), len) }
                .map_err(|e| e.context(format!("registering {len} bytes of host memory")))
        })
    }

    fn host_unregister(&self, device: i32, ptr: *mut u8) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `ptr` was registered by `host_register`; the store frees only chunks no
            // backup uses, after every copy into them was waited for.
            unsafe { self.api.unregister_host(ptr.cast()) }
        })
    }

    fn record_copy_marker(&self, device: i32) -> Result<u64> {
        self.with_device(device, |state| {
            self.idle_events.record(
                device,
                || Ok(self.api.create_event()? as usize),
                |event| self.api.record_event(event as *mut c_void, state.stream()),
            )
        })
    }

    fn wait_copy_marker(&self, device: i32, marker: u64) -> Result<()> {
        self.with_device(device, |_| {
            self.idle_events.wait(device, marker, |event| {
                self.api.synchronize_event(event as *mut c_void)
            })
        })
    }

    fn describe(&self) -> String {
        format!("hip ({})", self.api.path())
    }
}
