//! The registry of live allocations, their tags and state machine, statistics, and the
//! operations the C ABI exposes (malloc, free, sleep, offload, discard, wake).
//!
//! Locking: `REGISTRY` is held only for bookkeeping, never across a driver call, a copy or a
//! user callback. `OPS` serialises the operations that change physical memory of existing
//! allocations (free, sleep, offload, discard, wake) so two of them never work on the same
//! allocation; `malloc` does not take it and runs alongside them.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::backend::{self, Backend};
use crate::error::{bail, devmem_status, Error, Result};
use crate::offload::{self, Backup};

/// Longest tag in bytes, not counting the terminating NUL.
pub const DEVMEM_MAX_TAG_LEN: usize = 255;
/// Size of the tag buffer in `devmem_allocation_info`: the longest tag plus its NUL.
pub const DEVMEM_TAG_BUFFER_LEN: usize = 256;
const MAX_TAG_LEN: usize = DEVMEM_MAX_TAG_LEN;
/// The tag of threads that never set one.
pub const DEFAULT_TAG: &str = "default";

/// Where an allocation's bytes are.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum devmem_state {
    /// Physical memory is mapped at the allocation's address.
    Mapped = 0,
    /// Physical memory was released; the bytes are saved in host memory.
    Offloaded = 1,
    /// Physical memory was released; the bytes were dropped.
    Discarded = 2,
}

/// A counter with its current value, its highest value and the sum of everything added.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct devmem_counter {
    /// Value now.
    pub current: u64,
    /// Highest value seen.
    pub peak: u64,
    /// Sum of every increase.
    pub total: u64,
}

impl devmem_counter {
    fn add(&mut self, n: u64) {
        self.current += n;
        self.total += n;
        self.peak = self.peak.max(self.current);
    }

    fn sub(&mut self, n: u64) {
        self.current = self.current.saturating_sub(n);
    }
}

/// Statistics for one tag, or for every tag together.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct devmem_stats {
    /// Live allocations.
    pub allocations: devmem_counter,
    /// Reserved bytes of live allocations (sizes rounded to the granularity).
    pub bytes: devmem_counter,
    /// Bytes backed by physical device memory.
    pub mapped_bytes: devmem_counter,
    /// Bytes saved in host memory while asleep.
    pub offloaded_bytes: devmem_counter,
    /// Bytes dropped while asleep.
    pub discarded_bytes: devmem_counter,
    /// Pinned host memory the host store holds, free or in use (totals only; 0 per tag).
    pub host_store_bytes: u64,
    /// Calls that tried to free a pointer devmem did not know (totals only; 0 per tag).
    pub unknown_frees: u64,
}

/// What one sleep, offload, discard or wake did.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct devmem_transfer {
    /// Allocations whose state changed.
    pub allocations: u64,
    /// Bytes of device memory given back to the driver.
    pub bytes_freed: u64,
    /// Bytes copied to host memory before being freed.
    pub bytes_saved: u64,
    /// Bytes freed without a copy.
    pub bytes_discarded: u64,
    /// Bytes of device memory mapped again.
    pub bytes_mapped: u64,
    /// Bytes copied back from host memory.
    pub bytes_restored: u64,
    /// Wall time of the call in seconds.
    pub seconds: f64,
}

/// One allocation as the lookup and iteration functions report it.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct devmem_allocation_info {
    /// Start of the allocation (what `my_malloc` returned).
    pub ptr: u64,
    /// Reserved size in bytes (the requested size rounded up to the granularity).
    pub size: u64,
    /// Size the caller asked for.
    pub requested_size: u64,
    /// Device ordinal.
    pub device: i32,
    /// Current state.
    pub state: devmem_state,
    /// The driver's physical memory handle while mapped, else 0.
    pub handle: u64,
    /// The tag, NUL-terminated.
    pub tag: [c_char; DEVMEM_TAG_BUFFER_LEN],
}

/// Called after an allocation is made (`on_alloc`) or before it is freed (`on_free`).
#[allow(non_camel_case_types)]
pub type devmem_allocation_callback =
    Option<unsafe extern "C" fn(info: *const devmem_allocation_info, user_data: *mut c_void)>;

struct Allocation {
    va: u64,
    size: usize,
    requested: usize,
    device: i32,
    tag: Arc<str>,
    state: devmem_state,
    /// Physical memory held: always while mapped; while asleep only when a release failed, in
    /// which case wake maps it again and free releases it.
    handle: Option<u64>,
    backup: Option<Backup>,
}

