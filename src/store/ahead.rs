//! Growing the host store ahead of need, so the first sleep copies into memory that is already
//! faulted in and pinned, with no call from the user (`DEVMEM_HOST_GROW_AHEAD`, default on).
//!
//! * **What it grows toward.** Every byte of every live allocation: tags (and so what a sleep
//!   will offload rather than discard) are only known at sleep, so the heuristic is "a sleep
//!   could offload everything". Allocations that are asleep already hold their backup, so the
//!   target is simply the bytes of all live allocations; the store grows until it holds (or is
//!   preparing) that many, never past the bound on host memory ([`super::bound`]:
//!   `DEVMEM_HOST_LIMIT` or `devmem_set_host_limit`, the memory cgroup, `MemAvailable`). Growth
//!   that the bound stops is not an error: the sleep finds the rest as before.
//! * **Never on `my_malloc`'s path.** `malloc` adds its bytes to an atomic counter and, at most
//!   once per [`STEP`] bytes of new allocations, sets a flag under a lock held for nanoseconds
//!   and wakes one thread. The thread waits [`SETTLE`] for the burst of allocations to end, then
//!   prepares one chunk at a time. It holds the store's lock only to count and to add a chunk,
//!   never while faulting pages in or pinning.
//! * **Low priority.** The thread faults pages in under `SCHED_IDLE` (the fault-in threads it
//!   starts inherit it), so it only uses CPU time nothing else wants; it switches back to the
//!   normal policy for the driver's pin call (the driver's locks must not be held by a thread
//!   that may not run). A chunk the thread is preparing does not count as upcoming for a sleep:
//!   a sleep that comes early starts the normal grower for everything not ready yet.
//! * **Not under the `Release` policy** (which gives host memory back after each wake; growing
//!   it again ahead of the next allocation would undo that), and not while a shared store is
//!   open or `DEVMEM_SHARED_STORE` names one (backups then go to the shared region).
//! * **Cost.** The host memory a sleep would take is held from the time the allocations appear
//!   instead of from the first sleep, and the CPU time of faulting it in (about 0.03 s per GiB
//!   with huge pages) is spent in the background. `release_host_store` gives unused memory back
//!   as before and stops the growth under way (a chunk being faulted in is given back when it
//!   is ready, not added) until the next allocation signals; under `Keep`, memory grown for
//!   allocations that are later freed stays until then.
//! * **Failure.** If the OS refuses the thread, a later allocation tries again; nothing fails.
//!   A chunk the driver will not pin is logged and growth stops until the next signal.

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::blocks::BLOCK;
use super::{bound, devmem_host_policy, source, with_pool, READY};
use crate::threads;

/// New allocations (bytes) between two signals to the thread.
const STEP: u64 = 16 << 20;
/// How long the thread waits after a signal for the burst of allocations to end.
const SETTLE: Duration = Duration::from_millis(20);

/// Environment variable that turns growing ahead off (`0`) or on (`1`, the default).
const ENV: &str = "DEVMEM_HOST_GROW_AHEAD";

/// Bytes of live allocations devmem holds, in any state.
static LIVE: AtomicU64 = AtomicU64::new(0);
/// `LIVE` when the thread was last signalled.
static SENT: AtomicU64 = AtomicU64::new(0);
/// The device of the latest allocation (the source pins host memory in its context).
static DEVICE: AtomicI32 = AtomicI32::new(0);
/// 0: not read yet, 1: on, 2: off.
static MODE: AtomicU8 = AtomicU8::new(0);
/// 0: no thread, 1: running, 2: starting.
static THREAD: AtomicU8 = AtomicU8::new(0);
/// Set by a signal, cleared by the thread.
static PENDING: Mutex<bool> = Mutex::new(false);
static SIGNAL: Condvar = Condvar::new();
/// Bumped (under the store's lock) by `release_host_store`: a run of growth that started
/// before stops, and a chunk it was preparing is given back instead of added.
static EPOCH: AtomicU64 = AtomicU64::new(0);
/// Test hook: extra time each chunk takes to fault in (milliseconds).
static SLOW_MS: AtomicU64 = AtomicU64::new(0);

/// Whether the store grows ahead of need (reads `DEVMEM_HOST_GROW_AHEAD` the first time).
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = crate::logging::env_or_warn(ENV, "0 or 1", |v| match v {
                "0" => Some(false),
                "1" => Some(true),
                _ => None,
            })
            .unwrap_or(true);
            // A concurrent set_enabled wins over the environment.
            let _ = MODE.compare_exchange(
                0,
                if on { 1 } else { 2 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            MODE.load(Ordering::Relaxed) == 1
        }
    }
}

/// Turns growing ahead on or off for this process (overrides the environment).
pub fn set_enabled(on: bool) {
    MODE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    if on {
        SENT.store(0, Ordering::Relaxed);
        signal();
    }
}

/// Records a new allocation of `bytes` on `device` (called after `malloc` succeeds). Never
/// blocks: an atomic add, and at most once per [`STEP`] bytes a flag and a wake-up.
pub fn allocated(device: i32, bytes: usize) {
    let live = LIVE.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    DEVICE.store(device, Ordering::Relaxed);
    if !enabled() {
        return;
    }
    let sent = SENT.load(Ordering::Relaxed);
    if live < sent.saturating_add(STEP) {
        return;
    }
    if SENT
        .compare_exchange(sent, live, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        signal();
    }
}

/// Records that an allocation of `bytes` was freed.
pub fn freed(bytes: usize) {
    let bytes = bytes as u64;
    let _ = LIVE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(bytes))
    });
    let _ = SENT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(bytes))
    });
}

