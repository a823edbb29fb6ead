//! The C ABI: every exported function. This is the only layer that touches caller-provided raw
//! pointers; each function checks its arguments, runs its body inside a panic guard, and
//! reports failure as a status plus a thread-local message. Nothing here panics across the
//! boundary or ends the process.
//!
//! The exports take raw pointers yet are not `unsafe fn`: they are C entry points whose pointer
//! contracts are documented in the header, and each checks what it can (NULL) before use.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_char, c_int, c_ulonglong, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use crate::core::{
    self, devmem_allocation_callback, devmem_allocation_info, devmem_backend, devmem_host_policy,
    devmem_read_only, devmem_residual, devmem_stats, devmem_transfer,
    DEVMEM_MAX_TAG_LEN as MAX_TAG_LEN,
};
use crate::error::{
    bail, clear_last_error, devmem_status, last_error, set_last_error, Error, Result,
};

/// The C `ssize_t` (signed size), as PyTorch's pluggable-allocator signatures use it.
#[allow(non_camel_case_types)]
pub type ssize_t = isize;

fn panic_error(payload: &(dyn std::any::Any + Send)) -> Error {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    Error::new(
        devmem_status::Panic,
        format!("internal panic caught at the C boundary: {what}"),
    )
}

/// Runs `f` with a fresh last-error slot; a failure or a caught panic is recorded there.
fn run<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    clear_last_error();
    let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_error(&*p)));
    if let Err(err) = &result {
        set_last_error(err);
    }
    result
}

/// Runs `f`; on failure returns `on_error` (NULL, say) with the message recorded.
fn guard_value<T>(on_error: T, f: impl FnOnce() -> Result<T>) -> T {
    run(f).unwrap_or(on_error)
}

/// Runs `f` and turns its outcome into a status.
fn guard(f: impl FnOnce() -> Result<()>) -> devmem_status {
    run(f).map_or_else(|e| e.status, |()| devmem_status::Success)
}

/// Writes `value` through `out` after checking it is not NULL.
///
/// # Safety
/// `out` must be NULL or valid for a write of `T`.
unsafe fn write_out<T>(out: *mut T, name: &str, value: T) -> Result<()> {
    if out.is_null() {
        bail!(NullPointer, "{name} is NULL");
    }
    // SAFETY: non-NULL, and the caller promises it is valid for a write.
    unsafe { out.write(value) };
    Ok(())
}

/// Reads a tag: NUL-terminated UTF-8 of 1 to `MAX_TAG_LEN` bytes.
///
/// # Safety
/// `tag` must be NULL or point to a NUL-terminated string.
unsafe fn tag_from_c(tag: *const c_char, what: &str) -> Result<String> {
    if tag.is_null() {
        bail!(InvalidTag, "{what} is NULL");
    }
    // SAFETY: `tag` is non-NULL and NUL-terminated; strnlen reads no further than the NUL or
    // MAX_TAG_LEN + 1 bytes.
    let len = unsafe { libc::strnlen(tag, MAX_TAG_LEN + 1) };
    if len > MAX_TAG_LEN {
        bail!(InvalidTag, "{what} is longer than {MAX_TAG_LEN} bytes");
    }
    // SAFETY: `len` bytes were just scanned and are readable.
    let bytes = unsafe { std::slice::from_raw_parts(tag.cast::<u8>(), len) };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::new(
            devmem_status::InvalidTag,
            format!("{what} is not UTF-8: {e}"),
        )
    })?;
    core::validate_tag_named(text, what)?;
    Ok(text.to_string())
}

/// Reads an array of `n` tags.
///
/// # Safety
/// `tags` must be NULL or point to `n` pointers, each NULL or NUL-terminated.
unsafe fn tags_from_c(tags: *const *const c_char, n: usize) -> Result<Vec<String>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if tags.is_null() {
        bail!(NullPointer, "tags is NULL but n is {n}");
    }
    (0..n)
        .map(|i| {
            // SAFETY: the caller promises `n` readable pointers.
            let tag = unsafe { *tags.add(i) };
            // SAFETY: each entry is NULL or NUL-terminated.
            unsafe { tag_from_c(tag, &format!("tags[{i}]")) }
        })
        .collect()
}

fn device_from(device: c_int) -> Result<i32> {
    if device < 0 {
        bail!(InvalidDevice, "device {device} is negative");
    }
    Ok(device)
}

fn size_from(size: ssize_t) -> Result<usize> {
    match usize::try_from(size) {
        Ok(0) => bail!(
            InvalidArgument,
            "size 0: devmem does not make empty allocations"
        ),
        Ok(s) => Ok(s),
        Err(_) => bail!(InvalidArgument, "size {size} is negative"),
    }
}

// ---------------------------------------------------------------------------------------------
// PyTorch / vLLM compatible
// ---------------------------------------------------------------------------------------------

/// Allocates `size` bytes on `device` under the calling thread's tag (PyTorch's
/// `CUDAPluggableAllocator` / `XPUPluggableAllocator` signature). `stream` is not used.
///
/// Returns the device address, or NULL on failure (see `devmem_last_error_message`).
#[no_mangle]
pub extern "C" fn my_malloc(size: ssize_t, device: c_int, stream: *mut c_void) -> *mut c_void {
    let _ = stream;
    guard_value(ptr::null_mut(), || {
        let size = size_from(size)?;
        let device = device_from(device)?;
        core::malloc(size, device).map(|va| va as *mut c_void)
    })
}

/// Frees an allocation made by `my_malloc`, in any state. The recorded size is used; `size`,
/// `device` and `stream` are ignored. Unknown pointers and double frees are counted in
/// `devmem_stats` and leave a message; they never crash.
#[no_mangle]
pub extern "C" fn my_free(ptr: *mut c_void, size: ssize_t, device: c_int, stream: *mut c_void) {
    let _ = (size, device, stream);
    guard(|| {
        if ptr.is_null() {
            bail!(NullPointer, "ptr is NULL");
        }
        core::free(ptr as u64)
    });
}

fn low_level_args(device: c_ulonglong, size: ssize_t, d_mem: c_ulonglong) -> Result<(i32, usize)> {
    let device = match i32::try_from(device) {
        Ok(d) => d,
        Err(_) => bail!(InvalidDevice, "device {device} is out of range"),
    };
    let size = size_from(size)?;
    if d_mem == 0 {
        bail!(NullPointer, "d_mem is 0");
    }
    let granularity = core::granularity(device)?;
    if size % granularity != 0 || d_mem % granularity as u64 != 0 {
        bail!(
            InvalidArgument,
            "size {size} and d_mem {d_mem:#x} must be multiples of the granularity ({granularity})"
        );
    }
    Ok((device, size))
}