impl Allocation {
    fn info(&self) -> devmem_allocation_info {
        let mut tag = [0 as c_char; DEVMEM_TAG_BUFFER_LEN];
        for (dst, src) in tag.iter_mut().zip(self.tag.bytes().take(MAX_TAG_LEN)) {
            *dst = src as c_char;
        }
        devmem_allocation_info {
            ptr: self.va,
            size: self.size as u64,
            requested_size: self.requested as u64,
            device: self.device,
            state: self.state,
            handle: if self.state == devmem_state::Mapped {
                self.handle.unwrap_or(0)
            } else {
                0
            },
            tag,
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Callbacks {
    on_alloc: devmem_allocation_callback,
    on_free: devmem_allocation_callback,
    user_data: usize,
}

/// An address range whose physical memory was trimmed for good: still reserved, so the driver
/// cannot hand it to another allocation, until its owner frees it.
#[derive(Debug, Clone, Copy)]
struct Retired {
    size: usize,
    device: i32,
}

#[derive(Default)]
struct Registry {
    allocations: BTreeMap<u64, Allocation>,
    retired: BTreeMap<u64, Retired>,
    per_tag: HashMap<Arc<str>, devmem_stats>,
    total: devmem_stats,
    callbacks: Callbacks,
    last_transfer: devmem_transfer,
}

impl Registry {
    fn each_stats(&mut self, tag: &Arc<str>, f: impl Fn(&mut devmem_stats)) {
        f(&mut self.total);
        f(self.per_tag.entry(Arc::clone(tag)).or_default());
    }

    fn account(
        &mut self,
        tag: &Arc<str>,
        size: usize,
        from: Option<devmem_state>,
        to: Option<devmem_state>,
    ) {
        let n = size as u64;
        self.each_stats(tag, |s| {
            match from {
                None => {
                    s.allocations.add(1);
                    s.bytes.add(n);
                }
                Some(state) => state_counter(s, state).sub(n),
            }
            match to {
                None => {
                    s.allocations.sub(1);
                    s.bytes.sub(n);
                }
                Some(state) => state_counter(s, state).add(n),
            }
        });
    }

    fn lookup(&self, ptr: u64) -> Option<&Allocation> {
        self.allocations
            .range(..=ptr)
            .next_back()
            .map(|(_, a)| a)
            .filter(|a| ptr < a.va + a.size as u64)
    }

    /// Moves an allocation to `state`, keeping the statistics true.
    fn transition(
        &mut self,
        va: u64,
        state: devmem_state,
        handle: Option<u64>,
        backup: Option<Backup>,
    ) {
        let Some(a) = self.allocations.get_mut(&va) else {
            return;
        };
        let (tag, size, from) = (Arc::clone(&a.tag), a.size, a.state);
        a.state = state;
        a.handle = handle;
        let old_backup = std::mem::replace(&mut a.backup, backup);
        if let Some(backup) = old_backup {
            offload::give_back(backup);
        }
        if from != state {
            self.account(&tag, size, Some(from), Some(state));
        }
    }
}

fn state_counter(stats: &mut devmem_stats, state: devmem_state) -> &mut devmem_counter {
    match state {
        devmem_state::Mapped => &mut stats.mapped_bytes,
        devmem_state::Offloaded => &mut stats.offloaded_bytes,
        devmem_state::Discarded => &mut stats.discarded_bytes,
    }
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
static OPS: Mutex<()> = Mutex::new(());
static UNKNOWN_FREES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut guard = REGISTRY.lock();
    f(guard.get_or_insert_with(Registry::default))
}

thread_local! {
    static CURRENT_TAG: RefCell<Arc<str>> = RefCell::new(Arc::from(DEFAULT_TAG));
}

/// Checks a tag: 1 to [`DEVMEM_MAX_TAG_LEN`] bytes.
pub fn validate_tag(tag: &str) -> Result<()> {
    if tag.is_empty() {
        bail!(InvalidTag, "tag is empty");
    }
    if tag.len() > MAX_TAG_LEN {
        bail!(
            InvalidTag,
            "tag is {} bytes long; the limit is {MAX_TAG_LEN}",
            tag.len()
        );
    }
    Ok(())
}

/// Sets the calling thread's tag for later allocations.
pub fn set_current_tag(tag: &str) -> Result<()> {
    validate_tag(tag)?;
    CURRENT_TAG
        .try_with(|t| *t.borrow_mut() = Arc::from(tag))
        .map_err(|_| {
            Error::new(
                devmem_status::InvalidState,
                "the calling thread is exiting: its tag can no longer be set",
            )
        })
}

/// The calling thread's tag (the default tag once the thread's storage is gone at exit).
pub fn current_tag() -> Arc<str> {
    CURRENT_TAG
        .try_with(|t| Arc::clone(&t.borrow()))
        .unwrap_or_else(|_| Arc::from(DEFAULT_TAG))
}

/// Allocates `size` bytes on `device` under the calling thread's tag and returns the address.
pub fn malloc(size: usize, device: i32) -> Result<u64> {
    if size == 0 {
        bail!(
            InvalidArgument,
            "size 0: devmem does not make empty allocations"
        );
    }
    let backend = backend::get()?;
    let granularity = backend.granularity(device)?;
    let rounded = match size.checked_next_multiple_of(granularity) {
        Some(r) if r <= isize::MAX as usize => r,
        _ => bail!(
            InvalidArgument,
            "size {size} overflows when rounded up to the granularity ({granularity} bytes)"
        ),
    };
    let va = backend
        .reserve(device, rounded)
        .map_err(|e| e.context(format!("reserving {rounded} bytes on device {device}")))?;
    let handle = match backend.create_and_map(device, va, rounded) {
        Ok(handle) => handle,
        Err(err) => {
            if let Err(undo) = backend.free_va(device, va, rounded) {
                log::error!("devmem: freeing the reservation at {va:#x}: {undo}");
            }
            return Err(err.context(format!("allocating {size} bytes on device {device}")));
        }
    };
    let tag = current_tag();
    let (info, callbacks) = with_registry(|reg| {
        let allocation = Allocation {
            va,
            size: rounded,
            requested: size,
            device,
            tag: Arc::clone(&tag),
            state: devmem_state::Mapped,
            handle: Some(handle),
            backup: None,
        };
        let info = allocation.info();
        if reg.allocations.insert(va, allocation).is_some() {
            log::error!("devmem: the driver returned {va:#x}, which a live allocation still holds");
        }
        reg.account(&tag, rounded, None, Some(devmem_state::Mapped));
        (info, reg.callbacks)
    });
    log::debug!("devmem: allocated {rounded} bytes at {va:#x} on device {device}, tag {tag}");
    notify(callbacks.on_alloc, &info, callbacks.user_data);
    Ok(va)
}

fn notify(callback: devmem_allocation_callback, info: &devmem_allocation_info, user_data: usize) {
    if let Some(f) = callback {
        // SAFETY: the caller registered this function for exactly this signature; `info` lives
        // for the duration of the call and no devmem lock is held.
        unsafe { f(info, user_data as *mut c_void) };
    }
}

/// Frees an allocation in any state. Unknown pointers are counted and reported.
pub fn free(ptr: u64) -> Result<()> {
    let backend = backend::get()?;
    if free_retired(&*backend, ptr)? {
        return Ok(());
    }
    let found = with_registry(|reg| reg.allocations.get(&ptr).map(|a| (a.info(), reg.callbacks)));
    let Some((info, callbacks)) = found else {
        UNKNOWN_FREES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inside = with_registry(|reg| reg.lookup(ptr).map(|a| a.va));
        match inside {
            Some(base) => bail!(
                UnknownPointer,
                "pointer {ptr:#x} is inside the allocation at {base:#x}, not its start"
            ),
            None => bail!(
                UnknownPointer,
                "pointer {ptr:#x} is not a live devmem allocation (never allocated, or already freed)"
            ),
        }
    };
    notify(callbacks.on_free, &info, callbacks.user_data);
    let _op = OPS.lock();
    let (device, size, _) = release_device_memory(&*backend, ptr, "freeing")?;
    // The record leaves the registry before the address range goes back to the driver: once
    // freed, the driver may hand the same range to a concurrent malloc, whose record must not
    // be clobbered by this one.
    let Some(mut allocation) = with_registry(|reg| reg.allocations.remove(&ptr)) else {
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} was freed by another thread meanwhile"
        );
    };
    if let Err(err) = backend.free_va(device, ptr, size) {
        with_registry(|reg| {
            reg.allocations.insert(ptr, allocation);
            reg.transition(ptr, devmem_state::Discarded, None, None);
        });
        return Err(err.context(format!("freeing {ptr:#x}")));
    }
    with_registry(|reg| {
        reg.account(
            &allocation.tag,
            allocation.size,
            Some(allocation.state),
            None,
        )
    });
    if let Some(backup) = allocation.backup.take() {
        offload::give_back(backup);
    }
    log::debug!("devmem: freed {size} bytes at {ptr:#x}");
    Ok(())
}

/// Gives back the device memory the allocation at `ptr` holds (unmapping it first when mapped;
/// the caller holds `OPS`). Each step that fails leaves the record describing exactly what is
/// still held, so a retry picks up where this one stopped. Returns the allocation's device,
/// size and state before the call.
fn release_device_memory(
    backend: &dyn Backend,
    ptr: u64,
    doing: &str,
) -> Result<(i32, usize, devmem_state)> {
    // Another thread may have freed it while this one ran the on_free callback.
    let Some((device, size, state, handle)) = with_registry(|reg| {
        reg.allocations
            .get(&ptr)
            .map(|a| (a.device, a.size, a.state, a.handle))
    }) else {
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} was freed by another thread meanwhile"
        );
    };
    let context = || format!("{doing} {ptr:#x}");
    if state == devmem_state::Mapped {
        backend.synchronize(device)?;
        backend
            .unmap(device, ptr, size)
            .map_err(|e| e.context(context()))?;
    }
    if let Some(handle) = handle {
        if let Err(err) = backend.release(device, handle) {
            with_registry(|reg| reg.transition(ptr, devmem_state::Discarded, Some(handle), None));
            return Err(err.context(context()));
        }
    }
    Ok((device, size, state))
}

