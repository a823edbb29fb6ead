//! What devmem layers over any backend when a driver needs it: physical memory in chunks
//! (large allocations on CUDA and HIP by default, every allocation on HIP), and giving device
//! memory back to the driver by freeing and re-reserving an allocation's address range (HIP).
//!
//! * **Chunks** (`DEVMEM_CHUNK_SIZE` for every allocation, `DEVMEM_WAKE_CHUNK_MB` for those of
//!   at least two chunks): an allocation's physical memory is several driver handles of at
//!   most the chunk size (rounded up to the granularity), mapped one after the other. The
//!   handle devmem's registry holds is this layer's id for the set; the layer keeps the set's
//!   driver handles (one table, keyed by that id), so the registry above still sees one
//!   physical object per allocation, and [`Backend::chunks`] lists the pieces (vLLM's ROCm
//!   handle form, `[(handle, size), ...]`). Chunk boundaries follow from the allocation's size
//!   alone, so unmapping needs no table; a piece whose unmap failed is remembered, so a retry
//!   unmaps only what is still mapped. A wake creates and maps a set piece by piece
//!   ([`Backend::create_map_and_fill`]), handing each piece to the restore pipeline as soon as
//!   it is mapped, so the piece's bytes copy while the next piece is created and mapped; a
//!   failure waits for those copies before it unmaps anything.
//! * **Reservation cycling** (`DEVMEM_RERESERVE`): ROCm returns released device memory only
//!   once the address reservation it was mapped in is freed (vLLM PRs 37533, 43022). After a
//!   set is released, the layer frees the range it was last mapped at and reserves the same
//!   addresses again ([`Backend::reserve_at`]). Every reservation devmem makes takes the same
//!   lock as the cycle, so no other devmem call can land in the range meanwhile. If the
//!   driver still hands back other addresses (another library in the process reserved them),
//!   the range is remembered as lost: the next map there tries to reserve it again first (and
//!   fails cleanly, keeping the host backup, if it cannot), freeing it is a no-op, and a new
//!   reservation the driver places over a lost range is never handed out (an exact match is
//!   given back to its owner; others are set aside and retried).
//!
//! Sets are released, mapped and unmapped piece by piece, in order; a failure undoes what the
//! call did, and what an undo could not undo is reported ([`Stranded`]) or remembered, never
//! forgotten.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{devmem_backend, Backend, HostMemory, Stranded};
use crate::error::{bail, Error, Result};

/// One allocation's physical memory.
struct Set {
    /// (driver handle, bytes) of each piece, in address order. Handle 0: a piece already
    /// released by a release that failed on a later piece; mapping the set creates it anew.
    pieces: Vec<(u64, usize)>,
    /// Where it is mapped now.
    mapped_at: Option<u64>,
    /// Where it was last mapped (the range to cycle once it is released).
    was_at: Option<u64>,
}

#[derive(Default)]
struct State {
    sets: HashMap<u64, Set>,
    next_id: u64,
    /// Start address -> set mapped there.
    by_va: HashMap<u64, u64>,
    /// Start address -> which pieces are still mapped, after an unmap or an undo that failed.
    partial: HashMap<u64, Vec<bool>>,
    /// Ranges freed to return memory that could not be reserved again: start -> (device, size).
    lost: BTreeMap<u64, (i32, usize)>,
}

/// A backend with chunked physical memory and/or reservation cycling.
pub struct Layered {
    inner: Arc<dyn Backend>,
    /// Bytes per chunk (0: one piece per allocation).
    chunk: usize,
    /// Allocations smaller than this stay one piece.
    min_chunked: usize,
    /// Free and re-reserve a range after its memory is released.
    cycle: bool,
    state: Mutex<State>,
    /// Held by every reservation and by each cycle's free + re-reserve.
    reserving: Mutex<()>,
}

/// New reservations set aside before one that overlaps no lost range is found.
const RESERVE_ATTEMPTS: usize = 8;

/// The start address of each of `sizes` laid end to end from `va`.
fn starts(va: u64, sizes: impl IntoIterator<Item = usize>) -> Vec<u64> {
    let mut at = va;
    sizes
        .into_iter()
        .map(|n| {
            let start = at;
            at += n as u64;
            start
        })
        .collect()
}