/// vLLM's primitive: creates `size` bytes of physical memory on `device`, maps it at `d_mem`
/// (inside a range the caller reserved) with read-write access, and writes the physical handle
/// to `*handle`. The allocation is not tracked by devmem's registry. Returns a
/// `devmem_status` as an int; callers that declare it `void` still work. This is vLLM's CUDA
/// form on every backend: where physical memory is chunked (HIP), `*handle` is devmem's id for
/// the chunks, which `unmap_and_release` takes back.
#[no_mangle]
pub extern "C" fn create_and_map(
    device: c_ulonglong,
    size: ssize_t,
    d_mem: c_ulonglong,
    handle: *mut c_ulonglong,
) -> c_int {
    guard(|| {
        if handle.is_null() {
            bail!(NullPointer, "handle is NULL");
        }
        let (device, size) = low_level_args(device, size, d_mem)?;
        let created = core::create_and_map_untracked(device, d_mem, size)?;
        // SAFETY: checked non-NULL above; the caller passes a valid out-pointer.
        unsafe { handle.write(created) };
        Ok(())
    }) as c_int
}

/// vLLM's primitive: waits for `device` (the scope of `devmem_free`), unmaps `size` bytes at `d_mem` and releases `*handle`
/// (the reservation stays). Returns a `devmem_status` as an int.
#[no_mangle]
pub extern "C" fn unmap_and_release(
    device: c_ulonglong,
    size: ssize_t,
    d_mem: c_ulonglong,
    handle: *mut c_ulonglong,
) -> c_int {
    guard(|| {
        if handle.is_null() {
            bail!(NullPointer, "handle is NULL");
        }
        let (device, size) = low_level_args(device, size, d_mem)?;
        // SAFETY: checked non-NULL above.
        let physical = unsafe { handle.read() };
        core::unmap_and_release_untracked(device, d_mem, size, physical)
    }) as c_int
}

// ---------------------------------------------------------------------------------------------
// Native API
// ---------------------------------------------------------------------------------------------

/// Allocates `size` bytes on `device` under the calling thread's tag and writes the address to
/// `*out` (only on success).
#[no_mangle]
pub extern "C" fn devmem_malloc(
    size: usize,
    device: c_int,
    out: *mut *mut c_void,
) -> devmem_status {
    guard(|| {
        if out.is_null() {
            bail!(NullPointer, "out is NULL");
        }
        let device = device_from(device)?;
        let va = core::malloc(size, device)?;
        // SAFETY: checked non-NULL; the caller passes a valid out-pointer.
        unsafe { write_out(out, "out", va as *mut c_void) }
    })
}

/// Frees an allocation in any state (mapped, offloaded, discarded). A mapped allocation is
/// unmapped only after the device is idle: CUDA waits for every stream of the device's primary
/// context (`cuCtxSynchronize`; work the application queued in contexts it created itself is
/// not waited for); Level Zero, which has no device-wide wait, waits for devmem's own copies
/// only, so the caller must have finished its queues.
#[no_mangle]
pub extern "C" fn devmem_free(ptr: *mut c_void) -> devmem_status {
    guard(|| {
        if ptr.is_null() {
            bail!(NullPointer, "ptr is NULL");
        }
        core::free(ptr as u64)
    })
}

/// Gives the device memory of the allocation starting at `ptr` back to the driver for good,
/// keeping its address range reserved until `devmem_free(ptr)`, so nothing else can be placed
/// there. For a caching allocator's free segment that it will never hand out again (vLLM trims
/// the pools it no longer allocates from this way). A trimmed allocation leaves lookups,
/// iteration, statistics, sleep and wake; `on_free` is called now, not at the later free.
/// Writes the device bytes released to `*freed` when `freed` is not NULL.
/// `DEVMEM_STATUS_INVALID_STATE` when `ptr` was already trimmed.
#[no_mangle]
pub extern "C" fn devmem_trim(ptr: *mut c_void, freed: *mut usize) -> devmem_status {
    guard(|| {
        if ptr.is_null() {
            bail!(NullPointer, "ptr is NULL");
        }
        let n = core::trim(ptr as u64)?;
        if !freed.is_null() {
            // SAFETY: checked non-NULL above.
            unsafe { write_out(freed, "freed", n) }?;
        }
        Ok(())
    })
}

/// Writes to `*out` the host address holding the saved bytes `[ptr, ptr+len)` of an offloaded
/// allocation, or NULL when the allocation containing `ptr` is not offloaded (mapped or
/// discarded). The address stays valid until the allocation is woken or freed; reading it
/// after that is undefined. `DEVMEM_STATUS_UNSUPPORTED` when the range is split across host
/// chunks (use `devmem_copy_backup`), `DEVMEM_STATUS_INVALID_ARGUMENT` when the range is empty
/// or leaves the allocation.
#[no_mangle]
pub extern "C" fn devmem_backup_pointer(
    ptr: *const c_void,
    len: usize,
    out: *mut *mut c_void,
) -> devmem_status {
    guard(|| {
        if ptr.is_null() || out.is_null() {
            bail!(NullPointer, "ptr and out must not be NULL");
        }
        let host = core::backup_pointer(ptr as u64, len)?;
        let host = host.map_or(ptr::null_mut(), |h| h as *mut c_void);
        // SAFETY: checked non-NULL above.
        unsafe { write_out(out, "out", host) }
    })
}

/// Copies the saved bytes `[ptr, ptr+len)` of an offloaded allocation into `dst` (`len` bytes
/// of host memory) and writes 1 to `*copied`; writes 0 and copies nothing when the allocation
/// containing `ptr` is not offloaded.
#[no_mangle]
pub extern "C" fn devmem_copy_backup(
    ptr: *const c_void,
    len: usize,
    dst: *mut c_void,
    copied: *mut c_int,
) -> devmem_status {
    guard(|| {
        if ptr.is_null() || dst.is_null() || copied.is_null() {
            bail!(NullPointer, "ptr, dst and copied must not be NULL");
        }
        // SAFETY: the caller passes `len` writable bytes at `dst`.
        let done = unsafe { core::copy_backup(ptr as u64, len, dst.cast::<u8>()) }?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(copied, "copied", c_int::from(done)) }
    })
}

