//! torch_memory_saver's *preload mode* on devmem: an `LD_PRELOAD` library that defines
//! `cudaMalloc` and `cudaFree`, so every allocation a process makes through the CUDA runtime
//! (PyTorch's caching allocator included) can come from devmem.
//!
//! * A thread is *interesting* inside a torch_memory_saver `region()` (the Python module sets
//!   the switch with [`tms_set_interesting_region`]) and, while `TMS_INIT_ENABLE=1`, everywhere
//!   until it says otherwise. An interesting thread's `cudaMalloc` is `devmem_malloc` on the
//!   runtime's current device, under the devmem tag of (current tag, cpu backup): the tag
//!   itself, or the tag + `":cpu_backup"` (as `devmem.torch_memory_saver.devmem_tag`), so it
//!   pauses and resumes with that tag. `TMS_INIT_ENABLE_CPU_BACKUP=1` makes the backup the
//!   default. Any other `cudaMalloc` goes to the real runtime untouched.
//! * `cudaFree` frees devmem's allocations and hands every other pointer (and a pointer devmem
//!   freed already) to the real runtime, which answers an unknown pointer with an error.
//! * libdevmem is loaded at the first interesting allocation: a libdevmem the program already
//!   loaded with global symbols (linked against it) first, whatever `DEVMEM_LIBRARY` says
//!   (a line on stderr when it named another file: two copies would be two registries, and the
//!   program's sleeps would not see these allocations); else `DEVMEM_LIBRARY`, else the
//!   `libdevmem.*so` beside this library (the Python package and cargo's target folder put them
//!   together), else `libdevmem.so.0`. Loading the same file the Python package loads gives one
//!   instance, so `pause`/`resume` from Python act on these allocations. Without libdevmem or a
//!   driver, the library forwards everything and says why once on stderr.
//! * Nothing here holds a lock of its own while calling the runtime or devmem, but for the
//!   one-time lookups (`OnceLock`: `dlsym` of the runtime, `dlopen` of libdevmem), and a call
//!   made while this thread is already inside an intercepted call (devmem's own, say) goes
//!   straight to the runtime, so nothing recurses through this library.
//!
//! The control functions keep torch_memory_saver's names and signatures (slime's DeepEP patch
//! calls `tms_get_interesting_region`/`tms_set_interesting_region` through ctypes). Those that
//! devmem does through its Python module instead (`tms_pause`, `tms_resume`, the memory margin,
//! backup pointers, disk backups) return an error and name the replacement on stderr.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// `cudaSuccess`.
const CUDA_SUCCESS: c_int = 0;
/// `cudaErrorInvalidValue`.
const CUDA_ERROR_INVALID_VALUE: c_int = 1;
/// `cudaErrorMemoryAllocation`.
const CUDA_ERROR_MEMORY_ALLOCATION: c_int = 2;
/// `cudaErrorInitializationError`: no real runtime could be found to forward to.
const CUDA_ERROR_INITIALIZATION: c_int = 3;
/// `cudaErrorUnknown`.
const CUDA_ERROR_UNKNOWN: c_int = 999;
/// `DEVMEM_STATUS_SUCCESS`, `DEVMEM_STATUS_OUT_OF_MEMORY`, `DEVMEM_STATUS_UNKNOWN_POINTER`,
/// `DEVMEM_STATUS_DRIVER_NOT_FOUND` (include/devmem.h).
const DEVMEM_SUCCESS: c_int = 0;
const DEVMEM_OUT_OF_MEMORY: c_int = 3;
const DEVMEM_DRIVER_NOT_FOUND: c_int = 4;
const DEVMEM_UNKNOWN_POINTER: c_int = 6;
/// Room for a tag: devmem's limit (`DEVMEM_MAX_TAG_LEN`, 255 bytes) plus the NUL.
const TAG_CAP: usize = 256;
/// Suffix of the devmem tag of a region's CPU-backed allocations (`BACKUP_SUFFIX` in Python).
const BACKUP_SUFFIX: &[u8] = b":cpu_backup";
const DEFAULT_TAG: &[u8] = b"default";

type MallocFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type FreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetDeviceFn = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The real runtime's entry points (the next definitions after this library's).
struct Runtime {
    malloc: Option<MallocFn>,
    free: Option<FreeFn>,
    get_device: Option<GetDeviceFn>,
}

type DevmemMalloc = unsafe extern "C" fn(usize, c_int, *mut *mut c_void) -> c_int;
type DevmemFree = unsafe extern "C" fn(*mut c_void) -> c_int;
type DevmemSetTag = unsafe extern "C" fn(*const c_char) -> c_int;
type DevmemGetTag = unsafe extern "C" fn(*mut c_char, usize) -> c_int;
type DevmemMessage = unsafe extern "C" fn(*mut c_char, usize) -> usize;
type DevmemInfo = unsafe extern "C" fn(*const c_void, *mut c_void) -> c_int;

/// libdevmem's entry points this library calls.
struct Devmem {
    malloc: DevmemMalloc,
    free: DevmemFree,
    set_tag: DevmemSetTag,
    get_tag: DevmemGetTag,
    message: DevmemMessage,
    info: DevmemInfo,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static DEVMEM: OnceLock<Result<Devmem, String>> = OnceLock::new();
/// Set once devmem could not allocate for a reason that will not change (no driver): from
/// then on every call is forwarded.
static INACTIVE: AtomicBool = AtomicBool::new(false);
static SAID_INACTIVE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// 0: not set on this thread (TMS_INIT_ENABLE decides), 1: off, 2: on.
    static INTERESTING: Cell<u8> = const { Cell::new(0) };
    /// 0: not set (TMS_INIT_ENABLE_CPU_BACKUP decides), 1: off, 2: on.
    static CPU_BACKUP: Cell<u8> = const { Cell::new(0) };
    /// The torch_memory_saver tag of this thread, NUL-terminated; empty: "default".
    static TAG: Cell<[u8; TAG_CAP]> = const { Cell::new([0; TAG_CAP]) };
    /// Inside an intercepted call on this thread: a nested call goes to the runtime.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// torch_memory_saver's reading of a boolean variable: `1`, `true` or `yes` (any case).
fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// Says once that torch_memory_saver variables devmem cannot honour are set.
fn warn_unsupported_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if env_flag("TMS_INIT_ENABLE_DISK_BACKUP") {
            say("TMS_INIT_ENABLE_DISK_BACKUP is ignored: devmem has no disk backups (TMS_INIT_ENABLE_CPU_BACKUP=1 keeps a host copy)");
        }
        if let Ok(v) = std::env::var("TMS_INIT_CPU_BACKUP_BACKEND") {
            if !v.trim().is_empty() && v.trim() != "pinned" {
                say(&format!("TMS_INIT_CPU_BACKUP_BACKEND={v:?} is ignored: devmem's backups live in its pinned host store"));
            }
        }
    });
}

fn init_enable() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        warn_unsupported_env();
        env_flag("TMS_INIT_ENABLE")
    })
}

fn init_cpu_backup() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| env_flag("TMS_INIT_ENABLE_CPU_BACKUP"))
}

fn tri(cell: u8, default: bool) -> bool {
    match cell {
        1 => false,
        2 => true,
        _ => default,
    }
}

fn interesting() -> bool {
    let v = INTERESTING.try_with(Cell::get).unwrap_or(0);
    tri(v, init_enable())
}

fn cpu_backup() -> bool {
    let v = CPU_BACKUP.try_with(Cell::get).unwrap_or(0);
    tri(v, init_cpu_backup())
}

/// One line on stderr, written with `write(2)` (no lock, no allocation needed by the caller).
fn say(line: &str) {
    let text = format!("devmem preload: {line}\n");
    // SAFETY: writes `text.len()` bytes from a live buffer to file descriptor 2; a short or
    // failed write only loses the message.
    unsafe {
        libc::write(2, text.as_ptr().cast(), text.len());
    }
}

