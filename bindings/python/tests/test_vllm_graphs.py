"""CUDA graphs and LoRA state under vLLM's ``devmem`` sleep-mode backend, against vLLM 0.33's
own code from the release wheel: ``capture_pool`` (vllm/compilation/cudagraph_pool.py), the
LoRA model-runner mixin, and ``VllmConfig.use_cumem_cudagraph_pool`` with the
``NCCL_GRAPH_REGISTER`` statement of ``VllmConfig.__post_init__`` (copied out of the wheel into
a stand-in class; conformance/vllm_tree.py says what is stubbed and why).

PyTorch is test_pool_threads' stand-in: a capture or a tensor allocates devmem memory under the
calling thread's tag, as PyTorch's caching allocator does through ``my_malloc``.
"""

import contextlib
import ctypes
import importlib
import logging
import os
import pathlib
import sys
import types

import pytest

import devmem
from conftest import EMULATED, ROOT
from devmem import allocator as allocator_module
from test_pool_threads import fake  # noqa: F401  (a fixture: test_pool_threads' torch.cuda stand-in)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from conformance import vllm_tree  # noqa: E402

pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")
MIB = 1 << 20
CACHE = pathlib.Path(os.environ.get("DEVMEM_VLLM_CACHE", ROOT / "build" / "vllm-wheel"))
PROPERTY = "use_cumem_cudagraph_pool"
LORA_MIXIN = "vllm.v1.worker.lora_model_runner_mixin"
GRAPH_POOL = "vllm.compilation.cudagraph_pool"


def _take_vllm_modules():
    """Removes vLLM's modules and devmem's plugin (whose backend class subclasses the vLLM
    module it was imported with) from ``sys.modules``; returns them."""
    taken = {k: v for k, v in sys.modules.items() if k in ("vllm", "devmem.vllm_plugin") or k.startswith("vllm.")}
    for k in taken:
        del sys.modules[k]
    return taken


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    try:
        wheel = vllm_tree.wheel(str(CACHE))
    except Exception as err:  # pragma: no cover - no registry reachable
        pytest.skip(f"cannot download the vLLM {vllm_tree.VERSION} wheel: {err}")
    dest = tmp_path_factory.mktemp("vllm-graphs")
    vllm_tree.build(str(dest), wheel, with_graphs=True)
    saved = _take_vllm_modules()
    saved_attribute = devmem.__dict__.get("vllm_plugin")
    sys.path.insert(0, str(dest))
    importlib.invalidate_caches()
    yield dest
    sys.path.remove(str(dest))
    _take_vllm_modules()
    sys.modules.update(saved)
    if saved_attribute is None:
        devmem.__dict__.pop("vllm_plugin", None)
    else:
        devmem.vllm_plugin = saved_attribute


@pytest.fixture
def cuda(fake):
    """test_pool_threads' stand-in for ``torch.cuda``, installed as devmem's PyTorch."""
    return fake


@pytest.fixture
def plugin(tree, cuda, monkeypatch):
    """devmem's plugin in a process as vLLM starts one: freshly imported, register() not run,
    no allocator chosen, only the vLLM modules the plugin imports loaded, a fresh devmem
    CuMemAllocator."""
    _take_vllm_modules()
    monkeypatch.setattr(devmem.CuMemAllocator, "instance", None)
    monkeypatch.delenv("DEVMEM_VLLM_ALLOCATOR", raising=False)
    monkeypatch.delenv("NCCL_GRAPH_REGISTER", raising=False)
    yield importlib.import_module("devmem.vllm_plugin")
    _take_vllm_modules()


def _config(backend, offload=True, sleep=True, graphs=True):
    from vllm.config import CompilationConfig, CUDAGraphMode, ModelConfig, VllmConfig

    mode = CUDAGraphMode.FULL_AND_PIECEWISE if graphs else CUDAGraphMode.NONE
    return VllmConfig(
        model_config=ModelConfig(
            enable_sleep_mode=sleep, sleep_mode_backend=backend, sleep_mode_offload_cudagraph=offload
        ),
        compilation_config=CompilationConfig(cudagraph_mode=mode),
    )


def _selected(config):
    importlib.import_module("vllm.config").set_for_test(config)
    return config


