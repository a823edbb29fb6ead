"""The module functions against the emulator: tags, allocation, sleep/wake/offload/discard with
byte-for-byte checks through the mapped addresses, statistics, errors."""

import ctypes
import threading

import pytest

import devmem
from conftest import EMULATED

pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")
MIB = 1 << 20


def fill(ptr, size, seed):
    data = bytes((seed * 31 + i * 7) % 251 for i in range(251)) * (size // 251 + 1)
    ctypes.memmove(ptr, data, size)
    return data[:size]


def read(ptr, size):
    return ctypes.string_at(ptr, size)


def test_tags_are_per_thread_and_default():
    assert devmem.current_tag() == "default"
    devmem.set_current_tag("weights")
    assert devmem.current_tag() == "weights"
    seen = []
    t = threading.Thread(target=lambda: seen.append(devmem.current_tag()))
    t.start()
    t.join()
    assert seen == ["default"]
    with devmem.use_tag("kv_cache"):
        assert devmem.current_tag() == "kv_cache"
    assert devmem.current_tag() == "weights"


def test_use_tag_restores_on_exception():
    devmem.set_current_tag("before")
    with pytest.raises(ZeroDivisionError):
        with devmem.use_tag("inside"):
            1 / 0
    assert devmem.current_tag() == "before"


@pytest.mark.parametrize("bad", [["weights"], b"weights", None, 3, ("a",)])
def test_a_tag_must_be_str(bad):
    with pytest.raises(TypeError):
        devmem.set_current_tag(bad)


@pytest.mark.parametrize("bad,needle", [("", "empty"), ("x" * 256, "limit is 255"), ("a\0b", "NUL")])
def test_invalid_tags(bad, needle):
    with pytest.raises(devmem.InvalidTagError, match=needle) as info:
        devmem.set_current_tag(bad)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [b"weights", [b"weights"], None, 5, ["ok", 3]])
def test_tag_lists_reject_wrong_types(bad):
    with pytest.raises(TypeError):
        devmem.offload(bad)


def test_sleep_offloads_and_discards_with_every_byte_back():
    with devmem.use_tag("weights"):
        w = [devmem.malloc(3 * MIB + 17) for _ in range(3)]
    with devmem.use_tag("kv_cache"):
        kv = devmem.malloc(8 * MIB)
    expected = [fill(p, 3 * MIB + 17, i) for i, p in enumerate(w)]
    free_before, total = devmem.mem_get_info()
    result = devmem.sleep(("weights",))
    assert result.bytes_saved == 3 * 4 * MIB and result.bytes_discarded == 8 * MIB
    assert devmem.mem_get_info()[0] == free_before + 20 * MIB
    assert devmem.allocation_info(w[0]).state == devmem.State.OFFLOADED
    assert devmem.allocation_info(kv).state == devmem.State.DISCARDED
    tag_stats = devmem.tags()
    assert tag_stats["weights"].offloaded_bytes.current == 12 * MIB
    assert tag_stats["kv_cache"].discarded_bytes.current == 8 * MIB
    woke = devmem.wake_up()
    assert woke.bytes_restored == 12 * MIB and woke.bytes_mapped == 20 * MIB
    for p, data in zip(w, expected):
        assert read(p, len(data)) == data
    fill(kv, 8 * MIB, 9)
    for p in w + [kv]:
        devmem.free(p)


def test_per_tag_offload_discard_and_wake():
    with devmem.use_tag("a"):
        a = devmem.malloc(2 * MIB)
    with devmem.use_tag("b"):
        b = devmem.malloc(2 * MIB)
    data = fill(a, 2 * MIB, 1)
    devmem.offload("a")
    devmem.discard(["b"])
    assert devmem.allocation_info(a).state == devmem.State.OFFLOADED
    assert devmem.allocation_info(b).state == devmem.State.DISCARDED
    devmem.wake_up("b")
    assert devmem.allocation_info(a).state == devmem.State.OFFLOADED
    devmem.wake_up(["a"])
    assert read(a, 2 * MIB) == data
    devmem.free(a)
    devmem.free(b)


def test_sleeping_twice_and_waking_twice_are_no_ops():
    with devmem.use_tag("weights"):
        p = devmem.malloc(2 * MIB)
    data = fill(p, 2 * MIB, 4)
    devmem.sleep("weights")
    assert devmem.sleep().allocations == 0
    assert devmem.allocation_info(p).state == devmem.State.OFFLOADED
    devmem.wake_up()
    assert devmem.wake_up().allocations == 0
    assert read(p, 2 * MIB) == data
    devmem.free(p)


def test_unknown_tags_are_no_ops():
    with pytest.warns(devmem.UnknownTagWarning, match="'nobody'"):
        assert devmem.offload("nobody").allocations == 0
    with pytest.warns(devmem.UnknownTagWarning, match="'nobody'"):
        assert devmem.discard(("nobody",)).allocations == 0
    with pytest.warns(devmem.UnknownTagWarning, match="'nobody'"):
        assert devmem.wake_up(["nobody"]).allocations == 0


