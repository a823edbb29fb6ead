"""PyTorch integration: a drop-in for vLLM's ``CuMemAllocator`` and torch_memory_saver-style
regions, on devmem's pluggable allocator.

The allocation table lives in the library: no Python callback runs per allocation. PyTorch
calls ``my_malloc``/``my_free`` directly; the tag of each allocation is the allocating thread's
devmem tag, which the pool contexts here set.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import threading
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from . import _lib, api
from ._lib import InvalidStateError, Status, encode_tag
from ._torch_conf import expandable_segments_disabled

logger = logging.getLogger("devmem")


def _torch() -> Any:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - exercised where torch is absent
        raise ImportError("devmem's PyTorch integration needs torch; the devmem module functions work without it") from err
    return torch


def _device_module(torch: Any) -> Tuple[Any, Any]:
    """(torch.cuda or torch.xpu, its pluggable-allocator class)."""
    if torch.cuda.is_available():
        return torch.cuda, torch.cuda.memory.CUDAPluggableAllocator
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available() and hasattr(xpu.memory, "XPUPluggableAllocator"):
        return xpu, xpu.memory.XPUPluggableAllocator
    raise RuntimeError("no CUDA or XPU device is available to PyTorch")


class CuMemAllocator:
    """vLLM's ``CuMemAllocator``, on devmem: same method names and semantics.

    ``use_memory_pool(tag)`` routes PyTorch allocations made in its body to devmem with that
    tag; ``sleep(offload_tags)`` saves the listed tags to host memory and discards the rest;
    ``wake_up(tags)`` brings them back at the same addresses.
    """

    instance: Optional["CuMemAllocator"] = None
    default_tag: str = api.DEFAULT_TAG
    _instance_lock = threading.Lock()

    @staticmethod
    def get_instance() -> "CuMemAllocator":
        """The process-wide allocator (created on first use)."""
        with CuMemAllocator._instance_lock:
            if CuMemAllocator.instance is None:
                CuMemAllocator.instance = CuMemAllocator()
                # Pools and allocator wrappers must go before interpreter finalisation tears
                # down the device runtime.
                atexit.register(CuMemAllocator._shutdown_singleton)
            return CuMemAllocator.instance

    @staticmethod
    def _shutdown_singleton() -> None:
        instance = CuMemAllocator.instance
        if instance is None:
            return
        try:
            instance.release_pools()
        except Exception:  # pragma: no cover - logged, never raised at exit
            logger.exception("devmem: releasing pools at exit failed")

    def __init__(self) -> None:
        _lib.load()
        self.current_tag: str = CuMemAllocator.default_tag
        # tag -> (MemPool, pluggable allocator wrapper)
        self.allocator_and_pools: Dict[str, Tuple[Any, Any]] = {}
        self._allocator: Any = None
        self._released = False

    # -- pools ---------------------------------------------------------------------------

    def _pluggable(self) -> Any:
        if self._allocator is None:
            _, pluggable = _device_module(_torch())
            self._allocator = pluggable(_lib.library_path(), "my_malloc", "my_free")
        return self._allocator

    def _pool(self, tag: str) -> Any:
        if self._released:
            raise InvalidStateError(
                Status.INVALID_STATE,
                "release_pools() was called: this allocator's pools are gone; "
                "sleep/wake_up still work on existing allocations",
            )
        entry = self.allocator_and_pools.get(tag)
        if entry is None:
            device, _ = _device_module(_torch())
            allocator = self._pluggable()
            entry = (device.MemPool(allocator.allocator()), allocator)
            self.allocator_and_pools[tag] = entry
        return entry[0]

    @contextlib.contextmanager
    def _tagged(self, tag: str) -> Iterator[None]:
        """Sets ``tag`` (this object's and the thread's devmem tag) with expandable segments
        off; restores both and the allocator configuration afterwards, also on exceptions."""
        old_tag = self.current_tag
        old_thread_tag = api.current_tag()
        with expandable_segments_disabled():
            self.current_tag = tag
            api.set_current_tag(tag)
            try:
                yield
            finally:
                self.current_tag = old_tag
                api.set_current_tag(old_thread_tag)

    @contextlib.contextmanager
    def use_memory_pool(self, tag: Optional[str] = None) -> Iterator[None]:
        """PyTorch allocations in the body come from devmem, tagged ``tag`` (default
        ``"default"``). Expandable segments are off for the body; the previous allocator
        configuration and tag are restored afterwards, also when the body raises."""
        if tag is None:
            tag = CuMemAllocator.default_tag
        encode_tag(tag)
        device, _ = _device_module(_torch())
        pool = self._pool(tag)
        with self._tagged(tag), device.use_mem_pool(pool):
            yield

    def cudagraph_pool(self, tag: str = "cudagraph") -> Any:
        """The devmem ``MemPool`` for graph capture under ``tag``. Pass its ``id`` as
        ``torch.cuda.graph(g, pool=...)`` with the thread's devmem tag set to ``tag``, or use
        :meth:`capture_graph`, which does both, so graph memory is tagged and sleeps too."""
        encode_tag(tag)
        return self._pool(tag)

    @contextlib.contextmanager
    def capture_graph(self, graph: Any, tag: str = "cudagraph", **kwargs: Any) -> Iterator[None]:
        """``torch.cuda.graph(graph, pool=<devmem pool for tag>, **kwargs)`` with the tag set, so
        the graph's memory comes from devmem and sleeps with ``tag``."""
        torch = _torch()
        pool = self.cudagraph_pool(tag)
        with self._tagged(tag), torch.cuda.graph(graph, pool=pool.id, **kwargs):
            yield

    # -- sleep mode ----------------------------------------------------------------------

    def sleep(self, offload_tags: Union[None, str, Tuple[str, ...], list] = None) -> None:
        """Releases all device memory devmem holds; tags in ``offload_tags`` (default
        ``("default",)``) are saved to host memory first, the rest are discarded."""
        if offload_tags is None:
            offload_tags = (CuMemAllocator.default_tag,)
        elif isinstance(offload_tags, str):
            offload_tags = (offload_tags,)
        # Level Zero has no device-wide synchronise; PyTorch's does it for every stream.
        self._synchronize()
        api.sleep(offload_tags)
        gc.collect()
        self._empty_cache()

    def wake_up(self, tags: Optional[Union[str, list, tuple]] = None) -> None:
        """Maps the memory of ``tags`` (all when None) again and restores offloaded bytes."""
        api.wake_up(tags)

    def discard(self, tags: Union[str, list, tuple]) -> None:
        """Releases the memory of ``tags`` without saving it."""
        api.discard(tags)

    def get_current_usage(self) -> int:
        """Bytes of all live devmem allocations, awake or asleep."""
        return api.stats().bytes.current

    def _synchronize(self) -> None:
        try:
            torch = _torch()
        except ImportError:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available() and getattr(xpu, "is_initialized", lambda: True)():
            xpu.synchronize()

    def _empty_cache(self) -> None:
        try:
            torch = _torch()
        except ImportError:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # -- shutdown ------------------------------------------------------------------------

    def release_pools(self) -> None:
        """Drops the MemPools, then the allocator wrappers, in that order, before interpreter
        finalisation (a MemPool's teardown may still call into its allocator). Afterwards
        ``use_memory_pool`` raises :class:`InvalidStateError`; sleep and wake still work."""
        self._released = True
        if not self.allocator_and_pools and self._allocator is None:
            return
        entries = list(self.allocator_and_pools.values())
        self.allocator_and_pools.clear()
        pools = [e[0] for e in entries]
        allocators = [e[1] for e in entries]
        if self._allocator is not None:
            allocators.append(self._allocator)
            self._allocator = None
        entries.clear()
        try:
            torch = _torch()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        except Exception:  # pragma: no cover - best effort at shutdown
            logger.debug("devmem: synchronize failed during release_pools")
        pools.clear()  # phase 1: pools go while their allocators are alive
        gc.collect()
        allocators.clear()  # phase 2: now the allocator wrappers


