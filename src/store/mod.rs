//! Backups: the host memory that holds saved allocations, and the pipeline that fills and
//! drains it.
//!
//! * [`pipeline`] saves allocations (batched asynchronous copies, each batch's device memory
//!   released as soon as its copies finish) and restores them (mapping overlapped with copies).
//! * The store below hands out [`Backup`]s: runs of 2 MiB blocks ([`blocks`]) inside chunks of
//!   host memory (`DEVMEM_HOST_CHUNK_MB`, default 256 MiB) from a [`source`]: today
//!   [`anonymous`] huge-page memory registered with CUDA, or [`driver_host`] memory Level Zero
//!   allocates. While a [`shared`] region is open, backups are slots of it instead: memory the
//!   processes of one instance share, which can outlive them (docs/shared-store.md).
//! * Chunks are prepared in the background by a grower thread and a few workers
//!   (`DEVMEM_HOST_WORKERS`, default 4; `DEVMEM_HOST_THREADS` fault-in threads), each chunk
//!   usable as soon as it is ready, so a cold sleep copies into the first chunks while later
//!   ones are still being faulted in.
//! * Before any page is faulted in, growth is checked against the [`bound`] on host memory.
//! * [`ahead`] grows the store in the background as allocations appear, so the first sleep
//!   finds its memory ready (`DEVMEM_HOST_GROW_AHEAD=0` turns it off).
//! * Every thread creation may fail: the grower thread is itself a worker, so refused workers
//!   only slow growth; a refused grower fails the request with `HOST_OUT_OF_MEMORY`; every way
//!   out of the grower (including a panic) clears its state and wakes its waiters.
//!
//! Policies: `Keep` (default) keeps the chunks after wake for the next sleep; `Release` frees
//! every chunk no backup uses once a wake has restored it. `reserve` grows the store ahead.
//!
//! This module never changes an allocation's state: `core` decides what a finished or failed
//! save or restore means.

pub mod ahead;
pub mod anonymous;
pub mod blocks;
pub mod bound;
pub mod driver_host;
pub mod durable_read;
pub mod kept;
pub mod manifest;
pub mod pipeline;
pub mod shared;
pub mod source;

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use self::blocks::{BlockMap, Chunk, Extent, BLOCK};
use self::shared::{Region, SlotKey};
use self::source::HostSource;
use crate::backend::Backend;
use crate::error::{bail, devmem_status, Error, Result};
use crate::threads;

const DEFAULT_CHUNK: usize = 256 << 20;
/// Chunks being prepared at once (`DEVMEM_HOST_WORKERS` overrides).
const DEFAULT_WORKERS: usize = 4;

/// What happens to the host store after a wake.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::FromRepr)]
pub enum devmem_host_policy {
    /// Keep the pinned host memory for the next sleep (default).
    Keep = 0,
    /// Free every chunk no backup uses once a wake has restored it.
    Release = 1,
}

/// The host memory holding one allocation's saved bytes. Owning a backup owns its blocks:
/// dropping it gives them back to the store (the caller makes sure no copy still targets it).
#[derive(Debug)]
pub struct Backup {
    extents: Vec<Extent>,
    /// A slot of the shared region instead of blocks of the pool: (region, slot, address).
    shared: Option<(Arc<Region>, usize, usize)>,
    /// The device checksum of the saved bytes, when one was computed.
    checksum: Option<u64>,
    /// Checksums of named ranges ((offset, bytes) → sum), computed with `checksum`.
    range_sums: Vec<((u64, u64), Option<u64>)>,
}

impl Backup {
    /// A backup held in a slot of the shared region.
    pub fn in_region(region: Arc<Region>, stored: shared::Stored) -> Self {
        Self {
            extents: Vec::new(),
            shared: Some((region, stored.slot, stored.ptr)),
            checksum: stored.checksum,
            range_sums: Vec::new(),
        }
    }

    /// The region and slot holding the bytes, when they are in the shared region, and the
    /// host address of the first byte.
    pub fn region_slot(&self) -> Option<(&Arc<Region>, usize, usize)> {
        self.shared.as_ref().map(|(r, slot, ptr)| (r, *slot, *ptr))
    }

    /// Records the checksums of named ranges computed with the backup's.
    pub fn set_range_sums(&mut self, sums: Vec<((u64, u64), Option<u64>)>) {
        self.range_sums = sums;
    }