/// Sets the calling thread's tag: later allocations from this thread carry it. Tags are UTF-8,
/// 1 to `DEVMEM_MAX_TAG_LEN` bytes. Threads that never set one use `"default"`.
#[no_mangle]
pub extern "C" fn devmem_set_current_tag(tag: *const c_char) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let tag = unsafe { tag_from_c(tag, "tag") }?;
        core::set_current_tag(&tag)
    })
}

/// Copies the calling thread's tag, NUL-terminated, into `buf` of `len` bytes.
/// `DEVMEM_STATUS_BUFFER_TOO_SMALL` when it does not fit (`DEVMEM_MAX_TAG_LEN + 1` always does).
#[no_mangle]
pub extern "C" fn devmem_get_current_tag(buf: *mut c_char, len: usize) -> devmem_status {
    guard(|| {
        if buf.is_null() {
            bail!(NullPointer, "buf is NULL");
        }
        let tag = core::current_tag();
        if tag.len() + 1 > len {
            bail!(
                BufferTooSmall,
                "the tag needs {} bytes; buf has {len}",
                tag.len() + 1
            );
        }
        // SAFETY: `buf` has room for the tag and its NUL, checked above.
        unsafe {
            ptr::copy_nonoverlapping(tag.as_ptr(), buf.cast::<u8>(), tag.len());
            buf.add(tag.len()).write(0);
        }
        Ok(())
    })
}

/// Puts every mapped allocation to sleep: those whose tag is among the `n` `offload_tags` are
/// copied to host memory first, all others are discarded. With `n == 0` everything is
/// discarded. Allocations already asleep are left as they are. Waits for the devices first
/// (the same scope as `devmem_free`: CUDA's primary context, Level Zero's devmem copies).
/// Fails with `DEVMEM_STATUS_HOST_OUT_OF_MEMORY`, having released nothing, when the backups do
/// not fit the bound on host memory (`devmem_set_host_limit`). What was done is available from `devmem_get_last_transfer`.
#[no_mangle]
pub extern "C" fn devmem_sleep(offload_tags: *const *const c_char, n: usize) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n` tag pointers (or NULL with n == 0).
        let tags = unsafe { tags_from_c(offload_tags, n) }?;
        core::sleep(&tags).map(drop)
    })
}

/// Saves to host memory and releases the mapped allocations of the `n` listed tags only.
#[no_mangle]
pub extern "C" fn devmem_offload(tags: *const *const c_char, n: usize) -> devmem_status {
    guard(|| {
        // SAFETY: as in devmem_sleep.
        let tags = unsafe { tags_from_c(tags, n) }?;
        core::offload_tags(&tags).map(drop)
    })
}

/// Releases the mapped allocations of the `n` listed tags only, dropping their contents.
#[no_mangle]
pub extern "C" fn devmem_discard(tags: *const *const c_char, n: usize) -> devmem_status {
    guard(|| {
        // SAFETY: as in devmem_sleep.
        let tags = unsafe { tags_from_c(tags, n) }?;
        core::discard_tags(&tags).map(drop)
    })
}

/// Wakes the sleeping allocations of the `n` listed tags (every tag when `tags` is NULL): maps
/// device memory at the same addresses and restores saved bytes. Contents of discarded
/// allocations are unspecified. On failure (`DEVMEM_STATUS_OUT_OF_MEMORY` when the device is
/// full) the mappings made by this call are undone, every backup is kept, and the call can be
/// retried.
#[no_mangle]
pub extern "C" fn devmem_wake_up(tags: *const *const c_char, n: usize) -> devmem_status {
    guard(|| {
        if tags.is_null() {
            return core::wake_up(None).map(drop);
        }
        // SAFETY: the caller passes `n` tag pointers.
        let tags = unsafe { tags_from_c(tags, n) }?;
        core::wake_up(Some(&tags)).map(drop)
    })
}

/// In one pass (one device synchronisation, discards released while the copies run): saves
/// and releases the mapped allocations whose tag is among the `n_offload` tags in `offload`,
/// releases those among the `n_discard` tags in `discard` without saving them, and leaves
/// every other allocation mapped. A tag in both lists is `DEVMEM_STATUS_INVALID_ARGUMENT`.
#[no_mangle]
pub extern "C" fn devmem_sleep_tags(
    offload: *const *const c_char,
    n_offload: usize,
    discard: *const *const c_char,
    n_discard: usize,
) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n_offload` tag pointers (or 0).
        let keep = unsafe { tags_from_c(offload, n_offload) }?;
        // SAFETY: the caller passes `n_discard` tag pointers (or 0).
        let release = unsafe { tags_from_c(discard, n_discard) }?;
        core::sleep_tags(&keep, &release).map(drop)
    })
}

