"""Engine restart without copying: keep GPU memory in the keeper (``devmem-keeper``), attach it
from a new process. Runs the keeper built by cargo next to the library; Level Zero refuses."""

import os
import subprocess
import sys
import textwrap

import pytest

import devmem
from conftest import LEVEL_ZERO


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


def test_identity_that_c_would_truncate_is_refused(tmp_path):
    # ctypes wraps a uint32 field silently and a char* ends at the first NUL: rank 2**32 of
    # world 2**32 + 1 became rank 0 of world 1, "py\0other" became "py" -- another key's memory.
    sock = str(tmp_path / "none" / "keeper.sock")
    for fn in (devmem.keep, devmem.attach, devmem.release_kept):
        with pytest.raises(ValueError):
            fn("weights", instance="py", rank=2**32, world=2**32 + 1, socket=sock)
        with pytest.raises(ValueError):
            fn("weights", instance="py\0other", socket=sock)


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


READER = textwrap.dedent(
    """
    import ctypes, os, sys, time, devmem
    socket, mode, barrier = sys.argv[1], sys.argv[2], sys.argv[3]
    MIB = 1 << 20
    with devmem.use_tag("weights"):
        p = devmem.malloc(4 * MIB)
    devmem.name_range(p, 4 * MIB, "w")
    if mode == "keep":
        ctypes.memset(p, 0x5A, 4 * MIB)
        devmem.keep("weights", instance="ro", socket=socket)
        print("child ok", flush=True)
        sys.exit(0)
    devmem.attach("weights", instance="ro", read_only=True, socket=socket)
    assert ctypes.string_at(p, 4 * MIB) == b"\x5a" * (4 * MIB)
    print("attached", flush=True)
    while not os.path.exists(barrier):
        time.sleep(0.01)
    if mode == "write":
        ctypes.memset(p, 0x00, 1)  # through a read-only mapping: faults here, in the writer
        print("wrote", flush=True)
    else:
        time.sleep(0.5)  # the writer has faulted by now
        assert ctypes.string_at(p, 4 * MIB) == b"\x5a" * (4 * MIB), "the reader's bytes changed"
        print("child ok", flush=True)
    """
)


@pytest.mark.skipif(LEVEL_ZERO, reason="Level Zero cannot export physical memory")
def test_read_only_sharing_a_write_faults_only_the_writer(keeper, tmp_path):
    """Two processes map the same kept memory read-only; one writes through its mapping and
    faults (the emulator maps PROT_READ as the driver does with CU_MEM_ACCESS_FLAGS_PROT_READ);
    the other's bytes, and the kept memory, stay as they were."""
    barrier = str(tmp_path / "go")

    def child(mode):
        return subprocess.Popen([sys.executable, "-c", READER, keeper, mode, barrier], env=dict(os.environ),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    k = child("keep")
    out, err = k.communicate(timeout=120)
    assert k.returncode == 0 and "child ok" in out, err
    writer, reader = child("write"), child("read")
    for proc in (writer, reader):
        assert proc.stdout.readline().strip() == "attached", proc.stderr.read()
    open(barrier, "w").close()
    wout, werr = writer.communicate(timeout=120)
    rout, rerr = reader.communicate(timeout=120)
    assert writer.returncode == -11 and "wrote" not in wout, (writer.returncode, wout, werr)
    assert reader.returncode == 0 and "child ok" in rout, rerr
    # The kept bytes are intact for the next process too.
    os.unlink(barrier)
    again = child("read")
    assert again.stdout.readline().strip() == "attached", again.stderr.read()
    open(barrier, "w").close()
    aout, aerr = again.communicate(timeout=120)
    assert again.returncode == 0 and "child ok" in aout, aerr