    /// The checksum recorded for the named range (offset, bytes), if any.
    pub fn range_sum(&self, range: (u64, u64)) -> Option<u64> {
        self.range_sums
            .iter()
            .find(|(r, _)| *r == range)
            .and_then(|(_, s)| *s)
    }

    /// The device checksum recorded for the saved bytes.
    pub fn checksum(&self) -> Option<u64> {
        self.checksum
    }

    /// Records the device checksum of the bytes being saved.
    pub fn set_checksum(&mut self, checksum: Option<u64>) {
        self.checksum = checksum;
    }

    /// Marks the saved bytes complete (in the shared region, the slot becomes valid).
    pub fn seal(&self) {
        if let Some((region, slot, _)) = &self.shared {
            region.seal(*slot, self.checksum);
        }
    }

    /// Pairs each piece of `[va, va+len)` with the host address that holds it, as
    /// (device address, host address, bytes).
    pub fn pieces(&self, va: u64, len: usize) -> Vec<(u64, usize, usize)> {
        if let Some((region, _, ptr)) = &self.shared {
            return region
                .split(*ptr, len)
                .into_iter()
                .map(|(offset, host, n)| (va + offset as u64, host, n))
                .collect();
        }
        let mut out = Vec::with_capacity(self.extents.len());
        let mut offset = 0usize;
        for extent in &self.extents {
            if offset >= len {
                break;
            }
            let n = extent.len().min(len - offset);
            out.push((va + offset as u64, extent.ptr, n));
            offset += n;
        }
        out
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        if let Some((region, slot, _)) = self.shared.take() {
            region.release(slot);
            return;
        }
        let extents = std::mem::take(&mut self.extents);
        with_pool(|p| {
            if let Err(bad) = p.blocks.put_back(&extents) {
                log::error!("devmem: a backup handed back blocks the store does not hold: {bad:?}");
            }
        });
    }
}

struct Pool {
    blocks: BlockMap,
    source: Option<Arc<dyn HostSource>>,
    /// Blocks the grower still has to start preparing.
    requested: usize,
    /// Blocks of chunks being prepared right now.
    in_flight: usize,
    /// Blocks of the chunk [`ahead`] is preparing (not counted as upcoming for a sleep).
    ahead_in_flight: usize,
    growing: bool,
    grow_error: Option<Error>,
    policy: devmem_host_policy,
    chunk_bytes: usize,
    threads: usize,
    workers: usize,
}

fn env_count(name: &str, min: usize, max: usize) -> Option<usize> {
    crate::logging::env_or_warn(name, &format!("a whole number from {min} to {max}"), |v| {
        v.parse::<usize>().ok().filter(|n| (min..=max).contains(n))
    })
}

impl Pool {
    fn configured() -> Self {
        let chunk_mb = env_count("DEVMEM_HOST_CHUNK_MB", 2, 1 << 20);
        let chunk_bytes = chunk_mb.map_or(DEFAULT_CHUNK, |m| (m << 20).next_multiple_of(BLOCK));
        let threads = env_count("DEVMEM_HOST_THREADS", 1, 1024)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get().min(16)));
        let workers = env_count("DEVMEM_HOST_WORKERS", 1, 1024)
            .unwrap_or(DEFAULT_WORKERS)
            .clamp(1, threads.max(1));
        let policy =
            crate::logging::env_or_warn("DEVMEM_HOST_POLICY", "keep or release", |v| match v {
                "keep" => Some(devmem_host_policy::Keep),
                "release" => Some(devmem_host_policy::Release),
                _ => None,
            })
            .unwrap_or(devmem_host_policy::Keep);
        Self {
            blocks: BlockMap::default(),
            source: None,
            requested: 0,
            in_flight: 0,
            ahead_in_flight: 0,
            growing: false,
            grow_error: None,
            policy,
            chunk_bytes,
            threads,
            workers,
        }
    }

    fn chunk_blocks(&self) -> usize {
        self.chunk_bytes / BLOCK
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static READY: Condvar = Condvar::new();

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    let mut guard = POOL.lock();
    f(guard.get_or_insert_with(Pool::configured))
}