/// Wakes every sleeping allocation whose tag is *not* among the `n` tags in `deferred` (all of
/// them when `n` is 0), as `devmem_wake_up` does: vLLM's rule that a wake restores every tag
/// except the deferrable ones (weights, KV cache) it was not asked for.
#[no_mangle]
pub extern "C" fn devmem_wake_up_except(deferred: *const *const c_char, n: usize) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n` tag pointers (or n == 0).
        let tags = unsafe { tags_from_c(deferred, n) }?;
        core::wake_up_except(&tags).map(drop)
    })
}

/// Writes what the last sleep, offload, discard or wake (from any thread) did to `*out`.
#[no_mangle]
pub extern "C" fn devmem_get_last_transfer(out: *mut devmem_transfer) -> devmem_status {
    // SAFETY: the caller passes NULL or a valid out-pointer.
    guard(|| unsafe { write_out(out, "out", core::last_transfer()) })
}

/// Writes statistics for `tag` (every tag together when `tag` is NULL) to `*out`. A tag with no
/// allocations yet reports zeros.
#[no_mangle]
pub extern "C" fn devmem_get_stats(tag: *const c_char, out: *mut devmem_stats) -> devmem_status {
    guard(|| {
        if out.is_null() {
            bail!(NullPointer, "out is NULL");
        }
        let tag = if tag.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated by contract.
            Some(unsafe { tag_from_c(tag, "tag") }?)
        };
        let stats = core::stats(tag.as_deref())?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(out, "out", stats) }
    })
}

/// Writes the free and total memory of `device` in bytes, as the driver reports them.
#[no_mangle]
pub extern "C" fn devmem_mem_get_info(
    device: c_int,
    free: *mut usize,
    total: *mut usize,
) -> devmem_status {
    guard(|| {
        if free.is_null() || total.is_null() {
            bail!(NullPointer, "free and total must not be NULL");
        }
        let (f, t) = core::mem_get_info(device_from(device)?)?;
        // SAFETY: both checked non-NULL above.
        unsafe {
            free.write(f);
            total.write(t);
        }
        Ok(())
    })
}

/// Writes the allocation granularity of `device` (sizes are rounded up to it).
#[no_mangle]
pub extern "C" fn devmem_granularity(device: c_int, out: *mut usize) -> devmem_status {
    guard(|| {
        if out.is_null() {
            bail!(NullPointer, "out is NULL");
        }
        let granularity = core::granularity(device_from(device)?)?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(out, "out", granularity) }
    })
}

/// Writes the number of devices the driver reports.
#[no_mangle]
pub extern "C" fn devmem_device_count(out: *mut c_int) -> devmem_status {
    guard(|| {
        if out.is_null() {
            bail!(NullPointer, "out is NULL");
        }
        let count = core::device_count()?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(out, "out", count) }
    })
}

/// Describes the live allocation that contains `ptr` (any address inside it).
#[no_mangle]
pub extern "C" fn devmem_get_allocation_info(
    ptr: *const c_void,
    out: *mut devmem_allocation_info,
) -> devmem_status {
    guard(|| {
        if ptr.is_null() || out.is_null() {
            bail!(NullPointer, "ptr and out must not be NULL");
        }
        let info = core::lookup(ptr as u64)?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(out, "out", info) }
    })
}

/// Lists the physical memory mapped for the allocation containing `ptr`: the driver handle and
/// size of each chunk, in address order (one chunk unless the backend chunks physical memory:
/// HIP by default, `DEVMEM_CHUNK_SIZE`; allocations of 1 GiB or more on CUDA and HIP,
/// `DEVMEM_WAKE_CHUNK_MB`). Writes the number of chunks to `*count` (0 while the
/// allocation is asleep) and, when `capacity` is at least that, the chunks to `handles[i]` and
/// `sizes[i]`; with less room returns `DEVMEM_STATUS_BUFFER_TOO_SMALL` having written only
/// `*count`. `handles` and `sizes` may be NULL when `capacity` is 0.
#[no_mangle]
pub extern "C" fn devmem_get_allocation_chunks(
    ptr: *const c_void,
    handles: *mut c_ulonglong,
    sizes: *mut usize,
    capacity: usize,
    count: *mut usize,
) -> devmem_status {
    guard(|| {
        if ptr.is_null() || count.is_null() {
            bail!(NullPointer, "ptr and count must not be NULL");
        }
        if capacity > 0 && (handles.is_null() || sizes.is_null()) {
            bail!(
                NullPointer,
                "handles and sizes must not be NULL when capacity is {capacity}"
            );
        }
        let chunks = core::chunks(ptr as u64)?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(count, "count", chunks.len())? };
        if chunks.len() > capacity {
            bail!(
                BufferTooSmall,
                "the allocation has {} chunks; capacity is {capacity}",
                chunks.len()
            );
        }
        for (i, (handle, size)) in chunks.into_iter().enumerate() {
            // SAFETY: the caller passes arrays of `capacity` elements, and i < capacity.
            unsafe {
                handles.add(i).write(handle);
                sizes.add(i).write(size);
            }
        }
        Ok(())
    })
}

/// Calls `callback` once per live allocation, in address order, on a snapshot taken at the
/// start; no devmem lock is held during the calls, so the callback may call devmem. Writes the
/// number of allocations visited to `*count` when `count` is not NULL.
#[no_mangle]
pub extern "C" fn devmem_for_each_allocation(
    callback: devmem_allocation_callback,
    user_data: *mut c_void,
    count: *mut usize,
) -> devmem_status {
    guard(|| {
        let Some(callback) = callback else {
            bail!(NullPointer, "callback is NULL");
        };
        let all = core::snapshot();
        for info in &all {
            // SAFETY: the caller's function with its documented signature; `info` is valid for
            // the call.
            unsafe { callback(info, user_data) };
        }
        if !count.is_null() {
            // SAFETY: non-NULL; the caller passes a valid out-pointer.
            unsafe { count.write(all.len()) };
        }
        Ok(())
    })
}

/// Installs callbacks run after each allocation (`on_alloc`) and before each free (`on_free`),
/// on the allocating or freeing thread, with no devmem lock held. Either may be NULL; call
/// with both NULL to remove them.
#[no_mangle]
pub extern "C" fn devmem_set_callbacks(
    on_alloc: devmem_allocation_callback,
    on_free: devmem_allocation_callback,
    user_data: *mut c_void,
) -> devmem_status {
    guard(|| {
        core::set_callbacks(on_alloc, on_free, user_data);
        Ok(())
    })
}

/// Frees the pinned host buffers the host store keeps for reuse (backups still in use stay).
/// Writes the bytes freed to `*freed` when it is not NULL.
#[no_mangle]
pub extern "C" fn devmem_release_host_store(freed: *mut usize) -> devmem_status {
    guard(|| {
        let bytes = core::release_host_store()?;
        if !freed.is_null() {
            // SAFETY: non-NULL; the caller passes a valid out-pointer.
            unsafe { freed.write(bytes) };
        }
        Ok(())
    })
}

/// Sets what happens to the host store (the pinned host memory holding backups) after each
/// wake: `DEVMEM_HOST_POLICY_KEEP` (default; reused by the next sleep) or
/// `DEVMEM_HOST_POLICY_RELEASE` (freed, so host memory use returns to where it was). The
/// environment variable `DEVMEM_HOST_POLICY=keep|release` sets the initial policy.
#[no_mangle]
pub extern "C" fn devmem_set_host_policy(policy: c_int) -> devmem_status {
    guard(|| match devmem_host_policy::from_repr(policy) {
        Some(p) => {
            core::set_host_policy(p);
            Ok(())
        }
        None => bail!(
            InvalidArgument,
            "host policy {policy} is not a devmem_host_policy value"
        ),
    })
}

/// Writes the current host-store policy to `*out`.
#[no_mangle]
pub extern "C" fn devmem_get_host_policy(out: *mut devmem_host_policy) -> devmem_status {
    // SAFETY: the caller passes NULL or a valid out-pointer.
    guard(|| unsafe { write_out(out, "out", core::host_policy()) })
}

/// Grows the host store until `bytes` of pinned host memory are free for backups, so the first
/// sleep runs as fast as later ones. The memory is prepared in the background; with `wait`
/// non-zero the call returns once it is ready (or failed).
#[no_mangle]
pub extern "C" fn devmem_reserve_host_store(bytes: usize, wait: c_int) -> devmem_status {
    guard(|| core::reserve_host_store(bytes, wait != 0))
}

/// Turns growing the host store ahead of need on (`enabled` = 1, the default) or off (0).
/// While on, the store grows in the background, at idle CPU priority and within the bound on
/// host memory, toward the bytes of all live allocations, so the first sleep finds its pinned
/// host memory ready; turning it off stops further growth (memory already grown stays until
/// `devmem_release_host_store`). The environment variable `DEVMEM_HOST_GROW_AHEAD=0|1` sets the
/// initial value. Any other `enabled` is `DEVMEM_STATUS_INVALID_ARGUMENT`.
#[no_mangle]
pub extern "C" fn devmem_set_host_grow_ahead(enabled: c_int) -> devmem_status {
    guard(|| match enabled {
        0 | 1 => {
            core::set_host_grow_ahead(enabled == 1);
            Ok(())
        }
        _ => bail!(
            InvalidArgument,
            "enabled is {enabled}: pass 1 to grow the host store ahead of need, 0 not to"
        ),
    })
}

/// Writes 1 to `*out` when the host store grows ahead of need, else 0.
#[no_mangle]
pub extern "C" fn devmem_get_host_grow_ahead(out: *mut c_int) -> devmem_status {
    // SAFETY: the caller passes NULL or a valid out-pointer.
    guard(|| unsafe { write_out(out, "out", c_int::from(core::host_grow_ahead())) })
}

/// Writes to `*out` what device memory `device` still uses, by cause: devmem's mapped bytes
/// (0 after a sleep of every tag), devmem's other device memory (0 normally), the driver's
/// used bytes (total minus free) and the rest (used minus devmem's: the context, other
/// allocators, other processes). Call it after a sleep to see what was left behind.
#[no_mangle]
pub extern "C" fn devmem_get_residual(device: c_int, out: *mut devmem_residual) -> devmem_status {
    guard(|| {
        if out.is_null() {
            bail!(NullPointer, "out is NULL");
        }
        let residual = core::residual(device)?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(out, "out", residual) }
    })
}

/// Caps the pinned host memory the host store may hold at `bytes` (0 removes the cap, and
/// `DEVMEM_HOST_LIMIT` with it). A sleep or reservation that would need more fails with
/// `DEVMEM_STATUS_HOST_OUT_OF_MEMORY` before any host memory is touched and before anything is
/// released. Independently of the cap, devmem never grows the store past what `MemAvailable`
/// and the process's memory cgroup allow (docs/guarantees.md).
#[no_mangle]
pub extern "C" fn devmem_set_host_limit(bytes: u64) -> devmem_status {
    guard(|| {
        core::set_host_limit(bytes);
        Ok(())
    })
}

/// Writes the cap on the host store to `*out` (0: no cap). Fails with
/// `DEVMEM_STATUS_INVALID_ARGUMENT` when `DEVMEM_HOST_LIMIT` is set but not a size.
#[no_mangle]
pub extern "C" fn devmem_get_host_limit(out: *mut u64) -> devmem_status {
    guard(|| {
        let limit = core::host_limit()?;
        // SAFETY: the caller passes NULL or a valid out-pointer.
        unsafe { write_out(out, "out", limit) }
    })
}

/// `devmem_shared_store_options.flags`: leave the region in place when the last process
/// closes it, so a later process can restore from it (durable sleep).
pub const DEVMEM_SHARED_KEEP: u32 = 1;
/// `devmem_shared_store_options.flags`: when a left-over region has another layout and no
/// process uses it, remove it and create a new one (without it, that is an error).
pub const DEVMEM_SHARED_RECLAIM: u32 = 2;

/// Where and how large the shared host store is (`devmem_shared_store_open`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct devmem_shared_store_options {
    /// The instance's name: 1 to 128 bytes of printable ASCII, no `/`, no `..`. Every process
    /// of one instance passes the same name. The file is `<dir>/devmem-<name>.region`.
    pub name: *const c_char,
    /// The directory holding the region; NULL for this user's private directory
    /// `/dev/shm/devmem-<uid>` (mode 0700, created when missing).
    pub dir: *const c_char,
    /// Bytes of backups each rank can hold (rounded up to 2 MiB).
    pub bytes_per_rank: u64,
    /// This process's rank, below `world`.
    pub rank: u32,
    /// Processes sharing the region (every one passes the same value).
    pub world: u32,
    /// `DEVMEM_SHARED_KEEP` and/or `DEVMEM_SHARED_RECLAIM`.
    pub flags: u32,
    /// How long to wait for another process that is creating the region, in milliseconds;
    /// 0 for the default (30 s).
    pub timeout_ms: u32,
}

/// Opens the shared host store, creating it when this process is the first of its instance:
/// backups of later sleeps go to this rank's area of the region instead of private memory. The
/// area is reserved, populated and pinned before this returns (`HOST_OUT_OF_MEMORY` when the
/// host or `/dev/shm` has no room). The region is refused with `DEVMEM_STATUS_REGION` when it
/// belongs to another user, has another mode than 0600, is a symbolic link, has a corrupt
/// header or another layout, or the rank is taken. `DEVMEM_SHARED_STORE` and its companion
/// variables open one at the first sleep instead (docs/shared-store.md).
#[no_mangle]
pub extern "C" fn devmem_shared_store_open(
    options: *const devmem_shared_store_options,
) -> devmem_status {
    guard(|| {
        if options.is_null() {
            bail!(NullPointer, "options is NULL");
        }
        // SAFETY: checked non-NULL; the caller passes a valid struct.
        let o = unsafe { *options };
        if o.name.is_null() {
            bail!(NullPointer, "options.name is NULL");
        }
        if o.flags & !(DEVMEM_SHARED_KEEP | DEVMEM_SHARED_RECLAIM) != 0 {
            bail!(
                InvalidArgument,
                "options.flags {:#x} has unknown bits",
                o.flags
            );
        }
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let name = unsafe { CStr::from_ptr(o.name) }
            .to_str()
            .map_err(|_| Error::new(devmem_status::InvalidArgument, "options.name is not UTF-8"))?;
        let dir = if o.dir.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated per the contract.
            let bytes = unsafe { CStr::from_ptr(o.dir) }.to_bytes();
            use std::os::unix::ffi::OsStrExt;
            Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
        };
        let timeout = if o.timeout_ms == 0 {
            crate::store::shared::DEFAULT_TIMEOUT
        } else {
            std::time::Duration::from_millis(u64::from(o.timeout_ms))
        };
        core::open_shared_store(&crate::store::shared::Options {
            name: name.to_string(),
            dir,
            bytes_per_rank: o.bytes_per_rank,
            rank: o.rank,
            world: o.world,
            keep: o.flags & DEVMEM_SHARED_KEEP != 0,
            reclaim: o.flags & DEVMEM_SHARED_RECLAIM != 0,
            timeout,
        })
    })
}

/// Leaves the shared host store: later backups go to private memory again. Backups already in
/// the region stay valid for this process. The last process to leave removes the file unless
/// the region is kept. A process that exits without calling this leaves the file behind for
/// the next instance, which reuses (kept) or reclaims (not kept) it. After a close, a region
/// named by `DEVMEM_SHARED_STORE` is not opened again by this process;
/// `devmem_shared_store_open` still opens one. `INVALID_STATE` when none is open.
#[no_mangle]
pub extern "C" fn devmem_shared_store_close() -> devmem_status {
    guard(core::close_shared_store)
}

/// Longest range name `devmem_name_range` accepts, in bytes (without the NUL).
pub const DEVMEM_MAX_NAME_LEN: usize = 4096;
const _: () = assert!(DEVMEM_MAX_NAME_LEN == core::DEVMEM_MAX_NAME_LEN);

/// Names the bytes `[ptr, ptr+len)` of a live allocation (within the size it asked for):
/// a tensor's name, or a key for a whole allocation. Sleeping into the shared store records
/// the name with the bytes, and `devmem_restore_from_store` in a restarted process puts them
/// back only where the same name is registered again with the same length. Registering a
/// name again moves it; names go when their allocation is freed. `UNKNOWN_POINTER` when `ptr`
/// is in no live allocation, `INVALID_ARGUMENT` for an empty or overlong range or name
/// (1 to `DEVMEM_MAX_NAME_LEN` bytes of UTF-8).
#[no_mangle]
pub extern "C" fn devmem_name_range(ptr: u64, len: usize, name: *const c_char) -> devmem_status {
    guard(|| {
        if name.is_null() {
            bail!(NullPointer, "name is NULL");
        }
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let name = unsafe { CStr::from_ptr(name) }
            .to_str()
            .map_err(|_| Error::new(devmem_status::InvalidArgument, "name is not UTF-8"))?;
        core::name_range(ptr, len, name)
    })
}

/// Forgets the range names (`devmem_name_range`) of every allocation of `tag`, or of every
/// allocation when `tag` is NULL: call it before naming a reloaded model's tensors again, so a
/// name left on bytes that now hold another tensor is not saved with them. Writes the number
/// of names forgotten to `*out` when `out` is not NULL. `INVALID_TAG` for a bad tag.
#[no_mangle]
pub extern "C" fn devmem_clear_names(tag: *const c_char, out: *mut usize) -> devmem_status {
    guard(|| {
        let tag = if tag.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated per the contract.
            Some(unsafe { tag_from_c(tag, "tag") }?)
        };
        let n = core::clear_names(tag.as_deref())?;
        if !out.is_null() {
            // SAFETY: the caller passes NULL or a valid out-pointer.
            unsafe { write_out(out, "out", n) }?;
        }
        Ok(())
    })
}

/// Fills the named ranges (`devmem_name_range`) of the live, mapped allocations of the `n`
/// listed tags with the bytes the shared store holds under the same names: the restart half of
/// durable sleep. Restores by identity: before a byte is copied, every name must be stored by
/// this instance, rank and world, under the same tag, with the same length, and every name
/// stored under those tags must be asked for; otherwise `DEVMEM_STATUS_REGION` names what
/// differs. On CUDA every range must carry a checksum, verified on the device after the copy;
/// a mismatch is `DEVMEM_STATUS_REGION` naming the ranges. Waits for work queued on the
/// devices first. See `devmem_get_last_transfer` for the bytes restored.
#[no_mangle]
pub extern "C" fn devmem_restore_from_store(tags: *const *const c_char, n: usize) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n` tag pointers.
        let tags = unsafe { tags_from_c(tags, n) }?;
        if tags.is_empty() {
            bail!(InvalidArgument, "no tags given");
        }
        core::restore_from_store(&tags).map(drop)
    })
}

