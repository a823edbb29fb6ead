//! Where host memory for backups comes from: one small interface, one file per kind.
//!
//! A source maps one chunk (and faults it in), pins it for the driver's copy engines, and later
//! unpins and unmaps it. The store never touches host memory any other way, so a shared region
//! or a disk tier is a new source, not a new store.

use std::sync::Arc;

use crate::backend::{Backend, HostMemory};
use crate::error::Result;

/// A kind of host memory the store can fill with chunks.
pub trait HostSource: Send + Sync {
    /// A short name for logs and messages ("anonymous").
    fn name(&self) -> &'static str;
    /// Maps `len` bytes (a multiple of the block size) and faults every page in; returns the
    /// address. Nothing stays mapped on failure.
    fn map(&self, len: usize) -> Result<usize>;
    /// Makes a mapped chunk usable by the driver's asynchronous copies.
    fn pin(&self, ptr: usize, len: usize) -> Result<()>;
    /// Undoes [`pin`](Self::pin). On failure the chunk stays pinned and mapped.
    fn unpin(&self, ptr: usize, len: usize) -> Result<()>;
    /// Gives a chunk back to the system. On failure the chunk stays valid.
    fn unmap(&self, ptr: usize, len: usize) -> Result<()>;
}

/// The source for `backend`: memory devmem maps and registers, or memory the driver allocates.
pub fn for_backend(backend: &Arc<dyn Backend>, device: i32, threads: usize) -> Arc<dyn HostSource> {
    match backend.host_memory() {
        HostMemory::Register => Arc::new(super::anonymous::Anonymous::new(
            Arc::clone(backend),
            device,
            threads,
        )),
        HostMemory::Allocate => Arc::new(super::driver_host::DriverHost::new(
            Arc::clone(backend),
            device,
        )),
    }
}
