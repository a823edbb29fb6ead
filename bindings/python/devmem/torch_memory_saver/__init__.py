"""torch_memory_saver's public API on devmem, for SGLang, slime and verl.

    from devmem.torch_memory_saver import torch_memory_saver
    with torch_memory_saver.region(tag="kv_cache"):
        kv = torch.empty(..., device="cuda")
    torch_memory_saver.pause("kv_cache")
    torch_memory_saver.resume("kv_cache")

Names and defaults are torch_memory_saver's, so code written for it runs unchanged:
``region(tag="default", enable_cpu_backup=False)`` discards on pause unless a CPU backup is
asked for (devmem's own :func:`devmem.region` defaults to keeping a backup instead).

Code that imports ``torch_memory_saver`` and cannot be edited gets this module with
``PYTHONPATH=$(python -m devmem.torch_memory_saver --pythonpath)`` (child processes inherit
it), or in-process with :func:`install`.

Two hook modes, as in torch_memory_saver. ``"torch"``: a region is a PyTorch pool on devmem's
pluggable allocator. ``"preload"`` (the default when devmem's preload library is in
``LD_PRELOAD``, as torch_memory_saver's default is preload): devmem's
``torch_memory_saver_hook_mode_preload`` library takes the process's ``cudaMalloc`` calls made
inside a region, and everywhere while ``TMS_INIT_ENABLE=1``. Unsupported torch_memory_saver
options (disk backups, ``cpu_backup_backend="mmap"``, ``retain_cpu_backup=True``) raise with the
alternative named.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from .. import _lib, api
from .._torch_conf import expandable_segments_disabled
from ..allocator import CuMemAllocator, _alongside, _device_module, _torch, blas_workspace_outside_pools
from . import _preload

logger = logging.getLogger("devmem")

_TAG_DEFAULT = "default"
#: Suffix of the devmem tag that holds a tag's allocations made with a CPU backup. Reserved:
#: a user tag ending with it is refused, so ``tag`` and ``tag + BACKUP_SUFFIX`` never collide
#: (devmem's C side accepts any character in a tag but NUL, so no separator is free).
BACKUP_SUFFIX = ":cpu_backup"
SHIM_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_tms_shim")


def check_user_tag(tag: str) -> None:
    """Refuses a torch_memory_saver tag ending with the reserved :data:`BACKUP_SUFFIX`: its
    allocations would share a devmem tag with another tag's backed-up ones, and pausing it
    would discard their backups. Raises ``ValueError`` naming the tag."""
    if not isinstance(tag, str):
        raise TypeError(f"tag must be str, not {type(tag).__name__}")
    if tag.endswith(BACKUP_SUFFIX):
        raise ValueError(
            f"tag {tag!r} ends with {BACKUP_SUFFIX!r}, which devmem's torch_memory_saver reserves for the "
            f"devmem tag of a region's CPU-backed allocations (tag {tag[:-len(BACKUP_SUFFIX)]!r} with "
            "enable_cpu_backup=True uses it); choose another tag"
        )


def devmem_tag(tag: str, enable_cpu_backup: bool) -> str:
    """The devmem tag for allocations of ``tag`` made with or without a CPU backup (one
    torch_memory_saver tag may hold both kinds): ``tag`` itself, or ``tag`` +
    :data:`BACKUP_SUFFIX`. One-to-one, because a tag ending with the suffix is refused
    (``ValueError``)."""
    check_user_tag(tag)
    name = tag + BACKUP_SUFFIX if enable_cpu_backup else tag
    _lib.encode_tag(name, "tag")
    return name


class TorchMemorySaver:
    """torch_memory_saver's ``TorchMemorySaver`` on devmem (use the ``torch_memory_saver``
    singleton of this module)."""

    def __init__(self) -> None:
        self._hook_mode: Optional[str] = None  # decided at first use (see hook_mode)
        self._margin = 0
        self._lock = threading.Lock()
        self._tags: Set[Tuple[str, bool]] = set()  # (tag, enable_cpu_backup) ever used
        self._preload_pools: Dict[Tuple[str, int], Any] = {}  # (devmem tag, device) -> MemPool

    # -- configuration ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Always True, as in torch_memory_saver."""
        return True

    @property
    def hook_mode(self) -> str:
        """``"preload"`` when devmem's preload library is in this process (torch_memory_saver's
        default), else ``"torch"``, until set."""
        if self._hook_mode is None:
            try:
                found = _preload.loaded()
            except _preload.PreloadError as err:  # mapped but unusable: torch mode, said why
                logger.warning("devmem: hook_mode defaults to 'torch': %s", err)
                found = None
            self._hook_mode = "preload" if found is not None else "torch"
        return self._hook_mode

    @hook_mode.setter
    def hook_mode(self, mode: str) -> None:
        if mode == "preload":
            _preload.control()  # PreloadError naming the fix when it cannot work here
        elif mode != "torch":
            raise ValueError(
                f"hook_mode must be 'torch' or 'preload', not {mode!r} (devmem's torch_memory_saver has no "
                "other hook modes)"
            )
        self._hook_mode = mode

    def _ensure_initialized(self) -> None:
        """torch_memory_saver's private initialiser, which its examples call: decides the hook
        mode and, in preload mode, checks the preload library (:class:`PreloadError` naming the
        fix when it cannot work)."""
        if self.hook_mode == "preload":
            _preload.control()

    @property
    def _impl(self) -> Any:
        """torch_memory_saver's private ``_impl`` as far as others use it: an object whose
        ``_binary_wrapper.cdll`` is the preload library (slime's DeepEP patch), or None when
        no preload library is loaded (then there is no switch to toggle)."""
        found = _preload.loaded()
        return None if found is None else _preload.Impl(found)

    @property
    def memory_margin_bytes(self) -> int:
        return self._margin

    @memory_margin_bytes.setter
    def memory_margin_bytes(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"memory_margin_bytes must be a non-negative int, not {value!r}")
        self._margin = value

    @property
    def retain_cpu_backup(self) -> bool:
        return False

    @retain_cpu_backup.setter
    def retain_cpu_backup(self, value: bool) -> None:
        if value:
            raise NotImplementedError(
                "retain_cpu_backup=True is not supported by devmem: a backup goes back to devmem's host store "
                "at resume (set devmem.HostPolicy.KEEP to keep the pinned memory for the next pause)"
            )

    def set_disk_backup_dir(self, path: str) -> None:
        raise NotImplementedError("devmem has no disk backups; use enable_cpu_backup=True")

    # -- regions ---------------------------------------------------------------------------

    @staticmethod
    def _check_backup_options(enable_cpu_backup: Any, enable_disk_backup: Any, cpu_backup_backend: Any) -> None:
        if not isinstance(enable_cpu_backup, bool):
            raise TypeError("enable_cpu_backup must be bool")
        if enable_disk_backup:
            raise NotImplementedError("devmem has no disk backups; use enable_cpu_backup=True")
        if cpu_backup_backend is None:
            return
        if not enable_cpu_backup:
            raise ValueError("cpu_backup_backend requires enable_cpu_backup=True")
        if cpu_backup_backend != "pinned":
            raise ValueError(
                f"cpu_backup_backend={cpu_backup_backend!r} is not supported: devmem's backups always live in "
                "its pinned host store (cpu_backup_backend='pinned')"
            )

    def _remember(self, tag: str, enable_cpu_backup: bool) -> str:
        name = devmem_tag(tag, enable_cpu_backup)
        with self._lock:
            self._tags.add((tag, enable_cpu_backup))
        return name

    @contextlib.contextmanager
    def region(
        self,
        tag: str = _TAG_DEFAULT,
        enable_cpu_backup: bool = False,
        enable_disk_backup: bool = False,
        cpu_backup_backend: Optional[str] = None,
    ) -> Iterator[None]:
        """Tensors allocated in the body can be paused: their device memory is released by
        :meth:`pause` (saved to host memory first with ``enable_cpu_backup=True``, dropped
        otherwise) and mapped again at the same addresses by :meth:`resume`."""
        self._check_backup_options(enable_cpu_backup, enable_disk_backup, cpu_backup_backend)
        name = self._remember(tag, enable_cpu_backup)
        if self.hook_mode == "preload":
            with self._preload_region(name, tag, enable_cpu_backup):
                yield
            return
        with CuMemAllocator.get_instance().use_memory_pool(name):
            yield

    def _preload_pool(self, name: str, device: Any) -> Any:
        """The PyTorch pool (default allocator, so ``cudaMalloc``) of devmem tag ``name`` on the
        current device: one per tag, so a block freed in one tag's region is never handed to
        another tag's tensor; kept for the process's life, as torch_memory_saver keeps its pool."""
        key = (name, int(device.current_device()))
        with self._lock:
            pool = self._preload_pools.get(key)
        if pool is None:
            made = device.MemPool()  # a PyTorch call: outside the lock
            with self._lock:
                pool = self._preload_pools.setdefault(key, made)
        return pool

    @contextlib.contextmanager
    def _preload_region(self, name: str, tag: str, enable_cpu_backup: bool) -> Iterator[None]:
        control = _preload.control()
        device, _ = _device_module(_torch())
        blas_workspace_outside_pools(device)
        pool = self._preload_pool(name, device)
        with expandable_segments_disabled(), device.use_mem_pool(pool):
            with control.switches(tag, enable_cpu_backup, True):
                yield

    @contextlib.contextmanager
    def cuda_graph(
        self,
        cuda_graph: Any,
        pool: Any = None,
        stream: Any = None,
        capture_error_mode: str = "global",
        tag: str = _TAG_DEFAULT,
        enable_cpu_backup: bool = False,
        cpu_backup_backend: Optional[str] = None,
    ) -> Iterator[None]:
        """``torch.cuda.graph`` whose memory is pauseable under ``tag``. Graphs of one tag share
        devmem's graph pool for that tag; a ``pool`` passed here is not used (memory from it
        could not be paused), which is logged."""
        self._check_backup_options(enable_cpu_backup, False, cpu_backup_backend)
        torch = _torch()
        name = self._remember(tag, enable_cpu_backup)
        if pool is not None:
            logger.info("devmem: cuda_graph(tag=%r) captures into devmem's pool for the tag, not the given pool", tag)
        if self.hook_mode == "preload":
            device, _ = _device_module(torch)
            pool = self._preload_pool(name, device)
            with expandable_segments_disabled(), _preload.control().switches(tag, enable_cpu_backup, True):
                with torch.cuda.graph(cuda_graph, pool=pool.id, stream=stream, capture_error_mode=capture_error_mode):
                    yield
            return
        with CuMemAllocator.get_instance().cudagraph_pool(name) as pool_id:
            with torch.cuda.graph(cuda_graph, pool=pool_id, stream=stream, capture_error_mode=capture_error_mode):
                yield

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Allocations in the body come from PyTorch's own allocator (a throwaway pool), not
        from devmem, even inside a region."""
        torch = _torch()
        device, _ = _device_module(torch)
        pool = device.MemPool()
        preload = _preload.loaded()
        switch = preload.switches(_TAG_DEFAULT, False, False) if preload is not None else contextlib.nullcontext()
        with device.use_mem_pool(pool), switch:
            yield

    # -- pause / resume --------------------------------------------------------------------

    def _targets(self, tag: Optional[str]) -> Tuple[List[str], List[str]]:
        """(devmem tags to offload, devmem tags to discard) for ``tag`` (every tag when None)."""
        if tag is not None:
            if not isinstance(tag, str):
                raise TypeError(f"tag must be str or None, not {type(tag).__name__}")
            check_user_tag(tag)
        with self._lock:
            known = set(self._tags)
        if self.hook_mode == "preload":
            # TMS_INIT_ENABLE=1 allocates outside any region under "default" (with or without
            # a backup); other devmem tags in the process are not this module's to pause.
            for backup in (False, True):
                if devmem_tag(_TAG_DEFAULT, backup) in api.tags():
                    known.add((_TAG_DEFAULT, backup))
        pairs = sorted(p for p in known if tag is None or p[0] == tag)
        keep = [devmem_tag(t, True) for t, backup in pairs if backup]
        drop = [devmem_tag(t, False) for t, backup in pairs if not backup]
        return keep, drop

    def pause(self, tag: Optional[str] = None) -> None:
        """Releases the device memory of ``tag``'s regions (every region when None), in one
        pass; PyTorch's cached memory is returned too, as by CuMemAllocator.sleep."""
        keep, drop = self._targets(tag)
        if not keep and not drop:
            return
        allocator = CuMemAllocator.get_instance()
        allocator._synchronize()
        allocator._empty_cache()
        with _alongside(allocator._collect) as entering:
            # Regions whose tensors are all freed have no allocation left: not a typo.
            api.sleep_tags(keep, drop, strict=None, _entering=entering)
        api.log_residual(what=f"pause({tag!r})")

    def resume(self, tag: Optional[str] = None) -> None:
        """Maps the memory of ``tag``'s regions (every region when None) again at the same
        addresses and restores backed-up bytes. With ``memory_margin_bytes`` set, refuses (with
        :class:`devmem.OutOfMemoryError`, nothing changed) when that much device memory would
        not stay free."""
        keep, drop = self._targets(tag)
        names = keep + drop
        if not names:
            return
        if self._margin:
            self._check_margin(names)
        api.wake_up(names, strict=None)

    def _check_margin(self, names: List[str]) -> None:
        need: Dict[int, int] = {}
        for a in api.allocations():
            if a.tag in names and a.state != _lib.State.MAPPED:
                need[a.device] = need.get(a.device, 0) + a.size
        for device, nbytes in need.items():
            free, _ = api.mem_get_info(device)
            if free < nbytes + self._margin:
                raise _lib.OutOfMemoryError(
                    _lib.Status.OUT_OF_MEMORY,
                    f"resume needs {nbytes} bytes on device {device} and memory_margin_bytes={self._margin} "
                    f"to stay free, but only {free} are free; nothing was resumed",
                )

    # -- backups ---------------------------------------------------------------------------

    def get_cpu_backup(self, x: Any, zero_copy: bool = False) -> Any:
        """The paused bytes of tensor ``x`` as a CPU tensor of the same dtype and shape, or None
        when ``x`` has no backup (not paused, or its region had no CPU backup). With
        ``zero_copy=True`` the result aliases devmem's host store and is valid only until the
        next resume or free of ``x``'s memory; when the bytes are split across host chunks a
        copy is returned instead (logged)."""
        torch = _torch()
        if not (x.is_cuda or getattr(x, "is_xpu", False)):
            raise ValueError(f"get_cpu_backup needs a device tensor, got one on {x.device}")
        if not x.is_contiguous():
            raise ValueError(f"get_cpu_backup needs a contiguous tensor (shape {tuple(x.shape)}, stride {x.stride()})")
        nbytes = x.numel() * x.element_size()
        if nbytes == 0:
            return torch.empty_like(x, device="cpu")
        ptr = x.data_ptr()
        if zero_copy:
            try:
                host = api.backup_pointer(ptr, nbytes)
            except _lib.UnsupportedError as err:
                logger.warning("devmem: get_cpu_backup(zero_copy=True) returns a copy: %s", err.message)
            else:
                if host is None:
                    return None
                raw = (ctypes.c_uint8 * nbytes).from_address(host)
                return torch.frombuffer(raw, dtype=torch.uint8).view(x.dtype).view(x.shape)
        out = torch.empty(nbytes, dtype=torch.uint8)
        if not api.copy_backup(ptr, nbytes, out.data_ptr()):
            return None
        return out.view(x.dtype).view(x.shape)