/// Stops the growth under way (a release of the store, under the store's lock, or a shared
/// store opening): what the user just gave back, or what backups no longer need, is not
/// grown until the next allocation signals.
pub(super) fn cancel() {
    EPOCH.fetch_add(1, Ordering::SeqCst);
}

/// Test hook: makes every chunk grown ahead take `ms` milliseconds longer to fault in.
pub fn set_slow_fault_in(ms: u64) {
    SLOW_MS.store(ms, Ordering::Relaxed);
}

fn signal() {
    *PENDING.lock() = true;
    SIGNAL.notify_one();
    if THREAD
        .compare_exchange(0, 2, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    match threads::spawn("devmem-grow-ahead", run) {
        Ok(_) => THREAD.store(1, Ordering::Release),
        Err(err) => {
            // A later allocation tries again; the first sleep grows the store as before.
            THREAD.store(0, Ordering::Release);
            log::warn!("devmem: not growing the host store ahead of need for now: {err}");
        }
    }
}

/// Sets the calling thread's scheduling policy (`SCHED_IDLE` or `SCHED_OTHER`); the result
/// only matters for speed, so a refusal is logged at debug level.
fn set_idle(idle: bool) {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for both policies.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        log::debug!(
            "devmem: grow-ahead thread: sched_setscheduler({}) failed: {}",
            if idle { "SCHED_IDLE" } else { "SCHED_OTHER" },
            std::io::Error::last_os_error()
        );
    }
}

fn run() {
    loop {
        {
            let mut pending = PENDING.lock();
            while !*pending {
                SIGNAL.wait(&mut pending);
            }
            *pending = false;
        }
        let epoch = EPOCH.load(Ordering::SeqCst);
        std::thread::sleep(SETTLE);
        while grow_one(epoch) {}
    }
}

/// Whether `DEVMEM_SHARED_STORE` names a region the first sleep will open (backups then go
/// there, not to the pool).
fn shared_store_pending() -> bool {
    crate::env::path("DEVMEM_SHARED_STORE").is_some()
        && !super::ENV_STORE_CLOSED.load(Ordering::SeqCst)
}

/// Prepares one chunk when the store holds less than the live allocations and the bound
/// allows it; `false` when there is nothing (more) to do, or the store was released since
/// `epoch` ([`cancel`]).
fn grow_one(epoch: u64) -> bool {
    if !enabled() || super::shared_open_now().is_some() || shared_store_pending() {
        return false;
    }
    let Ok(backend) = crate::backend::get() else {
        return false;
    };
    let device = DEVICE.load(Ordering::Relaxed);
    // Read before taking the store's lock: it reads files.
    let room = bound::Room::read();
    let target = (LIVE.load(Ordering::Relaxed) as usize).div_ceil(BLOCK);
    let claimed = with_pool(|p| {
        if p.policy == devmem_host_policy::Release || EPOCH.load(Ordering::SeqCst) != epoch {
            return None;
        }
        let have = p.blocks.held_blocks() + p.requested + p.in_flight + p.ahead_in_flight;
        if target <= have {
            return None;
        }
        let len = p.chunk_bytes;
        let preparing = ((p.requested + p.in_flight + p.ahead_in_flight) * BLOCK) as u64;
        let held = (p.blocks.held_blocks() * BLOCK) as u64;
        if let Err(stop) = bound::check(len as u64 + preparing, held, &room) {
            log::debug!("devmem: the host store stops growing ahead at the bound: {stop}");
            return None;
        }
        p.ahead_in_flight += len / BLOCK;
        let threads = (p.threads / p.workers).max(1);
        let source = Arc::clone(
            p.source
                .get_or_insert_with(|| source::for_backend(&backend, device, threads)),
        );
        Some((source, len))
    });
    let Some((source, len)) = claimed else {
        return false;
    };
    // Only faulting in anonymous memory runs idle: a source whose map is a driver call (Level
    // Zero's host allocation) keeps the normal policy, like every pin.
    let idle = source.name() == "anonymous";
    if idle {
        set_idle(true);
    }
    let mapped = source.map(len);
    let slow = SLOW_MS.load(Ordering::Relaxed);
    if slow > 0 {
        std::thread::sleep(Duration::from_millis(slow));
    }
    if idle {
        set_idle(false);
    }
    let prepared = mapped.and_then(|ptr| match source.pin(ptr, len) {
        Ok(()) => Ok(ptr),
        Err(err) => {
            if let Err(undo) = source.unmap(ptr, len) {
                log::error!("devmem: unmapping a chunk the driver would not pin: {undo}");
            }
            Err(err)
        }
    });
    let (grew, give_back) = with_pool(|p| {
        p.ahead_in_flight -= len / BLOCK;
        match prepared {
            // The store was released meanwhile: the chunk is given back, not added.
            Ok(ptr) if EPOCH.load(Ordering::SeqCst) != epoch => (false, Some(ptr)),
            Ok(ptr) => {
                p.blocks.add(ptr, len);
                (true, None)
            }
            Err(err) => {
                log::warn!("devmem: growing the host store ahead of need stopped: {err}");
                (false, None)
            }
        }
    });
    READY.notify_all();
    if let Some(ptr) = give_back {
        let freed = source.unpin(ptr, len).and_then(|()| source.unmap(ptr, len));
        if let Err(err) = freed {
            log::error!("devmem: giving back a chunk grown ahead after a release: {err}");
        }
    }
    grew
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_never_goes_below_zero() {
        LIVE.store(0, Ordering::Relaxed);
        freed(5);
        assert_eq!(LIVE.load(Ordering::Relaxed), 0);
    }
}
