"""PyTorch smoke test on a real GPU: devmem as CUDAPluggableAllocator inside a MemPool.

Tensors under "weights" and "kv_cache"; sleep offloading "weights"; torch.cuda.mem_get_info
shows the memory returned; wake; every weight byte identical; the KV tensors usable; a CUDA
graph captured before sleep replays after wake. Exits non-zero on any failure.

    DEVMEM_LIBRARY=target/release/libdevmem.so python3 tests/gpu/torch_smoke.py [GiB]
"""

import ctypes
import os
import sys
import time

import torch

GIB = 1 << 30


def main() -> int:
    path = os.path.abspath(os.environ.get("DEVMEM_LIBRARY", "target/release/libdevmem.so"))
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    lib = ctypes.CDLL(path)
    lib.devmem_set_current_tag.argtypes = [ctypes.c_char_p]
    lib.devmem_sleep.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t]
    lib.devmem_wake_up.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t]
    lib.devmem_last_error_message.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.devmem_last_error_message.restype = ctypes.c_size_t

    def check(status: int, what: str) -> None:
        if status != 0:
            buf = ctypes.create_string_buffer(2048)
            lib.devmem_last_error_message(buf, len(buf))
            raise RuntimeError(f"{what}: status {status}: {buf.value.decode()}")

    torch.cuda.init()
    allocator = torch.cuda.memory.CUDAPluggableAllocator(path, "my_malloc", "my_free")
    pool = torch.cuda.MemPool(allocator.allocator())

    n_w = 32
    w_elems = int(gib * GIB / 2 / n_w) // 4
    kv_elems = int(gib * GIB / 2 / 8) // 2
    with torch.cuda.use_mem_pool(pool):
        check(lib.devmem_set_current_tag(b"weights"), "set tag")
        gen = torch.Generator(device="cuda").manual_seed(1234)
        weights = [torch.randn(w_elems, device="cuda", generator=gen) for _ in range(n_w)]
        check(lib.devmem_set_current_tag(b"kv_cache"), "set tag")
        kv = [torch.empty(kv_elems, dtype=torch.float16, device="cuda") for _ in range(8)]
        check(lib.devmem_set_current_tag(b"weights"), "set tag")
        static_out = torch.empty(w_elems, device="cuda")
    torch.cuda.synchronize()
    reference = [w.cpu() for w in weights]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    kv_bytes = sum(t.numel() * t.element_size() for t in kv)

    # A CUDA graph captured on devmem memory before sleep must replay after wake.
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        static_out.copy_(weights[0] * 2 + weights[1])  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            static_out.copy_(weights[0] * 2 + weights[1])
    torch.cuda.synchronize()
    graph_reference = (reference[0] * 2 + reference[1])

    free_awake, total = torch.cuda.mem_get_info()
    tags = (ctypes.c_char_p * 1)(b"weights")
    t0 = time.perf_counter()
    check(lib.devmem_sleep(tags, 1), "devmem_sleep")
    sleep_s = time.perf_counter() - t0
    free_asleep, _ = torch.cuda.mem_get_info()
    freed = free_asleep - free_awake

    t0 = time.perf_counter()
    check(lib.devmem_wake_up(None, 0), "devmem_wake_up")
    wake_s = time.perf_counter() - t0
    free_woken, _ = torch.cuda.mem_get_info()

    identical = all(torch.equal(w.cpu(), r) for w, r in zip(weights, reference))
    for t in kv:
        t.fill_(1.5)
    kv_ok = all(float(t.float().sum()) == 1.5 * t.numel() for t in kv)
    graph.replay()
    torch.cuda.synchronize()
    graph_ok = torch.equal(static_out.cpu(), graph_reference)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"weights {weight_bytes / GIB:.2f} GiB in {n_w} tensors, kv cache {kv_bytes / GIB:.2f} GiB in 8 tensors")
    print(f"mem_get_info free: awake {free_awake / GIB:.2f} GiB, asleep {free_asleep / GIB:.2f} GiB "
          f"(+{freed / GIB:.2f} GiB), woken {free_woken / GIB:.2f} GiB, total {total / GIB:.2f} GiB")
    print(f"sleep {sleep_s:.3f} s ({weight_bytes / sleep_s / 1e9:.1f} GB/s of offloaded weights), "
          f"wake {wake_s:.3f} s ({weight_bytes / wake_s / 1e9:.1f} GB/s)")
    print(f"weight bytes identical after wake: {identical} ({weight_bytes} bytes checked)")
    print(f"kv cache usable after wake: {kv_ok}; CUDA graph replay after wake correct: {graph_ok}")
    ok = identical and kv_ok and graph_ok and freed >= (weight_bytes + kv_bytes) * 0.99

    del graph, weights, kv, static_out, reference
    torch.cuda.synchronize()
    del pool, allocator
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
