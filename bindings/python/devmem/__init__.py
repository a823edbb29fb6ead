"""devmem: a GPU sleep-mode allocator.

Module functions (standard library only) drive ``libdevmem.so`` through ctypes: tags,
``malloc``/``free``, ``sleep``/``offload``/``discard``/``wake_up``, statistics. With PyTorch,
:class:`CuMemAllocator` is a drop-in for vLLM's allocator and :func:`region` /
:func:`pause` / :func:`resume` follow torch_memory_saver. The library is ``$DEVMEM_LIBRARY``,
else the copy bundled with this package, else ``libdevmem.so.0``; ``DEVMEM_LOG`` sets the
library's own log level, Python's ``logging`` logger ``"devmem"`` this package's.
"""

from ._lib import (
    Backend,
    BufferTooSmallError,
    DevmemError,
    DriverError,
    DriverNotFoundError,
    HostOutOfMemoryError,
    InvalidArgumentError,
    InvalidDeviceError,
    InvalidStateError,
    InvalidTagError,
    LibraryNotFoundError,
    NullPointerError,
    OutOfMemoryError,
    PanicError,
    HostPolicy,
    State,
    Status,
    UnknownPointerError,
    UnsupportedError,
    library_path,
)
from .allocator import DEFERRABLE_TAGS, AllocationData, CuMemAllocator, pause, region, resume
from .api import (
    DEFAULT_TAG,
    Allocation,
    Counter,
    TagStats,
    TransferResult,
    allocation_info,
    backend,
    allocations,
    current_tag,
    device_count,
    discard,
    free,
    granularity,
    host_limit,
    host_policy,
    last_transfer,
    malloc,
    mem_get_info,
    offload,
    release_host_store,
    select_backend,
    set_level_zero_context,
    reserve_host_store,
    set_current_tag,
    set_host_limit,
    set_host_policy,
    sleep,
    stats,
    tags,
    use_tag,
    version,
    wake_up,
    wake_up_except,
    trim,
    backup_pointer,
    copy_backup,
)
from .profiling import MemoryProfilingResult, MemorySnapshot, TagUsage, memory_profiling

__all__ = [
    "AllocationData", "DEFERRABLE_TAGS", "trim", "wake_up_except", "backup_pointer", "copy_backup",
    "Allocation", "Backend", "BufferTooSmallError", "Counter", "CuMemAllocator", "DEFAULT_TAG", "DevmemError",
    "DriverError", "DriverNotFoundError", "HostOutOfMemoryError", "InvalidArgumentError",
    "InvalidDeviceError", "InvalidStateError", "InvalidTagError", "LibraryNotFoundError",
    "MemoryProfilingResult", "MemorySnapshot", "NullPointerError", "OutOfMemoryError", "PanicError",
    "HostPolicy", "State", "Status", "TagStats", "TagUsage", "TransferResult", "UnknownPointerError",
    "UnsupportedError", "allocation_info", "backend", "allocations", "current_tag", "device_count", "discard",
    "free", "granularity", "host_limit", "host_policy", "last_transfer", "library_path", "malloc", "mem_get_info",
    "memory_profiling", "offload", "pause", "region", "release_host_store", "select_backend", "set_level_zero_context", "reserve_host_store", "resume",
    "set_current_tag", "set_host_limit", "set_host_policy", "sleep", "stats", "tags", "use_tag", "version", "wake_up",
]

__version__ = "0.1.0"
