//! The device-memory backend: one small interface per driver (CUDA, HIP, Level Zero).
//!
//! Everything above this layer speaks in device ordinals, virtual addresses (`u64`), physical
//! handles (`u64`) and host pointers; it never sees a driver type. A backend must not keep
//! per-allocation state: the registry in `core` owns that. The one exception is [`layer`],
//! which devmem puts over a backend whose driver needs chunked physical memory or re-reserved
//! address ranges (HIP): it keeps each chunked handle's pieces, keyed by the handle the
//! registry holds, so the registry still sees one physical object per allocation.
//!
//! Adding a driver: one `driver` symbol table, one file here, one [`devmem_backend`] row and
//! one arm in `load`.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{bail, Result};

pub mod cuda;
pub mod hip;
pub mod layer;
pub mod level_zero;
pub mod settings;

pub use settings::Settings;

/// How a backend provides pinned host memory for the host store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMemory {
    /// devmem maps and populates host memory, then registers it with the driver (CUDA).
    Register,
    /// The driver allocates it ([`Backend::alloc_host`]; Level Zero's `zeMemAllocHost`).
    Allocate,
}

/// Which backend to load.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::FromRepr, strum::IntoStaticStr, strum::EnumString,
)]
#[strum(serialize_all = "snake_case")]
pub enum devmem_backend {
    /// CUDA when a CUDA driver with at least one device loads, else HIP when the HIP runtime
    /// loads with at least one device, else Level Zero.
    Auto = 0,
    /// The CUDA driver (`libcuda.so.1`).
    Cuda = 1,
    /// Level Zero (`libze_loader.so.1`).
    LevelZero = 2,
    /// The HIP runtime for AMD GPUs (`libamdhip64.so`).
    Hip = 3,
}

impl devmem_backend {
    /// The name used in logs, messages and `DEVMEM_BACKEND` ("cuda", "hip", "level_zero",
    /// "auto").
    pub fn label(self) -> &'static str {
        self.into()
    }
}

