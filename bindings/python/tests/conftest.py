"""Test setup: devmem runs against the CUDA driver emulator unless DEVMEM_TEST_REAL_DRIVER=1.

The library and emulator paths come from the environment or the repository's cargo build.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
RELEASE = ROOT / "target" / "release"

# DEVMEM_TEST_BUNDLED=1: test the library that `pip install` bundled with the package.
BUNDLED = os.environ.get("DEVMEM_TEST_BUNDLED") == "1"
if not BUNDLED and "DEVMEM_LIBRARY" not in os.environ and (RELEASE / "libdevmem.so").exists():
    os.environ["DEVMEM_LIBRARY"] = str(RELEASE / "libdevmem.so")
if os.environ.get("DEVMEM_TEST_REAL_DRIVER") != "1":
    if BUNDLED:
        # The installed package's own emulator (pip bundles it next to libdevmem.so).
        os.environ.setdefault("DEVMEM_EMULATOR", "1")
    else:
        os.environ.setdefault("DEVMEM_CUDA_LIBRARY", str(RELEASE / "libdevmem_cuda_emu.so"))
    os.environ.setdefault("DEVMEM_EMU_CAPACITY", "2G")
    # The tests count the host store's bytes exactly; growing it ahead of need in the background
    # would race with those counts (tests of growing ahead turn it on themselves).
    os.environ.setdefault("DEVMEM_HOST_GROW_AHEAD", "0")
    # DEVMEM_TEST_BACKEND=level_zero: the same tests on the emulator's Level Zero face.
    if os.environ.get("DEVMEM_TEST_BACKEND") == "level_zero":
        os.environ.setdefault("DEVMEM_BACKEND", "level_zero")
        os.environ.setdefault("DEVMEM_ZE_LIBRARY", str(RELEASE / "libdevmem_cuda_emu.so"))
    # DEVMEM_TEST_BACKEND=hip: on the emulator's HIP face (chunks and re-reserving on).
    if os.environ.get("DEVMEM_TEST_BACKEND") == "hip":
        os.environ.setdefault("DEVMEM_BACKEND", "hip")
        os.environ.setdefault("DEVMEM_HIP_LIBRARY", str(RELEASE / "libdevmem_cuda_emu.so"))
LEVEL_ZERO = os.environ.get("DEVMEM_BACKEND") == "level_zero"
HIP = os.environ.get("DEVMEM_BACKEND") == "hip"
#: Only CUDA has a device checksum (its kernel is PTX).
CHECKSUM = not (LEVEL_ZERO or HIP)

EMULATED = os.environ.get("DEVMEM_TEST_REAL_DRIVER") != "1"
HEADER = ROOT / "include" / "devmem.h"


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Every test frees what it allocates, so tests can share one process."""
    import devmem

    yield
    leftover = devmem.allocations()
    for a in leftover:
        devmem.free(a.ptr)
    devmem.set_current_tag(devmem.DEFAULT_TAG)
    assert not leftover, f"test left allocations behind: {leftover}"


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