/// Bytes of pinned host memory the pool holds (free or in backups).
pub fn held_bytes() -> usize {
    with_pool(|p| p.blocks.held_blocks() * BLOCK)
}

/// The open shared region, if any.
static SHARED: Mutex<Option<Arc<Region>>> = Mutex::new(None);

/// Set by the first close: from then on the region named by `DEVMEM_SHARED_STORE` is not
/// opened again by this process (only an explicit [`open_shared`] opens one).
static ENV_STORE_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opens (or creates) the shared region; backups go there until it is closed.
pub fn open_shared(
    options: &shared::Options,
    backend: &Arc<dyn Backend>,
    device: i32,
) -> Result<()> {
    let mut active = SHARED.lock();
    if let Some(region) = active.as_ref() {
        bail!(
            InvalidState,
            "a shared store is already open ({}); close it first",
            region.path().display()
        );
    }
    let region = Region::open(options, backend, device)?;
    log::info!(
        "devmem: shared store {} open: rank {}, generation {}, {} bytes, {} stored allocation(s)",
        region.path().display(),
        options.rank,
        region.generation(),
        region.rank_bytes(),
        region.valid_slots()
    );
    *active = Some(region);
    // Backups go to the region now: a chunk being grown ahead for the pool is given back.
    ahead::cancel();
    Ok(())
}

/// Leaves the shared region: new backups go to the pool again. Backups already in the region
/// stay valid (this process keeps its mapping until they are gone); the last process to leave
/// removes the file unless it is kept. A close is final for the environment: from then on a
/// region named by `DEVMEM_SHARED_STORE` is not opened again by this process (reopening it
/// would find this process's own rank still in use, or create a second file while the first
/// is still mapped); an explicit [`open_shared`] still opens one.
pub fn close_shared() -> Result<()> {
    let mut active = SHARED.lock();
    let Some(region) = active.take() else {
        bail!(InvalidState, "no shared store is open");
    };
    ENV_STORE_CLOSED.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(active);
    region.leave();
    Ok(())
}

/// The open shared region, opening it from the environment (`DEVMEM_SHARED_STORE`) first
/// when that names one and this process has never closed a region.
pub fn shared_region(backend: &Arc<dyn Backend>, device: i32) -> Result<Option<Arc<Region>>> {
    if let Some(region) = SHARED.lock().as_ref() {
        return Ok(Some(Arc::clone(region)));
    }
    if ENV_STORE_CLOSED.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    let Some(options) = shared::options_from_env()? else {
        return Ok(None);
    };
    match open_shared(&options, backend, device) {
        Ok(()) => {}
        // Another thread opened it meanwhile.
        Err(e) if e.status == devmem_status::InvalidState => {}
        Err(e) => return Err(e.context("opening the shared store named by DEVMEM_SHARED_STORE")),
    }
    Ok(SHARED.lock().clone())
}

/// The open shared region, without opening one.
pub fn shared_open_now() -> Option<Arc<Region>> {
    SHARED.lock().clone()
}

/// Sets the cap on the bytes the store holds (0: no cap).
pub fn set_limit(bytes: u64) {
    bound::set_cap(bytes);
}

/// The cap on the bytes the store holds, if any (from the API or `DEVMEM_HOST_LIMIT`).
pub fn limit() -> Result<Option<u64>> {
    bound::cap()
}

/// Sets the policy applied after each wake.
pub fn set_policy(policy: devmem_host_policy) {
    with_pool(|p| p.policy = policy);
}

/// The policy applied after each wake.
pub fn policy() -> devmem_host_policy {
    with_pool(|p| p.policy)
}

fn blocks_for(len: usize) -> usize {
    len.div_ceil(BLOCK)
}

