"""Low level: finding and loading libdevmem.so, the one ctypes table of every export, the C
structs, and the mapping from status codes to exceptions.

Nothing here imports PyTorch. Every call into the library goes through :func:`call`, which
raises the exception matching the status with the library's message.
"""

from __future__ import annotations

import ctypes
import enum
import glob
import logging
import os
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_double,
    c_int,
    c_int32,
    c_size_t,
    c_ssize_t,
    c_uint64,
    c_ulonglong,
    c_void_p,
)
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("devmem")

#: Environment variable naming the libdevmem.so to load.
LIBRARY_ENV = "DEVMEM_LIBRARY"
#: Environment variable selecting the bundled driver emulator: ``1`` or ``cuda`` (its CUDA
#: driver face), ``hip`` (its HIP face), ``level_zero`` (its Level Zero face), ``0`` or unset
#: (the real driver).
EMULATOR_ENV = "DEVMEM_EMULATOR"
EMULATOR_FACES = ("cuda", "hip", "level_zero")
#: Longest tag in bytes (UTF-8), as in the C header.
MAX_TAG_LEN = 255
TAG_BUFFER_LEN = 256


class Status(enum.IntEnum):
    """``devmem_status`` values (include/devmem.h)."""

    SUCCESS = 0
    INVALID_ARGUMENT = 1
    NULL_POINTER = 2
    OUT_OF_MEMORY = 3
    DRIVER_NOT_FOUND = 4
    DRIVER = 5
    UNKNOWN_POINTER = 6
    INVALID_DEVICE = 7
    INVALID_TAG = 8
    INVALID_STATE = 9
    HOST_OUT_OF_MEMORY = 10
    PANIC = 11
    BUFFER_TOO_SMALL = 12
    UNSUPPORTED = 13
    REGION = 14


class ReadOnly(enum.IntEnum):
    """``devmem_read_only``: what sleeps may assume about a tag's bytes."""

    OFF = 0
    ON = 1
    VERIFY = 2


#: ``devmem_shared_store_options.flags``.
SHARED_KEEP = 1
SHARED_RECLAIM = 2


class Backend(enum.IntEnum):
    """``devmem_backend``: which driver devmem uses."""

    AUTO = 0
    CUDA = 1
    LEVEL_ZERO = 2
    HIP = 3


class HostPolicy(enum.IntEnum):
    """``devmem_host_policy``: what happens to the host store after a wake."""

    KEEP = 0
    RELEASE = 1


class State(enum.IntEnum):
    """``devmem_state``: where an allocation's bytes are."""

    MAPPED = 0
    OFFLOADED = 1
    DISCARDED = 2


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class DevmemError(RuntimeError):
    """A devmem call failed. ``status`` is the :class:`Status`, ``message`` the library's text."""

    def __init__(self, status: int, message: str) -> None:
        try:
            self.status: Optional[Status] = Status(status)
            name = self.status.name
        except ValueError:
            self.status = None
            name = f"status {status}"
        self.message = message
        super().__init__(f"{name}: {message}" if message else name)


class InvalidArgumentError(DevmemError, ValueError):
    """A size or other argument is out of range."""


class NullPointerError(DevmemError, ValueError):
    """A required pointer was NULL (0)."""


class OutOfMemoryError(DevmemError, MemoryError):
    """The device is full. Nothing was lost; free memory and retry."""