@contextlib.contextmanager
def _without_torch_and_numpy():
    """What the LoRA mixin's import needs of PyTorch and NumPy (names in annotations), for the
    import only: afterwards ``import torch`` finds whatever it found before."""
    torch = types.ModuleType("torch")
    torch.nn = types.ModuleType("torch.nn")
    torch.nn.Module = type("Module", (), {})
    torch.device = type("device", (), {})
    numpy = types.ModuleType("numpy")
    numpy.ndarray = type("ndarray", (), {})
    numpy.int32 = int
    fakes = {"torch": torch, "torch.nn": torch.nn, "numpy": numpy}
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _import(name):
    with _without_torch_and_numpy():
        return importlib.import_module(name)


def test_offload_option_captures_graphs_into_devmems_cudagraph_pool(plugin, cuda):
    """--sleep-mode-backend devmem --sleep-mode-offload-cudagraph: vLLM's capture_pool hands
    the capture devmem's "cudagraph" pool; sleep offloads the graph memory, wake puts it back
    at the same address with the same bytes (vLLM replays its graphs without re-capturing)."""
    plugin.register()
    from vllm.compilation.cudagraph_pool import capture_pool
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
    from vllm.distributed.device_communicators import pynccl_allocator

    config = _selected(_config("devmem"))
    assert config.use_cumem_cudagraph_pool is True
    with capture_pool(None, config) as pool:
        graph_memory = devmem.malloc(4 * MIB)  # what torch.cuda.graph(g, pool=pool) allocates
    ctypes.memset(graph_memory, 7, 4 * MIB)
    allocator = devmem.CuMemAllocator.get_instance()
    assert pool == allocator.allocator_and_pools["cudagraph"][0][0].id, "devmem's graph pool"
    assert pynccl_allocator._graph_pool_id == pool, "NCCL's graph allocator points at it too"
    assert devmem.allocation_info(graph_memory).tag == "cudagraph"
    with capture_pool(("torch", "pool"), config) as again:
        assert again == pool, "every capture shares the one graph pool"

    with devmem.use_tag("weights"):
        weights = devmem.malloc(2 * MIB)
    backend = SleepModeBackendFactory.create_backend(config.model_config)
    for level in (1, 2):
        free = devmem.mem_get_info()[0]
        backend.suspend(level)
        assert devmem.allocation_info(graph_memory).state == devmem.State.OFFLOADED, level
        assert devmem.mem_get_info()[0] - free == 6 * MIB, "graph memory goes back to the driver"
        backend.resume(["weights"])  # a partial wake: graph memory always comes back
        assert devmem.allocation_info(graph_memory).state == devmem.State.MAPPED
        assert ctypes.string_at(graph_memory, 4 * MIB) == b"\x07" * (4 * MIB)
    devmem.free(graph_memory)
    devmem.free(weights)


@pytest.mark.parametrize(
    "what", ["option off", "sleep mode off", "no CUDA graphs"],
)
def test_without_the_option_graphs_stay_in_pytorchs_pool(plugin, cuda, what):
    """vLLM's documented behaviour whenever its own condition fails, as for cumem: graphs are
    captured into the pool vLLM passes (or PyTorch's graph pool), which sleep does not touch,
    and NCCL_GRAPH_REGISTER is left alone."""
    plugin.register()
    from vllm.compilation.cudagraph_pool import capture_pool
    from vllm.distributed.device_communicators import pynccl_allocator
    from vllm.platforms import TORCH_GRAPH_POOL

    kwargs = {"option off": {"offload": False}, "sleep mode off": {"sleep": False}, "no CUDA graphs": {"graphs": False}}
    config = _selected(_config("devmem", **kwargs[what]))
    assert config.use_cumem_cudagraph_pool is False
    with capture_pool(None, config) as pool:
        assert pool is None and pynccl_allocator._graph_pool_id == TORCH_GRAPH_POOL
    with capture_pool(("runner", "pool"), config) as pool:
        assert pool == ("runner", "pool") and pynccl_allocator._graph_pool_id == pool
    assert "cudagraph" not in devmem.CuMemAllocator.get_instance().allocator_and_pools
    config.nccl_graph_register_default()
    assert "NCCL_GRAPH_REGISTER" not in os.environ


def test_devmem_answers_as_cumem_and_other_backends_as_before(plugin):
    """Over every combination vLLM's condition reads: devmem gets cumem's answer, and every
    other backend (cumem included) gets exactly vLLM's unwrapped answer."""
    from vllm.config import VllmConfig

    original = VllmConfig.__dict__[PROPERTY].fget
    plugin.register()
    assert VllmConfig.__dict__[PROPERTY].fget is not original
    for offload in (True, False):
        for sleep in (True, False):
            for graphs in (True, False):
                combo = dict(offload=offload, sleep=sleep, graphs=graphs)
                for backend in ("cumem", "cuda_checkpoint"):
                    config = _config(backend, **combo)
                    assert config.use_cumem_cudagraph_pool == original(config), (backend, combo)
                devmem_config = _config("devmem", **combo)
                assert devmem_config.use_cumem_cudagraph_pool == original(_config("cumem", **combo)), combo
    assert original(_config("cuda_checkpoint")) is False  # the grid above saw both answers


