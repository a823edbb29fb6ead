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
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

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


def torch_backend(torch: Any) -> Optional[_lib.Backend]:
    """The devmem backend a PyTorch build needs: ``Backend.HIP`` for a ROCm build
    (``torch.version.hip`` set, where ``torch.cuda`` runs on HIP), None (automatic) otherwise."""
    return _lib.Backend.HIP if getattr(getattr(torch, "version", None), "hip", None) else None


def select_torch_backend(torch: Any) -> None:
    """Chooses the backend ``torch`` needs before devmem's first allocation (unless
    ``DEVMEM_BACKEND`` chooses): on a ROCm build, HIP even where a CUDA driver would load too.
    Raises :class:`InvalidStateError` when devmem already runs on another backend."""
    wanted = torch_backend(torch)
    if wanted is None or os.environ.get("DEVMEM_BACKEND", "").strip():
        return
    try:
        api.select_backend(wanted)
    except InvalidStateError as err:
        raise InvalidStateError(
            Status.INVALID_STATE,
            f"PyTorch is a ROCm build (torch.version.hip={torch.version.hip}), so devmem must use its hip "
            f"backend, but it is loaded already: {err}",
        ) from None


def blas_workspace_outside_pools(device: Any) -> None:
    """Makes sure the cuBLAS workspace of the calling thread's current stream exists, so that it
    is not created inside the pool about to be entered.

    PyTorch gives each (cuBLAS handle, stream) pair a workspace from its caching allocator at
    the first matrix product on that stream and keeps it for the life of the process. Created
    inside a devmem pool, it would live in memory of that pool's tag: pausing the tag (a trainer
    put to sleep while a rollout runs) leaves cuBLAS working in unmapped memory, and the next
    product fails with ``CUBLAS_STATUS_EXECUTION_FAILED`` (seen on the H200 with
    ``examples/rl_colocate.py``). Asking for the handle before the pool is entered creates the
    workspace in PyTorch's own memory. The first call creates the cuBLAS handle (once per
    thread and device); a failure is logged and ignored: it only leaves PyTorch's default."""
    get = getattr(device, "current_blas_handle", None)
    if get is None:
        return
    try:
        get()
    except Exception as err:  # no cuBLAS in this build or no device context yet
        logger.debug("devmem: could not create the cuBLAS workspace before entering a pool: %s", err)


#: Tags a selective wake may leave asleep; any wake restores every other tag (vLLM's rule).
DEFERRABLE_TAGS: Tuple[str, ...] = ("weights", "kv_cache")


@dataclass(frozen=True)
class AllocationData:
    """One entry of :attr:`CuMemAllocator.pointer_to_data`, shaped like vLLM's.

    ``handle`` is ``(device, size, ptr, physical handle)``; the physical handle is 0 while
    asleep, and devmem's id for the allocation's chunks where its chunk layer is on (CUDA and
    HIP by default: :func:`devmem.allocation_chunks` lists the driver handles). On the HIP backend it is vLLM's ROCm form, ``(device, size, ptr, [(chunk handle,
    chunk size), ...])`` (an empty list while asleep). ``cpu_backup_tensor`` is always None: devmem keeps backups in its own pinned host
    store (read them with :func:`devmem.torch_memory_saver.torch_memory_saver.get_cpu_backup`);
    ``is_offloaded`` says whether one exists.
    """

    handle: Tuple[int, int, int, Any]
    tag: str
    cpu_backup_tensor: None = None
    is_asleep: bool = False
    is_offloaded: bool = False

    @staticmethod
    def of(a: api.Allocation) -> "AllocationData":
        physical: Any = a.handle
        if api.backend() == _lib.Backend.HIP:
            physical = api.allocation_chunks(a.ptr) if a.state == _lib.State.MAPPED else []
        return AllocationData(
            handle=(a.device, a.size, a.ptr, physical),
            tag=a.tag,
            is_asleep=a.state != _lib.State.MAPPED,
            is_offloaded=a.state == _lib.State.OFFLOADED,
        )