/// What devmem needs from a driver with virtual memory management.
///
/// Every method that touches a device makes that device's context current for the duration of
/// the call when the thread has another one, and leaves the device's primary context current
/// when the thread had none (the context PyTorch's runtime uses).
pub trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> devmem_backend;

    /// A short name for logs and messages ("cuda").
    fn name(&self) -> &'static str {
        self.kind().label()
    }

    /// The device of the calling thread's current context, if it has one devmem can name.
    fn current_device(&self) -> Option<i32> {
        None
    }

    /// Number of devices the driver reports.
    fn device_count(&self) -> i32;
    /// The allocation granularity of `device`, with the properties devmem creates memory with.
    fn granularity(&self, device: i32) -> Result<usize>;
    /// Reserves `size` bytes of virtual address space (a multiple of the granularity).
    fn reserve(&self, device: i32, size: usize) -> Result<u64>;
    /// Frees a reservation made by [`reserve`](Self::reserve).
    fn free_va(&self, device: i32, va: u64, size: usize) -> Result<()>;
    /// Reserves exactly `[va, va+size)` again (after [`free_va`](Self::free_va) of the same
    /// range). Fails, holding nothing, when the driver would place it elsewhere.
    fn reserve_at(&self, _device: i32, va: u64, _size: usize) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::devmem_status::Unsupported,
            format!(
                "the {} backend cannot reserve a chosen address ({va:#x})",
                self.name()
            ),
        ))
    }
    /// Creates `size` bytes of physical device memory and returns its handle.
    fn create(&self, device: i32, size: usize) -> Result<u64>;
    /// Releases a physical handle.
    fn release(&self, device: i32, handle: u64) -> Result<()>;
    /// Maps `handle` at `va` (no access yet).
    fn map(&self, device: i32, va: u64, size: usize, handle: u64) -> Result<()>;
    /// Grants `device` read-write access to a mapped range.
    fn set_access(&self, device: i32, va: u64, size: usize) -> Result<()>;
    /// Grants `device` read-only access to a mapped range (a write through it faults).
    fn set_access_read_only(&self, _device: i32, va: u64, _size: usize) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::devmem_status::Unsupported,
            format!(
                "the {} backend cannot map memory read-only ({va:#x})",
                self.name()
            ),
        ))
    }
    /// Exports one driver handle (a piece from [`chunks`](Self::chunks)) as a POSIX file
    /// descriptor another process can import while any holder keeps it open.
    fn export_fd(&self, _device: i32, handle: u64) -> Result<std::os::fd::OwnedFd> {
        Err(crate::error::Error::new(
            crate::error::devmem_status::Unsupported,
            format!(
                "the {} backend cannot export physical memory ({handle:#x}) as a file descriptor",
                self.name()
            ),
        ))
    }
    /// Imports a file descriptor from [`export_fd`](Self::export_fd) as a new physical handle
    /// of this process (released with [`release`](Self::release)); the caller keeps `fd`.
    fn import_fd(&self, _device: i32, _fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
        Err(crate::error::Error::new(
            crate::error::devmem_status::Unsupported,
            format!(
                "the {} backend cannot import physical memory from a file descriptor",
                self.name()
            ),
        ))
    }
    /// Imports the pieces of one allocation's exported memory (descriptor and size each, in
    /// address order) as one physical handle of this backend, as [`create`](Self::create)
    /// would return: mapped, released and listed by [`chunks`](Self::chunks) like created
    /// memory. Imports nothing on failure.
    fn import_pieces(
        &self,
        device: i32,
        pieces: &[(usize, std::os::fd::BorrowedFd<'_>)],
    ) -> Result<u64> {
        match pieces {
            [(_, fd)] => self.import_fd(device, *fd),
            _ => Err(crate::error::Error::new(
                crate::error::devmem_status::Unsupported,
                format!(
                    "the {} backend maps memory in one piece; kept memory has {}",
                    self.name(),
                    pieces.len()
                ),
            )),
        }
    }
    /// Unmaps a range; the reservation stays.
    fn unmap(&self, device: i32, va: u64, size: usize) -> Result<()>;
    /// Waits until no work queued on `device` is still running. CUDA: every stream of the
    /// device's primary context (`cuCtxSynchronize`), not contexts the application created;
    /// Level Zero: devmem's own copies only (the API has no device-wide wait).
    fn synchronize(&self, device: i32) -> Result<()>;
    /// Queues a device-to-host copy on devmem's own stream for `device`.
    fn copy_to_host_async(&self, device: i32, dst: *mut u8, src: u64, len: usize) -> Result<()>;
    /// Queues a host-to-device copy on devmem's own stream for `device`.
    fn copy_to_device_async(&self, device: i32, dst: u64, src: *const u8, len: usize)
        -> Result<()>;
    /// Waits for every copy queued on devmem's stream for `device`.
    fn wait_copies(&self, device: i32) -> Result<()>;
    /// Queues writing zeros over `[dst, dst+len)` on devmem's stream for `device` (waited for
    /// with the copies).
    fn zero_async(&self, _device: i32, dst: u64, _len: usize) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::devmem_status::Unsupported,
            format!(
                "the {} backend cannot zero device memory ({dst:#x})",
                self.name()
            ),
        ))
    }
    /// Whether the memory at `va` that a failed unmap left mapped is mapped whole: false when
    /// only some chunks of it are ([`layer`]), so a wake maps it again before copying into it.
    fn fully_mapped(&self, _va: u64) -> bool {
        true
    }
    /// The driver handles and sizes a physical handle of `size` bytes is made of, in address
    /// order: one piece unless the memory is chunked ([`layer`]).
    fn chunks(&self, handle: u64, size: usize) -> Vec<(u64, usize)> {
        vec![(handle, size)]
    }
    /// Free and total device memory in bytes.
    fn mem_get_info(&self, device: i32) -> Result<(usize, usize)>;
    /// Page-locks existing host memory and registers it for copies with every device.
    fn host_register(&self, device: i32, ptr: *mut u8, len: usize) -> Result<()>;
    /// Undoes [`host_register`](Self::host_register).
    fn host_unregister(&self, device: i32, ptr: *mut u8) -> Result<()>;
    /// Records a marker on devmem's copy stream for `device`; returns its id.
    fn record_copy_marker(&self, device: i32) -> Result<u64>;
    /// Waits until every copy queued before the marker has finished, then forgets the marker.
    fn wait_copy_marker(&self, device: i32, marker: u64) -> Result<()>;

    /// How this backend provides pinned host memory.
    fn host_memory(&self) -> HostMemory {
        HostMemory::Register
    }

    /// Allocates pinned host memory (backends whose [`host_memory`](Self::host_memory) is
    /// `Allocate`).
    fn alloc_host(&self, _device: i32, _len: usize) -> Result<*mut u8> {
        Err(crate::error::Error::new(
            crate::error::devmem_status::Unsupported,
            format!("the {} backend registers host memory instead", self.name()),
        ))
    }

    /// Frees memory from [`alloc_host`](Self::alloc_host).
    fn free_host(&self, _device: i32, _ptr: *mut u8) -> Result<()> {
        self.alloc_host(0, 0).map(drop)
    }

    /// Whether [`checksums`](Self::checksums) can work (the driver has what the kernel needs).
    fn can_checksum(&self) -> bool {
        false
    }

    /// Checksums ([`crate::checksum`]) of device ranges (each a multiple of 8 bytes), computed
    /// on the device in one pass that waits for itself. `Unsupported` where the backend has no
    /// kernel for it.
    fn checksums(&self, _device: i32, _ranges: &[(u64, usize)]) -> Result<Vec<u64>> {
        Err(crate::error::Error::new(
            crate::error::devmem_status::Unsupported,
            format!("the {} backend cannot checksum device memory", self.name()),
        ))
    }

    /// A line for logs: which driver library, which context.
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// Maps an existing handle at `va` and grants access; undoes the mapping if access fails.
    /// On failure, says whether the mapping is still there (the undo failed too).
    fn map_with_access(
        &self,
        device: i32,
        va: u64,
        size: usize,
        handle: u64,
    ) -> std::result::Result<(), Stranded> {
        self.map(device, va, size, handle)
            .map_err(Stranded::nothing)?;
        if let Err(error) = self.set_access(device, va, size) {
            let mapped = match self.unmap(device, va, size) {
                Ok(()) => false,
                Err(undo) => {
                    log::error!("devmem: undoing a mapping at {va:#x} after failed access: {undo}");
                    true
                }
            };
            return Err(Stranded {
                error,
                handle: None,
                mapped,
            });
        }
        Ok(())
    }

    /// Creates physical memory, maps it at `va` and grants access; undoes every step on failure.
    /// A step of the undo that fails too is reported in [`Stranded`], so the caller keeps what
    /// is still held instead of leaking it.
    fn create_and_map(
        &self,
        device: i32,
        va: u64,
        size: usize,
    ) -> std::result::Result<u64, Stranded> {
        let handle = self.create(device, size).map_err(Stranded::nothing)?;
        if let Err(mut failed) = self.map_with_access(device, va, size, handle) {
            if failed.mapped {
                failed.handle = Some(handle); // still mapped: released when it is unmapped
                return Err(failed);
            }
            if let Err(undo) = self.release(device, handle) {
                log::error!("devmem: releasing handle {handle:#x} after a failed map: {undo}");
                failed.handle = Some(handle);
            }
            return Err(failed);
        }
        Ok(handle)
    }

    /// Creates physical memory for `[va, va+size)`, maps it with access, and calls
    /// `fill(start, len)` for each part as soon as that part is mapped (one part unless the
    /// memory is chunked, [`layer`]), so the caller queues copies into a part while the next
    /// is created and mapped. On a failure (of a step or of `fill`) it waits for the copies
    /// queued on `device` before unmapping anything, then undoes every step; what could not be
    /// undone is reported in [`Stranded`].
    fn create_map_and_fill(
        &self,
        device: i32,
        va: u64,
        size: usize,
        fill: &mut dyn FnMut(u64, usize) -> Result<()>,
    ) -> std::result::Result<u64, Stranded> {
        fill_whole(self, device, va, size, fill)
    }
}