def test_cumem_still_captures_into_vllms_own_pool(plugin):
    plugin.register()
    from vllm.compilation.cudagraph_pool import capture_pool
    from vllm.device_allocator import VllmAllocatorPlaceholder

    config = _selected(_config("cumem"))
    with capture_pool(None, config) as pool:
        assert pool == VllmAllocatorPlaceholder.GRAPH_POOL
    assert "cudagraph" not in devmem.CuMemAllocator.get_instance().allocator_and_pools


def test_nccl_graph_registration_defaults_off_for_devmem(plugin, monkeypatch, caplog):
    """vLLM defaults NCCL_GRAPH_REGISTER to 0 when graph memory sleeps (docs/engines.md: NCCL's
    registration of remapped graph buffers); now for devmem too. A value the user set stays, with
    vLLM's warning."""
    plugin.register()
    _config("devmem").nccl_graph_register_default()
    assert os.environ["NCCL_GRAPH_REGISTER"] == "0"
    monkeypatch.setenv("NCCL_GRAPH_REGISTER", "1")
    with caplog.at_level(logging.WARNING):
        _config("devmem").nccl_graph_register_default()
    assert os.environ["NCCL_GRAPH_REGISTER"] == "1"
    assert "pins the CUDA graph pool" in caplog.text


def test_register_wraps_once_and_tolerates_a_vllm_without_the_property(plugin, monkeypatch, caplog):
    from vllm.config import VllmConfig

    plugin.register()
    wrapped = VllmConfig.__dict__[PROPERTY]
    plugin.register()  # vLLM may load plugins more than once per process
    assert VllmConfig.__dict__[PROPERTY] is wrapped
    assert _config("devmem").use_cumem_cudagraph_pool is True

    monkeypatch.delattr(VllmConfig, PROPERTY)
    with caplog.at_level(logging.INFO, logger="devmem"):
        plugin.register()
    assert "no VllmConfig.use_cumem_cudagraph_pool" in caplog.text


@pytest.mark.parametrize("module", [LORA_MIXIN, GRAPH_POOL])
@pytest.mark.parametrize("order", ["imported before register()", "imported after register()"])
def test_every_module_binding_the_allocator_lookup_is_routed(plugin, module, order):
    if order.startswith("imported before"):
        binder = _import(module)
        plugin.register()
    else:
        plugin.register()
        binder = _import(module)
    assert binder.get_mem_allocator_instance is plugin.get_mem_allocator_instance


@pytest.mark.parametrize("order", ["imported before register()", "imported after register()"])
def test_lora_state_lives_in_devmems_runtime_pool(plugin, cuda, monkeypatch, order):
    """vLLM's LoRA mixin opens get_mem_allocator_instance().use_memory_pool("runtime") around
    the LoRA manager's buffers; under devmem they are devmem's, offloaded by a level-2 sleep
    (which discards the weights) and back after wake."""
    if order.startswith("imported before"):
        mixin = _import(LORA_MIXIN)
        plugin.register()
    else:
        plugin.register()
        mixin = _import(LORA_MIXIN)
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    buffers = []

    def create_lora_manager(self, model, vllm_config):
        buffers.append(cuda.alloc(2 * MIB))  # a LoRA weight slot, from the active pool
        return model

    monkeypatch.setattr(LRUCacheWorkerLoRAManager, "create_lora_manager", create_lora_manager)
    config = _selected(_config("devmem"))
    model = types.SimpleNamespace(embedding_modules={})
    assert mixin.LoRAModelRunnerMixin().load_lora_model(model, config, device=None) is model
    (lora,) = buffers
    assert devmem.allocation_info(lora).tag == "runtime"
    ctypes.memset(lora, 5, 2 * MIB)
    backend = SleepModeBackendFactory.create_backend(config.model_config)
    backend.suspend(2)
    assert devmem.allocation_info(lora).state == devmem.State.OFFLOADED
    backend.resume()
    assert ctypes.string_at(lora, 2 * MIB) == b"\x05" * (2 * MIB)
