"""devmem's vLLM plugin against vLLM 0.33's real plugin loader and sleep-mode backend module,
extracted from the release wheel (conformance/vllm_tree.py says what is stubbed and why):
entry-point discovery, registration, allocator routing, and suspend/resume/discard driving
devmem on the emulator."""

import importlib
import importlib.metadata
import os
import pathlib
import sys

import pytest

import devmem
from conftest import EMULATED, LEVEL_ZERO, ROOT

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from conformance import vllm_tree  # noqa: E402

pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")
MIB = 1 << 20
CACHE = pathlib.Path(os.environ.get("DEVMEM_VLLM_CACHE", ROOT / "build" / "vllm-wheel"))


class _ModelConfig:
    def __init__(self, backend):
        self.sleep_mode_backend = backend


class _VllmConfig:
    def __init__(self, backend):
        self.model_config = _ModelConfig(backend)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """vLLM's real modules on sys.path, plugins loaded through vLLM's own loader."""
    try:
        wheel = vllm_tree.wheel(str(CACHE))
    except Exception as err:  # pragma: no cover - no registry reachable
        pytest.skip(f"cannot download the vLLM {vllm_tree.VERSION} wheel: {err}")
    dest = tmp_path_factory.mktemp("vllm")
    vllm_tree.build(str(dest), wheel)
    sys.path.insert(0, str(dest))
    pyproject = ROOT / "bindings" / "python" / "pyproject.toml"
    group = importlib.metadata.entry_points(group="vllm.general_plugins")
    if "devmem" not in [e.name for e in group]:  # a source-tree run: declare it as pip would
        vllm_tree.entry_point_dist(str(dest), str(pyproject))
    saved = {k: v for k, v in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
    for k in saved:
        del sys.modules[k]
    importlib.invalidate_caches()
    import vllm.plugins

    vllm.plugins.load_general_plugins()
    yield sys.modules["vllm"]
    sys.path.remove(str(dest))
    for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
        del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture
def fresh_choice(monkeypatch):
    import devmem.vllm_plugin as plugin

    monkeypatch.setattr(plugin, "_choice", None)
    monkeypatch.delenv(plugin.ENV_ALLOCATOR, raising=False)
    yield plugin
    importlib.import_module("vllm.config").set_for_test(None)


def test_entry_point_is_discovered_and_registers_the_backend(vllm, monkeypatch, tmp_path):
    monkeypatch.setenv("DEVMEM_KEEPER_SOCKET", str(tmp_path / "no-keeper.sock"))  # none answers
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackend, SleepModeBackendFactory

    eps = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("devmem") == "devmem.vllm_plugin:register"
    cls = SleepModeBackendFactory.get_backend_class("devmem")
    assert issubclass(cls, SleepModeBackend) and cls.__name__ == "DevmemSleepModeBackend"
    assert cls.is_supported()
    assert (cls.preserves_communicators(), cls.supports_durable_storage()) == (True, False)
    # Not shown on a GPU pair yet (NCCL's graph registration of remapped pages): no claim.
    assert cls.preserves_graphs_with_communicators() is False
    assert cls.preserves_compiled_artifacts() is True
    # A kept shared store makes suspended state durable; closing it ends that.
    name = f"plugin-{os.getpid()}"
    devmem.open_shared_store(name, 8 << 20, keep=True)
    try:
        assert cls.supports_durable_storage()
    finally:
        devmem.close_shared_store()
        os.unlink(f"/dev/shm/devmem-{os.geteuid()}/devmem-{name}.region")
    assert not cls.supports_durable_storage()
    backend = SleepModeBackendFactory.create_backend(_ModelConfig("devmem"))
    assert backend.state() == "RUNNING"
    # Loading twice (vLLM may) registers once.
    devmem.vllm_plugin.register()
    assert SleepModeBackendFactory.get_backend_class("cumem").__name__ == "CuMemBackend"


def test_allocator_follows_the_selected_backend(vllm, fresh_choice):
    import vllm.device_allocator as da

    importlib.import_module("vllm.config").set_for_test(_VllmConfig("devmem"))
    assert da.get_mem_allocator_instance() is devmem.CuMemAllocator.get_instance()
    # The choice is fixed for the process: a config that disagrees later is an error.
    importlib.import_module("vllm.config").set_for_test(_VllmConfig("cumem"))
    with pytest.raises(RuntimeError, match="cannot mix"):
        da.get_mem_allocator_instance()


def test_without_devmem_selected_vllm_keeps_its_allocator(vllm, fresh_choice):
    import vllm.device_allocator as da

    importlib.import_module("vllm.config").set_for_test(_VllmConfig("cumem"))
    assert type(da.get_mem_allocator_instance()).__name__ == "VllmAllocatorPlaceholder"


def test_the_callers_config_decides_before_vllm_sets_its_context(vllm, fresh_choice):
    """vLLM's worker opens its weights pool before entering set_current_vllm_config."""
    import vllm.device_allocator as da

    class Worker:
        vllm_config = _VllmConfig("devmem")

        def _maybe_get_memory_pool_context(self):
            return da.get_mem_allocator_instance()

    assert Worker()._maybe_get_memory_pool_context() is devmem.CuMemAllocator.get_instance()


def test_suspend_resume_discard_drive_devmem(vllm, fresh_choice):
    import ctypes

    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    importlib.import_module("vllm.config").set_for_test(_VllmConfig("devmem"))
    backend = SleepModeBackendFactory.create_backend(_ModelConfig("devmem"))
    ptrs = {}
    for tag, byte in (("weights", 1), ("runtime", 2), ("cudagraph", 3), ("kv_cache", 4)):
        with devmem.use_tag(tag):
            ptrs[tag] = devmem.malloc(4 * MIB)
        ctypes.memset(ptrs[tag], byte, 4 * MIB)

    def state(tag):
        return devmem.allocation_info(ptrs[tag]).state

    free0 = devmem.mem_get_info()[0]
    backend.suspend(level=1)
    assert backend.state() == "SUSPENDED"
    assert devmem.mem_get_info()[0] - free0 == 16 * MIB, "every byte goes back"
    assert [state(t) for t in ("weights", "runtime", "cudagraph")] == [devmem.State.OFFLOADED] * 3
    assert state("kv_cache") == devmem.State.DISCARDED
    backend.resume(["weights"])
    assert backend.state() == "RUNNING"
    assert state("runtime") == devmem.State.MAPPED and state("kv_cache") == devmem.State.DISCARDED
    for tag, byte in (("weights", 1), ("runtime", 2), ("cudagraph", 3)):
        assert ctypes.string_at(ptrs[tag], 4 * MIB) == bytes([byte]) * (4 * MIB), tag
    backend.resume(["kv_cache"])
    backend.discard(("kv_cache",))  # release_kv_cache_memory
    assert state("kv_cache") == devmem.State.DISCARDED and state("weights") == devmem.State.MAPPED
    assert backend.state() == "SUSPENDED"
    backend.resume(None)
    backend.suspend(level=2)
    assert state("weights") == devmem.State.DISCARDED, "level 2 discards weights"
    assert state("runtime") == devmem.State.OFFLOADED
    backend.resume()
    with pytest.raises(ValueError, match="level"):
        backend.suspend(level=3)
    for p in ptrs.values():
        devmem.free(p)


def test_backend_refuses_when_pools_came_from_vllm(vllm, fresh_choice):
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    importlib.import_module("vllm.config").set_for_test(_VllmConfig("cumem"))
    import vllm.device_allocator as da

    da.get_mem_allocator_instance()  # the process chose vLLM's allocator
    backend = SleepModeBackendFactory.create_backend(_ModelConfig("devmem"))
    importlib.import_module("vllm.config").set_for_test(None)
    with pytest.raises(RuntimeError, match="DEVMEM_VLLM_ALLOCATOR"):
        backend.suspend(1)


def test_state_changes_only_when_the_call_succeeds(vllm, fresh_choice):
    """Issue 20, finding 14: a failed suspend leaves the backend RUNNING (nothing was released),
    a failed resume leaves it SUSPENDED (the wake undid its mappings), not RESUMING."""
    import ctypes

    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    importlib.import_module("vllm.config").set_for_test(_VllmConfig("devmem"))
    backend = SleepModeBackendFactory.create_backend(_ModelConfig("devmem"))
    with devmem.use_tag("weights"):
        w = devmem.malloc(4 * MIB)
    with devmem.use_tag("kv_cache"):
        kv = devmem.malloc(4 * MIB)
    devmem.release_host_store()
    devmem.set_host_limit(MIB)  # too small for the weights' backup: the sleep fails up front
    try:
        with pytest.raises(devmem.HostOutOfMemoryError):
            backend.suspend(level=1)
    finally:
        devmem.set_host_limit(0)
    assert devmem.allocation_info(w).state == devmem.State.MAPPED
    assert backend.state() == "RUNNING", "a failed suspend released nothing"
    backend.suspend(level=1)
    assert backend.state() == "SUSPENDED"
    hog = devmem.malloc(devmem.mem_get_info()[0])  # the device is full: the wake fails
    try:
        with pytest.raises(devmem.OutOfMemoryError):
            backend.resume(None)
        assert devmem.allocation_info(w).state == devmem.State.OFFLOADED
        assert backend.state() == "SUSPENDED", "a failed resume woke nothing"
    finally:
        devmem.free(hog)
    backend.resume(None)
    assert backend.state() == "RUNNING"
    # A suspend that fails part way (the second unmap) keeps what it put to sleep asleep: the
    # backend then says SUSPENDED, as every allocation that is not mapped needs a resume.
    with devmem.use_tag("weights"):
        w2 = devmem.malloc(4 * MIB)
    emu = ctypes.CDLL(os.environ["DEVMEM_CUDA_LIBRARY"])  # loaded already: the same emulator
    unmap = {"LEVEL_ZERO": "zeVirtualMemUnmap", "HIP": "hipMemUnmap"}.get(devmem.backend().name, "cuMemUnmap")
    assert emu.cuemu_inject(unmap.encode(), 2, 999) == 0
    try:
        with pytest.raises(devmem.DriverError, match="stays mapped"):
            backend.suspend(level=1)
    finally:
        emu.cuemu_clear_faults()
    asleep = [a.tag for a in devmem.allocations() if a.state != devmem.State.MAPPED]
    assert asleep, "the first unmap went through"
    assert backend.state() == "SUSPENDED"
    backend.resume(None)
    assert backend.state() == "RUNNING"
    for p in (w, kv, w2):
        devmem.free(p)


RESTART = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import devmem
from devmem.vllm_plugin import DevmemSleepModeBackend
socket, mode = sys.argv[2], sys.argv[3]
MIB = 1 << 20
with devmem.use_tag("weights"):
    ptrs = [devmem.malloc(n * MIB) for n in (2, 4)]
for i, p in enumerate(ptrs):
    devmem.name_range(p, (2 + 2 * i) * MIB, f"layer{i}")
backend = DevmemSleepModeBackend()
assert DevmemSleepModeBackend.supports_durable_storage()
if mode == "keep":
    for i, p in enumerate(ptrs):
        ctypes.memset(p, 0x30 + i, (2 + 2 * i) * MIB)
    backend.keep_for_restart("engine", socket=socket)
else:
    try:
        backend.attach_after_restart("engine", rank=1, world=2, socket=socket)
        raise AssertionError("another rank's memory was attached")
    except devmem.DevmemError as err:
        assert "does not hold" in str(err), err
    t = backend.attach_after_restart("engine", socket=socket, release=True)
    assert t.bytes_restored == 0 and t.allocations == 2, t
    for i, p in enumerate(ptrs):
        n = (2 + 2 * i) * MIB
        assert ctypes.string_at(p, n) == bytes([0x30 + i]) * n, i
print("child ok")
"""


@pytest.mark.skipif(LEVEL_ZERO, reason="Level Zero cannot export physical memory")
def test_engine_restart_through_the_keeper(vllm, keeper, monkeypatch):
    """supports_durable_storage says True while a keeper answers; one engine process keeps its
    weights, the next attaches them (no copy, a wrong rank refused) and has the keeper drop them."""
    import subprocess

    from devmem.vllm_plugin import DevmemSleepModeBackend

    monkeypatch.setenv("DEVMEM_KEEPER_SOCKET", keeper)
    assert DevmemSleepModeBackend.supports_durable_storage()
    tree = os.path.dirname(os.path.dirname(vllm.__file__))
    for mode in ("keep", "attach"):
        out = subprocess.run([sys.executable, "-c", RESTART, tree, keeper, mode], env=dict(os.environ),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "child ok" in out.stdout, out.stderr
    assert not devmem.keeper_available(keeper + ".other")
