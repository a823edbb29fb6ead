//! The save and restore pipelines: how allocations' bytes move between device memory and
//! backups, and when device memory is unmapped, released and mapped again.
//!
//! Synchronisation points, each guarded by a test (docs/guarantees.md):
//! * save waits for every device it touches before queueing a copy or unmapping anything;
//! * a batch's allocations are unmapped only after the batch's copy marker has been waited for;
//! * on a failure, every marker not yet waited for is waited for (and so returned to the
//!   backend's pool) and every device's copies are finished before a backup goes back;
//! * restore waits for its copies (and, with `DEVMEM_ZERO_ON_WAKE`, the zero fills of
//!   discarded allocations) before it reports success;
//! * a restore that fails part way through a chunked allocation waits for the copies already
//!   queued into its mapped chunks before unmapping them (`Backend::create_map_and_fill`).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::shared::{Region, SlotKey};
use super::Backup;
use crate::backend::{Backend, Stranded};
use crate::error::{devmem_status, Error, Result};

/// One mapped allocation to save or discard.
#[derive(Debug, Clone)]
pub struct SaveTarget {
    /// Start address.
    pub va: u64,
    /// Mapped bytes.
    pub size: usize,
    /// Device ordinal.
    pub device: i32,
    /// The physical memory mapped there.
    pub handle: u64,
    /// Which allocation it is, for a slot of the shared region.
    pub key: SlotKey,
    /// Record a device checksum of the bytes with the backup (where the backend has one).
    pub checksum: bool,
    /// Named byte ranges (offset, bytes) of the allocation whose checksums the backup records
    /// too ([`word_range`]), when `checksum` is set.
    pub ranges: Vec<(u64, u64)>,
}

/// The device range a named range's checksum covers: its whole 8-byte words from its start,
/// which must be 8-byte aligned (the kernel reads words). `None` when it is not aligned;
/// a length of 0 when the range is shorter than a word.
pub fn word_range(start: u64, len: u64) -> Option<(u64, usize)> {
    (start % 8 == 0).then_some((start, (len - len % 8) as usize))
}

/// How far releasing one target got, when it got as far as unmapping.
enum Released {
    /// Unmapped and released.
    Fully,
    /// Unmapped, but the driver would not release the physical memory: the handle is still
    /// held, and the pipeline stops with the error.
    HandleKept(u64, Error),
}

/// Copies queued between two markers on one device's copy stream.
struct Batch {
    device: i32,
    marker: u64,
    /// Indices into the offload targets.
    targets: std::ops::Range<usize>,
    waited: bool,
}

/// Offload copies are grouped into batches of about this many bytes
/// (`DEVMEM_COPY_BATCH_MB` overrides); each batch's allocations are unmapped as soon as its
/// copies finish, while later batches are still copying.
const BATCH_BYTES: usize = 512 << 20;

fn batch_bytes() -> usize {
    crate::logging::env_or_warn(
        "DEVMEM_COPY_BATCH_MB",
        "a whole number of MiB from 1 to 65536",
        |v| {
            v.parse::<usize>()
                .ok()
                .filter(|mb| (1..=65536).contains(mb))
        },
    )
    .map_or(BATCH_BYTES, |mb| mb << 20)
}

/// Unmaps and releases one target. `Err` when it is still mapped with its contents.
fn release(backend: &dyn Backend, t: &SaveTarget) -> std::result::Result<Released, Error> {
    backend
        .unmap(t.device, t.va, t.size)
        .map_err(|err| err.context(format!("sleep: {:#x} stays mapped", t.va)))?;
    match backend.release(t.device, t.handle) {
        Ok(()) => Ok(Released::Fully),
        Err(err) => Ok(Released::HandleKept(
            t.handle,
            err.context(format!(
                "sleep: {:#x} is unmapped but its physical memory is still held",
                t.va
            )),
        )),
    }
}

/// Releases `t` and commits what happened; the error that stops the pipeline, if any.
fn release_and_commit(
    backend: &dyn Backend,
    t: &SaveTarget,
    backup: Option<Backup>,
    commit: &mut impl FnMut(&SaveTarget, Option<Backup>, Option<u64>),
) -> std::result::Result<(), (Error, Option<Backup>)> {
    match release(backend, t) {
        Ok(Released::Fully) => {
            commit(t, backup, None);
            Ok(())
        }
        Ok(Released::HandleKept(handle, err)) => {
            commit(t, backup, Some(handle));
            Err((err, None))
        }
        Err(err) => Err((err, backup)),
    }
}