/// Names piece `i` of `count` in a message.
fn piece(i: usize, count: usize, n: usize, at: u64) -> String {
    format!("piece {} of {count} ({n} bytes at {at:#x})", i + 1)
}

impl Layered {
    /// Wraps `inner`: allocations of at least `min_chunked` bytes get chunks of `chunk` bytes
    /// (0: none do); `cycle` re-reserves ranges after a release.
    pub fn new(inner: Arc<dyn Backend>, chunk: usize, min_chunked: usize, cycle: bool) -> Self {
        Self {
            inner,
            chunk,
            min_chunked,
            cycle,
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            reserving: Mutex::new(()),
        }
    }

    /// Whether `[va, va+size)` overlaps a lost range; an exact match is taken back by its
    /// owner (then `Some(true)`).
    fn claim_lost(&self, va: u64, size: usize) -> Option<bool> {
        let mut state = self.state.lock();
        if state.lost.get(&va).is_some_and(|&(_, n)| n == size) {
            state.lost.remove(&va);
            return Some(true);
        }
        let end = va + size as u64;
        let overlaps = state
            .lost
            .range(..end)
            .next_back()
            .is_some_and(|(&start, &(_, n))| start + n as u64 > va);
        overlaps.then_some(false)
    }

    /// The piece sizes of `size` bytes on `device`.
    fn split(&self, device: i32, size: usize) -> Result<Vec<usize>> {
        if self.chunk == 0 || size == 0 || size < self.min_chunked {
            return Ok(vec![size]);
        }
        let chunk = self
            .chunk
            .checked_next_multiple_of(self.inner.granularity(device)?)
            .unwrap_or(size);
        let mut out = Vec::with_capacity(size.div_ceil(chunk));
        let mut left = size;
        while left > 0 {
            out.push(left.min(chunk));
            left -= left.min(chunk);
        }
        Ok(out)
    }

    fn pieces(&self, handle: u64) -> Result<Vec<(u64, usize)>> {
        match self.state.lock().sets.get(&handle) {
            Some(set) => Ok(set.pieces.clone()),
            None => bail!(
                InvalidArgument,
                "handle {handle:#x} is not physical memory devmem created"
            ),
        }
    }

    /// Reserves a lost range again before anything is mapped into it.
    fn recover(&self, device: i32, va: u64) -> Result<()> {
        let _reserving = self.reserving.lock();
        let lost = self.state.lock().lost.get(&va).copied();
        let Some((_, size)) = lost else {
            return Ok(());
        };
        self.inner.reserve_at(device, va, size).map_err(|e| {
            e.context(format!(
                "the address range {va:#x} (+{size}) was freed to return its memory and \
                 could not be reserved again; the allocation cannot be mapped"
            ))
        })?;
        self.state.lock().lost.remove(&va);
        log::info!("devmem: reserved the lost range {va:#x} (+{size}) again");
        Ok(())
    }

    /// Frees the range a released set was mapped at and reserves the same addresses again.
    fn cycle_range(&self, device: i32, va: u64, size: usize) {
        let _reserving = self.reserving.lock();
        if let Err(err) = self.inner.free_va(device, va, size) {
            log::warn!(
                "devmem: freeing {va:#x} (+{size}) to return its memory to the driver: {err}; \
                 the driver may keep the memory until the allocation is freed"
            );
            return;
        }
        if let Err(err) = self.inner.reserve_at(device, va, size) {
            log::error!(
                "devmem: reserving {va:#x} (+{size}) again after returning its memory: {err}; \
                 the next wake tries again"
            );
            self.state.lock().lost.insert(va, (device, size));
        }
    }

