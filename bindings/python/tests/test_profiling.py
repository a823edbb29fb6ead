"""MemorySnapshot and memory_profiling without PyTorch (free/total from devmem)."""

import importlib.util

import pytest

import devmem

MIB = 1 << 20
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch-free numbers")


def test_snapshot_reports_devmem_tags_and_device_memory():
    with devmem.use_tag("weights"):
        p = devmem.malloc(4 * MIB)
    snap = devmem.MemorySnapshot()
    free_b, total = devmem.mem_get_info()
    assert (snap.free_memory, snap.total_memory) == (free_b, total)
    assert snap.cuda_memory == total - free_b
    assert snap.torch_memory == 0 and snap.non_torch_memory == snap.cuda_memory
    assert snap.devmem_tags["weights"] == devmem.TagUsage(mapped=4 * MIB)
    devmem.sleep("weights")
    later = devmem.MemorySnapshot()
    diff = later - snap
    assert diff.free_memory == 4 * MIB
    assert diff.devmem_tags["weights"] == devmem.TagUsage(mapped=-4 * MIB, offloaded=4 * MIB)
    assert later.devmem_host_store >= 4 * MIB
    devmem.wake_up()
    devmem.free(p)


def test_integrated_gpu_uses_host_available_memory():
    snap = devmem.MemorySnapshot(is_integrated=lambda device: True)
    assert abs(snap.free_memory - devmem.profiling.host_available_memory()) < 256 * MIB
    assert snap.cuda_memory == snap.total_memory - snap.free_memory


def test_snapshots_of_different_devices_do_not_subtract():
    a = devmem.MemorySnapshot(auto_measure=False, device=0)
    b = devmem.MemorySnapshot(auto_measure=False, device=1)
    with pytest.raises(ValueError, match="different devices"):
        a - b


def test_memory_profiling_adds_weights_peak_and_non_torch_increase():
    baseline = devmem.MemorySnapshot()
    with devmem.use_tag("non-torch"):
        p = devmem.malloc(8 * MIB)  # without torch every device byte is non-torch memory
    with devmem.memory_profiling(baseline, weights_memory=3 * MIB) as result:
        pass
    assert result.non_torch_increase == 8 * MIB
    assert result.torch_peak_increase == 0
    assert result.non_kv_cache_memory == 11 * MIB
    assert result.profile_time >= 0
    devmem.free(p)