# --------------------------------------------------------------------------------------------
# torch_memory_saver-style regions
# --------------------------------------------------------------------------------------------

_policies: Dict[str, bool] = {}
_policies_lock = threading.Lock()


def _torch_device_available() -> bool:
    try:
        torch = _torch()
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@contextlib.contextmanager
def region(tag: str = api.DEFAULT_TAG, enable_cpu_backup: bool = True) -> Iterator[None]:
    """Allocations in the body carry ``tag``; :func:`pause` later offloads them
    (``enable_cpu_backup=True``) or discards them (False). With PyTorch on a GPU the body's
    tensors come from devmem's pool; without, the tag applies to :func:`devmem.malloc`."""
    encode_tag(tag)
    if not isinstance(enable_cpu_backup, bool):
        raise TypeError("enable_cpu_backup must be bool")
    with _policies_lock:
        _policies[tag] = enable_cpu_backup
    if _torch_device_available():
        with CuMemAllocator.get_instance().use_memory_pool(tag):
            yield
    else:
        with api.use_tag(tag):
            yield


def pause(tag: Optional[str] = None) -> None:
    """Releases the device memory of ``tag`` (every tag when None), saving or discarding each
    tag as its region asked; tags that never had a region are saved (nothing is lost)."""
    if tag is not None:
        encode_tag(tag)
        targets = [tag]
    else:
        targets = sorted({a.tag for a in api.allocations()})
    with _policies_lock:
        keep = [t for t in targets if _policies.get(t, True)]
        drop = [t for t in targets if not _policies.get(t, True)]
    if keep:
        api.offload(keep)
    if drop:
        api.discard(drop)


def resume(tag: Optional[str] = None) -> None:
    """Brings back ``tag`` (every tag when None) at the same addresses."""
    api.wake_up(None if tag is None else [tag])
