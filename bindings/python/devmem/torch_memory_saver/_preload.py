"""The process's preload-mode library (``LD_PRELOAD``), as torch_memory_saver's Python side
sees it: found among the files mapped into this process, loaded with ctypes under
torch_memory_saver's signatures, and checked to be devmem's and to share this package's
libdevmem."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator, List, Optional

from .. import _lib, _torch_conf

_lock = threading.Lock()
#: The suffix of a backed-up tag (``BACKUP_SUFFIX`` of the module; repeated to avoid a cycle).
_BACKUP_SUFFIX = ":cpu_backup"
_control: Optional["PreloadControl"] = None


class PreloadError(RuntimeError):
    """Preload mode cannot run in this process; the message names the fix."""


def _how_to_fix() -> str:
    path = _lib.preload_library_path()
    where = path if path else "<devmem's torch_memory_saver_hook_mode_preload library: not built in this install>"
    return (
        "start the process with devmem's preload library in LD_PRELOAD: "
        "`with devmem.torch_memory_saver.configure_subprocess(): subprocess.run(...)`, "
        "`python -m devmem.torch_memory_saver --preload SCRIPT ARGS`, or "
        f"LD_PRELOAD={where}"
    )


def mapped_preloads() -> List[str]:
    """The paths of the ``torch_memory_saver_hook_mode_preload`` libraries mapped into this
    process (devmem's or torch_memory_saver's), in the order the maps list them."""
    found: List[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    if _lib.PRELOAD_STEM in os.path.basename(path) and path not in found:
                        found.append(path)
    except OSError:
        return []
    return found


def _signatures(cdll: ctypes.CDLL) -> None:
    """torch_memory_saver's ctypes signatures (callers such as slime rely on the restypes)."""
    for name in ("tms_set_interesting_region", "tms_set_enable_cpu_backup"):
        getattr(cdll, name).argtypes = [ctypes.c_bool]
        getattr(cdll, name).restype = None
    for name in ("tms_get_interesting_region", "tms_get_enable_cpu_backup", "tms_get_enable_disk_backup",
                 "tms_get_retain_cpu_backup"):
        getattr(cdll, name).argtypes = []
        getattr(cdll, name).restype = ctypes.c_bool
    cdll.tms_set_current_tag.argtypes = [ctypes.c_char_p]
    cdll.tms_set_current_tag.restype = None
    cdll.tms_get_current_tag.argtypes = []
    cdll.tms_get_current_tag.restype = ctypes.c_char_p
    cdll.tms_set_cpu_backup_backend.argtypes = [ctypes.c_char_p]
    cdll.tms_get_cpu_backup_backend.restype = ctypes.c_char_p
    cdll.tms_set_enable_disk_backup.argtypes = [ctypes.c_bool]
    cdll.tms_set_disk_backup_dir.argtypes = [ctypes.c_char_p]
    cdll.tms_pause.argtypes = [ctypes.c_char_p]
    cdll.tms_resume.argtypes = [ctypes.c_char_p]
    cdll.set_memory_margin_bytes.argtypes = [ctypes.c_uint64]
    cdll.tms_set_retain_cpu_backup.argtypes = [ctypes.c_bool]
    cdll.tms_get_cpu_backup_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint8), ctypes.c_uint64]
    cdll.tms_get_cpu_backup_pointer.restype = ctypes.POINTER(ctypes.c_uint8)
    cdll.devmem_preload_devmem_malloc.restype = ctypes.c_void_p
    cdll.devmem_preload_activate.restype = ctypes.c_int
    cdll.devmem_preload_state.restype = ctypes.c_int
    cdll.devmem_preload_interposing.restype = ctypes.c_bool


class PreloadControl:
    """devmem's preload library loaded in this process: its per-thread switches."""

    def __init__(self, path: str, cdll: ctypes.CDLL) -> None:
        self.path = path
        #: The library as ctypes sees it, with torch_memory_saver's signatures (what
        #: ``torch_memory_saver._impl._binary_wrapper.cdll`` is).
        self.cdll = cdll

    @contextlib.contextmanager
    def switches(self, tag: str, enable_cpu_backup: bool, interesting: bool) -> Iterator[None]:
        """The calling thread's (tag, cpu backup, interesting) for the body; the previous
        values afterwards, also when the body raises."""
        c = self.cdll
        old = (c.tms_get_current_tag(), c.tms_get_enable_cpu_backup(), c.tms_get_interesting_region())
        c.tms_set_current_tag(tag.encode())
        if c.tms_get_current_tag() != (tag.encode() or b"default"):
            c.tms_set_current_tag(old[0])
            raise ValueError(
                f"tag of {len(tag.encode())} bytes is too long for preload mode: with the "
                f"{len(_BACKUP_SUFFIX)}-byte backup suffix a tag holds at most {_lib.MAX_TAG_LEN - len(_BACKUP_SUFFIX)} bytes"
            )
        c.tms_set_enable_cpu_backup(enable_cpu_backup)
        c.tms_set_interesting_region(interesting)
        try:
            yield
        finally:
            c.tms_set_current_tag(old[0])
            c.tms_set_enable_cpu_backup(old[1])
            c.tms_set_interesting_region(old[2])


