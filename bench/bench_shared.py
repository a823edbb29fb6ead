"""Issue 12 benchmark: read-only sleep, wake from the shared store, durable restore, ranks.

Every number is measured through the entry points users call (``devmem.CuMemAllocator`` pools,
``devmem.open_shared_store``, ``devmem.restore_from_store``) and compared with the raw pinned
copy bandwidth measured in the same run by the parent process.

    DEVMEM_LIBRARY=$PWD/target/release/libdevmem.so PYTHONPATH=bindings/python:bench \\
        python3 bench/bench_shared.py [--weights-gib 8] [--kv-gib 16] [--gpus 1]

Phases (each in its own process, as an engine would be):

* ``readonly``: 8 GiB of weights declared read-only after load + 16 GiB of KV cache; the
  first sleep copies the weights, later ones only unmap (KV discarded). Then the same with
  verification (device checksum). Targets: later sleeps <= 25 ms, <= 60 ms verified.
* ``shared_wake``: weights slept into the shared store and woken from it, vs raw H2D
  (target >= 0.95).
* ``durable``: a writer sleeps the weights into a kept region and exits; a new process times
  ``import devmem`` .. weights back on the GPU (PyTorch's import and CUDA context excluded),
  vs 2x the copy time at the raw H2D rate, and vs ``torch.load`` of the same bytes from a file
  in the page cache (same run).
* ``ranks``: two processes share one region (one GPU, or one GPU each with ``--gpus 2``); per
  rank sleep and wake ratios.
"""

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 1 << 30
MIB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_sleep import raw_bandwidth  # noqa: E402  (the same measurement as bench_sleep.py)


def emit(**record):
    print("RECORD " + json.dumps(record), flush=True)


def digest(torch, ts):
    """A cheap content check: int64 sums and strided samples of each tensor."""
    out = []
    for t in ts if isinstance(ts, list) else [ts]:
        v = t.view(torch.int64)
        out += [int(v.sum().item()), int(v[:: 1 << 20].sum().item())]
    return out


TENSORS = 1


