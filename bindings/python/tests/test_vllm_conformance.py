"""vLLM 0.33's allocator contract (conformance/vllm_allocator.py) against devmem's
``CuMemAllocator`` on the emulator. The same scenarios run on the GPU against vLLM's own class
and devmem's (tests_gpu/test_vllm_conformance_gpu.py)."""

import ctypes
import os
import sys

import pytest

import devmem
from conftest import EMULATED

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from conformance import vllm_allocator as contract  # noqa: E402

pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")


class EmulatorHarness:
    """devmem allocations under a tag, read and written through host pointers."""

    logger_name = "devmem"

    def __init__(self) -> None:
        self.allocator = devmem.CuMemAllocator()

    class _Buf:
        def __init__(self, ptr: int, size: int) -> None:
            self.ptr, self.size = ptr, size

    def alloc(self, tag, nbytes):
        with devmem.use_tag(tag):
            return self._Buf(devmem.malloc(nbytes), nbytes)

    def fill(self, buf, byte):
        ctypes.memset(buf.ptr, byte, buf.size)

    def holds(self, buf, byte):
        return ctypes.string_at(buf.ptr, buf.size) == bytes([byte]) * buf.size

    def free(self, buf):
        devmem.free(buf.ptr)

    def device_free(self):
        return devmem.mem_get_info()[0]

    def settle(self, tags):
        return None

    def needs_torch(self, what):
        pytest.skip(f"needs PyTorch pools ({what}); runs on the GPU")


@pytest.mark.parametrize("name", sorted(contract.SCENARIOS))
def test_scenario(name):
    contract.SCENARIOS[name](EmulatorHarness())


def test_errors_are_runtime_errors_and_a_full_device_keeps_backups():
    h = EmulatorHarness()
    cap = devmem.mem_get_info()[1]
    w = h.alloc("weights", contract.SIZE)
    h.fill(w, 0x61)
    h.allocator.sleep(("weights",))
    hog = devmem.malloc(devmem.mem_get_info()[0])  # fill the device
    with pytest.raises(RuntimeError, match="OUT_OF_MEMORY"):
        h.allocator.wake_up()
    assert isinstance(devmem.OutOfMemoryError(3, ""), RuntimeError)
    devmem.free(hog)
    h.allocator.wake_up()
    assert h.holds(w, 0x61)
    assert devmem.mem_get_info()[1] == cap
    h.free(w)


def test_pointer_to_data_is_read_only_and_live():
    h = EmulatorHarness()
    view = h.allocator.pointer_to_data
    w = h.alloc("weights", contract.SIZE)
    with pytest.raises(TypeError):
        view[w.ptr] = None  # type: ignore[index]
    with pytest.raises(KeyError):
        view[w.ptr + 4096]  # inside, not a start
    with pytest.raises(KeyError):
        view["nope"]  # type: ignore[index]
    assert len(view) == 1 and list(view) == [w.ptr]
    assert dict(view.items())[w.ptr].handle[0] == 0
    h.free(w)
    assert w.ptr not in view and len(view) == 0


def test_wake_retries_once_after_returning_cached_memory(monkeypatch):
    h = EmulatorHarness()
    calls = []
    monkeypatch.setattr(type(h.allocator), "_collect_and_empty_cache", staticmethod(lambda: calls.append(1)))
    w = h.alloc("weights", contract.SIZE)
    h.allocator.sleep(("weights",))
    hog = devmem.malloc(devmem.mem_get_info()[0])
    with pytest.raises(devmem.OutOfMemoryError):
        h.allocator.wake_up(["weights"])
    assert calls == [1], "one collect-and-retry before giving up"
    assert devmem.allocation_info(w.ptr).state == devmem.State.OFFLOADED
    devmem.free(hog)
    h.allocator.wake_up(["weights"])
    h.free(w)


def test_sleep_collects_garbage_alongside_the_native_call(monkeypatch):
    import threading

    from devmem.allocator import _alongside

    h = EmulatorHarness()
    seen = []
    monkeypatch.setattr(type(h.allocator), "_collect", staticmethod(lambda: seen.append(threading.current_thread().name)))
    w = h.alloc("weights", contract.SIZE)
    h.allocator.sleep(("weights",))
    assert seen == ["devmem-housekeeping"], "one collection, on the helper thread"
    h.allocator.wake_up()
    h.free(w)
    # The helper starts only once the body signals its native call, and always finishes.
    order = []
    with _alongside(lambda: order.append("work")) as entering:
        order.append("body")
        entering.set()
    assert order == ["body", "work"]
    with pytest.raises(ValueError):
        with _alongside(lambda: order.append("work after failure")):
            raise ValueError("the body failed before its native call")
    assert order[-1] == "work after failure"