    /// Maps each piece at its offset. On failure, unmaps what this call mapped; the `bool`s are
    /// whether some of it is still mapped (then remembered in `partial`) and whether any piece
    /// was mapped at all (ROCm then keeps the memory until the range is cycled).
    fn map_pieces(
        &self,
        device: i32,
        va: u64,
        pieces: &[(u64, usize)],
        access: bool,
    ) -> std::result::Result<(), (Error, bool, bool)> {
        let at = starts(va, pieces.iter().map(|p| p.1));
        let mut mapped = vec![false; pieces.len()];
        let mut failure = None;
        for (i, &(handle, size)) in pieces.iter().enumerate() {
            let step = self.inner.map(device, at[i], size, handle).and_then(|()| {
                mapped[i] = true;
                if access {
                    self.inner.set_access(device, at[i], size)
                } else {
                    Ok(())
                }
            });
            if let Err(err) = step {
                failure = Some(err.context(piece(i, pieces.len(), size, at[i])));
                break;
            }
        }
        let Some(err) = failure else {
            return Ok(());
        };
        let any = mapped.iter().any(|m| *m);
        for (i, &(_, size)) in pieces.iter().enumerate() {
            if mapped[i] {
                match self.inner.unmap(device, at[i], size) {
                    Ok(()) => mapped[i] = false,
                    Err(undo) => log::error!("devmem: undoing a partial map at {va:#x}: {undo}"),
                }
            }
        }
        let still = mapped.iter().any(|m| *m);
        if still {
            self.state.lock().partial.insert(va, mapped);
        }
        Err((err, still, any))
    }

    fn create_pieces(&self, device: i32, size: usize) -> Result<u64> {
        let sizes = self.split(device, size)?;
        let mut pieces = Vec::with_capacity(sizes.len());
        for (i, &n) in sizes.iter().enumerate() {
            match self.inner.create(device, n) {
                Ok(handle) => pieces.push((handle, n)),
                Err(err) => {
                    for &(handle, _) in pieces.iter().rev() {
                        if let Err(undo) = self.inner.release(device, handle) {
                            log::error!(
                                "devmem: releasing chunk {handle:#x} after a failed create: \
                                 {undo}; the driver keeps it"
                            );
                        }
                    }
                    return Err(if sizes.len() > 1 {
                        err.context(format!("chunk {} of {} ({n} bytes)", i + 1, sizes.len()))
                    } else {
                        err
                    });
                }
            }
        }
        Ok(self.insert_set(pieces))
    }

    /// Keeps `pieces` as a new set; returns its id.
    fn insert_set(&self, pieces: Vec<(u64, usize)>) -> u64 {
        let mut state = self.state.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.sets.insert(
            id,
            Set {
                pieces,
                mapped_at: None,
                was_at: None,
            },
        );
        id
    }

    /// Creates, maps with access and fills (`fill`) each of `sizes` in turn from `va`.
    fn create_map_and_fill_pieces(
        &self,
        device: i32,
        va: u64,
        sizes: &[usize],
        fill: &mut dyn FnMut(u64, usize) -> Result<()>,
    ) -> std::result::Result<u64, Stranded> {
        let at = starts(va, sizes.iter().copied());
        let mut pieces: Vec<(u64, usize)> = sizes.iter().map(|&n| (0, n)).collect();
        let mut mapped = vec![false; sizes.len()];
        let mut failure = None;
        for (i, &n) in sizes.iter().enumerate() {
            let name = || piece(i, sizes.len(), n, at[i]);
            let handle = match self.inner.create(device, n) {
                Ok(handle) => handle,
                Err(err) => {
                    failure = Some(err.context(name()));
                    break;
                }
            };
            pieces[i].0 = handle;
            if let Err(err) = self.inner.map(device, at[i], n, handle) {
                failure = Some(err.context(name()));
                break;
            }
            mapped[i] = true;
            if let Err(err) = self.inner.set_access(device, at[i], n) {
                failure = Some(err.context(name()));
                break;
            }
            if let Err(err) = fill(at[i], n) {
                failure = Some(err);
                break;
            }
        }
        let Some(error) = failure else {
            let id = self.insert_set(pieces);
            self.mapped(id, va);
            return Ok(id);
        };
        Err(self.undo_fill(device, va, pieces, mapped, error))
    }