/// [`Backend::create_map_and_fill`] in one part.
pub(crate) fn fill_whole<B: Backend + ?Sized>(
    backend: &B,
    device: i32,
    va: u64,
    size: usize,
    fill: &mut dyn FnMut(u64, usize) -> Result<()>,
) -> std::result::Result<u64, Stranded> {
    let handle = backend.create_and_map(device, va, size)?;
    let Err(error) = fill(va, size) else {
        return Ok(handle);
    };
    // Unmapping memory that a queued copy still writes is undefined on the driver.
    if let Err(err) = backend.wait_copies(device) {
        log::error!("devmem: waiting for the copies into {va:#x} after a failure: {err}");
    }
    if let Err(undo) = backend.unmap(device, va, size) {
        log::error!("devmem: unmapping {va:#x} after a failure: {undo}");
        return Err(Stranded {
            error,
            handle: Some(handle),
            mapped: true,
        });
    }
    if let Err(undo) = backend.release(device, handle) {
        log::error!("devmem: releasing {handle:#x} after a failure: {undo}");
        return Err(Stranded {
            error,
            handle: Some(handle),
            mapped: false,
        });
    }
    Err(Stranded::nothing(error))
}

/// Idle driver events (as addresses) per device, reused by copy markers: CUDA's and HIP's.
#[derive(Default)]
pub(crate) struct IdleEvents(Mutex<Vec<(i32, usize)>>);