class DriverNotFoundError(DevmemError, OSError):
    """No GPU driver library could be opened. The message says first what to do on a machine
    without a GPU (the bundled emulator), then, one per line, what the library tried;
    ``message`` keeps the library's own text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.args = (driver_not_found_text(message),)

    def __str__(self) -> str:
        return str(self.args[0])


#: What :class:`DriverNotFoundError` says first: the way to run without a GPU.
NO_DRIVER_HINT = (
    f"no GPU driver could be loaded. On a machine without a GPU, set {EMULATOR_ENV}=1 or call "
    "devmem.use_emulator() to run on devmem's bundled driver emulator.\n"
    f"({EMULATOR_ENV}=hip or level_zero selects its other faces.) On a GPU machine, install the driver, or "
    "point DEVMEM_CUDA_LIBRARY (DEVMEM_HIP_LIBRARY, DEVMEM_ZE_LIBRARY) at it."
)


def driver_not_found_text(message: str) -> str:
    """``DRIVER_NOT_FOUND: <what to do>`` and then the library's ``message``, one tried library
    per line (it joins them with ``"; "``)."""
    details = [part.strip() for part in message.split("; ") if part.strip()]
    selected = os.environ.get(EMULATOR_ENV, "").strip()
    if selected not in ("", "0"):  # the emulator was asked for: the hint would be no help
        first = f"the driver emulator that {EMULATOR_ENV}={selected} selects could not be used."
    else:
        first = NO_DRIVER_HINT
    lines = [f"{Status.DRIVER_NOT_FOUND.name}: {first}"]
    if details:
        lines.append("What was tried:")
        lines.extend(f"  {part}" for part in details)
    return "\n".join(lines)


class DriverError(DevmemError):
    """A driver call failed; the message names the call and the driver's error."""


class UnknownPointerError(DevmemError, KeyError):
    """The pointer is not a live devmem allocation (never allocated, or already freed)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return RuntimeError.__str__(self)


class InvalidDeviceError(DevmemError, ValueError):
    """The device index is out of range."""


class InvalidTagError(DevmemError, ValueError):
    """A tag is empty, too long or not valid UTF-8."""


class InvalidStateError(DevmemError):
    """The call is not valid in the current state."""


class HostOutOfMemoryError(DevmemError, MemoryError):
    """Pinned host memory for backups could not be allocated."""


class PanicError(DevmemError):
    """devmem caught an internal panic; the process is intact."""


class BufferTooSmallError(DevmemError):
    """An output buffer was too small."""


class UnsupportedError(DevmemError):
    """The device or driver does not support what was asked."""


class RegionError(DevmemError):
    """The shared host-store region was refused, or what it stores does not match."""


class LibraryNotFoundError(DevmemError, OSError):
    """libdevmem.so itself could not be found or loaded."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.DRIVER_NOT_FOUND, message)


class UnknownTagWarning(UserWarning):
    """A sleep, offload, discard or wake named a tag that no live allocation has (a typo
    matches nothing). Pass ``strict=True`` to make it an :class:`InvalidArgumentError`."""


_EXCEPTIONS: Dict[int, type] = {
    Status.INVALID_ARGUMENT: InvalidArgumentError,
    Status.NULL_POINTER: NullPointerError,
    Status.OUT_OF_MEMORY: OutOfMemoryError,
    Status.DRIVER_NOT_FOUND: DriverNotFoundError,
    Status.DRIVER: DriverError,
    Status.UNKNOWN_POINTER: UnknownPointerError,
    Status.INVALID_DEVICE: InvalidDeviceError,
    Status.INVALID_TAG: InvalidTagError,
    Status.INVALID_STATE: InvalidStateError,
    Status.HOST_OUT_OF_MEMORY: HostOutOfMemoryError,
    Status.PANIC: PanicError,
    Status.BUFFER_TOO_SMALL: BufferTooSmallError,
    Status.UNSUPPORTED: UnsupportedError,
    Status.REGION: RegionError,
}


def error_for(status: int, message: str) -> DevmemError:
    """The exception for a status code, carrying ``message``."""
    return _EXCEPTIONS.get(status, DevmemError)(status, message)


# --------------------------------------------------------------------------------------------
# C structs (mirroring include/devmem.h; tests/test_abi.py checks them against the header)
# --------------------------------------------------------------------------------------------


class Counter(Structure):
    """``devmem_counter``."""

    _fields_ = [("current", c_uint64), ("peak", c_uint64), ("total", c_uint64)]


