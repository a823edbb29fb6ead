"""vLLM 0.33's real plugin and sleep-mode modules, importable without vLLM's dependencies.

``build(dest)`` extracts from the vLLM wheel (``pip download vllm==0.33.0 --no-deps``, cached)
the files devmem's plugin meets: ``vllm/plugins/__init__.py`` (entry-point discovery),
``vllm/device_allocator/sleep_mode_backend.py`` (the backend interface and factory),
``vllm/envs.py``, ``vllm/logger.py``, ``vllm/logging_utils/`` and ``vllm/version.py``, and
with ``with_cumem=True`` also ``vllm/device_allocator/cumem.py``, ``alloc_conf.py`` and
``cumem_allocator.abi3.so`` (vLLM's own allocator, for comparisons on a GPU), and with
``with_graphs=True`` the modules that choose where CUDA graphs and LoRA state are allocated:
``vllm/compilation/cudagraph_pool.py`` and ``vllm/v1/worker/lora_model_runner_mixin.py``.

Stubbed, because they pull in all of vLLM (PyTorch, model code, platform detection):
``vllm/__init__.py`` (empty), ``vllm/config/__init__.py`` (only
``get_current_vllm_config_or_none`` and a setter), and ``vllm/device_allocator/__init__.py``
(its ``DEFERRABLE_TAGS``, ``AllocationData`` and ``get_mem_allocator_instance`` copied in
behaviour: vLLM's class when ``with_cumem``, else a placeholder object), plus for
``with_cumem`` the few helpers cumem.py imports (``vllm.platforms``, ``vllm.utils.*``,
``CudaRTLibrary``) as thin ctypes/torch equivalents. For ``with_graphs``, ``VllmConfig``,
``ModelConfig`` and ``CompilationConfig`` (whose modules import PyTorch and all of vLLM's config)
are pydantic dataclasses, as vLLM's are, holding only vLLM's own members that graph-pool routing
reads, copied out of the wheel's source at build time by :func:`real_source`:
``VllmConfig.use_cumem_cudagraph_pool``, the ``NCCL_GRAPH_REGISTER`` statement of
``VllmConfig.__post_init__``, the ``ModelConfig`` sleep-mode fields with their defaults,
``CUDAGraphMode``, and ``pynccl_allocator.set_graph_pool_id``. What the LoRA mixin imports
besides (LoRA layers, manager, model registry, input batch, ``vllm.platforms``) are empty
stand-ins; PyTorch and NumPy are the test's to provide. Nothing of vLLM is committed to devmem.
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import textwrap
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
REAL_GRAPHS = [
    "vllm/compilation/__init__.py",
    "vllm/compilation/cudagraph_pool.py",
    "vllm/lora/__init__.py",
    "vllm/v1/__init__.py",
    "vllm/v1/worker/__init__.py",
    "vllm/v1/worker/lora_model_runner_mixin.py",
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
import contextlib
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
    GRAPH_POOL = ("vllm", "cumem cudagraph pool")
    @contextlib.contextmanager
    def cudagraph_pool(self):
        yield self.GRAPH_POOL
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
    def is_cuda(self): return True
    def is_cuda_alike(self): return True
    def is_xpu(self): return False
    def graph_pool_handle(self):
        """PyTorch's own graph pool (torch.cuda.graph_pool_handle())."""
        return TORCH_GRAPH_POOL
TORCH_GRAPH_POOL = ("torch", "graph_pool_handle")
current_platform = _Platform()
'''

STUB_CONFIG_GRAPHS = '''
from vllm.config.compilation import CompilationConfig, CUDAGraphMode
from vllm.config.model import ModelConfig
from vllm.config.vllm import VllmConfig
'''

STUB_CONFIG_COMPILATION = '''
import enum
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

{cuda_graph_mode}

@dataclass(config=ConfigDict(extra="forbid"))
class CompilationConfig:
    cudagraph_mode: CUDAGraphMode = CUDAGraphMode.FULL_AND_PIECEWISE
'''

STUB_CONFIG_MODEL = '''
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

@dataclass(config=ConfigDict(extra="forbid"))
class ModelConfig:
{fields}
'''

STUB_CONFIG_VLLM = '''
import os
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from vllm.config.compilation import CompilationConfig, CUDAGraphMode
from vllm.config.model import ModelConfig
from vllm.logger import init_logger

logger = init_logger(__name__)

@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class VllmConfig:
    model_config: ModelConfig = None
    compilation_config: CompilationConfig = Field(default_factory=CompilationConfig)

    def nccl_graph_register_default(self):
        """The statement of vLLM's __post_init__ that reads the property."""
{nccl_statement}

{use_cumem_cudagraph_pool}
'''

STUB_PYNCCL_ALLOCATOR = '''
from typing import Any

_graph_pool_id = None

