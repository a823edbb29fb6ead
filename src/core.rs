//! The registry of live allocations, their tags and state machine, statistics, and the
//! operations the C ABI exposes (malloc, free, sleep, offload, discard, wake).
//!
//! Reads top to bottom: the C types, the registry and its bookkeeping, tags, then each
//! operation. How bytes move to and from host memory is the store's job
//! (`store::pipeline`); this module chooses the allocations and records the outcome.
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
use crate::store::pipeline::{self, FillCopy, Left, RestoreTarget, SaveTarget};
use crate::store::shared::{NamedRange, Region, SlotKey};
use crate::store::{self, Backup};

pub use crate::backend::devmem_backend;
pub use crate::store::devmem_host_policy;

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
    /// Bytes of live allocations whose device memory the keeper also holds (kept with
    /// `devmem_keep` or attached with `devmem_attach`), whatever their state: they count in
    /// `mapped_bytes`, `offloaded_bytes` or `discarded_bytes` as well. A kept allocation that
    /// sleeps gives back only this process's reference; the keeper's copy of the device memory
    /// stays until `devmem_release_kept`.
    pub bytes_kept: u64,
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
    /// Bytes of read-only tags put to sleep without a copy: their host copy from an earlier
    /// cycle was still valid (included in `bytes_freed`, not in `bytes_saved`).
    pub bytes_skipped: u64,
    /// Read-only allocations whose device checksum no longer matched their host copy, and
    /// were copied again.
    pub verify_mismatches: u64,
    /// Wall time of the call in seconds.
    pub seconds: f64,
}

/// What a sleep may assume about a tag's bytes (`devmem_set_read_only`).
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, strum::FromRepr)]
pub enum devmem_read_only {
    /// Every sleep copies the tag's bytes (default).
    #[default]
    Off = 0,
    /// The bytes do not change after the declaration: a wake keeps the host copy, and the next
    /// sleep only unmaps. Where the backend has a device checksum (CUDA) this behaves exactly
    /// like `Verify`: a changed allocation is copied again, never lost. Without one (HIP,
    /// Level Zero) nothing is checked: writing the bytes anyway is the caller's error, the
    /// next sleep does not copy them and the wake after it restores the older bytes. Every
    /// skipped copy is logged at info level with its tag and size.
    On = 1,
    /// Like `On`, but each sleep first compares a checksum computed on the device with the
    /// one recorded with the host copy, and copies again on a mismatch (counted in
    /// `devmem_transfer.verify_mismatches`). CUDA only.
    Verify = 2,
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
    /// The physical memory handle while mapped, else 0. When devmem's chunk layer is on (CUDA
    /// and HIP by default, `DEVMEM_WAKE_CHUNK_MB` / `DEVMEM_CHUNK_SIZE`) this is devmem's id
    /// for the chunks; `devmem_get_allocation_chunks` lists the driver handles.
    pub handle: u64,
    /// The tag, NUL-terminated.
    pub tag: [c_char; DEVMEM_TAG_BUFFER_LEN],
}

/// Called after an allocation is made (`on_alloc`) or before it is freed (`on_free`).
#[allow(non_camel_case_types)]
pub type devmem_allocation_callback =
    Option<unsafe extern "C" fn(info: *const devmem_allocation_info, user_data: *mut c_void)>;

struct Allocation {
    /// Unique for the life of the process: an address can be reused, an id cannot.
    id: u64,
    va: u64,
    size: usize,
    requested: usize,
    device: i32,
    tag: Arc<str>,
    state: devmem_state,
    /// Physical memory held: always while mapped; while asleep only when a release failed, in
    /// which case wake maps it again and free releases it.
    handle: Option<u64>,
    /// While asleep: the held handle is still mapped (a wake's rollback could not unmap it).
    /// Wake copies the backup into it again; free unmaps it first.
    mapped_asleep: bool,
    backup: Option<Backup>,
    /// Named byte ranges (name, offset, bytes): what a durable restore matches on.
    names: Vec<(Arc<str>, u64, u64)>,
    /// The keeper holds this allocation's device memory too (kept or attached).
    kept: bool,
}

impl Allocation {
    /// Whether physical memory is mapped at the allocation's address.
    fn is_mapped(&self) -> bool {
        self.state == devmem_state::Mapped || self.mapped_asleep
    }

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

/// What a failed map left behind outside any allocation record (its undo failed too): kept
/// here, not leaked, and released by the next operation that holds `OPS`.
#[derive(Debug, Clone, Copy)]
struct Stray {
    device: i32,
    va: u64,
    size: usize,
    handle: Option<u64>,
    /// A mapping is still at `va`.
    mapped: bool,
    /// The address range is devmem's and still reserved.
    reserved: bool,
}

#[derive(Default)]
struct Registry {
    allocations: BTreeMap<u64, Allocation>,
    retired: BTreeMap<u64, Retired>,
    strays: Vec<Stray>,
    per_tag: HashMap<Arc<str>, devmem_stats>,
    total: devmem_stats,
    callbacks: Callbacks,
    last_transfer: devmem_transfer,
    read_only: HashMap<Arc<str>, devmem_read_only>,
    /// Every named range's allocation (its start address).
    names: HashMap<Arc<str>, u64>,
}

impl Registry {
    /// Takes an allocation out of the registry, with its names.
    fn remove(&mut self, ptr: u64) -> Option<Allocation> {
        let allocation = self.allocations.remove(&ptr)?;
        for (name, _, _) in &allocation.names {
            if self.names.get(name) == Some(&ptr) {
                self.names.remove(name);
            }
        }
        Some(allocation)
    }

    fn read_only(&self, tag: &str) -> devmem_read_only {
        self.read_only.get(tag).copied().unwrap_or_default()
    }

