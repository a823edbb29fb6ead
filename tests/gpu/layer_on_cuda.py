"""The driver-workaround layer (issue 14: chunks and zero-on-wake) on a real GPU. HIP turns it on
by default; there is no AMD GPU to run it on, so this runs the same layer over the CUDA driver,
through devmem's CuMemAllocator, and checks what the emulator checks (re-reserving ranges is
HIP's alone: docs/hip.md says why):

* an allocation of 1 GiB + 6 MiB is 5 chunks of 256 MiB (the last 6 MiB), listed by
  ``devmem.allocation_chunks`` with their real driver handles;
* a sleep returns every byte to the driver (``torch.cuda.mem_get_info``), every address kept;
* the wake restores the weights bit for bit and the discarded KV cache comes back as zeros
  (cuMemsetD8Async) after it was filled with 0x5A;
* a CUDA graph captured before the sleep replays after the wake.

    DEVMEM_LIBRARY=build/prefix/lib/libdevmem.so DEVMEM_CHUNK_SIZE=256M DEVMEM_ZERO_ON_WAKE=1 \\
        PYTHONPATH=bindings/python python3 tests/gpu/layer_on_cuda.py
"""

import sys
import time

import torch

import devmem

MIB = 1 << 20


def main() -> int:
    for name in ("DEVMEM_CHUNK_SIZE", "DEVMEM_ZERO_ON_WAKE"):
        assert name in __import__("os").environ, f"set {name} (see the docstring)"
    alloc = devmem.CuMemAllocator.get_instance()
    n = (1024 + 6) * MIB
    with alloc.use_memory_pool(tag="weights"):
        w = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    with alloc.use_memory_pool(tag="kv_cache"):
        kv = torch.full((n,), 0x5A, dtype=torch.uint8, device="cuda")
    expected = w.clone().cpu()
    ptr_w, ptr_kv = w.data_ptr(), kv.data_ptr()
    chunks = devmem.allocation_chunks(ptr_w)
    print("chunks of the weights:", [(hex(h), s // MIB) for h, s in chunks], "MiB")
    assert [s for _, s in chunks] == [256 * MIB] * 4 + [6 * MIB], chunks

    graph = torch.cuda.CUDAGraph()
    out = torch.zeros(1, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out.copy_(w[:4096].to(torch.int64).sum().reshape(1))
    torch.cuda.synchronize()

    free0, _ = torch.cuda.mem_get_info()
    t = time.perf_counter()
    alloc.sleep(offload_tags=("weights",))
    slept = time.perf_counter() - t
    free1, _ = torch.cuda.mem_get_info()
    print(f"sleep {slept:.3f} s, freed {(free1 - free0) / MIB:.0f} MiB")
    assert free1 - free0 >= 0.99 * 2 * n, "every byte back to the driver"
    t = time.perf_counter()
    alloc.wake_up()
    woke = time.perf_counter() - t
    print(f"wake {woke:.3f} s")
    assert (w.data_ptr(), kv.data_ptr()) == (ptr_w, ptr_kv)
    assert torch.equal(w.cpu(), expected), "weights restored bit for bit"
    assert int(kv.count_nonzero()) == 0, "the discarded KV cache is zeros"
    graph.replay()
    torch.cuda.synchronize()
    assert int(out.item()) == int(expected[:4096].to(torch.int64).sum()), "graph replays"
    print("layer on CUDA: chunks, zero-on-wake and graph replay OK")
    del w, kv, out, graph
    return 0


if __name__ == "__main__":
    sys.exit(main())