fn say_inactive_once(why: &str) {
    if !SAID_INACTIVE.swap(true, Ordering::SeqCst) {
        say(&format!(
            "inactive, every cudaMalloc/cudaFree goes to the CUDA runtime unchanged: {why}"
        ));
    }
}

/// `dlsym` of `name` in `handle`, as `T` (a function pointer type), or None.
///
/// # Safety
/// `T` must be the function pointer type of the symbol `name`.
unsafe fn sym<T: Copy>(handle: *mut c_void, name: &CStr) -> Option<T> {
    // SAFETY: dlsym with a valid handle (or RTLD_NEXT) and a NUL-terminated name.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller names the symbol's type; a function pointer is pointer-sized.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

/// The handle of an already-loaded object whose file name contains `libcudart`, for a runtime
/// loaded `RTLD_LOCAL` (by a Python extension), which `RTLD_NEXT` cannot see.
fn loaded_cudart() -> *mut c_void {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid `dl_phdr_info` for the duration of the callback and
        // `data` is the `*mut *mut c_void` given to dl_iterate_phdr below.
        unsafe {
            let name = (*info).dlpi_name;
            if name.is_null() {
                return 0;
            }
            let bytes = CStr::from_ptr(name).to_bytes();
            let file = bytes.rsplit(|b| *b == b'/').next().unwrap_or(bytes);
            if file.windows(9).any(|w| w == b"libcudart") {
                // Only the name: dlopen inside the callback would take the loader's locks in
                // the opposite order of another thread's dlopen.
                *(data as *mut Option<CString>) = Some(CStr::from_ptr(name).to_owned());
                return 1;
            }
        }
        0
    }
    let mut found: Option<CString> = None;
    // SAFETY: the callback only reads the loader's entries and writes `found` through `data`.
    unsafe {
        libc::dl_iterate_phdr(Some(visit), (&mut found as *mut Option<CString>).cast());
    }
    match found {
        // SAFETY: dlopen of a NUL-terminated path, only to get the handle of a loaded library.
        Some(name) => unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) },
        None => std::ptr::null_mut(),
    }
}

fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        // SAFETY: the names are the CUDA runtime's, with the signatures of the types given.
        let mut rt = unsafe {
            Runtime {
                malloc: sym::<MallocFn>(libc::RTLD_NEXT, c"cudaMalloc"),
                free: sym::<FreeFn>(libc::RTLD_NEXT, c"cudaFree"),
                get_device: sym::<GetDeviceFn>(libc::RTLD_NEXT, c"cudaGetDevice"),
            }
        };
        if rt.malloc.is_none() || rt.free.is_none() {
            let h = loaded_cudart();
            if !h.is_null() {
                // SAFETY: as above, looked up in the loaded runtime itself.
                unsafe {
                    rt.malloc = rt.malloc.or(sym(h, c"cudaMalloc"));
                    rt.free = rt.free.or(sym(h, c"cudaFree"));
                    rt.get_device = rt.get_device.or(sym(h, c"cudaGetDevice"));
                }
            }
        }
        rt
    })
}

/// This library's own folder, from the address of one of its functions.
fn own_dir() -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(object_file(own_dir as *const c_void)?);
    path.parent().map(|p| p.to_path_buf())
}

