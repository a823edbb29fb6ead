//! The host store: pinned host memory for backups, and the pieces of the copy pipeline.
//!
//! Host memory comes in large chunks (`DEVMEM_HOST_CHUNK_MB`, default 256 MiB): mapped
//! anonymously, advised to use transparent huge pages, faulted in by several threads at once
//! (`DEVMEM_HOST_THREADS`), then registered with the driver. A chunk is divided into 2 MiB
//! blocks; a backup is a list of block runs (extents), so device allocations (multiples of the
//! 2 MiB granularity) use exactly their size and the store never holds more than the backups
//! plus one chunk per grower worker while it grows. Chunks are prepared in the background by a
//! few workers at once, and each becomes usable as soon as it is ready, so a cold sleep copies
//! into the first chunks while later ones are still being populated and registered.
//!
//! Policies: `Keep` (default) keeps the chunks after wake for the next sleep; `Release` frees
//! every chunk no backup uses once a wake has restored it. `reserve` grows the store ahead of
//! time, in the background, so the first sleep runs as fast as later ones.
//!
//! This module never changes an allocation's state: `core` decides what a finished or failed
//! batch means.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::backend::{Backend, HostMemory};
use crate::error::{bail, devmem_status, Error, Result};

/// Backups are made of blocks of this size (the device granularity on current GPUs).
pub const HOST_BLOCK: usize = 2 << 20;
const DEFAULT_CHUNK: usize = 256 << 20;

/// What happens to the host store after a wake.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum devmem_host_policy {
    /// Keep the pinned host memory for the next sleep (default).
    Keep = 0,
    /// Free every chunk no backup uses once a wake has restored it.
    Release = 1,
}

impl devmem_host_policy {
    /// Maps a raw integer to a policy.
    pub fn from_raw(raw: i32) -> Option<Self> {
        match raw {
            0 => Some(Self::Keep),
            1 => Some(Self::Release),
            _ => None,
        }
    }
}

/// A run of blocks inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    chunk: u64,
    first_block: usize,
    blocks: usize,
    /// Host address of the first block.
    pub ptr: usize,
}

impl Extent {
    /// Bytes covered by the extent.
    pub fn len(&self) -> usize {
        self.blocks * HOST_BLOCK
    }
}

/// The host memory holding one allocation's saved bytes.
#[derive(Debug, Default)]
pub struct Backup {
    /// The runs of blocks, in the order the allocation's bytes fill them.
    pub extents: Vec<Extent>,
}

impl Backup {
    /// Pairs each piece of `[va, va+len)` with the host address that holds it.
    pub fn pieces(&self, va: u64, len: usize) -> Vec<(u64, *mut u8, usize)> {
        let mut out = Vec::with_capacity(self.extents.len());
        let mut offset = 0usize;
        for extent in &self.extents {
            if offset >= len {
                break;
            }
            let n = extent.len().min(len - offset);
            out.push((va + offset as u64, extent.ptr as *mut u8, n));
            offset += n;
        }
        out
    }
}

struct Chunk {
    ptr: usize,
    len: usize,
    device: i32,
    used: Vec<bool>,
    used_blocks: usize,
}

impl Chunk {
    fn free_blocks(&self) -> usize {
        self.used.len() - self.used_blocks
    }
}

