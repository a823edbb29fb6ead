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


# With physical memory mapped, written, unmapped and released before the range is freed (what
# devmem's re-reserve does after a sleep), for several neighbouring ranges in turn.
class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("handle_types", ctypes.c_int), ("loc_type", ctypes.c_int),
                ("loc_id", ctypes.c_int), ("win32", ctypes.c_void_p), ("compression", ctypes.c_ubyte),
                ("rdma", ctypes.c_ubyte), ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class Access(ctypes.Structure):
    _fields_ = [("loc_type", ctypes.c_int), ("loc_id", ctypes.c_int), ("flags", ctypes.c_int)]


prop = Prop(type=1, handle_types=0, loc_type=1, loc_id=0)
access = Access(loc_type=1, loc_id=0, flags=3)


def with_memory(size, n):
    ranges = []
    for _ in range(n):
        rc, a = reserve(size, 2 << 20, 0)
        h = ctypes.c_uint64()
        assert cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(size), ctypes.byref(prop), ctypes.c_uint64(0)) == 0
        assert cu.cuMemMap(ctypes.c_uint64(a), ctypes.c_size_t(size), ctypes.c_size_t(0), h, ctypes.c_uint64(0)) == 0
        assert cu.cuMemSetAccess(ctypes.c_uint64(a), ctypes.c_size_t(size), ctypes.byref(access), ctypes.c_size_t(1)) == 0
        assert cu.cuMemsetD8_v2(ctypes.c_uint64(a), ctypes.c_ubyte(7), ctypes.c_size_t(size)) == 0
        ranges.append((a, h))
    assert cu.cuCtxSynchronize() == 0
    same = 0
    for a, h in ranges:
        assert cu.cuMemUnmap(ctypes.c_uint64(a), ctypes.c_size_t(size)) == 0
        assert cu.cuMemRelease(h) == 0
        assert free(a, size) == 0
        rc, b = reserve(size, 2 << 20, a)
        same += b == a
        if b != a:
            print(f"   {a:#x} came back at {b:#x} (rc {rc})")
            free(b, size)
            rc, b = reserve(size, 2 << 20, a)
            print(f"   asked again: {b:#x}")
        free(b, size)
    print(f"with memory, {n} x {size >> 20} MiB: {same} of {n} at the same address")


for size, n in ((2 << 20, 8), (64 << 20, 8), (256 << 20, 4), (1 << 30, 2)):
    with_memory(size, n)
