//! The CUDA implementation of [`Backend`], on the driver's virtual memory management API.
//!
//! Work happens in each device's primary context (retained once, never released: releasing it
//! at process exit would call into a driver that may be torn down). Physical memory is created
//! with the properties vLLM's allocator uses: pinned device memory, GPUDirect RDMA when the
//! device supports it with VMM, and fabric handles when supported, falling back to POSIX file
//! descriptors and then to no shareable handle when the driver refuses.

use std::ffi::{c_void, CStr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute, CUevent, CUevent_flags, CUfunction, CUmemAccessDesc,
    CUmemAccess_flags, CUmemAllocationGranularity_flags, CUmemAllocationHandleType,
    CUmemAllocationProp, CUmemAllocationType, CUmemLocationType, CUstream,
    CU_MEMHOSTREGISTER_PORTABLE,
};
use parking_lot::Mutex;

use super::Backend;
use crate::driver::cuda::{CudaApi, CUDA_ERROR_NOT_PERMITTED, CUDA_ERROR_NOT_SUPPORTED};
use crate::error::{bail, devmem_status::Unsupported, Result};

/// `CU_STREAM_NON_BLOCKING`: devmem's streams never synchronise with the legacy stream.
const STREAM_NON_BLOCKING: u32 = 1;

/// `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR` as a bit.
const POSIX_FD: u32 = 0x1;
/// `CU_MEM_HANDLE_TYPE_FABRIC` as a bit.
const FABRIC: u32 = 0x8;

/// Shareable-handle type masks tried in order; a driver that refuses one moves on to the next.
/// Fabric and POSIX file descriptors together first: a fabric handle reportedly does not keep
/// memory alive once its creator exits, a file descriptor does, and keeping memory in the
/// keeper ([`crate::store::kept`]) exports file descriptors.
const HANDLE_TYPES: [u32; 4] = [FABRIC | POSIX_FD, POSIX_FD, FABRIC, 0];

/// The Rust enum value closest to a mask, for the properties queries that take the struct.
fn single_type(mask: u32) -> CUmemAllocationHandleType {
    if mask & FABRIC != 0 {
        CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_FABRIC
    } else if mask & POSIX_FD != 0 {
        CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    } else {
        CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE
    }
}

/// Per-device state, created on first use of the device.
struct DeviceState {
    ordinal: i32,
    device: CUdevice,
    /// The retained primary context, as an address (raw pointers are not `Send`).
    context: usize,
    /// devmem's own non-blocking stream for copies.
    stream: usize,
    gpu_direct_rdma: bool,
    /// Index into [`HANDLE_TYPES`] of the handle type the driver last accepted.
    handle_type: AtomicUsize,
    granularity: usize,
    /// The checksum kernel (`CUfunction` as an address), loaded on first use.
    checksum: Mutex<Option<usize>>,
}

/// The checksum kernel's PTX (see `kernels/checksum.cu`), NUL-terminated.
const CHECKSUM_PTX: &str = concat!(include_str!("kernels/checksum.ptx"), "\0");
/// Blocks per checksum launch, each writing one partial sum.
const CHECKSUM_BLOCKS: usize = 1024;
/// Threads per block (the kernel's shared array holds 256).
const CHECKSUM_THREADS: u32 = 256;

impl DeviceState {
    fn properties(&self) -> CUmemAllocationProp {
        // SAFETY: CUmemAllocationProp is a plain C struct for which all-zero is a valid value
        // (the driver documents zeroed reserved fields).
        let mut prop: CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = self.device;
        prop.requestedHandleTypes = single_type(self.handle_mask());
        prop.allocFlags.gpuDirectRDMACapable = u8::from(self.gpu_direct_rdma);
        prop
    }

    /// The handle-type mask memory is created with now.
    fn handle_mask(&self) -> u32 {
        HANDLE_TYPES[self
            .handle_type
            .load(Ordering::Relaxed)
            .min(HANDLE_TYPES.len() - 1)]
    }

    fn context(&self) -> CUcontext {
        self.context as CUcontext
    }

    fn stream(&self) -> CUstream {
        self.stream as CUstream
    }
}

/// The CUDA driver backend.
pub struct CudaBackend {
    api: CudaApi,
    device_count: i32,
    devices: Mutex<Vec<Option<Arc<DeviceState>>>>,
    /// Idle events, reused by copy markers.
    idle_events: super::IdleEvents,
}