def load_weights(torch, alloc, nbytes, seed):
    """The weights as TENSORS tensors of equal size (one devmem allocation each)."""
    with alloc.use_memory_pool("weights"):
        ws = [torch.empty(nbytes // TENSORS, dtype=torch.uint8, device="cuda") for _ in range(TENSORS)]
    g = torch.Generator(device="cuda").manual_seed(seed)
    for w in ws:
        w.view(torch.int64).random_(generator=g)
    torch.cuda.synchronize()
    return ws if TENSORS > 1 else ws[0]


def named(w):
    """The weights by name, as a restarted engine names its state_dict."""
    return {f"w{i}": t for i, t in enumerate(w if isinstance(w, list) else [w])}


def numel(w):
    return sum(t.numel() for t in w) if isinstance(w, list) else w.numel()


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def child_readonly(args):
    import torch
    import devmem

    alloc = devmem.CuMemAllocator.get_instance()
    w = load_weights(torch, alloc, args.weights_gib * GIB, 1)
    with alloc.use_memory_pool("kv_cache"):
        kv = torch.empty(args.kv_gib * GIB, dtype=torch.uint8, device="cuda")
    kv.fill_(3)
    ref = digest(torch, w)
    for mode in (devmem.ReadOnly.ON, devmem.ReadOnly.VERIFY):
        devmem.set_read_only("weights", mode)
        for cycle in range(6):
            torch.cuda.synchronize()
            s = timed(lambda: alloc.sleep(offload_tags=("weights",)))
            t = devmem.last_transfer()
            wk = timed(alloc.wake_up)
            ok = digest(torch, w) == ref
            emit(phase="readonly", mode=mode.name, cycle=cycle, sleep_s=s, wake_s=wk,
                 bytes_saved=t.bytes_saved, bytes_skipped=t.bytes_skipped,
                 bytes_discarded=t.bytes_discarded, verify_mismatches=t.verify_mismatches,
                 library_sleep_s=t.seconds, intact=ok)
            if not ok:
                raise SystemExit("weights changed across a read-only cycle")
    # A write after the declaration is caught by verification and copied again.
    (w[0] if isinstance(w, list) else w)[12345] ^= 1
    torch.cuda.synchronize()
    ref = digest(torch, w)
    s = timed(lambda: alloc.sleep(offload_tags=("weights",)))
    t = devmem.last_transfer()
    alloc.wake_up()
    emit(phase="readonly", mode="VERIFY", cycle="after-write", sleep_s=s, bytes_saved=t.bytes_saved,
         verify_mismatches=t.verify_mismatches, intact=digest(torch, w) == ref)
    del w, kv


def child_shared_wake(args, shared=True):
    import torch
    import devmem

    name = f"bench-{os.getpid()}"
    if shared:
        devmem.open_shared_store(name, args.weights_gib * GIB + 64 * MIB)
    alloc = devmem.CuMemAllocator.get_instance()
    w = load_weights(torch, alloc, args.weights_gib * GIB, 2)
    ref = digest(torch, w)
    for cycle in range(4):
        s = timed(lambda: alloc.sleep(offload_tags=("weights",)))
        wk = timed(alloc.wake_up)
        ok = digest(torch, w) == ref
        emit(phase="shared_wake" if shared else "private_wake", cycle=cycle, nbytes=numel(w), sleep_s=s,
             wake_s=wk, library_wake_s=devmem.last_transfer().seconds, intact=ok)
    del w
    alloc.release_pools()
    if shared:
        devmem.close_shared_store()


def child_private_wake(args):
    """The same weights through the private host store, for comparison."""
    child_shared_wake(args, shared=False)


def child_durable_write(args):
    import torch
    import devmem

    devmem.open_shared_store(args.name, args.weights_gib * GIB + 64 * MIB, keep=True)
    alloc = devmem.CuMemAllocator.get_instance()
    w = load_weights(torch, alloc, args.weights_gib * GIB, 3)
    devmem.name_tensors(named(w))
    with open(args.out, "w") as f:
        json.dump(digest(torch, w), f)
    torch.save([t.cpu() for t in w] if isinstance(w, list) else w.cpu(), args.file)
    alloc.sleep(offload_tags=("weights",))
    emit(phase="durable_write", nbytes=numel(w))
    os._exit(0)  # asleep, without closing: the kept region holds the weights


def child_durable_read(args):
    import torch

    torch.zeros(1, device="cuda")  # PyTorch's import and CUDA context are not counted
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    import devmem

    t_import = time.perf_counter()
    devmem.open_shared_store(args.name, args.weights_gib * GIB + 64 * MIB)
    t_open = time.perf_counter()
    alloc = devmem.CuMemAllocator.get_instance()
    n = args.weights_gib * GIB
    with alloc.use_memory_pool("weights"):
        w = [torch.empty(n // TENSORS, dtype=torch.uint8, device="cuda") for _ in range(TENSORS)]
    w = w if TENSORS > 1 else w[0]
    t_alloc = time.perf_counter()
    devmem.set_read_only("weights")
    devmem.name_tensors(named(w))
    devmem.restore_from_store("weights")
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    with open(args.out) as f:
        ok = digest(torch, w) == json.load(f)
    emit(phase="durable_read", total_s=t1 - t0, import_s=t_import - t0, open_s=t_open - t_import,
         alloc_s=t_alloc - t_open, restore_s=t1 - t_alloc, nbytes=numel(w), intact=ok)
    del w
    # torch.load of the same bytes from the page cache, then to the GPU.
    t2 = time.perf_counter()
    cpu = torch.load(args.file)
    t3 = time.perf_counter()
    g = [t.to("cuda") for t in cpu] if isinstance(cpu, list) else cpu.to("cuda")
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    emit(phase="torch_load", total_s=t4 - t2, load_s=t3 - t2, to_cuda_s=t4 - t3,
         intact=digest(torch, g) == json.load(open(args.out)))
    devmem.close_shared_store()  # last user, not kept: removes the region


def child_rank(args):
    import torch
    import devmem

    rank = args.rank
    if args.gpus > 1:
        torch.cuda.set_device(rank)
    devmem.open_shared_store(args.name, args.weights_gib * GIB // 2 + 64 * MIB, rank=rank, world=2)
    alloc = devmem.CuMemAllocator.get_instance()
    w = load_weights(torch, alloc, args.weights_gib * GIB // 2, 10 + rank)
    ref = digest(torch, w)
    barrier = args.out
    for cycle in range(4):
        # Both ranks start each cycle together (files as a barrier).
        open(f"{barrier}.{rank}.{cycle}", "w").close()
        while not os.path.exists(f"{barrier}.{1 - rank}.{cycle}"):
            time.sleep(0.001)
        s = timed(lambda: alloc.sleep(offload_tags=("weights",)))
        wk = timed(alloc.wake_up)
        emit(phase="ranks", rank=rank, gpus=args.gpus, cycle=cycle, nbytes=numel(w), sleep_s=s,
             wake_s=wk, intact=digest(torch, w) == ref)
    del w
    alloc.release_pools()
    devmem.close_shared_store()


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def run(args, *extra):
    cmd = [sys.executable, os.path.abspath(__file__), "--tensors", str(args.tensors), "--weights-gib", str(args.weights_gib),
           "--kv-gib", str(args.kv_gib), "--gpus", str(args.gpus)] + list(extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def collect(procs):
    records = []
    for p in procs:
        out, _ = p.communicate()
        for line in out.splitlines():
            if line.startswith("RECORD "):
                records.append(json.loads(line[7:]))
            else:
                print(line)
        if p.returncode != 0:
            raise SystemExit(f"child failed with {p.returncode}")
    return records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights-gib", type=int, default=8)
    ap.add_argument("--kv-gib", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--tensors", type=int, default=1, help="weights as this many equal tensors")
    ap.add_argument("--phases", default="readonly,shared_wake,durable,ranks")
    ap.add_argument("--child")
    ap.add_argument("--name")
    ap.add_argument("--out")
    ap.add_argument("--file")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    global TENSORS
    TENSORS = args.tensors
    if args.child:
        globals()[f"child_{args.child}"](args)
        return
    import torch

    raw = raw_bandwidth(torch)
    device = torch.cuda.get_device_name()
    print(f"weights as {args.tensors} tensor(s)")
    print(f"{device}; raw pinned: D2H {raw['d2h']:.1f} GB/s, H2D {raw['h2d']:.1f} GB/s", flush=True)
    records = []
    phases = args.phases.split(",")
    tmp = f"/tmp/devmem-bench-{os.getpid()}"
    if "readonly" in phases:
        records += collect([run(args, "--child", "readonly")])
    if "shared_wake" in phases:
        records += collect([run(args, "--child", "shared_wake")])
        records += collect([run(args, "--child", "private_wake")])
    if "durable" in phases:
        name = f"durable-{os.getpid()}"
        common = ("--name", name, "--out", tmp + ".digest", "--file", tmp + ".pt")
        records += collect([run(args, "--child", "durable_write", *common)])
        subprocess.run(["cat", tmp + ".pt"], stdout=subprocess.DEVNULL, check=True)  # page cache
        records += collect([run(args, "--child", "durable_read", *common)])
        os.unlink(tmp + ".pt")
        left = os.path.exists(f"/dev/shm/devmem-{os.geteuid()}/devmem-{name}.region")
        records.append(dict(phase="durable_cleanup", region_left=left))
    if "ranks" in phases:
        name = f"ranks-{os.getpid()}"
        procs = [run(args, "--child", "rank", "--rank", str(r), "--name", name, "--out", tmp + ".barrier")
                 for r in range(2)]
        records += collect(procs)
    raw_end = raw_bandwidth(torch)
    report(records, raw, raw_end, device, args)


def report(records, raw, raw_end, device, args):
    h2d = (raw["h2d"] + raw_end["h2d"]) / 2
    d2h = (raw["d2h"] + raw_end["d2h"]) / 2
    print(f"\nraw pinned (mean of start and end): D2H {d2h:.1f} GB/s, H2D {h2d:.1f} GB/s")
    verdicts = {}
    for r in records:
        if r["phase"] == "readonly":
            line = (f"readonly {r['mode']:6} cycle {r['cycle']}: sleep {r['sleep_s'] * 1e3:7.1f} ms "
                    f"(saved {r['bytes_saved'] / GIB:.1f} GiB, skipped {r.get('bytes_skipped', 0) / GIB:.1f} GiB, "
                    f"mismatches {r['verify_mismatches']})")
            if "wake_s" in r:
                line += f", wake {r['wake_s'] * 1e3:.1f} ms"
            print(line + ("" if r["intact"] else "  BYTES CHANGED"))
        elif r["phase"] in ("shared_wake", "private_wake", "ranks"):
            gb = r["nbytes"] / 1e9
            r["sleep_ratio"] = gb / r["sleep_s"] / d2h
            r["wake_ratio"] = gb / r["wake_s"] / h2d
            who = f"rank {r['rank']} ({r['gpus']} GPU)" if r["phase"] == "ranks" else r["phase"].split("_")[0]
            print(f"{who} cycle {r['cycle']}: sleep {r['sleep_s'] * 1e3:.1f} ms ({r['sleep_ratio']:.2f} of raw D2H), "
                  f"wake {r['wake_s'] * 1e3:.1f} ms ({r['wake_ratio']:.2f} of raw H2D"
                  + (f"; library {r['library_wake_s'] * 1e3:.1f} ms" if "library_wake_s" in r else "") + ")"
                  + ("" if r["intact"] else "  BYTES CHANGED"))
        elif r["phase"] == "durable_read":
            link = r["nbytes"] / 1e9 / h2d
            r["vs_copy_time"] = r["total_s"] / link
            print(f"durable restore: {r['total_s'] * 1e3:.0f} ms from import (import {r['import_s'] * 1e3:.0f}, "
                  f"open {r['open_s'] * 1e3:.0f}, alloc {r['alloc_s'] * 1e3:.0f}, restore {r['restore_s'] * 1e3:.0f}); "
                  f"copy time at link speed {link * 1e3:.0f} ms -> {r['vs_copy_time']:.2f}x"
                  + ("" if r["intact"] else "  BYTES CHANGED"))
            verdicts["durable <= 2x copy time"] = r["vs_copy_time"] <= 2 and r["intact"]
        elif r["phase"] == "torch_load":
            print(f"torch.load from page cache + .to('cuda'): {r['total_s'] * 1e3:.0f} ms "
                  f"(load {r['load_s'] * 1e3:.0f}, to cuda {r['to_cuda_s'] * 1e3:.0f})")
        elif r["phase"] == "durable_cleanup":
            print(f"region left after the reader closed it: {r['region_left']}")
    later = [r for r in records if r["phase"] == "readonly" and isinstance(r["cycle"], int) and r["cycle"] >= 1]
    for mode, target in (("ON", 0.025), ("VERIFY", 0.060)):
        times = sorted(r["sleep_s"] for r in later if r["mode"] == mode and r["bytes_saved"] == 0)
        if times:
            median = times[len(times) // 2]
            print(f"readonly {mode}: median later sleep {median * 1e3:.1f} ms (target {target * 1e3:.0f} ms)")
            verdicts[f"readonly {mode} <= {target * 1e3:.0f} ms"] = median <= target
    wakes = sorted(r["wake_ratio"] for r in records if r["phase"] == "shared_wake" and r["cycle"] >= 1)
    if wakes:
        verdicts["shared wake >= 0.95"] = wakes[len(wakes) // 2] >= 0.95
    print("\n" + "\n".join(f"{'PASS' if v else 'MISS'}  {k}" for k, v in verdicts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, raw_start=raw, raw_end=raw_end, records=records, verdicts=verdicts), f,
                      indent=1)


if __name__ == "__main__":
    main()
