//! The device-memory backend: one small interface per driver (CUDA now, Level Zero later).
//!
//! Everything above this layer speaks in device ordinals, virtual addresses (`u64`), physical
//! handles (`u64`) and host pointers; it never sees a driver type. A backend must not keep
//! per-allocation state: the registry in `core` owns that.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::Result;

pub mod cuda;

/// What devmem needs from a driver with virtual memory management.
///
/// Every method that touches a device makes that device's context current for the duration of
/// the call when the thread has another one, and leaves the device's primary context current
/// when the thread had none (the context PyTorch's runtime uses).
pub trait Backend: Send + Sync {
    /// A short name for logs and messages ("cuda").
    fn name(&self) -> &'static str;
    /// Number of devices the driver reports.
    fn device_count(&self) -> i32;
    /// The allocation granularity of `device`, with the properties devmem creates memory with.
    fn granularity(&self, device: i32) -> Result<usize>;
    /// Reserves `size` bytes of virtual address space (a multiple of the granularity).
    fn reserve(&self, device: i32, size: usize) -> Result<u64>;
    /// Frees a reservation made by [`reserve`](Self::reserve).
    fn free_va(&self, device: i32, va: u64, size: usize) -> Result<()>;
    /// Creates `size` bytes of physical device memory and returns its handle.
    fn create(&self, device: i32, size: usize) -> Result<u64>;
    /// Releases a physical handle.
    fn release(&self, device: i32, handle: u64) -> Result<()>;
    /// Maps `handle` at `va` (no access yet).
    fn map(&self, device: i32, va: u64, size: usize, handle: u64) -> Result<()>;
    /// Grants `device` read-write access to a mapped range.
    fn set_access(&self, device: i32, va: u64, size: usize) -> Result<()>;
    /// Unmaps a range; the reservation stays.
    fn unmap(&self, device: i32, va: u64, size: usize) -> Result<()>;
    /// Waits until no work queued on `device` (any stream) is still running.
    fn synchronize(&self, device: i32) -> Result<()>;
    /// Queues a device-to-host copy on devmem's own stream for `device`.
    fn copy_to_host_async(&self, device: i32, dst: *mut u8, src: u64, len: usize) -> Result<()>;
    /// Queues a host-to-device copy on devmem's own stream for `device`.
    fn copy_to_device_async(&self, device: i32, dst: u64, src: *const u8, len: usize)
        -> Result<()>;
    /// Waits for every copy queued on devmem's stream for `device`.
    fn wait_copies(&self, device: i32) -> Result<()>;
    /// Free and total device memory in bytes.
    fn mem_get_info(&self, device: i32) -> Result<(usize, usize)>;
    /// Page-locks existing host memory and registers it for copies with every device.
    fn host_register(&self, device: i32, ptr: *mut u8, len: usize) -> Result<()>;
    /// Undoes [`host_register`](Self::host_register).
    fn host_unregister(&self, device: i32, ptr: *mut u8) -> Result<()>;
    /// Records a marker on devmem's copy stream for `device`; returns its id.
    fn record_copy_marker(&self, device: i32) -> Result<u64>;
    /// Waits until every copy queued before the marker has finished, then forgets the marker.
    fn wait_copy_marker(&self, device: i32, marker: u64) -> Result<()>;

    /// Maps an existing handle at `va` and grants access; undoes the mapping if access fails.
    fn map_with_access(&self, device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
        self.map(device, va, size, handle)?;
        if let Err(err) = self.set_access(device, va, size) {
            if let Err(undo) = self.unmap(device, va, size) {
                log::error!("devmem: undoing a mapping at {va:#x} after failed access: {undo}");
            }
            return Err(err);
        }
        Ok(())
    }

    /// Creates physical memory, maps it at `va` and grants access; undoes every step on failure.
    fn create_and_map(&self, device: i32, va: u64, size: usize) -> Result<u64> {
        let handle = self.create(device, size)?;
        if let Err(err) = self.map_with_access(device, va, size, handle) {
            if let Err(undo) = self.release(device, handle) {
                log::error!("devmem: releasing handle {handle:#x} after a failed map: {undo}");
            }
            return Err(err);
        }
        Ok(handle)
    }
}

static BACKEND: Mutex<Option<Arc<dyn Backend>>> = Mutex::new(None);

/// The process-wide backend, loaded on first use. A failed load is not cached, so a caller
/// that fixes its environment can retry.
pub fn get() -> Result<Arc<dyn Backend>> {
    crate::logging::init();
    let mut slot = BACKEND.lock();
    if let Some(backend) = slot.as_ref() {
        return Ok(Arc::clone(backend));
    }
    let backend: Arc<dyn Backend> = Arc::new(cuda::CudaBackend::load()?);
    log::info!(
        "devmem: using the {} backend with {} device(s)",
        backend.name(),
        backend.device_count()
    );
    *slot = Some(Arc::clone(&backend));
    Ok(backend)
}