@contextlib.contextmanager
def configure_subprocess() -> Iterator[None]:
    """Context manager: child processes started in the body import this module as
    ``torch_memory_saver`` (the shim directory is put on ``PYTHONPATH``) and, as with
    torch_memory_saver, run with devmem's preload library first in ``LD_PRELOAD`` (existing
    entries kept), so they can use ``hook_mode="preload"`` and ``TMS_INIT_ENABLE``. Both
    variables are restored afterwards."""
    from .hooks import mode_preload

    with _pythonpath_with_shim():
        if _lib.preload_library_path() is None:
            logger.warning(
                "devmem: this install has no preload library (%s); children get the torch_memory_saver "
                "shim but not LD_PRELOAD, so hook_mode='preload' will fail there", _lib.PRELOAD_STEM,
            )
            yield
            return
        with mode_preload.configure_subprocess():
            yield


@contextlib.contextmanager
def _pythonpath_with_shim() -> Iterator[None]:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = SHIM_DIR + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def install() -> None:
    """Makes ``import torch_memory_saver`` in this process return this module."""
    module = sys.modules[__name__]
    existing = sys.modules.get("torch_memory_saver")
    shim = existing is not None and os.path.abspath(getattr(existing, "__file__", "") or "").startswith(SHIM_DIR)
    if existing is not None and existing is not module and not shim:
        raise RuntimeError(
            f"torch_memory_saver is already imported from {getattr(existing, '__file__', existing)!r}; "
            "call devmem.torch_memory_saver.install() before anything imports it"
        )
    # ``import torch_memory_saver.testing_utils`` then resolves through this package's path.
    sys.modules["torch_memory_saver"] = module


#: The process-wide instance, as ``from torch_memory_saver import torch_memory_saver``.
torch_memory_saver = TorchMemorySaver()

__all__ = ["TorchMemorySaver", "configure_subprocess", "devmem_tag", "install", "torch_memory_saver"]
