//! The emulated device memory: reservations, physical handles, mappings, host buffers, the
//! process-wide lock every entry point takes, call counting and fault injection.

use std::ffi::{c_int, c_void};

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::*;

pub(crate) struct Physical {
    pub(crate) fd: c_int,
    pub(crate) size: usize,
    pub(crate) device: i32,
    /// The Level Zero context it was created in (0 for CUDA).
    pub(crate) context: usize,
    /// Created through the HIP face: as on ROCm, its memory goes back to the device only when
    /// the reservation it was last mapped in is freed ([`Emu::release`]).
    pub(crate) hip: bool,
    /// The reservation it was last mapped in.
    pub(crate) reservation: Option<u64>,
    /// Created with POSIX file descriptor handles requested (or imported from one): it can be
    /// exported ([`Emu::export_fd`]).
    pub(crate) exportable: bool,
}

pub(crate) struct Mapping {
    pub(crate) size: usize,
    pub(crate) accessible: bool,
}

pub(crate) struct Fault {
    pub(crate) name: String,
    /// Calls of `name` still to let through before failing.
    pub(crate) skip: u64,
    pub(crate) code: R,
}

pub(crate) struct Emu {
    pub(crate) config: Config,
    pub(crate) capacity: Vec<usize>,
    pub(crate) used: Vec<usize>,
    /// start -> (size, Level Zero context or 0 for CUDA)
    pub(crate) reservations: BTreeMap<u64, (usize, usize)>,
    /// Ranges freed most recently (start, size), newest last: a reservation of the same size
    /// takes one back first, as the drivers' address allocators reuse freed ranges.
    pub(crate) freed_ranges: Vec<(u64, usize)>,
    /// Reservation start -> (device, bytes) of released HIP memory it still holds.
    pub(crate) held: HashMap<u64, (i32, usize)>,
    pub(crate) handles: HashMap<u64, Physical>,
    pub(crate) mappings: BTreeMap<u64, Mapping>,
    pub(crate) host: HashMap<usize, usize>,
    pub(crate) registered: HashMap<usize, usize>,
    pub(crate) ze_initialized: bool,
    pub(crate) ze_contexts: Vec<usize>,
    pub(crate) events: u64,
    pub(crate) next_event: usize,
    pub(crate) streams: u64,
    pub(crate) next_handle: u64,
    pub(crate) calls: HashMap<String, u64>,
    pub(crate) faults: Vec<Fault>,
    /// Queued work not yet run, in queue order ([`crate::queue`]).
    pub(crate) pending: Vec<Pending>,
    pub(crate) next_seq: u64,
    /// event -> (stream, last work queued before it was recorded).
    pub(crate) recorded: HashMap<usize, (StreamKey, u64)>,
    /// Level Zero command list -> device.
    pub(crate) lists: HashMap<usize, i32>,
    /// Every synchronisation violation so far, described.
    pub(crate) violations: Vec<String>,
    /// Maps, unmaps and device-bound copies queued and completed, in the order they happened
    /// (`cuemu_event_log`), up to [`EVENT_LOG_MAX`] entries.
    pub(crate) event_log: Vec<CuemuEvent>,
}

/// Entries the event log keeps; later events are counted but not kept.
pub(crate) const EVENT_LOG_MAX: usize = 1 << 16;

pub(crate) static EMU: Mutex<Option<Emu>> = Mutex::new(None);

thread_local! {
    pub(crate) static CURRENT: Cell<usize> = const { Cell::new(0) };
}

pub(crate) fn parse_faults(spec: &str) -> Vec<Fault> {
    spec.split(',')
        .filter_map(|item| {
            let mut parts = item.trim().split(':');
            let name = parts.next()?.to_string();
            let nth: u64 = parts.next()?.parse().ok()?;
            let code: R = parts.next()?.parse().ok()?;
            Some(Fault {
                name,
                skip: nth.checked_sub(1)?,
                code,
            })
        })
        .collect()
}