impl CudaBackend {
    /// Loads the driver and counts its devices.
    pub fn load() -> Result<Self> {
        let api = CudaApi::load()?;
        let count = api.device_count()?;
        if let Some(version) = api.driver_version() {
            log::info!(
                "devmem: CUDA driver {} (API {}.{}), {count} device(s)",
                api.path(),
                version / 1000,
                (version % 1000) / 10
            );
        }
        Ok(Self {
            api,
            device_count: count,
            devices: Mutex::new(vec![None; usize::try_from(count).unwrap_or(0)]),
            idle_events: super::IdleEvents::default(),
        })
    }

    fn device(&self, ordinal: i32) -> Result<Arc<DeviceState>> {
        let index = match usize::try_from(ordinal) {
            Ok(i) if ordinal < self.device_count => i,
            _ => bail!(
                InvalidDevice,
                "device {ordinal} is out of range: the driver reports {} device(s)",
                self.device_count
            ),
        };
        let mut devices = self.devices.lock();
        if let Some(state) = &devices[index] {
            return Ok(Arc::clone(state));
        }
        let state = Arc::new(self.init_device(ordinal)?);
        devices[index] = Some(Arc::clone(&state));
        Ok(state)
    }

    fn init_device(&self, ordinal: i32) -> Result<DeviceState> {
        let api = &self.api;
        let device = api.device(ordinal)?;
        let vmm = self.api.attribute(
            device,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
        )?;
        if vmm == 0 {
            bail!(
                Unsupported,
                "device {ordinal} does not support virtual memory management"
            );
        }
        let rdma = self.api.attribute(
            device,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED,
        )? != 0;
        // Older drivers do not know the fabric attribute: treat an error as "not supported".
        let fabric = self
            .api
            .attribute(
                device,
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED,
            )
            .unwrap_or(0)
            != 0;
        let context = api.retain_primary_context(device)?;
        let mut state = DeviceState {
            ordinal,
            device,
            context: context as usize,
            stream: 0,
            gpu_direct_rdma: rdma,
            handle_type: AtomicUsize::new(if fabric { 0 } else { 1 }),
            granularity: 0,
            checksum: Mutex::new(None),
        };
        let stream = self.in_context(&state, || api.create_stream(STREAM_NON_BLOCKING))?;
        state.stream = stream as usize;
        state.granularity = self.query_granularity(&state)?;
        log::info!(
            "devmem: device {ordinal}: granularity {} bytes, GPUDirect RDMA {}, handle types {:#x}",
            state.granularity,
            rdma,
            state.handle_mask()
        );
        Ok(state)
    }

    fn query_granularity(&self, state: &DeviceState) -> Result<usize> {
        let granularity = self.api.granularity(
            &state.properties(),
            CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM as u32,
        )?;
        if granularity == 0 || !granularity.is_power_of_two() {
            bail!(
                Driver,
                "cuMemGetAllocationGranularity returned {granularity} for device {}",
                state.ordinal
            );
        }
        Ok(granularity)
    }

    /// Runs `f` with the device's primary context current. A thread with no context keeps the
    /// primary context afterwards; a thread with another context gets it back.
    fn in_context<T>(&self, state: &DeviceState, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let api = &self.api;
        let previous = api.current_context()?;
        let switch = previous != state.context();
        if switch {
            api.set_current_context(state.context())?;
        }
        let out = f();
        if switch && !previous.is_null() {
            if let Err(err) = api.set_current_context(previous) {
                log::warn!("devmem: restoring the caller's context: {err}");
            }
        }
        out
    }

    fn with_device<T>(&self, ordinal: i32, f: impl FnOnce(&DeviceState) -> Result<T>) -> Result<T> {
        let state = self.device(ordinal)?;
        self.in_context(&state, || f(&state))
    }
}