struct Store {
    chunks: BTreeMap<u64, Chunk>,
    next_id: u64,
    /// Blocks the grower has been asked to have in total (ready or being prepared).
    want_blocks: usize,
    held_blocks: usize,
    /// Blocks of chunks being prepared right now.
    in_flight_blocks: usize,
    used_blocks: usize,
    growing: bool,
    grow_error: Option<Error>,
    policy: devmem_host_policy,
    chunk_bytes: usize,
    threads: usize,
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

impl Store {
    fn configured() -> Self {
        let chunk_mb = env_usize("DEVMEM_HOST_CHUNK_MB").filter(|m| *m >= 2);
        let chunk_bytes =
            chunk_mb.map_or(DEFAULT_CHUNK, |m| (m << 20).next_multiple_of(HOST_BLOCK));
        let threads = env_usize("DEVMEM_HOST_THREADS")
            .filter(|t| *t >= 1)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get().min(16)));
        let policy = match std::env::var("DEVMEM_HOST_POLICY").as_deref() {
            Ok("release") => devmem_host_policy::Release,
            _ => devmem_host_policy::Keep,
        };
        Self {
            chunks: BTreeMap::new(),
            next_id: 1,
            want_blocks: 0,
            held_blocks: 0,
            in_flight_blocks: 0,
            used_blocks: 0,
            growing: false,
            grow_error: None,
            policy,
            chunk_bytes,
            threads,
        }
    }

    fn free_blocks(&self) -> usize {
        self.held_blocks - self.used_blocks
    }

    /// Takes `need` blocks from ready chunks: one run if any chunk has one, else runs from
    /// several chunks. `None` when the ready chunks do not have enough free blocks.
    fn take(&mut self, need: usize) -> Option<Backup> {
        if need > self.free_blocks() {
            return None;
        }
        let mut extents = Vec::new();
        if let Some(extent) = self
            .chunks
            .iter()
            .find_map(|(id, c)| find_run(c, need, need).map(|(at, n)| (*id, at, n)))
        {
            extents.push(extent);
        } else {
            let mut left = need;
            for (id, chunk) in &self.chunks {
                let mut from = 0;
                while left > 0 {
                    let Some((at, n)) = find_run_from(chunk, from, 1, left) else {
                        break;
                    };
                    extents.push((*id, at, n));
                    left -= n;
                    from = at + n;
                }
                if left == 0 {
                    break;
                }
            }
        }
        let mut backup = Backup::default();
        for (id, at, n) in extents {
            // The runs were found in these chunks under the same lock, so each is there.
            let Some(chunk) = self.chunks.get_mut(&id) else {
                continue;
            };
            chunk.used[at..at + n].iter_mut().for_each(|b| *b = true);
            chunk.used_blocks += n;
            self.used_blocks += n;
            backup.extents.push(Extent {
                chunk: id,
                first_block: at,
                blocks: n,
                ptr: chunk.ptr + at * HOST_BLOCK,
            });
        }
        let taken: usize = backup.extents.iter().map(|e| e.blocks).sum();
        if taken < need {
            self.put_back(backup);
            return None;
        }
        Some(backup)
    }

    fn put_back(&mut self, backup: Backup) {
        for e in backup.extents {
            if let Some(chunk) = self.chunks.get_mut(&e.chunk) {
                chunk.used[e.first_block..e.first_block + e.blocks]
                    .iter_mut()
                    .for_each(|b| *b = false);
                chunk.used_blocks -= e.blocks;
                self.used_blocks -= e.blocks;
            }
        }
    }

    /// Removes every chunk no backup uses and returns them for freeing.
    fn remove_unused(&mut self) -> Vec<Chunk> {
        let ids: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(_, c)| c.used_blocks == 0)
            .map(|(id, _)| *id)
            .collect();
        let removed: Vec<Chunk> = ids.iter().filter_map(|id| self.chunks.remove(id)).collect();
        let blocks: usize = removed.iter().map(|c| c.used.len()).sum();
        self.held_blocks -= blocks;
        self.want_blocks = self
            .want_blocks
            .saturating_sub(blocks)
            .max(self.held_blocks);
        removed
    }
}

fn find_run(chunk: &Chunk, min: usize, max: usize) -> Option<(usize, usize)> {
    find_run_from(chunk, 0, min, max)
}

/// The first run of free blocks at or after `from` that is at least `min` long, capped at `max`.
fn find_run_from(chunk: &Chunk, from: usize, min: usize, max: usize) -> Option<(usize, usize)> {
    if chunk.free_blocks() < min {
        return None;
    }
    let mut i = from;
    while i < chunk.used.len() {
        if chunk.used[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < chunk.used.len() && !chunk.used[i] && i - start < max {
            i += 1;
        }
        if i - start >= min {
            return Some((start, i - start));
        }
    }
    None
}

static STORE: Mutex<Option<Store>> = Mutex::new(None);
static READY: Condvar = Condvar::new();

fn with_store<T>(f: impl FnOnce(&mut Store) -> T) -> T {
    let mut guard = STORE.lock();
    f(guard.get_or_insert_with(Store::configured))
}

/// Bytes of pinned host memory the store holds (free or in backups).
pub fn held_bytes() -> usize {
    with_store(|s| s.held_blocks * HOST_BLOCK)
}

/// Sets the policy applied after each wake.
pub fn set_policy(policy: devmem_host_policy) {
    with_store(|s| s.policy = policy);
}

/// The policy applied after each wake.
pub fn policy() -> devmem_host_policy {
    with_store(|s| s.policy)
}

fn blocks_for(len: usize) -> usize {
    len.div_ceil(HOST_BLOCK)
}

/// Makes sure `extra_free` more blocks than are free now will become available, starting the
/// background grower if needed.
fn request_blocks(backend: &Arc<dyn Backend>, device: i32, free_needed: usize) {
    let start = with_store(|s| {
        if !s.growing {
            // An error from a growth that has finished belongs to the operation that saw it.
            s.grow_error = None;
        }
        let upcoming = s.free_blocks() + (s.want_blocks - s.held_blocks);
        if free_needed > upcoming {
            let chunk_blocks = s.chunk_bytes / HOST_BLOCK;
            let missing = (free_needed - upcoming).next_multiple_of(chunk_blocks);
            s.want_blocks += missing;
        }
        if s.want_blocks > s.held_blocks && !s.growing {
            s.growing = true;
            Some(s.threads)
        } else {
            None
        }
    });
    if let Some(threads) = start {
        let backend = Arc::clone(backend);
        let spawned = std::thread::Builder::new()
            .name("devmem-host-store".into())
            .spawn(move || grow(backend, device, threads));
        if let Err(err) = spawned {
            with_store(|s| {
                s.growing = false;
                s.want_blocks = s.held_blocks;
                s.grow_error = Some(Error::new(
                    devmem_status::HostOutOfMemory,
                    format!("could not start the host-store thread: {err}"),
                ));
            });
            READY.notify_all();
        }
    }
}

/// The background grower: prepares chunks until the store holds what was asked for.
///
/// Several workers run at once, each taking the next missing chunk through all its stages
/// (map, fault in, register), so the driver's registration of one chunk overlaps the
/// population and registration of others. The fault-in threads are shared out among them.
fn grow(backend: Arc<dyn Backend>, device: i32, threads: usize) {
    let workers = env_usize("DEVMEM_HOST_WORKERS")
        .unwrap_or(REGISTER_WORKERS)
        .min(threads)
        .max(1);
    let per_worker = (threads / workers).max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let backend = &backend;
            scope.spawn(move || grow_worker(&**backend, device, per_worker));
        }
    });
    with_store(|s| s.growing = false);
    READY.notify_all();
}

