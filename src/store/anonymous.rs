//! Private anonymous memory of this process, advised to use transparent huge pages, faulted in
//! by several threads at once, and registered with the driver (CUDA's `cuMemHostRegister`).

use std::sync::Arc;

use super::blocks::BLOCK;
use super::source::HostSource;
use crate::backend::Backend;
use crate::error::{bail, Result};
use crate::threads;

/// Anonymous huge-page memory, registered with `backend` for `device`.
pub struct Anonymous {
    backend: Arc<dyn Backend>,
    device: i32,
    threads: usize,
}

impl Anonymous {
    /// A source that faults chunks in with up to `threads` threads.
    pub fn new(backend: Arc<dyn Backend>, device: i32, threads: usize) -> Self {
        Self {
            backend,
            device,
            threads: threads.max(1),
        }
    }
}

fn munmap(ptr: usize, len: usize) -> Result<()> {
    // SAFETY: `ptr..ptr+len` is a mapping this source made and nothing uses any more.
    if unsafe { libc::munmap(ptr as *mut libc::c_void, len) } != 0 {
        bail!(
            HostOutOfMemory,
            "munmap of {len} bytes at {ptr:#x} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl HostSource for Anonymous {
    fn name(&self) -> &'static str {
        "anonymous"
    }

    fn map(&self, len: usize) -> Result<usize> {
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
        populate(raw as usize, len, self.threads);
        Ok(raw as usize)
    }

    fn pin(&self, ptr: usize, len: usize) -> Result<()> {
        self.backend.host_register(self.device, ptr as *mut u8, len)
    }

    fn unpin(&self, ptr: usize, _len: usize) -> Result<()> {
        self.backend.host_unregister(self.device, ptr as *mut u8)
    }

    fn unmap(&self, ptr: usize, len: usize) -> Result<()> {
        munmap(ptr, len)
    }
}

/// Faults in `[base, base+len)` with up to `threads` threads, one write per 4 KiB page: with
/// transparent huge pages each first write maps a whole 2 MiB page. (Measured faster than
/// MADV_POPULATE_WRITE on the kernels devmem was tested on.) A slice whose thread the OS
/// refuses is faulted in by the calling thread.
pub(super) fn populate(base: usize, len: usize, threads: usize) {
    let touch = |start: usize, n: usize| {
        for page in (start..start + n).step_by(4096) {
            // SAFETY: `page` lies inside the private writable mapping being populated, which
            // nothing else uses yet.
            unsafe { std::ptr::write_volatile(page as *mut u8, 0) };
        }
    };
    let slice = len.div_ceil(threads).next_multiple_of(BLOCK).max(BLOCK);
    std::thread::scope(|scope| {
        let mut inline = Vec::new();
        for start in (base..base + len).step_by(slice) {
            let n = slice.min(base + len - start);
            if threads > 1 {
                if let Err(err) =
                    threads::spawn_scoped(scope, "devmem-populate", move || touch(start, n))
                {
                    log::debug!("devmem: populating on the calling thread: {err}");
                    inline.push((start, n));
                }
            } else {
                inline.push((start, n));
            }
        }
        for (start, n) in inline {
            touch(start, n);
        }
    });
}