    /// Undoes a failed [`create_map_and_fill_pieces`](Self::create_map_and_fill_pieces):
    /// waits for the copies queued into the mapped pieces, then unmaps and releases each piece
    /// (last first). What could not be undone is kept as a set and reported.
    fn undo_fill(
        &self,
        device: i32,
        va: u64,
        mut pieces: Vec<(u64, usize)>,
        mut mapped: Vec<bool>,
        error: Error,
    ) -> Stranded {
        let was_mapped = mapped.iter().any(|m| *m);
        if was_mapped {
            // Unmapping memory that a queued copy still writes is undefined on the driver.
            if let Err(err) = self.inner.wait_copies(device) {
                log::error!("devmem: waiting for the copies into a partly mapped wake: {err}");
            }
        }
        let at = starts(va, pieces.iter().map(|p| p.1));
        for i in (0..pieces.len()).rev() {
            let (handle, n) = pieces[i];
            if mapped[i] {
                match self.inner.unmap(device, at[i], n) {
                    Ok(()) => mapped[i] = false,
                    Err(undo) => {
                        log::error!("devmem: undoing a partial wake at {:#x}: {undo}", at[i]);
                        continue;
                    }
                }
            }
            if handle != 0 {
                match self.inner.release(device, handle) {
                    Ok(()) => pieces[i].0 = 0,
                    Err(undo) => log::error!(
                        "devmem: releasing chunk {handle:#x} after a failed wake: {undo}"
                    ),
                }
            }
        }
        let still_mapped = mapped.iter().any(|m| *m);
        if !still_mapped && pieces.iter().all(|p| p.0 == 0) {
            if self.cycle && was_mapped {
                self.cycle_range(device, va, pieces.iter().map(|p| p.1).sum());
            }
            return Stranded::nothing(error);
        }
        let id = self.insert_set(pieces);
        if still_mapped {
            self.state.lock().partial.insert(va, mapped);
            self.mapped(id, va);
        }
        Stranded {
            error,
            handle: Some(id),
            mapped: still_mapped,
        }
    }

    /// The set's pieces, after creating anew those a failed release gave back already.
    fn complete(&self, device: i32, handle: u64) -> Result<Vec<(u64, usize)>> {
        let mut pieces = self.pieces(handle)?;
        let missing: Vec<usize> = (0..pieces.len()).filter(|&i| pieces[i].0 == 0).collect();
        for (k, &i) in missing.iter().enumerate() {
            match self.inner.create(device, pieces[i].1) {
                Ok(created) => pieces[i].0 = created,
                Err(err) => {
                    for &j in &missing[..k] {
                        if let Err(undo) = self.inner.release(device, pieces[j].0) {
                            log::error!("devmem: releasing a recreated chunk: {undo}");
                            continue; // kept in the set below, so it is not lost
                        }
                        pieces[j].0 = 0;
                    }
                    self.store(handle, &pieces);
                    return Err(err.context("recreating the chunks a failed release gave back"));
                }
            }
        }
        if !missing.is_empty() {
            self.store(handle, &pieces);
        }
        Ok(pieces)
    }

    fn store(&self, handle: u64, pieces: &[(u64, usize)]) {
        if let Some(set) = self.state.lock().sets.get_mut(&handle) {
            set.pieces = pieces.to_vec();
        }
    }

    /// Maps again, with access, the pieces of the set at `va` that were mapped (`was`) and
    /// are not any more (`mapped`), updating `mapped`.
    fn remap(&self, device: i32, va: u64, sizes: &[usize], was: &[bool], mapped: &mut [bool]) {
        let id = self.state.lock().by_va.get(&va).copied();
        let Some(pieces) = id.and_then(|id| self.pieces(id).ok()) else {
            return;
        };
        for (i, (&n, at)) in sizes
            .iter()
            .zip(starts(va, sizes.iter().copied()))
            .enumerate()
        {
            if !was[i] || mapped[i] || pieces.get(i).is_none_or(|p| p.1 != n) {
                continue;
            }
            let back = self
                .inner
                .map(device, at, n, pieces[i].0)
                .and_then(|()| self.inner.set_access(device, at, n));
            match back {
                Ok(()) => mapped[i] = true,
                Err(err) => log::error!("devmem: mapping {at:#x} back after a failed unmap: {err}"),
            }
        }
    }

    fn mapped(&self, handle: u64, va: u64) {
        let mut state = self.state.lock();
        if let Some(set) = state.sets.get_mut(&handle) {
            set.mapped_at = Some(va);
            set.was_at = Some(va);
        }
        state.by_va.insert(va, handle);
    }
}

