"""The cold paths (issue 23): the first sleep, one huge tensor's wake, a durable restore into a
new process, and what stays on the device while asleep. Same conventions as bench_sleep.py:
every measurement runs in a fresh child process, the raw pinned host<->device copy is measured
in the same run (the parent, CUDA events on one large pinned buffer), JSON records.

On a GPU (PyTorch only for the raw-copy floor and the residual's PyTorch part; devmem through
its Python module's ctypes API):

    PYTHONPATH=bindings/python DEVMEM_LIBRARY=target/release/libdevmem.so \\
        python3 bench/bench_cold.py --out bench/results/h100-cold.json

Dry run on the driver emulator (tiny sizes, no torch; the floor is then a host memcpy and the
numbers mean nothing, only that every phase runs and checks its bytes):

    PYTHONPATH=bindings/python DEVMEM_LIBRARY=target/release/libdevmem.so \\
        DEVMEM_CUDA_LIBRARY=target/release/libdevmem_cuda_emu.so \\
        python3 bench/bench_cold.py --emulator --gib 0.0625 --out /tmp/cold.json

Phases (records):
  first_sleep_vs_warm   weights (--gib, in --tensors allocations) allocated, then the first
                        sleep timed against the median warm sleep of the same bytes in the same
                        process: ``ratio`` = first / warm. One record with grow-ahead on (the
                        child waits up to --settle s for the store to be ready, as an engine
                        does while loading; ``grow_wait_seconds`` says how long) and one with
                        ``DEVMEM_HOST_GROW_AHEAD=0``.
  single_tensor_wake    one allocation of --gib: wake time against raw H2D of the same bytes
                        measured by the parent: ``ratio`` = raw time / wake time.
  durable_read          a writer process sleeps --gib into a kept region and exits; a new
                        process opens it with ``DEVMEM_DURABLE_READ=<option>`` and restores:
                        ``seconds`` from open to restored, ``vs_copy_time`` = seconds / raw H2D
                        time of the same bytes. One record per ``option``.
  residual_after_sleep  after a full sleep: devmem's mapped and other bytes, the driver's used
                        bytes, PyTorch's segments outside devmem (when torch is used) and the
                        rest (context, other allocators).
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

GIB = 1 << 30
MIB = 1 << 20
OPTIONS = ("pin", "pin-fine", "pageable", "auto")
WARM = 3


def _torch(use):
    if not use:
        return None
    import torch

    torch.cuda.init()
    return torch


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def _alloc(devmem, total, tensors, tag):
    size = max(2 * MIB, (total // tensors) // (2 * MIB) * (2 * MIB))
    with devmem.use_tag(tag):
        return [devmem.malloc(size) for _ in range(tensors)], size


def _fill(ptrs, size, emulated):
    """On the emulator device memory is host memory: fill it to check the bytes later."""
    if emulated:
        for i, p in enumerate(ptrs):
            ctypes.memset(p, (i * 7 + 3) & 0xFF, size)


def _check(ptrs, size, emulated):
    if not emulated:
        return True  # on a GPU the device checksum (CUDA) guards restores
    for i, p in enumerate(ptrs):
        want = (i * 7 + 3) & 0xFF
        data = ctypes.string_at(p, size)
        if data.count(want) != size:
            print(f"CHECK FAILED: allocation {i}", file=sys.stderr)
            return False
    return True


def child_first_sleep(args):
    import devmem

    emulated = args.emulator
    nbytes = int(args.gib * GIB)
    ptrs, size = _alloc(devmem, nbytes, args.tensors, "weights")
    _fill(ptrs, size, emulated)
    total = size * len(ptrs)
    t0 = time.perf_counter()
    grow_wait = 0.0
    if devmem.host_grow_ahead():
        while devmem.stats().host_store_bytes < total and time.perf_counter() - t0 < args.settle:
            time.sleep(0.005)
        grow_wait = time.perf_counter() - t0
    held_before = devmem.stats().host_store_bytes
    t = time.perf_counter()
    devmem.sleep(("weights",))
    first = time.perf_counter() - t
    devmem.wake_up()
    ok = _check(ptrs, size, emulated)
    warm = []
    for _ in range(WARM):
        t = time.perf_counter()
        devmem.sleep(("weights",))
        warm.append(time.perf_counter() - t)
        devmem.wake_up()
    ok = ok and _check(ptrs, size, emulated)
    for p in ptrs:
        devmem.free(p)
    devmem.release_host_store()
    w = statistics.median(warm)
    return [dict(phase="first_sleep_vs_warm", grow_ahead=devmem.host_grow_ahead(), bytes=total,
                 tensors=len(ptrs), seconds=first, first_seconds=first, warm_seconds=w, all_warm=warm,
                 ratio=first / w, grow_wait_seconds=grow_wait, host_store_before_first=held_before,
                 bytes_ok=ok)]


def child_single_tensor(args):
    import devmem

    nbytes = int(args.gib * GIB) // (2 * MIB) * (2 * MIB)
    with devmem.use_tag("weights"):
        p = devmem.malloc(nbytes)
    _fill([p], nbytes, args.emulator)
    devmem.reserve_host_store(nbytes, wait=True)
    wakes = []
    for _ in range(WARM):
        devmem.sleep(("weights",))
        t = time.perf_counter()
        devmem.wake_up()
        wakes.append(time.perf_counter() - t)
    ok = _check([p], nbytes, args.emulator)
    devmem.free(p)
    devmem.release_host_store()
    return [dict(phase="single_tensor_wake", bytes=nbytes, seconds=statistics.median(wakes), all_seconds=wakes,
                 bytes_ok=ok)]


def _region_bytes(nbytes):
    return nbytes + 64 * MIB


def child_durable(args, role, name, option):
    import devmem

    nbytes = int(args.gib * GIB)
    ptrs, size = _alloc(devmem, nbytes, args.tensors, "weights")
    total = size * len(ptrs)
    if role == "write":
        devmem.open_shared_store(name, _region_bytes(total), keep=True)
        _fill(ptrs, size, args.emulator)
        devmem.sleep(("weights",))
        return []  # exits asleep: the kept region holds the bytes
    t = time.perf_counter()
    devmem.open_shared_store(name, _region_bytes(total))
    opened = time.perf_counter() - t
    devmem.restore_from_store(("weights",), by_order=True)
    seconds = time.perf_counter() - t
    ok = _check(ptrs, size, args.emulator)
    for p in ptrs:
        devmem.free(p)
    devmem.close_shared_store()
    return [dict(phase="durable_read", option=option, bytes=total, seconds=seconds, open_seconds=opened,
                 bytes_ok=ok)]


def child_residual(args):
    import devmem

    torch = _torch(not args.emulator)
    before = devmem.mem_get_info(0)
    nbytes = int(args.gib * GIB)
    w, _ = _alloc(devmem, nbytes, args.tensors, "weights")
    kv, _ = _alloc(devmem, nbytes, 4, "kv_cache")
    scratch = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda") if torch is not None else None
    devmem.sleep(("weights",))
    r = devmem.residual(0)
    devmem.wake_up()
    for p in w + kv:
        devmem.free(p)
    devmem.release_host_store()
    del scratch
    return [dict(phase="residual_after_sleep", bytes=r.driver_used, devmem_mapped_bytes=r.devmem_mapped,
                 devmem_other_bytes=r.devmem_other, driver_used_bytes=r.driver_used,
                 torch_outside_devmem_bytes=r.torch_outside_devmem, rest_bytes=r.rest,
                 used_before_any_allocation=before[1] - before[0], total_bytes=r.total)]


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def raw_h2d_seconds(nbytes, emulated):
    """Seconds for one raw pinned H2D copy of ``nbytes`` (best of 5, CUDA events), or on the
    emulator a host memcpy of the same bytes."""
    if emulated:
        a, b = ctypes.create_string_buffer(nbytes), ctypes.create_string_buffer(nbytes)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            ctypes.memmove(a, b, nbytes)
            times.append(time.perf_counter() - t)
        return min(times)
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, dev
    torch.cuda.empty_cache()
    return min(times)


def run(args, extra_env, *child):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *child, "--gib", str(args.gib),
           "--tensors", str(args.tensors), "--settle", str(args.settle)] + (["--emulator"] if args.emulator else [])
    env = dict(os.environ, **extra_env)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0 or "CHECK FAILED" in out.stderr:
        raise RuntimeError(f"{' '.join(child)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    return json.loads(lines[-1]) if lines else []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--tensors", type=int, default=256)
    parser.add_argument("--settle", type=float, default=5.0, help="most seconds to wait for growing ahead")
    parser.add_argument("--emulator", action="store_true")
    parser.add_argument("--phases", default="first_sleep_vs_warm,single_tensor_wake,durable_read,residual_after_sleep")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.emulator:
        args.tensors = min(args.tensors, 8)
    if args.child:
        kind = args.child[0]
        if kind == "first":
            records = child_first_sleep(args)
        elif kind == "single":
            records = child_single_tensor(args)
        elif kind == "durable":
            records = child_durable(args, *args.child[1:4])
        elif kind == "residual":
            records = child_residual(args)
        else:
            raise SystemExit(f"unknown child {kind!r}")
        print(json.dumps(records))
        return 0

    phases = args.phases.split(",")
    nbytes = int(args.gib * GIB) // (2 * MIB) * (2 * MIB)
    raw_start = raw_h2d_seconds(nbytes, args.emulator)
    records = []
    if "first_sleep_vs_warm" in phases:
        for on in ("1", "0"):
            records += run(args, {"DEVMEM_HOST_GROW_AHEAD": on}, "first")
    if "single_tensor_wake" in phases:
        records += run(args, {}, "single")
    if "durable_read" in phases:
        for option in args.options.split(","):
            name = f"bench-cold-{os.getpid()}-{option}"
            run(args, {}, "durable", "write", name, option)
            records += run(args, {"DEVMEM_DURABLE_READ": option}, "durable", "read", name, option)
    if "residual_after_sleep" in phases:
        records += run(args, {}, "residual")
    raw_end = raw_h2d_seconds(nbytes, args.emulator)
    raw = (raw_start + raw_end) / 2
    for r in records:
        r["raw_h2d_seconds"] = raw * r["bytes"] / nbytes if r["phase"] != "residual_after_sleep" else None
        if r["phase"] == "single_tensor_wake":
            r["ratio"] = r["raw_h2d_seconds"] / r["seconds"]
            r["target"] = "ratio >= 0.95"
            r["met"] = r["ratio"] >= 0.95
        if r["phase"] == "durable_read":
            r["vs_copy_time"] = r["seconds"] / r["raw_h2d_seconds"]
            r["target"] = "vs_copy_time <= 2"
            r["met"] = r["vs_copy_time"] <= 2
        if r["phase"] == "first_sleep_vs_warm" and r["grow_ahead"]:
            r["target"] = "ratio <= 1.3"
            r["met"] = r["ratio"] <= 1.3
    for r in records:
        keys = ("phase", "option", "grow_ahead", "seconds", "ratio", "vs_copy_time", "met")
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keys and v is not None})
    device = "emulator"
    if not args.emulator:
        import torch

        device = torch.cuda.get_device_name()
    meta = dict(device=device, raw_h2d_start=raw_start, raw_h2d_end=raw_end, bytes=nbytes,
                command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".meta.json", "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