/// Waits for every queued copy on `devices` before host memory they target is reused.
fn finish_copies(backend: &dyn Backend, devices: &BTreeSet<i32>) {
    for device in devices {
        if let Err(err) = backend.wait_copies(*device) {
            log::error!("devmem: waiting for copies on device {device} after a failure: {err}");
        }
    }
}

/// Saves `offloads` to backups and releases their device memory, and releases `discards`
/// without saving them. `commit(target, backup, kept)` is called for each target whose device
/// memory was unmapped (`backup` is `None` for a discard; `kept` is the handle when the driver
/// would not release it), in the order they finish.
///
/// Order: wait for the devices; reserve host memory for everything (failing before any copy
/// when the bound on host memory does not allow it); queue every copy, in batches closed by a
/// marker; release the discards while the copies run; then, batch by batch, wait for the
/// marker and release that batch. A failure stops the pipeline: targets not yet committed stay
/// mapped with their contents and their backups go back to the store; the first error is
/// returned.
pub fn save(
    backend: &Arc<dyn Backend>,
    offloads: &[SaveTarget],
    discards: &[SaveTarget],
    mut commit: impl FnMut(&SaveTarget, Option<Backup>, Option<u64>),
) -> Result<()> {
    let devices: BTreeSet<i32> = offloads.iter().chain(discards).map(|t| t.device).collect();
    for device in &devices {
        backend.synchronize(*device).map_err(|e| {
            e.context("sleep: waiting for the device before unmapping; nothing was released")
        })?;
    }
    if let Some(first) = offloads.first() {
        super::expect(backend, first.device, offloads.iter().map(|t| t.size))
            .map_err(|e| e.context("sleep: nothing was released"))?;
    }

    let mut sums = checksums(backend, offloads)
        .map_err(|e| e.context("sleep: checksums of the bytes to save; nothing was released"))?
        .into_iter();

    // 1. Queue the copies.
    let limit = batch_bytes();
    let mut backups: Vec<Option<Backup>> = Vec::with_capacity(offloads.len());
    let mut batches: Vec<Batch> = Vec::new();
    let mut batch_start = 0;
    let mut in_batch = 0;
    let mut failure: Option<Error> = None;
    for (i, t) in offloads.iter().enumerate() {
        let (sum, range_sums) = sums.next().unwrap_or_default();
        let queued = super::take(backend, t.device, t.size, &t.key).and_then(|mut backup| {
            backup.set_checksum(sum);
            backup.set_range_sums(t.ranges.iter().copied().zip(range_sums).collect());
            let pieces = backup.pieces(t.va, t.size);
            backups.push(Some(backup));
            pieces.into_iter().try_for_each(|(src, dst, n)| {
                backend
                    .copy_to_host_async(t.device, dst as *mut u8, src, n)
                    .map_err(|e| e.context(format!("sleep: saving {:#x} ({} bytes)", t.va, t.size)))
            })
        });
        if let Err(err) = queued {
            failure = Some(err.context("sleep: nothing was released"));
            break;
        }
        in_batch += t.size;
        let last = i + 1 == offloads.len();
        if last || in_batch >= limit || offloads[i + 1].device != t.device {
            match backend.record_copy_marker(t.device) {
                Ok(marker) => batches.push(Batch {
                    device: t.device,
                    marker,
                    targets: batch_start..i + 1,
                    waited: false,
                }),
                Err(err) => {
                    failure = Some(err.context("sleep: nothing was released"));
                    break;
                }
            }
            batch_start = i + 1;
            in_batch = 0;
        }
    }

    // 2. Release the discards while the copies run; 3. then each finished batch.
    if failure.is_none() {
        for t in discards {
            if let Err((err, _)) = release_and_commit(&**backend, t, None, &mut commit) {
                failure = Some(err);
                break;
            }
        }
    }
    for batch in &mut batches {
        if failure.is_some() {
            break;
        }
        batch.waited = true;
        if let Err(err) = backend.wait_copy_marker(batch.device, batch.marker) {
            failure = Some(err.context("sleep: waiting for the copies to host memory"));
            break;
        }
        for backup in backups[batch.targets.clone()].iter().flatten() {
            backup.seal();
        }
        for i in batch.targets.clone() {
            let backup = backups[i].take();
            if let Err((err, unused)) =
                release_and_commit(&**backend, &offloads[i], backup, &mut commit)
            {
                backups[i] = unused;
                failure = Some(err);
                break;
            }
        }
    }
    let Some(err) = failure else {
        return Ok(());
    };
    // Every marker goes back to the backend, and no copy may still target a backup that goes
    // back to the store.
    for batch in batches.iter().filter(|b| !b.waited) {
        if let Err(e) = backend.wait_copy_marker(batch.device, batch.marker) {
            log::error!("devmem: waiting for a copy marker after a failure: {e}");
        }
    }
    finish_copies(&**backend, &devices);
    drop(backups);
    Err(err)
}

