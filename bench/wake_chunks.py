"""Which wake chunk size (DEVMEM_WAKE_CHUNK_MB) to pick: one large tensor allocated through
devmem's module API, slept and woken under each chunk size, each in its own process (the
setting is read once when the backend loads). Prints, per chunk size: the chunks the tensor
is made of, the median wake time and GB/s, the ratio to raw H2D from pinned memory in the same
process (needs PyTorch with CUDA; blank without), and the median malloc / free cost of the large
tensor and of a 32 MiB one (small ones are never chunked: their cost must match chunk 0's).

    PYTHONPATH=bindings/python DEVMEM_LIBRARY=target/release/libdevmem.so \
        python3 bench/wake_chunks.py [--gib 8] [--chunks 0,128,256,512,1024,2048] [--runs 5] \
        [--json bench/results/<run>-wake-chunks.json]

On the driver emulator (`--emulator`, tiny sizes, e.g. `--gib 0.0625 --chunks 0,4,8`) the
copies are memcpy and run at synchronisation: the numbers say nothing about a GPU, the run
checks that the script and the setting work and that the bytes come back.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20


def median_ms(samples):
    return statistics.median(samples) * 1e3


def raw_h2d_gbps(nbytes):
    """Raw pinned H2D bandwidth with PyTorch, or None without a CUDA PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del host, dev
    torch.cuda.empty_cache()
    return nbytes / min(times) / 1e9


def child(args):
    import ctypes

    import devmem

    if args.emulator:
        devmem.use_emulator("cuda", capacity=f"{max(1, int(args.gib * 3 + 1))}G")
    nbytes = int(args.gib * (1 << 30))
    gran = devmem.granularity()
    nbytes = (nbytes + gran - 1) // gran * gran
    raw = raw_h2d_gbps(nbytes)
    devmem.set_current_tag("weights")

    def cost(size, runs):
        alloc, free = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            p = devmem.malloc(size)
            t1 = time.perf_counter()
            devmem.free(p)
            alloc.append(t1 - t0)
            free.append(time.perf_counter() - t1)
        return median_ms(alloc), median_ms(free)

    small_malloc, small_free = cost(32 * MIB, 50)
    big_malloc, big_free = cost(nbytes, 5)
    p = devmem.malloc(nbytes)
    chunks = len(devmem.allocation_chunks(p))
    if args.emulator:
        ctypes.memset(p, 0x5A, nbytes)
    devmem.sleep(("weights",))
    devmem.wake_up()  # warm the host store
    wakes = []
    for _ in range(args.runs):
        devmem.sleep(("weights",))
        t0 = time.perf_counter()
        devmem.wake_up()
        wakes.append(time.perf_counter() - t0)
    intact = None
    if args.emulator:
        intact = ctypes.string_at(p, nbytes) == b"\x5a" * nbytes
    devmem.free(p)
    wake_ms = median_ms(wakes)
    gbps = nbytes / (wake_ms / 1e3) / 1e9
    print(json.dumps({
        "phase": "wake_chunk_sweep",
        "chunk_mb": args.chunk_mb,
        "bytes": nbytes,
        "chunks": chunks,
        "wake_ms": wake_ms,
        "gbps": gbps,
        "raw_h2d_gbps": raw,
        "ratio": gbps / raw if raw else None,
        "malloc_ms": big_malloc,
        "free_ms": big_free,
        "malloc_32mib_ms": small_malloc,
        "free_32mib_ms": small_free,
        "runs": args.runs,
        "emulator": bool(args.emulator),
        "bytes_intact": intact,
    }), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8.0, help="size of the one tensor (GiB)")
    ap.add_argument("--chunks", default="0,128,256,512,1024,2048",
                    help="DEVMEM_WAKE_CHUNK_MB values to compare (0 = one piece)")
    ap.add_argument("--runs", type=int, default=5, help="timed wakes per chunk size")
    ap.add_argument("--emulator", action="store_true", help="run on the bundled driver emulator")
    ap.add_argument("--json", help="append one JSON record per chunk size to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-mb", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    records = []
    print(f"{'chunk MiB':>9} {'chunks':>6} {'wake ms':>9} {'GB/s':>7} {'ratio':>6} "
          f"{'malloc ms':>9} {'free ms':>8} {'32M malloc':>10} {'32M free':>9}")
    for chunk in [int(c) for c in args.chunks.split(",") if c.strip()]:
        env = dict(os.environ, DEVMEM_WAKE_CHUNK_MB=str(chunk), DEVMEM_CHUNK_SIZE="0")
        cmd = [sys.executable, __file__, "--child", "--chunk-mb", str(chunk), "--gib", str(args.gib),
               "--runs", str(args.runs)] + (["--emulator"] if args.emulator else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"chunk {chunk} MiB failed ({out.returncode}):\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        records.append(rec)
        ratio = f"{rec['ratio']:.3f}" if rec["ratio"] else "-"
        print(f"{chunk:>9} {rec['chunks']:>6} {rec['wake_ms']:>9.2f} {rec['gbps']:>7.1f} {ratio:>6} "
              f"{rec['malloc_ms']:>9.3f} {rec['free_ms']:>8.3f} {rec['malloc_32mib_ms']:>10.3f} "
              f"{rec['free_32mib_ms']:>9.3f}" + ("" if rec["bytes_intact"] in (None, True) else "  BYTES LOST"),
              flush=True)
        if rec["bytes_intact"] is False:
            return 1
    if args.json:
        with open(args.json, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