/// Makes sure `free_needed` blocks will be free once the grower is done, starting it if needed.
/// Checks the bound on host memory before asking for a single new chunk.
fn request(backend: &Arc<dyn Backend>, device: i32, free_needed: usize) -> Result<()> {
    let start = with_pool(|p| -> Result<Option<Arc<dyn HostSource>>> {
        if !p.growing {
            // An error from a growth that has finished belonged to the operation that saw it.
            p.grow_error = None;
        }
        let upcoming = p.blocks.free_blocks() + p.requested + p.in_flight;
        if free_needed > upcoming {
            let missing = (free_needed - upcoming)
                .checked_next_multiple_of(p.chunk_blocks())
                .and_then(|b| b.checked_mul(BLOCK))
                .ok_or_else(|| {
                    Error::new(
                        devmem_status::HostOutOfMemory,
                        format!(
                            "{} bytes of host memory for backups overflow the address space",
                            (free_needed as u128) * BLOCK as u128
                        ),
                    )
                })?;
            // Chunks being prepared are not faulted in yet: they count against the room too.
            let preparing = ((p.requested + p.in_flight + p.ahead_in_flight) * BLOCK) as u64;
            let held = (p.blocks.held_blocks() * BLOCK) as u64;
            bound::check(missing as u64 + preparing, held, &bound::Room::read())?;
            p.requested += missing / BLOCK;
        }
        if p.requested == 0 || p.growing {
            return Ok(None);
        }
        p.growing = true;
        let threads = (p.threads / p.workers).max(1);
        Ok(Some(Arc::clone(p.source.get_or_insert_with(|| {
            source::for_backend(backend, device, threads)
        }))))
    })?;
    let Some(source) = start else {
        return Ok(());
    };
    log::debug!(
        "devmem: growing the host store from {} memory",
        source.name()
    );
    if let Err(err) = threads::spawn("devmem-host-store", move || grow(source)) {
        with_pool(|p| {
            p.growing = false;
            p.requested = 0;
        });
        READY.notify_all();
        bail!(
            HostOutOfMemory,
            "could not start the host-store thread: {err}; nothing was allocated"
        );
    }
    Ok(())
}

/// Clears the grower's state however it ends (returning or unwinding) and wakes its waiters.
struct GrowerExit;

impl Drop for GrowerExit {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        with_pool(|p| {
            p.growing = false;
            p.requested = 0;
            p.in_flight = 0;
            if panicking {
                p.grow_error.get_or_insert(Error::new(
                    devmem_status::HostOutOfMemory,
                    "the host-store grower stopped unexpectedly (see the log)",
                ));
            }
        });
        READY.notify_all();
    }
}

/// The background grower: prepares chunks until the store holds what was asked for. It is one
/// of the workers itself; up to `DEVMEM_HOST_WORKERS - 1` more run beside it when the OS lets
/// them, each taking the next missing chunk through all its stages (map, fault in, pin).
fn grow(source: Arc<dyn HostSource>) {
    let _exit = GrowerExit;
    let workers = with_pool(|p| p.workers);
    std::thread::scope(|scope| {
        for _ in 1..workers {
            let source = &source;
            if let Err(err) =
                threads::spawn_scoped(scope, "devmem-host-worker", move || grow_worker(&**source))
            {
                log::warn!("devmem: host store grows with fewer workers: {err}");
                break;
            }
        }
        grow_worker(&*source);
    });
}

fn grow_worker(source: &dyn HostSource) {
    loop {
        let len = {
            let mut guard = POOL.lock();
            let Some(p) = guard.as_mut() else { return };
            if p.grow_error.is_some() || p.requested == 0 {
                return;
            }
            let blocks = p.chunk_blocks();
            p.requested = p.requested.saturating_sub(blocks);
            p.in_flight += blocks;
            p.chunk_bytes
        };
        let prepared = source.map(len).and_then(|ptr| match source.pin(ptr, len) {
            Ok(()) => Ok(ptr),
            Err(err) => {
                if let Err(undo) = source.unmap(ptr, len) {
                    log::error!("devmem: unmapping a chunk the driver would not pin: {undo}");
                }
                Err(err)
            }
        });
        // The chunk leaves the in-flight count in the same critical section that records its
        // outcome, so no other worker can claim its place between a failure and the error.
        with_pool(|p| {
            p.in_flight -= len / BLOCK;
            match prepared {
                Ok(ptr) => {
                    p.blocks.add(ptr, len);
                }
                Err(err) => {
                    log::error!("devmem: growing the host store: {err}");
                    p.requested = 0;
                    p.grow_error.get_or_insert(err);
                }
            }
        });
        READY.notify_all();
    }
}

