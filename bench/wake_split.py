"""Where a wake's time goes: S1/S2-shaped allocations through devmem's module API, woken
(a) all at once, (b) weights alone then the KV cache alone, (c) all at once after a sleep done
as two calls (offload, then discard). Prints milliseconds and GB/s of the restored bytes.

    PYTHONPATH=bindings/python DEVMEM_LIBRARY=target/release/libdevmem.so python3 bench/wake_split.py
"""

import sys
import time

import torch

import devmem

GIB = 1 << 30
SHAPES = {"S1": (8 * GIB, 256, 16 * GIB, 64), "S2": (4 * GIB, 2048, 4 * GIB, 64)}


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(name):
    w_bytes, w_n, kv_bytes, kv_n = SHAPES[name]
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = [torch.ones(w_bytes // w_n, dtype=torch.uint8, device="cuda") for _ in range(w_n)]
    with alloc.use_memory_pool("kv_cache"):
        kv = [torch.empty(kv_bytes // kv_n, dtype=torch.uint8, device="cuda") for _ in range(kv_n)]
    devmem.sleep(("weights",))
    devmem.wake_up()  # warm the host store
    rows = []
    for _ in range(3):
        devmem.sleep(("weights",))
        all_s = timed(devmem.wake_up)
        devmem.sleep(("weights",))
        w_s = timed(lambda: devmem.wake_up(["weights"]))
        kv_s = timed(lambda: devmem.wake_up(["kv_cache"]))
        devmem.offload(["weights"])
        devmem.discard(["kv_cache"])
        two_s = timed(devmem.wake_up)
        rows.append((all_s, w_s, kv_s, two_s))
    for all_s, w_s, kv_s, two_s in rows:
        print(f"{name}: wake all {all_s * 1e3:7.1f} ms ({w_bytes / all_s / 1e9:5.1f} GB/s) | weights alone "
              f"{w_s * 1e3:7.1f} ms ({w_bytes / w_s / 1e9:5.1f} GB/s) + kv alone {kv_s * 1e3:6.1f} ms | "
              f"after a two-call sleep {two_s * 1e3:7.1f} ms", flush=True)
    sleep_variants(alloc)
    del w, kv
    alloc.release_pools()


def sleep_variants(alloc):
    """CuMemAllocator.sleep's housekeeping (gc, empty_cache) in several placements."""
    import gc

    cls = type(alloc)
    original = cls._collect_and_empty_cache
    for label, gen in (("full gc", 2), ("gc gen 1", 1), ("gc gen 0", 0)):
        t0 = time.perf_counter()
        gc.collect(gen)
        print(f"  {label} alone: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)
    t0 = time.perf_counter()
    torch.cuda.empty_cache()
    print(f"  empty_cache alone: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)

    def run(label, housekeeping, after=None):
        cls._collect_and_empty_cache = staticmethod(housekeeping)
        times = []
        for _ in range(3):
            t = timed(lambda: (alloc.sleep(("weights",)), after and after()))
            devmem.wake_up()
            times.append(t)
        print(f"  class sleep, {label}: " + " ".join(f"{x * 1e3:.1f}" for x in times) + " ms", flush=True)

    run("nothing alongside", lambda: None)
    run("full gc + empty_cache alongside", lambda: (gc.collect(), torch.cuda.empty_cache()))
    run("gc gen 1 + empty_cache alongside", lambda: (gc.collect(1), torch.cuda.empty_cache()))
    run("gc gen 1 alongside, empty_cache after", lambda: gc.collect(1), torch.cuda.empty_cache)
    run("full gc alongside, empty_cache after", gc.collect, torch.cuda.empty_cache)
    cls._collect_and_empty_cache = original


if __name__ == "__main__":
    main(sys.argv[1])
