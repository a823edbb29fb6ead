//! Host memory the driver allocates already pinned (Level Zero's `zeMemAllocHost`): map and
//! unmap are the driver's allocate and free, pin and unpin have nothing to do.

use std::sync::Arc;

use super::source::HostSource;
use crate::backend::Backend;
use crate::error::Result;

/// Driver-allocated pinned host memory.
pub struct DriverHost {
    backend: Arc<dyn Backend>,
    device: i32,
}

impl DriverHost {
    /// A source allocating through `backend` for `device`.
    pub fn new(backend: Arc<dyn Backend>, device: i32) -> Self {
        Self { backend, device }
    }
}

impl HostSource for DriverHost {
    fn name(&self) -> &'static str {
        "driver"
    }

    fn map(&self, len: usize) -> Result<usize> {
        self.backend
            .alloc_host(self.device, len)
            .map(|p| p as usize)
    }

    fn pin(&self, _ptr: usize, _len: usize) -> Result<()> {
        Ok(())
    }

    fn unpin(&self, _ptr: usize, _len: usize) -> Result<()> {
        Ok(())
    }

    fn unmap(&self, ptr: usize, _len: usize) -> Result<()> {
        self.backend.free_host(self.device, ptr as *mut u8)
    }
}