pub(crate) fn lock() -> MutexGuard<'static, Option<Emu>> {
    EMU.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` on the emulator state, after counting the call and applying injected faults.
pub(crate) fn call(name: &str, f: impl FnOnce(&mut Emu) -> R) -> R {
    crate::control::wait_if_held(name);
    let mut guard = lock();
    let emu = guard.get_or_insert_with(|| {
        let config = Config::from_env();
        let n = usize::try_from(config.devices).unwrap_or(0);
        Emu {
            capacity: vec![config.capacity; n],
            used: vec![0; n],
            config,
            reservations: BTreeMap::new(),
            held: HashMap::new(),
            freed_ranges: Vec::new(),
            handles: HashMap::new(),
            mappings: BTreeMap::new(),
            host: HashMap::new(),
            registered: HashMap::new(),
            ze_initialized: false,
            ze_contexts: Vec::new(),
            events: 0,
            next_event: 0x4e00_0000,
            streams: 0,
            next_handle: 0x1000,
            calls: HashMap::new(),
            faults: std::env::var("DEVMEM_EMU_FAIL")
                .map(|s| parse_faults(&s))
                .unwrap_or_default(),
            pending: Vec::new(),
            next_seq: 0,
            recorded: HashMap::new(),
            lists: HashMap::new(),
            violations: Vec::new(),
            event_log: Vec::new(),
        }
    });
    *emu.calls.entry(name.to_string()).or_insert(0) += 1;
    if let Some(i) = emu.faults.iter().position(|f| f.name == name) {
        if emu.faults[i].skip == 0 {
            return emu.faults.remove(i).code;
        }
        emu.faults[i].skip -= 1;
    }
    f(emu)
}

pub(crate) fn context_of(device: i32) -> usize {
    0x7e00_0000 + usize::try_from(device).unwrap_or(0) * 0x100
}

pub(crate) fn current_device(emu: &Emu) -> Option<i32> {
    let ctx = CURRENT.with(Cell::get);
    (0..emu.config.devices).find(|d| context_of(*d) == ctx)
}

/// Runs `f` with the current context's device, or fails with INVALID_CONTEXT.
pub(crate) fn with_context(name: &str, f: impl FnOnce(&mut Emu, i32) -> R) -> R {
    call(name, |emu| match current_device(emu) {
        Some(device) => f(emu, device),
        None => INVALID_CONTEXT,
    })
}

/// # Safety
/// `out` must be NULL or valid for a write of `T`.
pub(crate) unsafe fn put<T>(out: *mut T, value: T) -> R {
    if out.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-NULL and valid by the caller's contract.
    unsafe { out.write(value) };
    SUCCESS
}

impl Emu {
    pub(crate) fn device_ok(&self, device: i32) -> bool {
        device >= 0 && device < self.config.devices
    }

    /// Whether [va, va+len) is covered by accessible mappings (one, or adjacent ones: a copy
    /// may span the chunks of one allocation).
    pub(crate) fn accessible(&self, va: u64, len: usize) -> bool {
        let end = va + len as u64;
        let mut at = va;
        loop {
            let Some((base, m)) = self.mappings.range(..=at).next_back() else {
                return false;
            };
            let stop = base + m.size as u64;
            if !m.accessible || stop <= at {
                return false;
            }
            if end <= stop {
                return true;
            }
            at = stop;
        }
    }

    pub(crate) fn in_reservation(&self, va: u64, size: usize) -> bool {
        self.reservations
            .range(..=va)
            .next_back()
            .is_some_and(|(base, (len, _))| va + size as u64 <= base + *len as u64)
    }

    pub(crate) fn overlaps_mapping(&self, va: u64, size: usize) -> bool {
        let end = va + size as u64;
        self.mappings
            .range(..end)
            .next_back()
            .is_some_and(|(base, m)| base + m.size as u64 > va)
    }
}

impl Emu {
    /// Reserves `size` bytes aligned to `alignment` (at least the granularity), at `hint` when
    /// that range is free (as the drivers treat their address argument), else anywhere.
    pub(crate) fn reserve(
        &mut self,
        size: usize,
        alignment: usize,
        context: usize,
        hint: u64,
    ) -> Result<u64, R> {
        let granularity = self.config.granularity;
        if size == 0 || !size.is_multiple_of(granularity) {
            return Err(INVALID_VALUE);
        }
        let align = alignment.max(granularity);
        let reuse = self
            .freed_ranges
            .iter()
            .rposition(|&(start, n)| n == size && start.is_multiple_of(align as u64));
        let hint = match (hint, reuse) {
            (0, Some(i)) => self.freed_ranges.remove(i).0,
            _ => hint,
        };
        if hint != 0 && hint.is_multiple_of(align as u64) {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a kernel that
            // treats it as a plain hint may place it elsewhere, which is undone below.
            let raw = unsafe {
                libc::mmap(
                    hint as *mut c_void,
                    size,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE
                        | libc::MAP_ANONYMOUS
                        | libc::MAP_NORESERVE
                        | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if raw as u64 == hint {
                self.reservations.insert(hint, (size, context));
                return Ok(hint);
            }
            if raw != libc::MAP_FAILED {
                // SAFETY: the mapping made just above, elsewhere than asked.
                unsafe { libc::munmap(raw, size) };
            }
        }
        let span = size.checked_add(align).ok_or(OUT_OF_MEMORY)?;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(OUT_OF_MEMORY);
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        // SAFETY: trimming the unaligned head and the tail of the mapping made just above.
        unsafe {
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            let tail = start + span - (aligned + size);
            if tail > 0 {
                libc::munmap((aligned + size) as *mut c_void, tail);
            }
        }
        self.reservations.insert(aligned as u64, (size, context));
        Ok(aligned as u64)
    }

    pub(crate) fn free_va(&mut self, ptr: u64, size: usize) -> R {
        if self.reservations.get(&ptr).map(|r| r.0) != Some(size)
            || self.overlaps_mapping(ptr, size)
        {
            return INVALID_VALUE;
        }
        self.check_release(ptr, size, "freed the address range");
        self.reservations.remove(&ptr);
        self.freed_ranges.push((ptr, size));
        if self.freed_ranges.len() > 64 {
            self.freed_ranges.remove(0);
        }
        if let Some((device, bytes)) = self.held.remove(&ptr) {
            self.used[device as usize] -= bytes;
        }
        // SAFETY: the range is a reservation this emulator made and nothing maps it.
        unsafe { libc::munmap(ptr as *mut c_void, size) };
        SUCCESS
    }

    /// Creates `size` bytes of "device memory" (a memfd) on `device`.
    pub(crate) fn create(&mut self, device: i32, size: usize, context: usize) -> Result<u64, R> {
        if !self.device_ok(device) {
            return Err(INVALID_DEVICE);
        }
        if size == 0 || !size.is_multiple_of(self.config.granularity) {
            return Err(INVALID_VALUE);
        }
        let d = device as usize;
        if self.used[d] + size > self.capacity[d] {
            return Err(OUT_OF_MEMORY);
        }
        // SAFETY: memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"cuemu".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(OUT_OF_MEMORY);
        }
        // SAFETY: fd was just created.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            // SAFETY: closing the fd created above.
            unsafe { libc::close(fd) };
            return Err(OUT_OF_MEMORY);
        }
        if self.config.stale {
            // SAFETY: a temporary shared mapping of the memfd just sized, unmapped below.
            unsafe {
                let raw = libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                if raw != libc::MAP_FAILED {
                    std::ptr::write_bytes(raw.cast::<u8>(), 0xA5, size);
                    libc::munmap(raw, size);
                }
            }
        }
        self.used[d] += size;
        self.next_handle += 1;
        let id = self.next_handle;
        self.handles.insert(
            id,
            Physical {
                fd,
                size,
                device,
                context,
                hip: false,
                reservation: None,
                exportable: false,
            },
        );
        Ok(id)
    }

    /// Exports a handle as a POSIX file descriptor: a close-on-exec duplicate of its memfd,
    /// owned by the caller. The memory lives as long as any descriptor of it is open (releasing
    /// the handle keeps it), as with the drivers.
    pub(crate) fn export_fd(&mut self, handle: u64) -> Result<c_int, R> {
        let Some(physical) = self.handles.get(&handle) else {
            return Err(INVALID_VALUE);
        };
        if !physical.exportable {
            return Err(NOT_PERMITTED); // created without POSIX file descriptor handles
        }
        // SAFETY: duplicating a descriptor this emulator owns.
        let fd = unsafe { libc::fcntl(physical.fd, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(OUT_OF_MEMORY);
        }
        Ok(fd)
    }

    /// Imports an exported descriptor as a new handle over a duplicate of it (the caller keeps
    /// `fd`). Only a memfd whose size is a non-zero multiple of the granularity is accepted;
    /// anything else gets `INVALID_VALUE`.
    ///
    /// Capacity: the memory already exists on the device (another process created it), so an
    /// import is never refused for capacity, but while imported it counts in `used` (and in
    /// the free memory the emulator reports) like created memory, and its handle counts as a
    /// live handle until released.
    pub(crate) fn import_fd(&mut self, device: i32, fd: c_int, hip: bool) -> Result<u64, R> {
        if fd < 0 {
            return Err(INVALID_VALUE);
        }
        // SAFETY: fcntl and fstat on a descriptor number; a closed one fails with EBADF.
        let (seals, stat) = unsafe {
            let seals = libc::fcntl(fd, libc::F_GET_SEALS);
            let mut stat: libc::stat = std::mem::zeroed();
            let rc = libc::fstat(fd, &mut stat);
            (seals, (rc == 0).then_some(stat))
        };
        let Some(stat) = stat else {
            return Err(INVALID_VALUE);
        };
        // Only memfds (and other shmem files) answer F_GET_SEALS.
        if seals < 0 || (stat.st_mode & libc::S_IFMT) != libc::S_IFREG {
            return Err(INVALID_VALUE);
        }
        let size = usize::try_from(stat.st_size).map_err(|_| INVALID_VALUE)?;
        if size == 0 || !size.is_multiple_of(self.config.granularity) {
            return Err(INVALID_VALUE);
        }
        if !self.device_ok(device) {
            return Err(INVALID_DEVICE);
        }
        // SAFETY: duplicating a descriptor checked open above.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            return Err(OUT_OF_MEMORY);
        }
        self.used[device as usize] += size;
        self.next_handle += 1;
        let id = self.next_handle;
        self.handles.insert(
            id,
            Physical {
                fd: own,
                size,
                device,
                context: 0,
                hip,
                reservation: None,
                exportable: true,
            },
        );
        Ok(id)
    }

    pub(crate) fn release(&mut self, handle: u64) -> R {
        let Some(physical) = self.handles.remove(&handle) else {
            return INVALID_VALUE;
        };
        match physical
            .reservation
            .filter(|base| physical.hip && self.reservations.contains_key(base))
        {
            // ROCm: released, but the device keeps the memory while the reservation lives.
            Some(base) => {
                let held = self.held.entry(base).or_insert((physical.device, 0));
                held.1 += physical.size;
            }
            None => self.used[physical.device as usize] -= physical.size,
        }
        // SAFETY: the fd belongs to this handle and is closed once; mappings keep their pages.
        unsafe { libc::close(physical.fd) };
        SUCCESS
    }

    /// Maps a handle at `ptr` inside a reservation, without access.
    pub(crate) fn map(&mut self, ptr: u64, size: usize, handle: u64) -> R {
        let Some(physical) = self.handles.get(&handle) else {
            return INVALID_HANDLE;
        };
        if size != physical.size {
            return INVALID_VALUE;
        }
        if !self.in_reservation(ptr, size) || self.overlaps_mapping(ptr, size) {
            return INVALID_VALUE;
        }
        let fd = physical.fd;
        let base = self.reservations.range(..=ptr).next_back().map(|(b, _)| *b);
        if let Some(physical) = self.handles.get_mut(&handle) {
            physical.reservation = base;
        }
        // SAFETY: the range lies inside a reservation of this emulator and is not mapped.
        let raw = unsafe {
            libc::mmap(
                ptr as *mut c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return OUT_OF_MEMORY;
        }
        self.mappings.insert(
            ptr,
            Mapping {
                size,
                accessible: false,
            },
        );
        self.log_event(EVENT_MAP, ptr, size);
        SUCCESS
    }

    /// Grants access to `[ptr, ptr+size)`, which must be exactly covered by one mapping or by
    /// several adjacent ones (as the drivers allow).
    pub(crate) fn set_access(&mut self, ptr: u64, size: usize) -> R {
        self.set_protection(ptr, size, false)
    }

    /// Grants access to `[ptr, ptr+size)` as [`set_access`](Self::set_access) does, read-only
    /// when `read_only` (a write through it faults in the writer with SIGSEGV).
    pub(crate) fn set_protection(&mut self, ptr: u64, size: usize, read_only: bool) -> R {
        let end = ptr + size as u64;
        let mut at = ptr;
        let mut covered = Vec::new();
        while at < end {
            match self.mappings.get(&at) {
                Some(m) if at + m.size as u64 <= end => {
                    covered.push(at);
                    at += m.size as u64;
                }
                _ => return INVALID_VALUE,
            }
        }
        if covered.is_empty() {
            return INVALID_VALUE;
        }
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: the range is made of mappings this emulator made.
        let rc = unsafe { libc::mprotect(ptr as *mut c_void, size, prot) };
        if rc != 0 {
            return INVALID_VALUE;
        }
        for base in covered {
            if let Some(m) = self.mappings.get_mut(&base) {
                m.accessible = true;
            }
        }
        SUCCESS
    }

    pub(crate) fn unmap(&mut self, ptr: u64, size: usize) -> R {
        if self.mappings.get(&ptr).map(|m| m.size) != Some(size) {
            return INVALID_VALUE;
        }
        self.check_release(ptr, size, "unmapped device memory");
        // SAFETY: replacing a mapping this emulator made with an inaccessible one, keeping the
        // reservation.
        let raw = unsafe {
            libc::mmap(
                ptr as *mut c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return INVALID_VALUE;
        }
        self.mappings.remove(&ptr);
        self.log_event(EVENT_UNMAP, ptr, size);
        SUCCESS
    }

    /// Appends to the event log (`cuemu_event_log`).
    pub(crate) fn log_event(&mut self, kind: u32, addr: u64, len: usize) {
        if self.event_log.len() < EVENT_LOG_MAX {
            self.event_log.push(CuemuEvent {
                kind,
                addr,
                len: len as u64,
            });
        }
    }

    /// Allocates `size` bytes of page-locked-looking host memory.
    pub(crate) fn alloc_host(&mut self, size: usize) -> Result<*mut c_void, R> {
        if size == 0 {
            return Err(INVALID_VALUE);
        }
        // SAFETY: a fresh anonymous mapping.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(OUT_OF_MEMORY);
        }
        self.host.insert(raw as usize, size);
        Ok(raw)
    }

    pub(crate) fn free_host(&mut self, p: *mut c_void) -> R {
        match self.host.remove(&(p as usize)) {
            Some(size) => {
                self.check_release(p as u64, size, "freed host memory");
                // SAFETY: a mapping made by `alloc_host`, freed once.
                unsafe { libc::munmap(p, size) };
                SUCCESS
            }
            None => INVALID_VALUE,
        }
    }

    /// Whether `[p, p+len)` overlaps registered host memory without lying inside a single
    /// registration.
    pub(crate) fn crosses_registrations(&self, p: usize, len: usize) -> bool {
        let mut overlapping = self
            .registered
            .iter()
            .filter(|(base, n)| p < *base + *n && **base < p + len);
        match (overlapping.next(), overlapping.next()) {
            (None, _) => false,
            (Some((base, n)), None) => !(p >= *base && p + len <= base + n),
            (Some(_), Some(_)) => true,
        }
    }

    /// Whether `[p, p+len)` touches a reservation (device address space).
    pub(crate) fn is_device_range(&self, p: u64, len: usize) -> bool {
        let end = p + len as u64;
        self.reservations
            .range(..end)
            .next_back()
            .is_some_and(|(base, (size, _))| base + *size as u64 > p)
    }
}
