"""``torch_memory_saver.hooks.mode_preload``: ``configure_subprocess`` puts devmem's preload
library first in ``LD_PRELOAD`` for child processes, as torch_memory_saver's does."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from devmem.torch_memory_saver.utils import change_env, get_binary_path_from_package


@contextlib.contextmanager
def configure_subprocess() -> Iterator[None]:
    """Children started in the body run with the preload library first in ``LD_PRELOAD``;
    entries already there are kept after it (but another torch_memory_saver preload library,
    which would compete for ``cudaMalloc``), and the variable is restored afterwards."""
    lib_path = str(get_binary_path_from_package("torch_memory_saver_hook_mode_preload"))
    current = os.environ.get("LD_PRELOAD", "")
    # Another torch_memory_saver preload library (its own) would take cudaMalloc first.
    kept = [p for p in current.split(":") if p and p != lib_path and "torch_memory_saver_hook_mode_preload" not in p]
    with change_env("LD_PRELOAD", ":".join([lib_path] + kept)):
        yield