/// Chunks being prepared at once (`DEVMEM_HOST_WORKERS` overrides).
const REGISTER_WORKERS: usize = 4;

fn grow_worker(backend: &dyn Backend, device: i32, threads: usize) {
    loop {
        let len = {
            let mut guard = STORE.lock();
            let Some(s) = guard.as_mut() else { return };
            if s.grow_error.is_some() || s.held_blocks + s.in_flight_blocks >= s.want_blocks {
                return;
            }
            s.in_flight_blocks += s.chunk_bytes / HOST_BLOCK;
            s.chunk_bytes
        };
        let prepared = match backend.host_memory() {
            HostMemory::Register => map_and_populate(len, threads)
                .and_then(|(ptr, len)| register_chunk(backend, device, ptr, len).map(|()| ptr)),
            HostMemory::Allocate => backend.alloc_host(device, len).map(|p| p as usize),
        };
        // The chunk leaves the in-flight count in the same critical section that records its
        // outcome, so no other worker can claim its place between a failure and the error.
        match prepared {
            Ok(ptr) => add_chunk(ptr, len, device),
            Err(err) => {
                log::error!("devmem: growing the host store: {err}");
                with_store(|s| {
                    s.in_flight_blocks -= len / HOST_BLOCK;
                    s.want_blocks = s.held_blocks + s.in_flight_blocks;
                    s.grow_error.get_or_insert(err);
                });
                READY.notify_all();
                return;
            }
        }
    }
}

fn add_chunk(ptr: usize, len: usize, device: i32) {
    with_store(|s| {
        s.in_flight_blocks -= len / HOST_BLOCK;
        let id = s.next_id;
        s.next_id += 1;
        let blocks = len / HOST_BLOCK;
        s.chunks.insert(
            id,
            Chunk {
                ptr,
                len,
                device,
                used: vec![false; blocks],
                used_blocks: 0,
            },
        );
        s.held_blocks += blocks;
    });
    READY.notify_all();
}

fn unmap(ptr: usize, len: usize) {
    // SAFETY: `ptr..ptr+len` is a mapping made by `map_and_populate` that nothing uses.
    unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
}