/// Like `devmem_restore_from_store`, for allocations that carry no names: matches whole
/// allocations by tag and order of allocation. Refused (`DEVMEM_STATUS_REGION`, nothing
/// copied) unless the store holds exactly as many allocations of each tag as the process
/// has, each allocated with exactly the same requested size, each with a checksum on CUDA.
/// Order proves nothing about identity: use it only where every process allocates the same
/// buffers in the same order.
#[no_mangle]
pub extern "C" fn devmem_restore_from_store_by_order(
    tags: *const *const c_char,
    n: usize,
) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n` tag pointers.
        let tags = unsafe { tags_from_c(tags, n) }?;
        if tags.is_empty() {
            bail!(InvalidArgument, "no tags given");
        }
        core::restore_from_store_by_order(&tags).map(drop)
    })
}

/// Longest path `devmem_shared_store_info.path` holds, with its NUL.
pub const DEVMEM_PATH_BUFFER_LEN: usize = 4096;

/// The shared store this process has open (`devmem_get_shared_store_info`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct devmem_shared_store_info {
    /// 1 when a store is open, else 0 (and every other field is zero).
    pub open: i32,
    /// 1 when the region stays after its last user leaves (durable sleep).
    pub kept: i32,
    /// This process's rank.
    pub rank: u32,
    /// The number of ranks.
    pub world: u32,
    /// The instance's generation (1 for a new region).
    pub generation: u64,
    /// The region's file, NUL-terminated (truncated to fit).
    pub path: [c_char; DEVMEM_PATH_BUFFER_LEN],
}

/// Writes what the shared store this process has open is to `*out` (`open` = 0 when none is:
/// a store `DEVMEM_SHARED_STORE` names counts only once it opened, at the first sleep).
#[no_mangle]
pub extern "C" fn devmem_get_shared_store_info(
    out: *mut devmem_shared_store_info,
) -> devmem_status {
    guard(|| {
        let mut info = devmem_shared_store_info {
            open: 0,
            kept: 0,
            rank: 0,
            world: 0,
            generation: 0,
            path: [0; DEVMEM_PATH_BUFFER_LEN],
        };
        if let Some(region) = crate::store::shared_open_now() {
            use std::os::unix::ffi::OsStrExt;
            info.open = 1;
            info.kept = i32::from(region.kept());
            info.rank = region.rank();
            info.world = region.world();
            info.generation = region.generation();
            let bytes = region.path().as_os_str().as_bytes();
            for (dst, src) in info
                .path
                .iter_mut()
                .zip(bytes.iter().take(DEVMEM_PATH_BUFFER_LEN - 1))
            {
                *dst = *src as c_char;
            }
        }
        // SAFETY: the caller passes NULL or a valid out-pointer.
        unsafe { write_out(out, "out", info) }
    })
}

/// Declares what sleeps may assume about `tag`'s bytes: `DEVMEM_READ_ONLY_OFF` (default),
/// `DEVMEM_READ_ONLY_ON` (a wake keeps the host copy and the next sleep only unmaps; on CUDA
/// it verifies like `DEVMEM_READ_ONLY_VERIFY`; without a device checksum, bytes written after
/// the declaration are lost at the next sleep) or `DEVMEM_READ_ONLY_VERIFY`
/// (each sleep compares a device checksum with the host copy's and copies again on a
/// mismatch; `DEVMEM_STATUS_UNSUPPORTED` without a device checksum, e.g. on Level Zero).
#[no_mangle]
pub extern "C" fn devmem_set_read_only(tag: *const c_char, mode: c_int) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let tag = unsafe { tag_from_c(tag, "tag") }?;
        let Some(mode) = devmem_read_only::from_repr(mode) else {
            bail!(
                InvalidArgument,
                "read-only mode {mode} is not a devmem_read_only value"
            );
        };
        core::set_read_only(&tag, mode)
    })
}

/// Writes what sleeps assume about `tag`'s bytes to `*out`.
#[no_mangle]
pub extern "C" fn devmem_get_read_only(
    tag: *const c_char,
    out: *mut devmem_read_only,
) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let tag = unsafe { tag_from_c(tag, "tag") }?;
        let mode = core::read_only(&tag)?;
        // SAFETY: the caller passes NULL or a valid out-pointer.
        unsafe { write_out(out, "out", mode) }
    })
}

/// Chooses the backend: `DEVMEM_BACKEND_AUTO` (CUDA when a CUDA driver with a device loads,
/// else HIP when the HIP runtime loads with a device, else Level Zero), `DEVMEM_BACKEND_CUDA`,
/// `DEVMEM_BACKEND_HIP` or `DEVMEM_BACKEND_LEVEL_ZERO`. Call it before the first allocation;
/// once a backend is loaded, choosing another gives `DEVMEM_STATUS_INVALID_STATE`. The
/// environment variable `DEVMEM_BACKEND=cuda|hip|level_zero|auto` chooses when this is never
/// called.
#[no_mangle]
pub extern "C" fn devmem_select_backend(backend: c_int) -> devmem_status {
    guard(|| match devmem_backend::from_repr(backend) {
        Some(kind) => core::select_backend(kind),
        None => bail!(
            InvalidArgument,
            "backend {backend} is not a devmem_backend value"
        ),
    })
}

/// Writes the loaded backend (loading it if needed) to `*out`: `DEVMEM_BACKEND_CUDA`,
/// `DEVMEM_BACKEND_HIP` or `DEVMEM_BACKEND_LEVEL_ZERO`.
#[no_mangle]
pub extern "C" fn devmem_get_backend(out: *mut devmem_backend) -> devmem_status {
    guard(|| {
        if out.is_null() {
            bail!(NullPointer, "out is NULL");
        }
        let kind = core::backend_kind()?;
        // SAFETY: checked non-NULL above.
        unsafe { write_out(out, "out", kind) }
    })
}

/// Hands devmem the Level Zero context and devices to work in (a `ze_context_handle_t` and
/// `n` `ze_device_handle_t`s, e.g. from SYCL's `get_native`); device ordinal i is
/// `devices[i]`. Memory mapped in one Level Zero context is invisible in another, so an
/// application whose queues use their own context must call this before devmem's first
/// allocation. Without it devmem uses the driver's default context, or creates one.
#[no_mangle]
pub extern "C" fn devmem_set_level_zero_context(
    context: *mut c_void,
    devices: *const *mut c_void,
    n: usize,
) -> devmem_status {
    guard(|| {
        if context.is_null() {
            bail!(NullPointer, "context is NULL");
        }
        if devices.is_null() || n == 0 {
            bail!(
                NullPointer,
                "devices is NULL or n is 0: name at least one device"
            );
        }
        // SAFETY: the caller passes `n` readable device handles.
        let list = unsafe { std::slice::from_raw_parts(devices, n) };
        if list.iter().any(|d| d.is_null()) {
            bail!(NullPointer, "a device handle is NULL");
        }
        core::use_level_zero_context(context as usize, list.iter().map(|d| *d as usize).collect())
    })
}

/// Copies the calling thread's last error message, NUL-terminated and truncated to fit, into
/// `buf` of `len` bytes. Returns the message length without the NUL (like `snprintf`), 0 when
/// the last call on this thread succeeded. `buf` may be NULL when `len` is 0.
#[no_mangle]
pub extern "C" fn devmem_last_error_message(buf: *mut c_char, len: usize) -> usize {
    let message = last_error().map(|e| e.message).unwrap_or_default();
    if !buf.is_null() && len > 0 {
        let n = message.len().min(len - 1);
        // SAFETY: `buf` has `len` bytes and n + 1 <= len.
        unsafe {
            ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
    }
    message.len()
}

/// The status of the calling thread's last devmem call (`DEVMEM_STATUS_SUCCESS` if it
/// succeeded). Useful after `my_malloc` returns NULL or `my_free`, which return no status.
#[no_mangle]
pub extern "C" fn devmem_last_error_status() -> devmem_status {
    last_error().map_or(devmem_status::Success, |e| e.status)
}

/// A static, NUL-terminated name for a status value ("DEVMEM_STATUS_OUT_OF_MEMORY"), or
/// "DEVMEM_STATUS_UNKNOWN" for a value that is not one. Never NULL; never freed.
#[no_mangle]
pub extern "C" fn devmem_status_string(status: c_int) -> *const c_char {
    let name: &'static CStr = match devmem_status::from_raw(status) {
        Some(s) => s.name(),
        None => c"DEVMEM_STATUS_UNKNOWN",
    };
    name.as_ptr()
}

/// The library version, e.g. "0.1.0". Static; never freed.
#[no_mangle]
pub extern "C" fn devmem_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// Who keeps or attaches kept memory, and how to reach the keeper (`devmem_keep`,
/// `devmem_attach`, `devmem_release_kept`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct devmem_keep_options {
    /// The instance's name (non-empty UTF-8, at most 256 bytes): the keeper files memory under
    /// (instance, rank, world, tag).
    pub instance: *const c_char,
    /// This process's rank, below `world`.
    pub rank: u32,
    /// The number of ranks.
    pub world: u32,
    /// The keeper's socket; NULL for its default (`DEVMEM_KEEPER_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/devmem/keeper.sock`, else `/dev/shm/devmem-<uid>/keeper.sock`).
    pub socket: *const c_char,
    /// The `devmem-keeper` binary to start when no keeper answers; NULL never starts one.
    pub keeper_binary: *const c_char,
    /// `devmem_attach` only: nonzero maps read-only (a write through it faults) and shares the
    /// memory with other read-only processes; 0 attaches exclusively, read-write.
    pub read_only: c_int,
}

/// # Safety
/// `p` must be NULL or NUL-terminated.
unsafe fn path_from_c(p: *const c_char) -> Option<std::path::PathBuf> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    use std::os::unix::ffi::OsStrExt;
    Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// # Safety
/// `options` must be NULL or a valid struct whose strings are NULL or NUL-terminated.
unsafe fn keep_options_from_c(
    options: *const devmem_keep_options,
) -> Result<(
    crate::store::kept::Identity,
    crate::store::kept::Options,
    bool,
)> {
    if options.is_null() {
        bail!(NullPointer, "options is NULL");
    }
    // SAFETY: checked non-NULL; the caller passes a valid struct.
    let o = unsafe { *options };
    if o.instance.is_null() {
        bail!(NullPointer, "options.instance is NULL");
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let instance = unsafe { CStr::from_ptr(o.instance) }
        .to_str()
        .map_err(|_| {
            Error::new(
                devmem_status::InvalidArgument,
                "options.instance is not UTF-8",
            )
        })?
        .to_string();
    let identity = crate::store::kept::Identity {
        instance,
        rank: o.rank,
        world: o.world,
    };
    identity.validate()?;
    let reach = crate::store::kept::Options {
        // SAFETY: NULL or NUL-terminated per the contract.
        socket: unsafe { path_from_c(o.socket) },
        // SAFETY: as above.
        binary: unsafe { path_from_c(o.keeper_binary) },
    };
    Ok((identity, reach, o.read_only != 0))
}

/// Hands the physical memory of the named allocations (`devmem_name_range`) of the `n` listed
/// tags to the keeper process, without copying: a later process of the same instance, rank
/// and world attaches it with `devmem_attach`. The allocations stay mapped and usable here.
/// Every named allocation of the tags must be mapped (`DEVMEM_STATUS_INVALID_STATE`
/// otherwise); a tag without named allocations is `DEVMEM_STATUS_INVALID_TAG`. No keeper:
/// `DEVMEM_STATUS_UNSUPPORTED`; a full keeper: `DEVMEM_STATUS_OUT_OF_MEMORY` (nothing kept,
/// allocations untouched). Level Zero: `DEVMEM_STATUS_UNSUPPORTED`.
#[no_mangle]
pub extern "C" fn devmem_keep(
    tags: *const *const c_char,
    n: usize,
    options: *const devmem_keep_options,
) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n` tag pointers.
        let tags = unsafe { tags_from_c(tags, n) }?;
        if tags.is_empty() {
            bail!(InvalidArgument, "no tags given");
        }
        // SAFETY: the caller passes NULL or a valid struct.
        let (identity, reach, _) = unsafe { keep_options_from_c(options) }?;
        core::keep(&tags, &identity, &reach)
    })
}