impl IdleEvents {
    /// Records a marker on `device`: an idle event, or one from `create`, passed to `record`.
    /// An event that fails to record goes back to the idle list.
    pub(crate) fn record(
        &self,
        device: i32,
        create: impl FnOnce() -> Result<usize>,
        record: impl FnOnce(usize) -> Result<()>,
    ) -> Result<u64> {
        let reused = {
            let mut idle = self.0.lock();
            let at = idle.iter().position(|(d, _)| *d == device);
            at.map(|i| idle.swap_remove(i).1)
        };
        let event = match reused {
            Some(event) => event,
            None => create()?,
        };
        if let Err(err) = record(event) {
            self.0.lock().push((device, event));
            return Err(err);
        }
        Ok(event as u64)
    }

    /// Waits for the marker with `wait`, then makes its event idle again.
    pub(crate) fn wait(
        &self,
        device: i32,
        marker: u64,
        wait: impl FnOnce(usize) -> Result<()>,
    ) -> Result<()> {
        let event = marker as usize;
        let waited = wait(event);
        self.0.lock().push((device, event));
        waited
    }
}

/// A failed map whose undo failed too: what is still held.
#[derive(Debug)]
pub struct Stranded {
    /// The first error.
    pub error: crate::error::Error,
    /// Physical memory created by the call that could not be released.
    pub handle: Option<u64>,
    /// Whether a mapping is still at the address (its unmap failed).
    pub mapped: bool,
}

impl Stranded {
    /// A failure that left nothing behind.
    pub fn nothing(error: crate::error::Error) -> Self {
        Self {
            error,
            handle: None,
            mapped: false,
        }
    }

    /// Whether anything is still held.
    pub fn holds_anything(&self) -> bool {
        self.handle.is_some() || self.mapped
    }
}

static BACKEND: Mutex<Option<Arc<dyn Backend>>> = Mutex::new(None);
static CHOICE: Mutex<Option<devmem_backend>> = Mutex::new(None);
static SETTINGS: Mutex<Settings> = Mutex::new(Settings {
    chunk_size: 0,
    rereserve: false,
    zero_on_wake: false,
    wake_chunk: 0,
});

/// Environment variable choosing the backend: `cuda`, `hip`, `level_zero` or `auto`.
pub const BACKEND_ENV: &str = "DEVMEM_BACKEND";

/// Chooses the backend before first use. Changing it once a backend is loaded is refused.
pub fn select(kind: devmem_backend) -> Result<()> {
    let loaded = BACKEND.lock();
    if let Some(backend) = loaded.as_ref() {
        let same = kind == devmem_backend::Auto || kind == backend.kind();
        if !same {
            return Err(crate::error::Error::new(
                crate::error::devmem_status::InvalidState,
                format!("the {} backend is already in use; choose the backend before the first allocation", backend.name()),
            ));
        }
        return Ok(());
    }
    *CHOICE.lock() = Some(kind);
    Ok(())
}

