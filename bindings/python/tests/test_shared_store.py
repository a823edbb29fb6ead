"""The shared host store, durable restore and read-only tags from Python."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

import devmem
from conftest import CHECKSUM, EMULATED

MIB = 1 << 20


def region_path(name):
    return f"/dev/shm/devmem-{os.geteuid()}/devmem-{name}.region"


def write(ptr, data):
    ctypes.memmove(ptr, data, len(data))


def read(ptr, n):
    return ctypes.string_at(ptr, n)


pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")


def test_round_trip_through_the_region_and_cleanup():
    name = f"py-{os.getpid()}-roundtrip"
    devmem.open_shared_store(name, 32 * MIB)
    try:
        assert os.path.exists(region_path(name))
        with devmem.use_tag("weights"):
            p = devmem.malloc(4 * MIB)
        data = os.urandom(4 * MIB)
        write(p, data)
        devmem.sleep(["weights"])
        devmem.wake_up()
        assert read(p, 4 * MIB) == data
        devmem.free(p)
    finally:
        devmem.close_shared_store()
    assert not os.path.exists(region_path(name))
    with pytest.raises(devmem.InvalidStateError, match="no shared store is open"):
        devmem.close_shared_store()


def test_bad_arguments():
    with pytest.raises(devmem.InvalidArgumentError, match="'/' or '..'"):
        devmem.open_shared_store("a/b", MIB)
    with pytest.raises(devmem.InvalidArgumentError, match="printable ASCII"):
        devmem.open_shared_store("caf\u00e9", MIB)
    with pytest.raises(TypeError):
        devmem.open_shared_store("x", -1)
    with pytest.raises(devmem.InvalidArgumentError, match="too large"):
        devmem.open_shared_store("x", MIB, rank=2**32)
    with pytest.raises(devmem.InvalidArgumentError, match="rank 1 is not below"):
        devmem.open_shared_store("x", MIB, rank=1, world=1)
    with pytest.raises(devmem.InvalidStateError, match="no shared store is open"):
        devmem.restore_from_store("weights")


def test_a_lone_surrogate_in_a_tag_is_an_invalid_tag():
    with pytest.raises(devmem.InvalidTagError, match="not valid Unicode text"):
        devmem.set_current_tag("bad\ud800")
    with pytest.raises(devmem.InvalidTagError, match="not valid Unicode text"):
        devmem.set_read_only("bad\ud800")


def test_read_only_tags_skip_the_copy():
    with devmem.use_tag("ro-weights"):
        p = devmem.malloc(4 * MIB)
    data = os.urandom(4 * MIB)
    write(p, data)
    devmem.set_read_only("ro-weights")
    assert devmem.read_only("ro-weights") == devmem.ReadOnly.ON
    assert devmem.sleep(["ro-weights"]).bytes_saved == 4 * MIB
    devmem.wake_up()
    second = devmem.sleep(["ro-weights"])
    assert (second.bytes_saved, second.bytes_skipped) == (0, 4 * MIB)
    devmem.wake_up()
    assert read(p, 4 * MIB) == data
    if not CHECKSUM:
        with pytest.raises(devmem.UnsupportedError, match="no device checksum"):
            devmem.set_read_only("ro-weights", devmem.ReadOnly.VERIFY)
    else:
        devmem.set_read_only("ro-weights", devmem.ReadOnly.VERIFY)
        # ON verified already where the backend can checksum: the kept copy has a checksum.
        same = devmem.sleep(["ro-weights"])
        assert (same.bytes_saved, same.bytes_skipped) == (0, 4 * MIB)
        devmem.wake_up()
        write(p, b"\x01" * 8)
        changed = devmem.sleep(["ro-weights"])
        assert (changed.verify_mismatches, changed.bytes_saved) == (1, 4 * MIB)
        devmem.wake_up()
        assert read(p, 8) == b"\x01" * 8
    devmem.set_read_only("ro-weights", False)
    devmem.free(p)


CHILD = textwrap.dedent(
    """
    import ctypes, sys, devmem
    name, mode = sys.argv[1], sys.argv[2]
    MIB = 1 << 20
    devmem.open_shared_store(name, 32 * MIB, keep=(mode == "write"))
    with devmem.use_tag("weights"):
        if mode == "write":
            ptrs = [devmem.malloc(n * MIB) for n in (4, 2)]
        else:  # the other order: names, not order, decide where bytes go
            small, big = devmem.malloc(2 * MIB), devmem.malloc(4 * MIB)
            ptrs = [big, small]
    devmem.name_range(ptrs[0], 4 * MIB, "big")
    devmem.name_range(ptrs[1], 2 * MIB, "small")
    if mode == "write":
        for i, p in enumerate(ptrs):
            ctypes.memset(p, 0x40 + i, ctypes.sizeof(ctypes.c_char) * (4 - 2 * i) * MIB)
        devmem.sleep(["weights"])
    else:
        try:
            devmem.restore_from_store("weights", rank=1, world=1)
            raise AssertionError("a wrong rank was accepted")
        except devmem.RegionError as err:
            assert "rank 1 of 1" in str(err), err
        try:
            devmem.restore_from_store("weights", by_order=True)
            raise AssertionError("swapped order was accepted")
        except devmem.RegionError as err:
            assert "was allocated with" in str(err), err
        t = devmem.restore_from_store("weights")
        assert t.bytes_restored == 6 * MIB, t
        for i, p in enumerate(ptrs):
            n = (4 - 2 * i) * MIB
            assert ctypes.string_at(p, n) == bytes([0x40 + i]) * n, i
        for p in ptrs:
            devmem.free(p)
    print("child ok")
    """
)


def test_durable_restart_from_python():
    name = f"py-{os.getpid()}-durable"
    env = dict(os.environ)
    for mode in ("write", "read"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, name, mode], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and "child ok" in out.stdout, out.stderr
        # The writer kept it (and exited asleep); the reader closed it at exit as last user.
        assert os.path.exists(region_path(name)) == (mode == "write")


def test_a_store_opened_by_the_environment_is_closed_at_exit():
    name = f"py-{os.getpid()}-env"
    code = (
        "import devmem\n"
        "with devmem.use_tag('weights'):\n"
        "    p = devmem.malloc(4 << 20)\n"
        "devmem.sleep(['weights'])\n"
        f"import os; assert os.path.exists({region_path(name)!r})\n"
        "devmem.wake_up(); devmem.free(p)\n"
    )
    env = dict(os.environ, DEVMEM_SHARED_STORE=name, DEVMEM_SHARED_BYTES="16M")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(region_path(name)), "the last process removed the region at exit"


class FakeTensor:
    """What name_tensors reads of a torch.Tensor."""

    def __init__(self, ptr, shape, dtype="torch.float16", size=2, contiguous=True):
        self.ptr, self.shape, self.dtype, self.size, self.contiguous = ptr, shape, dtype, size, contiguous

    def data_ptr(self):
        return self.ptr

    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self):
        return self.size

    def is_contiguous(self):
        return self.contiguous


def test_name_tensors_names_each_tensor_by_name_dtype_and_shape():
    with devmem.use_tag("weights"):
        p = devmem.malloc(2 * MIB)
    try:
        named = {"a.weight": FakeTensor(p, [4, 8]), "a.bias": FakeTensor(p + 512, [8])}
        assert devmem.name_tensors(named) == 2
        assert devmem.tensor_key("a.weight", named["a.weight"]) == "a.weight|float16|[4, 8]"
        with pytest.raises(ValueError, match="'x' is not contiguous"):
            devmem.name_tensors([("x", FakeTensor(p, [2], contiguous=False))])
        with pytest.raises(devmem.UnknownPointerError, match="tensor 'cpu'"):
            devmem.name_tensors([("cpu", FakeTensor(16, [2]))])
        with pytest.raises(devmem.InvalidArgumentError, match="tensor 'big'.*runs past"):
            devmem.name_tensors([("big", FakeTensor(p, [2 * MIB]))])
    finally:
        devmem.free(p)


def test_shared_store_durable_asks_the_library_not_the_environment(monkeypatch):
    monkeypatch.setenv("DEVMEM_SHARED_STORE", "never-opened")
    monkeypatch.setenv("DEVMEM_SHARED_KEEP", "1")
    assert devmem.shared_store_info() is None
    assert not devmem.shared_store_durable()
    name = f"py-{os.getpid()}-info"
    devmem.open_shared_store(name, 8 * MIB, keep=True)
    try:
        info = devmem.shared_store_info()
        assert (info.path, info.rank, info.world, info.kept) == (region_path(name), 0, 1, True)
        assert devmem.shared_store_durable()
    finally:
        devmem.close_shared_store()
        os.unlink(region_path(name))
    assert not devmem.shared_store_durable()


def test_a_wrong_local_rank_is_refused_before_anything_is_copied(monkeypatch):
    name = f"py-{os.getpid()}-localrank"
    devmem.open_shared_store(name, 8 * MIB, rank=0, world=2)
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(devmem.RegionError, match="rank 1 of 2, but .* rank 0 of 2"):
            devmem.restore_from_store("weights")
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(devmem.InvalidArgumentError, match="no live allocation"):
            devmem.restore_from_store("weights")  # past the identity check
    finally:
        devmem.close_shared_store()


def test_clear_names_forgets_a_tags_names():
    with devmem.use_tag("weights"):
        p = devmem.malloc(2 * MIB)
    try:
        devmem.name_range(p, 8, "a")
        devmem.name_range(p + 8, 8, "b")
        with pytest.raises(devmem.InvalidArgumentError, match="contains NUL"):
            devmem.name_range(p, 8, "a\0b")
        assert devmem.clear_names("weights") == 2
        assert devmem.clear_names() == 0
    finally:
        devmem.free(p)


def test_a_wrong_local_rank_is_refused_for_a_store_the_environment_names(monkeypatch):
    monkeypatch.setenv("DEVMEM_SHARED_STORE", f"py-{os.getpid()}-envrank")
    monkeypatch.setenv("DEVMEM_SHARED_BYTES", "8M")
    monkeypatch.setenv("DEVMEM_SHARED_RANK", "0")
    monkeypatch.setenv("DEVMEM_SHARED_WORLD", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(devmem.RegionError, match="rank 1 of 2, but .* rank 0 of 2"):
        devmem.restore_from_store("weights")
    assert devmem.shared_store_info() is None, "refused before the store was opened"
