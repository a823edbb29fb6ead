"""The library's operations as Python functions: tags, allocation, sleep, offload, discard,
wake, statistics and lookups. Only the standard library is needed."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from . import _lib
from ._lib import AllocationInfo, State, Stats, Transfer, call, encode_tag, normalize_tags, tag_array

logger = logging.getLogger("devmem")

#: The tag of threads that never set one.
DEFAULT_TAG = "default"

TagsArg = Union[str, Iterable[str]]


@dataclass(frozen=True)
class Counter:
    """Current value, highest value and sum of increases."""

    current: int
    peak: int
    total: int


@dataclass(frozen=True)
class TagStats:
    """Statistics for one tag or for all of them (``devmem_stats``)."""

    allocations: Counter
    bytes: Counter
    mapped_bytes: Counter
    offloaded_bytes: Counter
    discarded_bytes: Counter
    host_store_bytes: int = 0
    unknown_frees: int = 0
    #: Bytes of live allocations whose GPU memory the keeper also holds (:func:`keep`,
    #: :func:`attach`); they count in the mapped/offloaded/discarded bytes as well.
    bytes_kept: int = 0


@dataclass(frozen=True)
class TransferResult:
    """What one sleep, offload, discard or wake did (``devmem_transfer``)."""

    allocations: int
    bytes_freed: int
    bytes_saved: int
    bytes_discarded: int
    bytes_mapped: int
    bytes_restored: int
    seconds: float
    #: Bytes of read-only tags put to sleep without a copy (their host copy was still valid).
    bytes_skipped: int = 0
    #: Read-only allocations whose device checksum no longer matched, copied again.
    verify_mismatches: int = 0


@dataclass(frozen=True)
class Allocation:
    """One live allocation."""

    ptr: int
    size: int
    requested_size: int
    device: int
    state: State
    handle: int
    tag: str = field(default=DEFAULT_TAG)


def _counter(c: Any) -> Counter:
    return Counter(int(c.current), int(c.peak), int(c.total))


def _allocation(info: AllocationInfo) -> Allocation:
    return Allocation(
        ptr=int(info.ptr),
        size=int(info.size),
        requested_size=int(info.requested_size),
        device=int(info.device),
        state=State(info.state),
        handle=int(info.handle),
        tag=info.tag.decode("utf-8", "replace"),
    )


def version() -> str:
    """The library's version."""
    return _lib.load().devmem_version().decode()


#: Every tag set through this package (the candidates for per-tag checks that must not walk
#: the whole allocation table on a hot path).
seen_tags: "set[str]" = {DEFAULT_TAG}


def set_current_tag(tag: str) -> None:
    """Sets the calling thread's tag for later allocations. The tag is per thread (the library
    keeps it in thread-local storage): it applies to allocations made by this thread only, and
    a new thread starts with ``"default"``. Set it in the thread that allocates."""
    call("devmem_set_current_tag", encode_tag(tag))
    seen_tags.add(tag)


def current_tag() -> str:
    """The calling thread's tag (``"default"`` until one is set)."""
    buf = ctypes.create_string_buffer(_lib.TAG_BUFFER_LEN)
    call("devmem_get_current_tag", buf, len(buf))
    return buf.value.decode("utf-8")


class _TagScope:
    """What :func:`use_tag` returns: a context manager that warns when it is dropped without
    ever being entered (``devmem.use_tag("w")`` on its own line sets nothing)."""

    def __init__(self, tag: str, where: str) -> None:
        encode_tag(tag)
        self.tag = tag
        self._where = where
        self._entered = False
        self._previous: List[str] = []

    def __enter__(self) -> None:
        self._entered = True
        self._previous.append(current_tag())
        set_current_tag(self.tag)

    def __exit__(self, *exc: Any) -> None:
        set_current_tag(self._previous.pop())

    def __repr__(self) -> str:
        return f"devmem.use_tag({self.tag!r})"

    def __del__(self) -> None:
        if getattr(self, "_entered", True):
            return
        warnings.warn(
            f"devmem.use_tag({self.tag!r}) (at {self._where}) was never entered, so it set no tag: "
            f"write 'with devmem.use_tag({self.tag!r}):' around the allocations, or call "
            f"devmem.set_current_tag({self.tag!r}) in the thread that allocates",
            UserWarning,
            stacklevel=2,
        )


def use_tag(tag: str) -> "contextlib.AbstractContextManager[None]":
    """Context manager: sets the calling thread's tag for the body and restores the previous
    one afterwards, also when the body raises::

        with devmem.use_tag("weights"):
            ptr = devmem.malloc(size)

    Only a ``with`` statement sets the tag: the object on its own does nothing, and one that is
    never entered warns (``UserWarning``) when it is collected. The tag is per thread (the
    library keeps it in thread-local storage): allocations made by other threads, including
    threads started in the body, keep their own tag (``"default"`` unless they set one), so
    enter ``use_tag`` in the thread that allocates."""
    caller = sys._getframe(1)
    return _TagScope(tag, f"{caller.f_code.co_filename}:{caller.f_lineno}")