impl Backend for Layered {
    fn kind(&self) -> devmem_backend {
        self.inner.kind()
    }
    fn current_device(&self) -> Option<i32> {
        self.inner.current_device()
    }
    fn device_count(&self) -> i32 {
        self.inner.device_count()
    }
    fn granularity(&self, device: i32) -> Result<usize> {
        self.inner.granularity(device)
    }
    fn reserve(&self, device: i32, size: usize) -> Result<u64> {
        let _reserving = self.reserving.lock();
        let mut aside = Vec::new();
        let mut found = None;
        for _ in 0..RESERVE_ATTEMPTS {
            let va = self.inner.reserve(device, size)?;
            match self.claim_lost(va, size) {
                None => {
                    found = Some(va);
                    break;
                }
                Some(true) => log::info!("devmem: the lost range {va:#x} is reserved again"),
                Some(false) => aside.push(va),
            }
        }
        for va in aside {
            if let Err(err) = self.inner.free_va(device, va, size) {
                log::error!("devmem: freeing a reservation set aside at {va:#x}: {err}");
            }
        }
        found.ok_or_else(|| {
            Error::new(
                crate::error::devmem_status::OutOfMemory,
                format!(
                    "{RESERVE_ATTEMPTS} reservations of {size} bytes all overlapped address \
                     ranges sleeping allocations need back"
                ),
            )
        })
    }
    fn reserve_at(&self, device: i32, va: u64, size: usize) -> Result<()> {
        self.inner.reserve_at(device, va, size)
    }

    fn free_va(&self, device: i32, va: u64, size: usize) -> Result<()> {
        if self.state.lock().lost.remove(&va).is_some() {
            return Ok(()); // not reserved any more
        }
        self.inner.free_va(device, va, size)
    }

    fn create(&self, device: i32, size: usize) -> Result<u64> {
        self.create_pieces(device, size)
    }

    fn release(&self, device: i32, handle: u64) -> Result<()> {
        let Some(mut set) = self.state.lock().sets.remove(&handle) else {
            bail!(
                InvalidArgument,
                "handle {handle:#x} is not physical memory devmem created"
            );
        };
        let total: usize = set.pieces.iter().map(|p| p.1).sum();
        let mut failure = None;
        for (piece, size) in set.pieces.iter_mut().filter(|p| p.0 != 0) {
            match self.inner.release(device, *piece) {
                Ok(()) => *piece = 0,
                Err(err) => {
                    failure = Some(err.context(format!("chunk {piece:#x} ({size} bytes)")));
                    break;
                }
            }
        }
        if let Some(err) = failure {
            // What is left stays held under the same id: a retry releases the rest.
            self.state.lock().sets.insert(handle, set);
            return Err(err);
        }
        if let (true, None, Some(va)) = (self.cycle, set.mapped_at, set.was_at) {
            self.cycle_range(device, va, total);
        }
        Ok(())
    }

    fn map(&self, device: i32, va: u64, size: usize, handle: u64) -> Result<()> {
        self.map_with_access_inner(device, va, size, handle, false)
            .map_err(|s| s.error)
    }

    fn set_access(&self, device: i32, va: u64, size: usize) -> Result<()> {
        let sizes = self.split(device, size)?;
        let at = starts(va, sizes.iter().copied());
        sizes
            .iter()
            .zip(at)
            .try_for_each(|(&n, at)| self.inner.set_access(device, at, n))
    }

    fn set_access_read_only(&self, device: i32, va: u64, size: usize) -> Result<()> {
        let sizes = self.split(device, size)?;
        let at = starts(va, sizes.iter().copied());
        sizes
            .iter()
            .zip(at)
            .try_for_each(|(&n, at)| self.inner.set_access_read_only(device, at, n))
    }

    /// Pieces ([`chunks`](Backend::chunks)) are the inner driver's handles: exported by it.
    fn export_fd(&self, device: i32, handle: u64) -> Result<std::os::fd::OwnedFd> {
        self.inner.export_fd(device, handle)
    }

    fn import_fd(&self, device: i32, fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
        self.inner.import_fd(device, fd)
    }