/// The file of the loaded object that holds `addr`, as the loader names it, or None.
fn object_file(addr: *const c_void) -> Option<String> {
    let mut info: libc::Dl_info = empty_dl_info();
    // SAFETY: dladdr reads the loader's tables and fills `info`, whose strings live as long as
    // the object.
    let found = unsafe { libc::dladdr(addr, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
    Some(
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The load address of the object that holds `addr`, or 0.
fn object_base(addr: *const c_void) -> usize {
    let mut info = empty_dl_info();
    // SAFETY: dladdr only reads the loader's tables and fills `info`.
    let found = unsafe { libc::dladdr(addr, &mut info) };
    if found == 0 {
        0
    } else {
        info.dli_fbase as usize
    }
}

fn empty_dl_info() -> libc::Dl_info {
    libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    }
}

/// Where libdevmem is looked for, in order.
fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("DEVMEM_LIBRARY") {
        if !p.trim().is_empty() {
            out.push(p);
            return out; // an explicit choice is not second-guessed
        }
    }
    if let Some(dir) = own_dir() {
        let exact = dir.join("libdevmem.so");
        if exact.exists() {
            out.push(exact.to_string_lossy().into_owned());
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.starts_with("libdevmem.") && n.ends_with(".so") && n != "libdevmem.so"
                })
                .collect();
            names.sort();
            out.extend(
                names
                    .into_iter()
                    .map(|n| dir.join(n).to_string_lossy().into_owned()),
            );
        }
    }
    if let Some(dir) = own_dir() {
        // CMake's install: this library in <libdir>/devmem/, libdevmem in <libdir>.
        let installed = dir.join("..").join("libdevmem.so.0");
        if installed.exists() {
            out.push(installed.to_string_lossy().into_owned());
        }
    }
    out.push("libdevmem.so.0".to_owned());
    out
}

/// The file of a libdevmem already loaded with global symbols (a program linked against it),
/// if any: one process must use one copy, or the program's sleeps and statistics would not see
/// what this library allocated through another copy's registry.
fn loaded_devmem() -> Option<String> {
    // SAFETY: dlsym on RTLD_DEFAULT with a NUL-terminated name only reads the loader's tables.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"devmem_malloc".as_ptr()) };
    if p.is_null() {
        return None;
    }
    object_file(p)
}

fn load_devmem() -> Result<Devmem, String> {
    let mut tried = Vec::new();
    let mut paths = candidates();
    if let Some(loaded) = loaded_devmem() {
        let same = |a: &str, b: &str| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if let Ok(asked) = std::env::var("DEVMEM_LIBRARY") {
            if !asked.trim().is_empty() && !same(&asked, &loaded) {
                say(&format!(
                    "DEVMEM_LIBRARY={asked} is not the libdevmem this program already loaded \
                     ({loaded}); using the loaded one, so the program and this library share one \
                     registry"
                ));
            }
        }
        paths.insert(0, loaded);
    }
    for path in paths {
        let Ok(c) = CString::new(path.clone()) else {
            tried.push(format!("{path:?}: contains NUL"));
            continue;
        };
        // SAFETY: dlopen of a NUL-terminated path; the handle is kept for the process's life.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            // SAFETY: dlerror returns a thread-local message or NULL.
            let err = unsafe { libc::dlerror() };
            let err = if err.is_null() {
                "unknown error".to_owned()
            } else {
                // SAFETY: a NUL-terminated message owned by the loader.
                unsafe { CStr::from_ptr(err) }
                    .to_string_lossy()
                    .into_owned()
            };
            tried.push(format!("{path}: {err}"));
            continue;
        }
        // SAFETY: libdevmem's C ABI (include/devmem.h) gives these symbols these signatures.
        let found = unsafe {
            (
                sym::<DevmemMalloc>(h, c"devmem_malloc"),
                sym::<DevmemFree>(h, c"devmem_free"),
                sym::<DevmemSetTag>(h, c"devmem_set_current_tag"),
                sym::<DevmemGetTag>(h, c"devmem_get_current_tag"),
                sym::<DevmemMessage>(h, c"devmem_last_error_message"),
                sym::<DevmemInfo>(h, c"devmem_get_allocation_info"),
            )
        };
        match found {
            (Some(malloc), Some(free), Some(set_tag), Some(get_tag), Some(message), Some(info)) => {
                return Ok(Devmem {
                    malloc,
                    free,
                    set_tag,
                    get_tag,
                    message,
                    info,
                });
            }
            _ => tried.push(format!(
                "{path}: not a devmem library (devmem_malloc and friends missing)"
            )),
        }
    }
    Err(format!(
        "libdevmem could not be loaded (set DEVMEM_LIBRARY): {}",
        tried.join("; ")
    ))
}

