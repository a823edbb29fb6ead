//! The CUDA implementation of [`Backend`], on the driver's virtual memory management API.
//!
//! Work happens in each device's primary context (retained once, never released: releasing it
//! at process exit would call into a driver that may be torn down). Physical memory is created
//! with the properties vLLM's allocator uses: pinned device memory, GPUDirect RDMA when the
//! device supports it with VMM, and fabric handles when supported, falling back to POSIX file
//! descriptors and then to no shareable handle when the driver refuses.

use std::ffi::c_int;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute, CUevent, CUevent_flags, CUmemAccessDesc,
    CUmemAccess_flags, CUmemAllocationGranularity_flags, CUmemAllocationHandleType,
    CUmemAllocationProp, CUmemAllocationType, CUmemLocationType, CUstream,
    CU_MEMHOSTREGISTER_PORTABLE,
};
use parking_lot::Mutex;

use super::Backend;
use crate::driver::cuda::{
    CudaApi, CUDA_ERROR_NOT_PERMITTED, CUDA_ERROR_NOT_SUPPORTED, CUDA_SUCCESS,
};
use crate::error::{bail, Result};

/// `CU_STREAM_NON_BLOCKING`: devmem's streams never synchronise with the legacy stream.
const STREAM_NON_BLOCKING: u32 = 1;

/// Shareable-handle types tried in order; a driver that refuses one moves on to the next.
const HANDLE_TYPES: [CUmemAllocationHandleType; 3] = [
    CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_FABRIC,
    CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
    CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
];

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
}

impl DeviceState {
    fn properties(&self) -> CUmemAllocationProp {
        // SAFETY: CUmemAllocationProp is a plain C struct for which all-zero is a valid value
        // (the driver documents zeroed reserved fields).
        let mut prop: CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = self.device;
        prop.requestedHandleTypes = HANDLE_TYPES[self.handle_type.load(Ordering::Relaxed)];
        prop.allocFlags.gpuDirectRDMACapable = u8::from(self.gpu_direct_rdma);
        prop
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
    /// Idle events, reused by copy markers (addresses; raw pointers are not `Send`).
    idle_events: Mutex<Vec<(i32, usize)>>,
}

impl CudaBackend {
    /// Loads the driver and counts its devices.
    pub fn load() -> Result<Self> {
        let api = CudaApi::load()?;
        let mut count: c_int = 0;
        // SAFETY: the out-pointer is valid for one c_int.
        api.check("cuDeviceGetCount", unsafe {
            (api.device_get_count)(&mut count)
        })?;
        let mut version: c_int = 0;
        // SAFETY: the out-pointer is valid for one c_int.
        if unsafe { (api.driver_get_version)(&mut version) } == CUDA_SUCCESS {
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
            idle_events: Mutex::new(Vec::new()),
        })
    }

    fn attribute(&self, device: CUdevice, attr: CUdevice_attribute) -> Result<c_int> {
        let mut value: c_int = 0;
        // SAFETY: the out-pointer is valid; the attribute is a driver enum value.
        let rc = unsafe { (self.api.device_get_attribute)(&mut value, attr, device) };
        self.api.check("cuDeviceGetAttribute", rc)?;
        Ok(value)
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
        let mut device: CUdevice = 0;
        // SAFETY: the out-pointer is valid; the ordinal was range-checked.
        api.check("cuDeviceGet", unsafe {
            (api.device_get)(&mut device, ordinal)
        })?;
        let vmm = self.attribute(
            device,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
        )?;
        if vmm == 0 {
            bail!(
                Unsupported,
                "device {ordinal} does not support virtual memory management"
            );
        }
        let rdma = self.attribute(
            device,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED,
        )? != 0;
        // Older drivers do not know the fabric attribute: treat an error as "not supported".
        let fabric = self
            .attribute(
                device,
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED,
            )
            .unwrap_or(0)
            != 0;
        let mut context: CUcontext = ptr::null_mut();
        // SAFETY: the out-pointer is valid; `device` came from cuDeviceGet.
        api.check("cuDevicePrimaryCtxRetain", unsafe {
            (api.primary_ctx_retain)(&mut context, device)
        })?;
        let mut state = DeviceState {
            ordinal,
            device,
            context: context as usize,
            stream: 0,
            gpu_direct_rdma: rdma,
            handle_type: AtomicUsize::new(if fabric { 0 } else { 1 }),
            granularity: 0,
        };
        let mut stream: CUstream = ptr::null_mut();
        self.in_context(&state, || {
            // SAFETY: the out-pointer is valid and a context is current.
            api.check("cuStreamCreate", unsafe {
                (api.stream_create)(&mut stream, STREAM_NON_BLOCKING)
            })
        })?;
        state.stream = stream as usize;
        state.granularity = self.query_granularity(&state)?;
        log::info!(
            "devmem: device {ordinal}: granularity {} bytes, GPUDirect RDMA {}, handle type {:?}",
            state.granularity,
            rdma,
            HANDLE_TYPES[state.handle_type.load(Ordering::Relaxed)]
        );
        Ok(state)
    }

