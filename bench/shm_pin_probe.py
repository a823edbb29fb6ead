"""What a durable restore pays before its copies: mapping, populating and pinning a region of
/dev/shm that already holds the bytes (a second process), and how pinning scales with threads.

    python3 bench/shm_pin_probe.py [GiB]       (prints one line per measurement)

Uses libcuda through ctypes only (no devmem), so it measures the driver and the kernel.
"""

import ctypes
import mmap
import os
import subprocess
import sys
import threading
import time

GIB = 1 << 30
PIECE = 256 << 20
cu = ctypes.CDLL("libcuda.so.1")
c_size = ctypes.c_size_t


def ck(rc, what):
    if rc != 0:
        raise SystemExit(f"{what} failed: {rc}")


def context():
    ck(cu.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    ck(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    ck(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
    ck(cu.cuCtxSetCurrent(ctx), "set")
    return ctx


def mapped(path, n):
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    return mm, ctypes.addressof(ctypes.c_char.from_buffer(mm))


def register(base, n, threads, ctx):
    pieces = [(base + off, min(PIECE, n - off)) for off in range(0, n, PIECE)]
    todo = list(pieces)
    lock = threading.Lock()

    def work():
        cu.cuCtxSetCurrent(ctx)
        while True:
            with lock:
                if not todo:
                    return
                p, m = todo.pop()
            ck(cu.cuMemHostRegister_v2(ctypes.c_void_p(p), c_size(m), 0), "register")

    t = time.perf_counter()
    if threads == 0:
        ck(cu.cuMemHostRegister_v2(ctypes.c_void_p(base), c_size(n), 0), "register whole")
        pieces = [(base, n)]
    else:
        ws = [threading.Thread(target=work) for _ in range(threads)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
    return time.perf_counter() - t, pieces


def second_process(path, n, threads, populate):
    ctx = context()
    t0 = time.perf_counter()
    mm, base = mapped(path, n)
    t1 = time.perf_counter()
    if populate:
        # `populate` threads, each faulting in every populate-th 256 MiB piece.
        advise = getattr(mmap, "MADV_POPULATE_WRITE", 23)
        libc = ctypes.CDLL(None, use_errno=True)

        def fault(k):
            for off in range(k * PIECE, n, PIECE * populate):
                libc.madvise(ctypes.c_void_p(base + off), c_size(min(PIECE, n - off)), advise)

        ws = [threading.Thread(target=fault, args=(k,)) for k in range(populate)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
    t2 = time.perf_counter()
    reg, pieces = register(base, n, threads, ctx)
    # H2D copies of the whole range, one per registered piece (a copy may not cross from one
    # registration into another: the driver refuses it with CUDA_ERROR_INVALID_VALUE).
    dptr = ctypes.c_uint64()
    ck(cu.cuMemAlloc_v2(ctypes.byref(dptr), c_size(n)), "alloc")
    stream = ctypes.c_void_p()
    ck(cu.cuStreamCreate(ctypes.byref(stream), 1), "stream")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for p, m in pieces:
            ck(cu.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(dptr.value + p - base), ctypes.c_void_p(p), c_size(m), stream),
               "copy")
        ck(cu.cuStreamSynchronize(stream), "sync")
        times.append(time.perf_counter() - t)
    t3 = time.perf_counter()
    for p, _ in pieces:
        cu.cuMemHostUnregister(ctypes.c_void_p(p))
    t4 = time.perf_counter()
    print(f"register threads={threads:2d} populate threads={populate:2d}: mmap {1e3 * (t1 - t0):6.1f} ms, populate "
          f"{1e3 * (t2 - t1):6.1f} ms, register {1e3 * reg:7.1f} ms ({len(pieces)} piece(s)), "
          f"H2D {n / min(times) / 1e9:5.1f} GB/s piece by piece, unregister {1e3 * (t4 - t3):6.1f} ms", flush=True)


def vmm(n):
    context()
    # CUmemAllocationProp as ints: type PINNED (1), handle types 0, location DEVICE (1), id 0.
    prop = (ctypes.c_int * 16)(1, 0, 1, 0)
    va = ctypes.c_uint64()
    ck(cu.cuMemAddressReserve(ctypes.byref(va), c_size(n), c_size(2 << 20), ctypes.c_uint64(0), ctypes.c_uint64(0)),
       "reserve")
    h = ctypes.c_uint64()
    t0 = time.perf_counter()
    ck(cu.cuMemCreate(ctypes.byref(h), c_size(n), prop, ctypes.c_uint64(0)), "create")
    t1 = time.perf_counter()
    ck(cu.cuMemMap(va, c_size(n), c_size(0), h, ctypes.c_uint64(0)), "map")
    t2 = time.perf_counter()
    desc = (ctypes.c_int * 3)(1, 0, 3)  # location type device, id 0, flags read-write
    ck(cu.cuMemSetAccess(va, c_size(n), desc, c_size(1)), "access")
    t3 = time.perf_counter()
    print(f"VMM {n / GIB:.0f} GiB: cuMemCreate {1e3 * (t1 - t0):.1f} ms, cuMemMap {1e3 * (t2 - t1):.1f} ms, "
          f"cuMemSetAccess {1e3 * (t3 - t2):.1f} ms", flush=True)


def main():
    if len(sys.argv) > 2:
        mode = sys.argv[2]
        n = int(sys.argv[1]) * GIB
        if mode == "vmm":
            return vmm(n)
        return second_process(sys.argv[3], n, int(mode), int(sys.argv[4]))
    n = int(sys.argv[1] if len(sys.argv) > 1 else 8) * GIB
    path = f"/dev/shm/probe-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, n)
    os.posix_fallocate(fd, 0, n)
    os.close(fd)
    mm, _ = mapped(path, n)
    t = time.perf_counter()
    mm.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
    print(f"first process: populate {n / GIB:.0f} GiB of new pages {1e3 * (time.perf_counter() - t):.1f} ms",
          flush=True)
    mm.close()
    try:
        for threads, populate in ((0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (1, 4)):
            subprocess.run([sys.executable, __file__, str(n // GIB), str(threads), path, str(populate)], check=True)
        subprocess.run([sys.executable, __file__, str(n // GIB), "vmm"], check=True)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
