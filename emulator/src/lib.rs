//! A GPU driver emulator: a shared library exporting the CUDA driver, HIP runtime and Level Zero
//! entry points devmem uses (the three faces share one emulated memory),
//! implemented on host memory with real virtual-memory semantics, so devmem's real backend code
//! runs in CI without a GPU.
//!
//! * reserve = an inaccessible anonymous mapping; create = a memfd; map = a shared fixed
//!   mapping of the memfd; set access = mprotect read-write; unmap = inaccessible again;
//!   release = close. Device pointers are host addresses, so tests read and write through them.
//! * Each device has a capacity (`DEVMEM_EMU_CAPACITY`, default 1 GiB, suffixes K/M/G), so
//!   out-of-memory is real. `DEVMEM_EMU_DEVICES` (default 1), `DEVMEM_EMU_GRANULARITY`
//!   (default 2 MiB), `DEVMEM_EMU_FABRIC=1` (the device claims fabric handles but creating them
//!   is not permitted, as without IMEX), `DEVMEM_EMU_RDMA=1`, `DEVMEM_EMU_NO_VMM=1`,
//!   `DEVMEM_EMU_STALE_VRAM=1` (fresh physical memory holds 0xA5 bytes, not zeros).
//! * Fault injection: `DEVMEM_EMU_FAIL="cuMemCreate:3:2,cuMemMap:1:999"` fails the 3rd call of
//!   cuMemCreate with error 2 and the 1st cuMemMap with 999; or `cuemu_inject` at run time.
//! * Counters of live handles, mappings, reservations and host buffers for leak checks
//!   (`cuemu_counters`).
//!
//! * Asynchrony (`queue`): queued copies run only at synchronisation points; unmapping or
//!   freeing memory that queued work still uses is a recorded violation (`cuemu_counters`,
//!   `cuemu_violation`), and `cuemu_launch_fill` queues application work to wait for.
//!   `cuemu_event_log` lists maps, unmaps and device-bound copies queued and run, in order, so
//!   a test can check what overlapped what.
//! * Kernels: `cuModuleLoadData` accepts only devmem's checksum PTX, and `cuLaunchKernel` of
//!   its `devmem_checksum` queues the checksum (devmem's own host function, `src/checksum.rs`)
//!   as stream work, so it runs at the next synchronisation like the real kernel.
//!
//! * HIP face (`hip`): ROCm's behaviours devmem depends on — released memory returns to the
//!   device only when its reservation is freed, `DEVMEM_EMU_HIP_MAX_CREATE` limits one
//!   `hipMemCreate`, a thread always has a current device — with the same capacity, faults
//!   (`DEVMEM_EMU_FAIL="hipMemCreate:2:2"`) and asynchrony as the CUDA face.
//!
//! Files: `config` (environment), `state` (the memory model, locking, fault injection),
//! `queue` (asynchrony), `cuda`, `hip` and `ze` (the three driver faces), `control`
//! (`cuemu_*`).
//!
//! Calls that need a context fail with `CUDA_ERROR_INVALID_CONTEXT` when the thread has none,
//! and `cuMemGetInfo` reports the current context's device, as the real driver does.

#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]
// These are C entry points; the driver API documents their pointer contracts.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

#[path = "../../src/checksum.rs"]
#[allow(dead_code)]
mod checksum;
mod config;
mod control;
mod cuda;
mod hip;
mod queue;
mod state;
mod ze;

pub(crate) use config::*;
pub use control::{
    CuemuCounters, CuemuEvent, EVENT_COPY_DONE, EVENT_COPY_QUEUED, EVENT_MAP, EVENT_UNMAP,
};
pub(crate) use cuda::*;
pub(crate) use queue::*;
pub(crate) use state::*;