def test_errors_carry_status_and_message():
    with pytest.raises(devmem.UnknownPointerError, match="not a live devmem allocation") as info:
        devmem.free(0x1234000)
    assert info.value.status == devmem.Status.UNKNOWN_POINTER
    p = devmem.malloc(MIB)
    devmem.free(p)
    with pytest.raises(devmem.UnknownPointerError, match="already freed"):
        devmem.free(p)
    with pytest.raises(devmem.InvalidArgumentError, match="size 0"):
        devmem.malloc(0)
    with pytest.raises(devmem.InvalidArgumentError, match="negative"):
        devmem.malloc(-1)
    with pytest.raises(devmem.InvalidArgumentError, match="overflows"):
        devmem.malloc((1 << 64) - 1)
    with pytest.raises(devmem.InvalidDeviceError, match="out of range"):
        devmem.malloc(MIB, device=7)
    with pytest.raises(TypeError):
        devmem.malloc("1 MiB")
    with pytest.raises(TypeError):
        devmem.free(None)
    with pytest.raises(devmem.UnknownPointerError):
        devmem.allocation_info(0x1234000)
    assert devmem.stats().unknown_frees >= 2


def test_out_of_memory_is_a_memory_error_and_leaves_nothing():
    free_b, _ = devmem.mem_get_info()
    with pytest.raises(devmem.OutOfMemoryError, match="CUDA_ERROR_OUT_OF_MEMORY|ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY|hipErrorOutOfMemory") as info:
        devmem.malloc(free_b + 2 * MIB)
    assert isinstance(info.value, MemoryError)
    assert devmem.mem_get_info()[0] == free_b


def test_wake_out_of_memory_keeps_backups_and_retry_works():
    with devmem.use_tag("weights"):
        w = [devmem.malloc(64 * MIB) for _ in range(2)]
    data = [fill(p, 64 * MIB, i + 3) for i, p in enumerate(w)]
    devmem.sleep("weights")
    free_b, _ = devmem.mem_get_info()
    with devmem.use_tag("blocker"):
        blocker = devmem.malloc(free_b - 64 * MIB)  # room for one of the two
    with pytest.raises(devmem.OutOfMemoryError, match="every backup is kept"):
        devmem.wake_up()
    assert all(devmem.allocation_info(p).state == devmem.State.OFFLOADED for p in w)
    devmem.free(blocker)
    devmem.wake_up()
    assert [read(p, 64 * MIB) for p in w] == data
    for p in w:
        devmem.free(p)


def test_statistics_and_host_store():
    with devmem.use_tag("stats"):
        p = devmem.malloc(4 * MIB)
    s = devmem.stats("stats")
    assert (s.allocations.current, s.mapped_bytes.current) == (1, 4 * MIB)
    devmem.sleep("stats")
    assert devmem.stats().host_store_bytes >= 4 * MIB
    devmem.wake_up()
    devmem.free(p)
    assert devmem.release_host_store() >= 4 * MIB
    assert devmem.stats().host_store_bytes == 0
    assert devmem.stats("never-used").allocations.total == 0


def test_version_granularity_and_devices():
    assert devmem.version() == "0.1.0"
    assert devmem.granularity() == 2 * MIB
    assert devmem.device_count() == 1
    assert devmem.library_path().endswith(".so")


def test_host_limit_fails_a_sleep_cleanly():
    with devmem.use_tag("capped"):
        p = devmem.malloc(16 * MIB)
    devmem.set_host_limit(8 * MIB)
    try:
        assert devmem.host_limit() == 8 * MIB
        with pytest.raises(devmem.HostOutOfMemoryError, match="cap of 8388608 bytes"):
            devmem.offload("capped")
        assert devmem.allocation_info(p).state == devmem.State.MAPPED
        with pytest.raises(TypeError):
            devmem.set_host_limit(-1)
    finally:
        devmem.set_host_limit(0)
    assert devmem.host_limit() == 0
    devmem.offload("capped")
    devmem.wake_up()
    devmem.free(p)


def test_host_policy_and_reserve():
    assert devmem.host_policy() == devmem.HostPolicy.KEEP
    devmem.reserve_host_store(8 * MIB, wait=True)
    assert devmem.stats().host_store_bytes >= 8 * MIB
    devmem.set_host_policy(devmem.HostPolicy.RELEASE)
    try:
        with devmem.use_tag("policy"):
            p = devmem.malloc(4 * MIB)
        devmem.sleep("policy")
        devmem.wake_up()
        assert devmem.stats().host_store_bytes == 0
        devmem.free(p)
        with pytest.raises(devmem.InvalidArgumentError, match="host policy"):
            devmem.set_host_policy(5)
        with pytest.raises(TypeError):
            devmem.set_host_policy("release")
    finally:
        devmem.set_host_policy(devmem.HostPolicy.KEEP)


def test_backend_reported_and_fixed_once_loaded():
    from conftest import HIP, LEVEL_ZERO

    expected = devmem.Backend.LEVEL_ZERO if LEVEL_ZERO else devmem.Backend.HIP if HIP else devmem.Backend.CUDA
    assert devmem.backend() == expected
    other = devmem.Backend.CUDA if LEVEL_ZERO else devmem.Backend.LEVEL_ZERO
    with pytest.raises(devmem.InvalidStateError, match="already in use"):
        devmem.select_backend(other)
    with pytest.raises(TypeError):
        devmem.select_backend("cuda")
    with pytest.raises(devmem.InvalidStateError, match="already loaded"):
        devmem.set_level_zero_context(0x7B000000, [0x7D000000])
    with pytest.raises(TypeError):
        devmem.set_level_zero_context(0x7B000000, ["device"])


@pytest.mark.parametrize("device", [2**32, 2**31, -(2**31) - 1])
def test_device_numbers_outside_a_c_int_are_refused_not_wrapped(device):
    with pytest.raises(devmem.InvalidDeviceError, match="does not fit in a C int"):
        devmem.malloc(4 * MIB, device=device)
    with pytest.raises(devmem.InvalidDeviceError):
        devmem.granularity(device)
    with pytest.raises(devmem.InvalidDeviceError):
        devmem.mem_get_info(device)