/// Frees the reservation of a trimmed allocation; `false` when `ptr` is not one.
///
/// Runs on every free, so it takes only the registry lock: once removed from `retired`, the
/// range belongs to this call alone (sleep and wake never touch trimmed ranges).
fn free_retired(backend: &dyn Backend, ptr: u64) -> Result<bool> {
    let Some(retired) = with_registry(|reg| reg.retired.remove(&ptr)) else {
        return Ok(false);
    };
    if let Err(err) = backend.free_va(retired.device, ptr, retired.size) {
        with_registry(|reg| reg.retired.insert(ptr, retired));
        return Err(err.context(format!("freeing the trimmed reservation at {ptr:#x}")));
    }
    log::debug!("devmem: freed the trimmed reservation at {ptr:#x}");
    Ok(true)
}

/// Gives the physical memory (or host backup) of the allocation starting at `ptr` back for
/// good, for a caching allocator's free segment that will never be handed out again. The
/// address range stays reserved until [`free`] is called on `ptr`, so no later allocation can
/// land there; meanwhile the allocation no longer appears in lookups, statistics, sleep or
/// wake. Returns the bytes of device memory released.
pub fn trim(ptr: u64) -> Result<usize> {
    let backend = backend::get()?;
    let found = with_registry(|reg| reg.allocations.get(&ptr).map(|a| (a.info(), reg.callbacks)));
    let Some((info, callbacks)) = found else {
        let retired = with_registry(|reg| reg.retired.contains_key(&ptr));
        if retired {
            bail!(
                InvalidState,
                "pointer {ptr:#x} was already trimmed; free it to release its address range"
            );
        }
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} is not the start of a live devmem allocation"
        );
    };
    notify(callbacks.on_free, &info, callbacks.user_data);
    let _op = OPS.lock();
    let (device, size, state) = release_device_memory(&*backend, ptr, "trimming")?;
    let removed = with_registry(|reg| {
        let mut allocation = reg.allocations.remove(&ptr)?;
        reg.account(
            &allocation.tag,
            allocation.size,
            Some(allocation.state),
            None,
        );
        reg.retired.insert(ptr, Retired { size, device });
        Some(allocation.backup.take())
    });
    if let Some(Some(backup)) = removed {
        offload::give_back(backup);
    }
    let freed = if state == devmem_state::Mapped {
        size
    } else {
        0
    };
    log::debug!("devmem: trimmed {size} bytes at {ptr:#x}");
    Ok(freed)
}

