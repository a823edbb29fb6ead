"""Memory profiling in the shape of vLLM's ``MemorySnapshot`` / ``memory_profiling``, plus
devmem's own numbers: per-tag mapped, offloaded and discarded bytes and the host store.

With PyTorch the torch numbers come from ``torch.cuda``; without it they are 0 and free/total
come from devmem (the driver). On integrated GPUs (shared CPU/GPU memory) the driver's free
memory ignores reclaimable OS memory, so free memory is taken from ``MemAvailable`` in
/proc/meminfo instead, as vLLM does with psutil.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional

from . import api


def _torch() -> Optional[Any]:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def host_available_memory() -> int:
    """``MemAvailable`` from /proc/meminfo in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def _is_integrated(device: int) -> bool:
    torch = _torch()
    if torch is None:
        return False
    return bool(getattr(torch.cuda.get_device_properties(device), "is_integrated", False))


@dataclass
class TagUsage:
    """devmem's bytes for one tag."""

    mapped: int = 0
    offloaded: int = 0
    discarded: int = 0

    def __sub__(self, other: "TagUsage") -> "TagUsage":
        return TagUsage(self.mapped - other.mapped, self.offloaded - other.offloaded, self.discarded - other.discarded)


@dataclass
class MemorySnapshot:
    """Memory snapshot (vLLM's fields, in bytes) with devmem's per-tag usage."""

    torch_peak: int = 0
    free_memory: int = 0
    total_memory: int = 0
    cuda_memory: int = 0
    torch_memory: int = 0
    non_torch_memory: int = 0
    timestamp: float = 0.0
    devmem_tags: Dict[str, TagUsage] = field(default_factory=dict)
    devmem_host_store: int = 0
    device: int = 0
    auto_measure: bool = True
    is_integrated: Optional[Callable[[int], bool]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.auto_measure:
            self.measure()

    def measure(self) -> None:
        """Takes the measurements now."""
        torch = _torch()
        device = self.device
        if torch is not None:
            self.torch_peak = int(torch.cuda.memory_stats(device).get("allocated_bytes.all.peak", 0))
            self.free_memory, self.total_memory = (int(x) for x in torch.cuda.mem_get_info(device))
            self.torch_memory = int(torch.cuda.memory_reserved(device))
        else:
            self.torch_peak = 0
            self.free_memory, self.total_memory = api.mem_get_info(device)
            self.torch_memory = 0
        integrated = (self.is_integrated or _is_integrated)(device)
        if integrated:
            self.free_memory = host_available_memory()
        self.cuda_memory = self.total_memory - self.free_memory
        self.non_torch_memory = self.cuda_memory - self.torch_memory
        self.devmem_tags = {
            tag: TagUsage(s.mapped_bytes.current, s.offloaded_bytes.current, s.discarded_bytes.current)
            for tag, s in api.tags().items()
        }
        self.devmem_host_store = api.stats().host_store_bytes
        self.timestamp = time.time()

    def __sub__(self, other: "MemorySnapshot") -> "MemorySnapshot":
        if self.device != other.device:
            raise ValueError(f"the two snapshots are of different devices: {self.device} vs {other.device}")
        tags = {
            t: self.devmem_tags.get(t, TagUsage()) - other.devmem_tags.get(t, TagUsage())
            for t in set(self.devmem_tags) | set(other.devmem_tags)
        }
        return MemorySnapshot(
            torch_peak=self.torch_peak - other.torch_peak,
            free_memory=self.free_memory - other.free_memory,
            total_memory=self.total_memory - other.total_memory,
            cuda_memory=self.cuda_memory - other.cuda_memory,
            torch_memory=self.torch_memory - other.torch_memory,
            non_torch_memory=self.non_torch_memory - other.non_torch_memory,
            timestamp=self.timestamp - other.timestamp,
            devmem_tags=tags,
            devmem_host_store=self.devmem_host_store - other.devmem_host_store,
            device=self.device,
            auto_measure=False,
        )


@dataclass
class MemoryProfilingResult:
    """vLLM's profiling result, in bytes."""

    non_kv_cache_memory: int = 0
    torch_peak_increase: int = 0
    non_torch_increase: int = 0
    weights_memory: int = 0
    before_create: MemorySnapshot = field(default_factory=lambda: MemorySnapshot(auto_measure=False))
    profile_time: float = 0.0

    def __post_init__(self) -> None:
        device = self.before_create.device
        hook = self.before_create.is_integrated
        self.before_profile = MemorySnapshot(device=device, auto_measure=False, is_integrated=hook)
        self.after_profile = MemorySnapshot(device=device, auto_measure=False, is_integrated=hook)


def _empty_cache() -> None:
    gc.collect()
    torch = _torch()
    if torch is not None:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_profiling(baseline_snapshot: MemorySnapshot, weights_memory: int = 0) -> Iterator[MemoryProfilingResult]:
    """vLLM's ``memory_profiling``: non-KV-cache memory = weights + the torch peak increase
    during the body + the non-torch increase since ``baseline_snapshot``."""
    _empty_cache()
    torch = _torch()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats(baseline_snapshot.device)
    result = MemoryProfilingResult(before_create=baseline_snapshot, weights_memory=weights_memory)
    result.before_profile.measure()
    yield result
    _empty_cache()
    result.after_profile.measure()
    diff_profile = result.after_profile - result.before_profile
    diff_from_create = result.after_profile - result.before_create
    result.torch_peak_increase = diff_profile.torch_peak
    result.non_torch_increase = diff_from_create.non_torch_memory
    result.profile_time = diff_profile.timestamp
    result.non_kv_cache_memory = result.non_torch_increase + result.torch_peak_increase + result.weights_memory
