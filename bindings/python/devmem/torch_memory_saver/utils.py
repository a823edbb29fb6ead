"""``torch_memory_saver.utils``: the helpers torch_memory_saver's tests and users import."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from devmem import _lib


def is_xpu() -> bool:
    """Whether PyTorch runs on an Intel XPU here (and not on CUDA)."""
    try:
        import torch
    except ImportError:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and xpu is not None and xpu.is_available()


def get_binary_path_from_package(stem: str) -> str:
    """The path of devmem's library for ``stem``; only the preload library
    (``torch_memory_saver_hook_mode_preload``) exists. Raises ``RuntimeError`` naming what is
    missing."""
    if stem != _lib.PRELOAD_STEM:
        raise RuntimeError(f"devmem ships no {stem!r} library (only {_lib.PRELOAD_STEM!r})")
    path = _lib.preload_library_path()
    if path is None:
        raise RuntimeError(
            f"devmem's {_lib.PRELOAD_STEM} library is not in this install: reinstall devmem with cargo available, "
            f"or build it (`cargo build --release --workspace`) and set {_lib.PRELOAD_ENV} to its path"
        )
    return path


@contextlib.contextmanager
def change_env(key: str, value: str) -> Iterator[None]:
    """``os.environ[key] = value`` for the body; the previous value (or its absence) after."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