/// A target's checksum and those of its named ranges.
type Sums = (Option<u64>, Vec<Option<u64>>);

/// Device checksums of the targets that ask for one, and of their named ranges (`None` for
/// the others, for ranges not word-aligned, and for all where the backend has no checksum
/// kernel).
fn checksums(backend: &Arc<dyn Backend>, targets: &[SaveTarget]) -> Result<Vec<Sums>> {
    let mut out: Vec<Sums> = targets
        .iter()
        .map(|t| (None, vec![None; t.ranges.len()]))
        .collect();
    let devices: BTreeSet<i32> = targets
        .iter()
        .filter(|t| t.checksum)
        .map(|t| t.device)
        .collect();
    for device in devices {
        // (target, None for the whole allocation or Some(range index), device range)
        let mut picked: Vec<(usize, Option<usize>, (u64, usize))> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            if !t.checksum || t.device != device {
                continue;
            }
            picked.push((i, None, (t.va, t.size)));
            for (r, (offset, len)) in t.ranges.iter().enumerate() {
                match word_range(t.va + offset, *len) {
                    Some((_, 0)) => out[i].1[r] = Some(0),
                    Some(range) => picked.push((i, Some(r), range)),
                    None => {}
                }
            }
        }
        let ranges: Vec<(u64, usize)> = picked.iter().map(|p| p.2).collect();
        match backend.checksums(device, &ranges) {
            Ok(sums) => {
                for ((i, r, _), sum) in picked.into_iter().zip(sums) {
                    match r {
                        None => out[i].0 = Some(sum),
                        Some(r) => out[i].1[r] = Some(sum),
                    }
                }
            }
            Err(e) if e.status == devmem_status::Unsupported => return Ok(out),
            // A full device is when sleeps matter most: the backups go without a checksum
            // rather than the sleep failing (a restore by order of them is then refused on
            // this backend; named ranges get a host checksum when the manifest is written).
            Err(e) if e.status == devmem_status::OutOfMemory => {
                log::warn!("devmem: sleep: no device memory for checksums, saving without: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// One copy of a restore into memory that is already mapped (a durable restore from the
/// shared store): `len` bytes from host `src` to device `dst`.
#[derive(Debug, Clone)]
pub struct FillCopy {
    /// Device ordinal.
    pub device: i32,
    /// Device address.
    pub dst: u64,
    /// Host address of the saved bytes.
    pub src: usize,
    /// Bytes.
    pub len: usize,
    /// The checksum recorded for the bytes ([`word_range`] from `dst`), if any.
    pub checksum: Option<u64>,
}

/// Copies saved bytes into mapped allocations and verifies them: the restore of a durable
/// store, whose region `source` holds every copy's source. Waits for the application's work
/// on every target device first (a kernel still initialising a tensor must not overwrite the
/// bytes after this returns). Each copy is split at the region's pinned pieces and queued once
/// its piece is pinned. After one wait per device, each copy with a checksum is verified: on the
/// device where `dst` is word-aligned, else over the host bytes. Returns the indices of the
/// copies that failed verification. On an error, every queued copy is finished before it
/// returns and the targets hold unspecified bytes.
pub fn fill(
    backend: &Arc<dyn Backend>,
    copies: &[FillCopy],
    source: &Region,
) -> Result<Vec<usize>> {
    let devices: BTreeSet<i32> = copies.iter().map(|c| c.device).collect();
    for device in &devices {
        backend.synchronize(*device).map_err(|e| {
            e.context(
                "restore: waiting for the application's work on the device; nothing was copied",
            )
        })?;
    }
    let queued = copies.iter().try_for_each(|c| {
        source
            .split(c.src, c.len)
            .into_iter()
            .try_for_each(|(offset, host, n)| {
                source.wait_pinned(host, n)?;
                backend.copy_to_device_async(c.device, c.dst + offset as u64, host as *const u8, n)
            })
    });
    let waited = queued.and_then(|()| devices.iter().try_for_each(|d| backend.wait_copies(*d)));
    if let Err(err) = waited {
        finish_copies(&**backend, &devices);
        return Err(err.context("restore: the target allocations hold unspecified bytes"));
    }
    let mut bad = Vec::new();
    for device in &devices {
        let mut on_device: Vec<(usize, (u64, usize), u64)> = Vec::new();
        for (i, c) in copies.iter().enumerate() {
            let Some(expect) = c.checksum.filter(|_| c.device == *device) else {
                continue;
            };
            match word_range(c.dst, c.len as u64) {
                Some((_, 0)) => {}
                Some(range) if backend.can_checksum() => on_device.push((i, range, expect)),
                _ => {
                    // SAFETY: the source lies in the region's area, which stays mapped while
                    // `source` is borrowed.
                    let host = unsafe {
                        std::slice::from_raw_parts(c.src as *const u8, c.len - c.len % 8)
                    };
                    if crate::checksum::of(host) != expect {
                        bad.push(i);
                    }
                }
            }
        }
        if on_device.is_empty() {
            continue;
        }
        let ranges: Vec<(u64, usize)> = on_device.iter().map(|p| p.1).collect();
        let sums = backend
            .checksums(*device, &ranges)
            .map_err(|e| e.context("restore: the bytes were copied but could not be verified"))?;
        for ((i, _, expect), sum) in on_device.into_iter().zip(sums) {
            if sum != expect {
                bad.push(i);
            }
        }
    }
    bad.sort_unstable();
    Ok(bad)
}

/// One sleeping allocation to map again, and the saved pieces to copy back.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// Start address.
    pub va: u64,
    /// Bytes to map.
    pub size: usize,
    /// Device ordinal.
    pub device: i32,
    /// Physical memory still held from before (a release that failed), if any.
    pub handle: Option<u64>,
    /// Whether that memory is still mapped (an unmap that failed during a rolled-back wake).
    pub mapped: bool,
    /// (device address, host address, bytes) of each saved piece; empty for a discard.
    pub pieces: Vec<(u64, usize, usize)>,
}

/// Where a failed restore left one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Not reached by the call: as it was before.
    Untouched,
    /// Mapped by the call, then unmapped and released again.
    Undone,
    /// Unmapped again, but holding this physical memory (its release failed).
    Held(u64),
    /// Still mapped with this physical memory (its unmap failed): contents unspecified, the
    /// backup is intact.
    Mapped(u64),
}

/// A restore that failed: the error, and where each target was left.
#[derive(Debug)]
pub struct RestoreFailure {
    /// What failed first.
    pub error: Error,
    /// One entry per target, in the order given.
    pub left: Vec<Left>,
}

/// Maps every target and copies its saved pieces back; returns each target's handle.
///
/// Offloaded targets first, each one's copies queued as soon as it is mapped (a chunked one's
/// chunk by chunk, [`Backend::create_map_and_fill`]), so the copy engine runs while later
/// targets and chunks are created and mapped; then one wait per device. On any
/// failure the copies are finished and every mapping this call made is undone; a step of the
/// undo that fails is reported in [`RestoreFailure::left`] so the caller records it.
pub fn restore(
    backend: &Arc<dyn Backend>,
    targets: &[RestoreTarget],
) -> std::result::Result<Vec<u64>, RestoreFailure> {
    let devices: BTreeSet<i32> = targets.iter().map(|t| t.device).collect();
    let zero_discarded = crate::backend::settings().zero_on_wake;
    // Per target: the handle this call has mapped there, or (`kept`) physical memory a failed
    // map left held but unmapped.
    let mut handles: Vec<Option<u64>> = vec![None; targets.len()];
    let mut kept: Vec<Option<u64>> = vec![None; targets.len()];
    let mut failure = None;
    for (i, t) in targets.iter().enumerate() {
        // A new mapping is filled part by part as it is mapped (chunked memory: chunk k's
        // bytes copy while chunk k+1 is created and mapped).
        let mut filled = false;
        let mapped = match (t.handle, t.mapped) {
            (Some(handle), true) if backend.fully_mapped(t.va) => Ok(handle),
            // Chunks of which only some are still mapped (their undo failed part way): unmap
            // what is, then map it whole, before any copy goes in.
            (Some(handle), true) => match backend.unmap(t.device, t.va, t.size) {
                Err(error) => Err(Stranded {
                    error,
                    handle: Some(handle),
                    mapped: true,
                }),
                Ok(()) => backend
                    .map_with_access(t.device, t.va, t.size, handle)
                    .map(|()| handle)
                    .map_err(|s| Stranded {
                        handle: s.handle.or(Some(handle)),
                        ..s
                    }),
            },
            (Some(handle), false) => backend
                .map_with_access(t.device, t.va, t.size, handle)
                .map(|()| handle),
            (None, _) => {
                filled = true;
                backend.create_map_and_fill(t.device, t.va, t.size, &mut |start, len| {
                    queue_restore(&**backend, t, start, len, zero_discarded)
                })
            }
        };
        match mapped {
            Ok(handle) => handles[i] = Some(handle),
            Err(stranded) => {
                if stranded.mapped {
                    handles[i] = stranded.handle.or(t.handle);
                } else {
                    kept[i] = stranded.handle;
                }
                failure = Some(
                    stranded
                        .error
                        .context(format!("wake: mapping {:#x} ({} bytes)", t.va, t.size)),
                );
                break;
            }
        }
        if filled {
            continue;
        }
        if let Err(err) = queue_restore(&**backend, t, t.va, t.size, zero_discarded) {
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
    let Some(error) = failure else {
        return Ok(handles.into_iter().flatten().collect());
    };
    finish_copies(&**backend, &devices);
    let left = targets
        .iter()
        .zip(handles.iter().zip(&kept))
        .rev()
        .map(|(t, (handle, kept))| match (handle, kept) {
            (None, Some(held)) => Left::Held(*held),
            _ => roll_back(&**backend, t, *handle),
        })
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(RestoreFailure { error, left })
}

/// Queues what restores `[start, start+len)` of `t` (mapped with access): the parts of its
/// saved pieces that fall in the range, or, for a discard with `DEVMEM_ZERO_ON_WAKE`, zeros.
fn queue_restore(
    backend: &dyn Backend,
    t: &RestoreTarget,
    start: u64,
    len: usize,
    zero_discarded: bool,
) -> Result<()> {
    let end = start + len as u64;
    if t.pieces.is_empty() {
        if !zero_discarded {
            return Ok(());
        }
        // DEVMEM_ZERO_ON_WAKE: a discarded allocation comes back as zeros, not as whatever the
        // driver's fresh memory held (stale VRAM on older amdgpu kernels).
        return backend
            .zero_async(t.device, start, len)
            .map_err(|e| e.context(format!("wake: zeroing {:#x} ({} bytes)", t.va, t.size)));
    }
    t.pieces.iter().try_for_each(|&(dst, src, n)| {
        let from = dst.max(start);
        let to = (dst + n as u64).min(end);
        if from >= to {
            return Ok(());
        }
        let host = src + (from - dst) as usize;
        backend
            .copy_to_device_async(t.device, from, host as *const u8, (to - from) as usize)
            .map_err(|e| e.context(format!("wake: restoring {:#x} ({} bytes)", t.va, t.size)))
    })
}

/// Undoes one target's mapping after a failed restore.
fn roll_back(backend: &dyn Backend, t: &RestoreTarget, handle: Option<u64>) -> Left {
    let Some(handle) = handle else {
        return Left::Untouched;
    };
    if let Err(err) = backend.unmap(t.device, t.va, t.size) {
        log::error!("devmem: wake rollback: unmapping {:#x}: {err}", t.va);
        return Left::Mapped(handle);
    }
    if t.handle.is_some() {
        return Left::Held(handle); // the handle predates this call and stays held
    }
    match backend.release(t.device, handle) {
        Ok(()) => Left::Undone,
        Err(err) => {
            log::error!("devmem: wake rollback: releasing {:#x}: {err}", t.va);
            Left::Held(handle)
        }
    }
}