/// What a sleep does to one allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Offload,
    Discard,
}

struct SleepTarget {
    va: u64,
    size: usize,
    device: i32,
    handle: u64,
    action: Action,
}

/// Copies queued between two markers on one device's copy stream.
struct Batch {
    device: i32,
    marker: u64,
    /// Indices into the offload targets.
    targets: std::ops::Range<usize>,
}

/// Offload copies are grouped into batches of about this many bytes; each batch's allocations
/// are unmapped as soon as its copies finish, while later batches are still copying.
const BATCH_BYTES: usize = 512 << 20;

/// How far releasing one sleeping target got.
enum Released {
    /// Unmapped and released.
    Fully,
    /// Unmapped, but the driver would not release the physical memory: the handle stays held.
    UnmappedOnly(u64, Error),
    /// Not even unmapped: the allocation is still mapped with its contents.
    StillMapped(Error),
}

fn release_target(backend: &dyn Backend, t: &SleepTarget) -> Released {
    if let Err(err) = backend.unmap(t.device, t.va, t.size) {
        return Released::StillMapped(err.context(format!("sleep: {:#x} stays mapped", t.va)));
    }
    match backend.release(t.device, t.handle) {
        Ok(()) => Released::Fully,
        Err(err) => Released::UnmappedOnly(
            t.handle,
            err.context(format!(
                "sleep: {:#x} is unmapped but its physical memory is still held",
                t.va
            )),
        ),
    }
}

