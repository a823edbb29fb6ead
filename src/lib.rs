//! devmem: a GPU memory allocator with *sleep mode*.
//!
//! An inference engine allocates its weights and KV cache through devmem (PyTorch's pluggable
//! allocator, the C API, or Python). On sleep devmem copies the chosen allocations to pinned
//! host memory and gives every byte of physical device memory back to the driver; on wake it
//! maps fresh physical memory at the same virtual addresses and restores the saved bytes, so
//! pointers, tensors and captured CUDA graphs stay valid.
//!
//! Layers, each talking only to the one below: [`ffi`] (the C ABI) → [`core`] (registry, tags,
//! state machine, statistics) → `store` (backups: the save/restore pipeline and the host
//! memory it copies into) → `backend` (one implementation per driver) → `driver` (run-time
//! loaded symbol tables).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub(crate) mod backend;
pub mod checksum;
pub mod core;
pub(crate) mod driver;
mod env;
pub mod error;
pub mod ffi;
mod logging;
pub(crate) mod store;
#[doc(hidden)]
pub mod threads;

pub use crate::backend::devmem_backend;
pub use crate::core::{
    devmem_allocation_callback, devmem_allocation_info, devmem_counter, devmem_read_only,
    devmem_residual, devmem_state, devmem_stats, devmem_transfer, DEFAULT_TAG, DEVMEM_MAX_TAG_LEN,
    DEVMEM_TAG_BUFFER_LEN,
};
pub use crate::error::{devmem_status, Error, Result};
pub use crate::store::devmem_host_policy;