    /// Each allocation's key in the shared region: its tag and its index among the live
    /// allocations of that tag, in allocation order (the order a restarted process repeats).
    fn slot_keys(&self) -> HashMap<u64, SlotKey> {
        let mut by_tag: Vec<(&Arc<str>, u64, u64, usize)> = self
            .allocations
            .values()
            .map(|a| (&a.tag, a.id, a.va, a.requested))
            .collect();
        by_tag.sort_unstable();
        let mut out = HashMap::with_capacity(by_tag.len());
        let mut index = 0u32;
        for (i, (tag, _, va, requested)) in by_tag.iter().enumerate() {
            index = if i > 0 && by_tag[i - 1].0 == *tag {
                index + 1
            } else {
                0
            };
            out.insert(
                *va,
                SlotKey {
                    tag: Arc::clone(tag),
                    index,
                    requested: *requested as u64,
                },
            );
        }
        out
    }

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
        a.mapped_asleep = false;
        // A backup replaced here goes back to the store as it drops.
        a.backup = backup;
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
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
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
    validate_tag_named(tag, "tag")
}

/// Like [`validate_tag`], naming the argument in the message (`tags[2] is empty`).
pub fn validate_tag_named(tag: &str, what: &str) -> Result<()> {
    if tag.is_empty() {
        bail!(InvalidTag, "{what} is empty");
    }
    if tag.len() > MAX_TAG_LEN {
        bail!(
            InvalidTag,
            "{what} is {} bytes long; the limit is {MAX_TAG_LEN}",
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
        Err(stranded) => {
            let reserved = stranded.mapped
                || backend.free_va(device, va, rounded).is_err_and(|undo| {
                    log::error!("devmem: freeing the reservation at {va:#x}: {undo}");
                    true
                });
            if stranded.holds_anything() || reserved {
                keep_stray(Stray {
                    device,
                    va,
                    size: rounded,
                    handle: stranded.handle,
                    mapped: stranded.mapped,
                    reserved,
                });
            }
            let what = format!("allocating {size} bytes on device {device}");
            return Err(stranded.error.context(what));
        }
    };
    let tag = current_tag();
    let (info, callbacks) = with_registry(|reg| {
        let allocation = Allocation {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            va,
            size: rounded,
            requested: size,
            device,
            tag: Arc::clone(&tag),
            state: devmem_state::Mapped,
            handle: Some(handle),
            mapped_asleep: false,
            backup: None,
            names: Vec::new(),
            kept: false,
        };
        let info = allocation.info();
        if reg.allocations.insert(va, allocation).is_some() {
            log::error!("devmem: the driver returned {va:#x}, which a live allocation still holds");
        }
        reg.account(&tag, rounded, None, Some(devmem_state::Mapped));
        (info, reg.callbacks)
    });
    store::ahead::allocated(device, rounded);
    log::debug!("devmem: allocated {rounded} bytes at {va:#x} on device {device}, tag {tag}");
    notify(callbacks.on_alloc, &info, callbacks.user_data);
    Ok(va)
}

fn keep_stray(stray: Stray) {
    log::error!("devmem: keeping {stray:?} to release later");
    with_registry(|reg| reg.strays.push(stray));
}

/// Takes `OPS`, then releases what earlier failed maps left behind (each step that fails
/// again stays for the next time).
fn lock_ops(backend: &dyn Backend) -> parking_lot::MutexGuard<'static, ()> {
    let guard = OPS.lock();
    let strays = with_registry(|reg| std::mem::take(&mut reg.strays));
    for mut s in strays {
        if s.mapped {
            s.mapped = backend.unmap(s.device, s.va, s.size).is_err();
        }
        if let (false, Some(handle)) = (s.mapped, s.handle) {
            s.handle = backend.release(s.device, handle).err().map(|_| handle);
        }
        if !s.mapped && s.reserved {
            s.reserved = backend.free_va(s.device, s.va, s.size).is_err();
        }
        if s.mapped || s.handle.is_some() || s.reserved {
            with_registry(|reg| reg.strays.push(s));
        } else {
            log::info!("devmem: released what a failed map left at {:#x}", s.va);
        }
    }
    guard
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
    let found = with_registry(|reg| {
        reg.allocations
            .get(&ptr)
            .map(|a| (a.id, a.info(), reg.callbacks))
    });
    let Some((id, info, callbacks)) = found else {
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
    let _op = lock_ops(&*backend);
    let (device, size, _) = release_device_memory(&*backend, ptr, id, "freeing")?;
    // The record leaves the registry before the address range goes back to the driver: once
    // freed, the driver may hand the same range to a concurrent malloc, whose record must not
    // be clobbered by this one.
    let Some(allocation) = with_registry(|reg| {
        let removed = reg.remove(ptr);
        if let Some(a) = &removed {
            rekey_region_slots(reg, Some(&a.tag));
        }
        removed
    }) else {
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} was freed by another thread meanwhile"
        );
    };
    if let Err(err) = backend.free_va(device, ptr, size) {
        with_registry(|reg| {
            for (name, _, _) in &allocation.names {
                reg.names.insert(Arc::clone(name), ptr);
            }
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
    drop(allocation); // its backup, if any, goes back to the store
    store::ahead::freed(size);
    log::debug!("devmem: freed {size} bytes at {ptr:#x}");
    Ok(())
}

/// Gives back the device memory the allocation `id` at `ptr` holds (unmapping it first when
/// mapped; the caller holds `OPS`). Each step that fails leaves the record describing exactly
/// what is still held, so a retry picks up where this one stopped. Returns the allocation's
/// device, size and state before the call.
///
/// `id` comes from the caller's first lookup, made before the unlocked `on_free` callback: if
/// another thread freed the allocation meanwhile and a new one took its address, the ids
/// differ and nothing is touched.
fn release_device_memory(
    backend: &dyn Backend,
    ptr: u64,
    id: u64,
    doing: &str,
) -> Result<(i32, usize, devmem_state)> {
    let Some((device, size, state, handle, mapped)) = with_registry(|reg| {
        reg.allocations
            .get(&ptr)
            .filter(|a| a.id == id)
            .map(|a| (a.device, a.size, a.state, a.handle, a.is_mapped()))
    }) else {
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} was freed by another thread meanwhile"
        );
    };
    let context = || format!("{doing} {ptr:#x}");
    if mapped {
        backend.synchronize(device)?;
        backend
            .unmap(device, ptr, size)
            .map_err(|e| e.context(context()))?;
        with_registry(|reg| {
            if let Some(a) = reg.allocations.get_mut(&ptr) {
                a.mapped_asleep = false;
            }
        });
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
    let found = with_registry(|reg| {
        reg.allocations
            .get(&ptr)
            .map(|a| (a.id, a.info(), reg.callbacks))
    });
    let Some((id, info, callbacks)) = found else {
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
    let _op = lock_ops(&*backend);
    let (device, size, state) = release_device_memory(&*backend, ptr, id, "trimming")?;
    let removed = with_registry(|reg| {
        let allocation = reg.remove(ptr)?;
        rekey_region_slots(reg, Some(&allocation.tag));
        reg.account(
            &allocation.tag,
            allocation.size,
            Some(allocation.state),
            None,
        );
        reg.retired.insert(ptr, Retired { size, device });
        Some(allocation)
    });
    if removed.is_some() {
        store::ahead::freed(size);
    }
    drop(removed); // outside the registry lock: its backup goes back to the store
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

/// Puts mapped allocations to sleep: `select` says, per allocation, whether to offload it,
/// discard it or leave it mapped. The store's save pipeline moves the bytes; each allocation
/// it releases is recorded here as it finishes, so a failure halfway leaves every record true.
fn put_to_sleep(
    named: &BTreeSet<&str>,
    select: impl Fn(&str) -> Option<Action>,
) -> Result<devmem_transfer> {
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    let start = Instant::now();
    let region = store::shared_region(&backend, host_device(&*backend))?;
    let region_on = region.is_some();
    with_registry(|reg| warn_unknown_tags(reg, named, "sleep"));
    let mut offloads: Vec<SaveTarget> = Vec::new();
    let mut discards: Vec<SaveTarget> = Vec::new();
    // Read-only allocations whose host copy from the last cycle is kept: (target, checksum to
    // compare with, when verifying).
    let mut unchanged: Vec<(SaveTarget, Option<u64>)> = Vec::new();
    with_registry(|reg| {
        let keys = reg.slot_keys();
        for a in reg.allocations.values() {
            let (Some(action), Some(handle)) = (select(&a.tag), a.handle) else {
                continue;
            };
            if a.state != devmem_state::Mapped {
                continue;
            }
            // ON verifies wherever the backend can checksum: an in-place update (what an RL
            // trainer does every step) is then copied again, never silently lost.
            let read_only = match reg.read_only(&a.tag) {
                devmem_read_only::On if backend.can_checksum() => devmem_read_only::Verify,
                mode => mode,
            };
            let target = SaveTarget {
                va: a.va,
                size: a.size,
                device: a.device,
                handle,
                key: keys.get(&a.va).cloned().unwrap_or_else(|| SlotKey {
                    tag: Arc::clone(&a.tag),
                    index: 0,
                    requested: a.requested as u64,
                }),
                checksum: region_on || read_only == devmem_read_only::Verify,
                ranges: if region_on {
                    a.names.iter().map(|(_, off, len)| (*off, *len)).collect()
                } else {
                    Vec::new()
                },
            };
            match (action, &a.backup) {
                (Action::Offload, Some(kept)) if read_only != devmem_read_only::Off => {
                    match (read_only, kept.checksum()) {
                        // Nothing to compare with: copy again.
                        (devmem_read_only::Verify, None) => offloads.push(target),
                        (devmem_read_only::Verify, Some(sum)) => {
                            unchanged.push((target, Some(sum)))
                        }
                        _ => unchanged.push((target, None)),
                    }
                }
                (Action::Offload, _) => offloads.push(target),
                (Action::Discard, _) => discards.push(target),
            }
        }
    });
    let mut transfer = devmem_transfer::default();
    let skipped = verify_unchanged(&*backend, unchanged, &mut offloads, &mut transfer)?;
    for t in &skipped {
        log::info!(
            "devmem: read-only tag {:?}: {:#x} ({} bytes) not copied, its host copy is kept{}",
            t.key.tag,
            t.va,
            t.size,
            if backend.can_checksum() {
                " (checksum unchanged)"
            } else {
                " (unverified: this backend has no device checksum)"
            }
        );
    }
    let skip_set: BTreeSet<u64> = skipped.iter().map(|t| t.va).collect();
    discards.extend(skipped);
    let saved = pipeline::save(&backend, &offloads, &discards, |t, backup, kept| {
        let unchanged = skip_set.contains(&t.va);
        let state = if backup.is_some() || unchanged {
            devmem_state::Offloaded
        } else {
            devmem_state::Discarded
        };
        transfer.allocations += 1;
        if kept.is_none() {
            transfer.bytes_freed += t.size as u64;
        }
        if unchanged {
            transfer.bytes_skipped += t.size as u64;
        } else if backup.is_some() {
            transfer.bytes_saved += t.size as u64;
        } else {
            transfer.bytes_discarded += t.size as u64;
        }
        with_registry(|reg| {
            let backup = if unchanged {
                reg.allocations.get_mut(&t.va).and_then(|a| a.backup.take())
            } else {
                backup
            };
            reg.transition(t.va, state, kept, backup)
        });
    });
    if let Some(region) = &region {
        if let Err(err) = write_manifest(region) {
            log::error!(
                "devmem: sleep: the shared store's names could not be recorded, so a restore \
                 by name from it will refuse them: {err}"
            );
        }
    }
    let transfer = record_transfer(transfer, start);
    log::info!(
        "devmem: sleep freed {} bytes ({} saved to host, {} unchanged, {} discarded) in {:.3} s",
        transfer.bytes_freed,
        transfer.bytes_saved,
        transfer.bytes_skipped,
        transfer.bytes_discarded,
        transfer.seconds
    );
    saved.map(|()| transfer)
}

/// Splits read-only allocations with a kept host copy into those that need no copy (returned)
/// and those whose device checksum no longer matches (their stale copy is dropped and they
/// join `offloads`; each counts in `verify_mismatches`).
fn verify_unchanged(
    backend: &dyn Backend,
    unchanged: Vec<(SaveTarget, Option<u64>)>,
    offloads: &mut Vec<SaveTarget>,
    transfer: &mut devmem_transfer,
) -> Result<Vec<SaveTarget>> {
    let mut skip = Vec::with_capacity(unchanged.len());
    let mut check: BTreeMap<i32, Vec<(SaveTarget, u64)>> = BTreeMap::new();
    for (t, expect) in unchanged {
        match expect {
            None => skip.push(t),
            Some(sum) => check.entry(t.device).or_default().push((t, sum)),
        }
    }
    for (device, targets) in check {
        if !targets.is_empty() {
            backend.synchronize(device).map_err(|e| {
                e.context("sleep: waiting for the device before verifying; nothing was released")
            })?;
        }
        let ranges: Vec<(u64, usize)> = targets.iter().map(|(t, _)| (t.va, t.size)).collect();
        let sums = match backend.checksums(device, &ranges) {
            Ok(sums) => sums.into_iter().map(Some).collect(),
            // No device memory for the checksum's scratch: what cannot be verified is copied
            // (not counted as a mismatch).
            Err(e) if e.status == devmem_status::OutOfMemory => {
                log::warn!("devmem: sleep: cannot verify read-only allocations, copying them: {e}");
                vec![None; targets.len()]
            }
            Err(e) => {
                return Err(
                    e.context("sleep: verifying read-only allocations; nothing was released")
                )
            }
        };
        for ((t, expect), sum) in targets.into_iter().zip(sums) {
            if sum == Some(expect) {
                skip.push(t);
                continue;
            }
            if sum.is_some() {
                log::warn!(
                    "devmem: read-only allocation {:#x} (tag {:?}) changed since its host copy \
                     was made; copying it again",
                    t.va,
                    t.key.tag
                );
                transfer.verify_mismatches += 1;
            }
            let stale =
                with_registry(|reg| reg.allocations.get_mut(&t.va).and_then(|a| a.backup.take()));
            drop(stale);
            offloads.push(t);
        }
    }
    Ok(skip)
}

/// Stamps a transfer with the call's wall time and records it as the last one.
fn record_transfer(mut transfer: devmem_transfer, start: Instant) -> devmem_transfer {
    transfer.seconds = start.elapsed().as_secs_f64();
    with_registry(|reg| reg.last_transfer = transfer);
    transfer
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
    put_to_sleep(&offload, |tag| {
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
    put_to_sleep(&set, |tag| set.contains(tag).then_some(Action::Offload))
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
    let named: BTreeSet<&str> = keep.union(&drop).copied().collect();
    put_to_sleep(&named, |tag| {
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
    put_to_sleep(&set, |tag| set.contains(tag).then_some(Action::Discard))
}

/// Maps every sleeping allocation of `tags` (all when `None`) and restores saved bytes. On any
/// failure the mappings made by this call are undone and every backup is kept.
///
/// Pipeline: offloaded allocations first, each one's copies queued as soon as it is mapped, so
/// the copy engine runs while the next allocations are created and mapped; then the discarded
/// ones; then one wait per device.
pub fn wake_up(tags: Option<&[String]>) -> Result<devmem_transfer> {
    let filter = tags.map(tag_set).transpose()?;
    let named = filter.clone().unwrap_or_default();
    wake_selected(&named, |tag| {
        filter.as_ref().is_none_or(|f| f.contains(tag))
    })
}

/// Like [`wake_up`] for every sleeping allocation whose tag is *not* in `deferred`: what an
/// engine calls when only some tags (weights, KV cache) may stay asleep after a wake.
pub fn wake_up_except(deferred: &[String]) -> Result<devmem_transfer> {
    let deferred = tag_set(deferred)?;
    wake_selected(&deferred, |tag| !deferred.contains(tag))
}

/// Logs a warning for each tag a call named that no live allocation has (a typo would
/// otherwise discard the real tag's bytes, or wake nothing, without a word).
fn warn_unknown_tags(reg: &Registry, named: &BTreeSet<&str>, call: &str) {
    let unknown: Vec<&&str> = named
        .iter()
        .filter(|t| !reg.allocations.values().any(|a| &*a.tag == **t))
        .collect();
    if unknown.is_empty() {
        return;
    }
    let live: BTreeSet<&str> = reg.allocations.values().map(|a| &*a.tag).collect();
    log::warn!(
        "devmem: {call}: no live allocation has the tag(s) {unknown:?}; the tags in use are \
         {live:?}"
    );
}

fn wake_selected(named: &BTreeSet<&str>, select: impl Fn(&str) -> bool) -> Result<devmem_transfer> {
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    let start = Instant::now();
    with_registry(|reg| warn_unknown_tags(reg, named, "wake"));
    let mut targets: Vec<RestoreTarget> = with_registry(|reg| {
        reg.allocations
            .values()
            .filter(|a| a.state != devmem_state::Mapped)
            .filter(|a| select(&a.tag))
            .map(|a| RestoreTarget {
                va: a.va,
                size: a.size,
                device: a.device,
                handle: a.handle,
                mapped: a.mapped_asleep,
                pieces: a
                    .backup
                    .as_ref()
                    .map_or_else(Vec::new, |b| b.pieces(a.va, a.size)),
            })
            .collect()
    });
    // Offloaded ones first: their copies run while the discarded ones are mapped.
    targets.sort_by_key(|t| t.pieces.is_empty());
    let handles = match pipeline::restore(&backend, &targets) {
        Ok(handles) => handles,
        Err(failure) => return Err(record_failed_wake(&targets, failure)),
    };
    let mut transfer = devmem_transfer::default();
    let mut released = Vec::new();
    with_registry(|reg| {
        for (t, handle) in targets.iter().zip(handles) {
            transfer.allocations += 1;
            transfer.bytes_mapped += t.size as u64;
            if !t.pieces.is_empty() {
                transfer.bytes_restored += t.size as u64;
            }
            // A read-only tag keeps its host copy for the next sleep.
            let keep = reg
                .allocations
                .get(&t.va)
                .is_some_and(|a| reg.read_only(&a.tag) != devmem_read_only::Off);
            let Some(a) = reg.allocations.get_mut(&t.va) else {
                continue;
            };
            let backup = a.backup.take();
            let (kept, gone) = if keep { (backup, None) } else { (None, backup) };
            released.extend(gone);
            reg.transition(t.va, devmem_state::Mapped, Some(handle), kept);
        }
    });
    drop(released); // outside the registry lock: back to the store
    if let Err(err) = store::after_wake() {
        log::warn!("devmem: releasing the host store after wake: {err}");
    }
    let transfer = record_transfer(transfer, start);
    log::info!(
        "devmem: wake mapped {} bytes, restored {} in {:.3} s",
        transfer.bytes_mapped,
        transfer.bytes_restored,
        transfer.seconds
    );
    Ok(transfer)
}

/// Records where a failed wake left each allocation and says so in the error. Every backup is
/// kept; an allocation whose mapping could not be undone stays asleep but mapped, which a
/// later wake reuses and free unmaps.
fn record_failed_wake(targets: &[RestoreTarget], failure: pipeline::RestoreFailure) -> Error {
    let mut undone = 0;
    let mut stuck = Vec::new();
    with_registry(|reg| {
        for (t, left) in targets.iter().zip(&failure.left) {
            let Some(a) = reg.allocations.get_mut(&t.va) else {
                continue;
            };
            match *left {
                Left::Untouched => continue,
                Left::Undone => {}
                Left::Held(handle) => {
                    a.handle = Some(handle);
                    a.mapped_asleep = false;
                }
                Left::Mapped(handle) => {
                    a.handle = Some(handle);
                    a.mapped_asleep = true;
                    stuck.push(t.va);
                    continue;
                }
            }
            undone += 1;
        }
    });
    let note = if stuck.is_empty() {
        format!("wake: undid {undone} mapping(s); every backup is kept and a later wake can retry")
    } else {
        format!(
            "wake: {} mapping(s) could not be undone ({}); they stay asleep but mapped, every \
             backup is kept, a later wake restores them and free releases them",
            stuck.len(),
            stuck
                .iter()
                .map(|va| format!("{va:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    failure.error.context(note)
}

/// Declares what sleeps may assume about `tag`'s bytes (see [`devmem_read_only`]). Turning
/// it off drops the host copies kept for the tag's mapped allocations.
pub fn set_read_only(tag: &str, mode: devmem_read_only) -> Result<()> {
    validate_tag(tag)?;
    let backend = backend::get()?;
    if mode == devmem_read_only::Verify && !backend.can_checksum() {
        bail!(
            Unsupported,
            "the {} backend has no device checksum; declare {tag:?} read-only without \
             verification",
            backend.name()
        );
    }
    let _op = lock_ops(&*backend);
    let dropped: Vec<Backup> = with_registry(|reg| {
        if mode == devmem_read_only::Off {
            reg.read_only.remove(tag);
            reg.allocations
                .values_mut()
                .filter(|a| &*a.tag == tag && a.state == devmem_state::Mapped)
                .filter_map(|a| a.backup.take())
                .collect()
        } else {
            reg.read_only.insert(Arc::from(tag), mode);
            Vec::new()
        }
    });
    drop(dropped);
    Ok(())
}

/// What sleeps assume about `tag`'s bytes.
pub fn read_only(tag: &str) -> Result<devmem_read_only> {
    validate_tag(tag)?;
    Ok(with_registry(|reg| reg.read_only(tag)))
}

/// Opens (or creates) the shared host store; backups go there until it is closed.
pub fn open_shared_store(options: &store::shared::Options) -> Result<()> {
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    store::open_shared(options, &backend, host_device(&*backend))
}

/// Leaves the shared host store: later backups use private memory again; backups already in
/// the region stay valid; the last process to leave removes it unless it is kept. After a
/// close, a region named by `DEVMEM_SHARED_STORE` is not opened again by this process.
pub fn close_shared_store() -> Result<()> {
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    store::close_shared()
}

/// Longest name of a byte range ([`name_range`]), in bytes.
pub const DEVMEM_MAX_NAME_LEN: usize = crate::store::manifest::MAX_NAME;

/// Names the bytes `[ptr, ptr+len)` of a live allocation `name`: a tensor's name, or a key per
/// allocation. Sleeping into the shared store records each name with the bytes it names, and
/// [`restore_from_store`] in a new process puts them back only where the same name is
/// registered again, with the same length. A name already registered moves to the new range.
/// Names go when their allocation is freed.
pub fn name_range(ptr: u64, len: usize, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > DEVMEM_MAX_NAME_LEN || name.contains('\0') {
        bail!(
            InvalidArgument,
            "a range name must be 1 to {DEVMEM_MAX_NAME_LEN} bytes without NUL; got {} bytes",
            name.len()
        );
    }
    with_registry(|reg| {
        let Some(a) = reg.lookup(ptr) else {
            bail!(
                UnknownPointer,
                "pointer {ptr:#x} is not inside any live devmem allocation"
            );
        };
        let va = a.va;
        let offset = ptr - va;
        if len == 0
            || offset
                .checked_add(len as u64)
                .is_none_or(|e| e > a.requested as u64)
        {
            bail!(
                InvalidArgument,
                "range {ptr:#x}+{len} is empty or runs past the {} bytes the allocation at {va:#x} \
                 asked for",
                a.requested
            );
        }
        let name: Arc<str> = Arc::from(name);
        if let Some(old) = reg.names.insert(Arc::clone(&name), va) {
            if let Some(a) = reg.allocations.get_mut(&old) {
                a.names.retain(|(n, _, _)| *n != name);
            }
        }
        if let Some(a) = reg.allocations.get_mut(&va) {
            a.names.push((name, offset, len as u64));
        }
        Ok(())
    })
}

/// Forgets the names of every allocation of `tag` (of every allocation when `None`): what a
/// caller does before naming a model's tensors again, so names of tensors gone from a
/// caching allocator's segments are not saved with bytes that are now another tensor's.
/// Returns the number of names forgotten.
pub fn clear_names(tag: Option<&str>) -> Result<usize> {
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }
    Ok(with_registry(|reg| {
        let mut gone = Vec::new();
        for a in reg.allocations.values_mut() {
            if tag.is_none_or(|t| *a.tag == *t) {
                gone.extend(a.names.drain(..).map(|(name, _, _)| name));
            }
        }
        for name in &gone {
            reg.names.remove(name);
        }
        gone.len()
    }))
}

/// Re-records the key (tag, index) of every backup held in the shared region: freeing an
/// allocation changes the index of the later ones of its tag.
fn rekey_region_slots(reg: &Registry, tag: Option<&str>) {
    let in_region = |a: &Allocation| a.backup.as_ref().and_then(Backup::region_slot).is_some();
    let concerned = reg
        .allocations
        .values()
        .any(|a| tag.is_none_or(|t| *a.tag == *t) && in_region(a));
    if !concerned {
        return; // the common case: no backup of the tag is in the region
    }
    let keys = reg.slot_keys();
    for a in reg.allocations.values() {
        if let (Some((region, slot, _)), Some(key)) = (
            a.backup.as_ref().and_then(Backup::region_slot),
            keys.get(&a.va),
        ) {
            region.rekey(slot, key);
        }
    }
}

/// Rewrites this rank's manifest: the names of every range this process saved in the region,
/// plus those an earlier process left whose bytes are still there and whose names this
/// process has not reused.
fn write_manifest(region: &Arc<Region>) -> Result<()> {
    let mine: Vec<(NamedRange, usize)> = with_registry(|reg| {
        rekey_region_slots(reg, None);
        let mut out = Vec::new();
        for a in reg.allocations.values() {
            let Some(backup) = a
                .backup
                .as_ref()
                .filter(|_| a.state == devmem_state::Offloaded)
            else {
                continue;
            };
            let Some((r, slot, host)) = backup.region_slot() else {
                continue;
            };
            if !Arc::ptr_eq(r, region) {
                continue;
            }
            let Some(serial) = region.serial(slot) else {
                continue;
            };
            for (name, offset, len) in &a.names {
                let range = NamedRange {
                    name: Arc::clone(name),
                    tag: Arc::clone(&a.tag),
                    slot,
                    serial,
                    offset: *offset,
                    len: *len,
                    checksum: backup.range_sum((*offset, *len)),
                    tail: 0,
                };
                out.push((range, host + *offset as usize));
            }
        }
        out
    });
    region.check_intact()?;
    let mut names: BTreeSet<Arc<str>> = BTreeSet::new();
    let mut ranges = Vec::with_capacity(mine.len());
    for (mut range, host) in mine {
        // SAFETY: the range lies in this rank's area of the region, checked intact above.
        range.tail = unsafe { tail_of(host, range.len) };
        if range.checksum.is_none() {
            // Named after its bytes were saved, or not word-aligned on the device: the
            // checksum of the saved copy, computed here on the host.
            // SAFETY: the bytes lie in this rank's area of the region, checked intact above.
            let bytes = unsafe {
                std::slice::from_raw_parts(host as *const u8, (range.len - range.len % 8) as usize)
            };
            range.checksum = Some(crate::checksum::of(bytes));
        }
        names.insert(Arc::clone(&range.name));
        ranges.push(range);
    }
    let own_slots: BTreeSet<usize> = ranges.iter().map(|r| r.slot).collect();
    // Names an earlier process left (and this one has not restored yet), unless this process
    // saved bytes under the name or into the slot now.
    for left in region.named_ranges() {
        if !names.contains(&left.range.name) && !own_slots.contains(&left.range.slot) {
            names.insert(Arc::clone(&left.range.name));
            ranges.push(left.range);
        }
    }
    region.write_manifest(ranges)
}

/// The last `len % 8` bytes of the range at `host` (those no checksum word covers), as a
/// little-endian number.
///
/// # Safety
/// `host..host+len` must be readable.
unsafe fn tail_of(host: usize, len: u64) -> u64 {
    let n = (len % 8) as usize;
    let mut word = [0u8; 8];
    // SAFETY: the caller guarantees the range is readable; the tail is its last `n` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (host + (len as usize - n)) as *const u8,
            word.as_mut_ptr(),
            n,
        )
    };
    u64::from_le_bytes(word)
}

fn open_region_for_restore(backend: &Arc<dyn Backend>) -> Result<Arc<Region>> {
    let Some(region) = store::shared_region(backend, host_device(&**backend))? else {
        bail!(
            InvalidState,
            "no shared store is open (devmem_shared_store_open or DEVMEM_SHARED_STORE)"
        );
    };
    region.check_intact()?;
    Ok(region)
}

/// The live allocations of `set`, each checked to be freshly allocated: mapped, no backup.
fn restore_targets<'a>(reg: &'a Registry, set: &BTreeSet<&str>) -> Result<Vec<&'a Allocation>> {
    let targets: Vec<&Allocation> = reg
        .allocations
        .values()
        .filter(|a| set.contains(&*a.tag))
        .collect();
    if targets.is_empty() {
        bail!(
            InvalidArgument,
            "no live allocation has the tag(s) {:?}",
            set.iter().collect::<Vec<_>>()
        );
    }
    if let Some(a) = targets
        .iter()
        .find(|a| a.state != devmem_state::Mapped || a.backup.is_some())
    {
        bail!(
            InvalidState,
            "the allocation at {:#x} (tag {:?}) is {}; restore from the store only into \
             freshly allocated memory",
            a.va,
            a.tag,
            if a.state == devmem_state::Mapped {
                "mapped with a backup of its own"
            } else {
                "asleep"
            }
        );
    }
    Ok(targets)
}

/// At most `n` items of a list, for a message.
fn some_of(items: &[String], n: usize) -> String {
    let shown: Vec<&str> = items.iter().take(n).map(String::as_str).collect();
    if items.len() > n {
        format!("{} and {} more", shown.join(", "), items.len() - n)
    } else {
        shown.join(", ")
    }
}

/// Fills the named ranges ([`name_range`]) of this process's mapped allocations of `tags`
/// with the bytes the shared store holds under the same names (an earlier process slept them
/// into a kept region): the restart half of durable sleep. Restores by identity, never by
/// order: before any byte is copied, every name must be stored by this instance, rank and
/// world, under the same tag, with the same length, and every name stored for those tags must
/// be asked for; anything else is a `REGION` error naming it. On a backend with a device
/// checksum every range must have been saved with one. The copies run through the store's
/// pipeline after the devices' queued work, then each range is verified against its checksum;
/// a mismatch is a `REGION` error naming the ranges (which must be loaded another way) and
/// drops their stored copies. The stored copies used are freed.
pub fn restore_from_store(tags: &[String]) -> Result<devmem_transfer> {
    let set = tag_set(tags)?;
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    let start = Instant::now();
    let region = open_region_for_restore(&backend)?;
    let stored: HashMap<Arc<str>, _> = region
        .named_ranges()
        .into_iter()
        .filter(|s| set.contains(&*s.range.tag))
        .map(|s| (Arc::clone(&s.range.name), s))
        .collect();
    let (mut copies, mut names, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    let (mut missing, mut wrong, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    let mut asked: BTreeSet<Arc<str>> = BTreeSet::new();
    with_registry(|reg| -> Result<()> {
        for a in restore_targets(reg, &set)? {
            for (name, offset, len) in &a.names {
                asked.insert(Arc::clone(name));
                let Some(s) = stored.get(name) else {
                    missing.push(format!("{name:?} (tag {:?}, {len} bytes)", a.tag));
                    continue;
                };
                if s.range.len != *len || s.range.tag != a.tag {
                    wrong.push(format!(
                        "{name:?}: stored {} bytes under tag {:?}, asked for {len} bytes under \
                         tag {:?}",
                        s.range.len, s.range.tag, a.tag
                    ));
                    continue;
                }
                // SAFETY: the range lies in this rank's area (`named_ranges` checked it
                // against its slot), which the open region keeps mapped.
                if unsafe { tail_of(s.ptr, s.range.len) } != s.range.tail {
                    changed.push(format!("{name:?}"));
                }
                copies.push(FillCopy {
                    device: a.device,
                    dst: a.va + offset,
                    src: s.ptr,
                    len: *len as usize,
                    checksum: s.range.checksum,
                });
                names.push(Arc::clone(name));
                slots.push(s.range.slot);
            }
        }
        Ok(())
    })?;
    if asked.is_empty() {
        bail!(
            InvalidArgument,
            "no allocation of the tag(s) {:?} has a named range: name what to restore \
             (devmem_name_range; devmem.name_tensors in Python) in the process that saves and \
             in the one that restores, or ask for devmem_restore_from_store_by_order",
            set.iter().collect::<Vec<_>>()
        );
    }
    let mut extra: Vec<String> = stored
        .values()
        .filter(|s| !asked.contains(&s.range.name))
        .map(|s| {
            format!(
                "{:?} (tag {:?}, {} bytes)",
                s.range.name, s.range.tag, s.range.len
            )
        })
        .collect();
    extra.sort();
    if backend.can_checksum() {
        for (c, name) in copies.iter().zip(&names) {
            if c.checksum.is_none() {
                wrong.push(format!(
                    "{name:?}: saved without a checksum (the {} backend verifies every restore)",
                    backend.name()
                ));
            }
        }
    }
    // Two names over the same device bytes would overwrite each other (unless they are the
    // same stored bytes, as tied weights are).
    let mut order: Vec<usize> = (0..copies.len()).collect();
    order.sort_by_key(|i| (copies[*i].device, copies[*i].dst));
    for w in order.windows(2) {
        let (a, b) = (&copies[w[0]], &copies[w[1]]);
        // The same stored bytes at the same place (tied weights, a view and its whole).
        let same = a.dst.wrapping_sub(b.dst) == (a.src as u64).wrapping_sub(b.src as u64);
        if a.device == b.device && a.dst + a.len as u64 > b.dst && !same {
            wrong.push(format!(
                "{:?} and {:?} overlap in device memory",
                names[w[0]], names[w[1]]
            ));
        }
    }
    if !changed.is_empty() {
        wrong.push(format!(
            "the stored last bytes of {} changed since they were saved",
            some_of(&changed, 8)
        ));
    }
    if !missing.is_empty() || !extra.is_empty() || !wrong.is_empty() {
        let mut why = Vec::new();
        if !missing.is_empty() {
            why.push(format!("not stored: {}", some_of(&missing, 8)));
        }
        if !extra.is_empty() {
            why.push(format!("stored but not asked for: {}", some_of(&extra, 8)));
        }
        if !wrong.is_empty() {
            why.push(format!("mismatched: {}", some_of(&wrong, 8)));
        }
        bail!(
            Region,
            "restore from {} (instance {:?}, rank {} of {}) refused, nothing was copied: {}",
            region.path().display(),
            region.name(),
            region.rank(),
            region.world(),
            why.join("; ")
        );
    }
    let bad = pipeline::fill(&backend, &copies, &region)?;
    let bytes: u64 = copies.iter().map(|c| c.len as u64).sum();
    if bad.is_empty() {
        // Used: the device has the bytes now.
        slots.sort_unstable();
        slots.dedup();
        slots.into_iter().for_each(|slot| region.release(slot));
    } else {
        // Only the copies that failed their checksum are dropped; the rest stay for a retry.
        bad.iter().for_each(|i| region.release(slots[*i]));
    }
    if let Err(err) = write_manifest(&region) {
        log::warn!("devmem: restore: rewriting the shared store's names: {err}");
    }
    if !bad.is_empty() {
        let failed: Vec<String> = bad.iter().map(|i| format!("{:?}", names[*i])).collect();
        bail!(
            Region,
            "the shared store's copies of {} fail their checksum (the stored bytes changed); \
             those ranges hold unspecified bytes and must be loaded another way; their stored \
             copies were dropped, with any other range saved in the same allocation; the rest \
             stay, for another restore",
            some_of(&failed, 8)
        );
    }
    let transfer = record_transfer(
        devmem_transfer {
            allocations: names.len() as u64,
            bytes_restored: bytes,
            ..Default::default()
        },
        start,
    );
    log::info!(
        "devmem: restored {bytes} bytes of {} named range(s) from the shared store in {:.3} s \
         ({:.3} s/GiB)",
        names.len(),
        transfer.seconds,
        transfer.seconds / (bytes.max(1) as f64 / (1u64 << 30) as f64)
    );
    Ok(transfer)
}

/// Like [`restore_from_store`], but matching whole allocations by tag and order of
/// allocation, for callers that cannot name their bytes and ask for this by name. Refused
/// before any copy unless, for every tag, the store holds exactly as many allocations as the
/// process has, each with exactly the size the allocation asked for, each saved with a
/// checksum where the backend has one. Read-only tags keep the stored copy as their host copy.
pub fn restore_from_store_by_order(tags: &[String]) -> Result<devmem_transfer> {
    let set = tag_set(tags)?;
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    let start = Instant::now();
    let region = open_region_for_restore(&backend)?;
    let mut plan = Vec::new();
    with_registry(|reg| -> Result<()> {
        let keys = reg.slot_keys();
        let targets = restore_targets(reg, &set)?;
        for tag in &set {
            let have = targets.iter().filter(|a| &*a.tag == *tag).count();
            let stored = region.count_tag(tag);
            if have != stored {
                bail!(
                    Region,
                    "the shared store {} holds {stored} allocation(s) of tag {tag:?}; this \
                     process has {have}: restoring by order needs the same allocations",
                    region.path().display()
                );
            }
        }
        for a in targets {
            let Some(key) = keys.get(&a.va) else {
                continue; // every live allocation has a key
            };
            let Some(stored) = region.find(key) else {
                bail!(
                    Region,
                    "the shared store {} holds no copy of tag {:?} #{} ({} bytes)",
                    region.path().display(),
                    key.tag,
                    key.index,
                    a.requested
                );
            };
            if stored.size != a.size || stored.requested != a.requested as u64 {
                bail!(
                    Region,
                    "the shared store's copy of tag {:?} #{} was allocated with {} bytes; this \
                     allocation asked for {}",
                    key.tag,
                    key.index,
                    stored.requested,
                    a.requested
                );
            }
            if stored.checksum.is_none() && backend.can_checksum() {
                bail!(
                    Region,
                    "the shared store's copy of tag {:?} #{} was saved without a checksum; the \
                     {} backend restores only verified bytes",
                    key.tag,
                    key.index,
                    backend.name()
                );
            }
            let read_only = reg.read_only(&a.tag) != devmem_read_only::Off;
            plan.push((a.va, a.device, a.size, key.clone(), stored, read_only));
        }
        Ok(())
    })?;
    let copies: Vec<FillCopy> = plan
        .iter()
        .map(|(va, device, size, _, stored, _)| FillCopy {
            device: *device,
            dst: *va,
            src: stored.ptr,
            len: *size,
            checksum: stored.checksum,
        })
        .collect();
    let bad = pipeline::fill(&backend, &copies, &region)?;
    if !bad.is_empty() {
        let names: Vec<String> = bad
            .iter()
            .map(|i| {
                let p = &plan[*i];
                region.release(p.4.slot);
                format!("tag {:?} #{} at {:#x}", p.3.tag, p.3.index, p.0)
            })
            .collect();
        bail!(
            Region,
            "the shared store's copies of {} fail their checksum (the stored bytes changed); \
             those allocations hold unspecified bytes and must be loaded another way; their \
             stored copies were dropped",
            names.join(", ")
        );
    }
    let mut transfer = devmem_transfer::default();
    for (va, _, size, _, stored, read_only) in plan {
        transfer.allocations += 1;
        transfer.bytes_restored += size as u64;
        if read_only && region.adopt(stored.slot).is_ok() {
            let backup = Backup::in_region(Arc::clone(&region), stored);
            with_registry(|reg| {
                if let Some(a) = reg.allocations.get_mut(&va) {
                    a.backup = Some(backup);
                }
            });
        } else {
            region.release(stored.slot);
        }
    }
    let transfer = record_transfer(transfer, start);
    log::info!(
        "devmem: restored {} bytes of {} allocation(s) by order from the shared store in {:.3} s",
        transfer.bytes_restored,
        transfer.allocations,
        transfer.seconds
    );
    Ok(transfer)
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
                    host + (start - va) as usize,
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
        out.host_store_bytes =
            (store::held_bytes() + store::shared_open_now().map_or(0, |r| r.rank_bytes())) as u64;
        out.unknown_frees = UNKNOWN_FREES.load(std::sync::atomic::Ordering::Relaxed);
    }
    out.bytes_kept = with_registry(|reg| {
        reg.allocations
            .values()
            .filter(|a| a.kept && tag.is_none_or(|t| &*a.tag == t))
            .map(|a| a.size as u64)
            .sum()
    });
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

/// The driver handles and sizes of the physical memory mapped for the allocation containing
/// `ptr`, in address order (several when the backend chunks physical memory); empty while it
/// is asleep.
pub fn chunks(ptr: u64) -> Result<Vec<(u64, usize)>> {
    let found = with_registry(|reg| {
        reg.lookup(ptr)
            .map(|a| (a.state == devmem_state::Mapped, a.handle, a.size))
    });
    match found {
        None => Err(Error::new(
            devmem_status::UnknownPointer,
            format!("pointer {ptr:#x} is not inside any live devmem allocation"),
        )),
        Some((true, Some(handle), size)) => Ok(backend::get()?.chunks(handle, size)),
        Some(_) => Ok(Vec::new()),
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
pub fn set_host_policy(policy: devmem_host_policy) {
    store::set_policy(policy);
}

/// What happens to the host store after a wake.
pub fn host_policy() -> devmem_host_policy {
    store::policy()
}

/// The device whose context pins host memory reserved ahead of a sleep: the lowest device
/// with a live allocation, else the device of the calling thread's current context, else 0.
/// (A process that only uses device 1 never gets a context on device 0 from devmem.)
fn host_device(backend: &dyn Backend) -> i32 {
    with_registry(|reg| reg.allocations.values().map(|a| a.device).min())
        .or_else(|| backend.current_device())
        .unwrap_or(0)
}

/// Caps the pinned host memory the store may hold; 0 removes the cap.
pub fn set_host_limit(bytes: u64) {
    store::set_limit(bytes);
}

/// The cap on the store's host memory in bytes, 0 when there is none.
pub fn host_limit() -> Result<u64> {
    Ok(store::limit()?.unwrap_or(0))
}

/// Grows the host store to have `bytes` free for backups, in the background unless `wait`.
pub fn reserve_host_store(bytes: usize, wait: bool) -> Result<()> {
    let backend = backend::get()?;
    store::reserve(&backend, host_device(&*backend), bytes, wait)
}

/// Frees the host store's unused pinned buffers; returns the bytes freed.
pub fn release_host_store() -> Result<usize> {
    let backend = backend::get()?;
    drop(lock_ops(&*backend));
    store::release_free()
}

/// vLLM's `create_and_map`: creates physical memory on `device` and maps it at `va` (inside
/// a range the caller reserved), outside the registry. Returns the handle.
pub fn create_and_map_untracked(device: i32, va: u64, size: usize) -> Result<u64> {
    backend::get()?
        .create_and_map(device, va, size)
        .map_err(|stranded| {
            if stranded.holds_anything() {
                keep_stray(Stray {
                    device,
                    va,
                    size,
                    handle: stranded.handle,
                    mapped: stranded.mapped,
                    reserved: false,
                });
            }
            stranded.error
        })
}

/// vLLM's `unmap_and_release`: waits for `device` (CUDA: every stream of its primary context;
/// Level Zero: devmem's own copies only), unmaps `[va, va+size)` and releases `handle`.
pub fn unmap_and_release_untracked(device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
    let backend = backend::get()?;
    backend.synchronize(device)?;
    backend.unmap(device, va, size)?;
    backend.release(device, handle)
}

/// Number of devices the driver reports (loading the backend).
pub fn device_count() -> Result<i32> {
    Ok(backend::get()?.device_count())
}

/// Chooses the backend before it loads.
pub fn select_backend(kind: devmem_backend) -> Result<()> {
    backend::select(kind)
}

/// The loaded backend (loading it if needed).
pub fn backend_kind() -> Result<devmem_backend> {
    Ok(backend::get()?.kind())
}

/// Hands the Level Zero backend the application's context and devices, and selects it. Fails
/// with `INVALID_STATE` once any backend has loaded, atomically with respect to a concurrent
/// first load (which would otherwise ignore the context).
pub fn use_level_zero_context(context: usize, devices: Vec<usize>) -> Result<()> {
    backend::hand_over_level_zero(context, devices)
}

/// Free and total memory of `device`.
pub fn mem_get_info(device: i32) -> Result<(usize, usize)> {
    backend::get()?.mem_get_info(device)
}

/// The allocation granularity of `device`.
pub fn granularity(device: i32) -> Result<usize> {
    backend::get()?.granularity(device)
}

/// Turns growing the host store ahead of need on or off (`DEVMEM_HOST_GROW_AHEAD`).
pub fn set_host_grow_ahead(on: bool) {
    store::ahead::set_enabled(on);
}

/// Whether the host store grows ahead of need.
pub fn host_grow_ahead() -> bool {
    store::ahead::enabled()
}

/// Test hook: every chunk grown ahead of need takes `ms` milliseconds longer to fault in.
#[doc(hidden)]
pub fn slow_grow_ahead_for_tests(ms: u64) {
    store::ahead::set_slow_fault_in(ms);
}

/// Device memory still used on one device, by cause, as far as devmem can tell.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct devmem_residual {
    /// Bytes of devmem's allocations on the device still backed by mapped physical memory
    /// (0 after a sleep of every tag).
    pub devmem_mapped_bytes: u64,
    /// Other device memory devmem holds on the device: physical memory of allocations that is
    /// not mapped, and what failed steps left to release later (0 normally).
    pub devmem_other_bytes: u64,
    /// Memory the driver reports used on the device: total minus free.
    pub driver_used_bytes: u64,
    /// `driver_used_bytes` minus devmem's bytes (never below 0): the driver's context, other
    /// allocators (PyTorch's cache, NCCL's buffers, cuBLAS workspaces) and other processes.
    pub other_used_bytes: u64,
    /// The device's total memory, as the driver reports it.
    pub total_bytes: u64,
}

/// What device memory `device` still uses, by cause.
pub fn residual(device: i32) -> Result<devmem_residual> {
    let backend = backend::get()?;
    let count = backend.device_count();
    if device < 0 || device >= count {
        bail!(
            InvalidArgument,
            "device {device} does not exist (the driver reports {count} device(s))"
        );
    }
    let (free, total) = backend
        .mem_get_info(device)
        .map_err(|e| e.context(format!("reading the memory of device {device}")))?;
    let (mapped, other) = with_registry(|reg| {
        let mut mapped = 0u64;
        let mut other = 0u64;
        for a in reg.allocations.values().filter(|a| a.device == device) {
            if a.is_mapped() {
                mapped += a.size as u64;
            } else if a.handle.is_some() {
                other += a.size as u64;
            }
        }
        for s in reg.strays.iter().filter(|s| s.device == device) {
            if s.handle.is_some() {
                other += s.size as u64;
            }
        }
        (mapped, other)
    });
    let used = total.saturating_sub(free) as u64;
    Ok(devmem_residual {
        devmem_mapped_bytes: mapped,
        devmem_other_bytes: other,
        driver_used_bytes: used,
        other_used_bytes: used.saturating_sub(mapped + other),
        total_bytes: total as u64,
    })
}

/// Exports the physical memory mapped for the allocation at `ptr` as POSIX file descriptors,
/// one per piece (the backend's chunks), in address order, with each piece's size: what the
/// keeper holds so a later process can map the same memory without copying. The allocation
/// stays mapped and usable here. Only a mapped allocation can be exported: a sleeping one has
/// no device memory to hand over.
pub fn export_allocation(ptr: u64) -> Result<Vec<(usize, std::os::fd::OwnedFd)>> {
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    let found = with_registry(|reg| {
        reg.allocations
            .get(&ptr)
            .map(|a| (a.state, a.handle, a.device, a.size, a.mapped_asleep))
    });
    let Some((state, handle, device, size, mapped_asleep)) = found else {
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} is not the start of a live devmem allocation"
        );
    };
    let handle = match (state, handle) {
        (devmem_state::Mapped, Some(handle)) if !mapped_asleep => handle,
        _ => bail!(
            InvalidState,
            "the allocation at {ptr:#x} is {state:?}: only mapped device memory can be kept \
             (wake it first)"
        ),
    };
    backend
        .chunks(handle, size)
        .into_iter()
        .map(|(piece, n)| {
            backend
                .export_fd(device, piece)
                .map(|fd| (n, fd))
                .map_err(|e| e.context(format!("exporting the allocation at {ptr:#x}")))
        })
        .collect()
}

/// Maps memory another process exported ([`export_allocation`]) at the allocation `ptr`, in
/// place of its own: no byte is copied. `pieces` are the exported descriptors with their sizes,
/// in address order; they must add up to the allocation's size. The allocation may be mapped
/// (its fresh memory is given back once the imported memory is mapped) or discarded (asleep
/// with nothing saved); an offloaded one is refused (its backup would be stale).
///
/// Order, so that a failure leaves the allocation as it was: import every piece, unmap the
/// allocation's own memory (keeping its handle), map and grant access to the imported memory,
/// and only then release the own handle. On failure the imported handles are released and
/// the own memory is mapped again (its bytes intact).
pub fn adopt_allocation(
    ptr: u64,
    pieces: &[(usize, std::os::fd::BorrowedFd<'_>)],
    read_only: bool,
) -> Result<()> {
    let backend = backend::get()?;
    let _op = lock_ops(&*backend);
    let found = with_registry(|reg| {
        reg.allocations
            .get(&ptr)
            .map(|a| (a.state, a.handle, a.device, a.size, a.mapped_asleep))
    });
    let Some((state, own, device, size, mapped_asleep)) = found else {
        bail!(
            UnknownPointer,
            "pointer {ptr:#x} is not the start of a live devmem allocation"
        );
    };
    let own = match (state, own, mapped_asleep) {
        (devmem_state::Mapped, Some(handle), false) => Some(handle),
        (devmem_state::Discarded, None, false) => None,
        _ => bail!(
            InvalidState,
            "the allocation at {ptr:#x} is {state:?}: only a mapped allocation or one discarded \
             without a held handle can take kept memory"
        ),
    };
    let total = pieces
        .iter()
        .try_fold(0usize, |sum, (n, _)| sum.checked_add(*n));
    if total != Some(size) {
        bail!(
            InvalidArgument,
            "the kept memory ({} piece(s), {total:?} bytes) does not match the allocation at \
             {ptr:#x} ({size} bytes)",
            pieces.len()
        );
    }
    let imported = backend
        .import_pieces(device, pieces)
        .map_err(|e| e.context(format!("attaching kept memory at {ptr:#x}")))?;
    let drop_imported = |why: &str| {
        if let Err(err) = backend.release(device, imported) {
            log::error!("devmem: releasing imported memory after {why}: {err}");
            keep_stray(Stray {
                device,
                va: ptr,
                size,
                handle: Some(imported),
                mapped: false,
                reserved: false,
            });
        }
    };
    if own.is_some() {
        let unmapped = backend
            .synchronize(device)
            .and_then(|()| backend.unmap(device, ptr, size));
        if let Err(err) = unmapped {
            drop_imported("a failed unmap");
            return Err(err.context(format!("attaching kept memory at {ptr:#x}")));
        }
    }
    let mapped = backend.map(device, ptr, size, imported).and_then(|()| {
        let access = if read_only {
            backend.set_access_read_only(device, ptr, size)
        } else {
            backend.set_access(device, ptr, size)
        };
        access.inspect_err(|_| {
            if let Err(undo) = backend.unmap(device, ptr, size) {
                log::error!("devmem: unmapping imported memory at {ptr:#x}: {undo}");
            }
        })
    });
    if let Err(err) = mapped {
        drop_imported("a failed map");
        if let Some(handle) = own {
            if let Err(undo) = backend.map_with_access(device, ptr, size, handle) {
                // The own memory is no longer mapped: the allocation is discarded, its handle
                // still held (wake maps it again, free releases it).
                log::error!(
                    "devmem: mapping {ptr:#x}'s own memory again: {}",
                    undo.error
                );
                with_registry(|reg| {
                    reg.transition(ptr, devmem_state::Discarded, Some(handle), None)
                });
            }
        }
        return Err(err.context(format!("attaching kept memory at {ptr:#x}")));
    }
    if let Some(handle) = own {
        if let Err(err) = backend.release(device, handle) {
            log::error!("devmem: releasing {ptr:#x}'s own memory after attaching: {err}");
            keep_stray(Stray {
                device,
                va: ptr,
                size,
                handle: Some(handle),
                mapped: false,
                reserved: false,
            });
        }
    }
    with_registry(|reg| {
        reg.transition(ptr, devmem_state::Mapped, Some(imported), None);
        if let Some(a) = reg.allocations.get_mut(&ptr) {
            a.kept = true;
        }
    });
    log::debug!("devmem: attached {size} bytes of kept memory at {ptr:#x}, read-only {read_only}");
    Ok(())
}

/// The label devmem files kept memory's device under: the backend's name and the ordinal.
fn device_label(backend: &dyn Backend, device: i32) -> String {
    format!("{}:{device}", backend.name())
}

/// This process's named allocations of `tag`, for keeping and attaching.
fn kept_locals(reg: &Registry, tag: &str) -> Vec<(store::kept::Local, devmem_state)> {
    reg.allocations
        .values()
        .filter(|a| &*a.tag == tag && !a.names.is_empty())
        .map(|a| {
            (
                store::kept::Local {
                    va: a.va,
                    size: a.size as u64,
                    device: a.device,
                    names: a
                        .names
                        .iter()
                        .map(|(n, o, l)| (n.to_string(), *o, *l))
                        .collect(),
                },
                a.state,
            )
        })
        .collect()
}

/// Hands the physical memory of every named allocation of `tags` to the keeper, filed under
/// (`identity`, tag): no copy; the allocations stay mapped and usable here. Each tag is kept
/// as one transaction. Every named allocation of the tags must be mapped (a sleeping one has
/// no device memory to keep); allocations without names are not kept. A tag with no named
/// allocation is refused.
pub fn keep(
    tags: &[String],
    identity: &store::kept::Identity,
    options: &store::kept::Options,
) -> Result<()> {
    let set = tag_set(tags)?;
    identity.validate()?;
    let backend = backend::get()?;
    for tag in set {
        let key = identity.key(tag)?;
        let locals = with_registry(|reg| kept_locals(reg, tag));
        if locals.is_empty() {
            bail!(
                InvalidTag,
                "tag {tag:?} has no named allocation to keep (name the ranges first)"
            );
        }
        if let Some((l, state)) = locals.iter().find(|(_, s)| *s != devmem_state::Mapped) {
            bail!(
                InvalidState,
                "the allocation at {:#x} (tag {tag:?}) is {state:?}: wake it before keeping",
                l.va
            );
        }
        let mut entries = Vec::with_capacity(locals.len());
        for (l, _) in &locals {
            let pieces = export_allocation(l.va)?;
            let entry = devmem_keeper::Entry {
                size: l.size,
                pieces: pieces.iter().map(|(n, _)| *n as u64).collect(),
                names: l.names.clone(),
                device: l.device,
                device_label: device_label(&*backend, l.device),
                meta: String::new(),
            };
            entries.push((entry, pieces));
        }
        let borrowed: Vec<_> = entries
            .iter()
            .map(|(e, pieces)| {
                (
                    e.clone(),
                    pieces
                        .iter()
                        .map(|(_, fd)| std::os::fd::AsFd::as_fd(fd))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        store::kept::with_connection(options, &format!("keeping tag {tag:?}"), |c| {
            c.client.keep(&key, &borrowed)?;
            c.leased.insert(key.clone()); // the keeping connection holds the lease
            Ok(())
        })?;
        with_registry(|reg| {
            for (l, _) in &locals {
                if let Some(a) = reg.allocations.get_mut(&l.va) {
                    a.kept = true;
                }
            }
        });
        log::info!(
            "devmem: kept {} allocation(s) of tag {tag:?} as {key:?}",
            entries.len()
        );
    }
    Ok(())
}

/// Maps the memory the keeper holds for (`identity`, tag) of every tag at this process's own
/// allocations, matched by identity (names, sizes, device; never by order), read-only when
/// `read_only`. No byte is copied. The keeper's whole tag is checked before anything is
/// mapped: a mismatch is refused with `REGION` listing what is missing, extra or mismatched,
/// and the lease is given back (unless this process held one on the key before the call: a
/// keep or attach whose memory may still be mapped here keeps it). Each matched allocation must be mapped (its own memory is
/// given back) or discarded.
///
/// The lease (exclusive unless `read_only`) stays with this process's keeper connection until
/// it exits. If mapping one allocation fails, that allocation is left as it was and the
/// allocations mapped before it (of this tag or earlier tags) keep the kept memory: the error
/// lists them ("stay attached").
pub fn attach(
    tags: &[String],
    identity: &store::kept::Identity,
    options: &store::kept::Options,
    read_only: bool,
) -> Result<devmem_transfer> {
    let start = Instant::now();
    let set = tag_set(tags)?;
    identity.validate()?;
    let backend = backend::get()?;
    let mode = if read_only {
        devmem_keeper::Mode::ReadOnly
    } else {
        devmem_keeper::Mode::ReadWrite
    };
    let mut transfer = devmem_transfer::default();
    // Phase 1, for every tag before anything is mapped: the keeper's lease and entries, matched
    // against this process's named allocations. A refusal of any tag gives back the leases
    // this call took (never one held before it: that memory may be mapped here) and maps
    // nothing.
    struct Planned {
        tag: String,
        kept: Vec<(devmem_keeper::Entry, Vec<std::os::fd::OwnedFd>)>,
        locals: Vec<store::kept::Local>,
        pairs: Vec<(usize, usize)>,
    }
    let mut planned: Vec<Planned> = Vec::new();
    let mut taken: Vec<devmem_keeper::Key> = Vec::new();
    let give_back = |taken: &[devmem_keeper::Key]| {
        for key in taken {
            let undo = store::kept::with_connection(options, "giving back a lease", |c| {
                c.client.detach(key)?;
                c.leased.remove(key);
                Ok(())
            });
            if let Err(undo) = undo {
                log::warn!("devmem: giving back the lease of {key:?}: {undo}");
            }
        }
    };
    for tag in set {
        let planned_tag = (|| -> Result<Planned> {
            let key = identity.key(tag)?;
            let doing = format!("attaching tag {tag:?}");
            // Whether this process already held a lease on the key (an earlier keep or attach
            // whose memory may still be mapped here): a refused attach must not give it back.
            let kept = store::kept::with_connection(options, &doing, |c| {
                let had = c.leased.contains(&key);
                let kept = c.client.attach(&key, mode)?;
                c.leased.insert(key.clone());
                if !had {
                    taken.push(key.clone());
                }
                Ok(kept)
            })?;
            let locals: Vec<store::kept::Local> = with_registry(|reg| kept_locals(reg, tag))
                .into_iter()
                .map(|(l, _)| l)
                .collect();
            let entries: Vec<devmem_keeper::Entry> = kept.iter().map(|(e, _)| e.clone()).collect();
            let pairs =
                store::kept::match_entries(tag, &entries, &locals, |d| device_label(&*backend, d))?;
            for (i, _) in &pairs {
                let (entry, fds) = &kept[*i];
                if entry.pieces.len() != fds.len() {
                    bail!(
                        Region,
                        "the keeper sent {} descriptor(s) for {} piece(s) of tag {tag:?}",
                        fds.len(),
                        entry.pieces.len()
                    );
                }
                if entry.pieces.iter().any(|n| usize::try_from(*n).is_err()) {
                    bail!(
                        Region,
                        "a kept piece of tag {tag:?} does not fit this process's address size"
                    );
                }
            }
            Ok(Planned {
                tag: tag.to_string(),
                kept,
                locals,
                pairs,
            })
        })();
        match planned_tag {
            Ok(p) => planned.push(p),
            Err(err) => {
                give_back(&taken);
                return Err(err);
            }
        }
    }
    // Phase 2: map. A driver failure here (an import, a map, an access grant) undoes that one
    // allocation (its own memory mapped again), but not the ones attached before it in this
    // call: undoing them would need their own memory kept beside the kept memory, twice the
    // device memory of everything attached. The error lists them.
    let mut attached: Vec<String> = Vec::new();
    for p in &planned {
        let doing = format!("attaching tag {:?}", p.tag);
        for &(i, j) in &p.pairs {
            let (entry, fds) = &p.kept[i];
            let pieces: Vec<(usize, std::os::fd::BorrowedFd<'_>)> = entry
                .pieces
                .iter()
                .zip(fds)
                .map(|(n, fd)| (*n as usize, std::os::fd::AsFd::as_fd(fd)))
                .collect();
            if let Err(e) = adopt_allocation(p.locals[j].va, &pieces, read_only) {
                let e = e.context(doing.clone());
                if attached.is_empty() {
                    give_back(&taken);
                    return Err(e);
                }
                return Err(Error::new(
                    e.status,
                    format!(
                        "{}; {} allocation(s) attached earlier in this call stay attached (not \
                         rolled back): {}",
                        e.message,
                        attached.len(),
                        attached.join(", ")
                    ),
                ));
            }
            attached.push(format!("{:#x} (tag {:?})", p.locals[j].va, p.tag));
            transfer.allocations += 1;
            transfer.bytes_mapped += p.locals[j].size;
        }
    }
    Ok(record_transfer(transfer, start))
}

/// Has the keeper drop what it holds for (`identity`, tag) of every tag; returns the bytes it
/// gave back. Allocations of this process that mapped the memory keep it until they free it.
pub fn release_kept(
    tags: &[String],
    identity: &store::kept::Identity,
    options: &store::kept::Options,
) -> Result<u64> {
    let set = tag_set(tags)?;
    identity.validate()?;
    let mut bytes = 0u64;
    for tag in set {
        let key = identity.key(tag)?;
        bytes += store::kept::with_connection(options, &format!("releasing tag {tag:?}"), |c| {
            let bytes = c.client.release(&key)?;
            c.leased.remove(&key);
            Ok(bytes)
        })?;
        with_registry(|reg| {
            for a in reg.allocations.values_mut().filter(|a| &*a.tag == tag) {
                a.kept = false;
            }
        });
    }
    Ok(bytes)
}