/// Puts mapped allocations to sleep: `select` says, per allocation, whether to offload it,
/// discard it or leave it mapped.
///
/// Pipeline: wait for the devices; queue every offload copy (waiting for the host store only
/// when it is still growing), in batches closed by a marker; release the discarded allocations
/// while the copies run; then, batch by batch, wait for the marker and release that batch's
/// allocations. A failure stops the pipeline: allocations not yet released stay mapped with
/// their contents, their backups go back to the store.
fn put_to_sleep(select: impl Fn(&str) -> Option<Action>) -> Result<devmem_transfer> {
    let backend = backend::get()?;
    let _op = OPS.lock();
    let start = Instant::now();
    let (offloads, discards): (Vec<SleepTarget>, Vec<SleepTarget>) = with_registry(|reg| {
        reg.allocations
            .values()
            .filter(|a| a.state == devmem_state::Mapped)
            .filter_map(|a| {
                let action = select(&a.tag)?;
                Some(SleepTarget {
                    va: a.va,
                    size: a.size,
                    device: a.device,
                    handle: a.handle?,
                    action,
                })
            })
            .partition(|t| t.action == Action::Offload)
    });
    let devices: BTreeSet<i32> = offloads.iter().chain(&discards).map(|t| t.device).collect();
    for device in &devices {
        backend.synchronize(*device).map_err(|e| {
            e.context("sleep: waiting for the device before unmapping; nothing was released")
        })?;
    }
    if let Some(first) = offloads.first() {
        offload::expect(&backend, first.device, offloads.iter().map(|t| t.size));
    }

    // 1. Queue the copies.
    let mut backups: Vec<Option<Backup>> = Vec::with_capacity(offloads.len());
    let mut batches: Vec<Batch> = Vec::new();
    let mut batch_start = 0;
    let mut batch_bytes = 0;
    let mut queue_error: Option<Error> = None;
    for (i, t) in offloads.iter().enumerate() {
        let queued = offload::take(&backend, t.device, t.size).and_then(|backup| {
            let pieces = backup.pieces(t.va, t.size);
            backups.push(Some(backup));
            pieces.into_iter().try_for_each(|(src, dst, n)| {
                backend
                    .copy_to_host_async(t.device, dst, src, n)
                    .map_err(|e| e.context(format!("sleep: saving {:#x} ({} bytes)", t.va, t.size)))
            })
        });
        if let Err(err) = queued {
            queue_error = Some(err);
            break;
        }
        batch_bytes += t.size;
        let last = i + 1 == offloads.len();
        if last || batch_bytes >= BATCH_BYTES || offloads[i + 1].device != t.device {
            match backend.record_copy_marker(t.device) {
                Ok(marker) => batches.push(Batch {
                    device: t.device,
                    marker,
                    targets: batch_start..i + 1,
                }),
                Err(err) => {
                    queue_error = Some(err);
                    break;
                }
            }
            batch_start = i + 1;
            batch_bytes = 0;
        }
    }
    if let Some(err) = queue_error {
        finish_copies(&*backend, &devices);
        backups.into_iter().flatten().for_each(offload::give_back);
        return Err(err.context("sleep: nothing was released"));
    }

    // 2. Release the discarded allocations while the copies run; 3. then each finished batch.
    let mut transfer = devmem_transfer::default();
    let mut first_error: Option<Error> = None;
    let mut commit = |t: &SleepTarget, kept: Option<u64>, backup: Option<Backup>| {
        let state = match t.action {
            Action::Offload => devmem_state::Offloaded,
            Action::Discard => devmem_state::Discarded,
        };
        transfer.allocations += 1;
        if kept.is_none() {
            transfer.bytes_freed += t.size as u64;
        }
        match t.action {
            Action::Offload => transfer.bytes_saved += t.size as u64,
            Action::Discard => transfer.bytes_discarded += t.size as u64,
        }
        with_registry(|reg| reg.transition(t.va, state, kept, backup));
    };
    let mut release =
        |t: &SleepTarget, backup: Option<Backup>| -> Option<(Error, Option<Backup>)> {
            match release_target(&*backend, t) {
                Released::Fully => {
                    commit(t, None, backup);
                    None
                }
                Released::UnmappedOnly(handle, err) => {
                    commit(t, Some(handle), backup);
                    Some((err, None))
                }
                Released::StillMapped(err) => Some((err, backup)),
            }
        };
    for t in &discards {
        if let Some((err, _)) = release(t, None) {
            first_error = Some(err);
            break;
        }
    }
    for batch in &batches {
        if first_error.is_none() {
            if let Err(err) = backend.wait_copy_marker(batch.device, batch.marker) {
                first_error = Some(err.context("sleep: waiting for the copies to host memory"));
            }
        }
        for i in batch.targets.clone() {
            if first_error.is_some() {
                break;
            }
            let backup = backups[i].take();
            if let Some((err, unused)) = release(&offloads[i], backup) {
                backups[i] = unused;
                first_error = Some(err);
            }
        }
    }
    if first_error.is_some() {
        finish_copies(&*backend, &devices);
        backups.into_iter().flatten().for_each(offload::give_back);
    }
    transfer.seconds = start.elapsed().as_secs_f64();
    with_registry(|reg| reg.last_transfer = transfer);
    log::info!(
        "devmem: sleep freed {} bytes ({} saved to host, {} discarded) in {:.3} s",
        transfer.bytes_freed,
        transfer.bytes_saved,
        transfer.bytes_discarded,
        transfer.seconds
    );
    first_error.map_or(Ok(transfer), Err)
}