fn devmem() -> Option<&'static Devmem> {
    if INACTIVE.load(Ordering::Relaxed) {
        return None;
    }
    match DEVMEM.get_or_init(load_devmem) {
        Ok(d) => Some(d),
        Err(why) => {
            INACTIVE.store(true, Ordering::Relaxed);
            say_inactive_once(why);
            None
        }
    }
}

fn last_message(d: &Devmem) -> String {
    let mut buf = [0u8; 512];
    // SAFETY: writes at most `buf.len()` bytes, NUL-terminated, into `buf`.
    unsafe { (d.message)(buf.as_mut_ptr().cast(), buf.len()) };
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The devmem tag for this thread's (tag, cpu backup), NUL-terminated.
fn devmem_tag() -> Vec<u8> {
    let raw = TAG.try_with(Cell::get).unwrap_or([0; TAG_CAP]);
    let len = raw.iter().position(|b| *b == 0).unwrap_or(0);
    let mut out = if len == 0 {
        DEFAULT_TAG.to_vec()
    } else {
        raw[..len].to_vec()
    };
    if cpu_backup() {
        out.extend_from_slice(BACKUP_SUFFIX);
    }
    out.push(0);
    out
}

/// Runs `f` marked as inside an intercepted call; a panic becomes `on_panic`.
fn guarded(f: impl FnOnce() -> c_int, on_panic: c_int) -> c_int {
    let _ = IN_HOOK.try_with(|c| c.set(true));
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic);
    let _ = IN_HOOK.try_with(|c| c.set(false));
    r
}

fn nested() -> bool {
    IN_HOOK.try_with(Cell::get).unwrap_or(true)
}

fn forward_malloc(ptr: *mut *mut c_void, size: usize) -> c_int {
    match runtime().malloc {
        // SAFETY: the real cudaMalloc with the caller's arguments.
        Some(f) => unsafe { f(ptr, size) },
        None => {
            say("cudaMalloc: no CUDA runtime found to forward to");
            CUDA_ERROR_INITIALIZATION
        }
    }
}

fn forward_free(ptr: *mut c_void) -> c_int {
    match runtime().free {
        // SAFETY: the real cudaFree with the caller's argument.
        Some(f) => unsafe { f(ptr) },
        None => {
            say("cudaFree: no CUDA runtime found to forward to");
            CUDA_ERROR_INITIALIZATION
        }
    }
}

fn devmem_malloc(d: &Devmem, ptr: *mut *mut c_void, size: usize) -> Option<c_int> {
    let mut device: c_int = 0;
    if let Some(get) = runtime().get_device {
        // SAFETY: the real cudaGetDevice writes one int.
        let st = unsafe { get(&mut device) };
        if st != CUDA_SUCCESS {
            return Some(st);
        }
    }
    let tag = devmem_tag();
    let mut old = [0u8; TAG_CAP];
    // SAFETY: libdevmem's calls with buffers of the stated sizes and NUL-terminated tags.
    let st = unsafe {
        let saved = (d.get_tag)(old.as_mut_ptr().cast(), old.len()) == DEVMEM_SUCCESS;
        let set = (d.set_tag)(tag.as_ptr().cast());
        if set != DEVMEM_SUCCESS {
            say(&format!(
                "cudaMalloc: devmem refused tag {:?} ({}); the CUDA runtime takes this allocation",
                String::from_utf8_lossy(&tag[..tag.len() - 1]),
                last_message(d)
            ));
            // e.g. devmem's thread state is gone (a thread-local destructor allocating):
            // the runtime takes this one.
            return None;
        }
        let st = (d.malloc)(size, device, ptr);
        // Read before restoring the tag: a later call replaces the thread's message.
        let message = if st == DEVMEM_SUCCESS {
            String::new()
        } else {
            last_message(d)
        };
        if saved {
            (d.set_tag)(old.as_ptr().cast());
        }
        (st, message)
    };
    let (st, message) = st;
    match st {
        DEVMEM_SUCCESS => Some(CUDA_SUCCESS),
        DEVMEM_OUT_OF_MEMORY => Some(CUDA_ERROR_MEMORY_ALLOCATION),
        DEVMEM_DRIVER_NOT_FOUND => {
            INACTIVE.store(true, Ordering::Relaxed);
            say_inactive_once(&format!("devmem found no GPU driver: {message}"));
            None // this call and every later one go to the runtime
        }
        _ => {
            say(&format!(
                "cudaMalloc of {size} bytes on device {device}: {message}"
            ));
            Some(CUDA_ERROR_UNKNOWN)
        }
    }
}