    fn query_granularity(&self, state: &DeviceState) -> Result<usize> {
        let prop = state.properties();
        let mut granularity = 0usize;
        // SAFETY: both pointers are valid for the call.
        let rc = unsafe {
            (self.api.mem_get_allocation_granularity)(
                &mut granularity,
                &prop,
                CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM as u32,
            )
        };
        self.api.check("cuMemGetAllocationGranularity", rc)?;
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
        let mut previous: CUcontext = ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        api.check("cuCtxGetCurrent", unsafe {
            (api.ctx_get_current)(&mut previous)
        })?;
        let switch = previous != state.context();
        if switch {
            // SAFETY: the context was retained and is never released.
            api.check("cuCtxSetCurrent", unsafe {
                (api.ctx_set_current)(state.context())
            })?;
        }
        let out = f();
        if switch && !previous.is_null() {
            // SAFETY: `previous` was current on this thread a moment ago.
            let rc = unsafe { (api.ctx_set_current)(previous) };
            if let Err(err) = api.check("cuCtxSetCurrent", rc) {
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

impl Backend for CudaBackend {
    fn kind(&self) -> super::devmem_backend {
        super::devmem_backend::Cuda
    }

    fn device_count(&self) -> i32 {
        self.device_count
    }

    fn current_device(&self) -> Option<i32> {
        let mut context: CUcontext = ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        let rc = unsafe { (self.api.ctx_get_current)(&mut context) };
        if rc != CUDA_SUCCESS || context.is_null() {
            return None;
        }
        let mut device: CUdevice = 0;
        // SAFETY: the out-pointer is valid and the thread has a current context.
        let rc = unsafe { (self.api.ctx_get_device)(&mut device) };
        // The driver numbers CUdevice handles by ordinal.
        (rc == CUDA_SUCCESS && (0..self.device_count).contains(&device)).then_some(device)
    }

    fn granularity(&self, device: i32) -> Result<usize> {
        Ok(self.device(device)?.granularity)
    }

    fn reserve(&self, device: i32, size: usize) -> Result<u64> {
        self.with_device(device, |state| {
            let mut va = 0u64;
            // SAFETY: the out-pointer is valid; alignment is the device's granularity.
            let rc =
                unsafe { (self.api.mem_address_reserve)(&mut va, size, state.granularity, 0, 0) };
            self.api.check("cuMemAddressReserve", rc)?;
            Ok(va)
        })
    }

    fn free_va(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `va`/`size` describe a reservation devmem made and no longer maps.
            let rc = unsafe { (self.api.mem_address_free)(va, size) };
            self.api.check("cuMemAddressFree", rc)
        })
    }

    fn create(&self, device: i32, size: usize) -> Result<u64> {
        self.with_device(device, |state| loop {
            let prop = state.properties();
            let mut handle = 0u64;
            // SAFETY: both pointers are valid for the call.
            let rc = unsafe { (self.api.mem_create)(&mut handle, size, &prop, 0) };
            match self.api.check_raw("cuMemCreate", rc) {
                Ok(()) => return Ok(handle),
                Err(e)
                    if e.code == CUDA_ERROR_NOT_PERMITTED || e.code == CUDA_ERROR_NOT_SUPPORTED =>
                {
                    let current = state.handle_type.load(Ordering::Relaxed);
                    if current + 1 >= HANDLE_TYPES.len() {
                        return Err(e.error.context(format!("device {device}, {size} bytes")));
                    }
                    log::info!(
                        "devmem: device {device}: {:?} handles refused ({}); trying {:?}",
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
        self.with_device(device, |_| {
            // SAFETY: the handle came from cuMemCreate and is released once.
            let rc = unsafe { (self.api.mem_release)(handle) };
            self.api.check("cuMemRelease", rc)
        })
    }

    fn map(&self, device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: the range lies in a reservation devmem owns and is currently unmapped.
            let rc = unsafe { (self.api.mem_map)(va, size, 0, handle, 0) };
            self.api.check("cuMemMap", rc)
        })
    }

    fn set_access(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: plain C struct; all-zero is valid.
            let mut desc: CUmemAccessDesc = unsafe { std::mem::zeroed() };
            desc.location.type_ = CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
            desc.location.id = state.device;
            desc.flags = CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
            // SAFETY: the range is mapped; one descriptor is passed.
            let rc = unsafe { (self.api.mem_set_access)(va, size, &desc, 1) };
            self.api.check("cuMemSetAccess", rc)
        })
    }

    fn unmap(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: the range was mapped by devmem; callers synchronised the device first.
            let rc = unsafe { (self.api.mem_unmap)(va, size) };
            self.api.check("cuMemUnmap", rc)
        })
    }

    fn synchronize(&self, device: i32) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: a context is current.
            let rc = unsafe { (self.api.ctx_synchronize)() };
            self.api.check("cuCtxSynchronize", rc)
        })
    }

    fn copy_to_host_async(&self, device: i32, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: `dst` is pinned host memory of at least `len` bytes that stays alive until
            // `wait_copies`; `src` is a mapped device range of at least `len` bytes.
            let rc = unsafe { (self.api.memcpy_dtoh_async)(dst.cast(), src, len, state.stream()) };
            self.api.check("cuMemcpyDtoHAsync", rc)
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
            let rc = unsafe { (self.api.memcpy_htod_async)(dst, src.cast(), len, state.stream()) };
            self.api.check("cuMemcpyHtoDAsync", rc)
        })
    }

    fn wait_copies(&self, device: i32) -> Result<()> {
        self.with_device(device, |state| {
            // SAFETY: the stream was created by devmem and is never destroyed.
            let rc = unsafe { (self.api.stream_synchronize)(state.stream()) };
            self.api.check("cuStreamSynchronize", rc)
        })
    }

    fn mem_get_info(&self, device: i32) -> Result<(usize, usize)> {
        self.with_device(device, |_| {
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: both out-pointers are valid.
            let rc = unsafe { (self.api.mem_get_info)(&mut free, &mut total) };
            self.api.check("cuMemGetInfo", rc)?;
            Ok((free, total))
        })
    }

    fn host_register(&self, device: i32, ptr: *mut u8, len: usize) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `ptr..ptr+len` is host memory devmem mapped and owns.
            let rc = unsafe {
                (self.api.mem_host_register)(ptr.cast(), len, CU_MEMHOSTREGISTER_PORTABLE)
            };
            self.api
                .check("cuMemHostRegister", rc)
                .map_err(|e| e.context(format!("registering {len} bytes of host memory")))
        })
    }

    fn host_unregister(&self, device: i32, ptr: *mut u8) -> Result<()> {
        self.with_device(device, |_| {
            // SAFETY: `ptr` was registered by `host_register` and is unregistered once.
            let rc = unsafe { (self.api.mem_host_unregister)(ptr.cast()) };
            self.api.check("cuMemHostUnregister", rc)
        })
    }

    fn record_copy_marker(&self, device: i32) -> Result<u64> {
        self.with_device(device, |state| {
            let reused = {
                let mut idle = self.idle_events.lock();
                let at = idle.iter().position(|(d, _)| *d == device);
                at.map(|i| idle.swap_remove(i).1)
            };
            let event = match reused {
                Some(event) => event as CUevent,
                None => {
                    let mut event: CUevent = ptr::null_mut();
                    // SAFETY: the out-pointer is valid and a context is current.
                    let rc = unsafe {
                        (self.api.event_create)(
                            &mut event,
                            CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
                        )
                    };
                    self.api.check("cuEventCreate", rc)?;
                    event
                }
            };
            // SAFETY: the event and stream belong to this device's context.
            let rc = unsafe { (self.api.event_record)(event, state.stream()) };
            if let Err(err) = self.api.check("cuEventRecord", rc) {
                self.idle_events.lock().push((device, event as usize));
                return Err(err);
            }
            Ok(event as u64)
        })
    }

    fn wait_copy_marker(&self, device: i32, marker: u64) -> Result<()> {
        self.with_device(device, |_| {
            let event = marker as usize as CUevent;
            // SAFETY: the event came from `record_copy_marker`.
            let rc = unsafe { (self.api.event_synchronize)(event) };
            self.idle_events.lock().push((device, event as usize));
            self.api.check("cuEventSynchronize", rc)
        })
    }
}
