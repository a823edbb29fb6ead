"""Issue 22 benchmark: engine restart without copying (the keeper) vs durable restore vs torch.load.

    DEVMEM_LIBRARY=$PWD/target/release/libdevmem.so PYTHONPATH=bindings/python \\
        python3 bench/bench_keeper.py [--gib 8 80] [--out results/keeper.json]

Dry run on the emulator (no torch, small sizes):

    DEVMEM_CUDA_LIBRARY=$PWD/target/release/libdevmem_cuda_emu.so DEVMEM_EMU_CAPACITY=4G \\
    DEVMEM_LIBRARY=$PWD/target/release/libdevmem.so PYTHONPATH=bindings/python \\
        python3 bench/bench_keeper.py --mib 64 256

Per size, each phase in its own process, as an engine restart would be:

* ``keep``: process A allocates N bytes through devmem (tag ``weights``, 1 GiB tensors), fills
  them, names them, keeps them in the keeper and exits.
* ``keeper_reattach``: process B allocates the same named tensors and attaches: ``seconds`` is
  the attach call; ``seconds_from_start`` is process start to bytes mapped (``import devmem``
  included, torch's import and CUDA context excluded when torch is there). Bytes are verified
  (a device checksum through torch when available, else a host read on the emulator).
* ``durable_restore``: the same bytes slept into a kept shared store by one process and
  restored by the next (``restore_from_store``).
* ``torch_load``: ``torch.load`` of the same bytes from a file in the page cache (torch only).
* ``keeper_holding``: the keeper's RSS and open descriptors while it holds the bytes.
* ``shared_read_only``: two processes attach the kept bytes read-only at once and check them.
* ``crashed_client``: a process attaches read-write and dies by SIGKILL without releasing; the
  next process attaches the same bytes (checked). The bytes are then released
  (``keeper_after_release``: the keeper's RSS and descriptors) and kept again for the timed
  re-attach.
* Sizes above ``--compare-max-gib`` (default 40) skip the durable restore and ``torch.load``.

Each record is printed as ``RECORD {json}`` and written to ``--out``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30
MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = []
OUT_PATH = None


def emit(**record):
    RECORDS.append(record)
    print("RECORD " + json.dumps(record), flush=True)
    if OUT_PATH:  # rewritten per record, so a later failure keeps what ran
        with open(OUT_PATH, "w") as f:
            json.dump(RECORDS, f, indent=1)


def have_torch():
    try:
        import torch  # noqa: F401

        return torch.cuda.is_available() and not os.environ.get("DEVMEM_CUDA_LIBRARY")
    except Exception:
        return False


CHILD = r"""
import ctypes, json, os, sys, time
T0 = time.perf_counter()
mode, socket, total, piece, region = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import devmem
sizes = [piece] * (total // piece) + ([total % piece] if total % piece else [])
if mode == "durable_write" or mode == "durable_read":
    devmem.open_shared_store(region, total + 64 * (1 << 20), keep=(mode == "durable_write"))
with devmem.use_tag("weights"):
    ptrs = [devmem.malloc(n) for n in sizes]
for i, (p, n) in enumerate(zip(ptrs, sizes)):
    devmem.name_range(p, n, f"t{i}")

# Fill and check through the driver devmem uses (works on a GPU and on the emulator): devmem
# leaves the device's primary context current on this thread.
cuda = ctypes.CDLL(os.environ.get("DEVMEM_CUDA_LIBRARY") or "libcuda.so.1")

def fill(p, n, i):
    rc = cuda.cuMemsetD8Async(ctypes.c_uint64(p), ctypes.c_ubyte((i * 7 + 1) & 0xFF), ctypes.c_size_t(n), None)
    rc = rc or cuda.cuCtxSynchronize()
    if rc:
        raise SystemExit(f"cuMemsetD8Async: {rc}")

def check(p, n, i):
    # the first and last MiB of each tensor, copied back
    want = bytes([(i * 7 + 1) & 0xFF])
    m = min(1 << 20, n)
    buf = ctypes.create_string_buffer(m)
    for off in (0, n - m):
        rc = cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(p + off), ctypes.c_size_t(m))
        if rc or buf.raw != want * m:
            raise SystemExit(f"tensor {i}: wrong bytes at {off} (rc {rc})")

out = {}
if mode in ("keep", "durable_write"):
    for i, (p, n) in enumerate(zip(ptrs, sizes)):
        fill(p, n, i)
    if mode == "keep":
        devmem.keep("weights", instance="bench", socket=socket)
    else:
        devmem.sleep(["weights"])
elif mode == "attach":
    t = time.perf_counter()
    tr = devmem.attach("weights", instance="bench", socket=socket)
    out["seconds"] = time.perf_counter() - t
    out["seconds_from_start"] = time.perf_counter() - T0
    out["bytes_restored"] = tr.bytes_restored
    for i, (p, n) in enumerate(zip(ptrs, sizes)):
        check(p, n, i)
    devmem.release_kept("weights", instance="bench", socket=socket)
elif mode in ("attach_ro", "attach_crash"):
    # attach_ro: read-only, then wait until the parent says every reader is attached (argv[7],
    # a file), so two readers hold the same memory at once; attach_crash: attach read-write
    # and die by SIGKILL without releasing.
    t = time.perf_counter()
    tr = devmem.attach("weights", instance="bench", socket=socket, read_only=(mode == "attach_ro"))
    out["seconds"] = time.perf_counter() - t
    out["bytes_restored"] = tr.bytes_restored
    for i, (p, n) in enumerate(zip(ptrs, sizes)):
        check(p, n, i)
    if mode == "attach_crash":
        import signal
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    print("ATTACHED", flush=True)
    deadline = time.time() + 120
    while not os.path.exists(sys.argv[7]):
        if time.time() > deadline:
            raise SystemExit("barrier never opened")
        time.sleep(0.01)
