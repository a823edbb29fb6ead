"""PyTorch's allocator configuration while a devmem pool is active.

PyTorch's expandable segments do not work with a pluggable allocator inside a MemPool
(pytorch/pytorch#147851). Entering a devmem pool turns them off and leaving it restores the
previous configuration. PyTorch resets every option absent from the string it is handed, so
the *whole* string is rewritten with only ``expandable_segments`` changed, and the previous
string is handed back in ``finally``, also when the body raises. PyTorch has no getter for the
live configuration, so devmem remembers the last string it set and otherwise reads the
environment (``PYTORCH_CUDA_ALLOC_CONF``, ``PYTORCH_HIP_ALLOC_CONF`` on ROCm builds, or
``PYTORCH_ALLOC_CONF`` on newer releases).

The setting is process-wide while pools are entered per thread, so entries are counted under a
lock: the first entry (in any thread) turns expandable segments off, and only the last exit
restores the previous string; a thread leaving its pool never turns them back on under another
thread still allocating in one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Callable, Iterator, List, Optional, Tuple

logger = logging.getLogger("devmem")

ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_applied: Optional[str] = None
_lock = threading.Lock()
_depth = 0
# (configuration to restore, setter that applied the change) while entries are open.
_saved: Optional[Tuple[str, Callable[[str], None]]] = None


def current_settings() -> str:
    """The allocator configuration string in force (as far as devmem can know)."""
    if _applied is not None:
        return _applied
    for name in ENV_NAMES:
        value = os.environ.get(name)
        if value:
            return value
    return ""


def parse(conf: str) -> List[Tuple[str, str]]:
    """Splits ``"a:1, b:2"`` into ``[("a", "1"), ("b", "2")]``, keeping order."""
    options = []
    for item in conf.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition(":")
        options.append((key.strip(), value.strip()))
    return options


def expandable_enabled(conf: str) -> bool:
    """Whether ``conf`` turns expandable segments on."""
    return any(k.lower() == "expandable_segments" and v.lower() in ("true", "1") for k, v in parse(conf))


def without_expandable(conf: str) -> str:
    """``conf`` with expandable segments off and every other option kept."""
    return ",".join(
        f"{k}:False" if k.lower() == "expandable_segments" else (f"{k}:{v}" if v else k) for k, v in parse(conf)
    )


def _torch_setter() -> Callable[[str], None]:
    import torch

    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:  # pragma: no cover - depends on the PyTorch release
        raise RuntimeError("this PyTorch has no torch.cuda.memory._set_allocator_settings")
    return setter


@contextlib.contextmanager
def expandable_segments_disabled(setter: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Turns expandable segments off for the body when they are on; the last body to leave
    (across threads) restores the previous configuration string. ``setter`` defaults to
    PyTorch's."""
    global _applied, _depth, _saved
    with _lock:
        if _depth == 0:
            conf = current_settings()
            if expandable_enabled(conf):
                apply = setter or _torch_setter()
                changed = without_expandable(conf)
                logger.debug("devmem: allocator settings %r -> %r for a devmem pool", conf, changed)
                apply(changed)
                _applied = changed
                _saved = (conf, apply)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                conf, apply = _saved
                _saved = None
                apply(conf)
                _applied = conf