/// Waits for every queued copy on `devices` before host memory they target is reused.
fn finish_copies(backend: &dyn Backend, devices: &BTreeSet<i32>) {
    for device in devices {
        if let Err(err) = backend.wait_copies(*device) {
            log::error!("devmem: waiting for copies on device {device} after a failure: {err}");
        }
    }
}

fn tag_set(tags: &[String]) -> Result<BTreeSet<&str>> {
    tags.iter()
        .map(|t| validate_tag(t).map(|()| t.as_str()))
        .collect()
}

/// Releases every mapped allocation's device memory: tags in `offload_tags` are saved to host
/// memory first, the rest are discarded.
pub fn sleep(offload_tags: &[String]) -> Result<devmem_transfer> {
    let offload = tag_set(offload_tags)?;
    put_to_sleep(|tag| {
        Some(if offload.contains(tag) {
            Action::Offload
        } else {
            Action::Discard
        })
    })
}

/// Saves and releases the mapped allocations of the listed tags only.
pub fn offload_tags(tags: &[String]) -> Result<devmem_transfer> {
    let set = tag_set(tags)?;
    put_to_sleep(|tag| set.contains(tag).then_some(Action::Offload))
}

/// In one pass: saves and releases the mapped allocations of `offload`, releases those of
/// `discard` without saving them (while the copies run), and leaves every other tag mapped.
pub fn sleep_tags(offload: &[String], discard: &[String]) -> Result<devmem_transfer> {
    let keep = tag_set(offload)?;
    let drop = tag_set(discard)?;
    if let Some(both) = keep.intersection(&drop).next() {
        bail!(
            InvalidArgument,
            "tag {both:?} is listed both to offload and to discard"
        );
    }
    put_to_sleep(|tag| {
        if keep.contains(tag) {
            Some(Action::Offload)
        } else if drop.contains(tag) {
            Some(Action::Discard)
        } else {
            None
        }
    })
}

/// Releases the mapped allocations of the listed tags only, dropping their contents.
pub fn discard_tags(tags: &[String]) -> Result<devmem_transfer> {
    let set = tag_set(tags)?;
    put_to_sleep(|tag| set.contains(tag).then_some(Action::Discard))
}

struct WakeTarget {
    va: u64,
    size: usize,
    device: i32,
    handle: Option<u64>,
    /// (device address, host address, bytes) of each saved piece.
    pieces: Vec<(u64, *mut u8, usize)>,
}

/// Maps every sleeping allocation of `tags` (all when `None`) and restores saved bytes. On any
/// failure the mappings made by this call are undone and every backup is kept.
///
/// Pipeline: offloaded allocations first, each one's copies queued as soon as it is mapped, so
/// the copy engine runs while the next allocations are created and mapped; then the discarded
/// ones; then one wait per device.
pub fn wake_up(tags: Option<&[String]>) -> Result<devmem_transfer> {
    let filter = tags.map(tag_set).transpose()?;
    wake_selected(|tag| filter.as_ref().is_none_or(|f| f.contains(tag)))
}

/// Like [`wake_up`] for every sleeping allocation whose tag is *not* in `deferred`: what an
/// engine calls when only some tags (weights, KV cache) may stay asleep after a wake.
pub fn wake_up_except(deferred: &[String]) -> Result<devmem_transfer> {
    let deferred = tag_set(deferred)?;
    wake_selected(|tag| !deferred.contains(tag))
}