/// `cudaMalloc`: devmem's memory on an interesting thread, the runtime's otherwise.
///
/// # Safety
/// As the CUDA runtime's `cudaMalloc`: `ptr` is NULL or points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn cudaMalloc(ptr: *mut *mut c_void, size: usize) -> c_int {
    if ptr.is_null() || size == 0 || nested() || !interesting() {
        return forward_malloc(ptr, size);
    }
    guarded(
        || match devmem() {
            Some(d) => devmem_malloc(d, ptr, size).unwrap_or_else(|| forward_malloc(ptr, size)),
            None => forward_malloc(ptr, size),
        },
        CUDA_ERROR_UNKNOWN,
    )
}

/// `cudaFree`: devmem frees what it allocated; any other pointer goes to the runtime.
///
/// # Safety
/// As the CUDA runtime's `cudaFree`.
#[no_mangle]
pub unsafe extern "C" fn cudaFree(ptr: *mut c_void) -> c_int {
    if ptr.is_null() || nested() {
        return forward_free(ptr);
    }
    // Only a library already loaded and working can own the pointer; never load it for a free.
    let Some(Ok(d)) = DEVMEM.get() else {
        return forward_free(ptr);
    };
    if INACTIVE.load(Ordering::Relaxed) {
        return forward_free(ptr);
    }
    guarded(
        || {
            // Ask first, quietly: freeing a pointer devmem does not own would count it as an
            // unknown free in devmem's statistics, and most frees are the runtime's.
            let mut info = [0u64; 128]; // devmem_allocation_info, first field the start address
                                        // SAFETY: devmem_get_allocation_info writes one devmem_allocation_info (well under
                                        // 1 KiB) into `info`, which is 8-byte aligned.
            let owned = unsafe { (d.info)(ptr, info.as_mut_ptr().cast()) } == DEVMEM_SUCCESS
                && info[0] == ptr as u64;
            if !owned {
                return forward_free(ptr);
            }
            // SAFETY: devmem_free checks the pointer against its own table again.
            match unsafe { (d.free)(ptr) } {
                DEVMEM_SUCCESS => CUDA_SUCCESS,
                // Not devmem's (or devmem has no driver, so it owns nothing): the runtime's.
                DEVMEM_UNKNOWN_POINTER | DEVMEM_DRIVER_NOT_FOUND => forward_free(ptr),
                _ => {
                    say(&format!("cudaFree({ptr:p}): {}", last_message(d)));
                    CUDA_ERROR_INVALID_VALUE
                }
            }
        },
        CUDA_ERROR_UNKNOWN,
    )
}

/// Turns this thread's interesting-region switch on or off (torch_memory_saver's name).
#[no_mangle]
pub extern "C" fn tms_set_interesting_region(on: bool) {
    let _ = INTERESTING.try_with(|c| c.set(if on { 2 } else { 1 }));
}

/// This thread's interesting-region switch (`TMS_INIT_ENABLE=1` until it is set).
#[no_mangle]
pub extern "C" fn tms_get_interesting_region() -> bool {
    interesting()
}

