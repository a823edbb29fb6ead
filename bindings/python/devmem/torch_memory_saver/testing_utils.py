"""torch_memory_saver's test helpers (``torch_memory_saver.testing_utils``), so its example
programs run against devmem unchanged."""

from __future__ import annotations

import torch

from .utils import is_xpu  # noqa: F401  (torch_memory_saver's tests import it from here)


def get_device() -> str:
    """The device type the examples allocate on."""
    return "xpu" if not torch.cuda.is_available() and hasattr(torch, "xpu") and torch.xpu.is_available() else "cuda"


def empty_cache() -> None:
    """Returns PyTorch's cached device memory."""
    if get_device() == "xpu":
        torch.xpu.empty_cache()
    else:
        torch.cuda.empty_cache()


def get_and_print_gpu_memory(message: str, gpu_id: int = 0) -> int:
    """Device memory in use on ``gpu_id`` (total minus free), printed with ``message``."""
    free, total = torch.cuda.mem_get_info(gpu_id)
    used = total - free
    print(f"GPU {gpu_id} memory: {used / 1024 ** 3:.2f} GB ({message})")
    return used