impl CudaBackend {
    fn access(&self, device: i32, va: u64, size: usize, flags: CUmemAccess_flags) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: plain C struct; all-zero is valid.
            let mut desc: CUmemAccessDesc = unsafe { std::mem::zeroed() };
            desc.location.type_ = CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
            desc.location.id = state.device;
            desc.flags = flags;
            self.api.set_access(va, size, &desc)
        })
    }

    fn checksum_function(&self, state: &DeviceState) -> Result<CUfunction> {
        let mut loaded = state.checksum.lock();
        if let Some(function) = *loaded {
            return Ok(function as CUfunction);
        }
        let image = CStr::from_bytes_with_nul(CHECKSUM_PTX.as_bytes())
            .map_err(|e| crate::error::Error::new(Unsupported, format!("checksum PTX: {e}")))?;
        let module = self
            .api
            .load_module(image)
            .map_err(|e| e.context("loading devmem's checksum kernel"))?;
        let function = self.api.function(module, c"devmem_checksum")?;
        *loaded = Some(function as usize);
        Ok(function)
    }

    /// Launches the checksum kernel over each range into its slice of the partial sums at
    /// `partials`, copies them back and adds them up.
    fn run_checksums(
        &self,
        state: &DeviceState,
        ranges: &[(u64, usize)],
        partials: u64,
    ) -> Result<Vec<u64>> {
        let function = self.checksum_function(state)?;
        for (i, &(va, len)) in ranges.iter().enumerate() {
            let mut words = va;
            let mut count = (len / 8) as u64;
            let mut out = partials + (i * CHECKSUM_BLOCKS * 8) as u64;
            let mut params: [*mut c_void; 3] = [
                (&raw mut words).cast(),
                (&raw mut count).cast(),
                (&raw mut out).cast(),
            ];
            // SAFETY: the parameters match `devmem_checksum(const u64*, u64, u64*)` and are
            // copied by the driver at launch; `va..va+len` is mapped device memory and `out`
            // has room for CHECKSUM_BLOCKS partial sums.
            unsafe {
                self.api.launch(
                    function,
                    CHECKSUM_BLOCKS as u32,
                    CHECKSUM_THREADS,
                    state.stream(),
                    &mut params,
                )
            }?;
        }
        let mut sums = vec![0u64; ranges.len() * CHECKSUM_BLOCKS];
        // SAFETY: `sums` is large enough and outlives the stream synchronisation below.
        unsafe {
            self.api.copy_to_host_async(
                sums.as_mut_ptr().cast(),
                partials,
                sums.len() * 8,
                state.stream(),
            )
        }?;
        self.api.synchronize_stream(state.stream())?;
        Ok(sums
            .chunks(CHECKSUM_BLOCKS)
            .map(|c| c.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .collect())
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> super::devmem_backend {
        super::devmem_backend::Cuda
    }

    fn device_count(&self) -> i32 {
        self.device_count
    }

    fn current_device(&self) -> Option<i32> {
        if self.api.current_context().ok()?.is_null() {
            return None;
        }
        // The driver numbers CUdevice handles by ordinal.
        let device = self.api.current_context_device().ok()?;
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

    fn free_va(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `va`/`size` describe a reservation devmem made and no longer maps.
            unsafe { self.api.address_free(va, size) }
        })
    }

    fn create(&self, device: i32, size: usize) -> Result<u64> {
        self.with_device(device, |state| loop {
            match self
                .api
                .create(size, &state.properties(), state.handle_mask())
            {
                Ok(handle) => return Ok(handle),
                Err(e)
                    if e.code == CUDA_ERROR_NOT_PERMITTED || e.code == CUDA_ERROR_NOT_SUPPORTED =>
                {
                    let current = state.handle_type.load(Ordering::Relaxed);
                    if current + 1 >= HANDLE_TYPES.len() {
                        return Err(e.error.context(format!("device {device}, {size} bytes")));
                    }
                    log::info!(
                        "devmem: device {device}: handle types {:#x} refused ({}); trying {:#x}",
                        HANDLE_TYPES[current],
                        e.error.message,
                        HANDLE_TYPES[current + 1]
                    );
                    state.handle_type.store(current + 1, Ordering::Relaxed);
                }
                Err(e) => return Err(e.error.context(format!("device {device}, {size} bytes"))),
            }
        })
    }

    fn release(&self, device: i32, handle: u64) -> Result<()> {
        self.with_device(device, |_| self.api.release(handle))
    }

    fn map(&self, device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
        self.with_device(device, |_| self.api.map(va, size, handle))
    }

    fn set_access(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.access(
            device,
            va,
            size,
            CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        )
    }

    fn set_access_read_only(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.access(
            device,
            va,
            size,
            CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ,
        )
    }

    fn export_fd(&self, device: i32, handle: u64) -> Result<OwnedFd> {
        self.with_device(device, |state| {
            self.api.export_fd(handle).map_err(|e| {
                let mask = state.handle_mask();
                if mask & POSIX_FD == 0 {
                    e.context(format!(
                        "device {device} creates memory without POSIX file descriptor handles \
                         (the driver refused them; handle types {mask:#x})"
                    ))
                } else {
                    e.context(format!("device {device}"))
                }
            })
        })
    }

    fn import_fd(&self, device: i32, fd: BorrowedFd<'_>) -> Result<u64> {
        self.with_device(device, |_| {
            self.api
                .import_fd(fd)
                .map_err(|e| e.context(format!("device {device}")))
        })
    }

    fn unmap(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: the range was mapped by devmem; callers synchronised the device first.
            unsafe { self.api.unmap(va, size) }
        })
    }

    fn synchronize(&self, device: i32) -> Result<()> {
        self.with_device(device, |_| self.api.synchronize_context())
    }

    fn copy_to_host_async(&self, device: i32, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: `dst` is pinned host memory of at least `len` bytes that stays alive until
            // `wait_copies`; `src` is a mapped device range of at least `len` bytes.
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

    fn wait_copies(&self, device: i32) -> Result<()> {
        self.with_device(device, |state| self.api.synchronize_stream(state.stream()))
    }

    fn zero_async(&self, device: i32, dst: u64, len: usize) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: `dst..dst+len` is a freshly mapped allocation nothing else uses until
            // the wake waits for devmem's stream.
            unsafe { self.api.zero_async(dst, len, state.stream()) }
        })
    }

    fn mem_get_info(&self, device: i32) -> Result<(usize, usize)> {
        self.with_device(device, |_| self.api.memory_info())
    }

    fn host_register(&self, device: i32, ptr: *mut u8, len: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `ptr..ptr+len` is host memory the host store mapped, owns and keeps
            // mapped until it is unregistered.
            unsafe {
                self.api
                    .host_register(ptr.cast(), len, CU_MEMHOSTREGISTER_PORTABLE)
            }
            .map_err(|e| e.context(format!("registering {len} bytes of host memory")))
        })
    }

    fn host_unregister(&self, device: i32, ptr: *mut u8) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `ptr` was registered by `host_register`; the store frees only chunks no
            // backup uses, after every copy into them was waited for.
            unsafe { self.api.host_unregister(ptr.cast()) }
        })
    }

    fn can_checksum(&self) -> bool {
        self.api.can_launch()
    }

    fn checksums(&self, device: i32, ranges: &[(u64, usize)]) -> Result<Vec<u64>> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let state = self.device(device)?;
        // Scratch device memory for the partial sums, released before returning, so nothing
        // stays allocated while the process sleeps.
        let size = (ranges.len() * CHECKSUM_BLOCKS * 8).next_multiple_of(state.granularity);
        let va = self.reserve(device, size)?;
        let handle = match self.create_and_map(device, va, size) {
            Ok(handle) => handle,
            Err(stranded) => {
                if !stranded.holds_anything() {
                    if let Err(err) = self.free_va(device, va, size) {
                        log::error!("devmem: freeing checksum scratch addresses: {err}");
                    }
                }
                return Err(stranded.error.context("checksum: scratch memory"));
            }
        };
        let sums = self.with_device(device, |state| self.run_checksums(state, ranges, va));
        if sums.is_err() {
            // Nothing may still run on the scratch memory when it goes.
            if let Err(err) = self.wait_copies(device) {
                log::error!("devmem: waiting for checksum kernels after a failure: {err}");
            }
        }
        let freed = self
            .unmap(device, va, size)
            .and_then(|()| self.release(device, handle))
            .and_then(|()| self.free_va(device, va, size));
        if let Err(err) = freed {
            log::error!("devmem: releasing {size} bytes of checksum scratch memory: {err}");
        }
        sums.map_err(|e| {
            e.context(format!(
                "checksum of {} range(s) on device {device}",
                ranges.len()
            ))
        })
    }

    fn record_copy_marker(&self, device: i32) -> Result<u64> {
        self.with_device(device, |state| {
            self.idle_events.record(
                device,
                || {
                    let flags = CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
                    Ok(self.api.create_event(flags)? as usize)
                },
                |event| self.api.record_event(event as CUevent, state.stream()),
            )
        })
    }

    fn wait_copy_marker(&self, device: i32, marker: u64) -> Result<()> {
        self.with_device(device, |_| {
            self.idle_events.wait(device, marker, |event| {
                self.api.synchronize_event(event as CUevent)
            })
        })
    }
}