/// Maps and populates (in parallel) one chunk of host memory; returns (address, length).
fn map_and_populate(len: usize, threads: usize) -> Result<(usize, usize)> {
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        bail!(
            HostOutOfMemory,
            "mmap of {len} bytes of host memory for backups failed: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: advice on the mapping made above; failure only means no huge pages.
    unsafe { libc::madvise(raw, len, libc::MADV_HUGEPAGE) };
    populate(raw as usize, len, threads);
    Ok((raw as usize, len))
}

/// Registers a populated chunk with the driver; unmaps it if the driver refuses.
fn register_chunk(backend: &dyn Backend, device: i32, ptr: usize, len: usize) -> Result<()> {
    backend
        .host_register(device, ptr as *mut u8, len)
        .inspect_err(|_| unmap(ptr, len))
}

/// Faults in `[base, base+len)` with `threads` threads, one write per 4 KiB page: with
/// transparent huge pages each first write maps a whole 2 MiB page. (Measured faster than
/// MADV_POPULATE_WRITE on the kernels devmem was tested on.)
fn populate(base: usize, len: usize, threads: usize) {
    let slice = len.div_ceil(threads.max(1)).next_multiple_of(HOST_BLOCK);
    std::thread::scope(|scope| {
        for start in (base..base + len).step_by(slice.max(HOST_BLOCK)) {
            let n = slice.min(base + len - start);
            scope.spawn(move || {
                for page in (start..start + n).step_by(4096) {
                    // SAFETY: `page` lies inside the private writable mapping being populated,
                    // which nothing else uses yet.
                    unsafe { std::ptr::write_volatile(page as *mut u8, 0) };
                }
            });
        }
    });
}

/// Frees chunks (unregister, unmap); returns the bytes freed. A chunk the driver will not
/// unregister is kept (its memory stays valid).
fn free_chunks(backend: &dyn Backend, chunks: Vec<Chunk>) -> Result<usize> {
    let mut freed = 0;
    let mut first_error = None;
    for chunk in chunks {
        let released = match backend.host_memory() {
            HostMemory::Register => backend
                .host_unregister(chunk.device, chunk.ptr as *mut u8)
                .map(|()| unmap(chunk.ptr, chunk.len)),
            HostMemory::Allocate => backend.free_host(chunk.device, chunk.ptr as *mut u8),
        };
        match released {
            Ok(()) => freed += chunk.len,
            Err(err) => {
                first_error.get_or_insert(err);
                with_store(|s| {
                    s.held_blocks += chunk.used.len();
                    let id = s.next_id;
                    s.next_id += 1;
                    s.chunks.insert(id, chunk);
                });
            }
        }
    }
    first_error.map_or(Ok(freed), Err)
}

/// Takes a backup of `len` bytes, waiting for the grower when the ready chunks are not enough.
pub fn take(backend: &Arc<dyn Backend>, device: i32, len: usize) -> Result<Backup> {
    let need = blocks_for(len);
    let mut guard = STORE.lock();
    loop {
        let store = guard.get_or_insert_with(Store::configured);
        if let Some(backup) = store.take(need) {
            return Ok(backup);
        }
        if let Some(err) = store.grow_error.take() {
            return Err(err);
        }
        let pending = store.want_blocks - store.held_blocks;
        if pending == 0 || !store.growing {
            drop(guard);
            request_blocks(backend, device, need);
            guard = STORE.lock();
            continue;
        }
        READY.wait(&mut guard);
    }
}

/// Announces that `total_len` bytes of backups are about to be taken, so the grower starts
/// preparing what is missing before the first copy needs it.
pub fn expect(backend: &Arc<dyn Backend>, device: i32, lens: impl Iterator<Item = usize>) {
    let need: usize = lens.map(blocks_for).sum();
    if need > 0 {
        request_blocks(backend, device, need);
    }
}

/// Returns a backup's blocks to the store.
pub fn give_back(backup: Backup) {
    with_store(|s| s.put_back(backup));
}

/// Applies the policy after a wake: under `Release`, frees every chunk no backup uses.
pub fn after_wake(backend: &dyn Backend) -> Result<()> {
    let unused = with_store(|s| {
        if s.policy == devmem_host_policy::Release && !s.growing {
            s.remove_unused()
        } else {
            Vec::new()
        }
    });
    free_chunks(backend, unused).map(drop)
}

/// Frees every chunk no backup uses; returns the bytes freed.
pub fn release_free(backend: &dyn Backend) -> Result<usize> {
    wait_for_grower();
    let unused = with_store(Store::remove_unused);
    free_chunks(backend, unused)
}

/// Grows the store until it has at least `bytes` free for backups, in the background; with
/// `wait`, returns once that memory is ready (or the first error).
pub fn reserve(backend: &Arc<dyn Backend>, device: i32, bytes: usize, wait: bool) -> Result<()> {
    let need = blocks_for(bytes);
    request_blocks(backend, device, need);
    if wait {
        wait_for_grower();
        let (free, err) = with_store(|s| (s.free_blocks(), s.grow_error.take()));
        if let Some(err) = err {
            return Err(err);
        }
        if free < need {
            bail!(
                HostOutOfMemory,
                "the host store has {} bytes free after reserving {bytes}",
                free * HOST_BLOCK
            );
        }
    }
    Ok(())
}

fn wait_for_grower() {
    let mut guard = STORE.lock();
    while guard.as_ref().is_some_and(|s| s.growing) {
        READY.wait(&mut guard);
    }
}