fn wake_selected(select: impl Fn(&str) -> bool) -> Result<devmem_transfer> {
    let backend = backend::get()?;
    let _op = OPS.lock();
    let start = Instant::now();
    let mut targets: Vec<WakeTarget> = with_registry(|reg| {
        reg.allocations
            .values()
            .filter(|a| a.state != devmem_state::Mapped)
            .filter(|a| select(&a.tag))
            .map(|a| WakeTarget {
                va: a.va,
                size: a.size,
                device: a.device,
                handle: a.handle,
                pieces: a
                    .backup
                    .as_ref()
                    .map_or_else(Vec::new, |b| b.pieces(a.va, a.size)),
            })
            .collect()
    });
    targets.sort_by_key(|t| t.pieces.is_empty());
    let devices: BTreeSet<i32> = targets.iter().map(|t| t.device).collect();
    let mut mapped: Vec<(usize, u64)> = Vec::with_capacity(targets.len());
    let mut failure = None;
    for (i, t) in targets.iter().enumerate() {
        let result = match t.handle {
            Some(handle) => backend
                .map_with_access(t.device, t.va, t.size, handle)
                .map(|()| handle),
            None => backend.create_and_map(t.device, t.va, t.size),
        };
        match result {
            Ok(handle) => mapped.push((i, handle)),
            Err(err) => {
                failure =
                    Some(err.context(format!("wake: mapping {:#x} ({} bytes)", t.va, t.size)));
                break;
            }
        }
        let queued = t.pieces.iter().try_for_each(|(dst, src, n)| {
            backend
                .copy_to_device_async(t.device, *dst, src.cast_const(), *n)
                .map_err(|e| e.context(format!("wake: restoring {:#x} ({} bytes)", t.va, t.size)))
        });
        if let Err(err) = queued {
            failure = Some(err);
            break;
        }
    }
    if failure.is_none() {
        for device in &devices {
            if let Err(err) = backend.wait_copies(*device) {
                failure = Some(err.context("wake: waiting for the copies to the device"));
                break;
            }
        }
    }
    if let Some(err) = failure {
        finish_copies(&*backend, &devices);
        roll_back_wake(&*backend, &targets, &mapped);
        return Err(err.context(format!(
            "wake: undid {} mapping(s); every backup is kept and a later wake can retry",
            mapped.len()
        )));
    }
    let mut transfer = devmem_transfer::default();
    with_registry(|reg| {
        for (i, handle) in &mapped {
            let t = &targets[*i];
            transfer.allocations += 1;
            transfer.bytes_mapped += t.size as u64;
            if !t.pieces.is_empty() {
                transfer.bytes_restored += t.size as u64;
            }
            reg.transition(t.va, devmem_state::Mapped, Some(*handle), None);
        }
    });
    if let Err(err) = offload::after_wake(&*backend) {
        log::warn!("devmem: releasing the host store after wake: {err}");
    }
    transfer.seconds = start.elapsed().as_secs_f64();
    with_registry(|reg| reg.last_transfer = transfer);
    log::info!(
        "devmem: wake mapped {} bytes, restored {} in {:.3} s",
        transfer.bytes_mapped,
        transfer.bytes_restored,
        transfer.seconds
    );
    Ok(transfer)
}

fn roll_back_wake(backend: &dyn Backend, targets: &[WakeTarget], mapped: &[(usize, u64)]) {
    for (i, handle) in mapped.iter().rev() {
        let t = &targets[*i];
        if let Err(err) = backend.unmap(t.device, t.va, t.size) {
            log::error!("devmem: wake rollback: unmapping {:#x}: {err}", t.va);
            continue;
        }
        if t.handle.is_some() {
            continue; // the handle predates this call and stays held
        }
        if let Err(err) = backend.release(t.device, *handle) {
            log::error!("devmem: wake rollback: releasing {:#x}: {err}", t.va);
            with_registry(|reg| {
                if let Some(a) = reg.allocations.get_mut(&t.va) {
                    a.handle = Some(*handle);
                }
            });
        }
    }
}

/// The host pieces holding `[ptr, ptr+len)` of an offloaded allocation, as (offset into the
/// range, host address, bytes); `None` when the allocation holding `ptr` is not offloaded.
fn backup_pieces(
    reg: &Registry,
    ptr: u64,
    len: usize,
) -> Result<Option<Vec<(usize, usize, usize)>>> {
    let Some(a) = reg.lookup(ptr) else {
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} is not inside any live devmem allocation"
        );
    };
    let end = a.va + a.size as u64;
    if len == 0 || ptr.checked_add(len as u64).is_none_or(|e| e > end) {
        bail!(
            InvalidArgument,
            "range {ptr:#x}+{len} is empty or runs past the allocation at {:#x} ({} bytes)",
            a.va,
            a.size
        );
    }
    let Some(backup) = a
        .backup
        .as_ref()
        .filter(|_| a.state == devmem_state::Offloaded)
    else {
        return Ok(None);
    };
    let (lo, hi) = (ptr, ptr + len as u64);
    let pieces = backup
        .pieces(a.va, a.size)
        .into_iter()
        .filter_map(|(va, host, n)| {
            let start = va.max(lo);
            let stop = (va + n as u64).min(hi);
            (start < stop).then(|| {
                (
                    (start - lo) as usize,
                    host as usize + (start - va) as usize,
                    (stop - start) as usize,
                )
            })
        })
        .collect();
    Ok(Some(pieces))
}

