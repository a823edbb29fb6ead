//! The host store (pinned host memory for backups, kept and reused across sleep/wake cycles)
//! and the copy pipeline that moves allocations between device and host.
//!
//! Copies are queued asynchronously on devmem's own stream per device and waited for once per
//! batch, never one synchronous copy per allocation. This module never changes an allocation's
//! state: the caller decides what a finished or failed batch means.

use parking_lot::Mutex;

use crate::backend::Backend;
use crate::error::Result;

/// Backups are sized in multiples of this, so buffers are reusable across allocation sizes.
const HOST_ROUND: usize = 2 << 20;

/// A pinned host buffer owned by the store or by one allocation's backup.
#[derive(Debug)]
pub struct HostBuffer {
    ptr: usize,
    capacity: usize,
    /// The device whose context allocated it (the memory is portable to every context).
    device: i32,
}

impl HostBuffer {
    /// Start of the buffer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }
}

#[derive(Default)]
struct Store {
    free: Vec<HostBuffer>,
    /// Bytes of pinned host memory the store holds, free or lent to backups.
    held: usize,
}

static STORE: Mutex<Store> = Mutex::new(Store {
    free: Vec::new(),
    held: 0,
});

/// Bytes of pinned host memory the store holds (free buffers plus live backups).
pub fn held_bytes() -> usize {
    STORE.lock().held
}

/// Takes a buffer of at least `len` bytes: the smallest free one that fits without wasting more
/// than its own size, or a fresh one.
pub fn take(backend: &dyn Backend, device: i32, len: usize) -> Result<HostBuffer> {
    {
        let mut store = STORE.lock();
        let best = store
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                b.capacity >= len && b.capacity <= len.saturating_mul(2).max(HOST_ROUND)
            })
            .min_by_key(|(_, b)| b.capacity)
            .map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(store.free.swap_remove(i));
        }
    }
    let capacity = len
        .checked_next_multiple_of(HOST_ROUND)
        .unwrap_or(len)
        .max(HOST_ROUND);
    let ptr = backend.alloc_host(device, capacity)?;
    STORE.lock().held += capacity;
    Ok(HostBuffer {
        ptr: ptr as usize,
        capacity,
        device,
    })
}

/// Returns a buffer to the store for reuse.
pub fn give_back(buffer: HostBuffer) {
    STORE.lock().free.push(buffer);
}

/// Frees every buffer the store holds that no backup is using; returns the bytes freed.
pub fn release_free(backend: &dyn Backend) -> Result<usize> {
    let buffers = std::mem::take(&mut STORE.lock().free);
    let mut freed = 0;
    let mut first_error = None;
    for buffer in buffers {
        match backend.free_host(buffer.device, buffer.as_ptr()) {
            Ok(()) => freed += buffer.capacity,
            Err(err) => {
                // Keep it: a buffer the driver would not free is still valid pinned memory.
                first_error.get_or_insert(err);
                STORE.lock().free.push(buffer);
            }
        }
    }
    STORE.lock().held -= freed;
    match first_error {
        Some(err) => Err(err),
        None => Ok(freed),
    }
}

/// One device range to copy.
#[derive(Debug, Clone, Copy)]
pub struct CopyJob {
    /// Device ordinal.
    pub device: i32,
    /// Device virtual address.
    pub va: u64,
    /// Bytes to copy.
    pub len: usize,
}

fn wait_all(backend: &dyn Backend, jobs: &[CopyJob]) -> Result<()> {
    let mut devices: Vec<i32> = jobs.iter().map(|j| j.device).collect();
    devices.sort_unstable();
    devices.dedup();
    let mut first_error = None;
    for device in devices {
        // Wait on every device even after a failure, so no copy is still running on return.
        if let Err(err) = backend.wait_copies(device) {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Copies every job's device range into a fresh backup buffer. On failure every buffer goes back
/// to the store and the device memory is untouched.
pub fn save_all(backend: &dyn Backend, jobs: &[CopyJob]) -> Result<Vec<HostBuffer>> {
    let mut buffers = Vec::with_capacity(jobs.len());
    let queued = (|| {
        for job in jobs {
            let buffer = take(backend, job.device, job.len)?;
            let dst = buffer.as_ptr();
            buffers.push(buffer);
            backend
                .copy_to_host_async(job.device, dst, job.va, job.len)
                .map_err(|e| e.context(format!("saving {:#x} ({} bytes)", job.va, job.len)))?;
        }
        Ok(())
    })();
    let waited = wait_all(backend, jobs);
    match queued.and(waited) {
        Ok(()) => Ok(buffers),
        Err(err) => {
            buffers.into_iter().for_each(give_back);
            Err(err)
        }
    }
}

/// Copies each backup back to its device range. The backups are left untouched either way.
pub fn restore_all(backend: &dyn Backend, jobs: &[(CopyJob, *const u8)]) -> Result<()> {
    let queued = jobs.iter().try_for_each(|(job, src)| {
        backend
            .copy_to_device_async(job.device, job.va, *src, job.len)
            .map_err(|e| e.context(format!("restoring {:#x} ({} bytes)", job.va, job.len)))
    });
    let plain: Vec<CopyJob> = jobs.iter().map(|(job, _)| *job).collect();
    let waited = wait_all(backend, &plain);
    queued.and(waited)
}
