"""Durable restore on the driver emulator: seconds per GiB for a new process to get its
weights back from a kept shared store, through the C ABI (ctypes), so the same script measures
a library from before issue 20 (restore by order, copies issued by core.rs) and after it
(restore by name through the store's pipeline). The emulator's copies are memcpy: this proves
nothing about the GPU; it shows whether the move into the pipeline cost anything.

    python3 bench/emu_durable_restore.py <libdevmem.so> <libdevmem_cuda_emu.so> [GiB] [runs]
"""

import ctypes
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
PIECE = 64 * MIB


class Options(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dir", ctypes.c_char_p), ("bytes_per_rank", ctypes.c_uint64),
                ("rank", ctypes.c_uint32), ("world", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("timeout_ms", ctypes.c_uint32)]


class Transfer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("allocations", "bytes_freed", "bytes_saved", "bytes_discarded",
                                               "bytes_mapped", "bytes_restored", "bytes_skipped",
                                               "verify_mismatches")] + [("seconds", ctypes.c_double)]


def child(lib_path, name, mode, gib):
    lib = ctypes.CDLL(lib_path)
    lib.devmem_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    named = hasattr(lib, "devmem_name_range")
    if named:
        lib.devmem_name_range.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_char_p]

    def ok(rc, what):
        if rc != 0:
            buf = ctypes.create_string_buffer(4096)
            lib.devmem_last_error_message(buf, 4096)
            raise SystemExit(f"{what}: status {rc}: {buf.value.decode()}")

    n = gib * 1024 * MIB // PIECE
    opts = Options(name.encode(), None, gib * 1024 * MIB + 64 * MIB, 0, 1, 1 if mode == "write" else 0, 0)
    ok(lib.devmem_shared_store_open(ctypes.byref(opts)), "open")
    ok(lib.devmem_set_current_tag(b"weights"), "tag")
    ptrs = []
    for i in range(n):
        p = ctypes.c_void_p()
        ok(lib.devmem_malloc(PIECE, 0, ctypes.byref(p)), "malloc")
        ptrs.append(p.value)
        if named:
            ok(lib.devmem_name_range(p.value, PIECE, f"layer{i}.weight".encode()), "name")
    tags = (ctypes.c_char_p * 1)(b"weights")
    if mode == "write":
        for i, p in enumerate(ptrs):
            ctypes.memset(p, i & 0xFF, PIECE)
        ok(lib.devmem_sleep(tags, 1), "sleep")
        return
    start = time.perf_counter()
    ok(lib.devmem_restore_from_store(tags, 1), "restore")
    wall = time.perf_counter() - start
    t = Transfer()
    ok(lib.devmem_get_last_transfer(ctypes.byref(t)), "transfer")
    for i, p in enumerate(ptrs):
        assert ctypes.string_at(p, 64) == bytes([i & 0xFF]) * 64, i
    print(f"RESULT {t.bytes_restored} {wall:.4f} {'name' if named else 'order'}")
    ok(lib.devmem_shared_store_close(), "close")


def main():
    lib, emu = sys.argv[1], sys.argv[2]
    gib = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    env = dict(os.environ, DEVMEM_CUDA_LIBRARY=emu, DEVMEM_EMU_CAPACITY=f"{gib + 1}G")
    per_gib = []
    for run in range(runs):
        name = f"emu-bench-{os.getpid()}-{run}"
        for mode in ("write", "read"):
            out = subprocess.run([sys.executable, __file__, "--child", lib, name, mode, str(gib)], env=env,
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise SystemExit(out.stdout + out.stderr)
        _, restored, wall, how = next(l for l in out.stdout.splitlines() if l.startswith("RESULT")).split()
        per_gib.append(float(wall) / (int(restored) / (1 << 30)))
        print(f"run {run}: {int(restored) >> 20} MiB restored by {how} in {float(wall):.3f} s "
              f"= {per_gib[-1]:.3f} s/GiB")
    print(f"median {statistics.median(per_gib):.3f} s/GiB (min {min(per_gib):.3f}, max {max(per_gib):.3f}) "
          f"over {runs} runs of {gib} GiB in {gib * 1024 * MIB // PIECE} allocations")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