elif mode == "durable_read":
    t = time.perf_counter()
    tr = devmem.restore_from_store("weights")
    out["seconds"] = time.perf_counter() - t
    out["seconds_from_start"] = time.perf_counter() - T0
    for i, (p, n) in enumerate(zip(ptrs, sizes)):
        check(p, n, i)
print("RESULT " + json.dumps(out), flush=True)
"""


def child_argv(mode, socket, total, piece, region, use_torch, barrier=""):
    return [sys.executable, "-c", CHILD, mode, socket, str(total), str(piece), region,
            "1" if use_torch else "0", barrier]


def run_child(mode, socket, total, piece, region, use_torch):
    out = subprocess.run(
        child_argv(mode, socket, total, piece, region, use_torch),
        capture_output=True, text=True, timeout=1800,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {}


def keeper_binary():
    lib = os.environ.get("DEVMEM_LIBRARY")
    for d in ([os.path.dirname(lib)] if lib else []) + [os.path.join(ROOT, "target", "release")]:
        path = os.path.join(d, "devmem-keeper")
        if os.path.exists(path):
            return path
    raise SystemExit("devmem-keeper not found: cargo build --release --workspace")


def proc_usage(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, nargs="*", default=[])
    ap.add_argument("--mib", type=int, nargs="*", default=[])
    ap.add_argument("--piece-mib", type=int, default=1024)
    ap.add_argument("--compare-max-gib", type=int, default=40,
                    help="durable restore and torch.load only up to this size (host memory, /dev/shm, disk)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global OUT_PATH
    OUT_PATH = args.out
    sizes = [g * GIB for g in args.gib] + [m * MIB for m in args.mib] or [8 * GIB, 80 * GIB]
    use_torch = False  # fills and checks go through the driver; torch only for torch_load
    d = tempfile.mkdtemp(prefix="devmem-bench-keeper-")
    socket = os.path.join(d, "k", "keeper.sock")
    keeper = subprocess.Popen([keeper_binary(), "serve", "--socket", socket], stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while not os.path.exists(socket):
            if time.time() > deadline:
                raise SystemExit("keeper never started")
            time.sleep(0.02)
        for total in sizes:
            piece = min(args.piece_mib * MIB, total)
            run_child("keep", socket, total, piece, "", use_torch)
            rss, fds = proc_usage(keeper.pid)
            emit(phase="keeper_holding", bytes=total, keeper_rss=rss, keeper_fds=fds)
            # Two readers at once: both attach read-only and check their bytes while the other
            # holds the same memory.
            barrier = os.path.join(d, f"barrier-{total}")
            readers = [subprocess.Popen(child_argv("attach_ro", socket, total, piece, "", use_torch, barrier),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                       for _ in range(2)]
            lines = []
            for r in readers:  # each says ATTACHED before waiting at the barrier
                line = r.stdout.readline()
                while line and not line.startswith("ATTACHED"):
                    line = r.stdout.readline()
                lines.append(line)
            open(barrier, "w").close()
            results = []
            for r in readers:
                o, e = r.communicate(timeout=600)
                if r.returncode != 0:
                    raise SystemExit(f"attach_ro failed ({r.returncode}):\n{o}\n{e}")
                results += [json.loads(x[7:]) for x in o.splitlines() if x.startswith("RESULT ")]
            emit(phase="shared_read_only", bytes=total, readers=2,
                 both_attached_at_once=all(x.startswith("ATTACHED") for x in lines),
                 seconds=[x["seconds"] for x in results])
            # A client that attached read-write dies by SIGKILL: its lease ends with it, the
            # memory stays kept and the next process attaches the same bytes.
            crash = subprocess.run(child_argv("attach_crash", socket, total, piece, "", use_torch),
                                   capture_output=True, text=True, timeout=600)
            r = run_child("attach", socket, total, piece, "", use_torch)
            emit(phase="crashed_client", bytes=total, client_exit=crash.returncode,
                 reattach_after_crash_seconds=r["seconds"], bytes_checked=True)
            rss, fds = proc_usage(keeper.pid)
            emit(phase="keeper_after_release", bytes=total, keeper_rss=rss, keeper_fds=fds)
            run_child("keep", socket, total, piece, "", use_torch)
            r = run_child("attach", socket, total, piece, "", use_torch)
            emit(phase="keeper_reattach", bytes=total, seconds=r["seconds"],
                 seconds_from_start=r["seconds_from_start"], bytes_restored=r["bytes_restored"])
            if total > args.compare_max_gib * GIB:
                emit(phase="durable_restore", bytes=total, skipped=f"over --compare-max-gib {args.compare_max_gib}")
                continue
            region = f"bench-keeper-{os.getpid()}-{total}"
            run_child("durable_write", socket, total, piece, region, use_torch)
            r = run_child("durable_read", socket, total, piece, region, use_torch)
            emit(phase="durable_restore", bytes=total, seconds=r["seconds"],
                 seconds_from_start=r["seconds_from_start"])
            if have_torch():
                import torch

                path = os.path.join(d, "weights.pt")
                torch.save(torch.empty(total, dtype=torch.uint8), path)
                with open(path, "rb") as f:  # into the page cache
                    while f.read(64 * MIB):
                        pass
                t = time.perf_counter()
                x = torch.load(path).cuda()
                torch.cuda.synchronize()
                emit(phase="torch_load", bytes=total, seconds=time.perf_counter() - t)
                del x
                torch.cuda.empty_cache()  # PyTorch's cache would keep the bytes from the next size
                os.unlink(path)
    finally:
        keeper.kill()
        keeper.wait()
        shutil.rmtree(d, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(RECORDS, f, indent=1)


if __name__ == "__main__":
    main()