/// Sets this thread's torch_memory_saver tag; NULL or "" means "default". A tag longer than
/// devmem allows (255 bytes with the backup suffix) is refused on stderr and leaves the tag
/// unchanged.
///
/// # Safety
/// `tag` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tms_set_current_tag(tag: *const c_char) {
    let bytes: &[u8] = if tag.is_null() {
        b""
    } else {
        // SAFETY: the caller passes a NUL-terminated string.
        unsafe { CStr::from_ptr(tag) }.to_bytes()
    };
    if bytes.len() + BACKUP_SUFFIX.len() >= TAG_CAP {
        say(&format!(
            "tms_set_current_tag: tag of {} bytes is too long for devmem (at most {})",
            bytes.len(),
            TAG_CAP - 1 - BACKUP_SUFFIX.len()
        ));
        return;
    }
    let mut buf = [0u8; TAG_CAP];
    buf[..bytes.len()].copy_from_slice(bytes);
    let _ = TAG.try_with(|c| c.set(buf));
}

/// This thread's torch_memory_saver tag, valid until the thread sets another.
#[no_mangle]
pub extern "C" fn tms_get_current_tag() -> *const c_char {
    thread_local! {
        static OUT: Cell<[u8; TAG_CAP]> = const { Cell::new([0; TAG_CAP]) };
    }
    let raw = TAG.try_with(Cell::get).unwrap_or([0; TAG_CAP]);
    let mut out = [0u8; TAG_CAP];
    if raw[0] == 0 {
        out[..DEFAULT_TAG.len()].copy_from_slice(DEFAULT_TAG);
    } else {
        out = raw;
    }
    OUT.try_with(|c| {
        c.set(out);
        c.as_ptr() as *const c_char
    })
    .unwrap_or(std::ptr::null())
}

/// Whether this thread's interesting allocations get a CPU backup.
#[no_mangle]
pub extern "C" fn tms_set_enable_cpu_backup(on: bool) {
    let _ = CPU_BACKUP.try_with(|c| c.set(if on { 2 } else { 1 }));
}

/// See [`tms_set_enable_cpu_backup`].
#[no_mangle]
pub extern "C" fn tms_get_enable_cpu_backup() -> bool {
    cpu_backup()
}

/// Only `"pinned"` (devmem's host store) is accepted; returns 0, or 1 with a message.
///
/// # Safety
/// `backend` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tms_set_cpu_backup_backend(backend: *const c_char) -> c_int {
    let name = (!backend.is_null()).then(|| {
        // SAFETY: the caller passes NULL or a NUL-terminated string; it is not NULL here.
        unsafe { CStr::from_ptr(backend) }
            .to_string_lossy()
            .into_owned()
    });
    match name.as_deref() {
        None | Some("pinned") => 0,
        Some(other) => {
            say(&format!("cpu_backup_backend={other:?} is not supported: devmem's backups live in its pinned host store (use \"pinned\")"));
            1
        }
    }
}

/// Always `"pinned"`.
#[no_mangle]
pub extern "C" fn tms_get_cpu_backup_backend() -> *const c_char {
    c"pinned".as_ptr()
}

/// Disk backups do not exist in devmem: `true` is refused (returns 1, with a message).
#[no_mangle]
pub extern "C" fn tms_set_enable_disk_backup(on: bool) -> c_int {
    if on {
        say("disk backups are not supported by devmem; use enable_cpu_backup=True");
        return 1;
    }
    0
}

/// Always false.
#[no_mangle]
pub extern "C" fn tms_get_enable_disk_backup() -> bool {
    false
}

fn replaced_by(what: &str, instead: &str) -> c_int {
    say(&format!(
        "{what} is not available in devmem's preload library; use {instead}"
    ));
    1
}

/// Not here: returns 1 and names `torch_memory_saver.pause(tag)` (devmem's Python module).
#[no_mangle]
pub extern "C" fn tms_pause(_tag: *const c_char) -> c_int {
    replaced_by(
        "tms_pause",
        "torch_memory_saver.pause(tag) from devmem.torch_memory_saver",
    )
}

/// Not here: returns 1 and names `torch_memory_saver.resume(tag)`.
#[no_mangle]
pub extern "C" fn tms_resume(_tag: *const c_char) -> c_int {
    replaced_by(
        "tms_resume",
        "torch_memory_saver.resume(tag) from devmem.torch_memory_saver",
    )
}

