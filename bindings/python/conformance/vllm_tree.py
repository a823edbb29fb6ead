"""vLLM 0.33's real plugin and sleep-mode modules, importable without vLLM's dependencies.

``build(dest)`` extracts from the vLLM wheel (``pip download vllm==0.33.0 --no-deps``, cached)
the files devmem's plugin meets: ``vllm/plugins/__init__.py`` (entry-point discovery),
``vllm/device_allocator/sleep_mode_backend.py`` (the backend interface and factory),
``vllm/envs.py``, ``vllm/logger.py``, ``vllm/logging_utils/`` and ``vllm/version.py``, and
with ``with_cumem=True`` also ``vllm/device_allocator/cumem.py``, ``alloc_conf.py`` and
``cumem_allocator.abi3.so`` (vLLM's own allocator, for comparisons on a GPU).

Stubbed, because they pull in all of vLLM (PyTorch, model code, platform detection):
``vllm/__init__.py`` (empty), ``vllm/config/__init__.py`` (only
``get_current_vllm_config_or_none`` and a setter), and ``vllm/device_allocator/__init__.py``
(its ``DEFERRABLE_TAGS``, ``AllocationData`` and ``get_mem_allocator_instance`` copied in
behaviour: vLLM's class when ``with_cumem``, else a placeholder object), plus for
``with_cumem`` the few helpers cumem.py imports (``vllm.platforms``, ``vllm.utils.*``,
``CudaRTLibrary``) as thin ctypes/torch equivalents. Nothing of vLLM is committed to devmem.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile
from typing import List

VERSION = "0.33.0"
REAL = [
    "vllm/plugins/__init__.py",
    "vllm/device_allocator/sleep_mode_backend.py",
    "vllm/envs.py",
    "vllm/logger.py",
    "vllm/version.py",
    "vllm/_version.py",
]
REAL_CUMEM = ["vllm/device_allocator/cumem.py", "vllm/device_allocator/alloc_conf.py", "vllm/cumem_allocator.abi3.so"]

STUB_CONFIG = '''
_current = None
def get_current_vllm_config_or_none():
    return _current
def set_for_test(config):
    global _current
    _current = config
'''

STUB_DEVICE_ALLOCATOR = '''
import dataclasses
DEFERRABLE_TAGS = ("weights", "kv_cache")
HandleType = tuple
@dataclasses.dataclass
class AllocationData:
    handle: tuple
    tag: str
    cpu_backup_tensor: object = None
    is_asleep: bool = False
class VllmAllocatorPlaceholder:
    """Stands for vLLM's own CuMemAllocator where it cannot be loaded."""
_placeholder = VllmAllocatorPlaceholder()
def get_mem_allocator_instance():
    if WITH_CUMEM:
        from vllm.device_allocator.cumem import CuMemAllocator
        return CuMemAllocator.get_instance()
    return _placeholder
'''

STUB_PLATFORMS = '''
class _Platform:
    def is_rocm(self): return False
    def is_cuda_alike(self): return True
    def is_xpu(self): return False
current_platform = _Platform()
'''

STUB_SYSTEM_UTILS = '''
def find_loaded_library(lib_name):
    with open("/proc/self/maps") as f:
        for line in f:
            if lib_name in line:
                start = line.index("/")
                return line[start:].strip()
    return None
'''

STUB_TORCH_UTILS = "PIN_MEMORY = True\n"

STUB_CUDA_WRAPPER = '''
import ctypes
class CudaRTLibrary:
    """cudaMemcpy/cudaMemset through the libcudart PyTorch loaded (vLLM's wrapper does the same)."""
    def __init__(self):
        import torch  # noqa: F401  (loads libcudart)
        path = None
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcudart" in line:
                    path = line[line.index("/"):].strip()
                    break
        self.lib = ctypes.CDLL(path)
    def cudaMemcpy(self, dst, src, count):
        rc = self.lib.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(count), 4)
        if rc != 0:
            raise RuntimeError(f"cudaMemcpy failed: {rc}")
    def cudaMemset(self, ptr, value, count):
        rc = self.lib.cudaMemset(ctypes.c_void_p(ptr), value, ctypes.c_size_t(count))
        if rc != 0:
            raise RuntimeError(f"cudaMemset failed: {rc}")
'''


def wheel(cache: str) -> str:
    """The vLLM wheel, downloaded into ``cache`` once (``$DEVMEM_VLLM_WHEEL`` overrides)."""
    given = os.environ.get("DEVMEM_VLLM_WHEEL")
    if given:
        return given
    found = glob.glob(os.path.join(cache, f"vllm-{VERSION}-*.whl"))
    if not found:
        os.makedirs(cache, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "-d", cache, f"vllm=={VERSION}"],
            check=True,
        )
        found = glob.glob(os.path.join(cache, f"vllm-{VERSION}-*.whl"))
    return found[0]


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def build(dest: str, wheel_path: str, with_cumem: bool = False) -> str:
    """Assembles the tree under ``dest`` and returns the directory to put on ``sys.path``."""
    with zipfile.ZipFile(wheel_path) as z:
        names = set(z.namelist())
        wanted: List[str] = REAL + [n for n in names if n.startswith("vllm/logging_utils/") and n.endswith(".py")]
        if with_cumem:
            wanted += REAL_CUMEM
        for name in wanted:
            if name in names:
                z.extract(name, dest)
    root = os.path.join(dest, "vllm")
    _write(os.path.join(root, "__init__.py"), '"""vLLM stub package for devmem\'s tests."""\n')
    _write(os.path.join(root, "config", "__init__.py"), STUB_CONFIG)
    _write(os.path.join(root, "device_allocator", "__init__.py"),
           f"WITH_CUMEM = {with_cumem!r}\n" + STUB_DEVICE_ALLOCATOR)
    if with_cumem:
        _write(os.path.join(root, "platforms", "__init__.py"), STUB_PLATFORMS)
        _write(os.path.join(root, "utils", "__init__.py"), "")
        _write(os.path.join(root, "utils", "system_utils.py"), STUB_SYSTEM_UTILS)
        _write(os.path.join(root, "utils", "torch_utils.py"), STUB_TORCH_UTILS)
        _write(os.path.join(root, "distributed", "__init__.py"), "")
        _write(os.path.join(root, "distributed", "device_communicators", "__init__.py"), "")
        _write(os.path.join(root, "distributed", "device_communicators", "cuda_wrapper.py"), STUB_CUDA_WRAPPER)
    return dest


def entry_point_dist(dest: str, pyproject: str) -> str:
    """A ``.dist-info`` declaring the ``vllm.general_plugins`` entry point exactly as
    ``pyproject`` does, for running from a source tree that pip did not install."""
    import tomllib

    with open(pyproject, "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]
    info = os.path.join(dest, "devmem_source_tree-0.0.dist-info")
    lines = ["[vllm.general_plugins]"] + [f"{k} = {v}" for k, v in eps.items()]
    _write(os.path.join(info, "entry_points.txt"), "\n".join(lines) + "\n")
    _write(os.path.join(info, "METADATA"), "Metadata-Version: 2.1\nName: devmem-source-tree\nVersion: 0.0\n")
    return dest