/// Records the application's Level Zero context and devices and selects Level Zero, holding
/// the backend slot's lock so a concurrent first load either sees them or has already loaded
/// (and then this call fails).
pub fn hand_over_level_zero(context: usize, devices: Vec<usize>) -> Result<()> {
    let loaded = BACKEND.lock();
    if let Some(backend) = loaded.as_ref() {
        return Err(crate::error::Error::new(
            crate::error::devmem_status::InvalidState,
            format!(
                "the {} backend is already loaded; hand over the context before the first allocation",
                backend.name()
            ),
        ));
    }
    level_zero::hand_over(context, devices);
    *CHOICE.lock() = Some(devmem_backend::LevelZero);
    Ok(())
}

fn choice() -> Result<devmem_backend> {
    if let Some(kind) = *CHOICE.lock() {
        return Ok(kind);
    }
    let Some(text) = crate::env::text(BACKEND_ENV)? else {
        return Ok(devmem_backend::Auto);
    };
    match text.trim() {
        "" => Ok(devmem_backend::Auto),
        "levelzero" | "ze" => Ok(devmem_backend::LevelZero),
        name => name.parse().map_err(|_| {
            crate::error::Error::new(
                crate::error::devmem_status::InvalidArgument,
                format!("{BACKEND_ENV}={text} is not one of cuda, hip, level_zero, auto"),
            )
        }),
    }
}

/// The driver backend of `kind` (`Auto`: the first that works, see [`devmem_backend::Auto`]).
fn load_driver(kind: devmem_backend) -> Result<Arc<dyn Backend>> {
    match kind {
        devmem_backend::Cuda => Ok(Arc::new(cuda::CudaBackend::load()?)),
        devmem_backend::Hip => Ok(Arc::new(hip::HipBackend::load()?)),
        devmem_backend::LevelZero => Ok(Arc::new(level_zero::LevelZeroBackend::load()?)),
        devmem_backend::Auto => load_auto(),
    }
}

/// CUDA first, then HIP, then Level Zero: each only when the one before has no driver or no
/// device.
fn load_auto() -> Result<Arc<dyn Backend>> {
    let mut skipped = Vec::new();
    for kind in [devmem_backend::Cuda, devmem_backend::Hip] {
        let loaded = load_driver(kind).and_then(|backend| {
            if backend.device_count() == 0 {
                bail!(
                    InvalidDevice,
                    "the {} driver reports no device",
                    kind.label()
                );
            }
            Ok(backend)
        });
        match loaded {
            Ok(backend) => return Ok(backend),
            // A HIP runtime without an AMD GPU fails hipInit: skipped too.
            Err(e)
                if kind == devmem_backend::Hip
                    || e.status == crate::error::devmem_status::DriverNotFound
                    || e.status == crate::error::devmem_status::InvalidDevice =>
            {
                skipped.push(e)
            }
            Err(e) => return Err(e),
        }
    }
    load_driver(devmem_backend::LevelZero).map_err(|ze_err| {
        let mut message: Vec<String> = skipped.iter().map(|e| e.message.clone()).collect();
        message.push(format!("Level Zero: {}", ze_err.message));
        crate::error::Error::new(
            skipped.first().map_or(ze_err.status, |e| e.status),
            message.join("; "),
        )
    })
}

/// The driver backend with the switches in force ([`settings`]) layered over it.
fn load(kind: devmem_backend) -> Result<(Arc<dyn Backend>, Settings)> {
    let backend = load_driver(kind)?;
    let settings = Settings::from_env(backend.kind())?;
    let (chunk, min_chunked) = settings.chunking();
    if chunk == 0 && !settings.rereserve {
        return Ok((backend, settings));
    }
    let layered = layer::Layered::new(backend, chunk, min_chunked, settings.rereserve);
    Ok((Arc::new(layered), settings))
}

/// The switches in force (all off until a backend is loaded).
pub fn settings() -> Settings {
    *SETTINGS.lock()
}

/// The process-wide backend, loaded on first use. A failed load is not cached, so a caller
/// that fixes its environment can retry.
pub fn get() -> Result<Arc<dyn Backend>> {
    crate::logging::init();
    let mut slot = BACKEND.lock();
    if let Some(backend) = slot.as_ref() {
        return Ok(Arc::clone(backend));
    }
    let (backend, settings) = load(choice()?)?;
    log::info!(
        "devmem: using the {} backend with {} device(s); {settings:?}",
        backend.describe(),
        backend.device_count()
    );
    *SETTINGS.lock() = settings;
    *slot = Some(Arc::clone(&backend));
    Ok(backend)
}