/// Not here: returns 1 and names `torch_memory_saver.memory_margin_bytes`.
#[no_mangle]
pub extern "C" fn set_memory_margin_bytes(_bytes: u64) -> c_int {
    replaced_by(
        "set_memory_margin_bytes",
        "torch_memory_saver.memory_margin_bytes = N",
    )
}

/// Not here: returns 1 and names `HostPolicy.KEEP`.
#[no_mangle]
pub extern "C" fn tms_set_retain_cpu_backup(on: bool) -> c_int {
    if on {
        return replaced_by(
            "tms_set_retain_cpu_backup(true)",
            "devmem.set_host_policy(devmem.HostPolicy.KEEP)",
        );
    }
    0
}

/// Always false.
#[no_mangle]
pub extern "C" fn tms_get_retain_cpu_backup() -> bool {
    false
}

/// Not here: returns NULL and names `torch_memory_saver.get_cpu_backup`.
#[no_mangle]
pub extern "C" fn tms_get_cpu_backup_pointer(_ptr: *const u8, _size: u64) -> *mut u8 {
    replaced_by(
        "tms_get_cpu_backup_pointer",
        "torch_memory_saver.get_cpu_backup(tensor)",
    );
    std::ptr::null_mut()
}

/// Not here: disk backups do not exist in devmem.
#[no_mangle]
pub extern "C" fn tms_set_disk_backup_dir(_dir: *const c_char) -> c_int {
    replaced_by(
        "tms_set_disk_backup_dir",
        "enable_cpu_backup=True (devmem has no disk backups)",
    )
}

/// Whether this library is devmem's (1) and libdevmem is loaded and usable (2), for the
/// Python module to tell devmem's preload library from torch_memory_saver's.
#[no_mangle]
pub extern "C" fn devmem_preload_state() -> c_int {
    match DEVMEM.get() {
        Some(Ok(_)) if !INACTIVE.load(Ordering::Relaxed) => 2,
        _ => 1,
    }
}

/// Loads libdevmem now (instead of at the first interesting allocation); returns 0, or 1 when
/// it cannot be loaded (the reason is on stderr once).
#[no_mangle]
pub extern "C" fn devmem_preload_activate() -> c_int {
    match catch_unwind(|| devmem().is_some()) {
        Ok(true) => 0,
        _ => 1,
    }
}

/// The address of `devmem_malloc` in the libdevmem this library uses (loading it if needed), or
/// NULL when it cannot be loaded: the Python module compares it with its own to prove both use
/// one instance of the library.
#[no_mangle]
pub extern "C" fn devmem_preload_devmem_malloc() -> *const c_void {
    match catch_unwind(devmem) {
        Ok(Some(d)) => d.malloc as *const c_void,
        _ => std::ptr::null(),
    }
}

/// Whether this library's `cudaMalloc` is the one the process's global scope resolves (it was
/// loaded through `LD_PRELOAD`, before any other definition), so allocations of PyTorch and
/// other libraries reach it. A copy loaded later (ctypes, `RTLD_LOCAL`) is mapped but not used.
#[no_mangle]
pub extern "C" fn devmem_preload_interposing() -> bool {
    // The main program's handle searches the global scope (the program, what it was started
    // with, LD_PRELOAD first, then RTLD_GLOBAL loads), as a PLT call does. RTLD_DEFAULT would
    // search this library's own scope too and always find this definition.
    // SAFETY: dlopen(NULL) returns the main program's handle; dlsym looks a NUL-terminated
    // name up in it.
    let global = unsafe {
        let main = libc::dlopen(std::ptr::null(), libc::RTLD_LAZY);
        if main.is_null() {
            return false;
        }
        libc::dlsym(main, c"cudaMalloc".as_ptr())
    };
    // Compare the objects, not the addresses: this library's own reference to `cudaMalloc`
    // is itself resolved by the loader, so it would name whichever definition wins.
    !global.is_null() && object_base(global) == object_base(own_dir as *const c_void)
}