/// Unpins and unmaps chunks; returns the bytes freed. A chunk the source will not release goes
/// back into the store (its memory stays valid) and the first error is returned.
fn free_chunks(source: Option<&Arc<dyn HostSource>>, chunks: Vec<Chunk>) -> Result<usize> {
    let Some(source) = source else {
        return Ok(0);
    };
    let mut freed = 0;
    let mut first_error = None;
    for chunk in chunks {
        let released = source
            .unpin(chunk.ptr, chunk.len)
            .and_then(|()| source.unmap(chunk.ptr, chunk.len));
        match released {
            Ok(()) => freed += chunk.len,
            Err(err) => {
                first_error.get_or_insert(err);
                with_pool(|p| p.blocks.restore(chunk));
            }
        }
    }
    first_error.map_or(Ok(freed), Err)
}

/// Takes a backup of `len` bytes for the allocation `key`: a slot of the shared region when
/// one is open, else blocks of the pool (waiting for the grower when the ready chunks are not
/// enough).
pub fn take(backend: &Arc<dyn Backend>, device: i32, len: usize, key: &SlotKey) -> Result<Backup> {
    if let Some(region) = shared_region(backend, device)? {
        let stored = region.take(key, len)?;
        return Ok(Backup::in_region(region, stored));
    }
    let need = blocks_for(len);
    let mut requests = 0;
    let mut guard = POOL.lock();
    loop {
        let pool = guard.get_or_insert_with(Pool::configured);
        if let Some(extents) = pool.blocks.take(need) {
            return Ok(Backup {
                extents,
                shared: None,
                checksum: None,
                range_sums: Vec::new(),
            });
        }
        if let Some(err) = pool.grow_error.take() {
            return Err(err);
        }
        if pool.growing {
            READY.wait(&mut guard);
            continue;
        }
        if requests == 2 {
            bail!(
                HostOutOfMemory,
                "the host store has {} bytes free after growing; {len} are needed",
                pool.blocks.free_blocks() * BLOCK
            );
        }
        drop(guard);
        request(backend, device, need)?;
        requests += 1;
        guard = POOL.lock();
    }
}

/// Announces that backups of `lens` bytes are about to be taken, so the grower starts
/// preparing what is missing before the first copy needs it. Fails (having allocated nothing)
/// when the bound on host memory does not allow them.
pub fn expect(
    backend: &Arc<dyn Backend>,
    device: i32,
    lens: impl Iterator<Item = usize>,
) -> Result<()> {
    if shared_region(backend, device)?.is_some() {
        return Ok(()); // the region's area was reserved when it was opened
    }
    let need = lens.map(blocks_for).fold(0usize, usize::saturating_add);
    if need == 0 {
        return Ok(());
    }
    request(backend, device, need)
}

/// Applies the policy after a wake: under `Release`, frees every chunk no backup uses.
pub fn after_wake() -> Result<()> {
    let (unused, source) = with_pool(|p| {
        if p.policy == devmem_host_policy::Release && !p.growing {
            (p.blocks.remove_unused(), p.source.clone())
        } else {
            (Vec::new(), None)
        }
    });
    free_chunks(source.as_ref(), unused).map(drop)
}

/// Frees every chunk no backup uses; returns the bytes freed.
pub fn release_free() -> Result<usize> {
    wait_for_grower();
    let (unused, source) = with_pool(|p| {
        // A chunk being grown ahead is given back by its thread, and growth stops until the
        // next allocation: what the user gives back here does not come back by itself.
        ahead::cancel();
        (p.blocks.remove_unused(), p.source.clone())
    });
    free_chunks(source.as_ref(), unused)
}

/// Grows the store until it has at least `bytes` free for backups, in the background; with
/// `wait`, returns once that memory is ready (or the first error).
pub fn reserve(backend: &Arc<dyn Backend>, device: i32, bytes: usize, wait: bool) -> Result<()> {
    let need = blocks_for(bytes);
    request(backend, device, need)?;
    if wait {
        wait_for_grower();
        let (free, err) = with_pool(|p| (p.blocks.free_blocks(), p.grow_error.take()));
        if let Some(err) = err {
            return Err(err);
        }
        if free < need {
            bail!(
                HostOutOfMemory,
                "the host store has {} bytes free after reserving {bytes}",
                free * BLOCK
            );
        }
    }
    Ok(())
}

fn wait_for_grower() {
    let mut guard = POOL.lock();
    while guard.as_ref().is_some_and(|p| p.growing) {
        READY.wait(&mut guard);
    }
}