def _outside_package_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn`, called from the caller of this function,
    that points at the first frame outside the devmem package (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(2)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
        level += 1
    return level


def check_tags(what: str, named: Dict[str, List[str]], strict: Optional[bool]) -> None:
    """Checks that every tag in ``named`` (argument name -> tags) has a live allocation, in any
    state. An unknown tag (a typo matches nothing) is an :class:`UnknownTagWarning` naming it
    and the tags that exist, or with ``strict=True`` an :class:`InvalidArgumentError` raised
    before anything happens; ``strict=None`` skips the check (for callers that name tags which
    may legitimately have no allocation)."""
    if strict is None:
        return
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be bool or None, not {type(strict).__name__}")
    unknown = {arg: [t for t in dict.fromkeys(tags) if stats(t).allocations.current == 0] for arg, tags in named.items()}
    unknown = {arg: tags for arg, tags in unknown.items() if tags}
    if not unknown:
        return
    existing = sorted({a.tag for a in allocations()})
    names = "; ".join(f"{arg} {tags}" for arg, tags in unknown.items())
    message = (
        f"{what}: no live allocation has the tag(s) named in {names}, so they match nothing; "
        f"the tags that exist are {existing}"
    )
    if strict:
        raise _lib.InvalidArgumentError(_lib.Status.INVALID_ARGUMENT, message + "; nothing was done")
    warnings.warn(message + " (strict=True makes this an error)", _lib.UnknownTagWarning,
                  stacklevel=_outside_package_stacklevel() + 1)


def _c_device(device: int) -> int:
    """``device`` checked against the C ``int`` it is passed as (ctypes would wrap it)."""
    if not isinstance(device, int) or isinstance(device, bool):
        raise TypeError(f"device must be int, not {type(device).__name__}")
    if not -(1 << 31) <= device < 1 << 31:
        raise _lib.InvalidDeviceError(_lib.Status.INVALID_DEVICE, f"device {device} does not fit in a C int")
    return device


def malloc(size: int, device: int = 0) -> int:
    """Allocates ``size`` bytes on ``device`` under the thread's tag; returns the address."""
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"size must be int, not {type(size).__name__}")
    device = _c_device(device)
    if size < 0:
        raise _lib.InvalidArgumentError(_lib.Status.INVALID_ARGUMENT, f"size {size} is negative")
    if size >= 1 << 64:
        raise _lib.InvalidArgumentError(_lib.Status.INVALID_ARGUMENT, f"size {size} does not fit in 64 bits")
    out = ctypes.c_void_p()
    call("devmem_malloc", size, device, ctypes.byref(out))
    return int(out.value or 0)


def free(ptr: int) -> None:
    """Frees an allocation in any state."""
    if not isinstance(ptr, int) or isinstance(ptr, bool):
        raise TypeError(f"ptr must be int, not {type(ptr).__name__}")
    call("devmem_free", ctypes.c_void_p(ptr))


def last_transfer() -> TransferResult:
    """What the last sleep, offload, discard or wake did."""
    t = Transfer()
    call("devmem_get_last_transfer", ctypes.byref(t))
    return TransferResult(
        int(t.allocations), int(t.bytes_freed), int(t.bytes_saved), int(t.bytes_discarded),
        int(t.bytes_mapped), int(t.bytes_restored), float(t.seconds),
        int(t.bytes_skipped), int(t.verify_mismatches),
    )


def sleep(offload_tags: TagsArg = (), *args: Any, strict: Optional[bool] = False, _entering: Any = None) -> TransferResult:
    """Releases the device memory of every mapped allocation; those whose tag is in
    ``offload_tags`` are saved to host memory first, the rest are discarded (vLLM's meaning).

    A tag in ``offload_tags`` that no live allocation has is a :class:`UnknownTagWarning`
    (its bytes would be discarded by a typo), or with ``strict=True`` an
    :class:`InvalidArgumentError` before anything happens. To save some tags, discard others
    and leave the rest mapped, use :func:`sleep_tags`."""
    if args:
        raise TypeError(
            f"devmem.sleep() takes the tags to offload and nothing else positionally ({len(args) + 1} "
            "positional arguments were given); every tag not named is discarded. To offload some tags and "
            "discard others in one call, use devmem.sleep_tags(offload=..., discard=...)"
        )
    tags = normalize_tags(offload_tags, "offload_tags")
    check_tags("devmem.sleep", {"offload_tags": tags}, strict)
    array, n = tag_array(tags)
    call("devmem_sleep", array, n, entering=_entering)
    result = last_transfer()
    logger.info(
        "devmem: sleep freed %.2f GiB (%.2f GiB saved to host, %.2f GiB discarded) in %.3f s",
        result.bytes_freed / 2**30, result.bytes_saved / 2**30, result.bytes_discarded / 2**30, result.seconds,
    )
    return result


def offload(tags: TagsArg, *, strict: Optional[bool] = False) -> TransferResult:
    """Saves to host memory and releases the mapped allocations of ``tags`` only. An unknown
    tag warns, or raises with ``strict=True`` (see :func:`sleep`)."""
    names = normalize_tags(tags)
    check_tags("devmem.offload", {"tags": names}, strict)
    array, n = tag_array(names)
    call("devmem_offload", array, n)
    return last_transfer()


def sleep_tags(
    offload: TagsArg, discard: TagsArg, *, strict: Optional[bool] = False, _entering: Any = None
) -> TransferResult:
    """In one pass: saves and releases the mapped allocations of ``offload``, releases those of
    ``discard`` without saving them, and leaves every other tag mapped. An unknown tag warns,
    or raises with ``strict=True`` (see :func:`sleep`)."""
    keep_names = normalize_tags(offload, "offload")
    drop_names = normalize_tags(discard, "discard")
    check_tags("devmem.sleep_tags", {"offload": keep_names, "discard": drop_names}, strict)
    keep, n_keep = tag_array(keep_names)
    drop, n_drop = tag_array(drop_names)
    call("devmem_sleep_tags", keep, n_keep, drop, n_drop, entering=_entering)
    return last_transfer()


def discard(tags: TagsArg, *, strict: Optional[bool] = False) -> TransferResult:
    """Releases the mapped allocations of ``tags`` only, dropping their contents. An unknown
    tag warns, or raises with ``strict=True`` (see :func:`sleep`)."""
    names = normalize_tags(tags)
    check_tags("devmem.discard", {"tags": names}, strict)
    array, n = tag_array(names)
    call("devmem_discard", array, n)
    return last_transfer()


def wake_up(tags: Optional[TagsArg] = None, *, strict: Optional[bool] = False) -> TransferResult:
    """Maps the sleeping allocations of ``tags`` (all when None) at their addresses and restores
    saved bytes. Raises :class:`OutOfMemoryError` with every backup kept when the device is full.
    A named tag that no live allocation has warns (it wakes nothing), or raises with
    ``strict=True`` (see :func:`sleep`)."""
    if tags is None:
        call("devmem_wake_up", None, 0)
    else:
        names = normalize_tags(tags)
        check_tags("devmem.wake_up", {"tags": names}, strict)
        array, n = tag_array(names)
        call("devmem_wake_up", array, n)
    return _logged_wake()


def _logged_wake() -> TransferResult:
    result = last_transfer()
    logger.info(
        "devmem: wake mapped %.2f GiB, restored %.2f GiB in %.3f s",
        result.bytes_mapped / 2**30, result.bytes_restored / 2**30, result.seconds,
    )
    return result


def wake_up_except(deferred: TagsArg, *, strict: Optional[bool] = False) -> TransferResult:
    """Wakes every sleeping allocation whose tag is not in ``deferred`` (everything when it is
    empty); vLLM's rule that only the deferrable tags may stay asleep after a wake. An unknown
    tag in ``deferred`` warns, or raises with ``strict=True`` (see :func:`sleep`)."""
    names = normalize_tags(deferred, "deferred")
    check_tags("devmem.wake_up_except", {"deferred": names}, strict)
    array, n = tag_array(names)
    call("devmem_wake_up_except", array, n)
    return _logged_wake()


def trim(ptr: int) -> int:
    """Gives the device memory of the allocation starting at ``ptr`` back for good, keeping
    its address range reserved until :func:`free`; for a caching allocator's free segment that
    will never be handed out again. Returns the device bytes released."""
    if not isinstance(ptr, int) or isinstance(ptr, bool):
        raise TypeError(f"ptr must be int, not {type(ptr).__name__}")
    out = ctypes.c_size_t()
    call("devmem_trim", ctypes.c_void_p(ptr), ctypes.byref(out))
    return int(out.value)


def _check_range(ptr: Any, nbytes: Any) -> None:
    for name, value in (("ptr", ptr), ("nbytes", nbytes)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if nbytes <= 0 or nbytes >= 1 << 64:
        raise _lib.InvalidArgumentError(_lib.Status.INVALID_ARGUMENT, f"nbytes {nbytes} is out of range")


def backup_pointer(ptr: int, nbytes: int) -> Optional[int]:
    """The host address holding the saved bytes ``[ptr, ptr+nbytes)`` of an offloaded
    allocation, or None when it is not offloaded. Valid until the allocation is woken or
    freed. Raises :class:`UnsupportedError` when the range spans several host chunks."""
    _check_range(ptr, nbytes)
    out = ctypes.c_void_p()
    call("devmem_backup_pointer", ctypes.c_void_p(ptr), nbytes, ctypes.byref(out))
    return out.value or None


def copy_backup(ptr: int, nbytes: int, dst: int) -> bool:
    """Copies the saved bytes ``[ptr, ptr+nbytes)`` of an offloaded allocation to host
    address ``dst``; False (nothing written) when the allocation is not offloaded."""
    _check_range(ptr, nbytes)
    if not isinstance(dst, int) or isinstance(dst, bool):
        raise TypeError(f"dst must be int, not {type(dst).__name__}")
    copied = ctypes.c_int()
    call("devmem_copy_backup", ctypes.c_void_p(ptr), nbytes, ctypes.c_void_p(dst), ctypes.byref(copied))
    return bool(copied.value)


def stats(tag: Optional[str] = None) -> TagStats:
    """Statistics for ``tag``, or for every tag together when None."""
    s = Stats()
    call("devmem_get_stats", None if tag is None else encode_tag(tag), ctypes.byref(s))
    return TagStats(
        _counter(s.allocations), _counter(s.bytes), _counter(s.mapped_bytes),
        _counter(s.offloaded_bytes), _counter(s.discarded_bytes),
        int(s.host_store_bytes), int(s.unknown_frees), int(s.bytes_kept),
    )


def mem_get_info(device: int = 0) -> Tuple[int, int]:
    """(free, total) device memory in bytes, as the driver reports them."""
    free_b, total = ctypes.c_size_t(), ctypes.c_size_t()
    call("devmem_mem_get_info", _c_device(device), ctypes.byref(free_b), ctypes.byref(total))
    return int(free_b.value), int(total.value)


def granularity(device: int = 0) -> int:
    """The allocation granularity of ``device``."""
    out = ctypes.c_size_t()
    call("devmem_granularity", _c_device(device), ctypes.byref(out))
    return int(out.value)


def device_count() -> int:
    """Number of devices the driver reports."""
    out = ctypes.c_int()
    call("devmem_device_count", ctypes.byref(out))
    return int(out.value)


def allocation_info(ptr: int) -> Allocation:
    """The live allocation containing ``ptr``."""
    info = AllocationInfo()
    call("devmem_get_allocation_info", ctypes.c_void_p(ptr), ctypes.byref(info))
    return _allocation(info)


def allocation_chunks(ptr: int) -> List[Tuple[int, int]]:
    """The physical memory mapped for the allocation containing ``ptr``: ``(driver handle,
    size)`` of each chunk, in address order — vLLM's ROCm handle form. One chunk unless the
    backend chunks physical memory (HIP by default, ``DEVMEM_CHUNK_SIZE``; allocations of
    1 GiB or more on CUDA and HIP, ``DEVMEM_WAKE_CHUNK_MB``); empty while the
    allocation is asleep."""
    count = ctypes.c_size_t(0)
    while True:
        n = count.value
        handles = (ctypes.c_ulonglong * max(n, 1))()
        sizes = (ctypes.c_size_t * max(n, 1))()
        fn = _lib.load().devmem_get_allocation_chunks
        status = fn(ctypes.c_void_p(ptr), handles, sizes, n, ctypes.byref(count))
        if status == _lib.Status.BUFFER_TOO_SMALL and count.value > n:
            continue  # the count is written: ask again with room for it
        if status != _lib.Status.SUCCESS:
            raise _lib.error_for(status, _lib.last_message())
        return [(int(handles[i]), int(sizes[i])) for i in range(count.value)]


def allocations() -> List[Allocation]:
    """Every live allocation, in address order."""
    seen: List[Allocation] = []

    @_lib.ALLOCATION_CALLBACK
    def visit(info: Any, _user: Any) -> None:
        seen.append(_allocation(info.contents))

    call("devmem_for_each_allocation", visit, None, None)
    return seen


def tags() -> Dict[str, TagStats]:
    """Statistics of every tag that has live allocations."""
    return {tag: stats(tag) for tag in sorted({a.tag for a in allocations()})}


def release_host_store() -> int:
    """Frees the pinned host buffers kept for reuse; returns the bytes freed."""
    out = ctypes.c_size_t()
    call("devmem_release_host_store", ctypes.byref(out))
    return int(out.value)


def set_host_policy(policy: "_lib.HostPolicy") -> None:
    """``HostPolicy.KEEP`` (default): pinned host memory stays for the next sleep;
    ``HostPolicy.RELEASE``: it is freed after each wake."""
    if not isinstance(policy, int) or isinstance(policy, bool):
        raise TypeError(f"policy must be a devmem.HostPolicy, not {type(policy).__name__}")
    call("devmem_set_host_policy", int(policy))


def host_policy() -> "_lib.HostPolicy":
    """The current host-store policy."""
    out = ctypes.c_int32()
    call("devmem_get_host_policy", ctypes.byref(out))
    return _lib.HostPolicy(out.value)


def reserve_host_store(nbytes: int, wait: bool = False) -> None:
    """Prepares ``nbytes`` of pinned host memory for backups ahead of the first sleep, in the
    background (``wait=True`` blocks until it is ready)."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise TypeError("nbytes must be a non-negative int")
    call("devmem_reserve_host_store", nbytes, 1 if wait else 0)


def set_host_grow_ahead(enabled: bool) -> None:
    """Turns growing the host store ahead of need on (the default) or off. While on, the store
    grows in the background (idle CPU priority, within the host-memory bound) toward the bytes
    of all live allocations, so the first sleep is as fast as later ones. Off stops further
    growth; memory already grown stays until ``release_host_store()``. The environment
    variable ``DEVMEM_HOST_GROW_AHEAD=0|1`` sets the initial value."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, not {type(enabled).__name__}")
    call("devmem_set_host_grow_ahead", 1 if enabled else 0)


def host_grow_ahead() -> bool:
    """Whether the host store grows ahead of need."""
    out = ctypes.c_int()
    call("devmem_get_host_grow_ahead", ctypes.byref(out))
    return bool(out.value)


@dataclass(frozen=True)
class Residual:
    """Device memory still used on one device, by cause (``devmem.residual()``).

    ``devmem_mapped``: devmem's allocations still backed by physical memory (0 after a sleep
    of every tag). ``devmem_other``: other device memory devmem holds (0 normally).
    ``driver_used``: total minus free, as the driver reports. ``torch_outside_devmem``:
    segments PyTorch's caching allocator holds outside devmem's allocations (None when torch
    or its CUDA state is not loaded). ``rest``: what is left: the CUDA context (typically
    0.3-0.6 GiB per process and device), NCCL's buffers, cuBLAS/cuDNN workspaces, other
    allocators and other processes on the device."""

    device: int
    devmem_mapped: int
    devmem_other: int
    driver_used: int
    torch_outside_devmem: Optional[int]
    rest: int
    total: int


def _torch_outside_devmem(device: int) -> Optional[int]:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        ranges = sorted((a.ptr, a.ptr + a.size) for a in allocations() if a.device == device)
        starts = [r[0] for r in ranges]
        import bisect

        outside = 0
        for seg in torch.cuda.memory_snapshot():
            if seg.get("device") != device:
                continue
            addr, size = int(seg["address"]), int(seg["total_size"])
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0 and ranges[i][0] <= addr < ranges[i][1]:
                continue  # a segment devmem backs: counted as devmem's
            outside += size
        return outside
    except Exception as err:  # noqa: BLE001 - a report must not fail the sleep it follows
        logging.getLogger("devmem").debug("devmem: could not read PyTorch's segments: %s", err)
        return None


def residual(device: int = 0) -> Residual:
    """What device memory ``device`` still uses, by cause; call it after a sleep to see what
    was left behind (see ``Residual``)."""
    out = _lib.Residual()
    call("devmem_get_residual", _c_device(device), ctypes.byref(out))
    torch_bytes = _torch_outside_devmem(device)
    rest = int(out.other_used_bytes) - (torch_bytes or 0)
    return Residual(
        device=device,
        devmem_mapped=int(out.devmem_mapped_bytes),
        devmem_other=int(out.devmem_other_bytes),
        driver_used=int(out.driver_used_bytes),
        torch_outside_devmem=torch_bytes,
        rest=max(rest, 0),
        total=int(out.total_bytes),
    )


def log_residual(device: Optional[int] = None, what: str = "sleep") -> Optional[Residual]:
    """Logs ``residual(device)`` at info level (the vLLM backend and the torch_memory_saver
    module call it after each sleep; ``device`` None: PyTorch's current device, else 0); never
    raises, and reads nothing when info is not logged."""
    log = logging.getLogger("devmem")
    if not log.isEnabledFor(logging.INFO):
        return None
    try:
        if device is None:
            torch = sys.modules.get("torch")
            on_cuda = torch is not None and torch.cuda.is_initialized()
            device = int(torch.cuda.current_device()) if on_cuda else 0
        r = residual(device)
    except Exception as err:  # noqa: BLE001 - only a report
        logging.getLogger("devmem").debug("devmem: residual after %s unavailable: %s", what, err)
        return None
    gib = 1 << 30
    torch_part = "n/a" if r.torch_outside_devmem is None else f"{r.torch_outside_devmem / gib:.2f}"
    logging.getLogger("devmem").info(
        "devmem: after %s, device %d still uses %.2f GiB: devmem %.2f mapped + %.2f other, "
        "PyTorch cache outside devmem %s, rest (context, NCCL, other) %.2f",
        what, device, r.driver_used / gib, r.devmem_mapped / gib, r.devmem_other / gib,
        torch_part, r.rest / gib,
    )
    return r


def set_host_limit(nbytes: int) -> None:
    """Caps the pinned host memory the host store may hold at ``nbytes`` (0 removes the cap,
    and ``DEVMEM_HOST_LIMIT`` with it). A sleep that would need more raises
    ``HostOutOfMemoryError`` before anything is copied or released. devmem also never grows
    the store past what ``MemAvailable`` and the process's memory cgroup allow."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise TypeError("nbytes must be a non-negative int")
    call("devmem_set_host_limit", nbytes)


def host_limit() -> int:
    """The cap on the host store in bytes (0: none), from ``set_host_limit`` or
    ``DEVMEM_HOST_LIMIT``."""
    out = ctypes.c_uint64()
    call("devmem_get_host_limit", ctypes.byref(out))
    return int(out.value)


def set_read_only(tag: str, mode: Union[bool, "_lib.ReadOnly"] = True) -> None:
    """Declares ``tag``'s bytes unchanged from now on (``True`` / ``ReadOnly.ON``): a wake
    keeps the host copy and the next sleep of the tag only unmaps, with no copy. Bytes written
    after the declaration are lost at the next sleep (the wake after it restores the older
    copy). ``ReadOnly.VERIFY`` compares a checksum computed on the GPU with the copy's before
    skipping, and copies again on a mismatch (CUDA only; ``UnsupportedError`` elsewhere).
    ``False`` / ``ReadOnly.OFF`` turns it off and drops the kept copies."""
    if isinstance(mode, bool):
        mode = _lib.ReadOnly.ON if mode else _lib.ReadOnly.OFF
    mode = _lib.ReadOnly(mode)
    call("devmem_set_read_only", encode_tag(tag), int(mode))


def read_only(tag: str) -> "_lib.ReadOnly":
    """What sleeps assume about ``tag``'s bytes."""
    out = ctypes.c_int32()
    call("devmem_get_read_only", encode_tag(tag), ctypes.byref(out))
    return _lib.ReadOnly(out.value)


_close_registered = False


@dataclass(frozen=True)
class SharedStoreInfo:
    """The shared store this process has open (:func:`shared_store_info`)."""

    path: str
    rank: int
    world: int
    kept: bool
    generation: int


def shared_store_info() -> Optional[SharedStoreInfo]:
    """The shared store this process has open, or ``None`` (a store ``DEVMEM_SHARED_STORE``
    names counts only once it opened, at the first sleep)."""
    info = _lib.SharedStoreInfo()
    call("devmem_get_shared_store_info", ctypes.byref(info))
    if not info.open:
        return None
    return SharedStoreInfo(
        os.fsdecode(info.path), info.rank, info.world, bool(info.kept), info.generation)


def shared_store_durable() -> bool:
    """Whether sleeps go to a kept shared store that is open now, so a new process can
    restore them. Asks the library, never the environment: a store ``DEVMEM_SHARED_STORE``
    names is durable only once it opened (at the first sleep) with ``DEVMEM_SHARED_KEEP=1``."""
    info = shared_store_info()
    return info is not None and info.kept


def open_shared_store(
    name: str,
    bytes_per_rank: int,
    rank: int = 0,
    world: int = 1,
    dir: Optional[str] = None,
    keep: bool = False,
    reclaim: bool = False,
    timeout: float = 30.0,
) -> None:
    """Opens the shared host store ``<dir>/devmem-<name>.region`` (``dir`` defaults to this
    user's private ``/dev/shm/devmem-<uid>``, mode 0700), creating it when this process is the first of its instance. Later sleeps
    save into this rank's ``bytes_per_rank`` bytes of it. ``keep=True`` leaves the region in
    place when the last process closes it, so a restarted process can call
    :func:`restore_from_store`. The store is closed at interpreter exit. Raises
    :class:`RegionError` for a region that is not this user's, not mode 0600, a symbolic link,
    corrupt, of another layout, or whose rank is taken; ``HostOutOfMemoryError`` when the host
    has no room."""
    global _close_registered
    for what, value in (("bytes_per_rank", bytes_per_rank), ("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"{what} must be a non-negative int")
    if rank >= 2**32 or world >= 2**32 or bytes_per_rank >= 2**64:
        raise _lib.InvalidArgumentError(_lib.Status.INVALID_ARGUMENT, "rank, world or bytes_per_rank is too large")
    if not isinstance(name, str):
        raise TypeError(f"name must be str, not {type(name).__name__}")
    if not 0 < timeout <= 86400:
        raise _lib.InvalidArgumentError(_lib.Status.INVALID_ARGUMENT, "timeout must be in (0, 86400] seconds")
    try:
        encoded_name = name.encode("ascii")
        encoded_dir = None if dir is None else os.fsencode(dir)
    except UnicodeEncodeError:
        raise _lib.InvalidArgumentError(
            _lib.Status.INVALID_ARGUMENT, f"shared store: name {name!r} is not printable ASCII"
        ) from None
    options = _lib.SharedStoreOptions(
        encoded_name, encoded_dir, bytes_per_rank, rank, world,
        (_lib.SHARED_KEEP if keep else 0) | (_lib.SHARED_RECLAIM if reclaim else 0),
        max(1, int(timeout * 1000)),
    )
    call("devmem_shared_store_open", ctypes.byref(options))
    if not _close_registered:
        atexit.register(_close_at_exit)
        _close_registered = True


def _close_at_exit() -> None:
    try:
        close_shared_store()
    except _lib.InvalidStateError:
        pass  # closed already
    except _lib.DevmemError as err:  # never raise at exit
        logger.warning("devmem: closing the shared store at exit: %s", err)


if os.environ.get("DEVMEM_SHARED_STORE"):
    # A store the environment opens at the first sleep is closed at exit too (a no-op when it
    # never opened), so the last process removes the region.
    atexit.register(_close_at_exit)
    _close_registered = True


def close_shared_store() -> None:
    """Leaves the shared host store: later sleeps use private memory again; backups already in
    the region stay valid for this process. The last process to leave removes the region
    unless it was opened with ``keep=True``. After a close, a store ``DEVMEM_SHARED_STORE``
    names is not opened again by this process (:func:`open_shared_store` still opens one)."""
    call("devmem_shared_store_close")


def name_range(ptr: int, nbytes: int, name: str) -> None:
    """Names the bytes ``[ptr, ptr+nbytes)`` of a live devmem allocation ``name``: what a
    durable restore matches on (:func:`restore_from_store`). Registering a name again moves
    it; names go when their allocation is freed."""
    _check_range(ptr, nbytes)
    if not isinstance(name, str):
        raise TypeError(f"name must be str, not {type(name).__name__}")
    if "\0" in name:  # C would see only the part before it
        raise _lib.InvalidArgumentError(_lib.Status.INVALID_ARGUMENT, f"range name {name!r} contains NUL")
    call("devmem_name_range", ptr, nbytes, name.encode("utf-8"))


def clear_names(tag: Optional[str] = None) -> int:
    """Forgets the range names of every allocation of ``tag`` (of every allocation when
    ``None``): call it before naming a reloaded model's tensors again. Returns how many."""
    out = ctypes.c_size_t(0)
    call("devmem_clear_names", None if tag is None else encode_tag(tag), ctypes.byref(out))
    return out.value


def tensor_key(name: str, tensor: Any) -> str:
    """The key :func:`name_tensors` records for ``tensor``: its name, dtype and shape, so a
    restore refuses a tensor whose dtype or shape changed under the same name."""
    return f"{name}|{str(tensor.dtype).replace('torch.', '')}|{list(tensor.shape)}"


def name_tensors(named: Any) -> int:
    """Names every tensor of ``named`` (a ``state_dict()``, ``dict(model.named_parameters())``,
    or an iterable of ``(name, tensor)``) by :func:`tensor_key`, in the process that saves
    and in the one that restores. Each tensor must be contiguous and live in devmem memory
    (allocated inside a devmem pool). Returns the number of tensors named."""
    items = named.items() if hasattr(named, "items") else named
    count = 0
    for name, tensor in items:
        if not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous: its bytes are not one range")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            continue
        try:
            name_range(tensor.data_ptr(), nbytes, tensor_key(name, tensor))
        except _lib.DevmemError as err:
            raise type(err)(err.status, f"tensor {name!r}: {err.message}") from None
        count += 1
    return count


def _check_identity(rank: Optional[int], world: Optional[int]) -> None:
    """Refuses a restore by a process whose rank or world differs from the store's: the ones
    given, else torch.distributed's when it is initialised with the store's world size."""
    info = shared_store_info()
    if info is None:
        env = os.environ
        if not env.get("DEVMEM_SHARED_STORE"):
            return  # the library says "no shared store is open"
        # The store the environment names opens inside the restore: check against its values.
        try:
            info = SharedStoreInfo(env["DEVMEM_SHARED_STORE"], int(env.get("DEVMEM_SHARED_RANK", "0")),
                                   int(env.get("DEVMEM_SHARED_WORLD", "1")), False, 0)
        except ValueError:
            return  # the library reports the bad value
    if rank is None and world is None:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        if world != info.world:
            # A per-node store: its ranks are the launcher's local ranks (torchrun's).
            local = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
            if local[0] is None or local[1] is None or not all(v.isdigit() for v in local):
                return
            rank, world = int(local[0]), int(local[1])
            if world != info.world:
                return
    if (rank is not None and rank != info.rank) or (world is not None and world != info.world):
        raise _lib.RegionError(
            _lib.Status.REGION,
            f"restore refused: this process is rank {rank} of {world}, but the shared store "
            f"{info.path} is open as rank {info.rank} of {info.world}; nothing was copied")


def restore_from_store(
    tags: TagsArg,
    *,
    by_order: bool = False,
    rank: Optional[int] = None,
    world: Optional[int] = None,
) -> TransferResult:
    """Fills this process's freshly allocated, mapped allocations of ``tags`` with the bytes a
    kept shared store holds for them (an earlier process slept them there). Restores by name:
    every range named with :func:`name_tensors` / :func:`name_range` must be stored under the
    same name, tag and length, and every name stored under ``tags`` must be asked for;
    anything else raises :class:`RegionError` naming it before anything is copied. ``rank`` and
    ``world`` (default: torch.distributed's when initialised with the store's world size, else
    torchrun's ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` when those match it) must be the store's. On CUDA each range is verified on the GPU after the copy.
    ``by_order=True`` matches whole allocations by tag and order of allocation instead, for
    callers that cannot name their bytes: every size must match exactly."""
    _check_identity(rank, world)
    names = normalize_tags(tags)
    array, n = tag_array(names)
    call("devmem_restore_from_store_by_order" if by_order else "devmem_restore_from_store", array, n)
    return last_transfer()


def _keep_options(
    instance: str,
    rank: int,
    world: int,
    socket: Optional[str],
    keeper_binary: Optional[str],
    read_only: bool,
) -> "_lib.KeepOptions":
    if not isinstance(instance, str) or not instance or "\0" in instance:
        raise ValueError("instance must be a non-empty string without NUL")
    # The C struct holds uint32 ranks: ctypes would wrap larger ones into another key.
    if (
        not (isinstance(rank, int) and isinstance(world, int))
        or not 0 <= rank < world
        or world >= 1 << 32
    ):
        raise ValueError(f"rank {rank!r} must be an int below world {world!r} (below 2**32)")
    return _lib.KeepOptions(
        instance.encode(),
        rank,
        world,
        os.fsencode(socket) if socket else None,
        os.fsencode(keeper_binary) if keeper_binary else None,
        int(bool(read_only)),
    )


def keeper_socket_path() -> str:
    """The keeper's default socket, as the keeper and the library choose it:
    ``DEVMEM_KEEPER_SOCKET``, else ``$XDG_RUNTIME_DIR/devmem/keeper.sock``, else
    ``/dev/shm/devmem-<uid>/keeper.sock``."""
    explicit = os.environ.get("DEVMEM_KEEPER_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "devmem", "keeper.sock")
    return f"/dev/shm/devmem-{os.geteuid()}/keeper.sock"


def keeper_available(socket: Optional[str] = None) -> bool:
    """Whether a keeper answers at ``socket`` (default: :func:`keeper_socket_path`)."""
    import socket as _socket

    path = socket or keeper_socket_path()
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def keep(
    tags: TagsArg,
    *,
    instance: str,
    rank: int = 0,
    world: int = 1,
    socket: Optional[str] = None,
    keeper_binary: Optional[str] = None,
) -> None:
    """Hands the GPU memory of the named allocations of ``tags`` to the keeper process
    (``devmem-keeper``) without copying, filed under (instance, rank, world, tag): a later
    process attaches it with :func:`attach`. The allocations stay usable here. ``socket``:
    the keeper's socket (default: its default path); ``keeper_binary``: start this keeper when
    none runs."""
    names = normalize_tags(tags)
    array, n = tag_array(names)
    options = _keep_options(instance, rank, world, socket, keeper_binary, False)
    call("devmem_keep", array, n, ctypes.byref(options))


def attach(
    tags: TagsArg,
    *,
    instance: str,
    rank: int = 0,
    world: int = 1,
    read_only: bool = False,
    socket: Optional[str] = None,
    keeper_binary: Optional[str] = None,
) -> TransferResult:
    """Maps the memory the keeper holds for ``tags`` at this process's own allocations (same
    names, sizes and device; refused with :class:`RegionError` before anything is mapped
    otherwise), without copying. ``read_only`` maps it read-only and shares it with other
    read-only processes; otherwise the attach is exclusive."""
    names = normalize_tags(tags)
    array, n = tag_array(names)
    options = _keep_options(instance, rank, world, socket, keeper_binary, read_only)
    call("devmem_attach", array, n, ctypes.byref(options))
    return last_transfer()


def release_kept(
    tags: TagsArg,
    *,
    instance: str,
    rank: int = 0,
    world: int = 1,
    socket: Optional[str] = None,
) -> int:
    """Has the keeper drop what it holds for ``tags``; returns the bytes it gave back."""
    names = normalize_tags(tags)
    array, n = tag_array(names)
    options = _keep_options(instance, rank, world, socket, None, False)
    released = ctypes.c_uint64(0)
    call("devmem_release_kept", array, n, ctypes.byref(options), ctypes.byref(released))
    return int(released.value)


def use_emulator(face: str = "cuda", capacity: Optional[str] = None, devices: Optional[int] = None) -> str:
    """Runs devmem on the driver emulator bundled with the package instead of a GPU, so code
    using devmem can be tried and tested on any Linux machine. ``face`` is ``"cuda"`` (the
    emulator's CUDA driver face), ``"hip"`` or ``"level_zero"``; ``capacity`` the memory of each emulated
    device (``"1G"`` by default, suffixes K/M/G) and ``devices`` their number (default 1). The
    same as setting ``DEVMEM_EMULATOR=1`` (or ``level_zero``) before the first devmem call.
    Must be called before devmem is first used in the process (``InvalidStateError``
    otherwise). Returns the emulator's path."""
    if face not in _lib.EMULATOR_FACES:
        raise _lib.InvalidArgumentError(
            _lib.Status.INVALID_ARGUMENT, f"face must be one of {_lib.EMULATOR_FACES}, not {face!r}")
    if _lib.loaded():
        if _lib.emulator_face() == face:
            return _lib.emulator_path() or ""
        raise _lib.InvalidStateError(
            _lib.Status.INVALID_STATE,
            "use_emulator() must come before devmem's first use in the process (the library is loaded "
            f"already); set {_lib.EMULATOR_ENV}={face} in the environment instead")
    path = _lib.emulator_path()
    if path is None:
        raise _lib.LibraryNotFoundError(
            "this devmem package has no bundled emulator: install it from a wheel, or with cargo available")
    if capacity is not None:
        os.environ["DEVMEM_EMU_CAPACITY"] = str(capacity)
    if devices is not None:
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise TypeError("devices must be a positive int")
        os.environ["DEVMEM_EMU_DEVICES"] = str(devices)
    os.environ[_lib.EMULATOR_ENV] = face
    return path


def select_backend(backend: "_lib.Backend") -> None:
    """Chooses the backend before the first allocation: ``Backend.AUTO`` (CUDA when a CUDA
    driver with a device loads, else HIP when the HIP runtime loads with a device, else Level
    Zero), ``Backend.CUDA``, ``Backend.HIP`` or ``Backend.LEVEL_ZERO``.
    ``DEVMEM_BACKEND=cuda|hip|level_zero|auto`` does the same from the environment."""
    if not isinstance(backend, int) or isinstance(backend, bool):
        raise TypeError(f"backend must be a devmem.Backend, not {type(backend).__name__}")
    call("devmem_select_backend", int(backend))


def backend() -> "_lib.Backend":
    """The backend in use (loading it if needed)."""
    out = ctypes.c_int32()
    call("devmem_get_backend", ctypes.byref(out))
    return _lib.Backend(out.value)


def set_level_zero_context(context: int, devices: "list[int]") -> None:
    """Hands devmem the Level Zero context and devices (native handles as ints, e.g. from
    SYCL's ``get_native``) before its first allocation, so devmem maps memory in the context the
    application's queues use."""
    if not isinstance(context, int) or isinstance(context, bool):
        raise TypeError("context must be an int (a ze_context_handle_t)")
    handles = list(devices)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in handles):
        raise TypeError("devices must be ints (ze_device_handle_t)")
    array = (ctypes.c_void_p * max(len(handles), 1))(*handles)
    call("devmem_set_level_zero_context", ctypes.c_void_p(context), array, len(handles))