    /// Imports each piece with the inner driver and holds them as one set, like
    /// [`create`](Backend::create)'s.
    fn import_pieces(
        &self,
        device: i32,
        pieces: &[(usize, std::os::fd::BorrowedFd<'_>)],
    ) -> Result<u64> {
        // Unmap and set_access walk this process's chunk layout (`split`): memory kept by a
        // process with another chunk size would be mapped in pieces they do not match (a
        // failed set_access, then an unmap that cannot undo the map). Refused up front.
        let total = pieces
            .iter()
            .try_fold(0usize, |sum, &(n, _)| sum.checked_add(n));
        let Some(total) = total else {
            bail!(InvalidArgument, "the kept pieces' sizes overflow");
        };
        let want = self.split(device, total)?;
        if !pieces.iter().map(|&(n, _)| n).eq(want.iter().copied()) {
            bail!(
                InvalidArgument,
                "the kept memory is in {} piece(s) ({:?} bytes) but this process maps {total} \
                 bytes in {} chunk(s) of {:?} bytes: keep and attach with the same chunk size \
                 (DEVMEM_CHUNK_SIZE, DEVMEM_WAKE_CHUNK_MB)",
                pieces.len(),
                pieces.iter().map(|&(n, _)| n).take(4).collect::<Vec<_>>(),
                want.len(),
                want.iter().take(4).collect::<Vec<_>>()
            );
        }
        let mut imported = Vec::with_capacity(pieces.len());
        for (i, &(n, fd)) in pieces.iter().enumerate() {
            match self.inner.import_fd(device, fd) {
                Ok(handle) => imported.push((handle, n)),
                Err(err) => {
                    for &(handle, _) in imported.iter().rev() {
                        if let Err(undo) = self.inner.release(device, handle) {
                            log::error!("devmem: releasing imported chunk {handle:#x}: {undo}");
                        }
                    }
                    return Err(err.context(format!(
                        "piece {} of {} ({n} bytes)",
                        i + 1,
                        pieces.len()
                    )));
                }
            }
        }
        let mut state = self.state.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.sets.insert(
            id,
            Set {
                pieces: imported,
                mapped_at: None,
                was_at: None,
            },
        );
        Ok(id)
    }

    fn unmap(&self, device: i32, va: u64, size: usize) -> Result<()> {
        let sizes = self.split(device, size)?;
        let mut mapped = self
            .state
            .lock()
            .partial
            .remove(&va)
            .filter(|m| m.len() == sizes.len())
            .unwrap_or_else(|| vec![true; sizes.len()]);
        let was = mapped.clone();
        let at = starts(va, sizes.iter().copied());
        let mut failure = None;
        for (i, &n) in sizes.iter().enumerate() {
            if mapped[i] {
                match self.inner.unmap(device, at[i], n) {
                    Ok(()) => mapped[i] = false,
                    Err(err) => {
                        failure = Some(err.context(piece(i, sizes.len(), n, at[i])));
                        break;
                    }
                }
            }
        }
        if let Some(err) = failure {
            // Map back what this call unmapped, so a failed unmap leaves the whole range
            // mapped as the caller assumes; what cannot be is remembered.
            self.remap(device, va, &sizes, &was, &mut mapped);
            if mapped.iter().any(|m| !m) {
                self.state.lock().partial.insert(va, mapped);
            }
            return Err(err);
        }
        let mut state = self.state.lock();
        if let Some(id) = state.by_va.remove(&va) {
            if let Some(set) = state.sets.get_mut(&id) {
                set.mapped_at = None;
            }
        }
        Ok(())
    }

    fn synchronize(&self, device: i32) -> Result<()> {
        self.inner.synchronize(device)
    }
    fn copy_to_host_async(&self, device: i32, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        self.inner.copy_to_host_async(device, dst, src, len)
    }
    fn copy_to_device_async(
        &self,
        device: i32,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<()> {
        self.inner.copy_to_device_async(device, dst, src, len)
    }
    fn zero_async(&self, device: i32, dst: u64, len: usize) -> Result<()> {
        self.inner.zero_async(device, dst, len)
    }
    fn wait_copies(&self, device: i32) -> Result<()> {
        self.inner.wait_copies(device)
    }
    fn mem_get_info(&self, device: i32) -> Result<(usize, usize)> {
        self.inner.mem_get_info(device)
    }
    fn host_register(&self, device: i32, ptr: *mut u8, len: usize) -> Result<()> {
        self.inner.host_register(device, ptr, len)
    }
    fn host_unregister(&self, device: i32, ptr: *mut u8) -> Result<()> {
        self.inner.host_unregister(device, ptr)
    }
    fn record_copy_marker(&self, device: i32) -> Result<u64> {
        self.inner.record_copy_marker(device)
    }
    fn wait_copy_marker(&self, device: i32, marker: u64) -> Result<()> {
        self.inner.wait_copy_marker(device, marker)
    }
    fn host_memory(&self) -> HostMemory {
        self.inner.host_memory()
    }
    fn alloc_host(&self, device: i32, len: usize) -> Result<*mut u8> {
        self.inner.alloc_host(device, len)
    }
    fn free_host(&self, device: i32, ptr: *mut u8) -> Result<()> {
        self.inner.free_host(device, ptr)
    }
    fn can_checksum(&self) -> bool {
        self.inner.can_checksum()
    }
    fn checksums(&self, device: i32, ranges: &[(u64, usize)]) -> Result<Vec<u64>> {
        self.inner.checksums(device, ranges)
    }
    fn describe(&self) -> String {
        let mut text = self.inner.describe();
        if self.chunk > 0 {
            text.push_str(&format!(
                ", physical memory in chunks of {} bytes",
                self.chunk
            ));
            if self.min_chunked > 0 {
                text.push_str(&format!(
                    " for allocations of {} bytes or more",
                    self.min_chunked
                ));
            }
        }
        if self.cycle {
            text.push_str(", address ranges re-reserved after a release");
        }
        text
    }

    fn fully_mapped(&self, va: u64) -> bool {
        self.state
            .lock()
            .partial
            .get(&va)
            .is_none_or(|mapped| mapped.iter().all(|m| *m))
    }

    fn chunks(&self, handle: u64, size: usize) -> Vec<(u64, usize)> {
        self.state
            .lock()
            .sets
            .get(&handle)
            .map_or_else(|| vec![(handle, size)], |set| set.pieces.clone())
    }

    fn map_with_access(
        &self,
        device: i32,
        va: u64,
        size: usize,
        handle: u64,
    ) -> std::result::Result<(), Stranded> {
        self.map_with_access_inner(device, va, size, handle, true)
    }

    fn create_map_and_fill(
        &self,
        device: i32,
        va: u64,
        size: usize,
        fill: &mut dyn FnMut(u64, usize) -> Result<()>,
    ) -> std::result::Result<u64, Stranded> {
        let sizes = self.split(device, size).map_err(Stranded::nothing)?;
        if sizes.len() < 2 {
            return super::fill_whole(self, device, va, size, fill);
        }
        self.recover(device, va).map_err(Stranded::nothing)?;
        self.create_map_and_fill_pieces(device, va, &sizes, fill)
    }
}

impl Layered {
    fn map_with_access_inner(
        &self,
        device: i32,
        va: u64,
        size: usize,
        handle: u64,
        access: bool,
    ) -> std::result::Result<(), Stranded> {
        self.recover(device, va).map_err(Stranded::nothing)?;
        let pieces = self.complete(device, handle).map_err(Stranded::nothing)?;
        let total: usize = pieces.iter().map(|p| p.1).sum();
        if total != size {
            return Err(Stranded::nothing(Error::new(
                crate::error::devmem_status::InvalidArgument,
                format!(
                    "handle {handle:#x} holds {total} bytes in {} chunk(s), not {size}",
                    pieces.len()
                ),
            )));
        }
        match self.map_pieces(device, va, &pieces, access) {
            Ok(()) => {
                self.mapped(handle, va);
                Ok(())
            }
            Err((error, mapped, any)) => {
                if mapped {
                    self.mapped(handle, va);
                } else if any {
                    // Mapped, then unmapped again: the release cycles the range so ROCm gives
                    // the memory back (DEVMEM_RERESERVE).
                    if let Some(set) = self.state.lock().sets.get_mut(&handle) {
                        set.was_at = Some(va);
                    }
                }
                Err(Stranded {
                    error,
                    handle: None,
                    mapped,
                })
            }
        }
    }
}