class PointerToData(Mapping):
    """A read-only, live view of devmem's allocation table keyed by start address, in the
    shape of vLLM's ``CuMemAllocator.pointer_to_data``. Every read asks the library; nothing
    is cached, so the view never disagrees with it."""

    def __getitem__(self, ptr: int) -> AllocationData:
        if not isinstance(ptr, int) or isinstance(ptr, bool):
            raise KeyError(ptr)
        try:
            a = api.allocation_info(ptr)
        except _lib.UnknownPointerError:
            raise KeyError(ptr) from None
        if a.ptr != ptr:
            raise KeyError(ptr)
        return AllocationData.of(a)

    def __iter__(self) -> Iterator[int]:
        return iter([a.ptr for a in api.allocations()])

    def __len__(self) -> int:
        return api.stats().allocations.current

    def items(self) -> Any:  # one pass over the table instead of one lookup per key
        return [(a.ptr, AllocationData.of(a)) for a in api.allocations()]

    def values(self) -> Any:
        return [AllocationData.of(a) for a in api.allocations()]

    def __repr__(self) -> str:
        return f"PointerToData({dict(self.items())!r})"


class CuMemAllocator:
    """vLLM's ``CuMemAllocator`` (the ``MemAllocator`` protocol of vLLM 0.33), on devmem.

    * ``use_memory_pool(tag)``: PyTorch allocations in the body come from devmem with that tag.
      Each entry gets a fresh pool, as in vLLM; re-entering a tag releases (trims) the free
      cached segments of its older pools, and leaving a pool trims its own, because
      ``empty_cache`` does not release memory that live pools hold. A pool is trimmed only
      once no pool context (of any thread, at any nesting level) is still inside it, and
      ``current_tag`` is the calling thread's: entries may nest (weights -> kv -> weights) and
      several threads may each be inside their own pools.
    * ``cudagraph_pool()``: a context manager yielding the pool id to capture graphs into,
      with allocations tagged ``"cudagraph"``.
    * ``sleep(offload_tags)`` saves the listed tags and discards the rest; ``wake_up(tags)``
      restores ``tags`` and every tag outside :data:`DEFERRABLE_TAGS`; ``discard(tags)``.
      A named tag that no live allocation has warns (:class:`devmem.UnknownTagWarning`), or
      with ``strict=True`` raises :class:`devmem.InvalidArgumentError` before anything happens.
      Sleeping or discarding an allocation that is already asleep keeps its policy and logs a
      warning. Errors are :class:`devmem.DevmemError`, a ``RuntimeError``.
    * ``get_current_usage()`` and a read-only ``pointer_to_data`` view.
    """

    instance: Optional["CuMemAllocator"] = None
    default_tag: str = api.DEFAULT_TAG
    #: Generation ``sleep`` collects alongside its copies (2: a full collection).
    sleep_gc_generation: int = 1
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
        # The calling thread's pool tag (``current_tag``).
        self._local = threading.local()
        # Guards the pool tables below. Never held across a call into PyTorch (creating or
        # snapshotting a pool) or into the library: those may take long or re-enter.
        self._lock = threading.Lock()
        # tag -> [(MemPool, pluggable allocator wrapper)], oldest first
        self.allocator_and_pools: Dict[str, List[Tuple[Any, Any]]] = {}
        # id(MemPool) -> pool contexts (any thread, any nesting level) inside it now
        self._users: Dict[int, int] = {}
        # ids of the pools being trimmed now (one trim per pool at a time)
        self._trimming: Set[int] = set()
        # ids of the graph pools: allocated from again at every entry, never trimmed
        self._reused: Set[int] = set()
        # device -> graph MemPool, per tag
        self._graph_pools: Dict[Tuple[str, int], Any] = {}
        self._allocator: Any = None
        self._released = False
        self._pointer_to_data = PointerToData()

    @property
    def current_tag(self) -> str:
        """The tag of the calling thread's innermost pool context (``default_tag`` outside
        any). Per thread: another thread's pools do not change it."""
        return getattr(self._local, "tag", CuMemAllocator.default_tag)

    @current_tag.setter
    def current_tag(self, tag: str) -> None:
        self._local.tag = tag

    @property
    def pointer_to_data(self) -> PointerToData:
        """Read-only live view: start address -> :class:`AllocationData`."""
        return self._pointer_to_data

    # -- pools ---------------------------------------------------------------------------

    def _pluggable(self) -> Any:
        with self._lock:
            allocator = self._allocator
        if allocator is None:
            torch = _torch()
            select_torch_backend(torch)
            _, pluggable = _device_module(torch)
            made = pluggable(_lib.library_path(), "my_malloc", "my_free")
            with self._lock:
                if self._allocator is None:
                    self._allocator = made
                allocator = self._allocator
        return allocator

    def _check_open(self) -> None:
        if self._released:
            raise InvalidStateError(
                Status.INVALID_STATE,
                "release_pools() was called: this allocator's pools are gone; "
                "sleep/wake_up still work on existing allocations",
            )

    def _new_pool(self, device: Any) -> Tuple[Any, Any]:
        """A MemPool on the current device (a pool belongs to the device it is created on)."""
        allocator = self._pluggable()
        return device.MemPool(allocator.allocator()), allocator

    @contextlib.contextmanager
    def _tagged(self, tag: str) -> Iterator[None]:
        """Sets ``tag`` (this object's tag for the calling thread, and the thread's devmem tag)
        with expandable segments off; restores both and the allocator configuration afterwards,
        also on exceptions."""
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
        ``"default"``), from a pool created for this entry on the current device. Expandable
        segments are off for the body; the previous allocator configuration and tag are
        restored afterwards, also when the body raises."""
        if tag is None:
            tag = CuMemAllocator.default_tag
        encode_tag(tag)
        self._check_open()
        device, _ = _device_module(_torch())
        blas_workspace_outside_pools(device)
        # Older pools of this tag are never allocated from again once no context is inside
        # them; those still in use (an outer entry, another thread) are left alone.
        self._trim_claimed(self._claim_idle(tag))
        entry = self._new_pool(device)
        with self._lock:
            self._check_open()
            # Kept alive for the allocator's life (pytorch/pytorch#146431).
            self.allocator_and_pools.setdefault(tag, []).append(entry)
            self._users[id(entry[0])] = 1
        done = False
        try:
            with self._tagged(tag):
                with device.use_mem_pool(entry[0]):
                    yield
                done = True
        finally:
            idle = self._leave(entry[0], claim=done)
        if idle:
            self._trim_claimed([entry[0]])

    def _claim_idle(self, tag: str) -> List[Any]:
        """The pools of ``tag`` that no context is inside, nor being trimmed, nor reused;
        marked as being trimmed (release with :meth:`_trim_claimed`)."""
        with self._lock:
            idle = [
                pool for pool, _alloc in self.allocator_and_pools.get(tag, [])
                if not self._users.get(id(pool)) and id(pool) not in self._trimming and id(pool) not in self._reused
            ]
            self._trimming.update(id(pool) for pool in idle)
        return idle

    def _leave(self, pool: Any, claim: bool) -> bool:
        """One context left ``pool``; with ``claim``, marks it as being trimmed and returns True
        when that was the last context inside it."""
        with self._lock:
            key = id(pool)
            users = self._users.get(key, 0) - 1
            if users > 0:
                self._users[key] = users
                return False
            self._users.pop(key, None)
            if not claim or key in self._trimming or key in self._reused:
                return False
            self._trimming.add(key)
            return True

    def _trim_claimed(self, pools: List[Any]) -> None:
        """Trims pools claimed by :meth:`_claim_idle` or :meth:`_leave`, outside the lock."""
        try:
            for pool in pools:
                self._trim(pool)
        finally:
            with self._lock:
                self._trimming.difference_update(id(pool) for pool in pools)

    def _trim(self, pool: Any) -> int:
        """Releases the free cached segments of ``pool`` (one no longer allocated from) for
        good; their address ranges stay reserved until PyTorch frees the segments."""
        freed = 0
        snapshot = getattr(pool, "snapshot", None)
        if snapshot is None:  # pragma: no cover - PyTorch before MemPool.snapshot
            logger.warning("devmem: this PyTorch's MemPool has no snapshot(); free pool segments are not trimmed")
            return 0
        for segment in snapshot():
            if segment.get("allocated_size", 1) != 0:
                continue
            ptr = int(segment["address"])
            try:
                info = api.allocation_info(ptr)
            except _lib.UnknownPointerError:
                continue  # not devmem's, or trimmed already
            if info.ptr != ptr or info.state != _lib.State.MAPPED:
                continue  # asleep segments keep their policy, as in vLLM
            freed += api.trim(ptr)
        if freed:
            logger.debug("devmem: trimmed %d free bytes from a pool", freed)
        return freed

    @contextlib.contextmanager
    def cudagraph_pool(self, tag: str = "cudagraph") -> Iterator[Tuple[int, int]]:
        """Yields the id of the devmem pool (one per tag and device) to capture CUDA graphs
        into, with the thread's allocations tagged ``tag`` for the body, as vLLM's does::

            with allocator.cudagraph_pool() as pool:
                with torch.cuda.graph(g, pool=pool):
                    ...
        """
        encode_tag(tag)
        self._check_open()
        device, _ = _device_module(_torch())
        key = (tag, int(device.current_device()))
        with self._lock:
            pool = self._graph_pools.get(key)
        if pool is None:
            entry = self._new_pool(device)  # outside the lock: a PyTorch call
            with self._lock:
                self._check_open()
                pool = self._graph_pools.get(key)
                if pool is None:  # another thread may have made it meanwhile; theirs wins
                    self.allocator_and_pools.setdefault(tag, []).append(entry)
                    self._reused.add(id(entry[0]))
                    pool = self._graph_pools[key] = entry[0]
        with self._lock:
            self._users[id(pool)] = self._users.get(id(pool), 0) + 1
        try:
            with self._tagged(tag):
                yield pool.id
        finally:
            self._leave(pool, claim=False)

    @contextlib.contextmanager
    def capture_graph(self, graph: Any, tag: str = "cudagraph", **kwargs: Any) -> Iterator[None]:
        """``torch.cuda.graph(graph, pool=<devmem pool for tag>, **kwargs)`` with the tag set, so
        the graph's memory comes from devmem and sleeps with ``tag``."""
        torch = _torch()
        with self.cudagraph_pool(tag) as pool_id, torch.cuda.graph(graph, pool=pool_id, **kwargs):
            yield

    # -- sleep mode ----------------------------------------------------------------------

    def sleep(
        self, offload_tags: Union[None, str, Tuple[str, ...], List[str]] = None, *, strict: Optional[bool] = False
    ) -> None:
        """Releases all device memory devmem holds; tags in ``offload_tags`` (default
        ``("default",)``) are saved to host memory first, the rest are discarded. A named tag
        that no live allocation has warns (:class:`devmem.UnknownTagWarning`), or with
        ``strict=True`` raises :class:`devmem.InvalidArgumentError` before anything happens;
        ``strict=None`` skips the check.

        PyTorch's cached device memory is returned first (``empty_cache``, as vLLM's sleep
        does; cheap, the device is idle by then), and a young-generation ``gc.collect`` runs on a
        helper thread while the library copies with the GIL released. A full collection
        (``sleep_gc_generation = 2``; vLLM's choice) takes 60-80 ms in a PyTorch process and, run
        alongside the copies, outlasts a 4 GiB sleep; devmem's own memory never needs it, because
        sleep releases whole pool segments whatever tensors still reference them."""
        if offload_tags is None:
            offload_tags = (CuMemAllocator.default_tag,)
            strict = None  # not named by the caller
        tags = _lib.normalize_tags(offload_tags, "offload_tags")
        api.check_tags("CuMemAllocator.sleep", {"offload_tags": tags}, strict)
        # Level Zero has no device-wide synchronise; PyTorch's does it for every stream.
        self._synchronize()
        self._empty_cache()
        with _alongside(self._collect) as entering:
            api.sleep(tags, strict=None, _entering=entering)
        self._warn_policy_conflicts(offload=tags)

    def discard(self, tags: Union[str, Tuple[str, ...], List[str]], *, strict: Optional[bool] = False) -> None:
        """Releases the mapped memory of ``tags`` without saving it. Allocations of ``tags``
        already asleep with a host backup keep it (a warning says so). An unknown tag warns,
        or raises with ``strict=True`` (see :meth:`sleep`)."""
        names = _lib.normalize_tags(tags)
        api.check_tags("CuMemAllocator.discard", {"tags": names}, strict)
        conflicts = [t for t in names if api.stats(t).offloaded_bytes.current]
        self._synchronize()
        api.discard(names, strict=None)
        if conflicts:
            logger.warning(
                "devmem: discard cannot change the policy of already-asleep allocations of %s; "
                "their host backups were kept", conflicts,
            )

    def wake_up(
        self, tags: Optional[Union[str, List[str], Tuple[str, ...]]] = None, *, strict: Optional[bool] = False
    ) -> None:
        """Maps sleeping memory again and restores offloaded bytes: every tag when ``tags`` is
        None, else ``tags`` plus every tag outside :data:`DEFERRABLE_TAGS` (vLLM's rule: only
        weights and KV cache may stay asleep). When the device is full, PyTorch's cached memory
        is returned and the wake retried once; a wake that still fails keeps every backup. A
        named tag that no live allocation has warns, or raises with ``strict=True`` (see
        :meth:`sleep`)."""
        if tags is not None:
            api.check_tags("CuMemAllocator.wake_up", {"tags": _lib.normalize_tags(tags)}, strict)
        wake = self._wake_call(tags)
        try:
            wake()
        except _lib.OutOfMemoryError:
            logger.info("devmem: wake found the device full; returning PyTorch's cached memory and retrying")
            self._collect_and_empty_cache()
            wake()

    @staticmethod
    def _wake_call(tags: Any) -> Callable[[], Any]:
        if tags is None:
            return lambda: api.wake_up(None)
        names = _lib.normalize_tags(tags)
        deferred = [t for t in DEFERRABLE_TAGS if t not in names]
        return lambda: api.wake_up_except(deferred, strict=None)

    def get_current_usage(self) -> int:
        """Bytes of all live devmem allocations, awake or asleep."""
        return api.stats().bytes.current

    def _warn_policy_conflicts(self, offload: List[str]) -> None:
        wanted = set(offload)
        conflicts = []
        # Every tag this package set, pools' included (they go through api.set_current_tag).
        for tag in sorted(api.seen_tags | wanted):
            s = api.stats(tag)
            if (tag in wanted and s.discarded_bytes.current) or (tag not in wanted and s.offloaded_bytes.current):
                conflicts.append(tag)
        if conflicts:
            logger.warning(
                "devmem: sleep cannot change the policy of already-asleep allocations of %s; "
                "the existing policy was kept", conflicts,
            )

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

    @staticmethod
    def _collect() -> None:
        gc.collect(CuMemAllocator.sleep_gc_generation)

    @staticmethod
    def _empty_cache() -> None:
        try:
            torch = _torch()
        except ImportError:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    @staticmethod
    def _collect_and_empty_cache() -> None:
        gc.collect()
        CuMemAllocator._empty_cache()

    # -- shutdown ------------------------------------------------------------------------

    def release_pools(self) -> None:
        """Drops the MemPools, then the allocator wrappers, in that order, before interpreter
        finalisation (a MemPool's teardown may still call into its allocator). Afterwards
        ``use_memory_pool`` raises :class:`InvalidStateError`; sleep and wake still work."""
        with self._lock:
            self._released = True
            if not self.allocator_and_pools and self._allocator is None:
                return
            entries = [e for es in self.allocator_and_pools.values() for e in es]
            self.allocator_and_pools.clear()
            self._graph_pools.clear()
            self._users.clear()
            self._reused.clear()
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

    def close(self) -> None:
        """Alias of :meth:`release_pools` (vLLM's name)."""
        self.release_pools()