/// Maps the memory the keeper holds for the `n` listed tags (of `options`' instance, rank and
/// world) at this process's own allocations of the same tags, in place of their memory, without
/// copying (`devmem_get_last_transfer`: bytes mapped, none restored). Matches by identity:
/// every kept allocation must correspond to exactly one allocation here with the same named
/// ranges, size and device, and every named allocation of the tags must be kept; otherwise
/// `DEVMEM_STATUS_REGION` lists what differs. Every listed tag is matched before any is
/// mapped: a refusal of any tag maps nothing and gives back the leases the call took. Each
/// allocation must be mapped (its own memory is given back) or discarded. Exclusive unless
/// `options.read_only`: another process attached read-write makes it
/// `DEVMEM_STATUS_INVALID_STATE`. A driver failure while mapping (import, map, access) puts
/// that allocation's own memory back, but those attached before it in this call stay attached
/// (undoing them would need their own memory held beside the kept memory) and the error
/// message lists them ("stay attached").
#[no_mangle]
pub extern "C" fn devmem_attach(
    tags: *const *const c_char,
    n: usize,
    options: *const devmem_keep_options,
) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n` tag pointers.
        let tags = unsafe { tags_from_c(tags, n) }?;
        if tags.is_empty() {
            bail!(InvalidArgument, "no tags given");
        }
        // SAFETY: the caller passes NULL or a valid struct.
        let (identity, reach, read_only) = unsafe { keep_options_from_c(options) }?;
        core::attach(&tags, &identity, &reach, read_only).map(drop)
    })
}

/// Has the keeper drop what it holds for the `n` listed tags of `options`' instance, rank and
/// world; `bytes` (may be NULL) receives the bytes it gave back. Processes that attached the
/// memory keep it mapped until they free it.
#[no_mangle]
pub extern "C" fn devmem_release_kept(
    tags: *const *const c_char,
    n: usize,
    options: *const devmem_keep_options,
    bytes: *mut u64,
) -> devmem_status {
    guard(|| {
        // SAFETY: the caller passes `n` tag pointers.
        let tags = unsafe { tags_from_c(tags, n) }?;
        if tags.is_empty() {
            bail!(InvalidArgument, "no tags given");
        }
        // SAFETY: the caller passes NULL or a valid struct.
        let (identity, reach, _) = unsafe { keep_options_from_c(options) }?;
        let released = core::release_kept(&tags, &identity, &reach)?;
        if !bytes.is_null() {
            // SAFETY: the caller passes NULL or a valid out-pointer.
            unsafe { write_out(bytes, "bytes", released) }?;
        }
        Ok(())
    })
}
