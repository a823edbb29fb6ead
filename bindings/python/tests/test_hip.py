"""The HIP backend from Python, each case in a fresh interpreter on the emulator's HIP face:
chunked physical memory listed in vLLM's ROCm handle form, and ``DEVMEM_EMULATOR=hip``."""

import json

from test_environment import run_clean

CODE = """
import json, ctypes
import devmem
from devmem.allocator import AllocationData
with devmem.use_tag('weights'):
    p = devmem.malloc(10 << 20)
ctypes.memset(p, 7, 10 << 20)
awake = AllocationData.of(devmem.allocation_info(p))
devmem.sleep(('weights',))
asleep = AllocationData.of(devmem.allocation_info(p))
devmem.wake_up()
ok = ctypes.string_at(p, 10 << 20) == b'\\x07' * (10 << 20)
print(json.dumps({'backend': devmem.backend().name, 'chunks': devmem.allocation_chunks(p),
                  'awake': awake.handle, 'asleep': asleep.handle, 'bytes_kept': ok}))
devmem.free(p)
"""


def test_chunks_are_reported_in_vllms_rocm_form():
    out = run_clean(CODE, DEVMEM_EMULATOR="hip", DEVMEM_CHUNK_SIZE="4M")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["backend"] == "HIP"
    assert got["bytes_kept"]
    assert [size for _, size in got["chunks"]] == [4 << 20, 4 << 20, 2 << 20]
    device, size, ptr, chunks = got["awake"]
    assert (device, size) == (0, 10 << 20)
    assert [tuple(c) for c in chunks] != [] and [c[1] for c in chunks] == [4 << 20, 4 << 20, 2 << 20]
    assert got["asleep"][3] == []


def test_cuda_keeps_the_integer_handle():
    out = run_clean(CODE, DEVMEM_EMULATOR="cuda")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["backend"] == "CUDA"
    assert len(got["chunks"]) == 1 and got["chunks"][0][1] == 10 << 20
    assert isinstance(got["awake"][3], int) and got["awake"][3] != 0  # a new handle after the wake
    assert got["asleep"][3] == 0


def test_a_bad_chunk_size_is_a_clear_error():
    out = run_clean("import devmem\ndevmem.malloc(1 << 20)\n", DEVMEM_EMULATOR="hip", DEVMEM_CHUNK_SIZE="big")
    assert out.returncode != 0
    assert "InvalidArgumentError" in out.stderr and "DEVMEM_CHUNK_SIZE=big" in out.stderr


def test_a_rocm_build_of_pytorch_selects_the_hip_backend():
    import types

    import devmem
    from conftest import HIP
    from devmem.allocator import select_torch_backend, torch_backend

    rocm = types.SimpleNamespace(version=types.SimpleNamespace(hip="6.4.43483", cuda=None))
    cuda = types.SimpleNamespace(version=types.SimpleNamespace(hip=None, cuda="13.0"))
    assert torch_backend(rocm) == devmem.Backend.HIP
    assert torch_backend(cuda) is None
    select_torch_backend(cuda)  # nothing to choose
    if HIP:
        select_torch_backend(rocm)  # already HIP: fine
    else:
        import os

        saved = os.environ.pop("DEVMEM_BACKEND", None)
        try:
            devmem.backend()  # loaded on another backend
            import pytest

            with pytest.raises(devmem.InvalidStateError, match="ROCm build .* must use its hip backend"):
                select_torch_backend(rocm)
        finally:
            if saved is not None:
                os.environ["DEVMEM_BACKEND"] = saved
