"""CuMemAllocator and regions without PyTorch: the sleep-mode methods work on the library,
the pool methods need torch, and release_pools is final for pools."""

import ctypes
import importlib.util

import pytest

import devmem
from conftest import EMULATED

MIB = 1 << 20
HAS_TORCH = importlib.util.find_spec("torch") is not None
pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")


def test_vllm_sleep_semantics():
    alloc = devmem.CuMemAllocator.get_instance()
    assert devmem.CuMemAllocator.get_instance() is alloc
    with devmem.use_tag("default"):
        w = devmem.malloc(2 * MIB)
    with devmem.use_tag("kv_cache"):
        kv = devmem.malloc(4 * MIB)
    ctypes.memset(w, 0x5A, 2 * MIB)
    assert alloc.get_current_usage() == 6 * MIB
    alloc.sleep()  # None means ("default",): w saved, kv discarded
    assert devmem.allocation_info(w).state == devmem.State.OFFLOADED
    assert devmem.allocation_info(kv).state == devmem.State.DISCARDED
    assert alloc.get_current_usage() == 6 * MIB
    # vLLM's rule: a selective wake restores every tag outside ("weights", "kv_cache").
    alloc.wake_up(["kv_cache"])
    assert devmem.allocation_info(w).state == devmem.State.MAPPED
    assert devmem.allocation_info(kv).state == devmem.State.MAPPED
    assert ctypes.string_at(w, 2 * MIB) == b"\x5a" * (2 * MIB)
    alloc.sleep("kv_cache")  # a str is one tag
    alloc.wake_up()
    alloc.discard("kv_cache")
    assert devmem.allocation_info(kv).state == devmem.State.DISCARDED
    alloc.wake_up()
    with pytest.raises(TypeError):
        alloc.sleep(b"default")
    with pytest.raises(TypeError):
        alloc.sleep([b"default"])
    devmem.free(w)
    devmem.free(kv)


@pytest.mark.skipif(HAS_TORCH, reason="checks the error without torch")
def test_pools_need_torch():
    with pytest.raises(ImportError, match="needs torch"):
        with devmem.CuMemAllocator.get_instance().use_memory_pool("weights"):
            pass


def test_release_pools_is_final_for_pools_but_not_for_sleep():
    alloc = devmem.CuMemAllocator()
    alloc.release_pools()
    alloc.release_pools()  # twice is fine
    with pytest.raises(devmem.InvalidStateError, match="release_pools"):
        with alloc.cudagraph_pool():
            pass
    with devmem.use_tag("x"):
        p = devmem.malloc(MIB)
    alloc.sleep("x")
    alloc.wake_up()
    devmem.free(p)


def test_regions_pause_and_resume_by_policy():
    with devmem.region("weights"):
        w = devmem.malloc(2 * MIB)
    with devmem.region("kv", enable_cpu_backup=False):
        kv = devmem.malloc(2 * MIB)
    with devmem.use_tag("other"):
        other = devmem.malloc(2 * MIB)
    ctypes.memset(w, 1, 2 * MIB)
    ctypes.memset(other, 2, 2 * MIB)
    devmem.pause("kv")
    assert devmem.allocation_info(kv).state == devmem.State.DISCARDED
    assert devmem.allocation_info(w).state == devmem.State.MAPPED
    devmem.pause()
    assert devmem.allocation_info(w).state == devmem.State.OFFLOADED
    assert devmem.allocation_info(other).state == devmem.State.OFFLOADED  # no region: kept
    devmem.resume("weights")
    assert devmem.allocation_info(other).state == devmem.State.OFFLOADED
    devmem.resume()
    assert ctypes.string_at(w, 2 * MIB) == b"\x01" * (2 * MIB)
    assert ctypes.string_at(other, 2 * MIB) == b"\x02" * (2 * MIB)
    with pytest.raises(TypeError):
        with devmem.region(["weights"]):
            pass
    with pytest.raises(TypeError):
        devmem.pause(b"weights")
    for p in (w, kv, other):
        devmem.free(p)