def loaded() -> Optional[PreloadControl]:
    """devmem's preload library in this process, checked (see :func:`control`), or None when
    no preload library is mapped. Raises :class:`PreloadError` for torch_memory_saver's own
    library or a second copy of libdevmem."""
    global _control
    with _lock:
        if _control is not None:
            return _control
        paths = mapped_preloads()
        if not paths:
            return None
        libraries = [(path, ctypes.CDLL(path)) for path in paths]  # the loader's own handles
        ours = [(path, cdll) for path, cdll in libraries if hasattr(cdll, "devmem_preload_state")]
        if not ours:
            raise PreloadError(
                f"the preload library in this process ({paths[0]}) is torch_memory_saver's own, not devmem's: its "
                "allocations would not be devmem's; " + _how_to_fix()
            )
        path, cdll = ours[0]
        _signatures(cdll)
        if not cdll.devmem_preload_interposing():
            raise PreloadError(
                f"devmem's preload library ({path}) is loaded but does not receive this process's cudaMalloc calls "
                "(it was not loaded through LD_PRELOAD, or another library's cudaMalloc, such as "
                "torch_memory_saver's own preload library, comes before it); " + _how_to_fix()
            )
        settings = _torch_conf.current_settings()
        if _torch_conf.expandable_enabled(settings) and cdll.tms_get_interesting_region():
            raise PreloadError(
                f"PyTorch's allocator is configured with expandable segments ({settings!r}): with them PyTorch maps "
                "memory itself instead of calling cudaMalloc, so allocations outside a region would not be "
                "devmem's although TMS_INIT_ENABLE asks for it; remove expandable_segments:True from "
                "PYTORCH_CUDA_ALLOC_CONF (torch_memory_saver refuses this too)"
            )
        if cdll.devmem_preload_activate() != 0:
            raise PreloadError(
                f"devmem's preload library ({path}) could not load libdevmem (its reason is on stderr); set "
                f"{_lib.LIBRARY_ENV} to the libdevmem.so this package uses ({_lib.library_path()})"
            )
        theirs = cdll.devmem_preload_devmem_malloc()
        ours = ctypes.cast(_lib.load().devmem_malloc, ctypes.c_void_p).value
        if theirs != ours:
            raise PreloadError(
                f"devmem's preload library ({path}) loaded another copy of libdevmem than this package "
                f"({_lib.library_path()}): pause and resume would not see its allocations; set "
                f"{_lib.LIBRARY_ENV}={_lib.library_path()} in the environment the process starts with"
            )
        _control = PreloadControl(path, cdll)
        return _control


def control() -> PreloadControl:
    """devmem's preload library in this process, working, or :class:`PreloadError` naming the
    fix."""
    found = loaded()
    if found is None:
        raise PreloadError("hook_mode='preload' needs devmem's preload library in this process; " + _how_to_fix())
    if found.cdll.devmem_preload_state() != 2:
        raise PreloadError(
            f"devmem's preload library ({found.path}) turned itself off (no GPU driver; its reason is on stderr): "
            "allocations go to the CUDA runtime and cannot be paused"
        )
    return found


class BinaryWrapper:
    """``torch_memory_saver._impl._binary_wrapper``: ``cdll`` is the preload library."""

    def __init__(self, preload: PreloadControl) -> None:
        self.cdll = preload.cdll
        self.path_binary = preload.path


class Impl:
    """``torch_memory_saver._impl`` as far as callers outside torch_memory_saver use it
    (slime's DeepEP patch toggles the interesting-region switch through
    ``_impl._binary_wrapper.cdll``)."""

    def __init__(self, preload: PreloadControl) -> None:
        self._binary_wrapper = BinaryWrapper(preload)