/// The host address holding the saved bytes `[ptr, ptr+len)` of an offloaded allocation, for
/// reading them in place; `None` when the allocation is not offloaded. The address stays valid
/// until the allocation is woken or freed. Fails with `Unsupported` when the range is split
/// across host chunks (use [`copy_backup`]).
pub fn backup_pointer(ptr: u64, len: usize) -> Result<Option<usize>> {
    let pieces = with_registry(|reg| backup_pieces(reg, ptr, len))?;
    match pieces.as_deref() {
        None => Ok(None),
        Some([(0, host, n)]) if *n == len => Ok(Some(*host)),
        Some(p) => bail!(
            Unsupported,
            "the saved bytes of {ptr:#x}+{len} lie in {} separate host chunks; copy them instead",
            p.len()
        ),
    }
}

/// Copies the saved bytes `[ptr, ptr+len)` of an offloaded allocation to `dst`; `false` (and
/// nothing written) when the allocation is not offloaded.
///
/// # Safety
/// `dst` must be valid for `len` bytes of writes.
pub unsafe fn copy_backup(ptr: u64, len: usize, dst: *mut u8) -> Result<bool> {
    // Held so no wake, free or sleep hands the backup back while it is read.
    let _op = OPS.lock();
    let Some(pieces) = with_registry(|reg| backup_pieces(reg, ptr, len))? else {
        return Ok(false);
    };
    for (offset, host, n) in pieces {
        // SAFETY: `host..host+n` lies in a backup the registry holds and OPS keeps alive; the
        // caller guarantees `dst..dst+len` is writable and `offset + n <= len`.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, dst.add(offset), n) };
    }
    Ok(true)
}

/// Statistics for `tag`, or for every tag when `None`.
pub fn stats(tag: Option<&str>) -> Result<devmem_stats> {
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }
    let mut out = with_registry(|reg| match tag {
        None => reg.total,
        Some(t) => reg.per_tag.get(t).copied().unwrap_or_default(),
    });
    if tag.is_none() {
        out.host_store_bytes = offload::held_bytes() as u64;
        out.unknown_frees = UNKNOWN_FREES.load(std::sync::atomic::Ordering::Relaxed);
    }
    Ok(out)
}

/// What the last sleep, offload, discard or wake did.
pub fn last_transfer() -> devmem_transfer {
    with_registry(|reg| reg.last_transfer)
}

/// The allocation containing `ptr`.
pub fn lookup(ptr: u64) -> Result<devmem_allocation_info> {
    match with_registry(|reg| reg.lookup(ptr).map(Allocation::info)) {
        Some(info) => Ok(info),
        None => Err(Error::new(
            devmem_status::UnknownPointer,
            format!("pointer {ptr:#x} is not inside any live devmem allocation"),
        )),
    }
}

/// A copy of every live allocation's record, in address order.
pub fn snapshot() -> Vec<devmem_allocation_info> {
    with_registry(|reg| reg.allocations.values().map(Allocation::info).collect())
}

/// Installs (or, with `None`, removes) the allocation callbacks.
pub fn set_callbacks(
    on_alloc: devmem_allocation_callback,
    on_free: devmem_allocation_callback,
    user_data: *mut c_void,
) {
    with_registry(|reg| {
        reg.callbacks = Callbacks {
            on_alloc,
            on_free,
            user_data: user_data as usize,
        }
    });
}

/// Sets what happens to the host store after a wake.
pub fn set_host_policy(policy: offload::devmem_host_policy) {
    offload::set_policy(policy);
}

/// What happens to the host store after a wake.
pub fn host_policy() -> offload::devmem_host_policy {
    offload::policy()
}

/// Grows the host store to have `bytes` free for backups, in the background unless `wait`.
pub fn reserve_host_store(bytes: usize, wait: bool) -> Result<()> {
    let backend = backend::get()?;
    offload::reserve(&backend, 0, bytes, wait)
}

/// Frees the host store's unused pinned buffers; returns the bytes freed.
pub fn release_host_store() -> Result<usize> {
    let backend = backend::get()?;
    offload::release_free(&*backend)
}

/// Free and total memory of `device`.
pub fn mem_get_info(device: i32) -> Result<(usize, usize)> {
    backend::get()?.mem_get_info(device)
}

/// The allocation granularity of `device`.
pub fn granularity(device: i32) -> Result<usize> {
    backend::get()?.granularity(device)
}