class Stats(Structure):
    """``devmem_stats``."""

    _fields_ = [
        ("allocations", Counter),
        ("bytes", Counter),
        ("mapped_bytes", Counter),
        ("offloaded_bytes", Counter),
        ("discarded_bytes", Counter),
        ("host_store_bytes", c_uint64),
        ("unknown_frees", c_uint64),
        ("bytes_kept", c_uint64),
    ]


class Transfer(Structure):
    """``devmem_transfer``."""

    _fields_ = [
        ("allocations", c_uint64),
        ("bytes_freed", c_uint64),
        ("bytes_saved", c_uint64),
        ("bytes_discarded", c_uint64),
        ("bytes_mapped", c_uint64),
        ("bytes_restored", c_uint64),
        ("bytes_skipped", c_uint64),
        ("verify_mismatches", c_uint64),
        ("seconds", c_double),
    ]


class Residual(Structure):
    """``devmem_residual``."""

    _fields_ = [
        ("devmem_mapped_bytes", c_uint64),
        ("devmem_other_bytes", c_uint64),
        ("driver_used_bytes", c_uint64),
        ("other_used_bytes", c_uint64),
        ("total_bytes", c_uint64),
    ]


class SharedStoreOptions(Structure):
    """``devmem_shared_store_options``."""

    _fields_ = [
        ("name", c_char_p),
        ("dir", c_char_p),
        ("bytes_per_rank", c_uint64),
        ("rank", ctypes.c_uint32),
        ("world", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("timeout_ms", ctypes.c_uint32),
    ]


class KeepOptions(Structure):
    """``devmem_keep_options``."""

    _fields_ = [
        ("instance", c_char_p),
        ("rank", ctypes.c_uint32),
        ("world", ctypes.c_uint32),
        ("socket", c_char_p),
        ("keeper_binary", c_char_p),
        ("read_only", ctypes.c_int),
    ]


#: ``DEVMEM_PATH_BUFFER_LEN``.
PATH_BUFFER_LEN = 4096


class SharedStoreInfo(Structure):
    """``devmem_shared_store_info``."""

    _fields_ = [
        ("open", c_int32),
        ("kept", c_int32),
        ("rank", ctypes.c_uint32),
        ("world", ctypes.c_uint32),
        ("generation", c_uint64),
        ("path", c_char * PATH_BUFFER_LEN),
    ]


class AllocationInfo(Structure):
    """``devmem_allocation_info``."""

    _fields_ = [
        ("ptr", c_uint64),
        ("size", c_uint64),
        ("requested_size", c_uint64),
        ("device", c_int32),
        ("state", c_int32),
        ("handle", c_uint64),
        ("tag", c_char * TAG_BUFFER_LEN),
    ]


#: ``devmem_allocation_callback``.
ALLOCATION_CALLBACK = CFUNCTYPE(None, POINTER(AllocationInfo), c_void_p)

_TAGS = POINTER(c_char_p)

#: The one table of every export: name -> (restype, argtypes).
FUNCTIONS: Dict[str, Tuple[Any, List[Any]]] = {
    "my_malloc": (c_void_p, [c_ssize_t, c_int, c_void_p]),
    "my_free": (None, [c_void_p, c_ssize_t, c_int, c_void_p]),
    "create_and_map": (c_int, [c_ulonglong, c_ssize_t, c_ulonglong, POINTER(c_ulonglong)]),
    "unmap_and_release": (c_int, [c_ulonglong, c_ssize_t, c_ulonglong, POINTER(c_ulonglong)]),
    "devmem_malloc": (c_int32, [c_size_t, c_int, POINTER(c_void_p)]),
    "devmem_free": (c_int32, [c_void_p]),
    "devmem_set_current_tag": (c_int32, [c_char_p]),
    "devmem_get_current_tag": (c_int32, [c_char_p, c_size_t]),
    "devmem_sleep": (c_int32, [_TAGS, c_size_t]),
    "devmem_offload": (c_int32, [_TAGS, c_size_t]),
    "devmem_discard": (c_int32, [_TAGS, c_size_t]),
    "devmem_wake_up": (c_int32, [_TAGS, c_size_t]),
    "devmem_wake_up_except": (c_int32, [_TAGS, c_size_t]),
    "devmem_sleep_tags": (c_int32, [_TAGS, c_size_t, _TAGS, c_size_t]),
    "devmem_trim": (c_int32, [c_void_p, POINTER(c_size_t)]),
    "devmem_backup_pointer": (c_int32, [c_void_p, c_size_t, POINTER(c_void_p)]),
    "devmem_copy_backup": (c_int32, [c_void_p, c_size_t, c_void_p, POINTER(c_int)]),
    "devmem_get_last_transfer": (c_int32, [POINTER(Transfer)]),
    "devmem_get_stats": (c_int32, [c_char_p, POINTER(Stats)]),
    "devmem_mem_get_info": (c_int32, [c_int, POINTER(c_size_t), POINTER(c_size_t)]),
    "devmem_granularity": (c_int32, [c_int, POINTER(c_size_t)]),
    "devmem_device_count": (c_int32, [POINTER(c_int)]),
    "devmem_get_allocation_info": (c_int32, [c_void_p, POINTER(AllocationInfo)]),
    "devmem_get_allocation_chunks": (
        c_int32, [c_void_p, POINTER(ctypes.c_ulonglong), POINTER(c_size_t), c_size_t, POINTER(c_size_t)]),
    "devmem_for_each_allocation": (c_int32, [ALLOCATION_CALLBACK, c_void_p, POINTER(c_size_t)]),
    "devmem_set_callbacks": (c_int32, [ALLOCATION_CALLBACK, ALLOCATION_CALLBACK, c_void_p]),
    "devmem_release_host_store": (c_int32, [POINTER(c_size_t)]),
    "devmem_set_host_policy": (c_int32, [c_int]),
    "devmem_get_host_policy": (c_int32, [POINTER(c_int32)]),
    "devmem_reserve_host_store": (c_int32, [c_size_t, c_int]),
    "devmem_set_host_grow_ahead": (c_int32, [c_int]),
    "devmem_get_host_grow_ahead": (c_int32, [POINTER(c_int)]),
    "devmem_get_residual": (c_int32, [c_int, POINTER(Residual)]),
    "devmem_set_host_limit": (c_int32, [c_uint64]),
    "devmem_get_host_limit": (c_int32, [POINTER(c_uint64)]),
    "devmem_shared_store_open": (c_int32, [POINTER(SharedStoreOptions)]),
    "devmem_shared_store_close": (c_int32, []),
    "devmem_restore_from_store": (c_int32, [_TAGS, c_size_t]),
    "devmem_restore_from_store_by_order": (c_int32, [_TAGS, c_size_t]),
    "devmem_keep": (c_int32, [_TAGS, c_size_t, POINTER(KeepOptions)]),
    "devmem_attach": (c_int32, [_TAGS, c_size_t, POINTER(KeepOptions)]),
    "devmem_release_kept": (c_int32, [_TAGS, c_size_t, POINTER(KeepOptions), POINTER(c_uint64)]),
    "devmem_name_range": (c_int32, [c_uint64, c_size_t, c_char_p]),
    "devmem_clear_names": (c_int32, [c_char_p, POINTER(c_size_t)]),
    "devmem_get_shared_store_info": (c_int32, [POINTER(SharedStoreInfo)]),
    "devmem_set_read_only": (c_int32, [c_char_p, c_int]),
    "devmem_get_read_only": (c_int32, [c_char_p, POINTER(c_int32)]),
    "devmem_select_backend": (c_int32, [c_int]),
    "devmem_get_backend": (c_int32, [POINTER(c_int32)]),
    "devmem_set_level_zero_context": (c_int32, [c_void_p, POINTER(c_void_p), c_size_t]),
    "devmem_last_error_message": (c_size_t, [c_char_p, c_size_t]),
    "devmem_last_error_status": (c_int32, []),
    "devmem_status_string": (c_char_p, [c_int]),
    "devmem_version": (c_char_p, []),
}

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_path: Optional[str] = None
#: This package's directory (where pip puts the bundled libraries).
_HERE = os.path.dirname(os.path.abspath(__file__))


def _source_tree() -> Optional[str]:
    """The repository root when this package is imported from its source tree
    (``bindings/python/devmem``) rather than an installation, else None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
    if os.path.exists(os.path.join(_HERE, "..", "pyproject.toml")) and os.path.exists(os.path.join(root, "Cargo.toml")):
        return root
    return None


def _candidates() -> List[str]:
    found = []
    env = os.environ.get(LIBRARY_ENV)
    if env:
        found.append(env)
    found.extend(sorted(glob.glob(os.path.join(_HERE, "libdevmem*.so"))))
    root = _source_tree()
    if root is not None:  # imported from the source tree: the repository's cargo build
        found.append(os.path.join(root, "target", "release", "libdevmem.so"))
    found.append("libdevmem.so.0")
    return found


def emulator_path() -> Optional[str]:
    """The driver emulator bundled with this package, if it was built (pip with cargo)."""
    found = sorted(glob.glob(os.path.join(_HERE, "_emulator*.so")))
    root = _source_tree()
    if root is not None:  # imported from the source tree: the repository's cargo build
        found.append(os.path.join(root, "target", "release", "libdevmem_cuda_emu.so"))
    found = [f for f in found if os.path.exists(f)]
    return found[0] if found else None


#: File name stem of torch_memory_saver's preload-mode library (devmem ships its own under it).
PRELOAD_STEM = "torch_memory_saver_hook_mode_preload"
#: Environment override for the preload library's path.
PRELOAD_ENV = "DEVMEM_TMS_PRELOAD"


def preload_library_path() -> Optional[str]:
    """devmem's ``LD_PRELOAD`` library for torch_memory_saver's preload mode:
    ``$DEVMEM_TMS_PRELOAD``, else the copy bundled in this package
    (``torch_memory_saver_hook_mode_preload.abi3.so``), else cargo's build beside the
    ``libdevmem.so`` in use or in the source tree; None when there is none."""
    env = os.environ.get(PRELOAD_ENV)
    if env:
        return env
    found = sorted(glob.glob(os.path.join(_HERE, PRELOAD_STEM + "*.so")))
    cargo_name = "lib" + PRELOAD_STEM + ".so"
    library = os.environ.get(LIBRARY_ENV)
    if library:
        found.append(os.path.join(os.path.dirname(os.path.abspath(library)), cargo_name))
    root = _source_tree()
    if root is not None:
        found.append(os.path.join(root, "target", "release", cargo_name))
    found = [f for f in found if os.path.exists(f)]
    return found[0] if found else None


#: File name of the keeper executable (issue 22; see docs/keeper.md).
KEEPER_NAME = "devmem-keeper"
#: Environment override for the keeper executable's path.
KEEPER_ENV = "DEVMEM_KEEPER_BINARY"


def keeper_binary_path() -> Optional[str]:
    """The ``devmem-keeper`` executable: ``$DEVMEM_KEEPER_BINARY``, else the copy bundled in
    this package (``devmem/devmem-keeper``), else cargo's build beside the ``libdevmem.so`` in
    use (``$DEVMEM_LIBRARY``'s folder) or in the source tree's ``target/release`` and
    ``target/debug``; None when there is none. Only executable files count, except the
    environment override, which is returned as given (a wrong path then fails loudly)."""
    env = os.environ.get(KEEPER_ENV)
    if env:
        return env
    found = [os.path.join(_HERE, KEEPER_NAME)]
    library = os.environ.get(LIBRARY_ENV)
    if library:
        found.append(os.path.join(os.path.dirname(os.path.abspath(library)), KEEPER_NAME))
    if _path:
        found.append(os.path.join(os.path.dirname(os.path.abspath(_path)), KEEPER_NAME))
    root = _source_tree()
    if root is not None:
        found.append(os.path.join(root, "target", "release", KEEPER_NAME))
        found.append(os.path.join(root, "target", "debug", KEEPER_NAME))
    found = [f for f in found if os.path.isfile(f) and os.access(f, os.X_OK)]
    return found[0] if found else None


def emulator_face() -> Optional[str]:
    """The face ``DEVMEM_EMULATOR`` selects, or None for the real driver. Raises
    :class:`InvalidArgumentError` for a value that is not one of the accepted ones."""
    value = os.environ.get(EMULATOR_ENV, "").strip()
    if value in ("", "0"):
        return None
    face = {"1": "cuda", "cuda": "cuda", "hip": "hip", "level_zero": "level_zero"}.get(value)
    if face is None:
        raise InvalidArgumentError(
            Status.INVALID_ARGUMENT,
            f"{EMULATOR_ENV}={value!r} is not valid: expected 1 or cuda (the emulator's CUDA face), "
            "hip (its HIP face), level_zero (its Level Zero face), or 0",
        )
    return face


def _apply_emulator() -> None:
    """Points the library at the bundled emulator when ``DEVMEM_EMULATOR`` asks for it (before
    the library loads its backend, which reads these variables)."""
    face = emulator_face()
    if face is None:
        return
    path = emulator_path()
    if path is None:
        raise LibraryNotFoundError(
            f"{EMULATOR_ENV} is set but this devmem package has no bundled emulator "
            f"({_HERE} has no _emulator*.so): install the package "
            "from a wheel, or with cargo available, or point DEVMEM_CUDA_LIBRARY at libdevmem_cuda_emu.so",
        )
    os.environ["DEVMEM_CUDA_LIBRARY"] = path
    if face == "level_zero":
        os.environ["DEVMEM_ZE_LIBRARY"] = path
        os.environ["DEVMEM_BACKEND"] = "level_zero"
    elif face == "hip":
        os.environ["DEVMEM_HIP_LIBRARY"] = path
        os.environ["DEVMEM_BACKEND"] = "hip"
    else:
        os.environ.setdefault("DEVMEM_BACKEND", "cuda")
    logger.info("devmem: using the bundled driver emulator (%s face): %s", face, path)


def loaded() -> bool:
    """Whether libdevmem.so has been loaded into this process."""
    return _lib is not None


def library_path() -> str:
    """The path of the loaded libdevmem.so (loading it if needed)."""
    load()
    assert _path is not None
    return _path


def load() -> ctypes.CDLL:
    """Loads libdevmem.so once: ``$DEVMEM_LIBRARY``, else the copy bundled in this package,
    else ``libdevmem.so.0`` from the system's library path. Raises
    :class:`LibraryNotFoundError` naming what was tried."""
    global _lib, _path
    with _lock:
        if _lib is not None:
            return _lib
        _apply_emulator()
        tried = []
        env = os.environ.get(LIBRARY_ENV)
        for candidate in _candidates():
            if env and candidate == env and not os.path.exists(env):
                tried.append(f"{env} (from {LIBRARY_ENV}): no such file")
                break  # an explicit choice that is wrong must not fall back silently
            try:
                lib = ctypes.CDLL(candidate)
            except OSError as err:
                tried.append(f"{candidate}: {err}")
                if env and candidate == env:
                    break
                continue
            for name, (restype, argtypes) in FUNCTIONS.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
            resolved = candidate
            if not os.path.isabs(resolved):
                resolved = _resolve_loaded_path(candidate) or candidate
            _lib, _path = lib, os.path.abspath(resolved) if os.path.exists(resolved) else resolved
            logger.debug("devmem: loaded %s", _path)
            return lib
        root = _source_tree()
        if root is not None:
            hint = (f". This devmem package was imported from the source tree ({_HERE}),"
                    " not from an installation: the current directory or PYTHONPATH shadows any installed package."
                    f" Build the library (cargo build --release in {root}), set {LIBRARY_ENV}, or run from another"
                    " directory.")
        else:
            hint = f". Set {LIBRARY_ENV} to the library's path, or install the package with cargo available (or from a wheel)."
        raise LibraryNotFoundError("could not load libdevmem.so; tried: " + "; ".join(tried) + hint)


def _resolve_loaded_path(name: str) -> Optional[str]:
    """Where the dynamic loader found ``name`` (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libdevmem"):
                    return fields[-1]
    except OSError:
        pass
    return None


def last_message() -> str:
    """The calling thread's last error message from the library."""
    lib = load()
    buf = ctypes.create_string_buffer(4096)
    lib.devmem_last_error_message(buf, len(buf))
    return buf.value.decode("utf-8", "replace")


def call(name: str, *args: Any, entering: Optional[threading.Event] = None) -> Any:
    """Calls an export that returns a status; raises the matching exception on failure.
    ``entering`` is set right before the foreign call (which releases the GIL), so another
    thread can start Python work that overlaps the native call instead of delaying it."""
    fn = getattr(load(), name)
    if entering is not None:
        entering.set()
    status = fn(*args)
    if status != Status.SUCCESS:
        raise error_for(status, last_message())
    return status


def check_last(what: str) -> None:
    """Raises if the calling thread's last devmem call failed (for ``my_malloc``/``my_free``)."""
    status = load().devmem_last_error_status()
    if status != Status.SUCCESS:
        raise error_for(status, f"{what}: {last_message()}")


# --------------------------------------------------------------------------------------------
# Argument conversion
# --------------------------------------------------------------------------------------------


def encode_tag(tag: Any, what: str = "tag") -> bytes:
    """Checks a single tag (a non-empty ``str`` of at most 255 UTF-8 bytes) and encodes it."""
    if isinstance(tag, (bytes, bytearray)):
        raise TypeError(f"{what} must be str, not {type(tag).__name__}; decode it first")
    if not isinstance(tag, str):
        raise TypeError(f"{what} must be str, not {type(tag).__name__}")
    try:
        data = tag.encode("utf-8", "strict")
    except UnicodeEncodeError as err:
        raise InvalidTagError(Status.INVALID_TAG, f"{what} is not valid Unicode text: {err.reason} at index {err.start}") from None
    if not data:
        raise InvalidTagError(Status.INVALID_TAG, f"{what} is empty")
    if len(data) > MAX_TAG_LEN:
        raise InvalidTagError(Status.INVALID_TAG, f"{what} is {len(data)} bytes long; the limit is {MAX_TAG_LEN}")
    if b"\0" in data:
        raise InvalidTagError(Status.INVALID_TAG, f"{what} contains a NUL character")
    return data


def normalize_tags(tags: Any, what: str = "tags") -> List[str]:
    """Accepts one tag (``str``) or an iterable of tags; returns a list of str."""
    if isinstance(tags, str):
        return [tags]
    if isinstance(tags, (bytes, bytearray)):
        raise TypeError(f"{what} must be str or a sequence of str, not {type(tags).__name__}")
    if tags is None:
        raise TypeError(f"{what} must not be None here")
    try:
        items = list(tags)
    except TypeError:
        raise TypeError(f"{what} must be str or a sequence of str, not {type(tags).__name__}") from None
    for i, item in enumerate(items):
        encode_tag(item, f"{what}[{i}]")
    return items


def tag_array(tags: Sequence[str]) -> Tuple[Any, int]:
    """A C array of tag pointers (kept alive by the returned object) and its length."""
    encoded = [encode_tag(t) for t in tags]
    array = (c_char_p * max(len(encoded), 1))(*encoded)
    return array, len(encoded)


def functions() -> Dict[str, Callable[..., Any]]:
    """The loaded library's functions by name (for tests and advanced use)."""
    lib = load()
    return {name: getattr(lib, name) for name in FUNCTIONS}