{set_graph_pool_id}
'''

STUB_LORA_DEPENDENCIES = {
    "vllm/config/lora.py": "class LoRAConfig:\n    pass\n",
    "vllm/lora/layers/__init__.py": "class LoRAMapping:\n    pass\nclass LoRAMappingType:\n    LANGUAGE = 0\n",
    "vllm/lora/request.py": "class LoRARequest:\n    pass\n",
    "vllm/lora/worker_manager.py": (
        "class LRUCacheWorkerLoRAManager:\n"
        "    def __init__(self, vllm_config, device, embedding_modules):\n"
        "        self.embedding_modules = embedding_modules\n"
        "    def create_lora_manager(self, model, vllm_config):\n"
        "        return model\n"
    ),
    "vllm/model_executor/__init__.py": "",
    "vllm/model_executor/models/__init__.py": "def supports_lora(model):\n    return True\n",
    "vllm/v1/worker/gpu_input_batch.py": "class InputBatch:\n    pass\n",
}

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


def real_source(source: str, qualname: str) -> str:
    """The source of the class or function ``qualname`` (``"Class"``, ``"Class.member"`` or
    ``"function"``) in ``source``, decorators included, dedented. Raises ``LookupError`` when
    vLLM's source has no such member (another vLLM version)."""
    nodes = ast.parse(source).body
    node = None
    for part in qualname.split("."):
        node = next(
            (n for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part), None
        )
        if node is None:
            raise LookupError(f"vLLM {VERSION}'s source has no {qualname}")
        nodes = node.body
    assert node is not None
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return textwrap.dedent("\n".join(source.splitlines()[start - 1 : node.end_lineno])) + "\n"


def _real_fields(source: str, cls: str, names: List[str]) -> str:
    """The annotated field declarations ``names`` of ``cls``, with their defaults."""
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls).body
    found = {n.target.id: ast.get_source_segment(source, n) for n in body
             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id in names}
    missing = [n for n in names if n not in found]
    if missing:
        raise LookupError(f"vLLM {VERSION}'s {cls} has no {missing}")
    return "\n".join(found[n] for n in names) + "\n"


def _real_statement(source: str, function: str, test: str) -> str:
    """The ``if <test>:`` statement inside ``function`` (a ``"Class.member"``), dedented."""
    text = real_source(source, function)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.If) and ast.unparse(node.test) == test:
            segment = ast.get_source_segment(text, node, padded=True)
            assert segment is not None
            return textwrap.dedent(segment) + "\n"
    raise LookupError(f"vLLM {VERSION}'s {function} has no `if {test}:`")


def _graph_stubs(z: zipfile.ZipFile) -> dict:
    """The stub files of ``with_graphs``, filled with vLLM's own members."""
    def read(name: str) -> str:
        return z.read(name).decode()

    def indent(text: str, columns: int) -> str:
        return textwrap.indent(text, " " * columns)

    vllm_py, model_py = read("vllm/config/vllm.py"), read("vllm/config/model.py")
    fields = ["enable_sleep_mode", "sleep_mode_backend", "sleep_mode_offload_cudagraph", "enable_cumem_allocator"]
    nccl = _real_statement(vllm_py, "VllmConfig.__post_init__", "self.use_cumem_cudagraph_pool")
    stubs = {
        "vllm/config/__init__.py": STUB_CONFIG + STUB_CONFIG_GRAPHS,
        "vllm/config/compilation.py": STUB_CONFIG_COMPILATION.format(
            cuda_graph_mode=real_source(read("vllm/config/compilation.py"), "CUDAGraphMode")),
        "vllm/config/model.py": STUB_CONFIG_MODEL.format(
            fields=indent(_real_fields(model_py, "ModelConfig", fields), 4)),
        "vllm/config/vllm.py": STUB_CONFIG_VLLM.format(
            nccl_statement=indent(nccl, 8),
            use_cumem_cudagraph_pool=indent(real_source(vllm_py, "VllmConfig.use_cumem_cudagraph_pool"), 4)),
        "vllm/platforms/__init__.py": STUB_PLATFORMS,
        "vllm/distributed/__init__.py": "",
        "vllm/distributed/device_communicators/__init__.py": "",
        "vllm/distributed/device_communicators/pynccl_allocator.py": STUB_PYNCCL_ALLOCATOR.format(
            set_graph_pool_id=real_source(read("vllm/distributed/device_communicators/pynccl_allocator.py"),
                                          "set_graph_pool_id")),
    }
    stubs.update(STUB_LORA_DEPENDENCIES)
    return stubs


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


def build(dest: str, wheel_path: str, with_cumem: bool = False, with_graphs: bool = False) -> str:
    """Assembles the tree under ``dest`` and returns the directory to put on ``sys.path``."""
    graph_stubs: dict = {}
    with zipfile.ZipFile(wheel_path) as z:
        names = set(z.namelist())
        wanted: List[str] = REAL + [n for n in names if n.startswith("vllm/logging_utils/") and n.endswith(".py")]
        if with_cumem:
            wanted += REAL_CUMEM
        if with_graphs:
            wanted += REAL_GRAPHS
            graph_stubs = _graph_stubs(z)
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
    for name, text in graph_stubs.items():
        _write(os.path.join(dest, name), text)
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
