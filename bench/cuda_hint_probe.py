"""Does cuMemAddressReserve place a reservation at the address it is given? (Issue 14: the
re-reserve workaround ROCm needs relies on it.) Reserves, frees and asks for the same range
again, with and without alignment, small and large, and with a range devmem never had.

    python3 bench/cuda_hint_probe.py
"""
import ctypes

cu = ctypes.CDLL("libcuda.so.1")
assert cu.cuInit(0) == 0
dev = ctypes.c_int()
ctx = ctypes.c_void_p()
assert cu.cuDeviceGet(ctypes.byref(dev), 0) == 0
assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
assert cu.cuCtxSetCurrent(ctx) == 0


def reserve(size, align, hint):
    p = ctypes.c_uint64()
    rc = cu.cuMemAddressReserve(ctypes.byref(p), ctypes.c_size_t(size), ctypes.c_size_t(align),
                                ctypes.c_uint64(hint), ctypes.c_uint64(0))
    return rc, p.value


def free(a, size):
    return cu.cuMemAddressFree(ctypes.c_uint64(a), ctypes.c_size_t(size))


for size in (2 << 20, 64 << 20, 1 << 30):
    for align in (0, 2 << 20):
        rc, a = reserve(size, align, 0)
        assert rc == 0
        assert free(a, size) == 0
        rc2, b = reserve(size, align, a)
        print(f"size {size >> 20} MiB align {align >> 20} MiB: first {a:#x}, asked again {b:#x} rc {rc2}: "
              f"{'SAME' if b == a else 'ELSEWHERE'}")
        free(b, size)
        # A range next to a held one, freed and asked for again.
        rc, x = reserve(size, align, 0)
        rc, y = reserve(size, align, 0)
        free(y, size)
        rc3, z = reserve(size, align, y)
        print(f"   with a neighbour held: {y:#x} -> {z:#x}: {'SAME' if z == y else 'ELSEWHERE'}")
        free(z, size)
        free(x, size)
