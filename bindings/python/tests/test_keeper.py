"""Engine restart without copying: keep GPU memory in the keeper (``devmem-keeper``), attach it
from a new process. Runs the keeper built by cargo next to the library; Level Zero refuses."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import devmem
from conftest import LEVEL_ZERO, ROOT


def keeper_binary():
    lib = os.environ.get("DEVMEM_LIBRARY")
    for d in ([pathlib.Path(lib).parent] if lib else []) + [ROOT / "target" / "release", ROOT / "target" / "debug"]:
        if (d / "devmem-keeper").exists():
            return d / "devmem-keeper"
    return None


@pytest.fixture
def keeper():
    binary = keeper_binary()
    if binary is None:
        pytest.skip("devmem-keeper is not built (cargo build --release --workspace)")
    d = pathlib.Path(tempfile.mkdtemp(prefix="devmem-pykeeper-"))
    socket = d / "k" / "keeper.sock"
    proc = subprocess.Popen([str(binary), "serve", "--socket", str(socket)], stdin=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not socket.exists():
        assert time.time() < deadline, "keeper never started"
        time.sleep(0.02)
    time.sleep(0.1)
    yield str(socket)
    proc.kill()
    proc.wait()
    shutil.rmtree(d, ignore_errors=True)


CHILD = textwrap.dedent(
    """
    import ctypes, sys, devmem
    socket, mode = sys.argv[1], sys.argv[2]
    MIB = 1 << 20
    with devmem.use_tag("weights"):
        if mode == "keep":
            ptrs = [devmem.malloc(n * MIB) for n in (4, 2)]
        else:  # the other order: names, not order, decide
            small, big = devmem.malloc(2 * MIB), devmem.malloc(4 * MIB)
            ptrs = [big, small]
    devmem.name_range(ptrs[0], 4 * MIB, "big")
    devmem.name_range(ptrs[1], 2 * MIB, "small")
    if mode == "keep":
        for i, p in enumerate(ptrs):
            ctypes.memset(p, 0x40 + i, (4 - 2 * i) * MIB)
        devmem.keep("weights", instance="py", socket=socket)
    else:
        try:
            devmem.attach("weights", instance="py", rank=1, world=2, socket=socket)
            raise AssertionError("a wrong rank was accepted")
        except devmem.DevmemError as err:
            assert "does not hold" in str(err), err
        t = devmem.attach("weights", instance="py", socket=socket)
        assert t.bytes_restored == 0 and t.allocations == 2, t
        for i, p in enumerate(ptrs):
            n = (4 - 2 * i) * MIB
            assert ctypes.string_at(p, n) == bytes([0x40 + i]) * n, i
        for p in ptrs:
            devmem.free(p)
        assert devmem.release_kept("weights", instance="py", socket=socket) == 6 * MIB
    print("child ok")
    """
)


@pytest.mark.skipif(LEVEL_ZERO, reason="Level Zero cannot export physical memory")
def test_keep_then_attach_from_a_new_process(keeper):
    for mode in ("keep", "attach"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, keeper, mode], env=dict(os.environ), capture_output=True, text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "child ok" in out.stdout, out.stderr


def test_bad_identity_is_refused():
    with pytest.raises(ValueError):
        devmem.keep("weights", instance="")
    with pytest.raises(ValueError):
        devmem.attach("weights", instance="x", rank=1, world=1)
    with pytest.raises(ValueError):
        devmem.release_kept("weights", instance="x", rank=-1)


def test_no_keeper_is_a_clear_error(tmp_path):
    with devmem.use_tag("py-nokeeper"):
        p = devmem.malloc(2 << 20)
    devmem.name_range(p, 2 << 20, "x")
    try:
        with pytest.raises(devmem.DevmemError) as err:
            devmem.keep("py-nokeeper", instance="py", socket=str(tmp_path / "none" / "keeper.sock"))
        assert "keeper" in str(err.value)
    finally:
        devmem.free(p)


def test_keeper_available(keeper, tmp_path):
    assert devmem.keeper_available(keeper)
    assert not devmem.keeper_available(str(tmp_path / "nothing.sock"))