@contextlib.contextmanager
def _alongside(work: Callable[[], None]) -> Iterator[threading.Event]:
    """Runs ``work`` on a helper thread while the body's native call runs. The body sets the
    yielded event right before that call: ``work`` (``gc.collect`` holds the GIL for tens of
    milliseconds) starts only then, so it cannot delay the call's start and finishes while the
    library copies with the GIL released. Errors of ``work`` are logged, never raised (it is
    housekeeping); the body's own exception wins."""
    errors: List[BaseException] = []
    entering = threading.Event()

    def target() -> None:
        entering.wait()
        try:
            work()
        except BaseException as err:  # pragma: no cover - logged below
            errors.append(err)

    helper = threading.Thread(target=target, name="devmem-housekeeping", daemon=True)
    try:
        helper.start()
    except RuntimeError:  # the OS refused a thread: do the work inline afterwards
        helper = None
    try:
        yield entering
    finally:
        entering.set()  # the body failed before its native call: let the helper finish
        if helper is None:
            target()
        else:
            helper.join()
        for err in errors:
            logger.warning("devmem: gc/empty_cache alongside sleep failed: %r", err)


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
        api.offload(keep, strict=None)
    if drop:
        api.discard(drop, strict=None)


def resume(tag: Optional[str] = None) -> None:
    """Brings back ``tag`` (every tag when None) at the same addresses."""
    api.wake_up(None if tag is None else [tag], strict=None)
