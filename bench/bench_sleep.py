"""Sleep/wake benchmark on a GPU, through the devmem Python package and PyTorch.

    PYTHONPATH=bindings/python DEVMEM_LIBRARY=target/release/libdevmem.so \
        python3 bench/bench_sleep.py --out bench/results/h100.json [--scenarios S1,S2,S3]

The parent process measures the raw pinned host<->device copy bandwidth (one large pinned
buffer, CUDA events) at the start and the end of the run; every (scenario, policy) then runs in
a fresh child process, so each first sleep is really cold (empty host store, nothing cached).
Results are ratios against the raw bandwidth of the same run.

Entries (--entries): how sleep and wake are called (``torch_memory_saver_preload``: the TMS
module in preload mode, the child started under ``configure_subprocess()``'s LD_PRELOAD).
``module`` (devmem.sleep/wake_up),
``CuMemAllocator`` (the class vLLM's worker calls), ``vllm_backend`` (devmem's vLLM sleep-mode
backend, suspend(1)/resume; needs vLLM's plugin modules on PYTHONPATH, see
bindings/python/conformance/vllm_tree.py), ``torch_memory_saver`` (pause/resume of
devmem.torch_memory_saver regions) and ``vllm_cumem`` (vLLM 0.33's own CuMemAllocator, built
by vllm_tree with with_cumem=True; for comparison, no target). Each record has an ``entry``.

Scenarios (weights are offloaded, the KV cache is discarded):
  S1: weights 8 GiB in 256 tensors + KV cache 16 GiB in 64 tensors
  S2: weights 4 GiB in 2048 tensors + KV cache 4 GiB in 64 tensors
  S3: weights 32 GiB in 512 tensors + KV cache 32 GiB in 64 tensors
Policies: keep (default), release (host store freed after each wake), reserve (keep, with the
store reserved ahead of the first sleep).

Every weight byte is checked after every wake (each tensor is regenerated from its seed and
compared), and the device memory freed by each sleep is checked with mem_get_info.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GIB = 1 << 30
MIB = 1 << 20
SCENARIOS = {
    "S1": dict(w_bytes=8 * GIB, w_n=256, kv_bytes=16 * GIB, kv_n=64),
    "S2": dict(w_bytes=4 * GIB, w_n=2048, kv_bytes=4 * GIB, kv_n=64),
    "S3": dict(w_bytes=32 * GIB, w_n=512, kv_bytes=32 * GIB, kv_n=64),
}
POLICIES = ("keep", "release", "reserve")
#: How sleep and wake are called: devmem's module API, the class vLLM's worker calls, devmem's
#: vLLM sleep-mode backend (suspend(1)/resume), the torch_memory_saver module (pause/resume),
#: and vLLM 0.33's own CuMemAllocator for comparison (its modules on PYTHONPATH, built by
#: bindings/python/conformance/vllm_tree.py with with_cumem=True).
ENTRIES = ("module", "CuMemAllocator", "vllm_backend", "torch_memory_saver", "torch_memory_saver_preload", "vllm_cumem")
WARM_CYCLES = 5


def rss_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def populate_seconds(nbytes, threads, chunk=256 * MIB):
    """Time to map and populate ``nbytes`` of fresh huge-page host memory the way devmem's host
    store does (bench/populate.c: chunks, MADV_HUGEPAGE, one write per page across
    ``threads`` threads), without the driver registration."""
    here = os.path.dirname(os.path.abspath(__file__))
    exe = os.path.join("/tmp", "devmem_bench_populate")
    if not os.path.exists(exe):
        subprocess.run(["cc", "-O2", "-pthread", "-o", exe, os.path.join(here, "populate.c")], check=True)
    out = subprocess.run([exe, str(nbytes), str(threads), str(chunk)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def raw_bandwidth(torch, nbytes=4 * GIB, repeats=5):
    """Best-of-N pinned host<->device copy bandwidth in GB/s, timed with CUDA events."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    result = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        result[name] = nbytes / min(times) / 1e9
    del host, dev
    torch.cuda.empty_cache()
    host_empty = getattr(torch._C, "_host_emptyCache", None)
    if host_empty is not None:
        host_empty()
    return result


# ---------------------------------------------------------------------------------------------
# Child: one scenario under one policy
# ---------------------------------------------------------------------------------------------


def entry_ops(entry, torch):
    """(context for allocating weights, context for the KV cache, sleep(), wake(), release())
    through the entry point ``entry``."""
    import devmem

    if entry in ("torch_memory_saver", "torch_memory_saver_preload"):
        from devmem.torch_memory_saver import torch_memory_saver as tms

        if entry == "torch_memory_saver_preload":
            # The child runs under LD_PRELOAD (see main): preload is then the default hook mode.
            if tms.hook_mode != "preload":
                raise RuntimeError(f"hook mode {tms.hook_mode!r} under LD_PRELOAD, not 'preload'")

        return (lambda: tms.region("weights", enable_cpu_backup=True), lambda: tms.region("kv_cache"),
                tms.pause, tms.resume, lambda: devmem.CuMemAllocator.get_instance().release_pools())
    if entry == "vllm_cumem":
        from vllm.device_allocator.cumem import CuMemAllocator as VllmAllocator

        v = VllmAllocator.get_instance()
        return (lambda: v.use_memory_pool("weights"), lambda: v.use_memory_pool("kv_cache"),
                lambda: v.sleep(offload_tags=("weights",)), v.wake_up, v.release_pools)
    alloc = devmem.CuMemAllocator.get_instance()
    pools = (lambda: alloc.use_memory_pool("weights"), lambda: alloc.use_memory_pool("kv_cache"))
    if entry == "module":
        return pools + (lambda: devmem.sleep(("weights",)), devmem.wake_up, alloc.release_pools)
    if entry == "CuMemAllocator":
        return pools + (lambda: alloc.sleep(offload_tags=("weights",)), alloc.wake_up, alloc.release_pools)
    if entry == "vllm_backend":
        from devmem.vllm_plugin import DevmemSleepModeBackend

        backend = DevmemSleepModeBackend()
        return pools + (lambda: backend.suspend(1), lambda: backend.resume(None), alloc.release_pools)
    raise ValueError(f"unknown entry {entry!r}; one of {ENTRIES}")


def device_used(torch):
    free, total = torch.cuda.mem_get_info()
    return total - free


def run_child(scenario, policy, entry):
    import torch

    import devmem

    cfg = SCENARIOS[scenario]
    records = []

    def record(phase, nbytes, seconds, **extra):
        records.append(dict(scenario=scenario, policy=policy, entry=entry, phase=phase, bytes=nbytes,
                            seconds=seconds, **extra))

    torch.cuda.init()
    devmem.set_host_policy(devmem.HostPolicy.RELEASE if policy == "release" else devmem.HostPolicy.KEEP)
    weights_pool, kv_pool, sleep, wake, release = entry_ops(entry, torch)
    w_elems = cfg["w_bytes"] // cfg["w_n"]
    kv_elems = cfg["kv_bytes"] // cfg["kv_n"]
    used_before = device_used(torch)
    with weights_pool():
        weights = [torch.empty(w_elems, dtype=torch.uint8, device="cuda") for _ in range(cfg["w_n"])]
    with kv_pool():
        kv = [torch.empty(kv_elems, dtype=torch.uint8, device="cuda") for _ in range(cfg["kv_n"])]
    pooled = device_used(torch) - used_before
    gens = []
    for i, t in enumerate(weights):
        g = torch.Generator(device="cuda")
        g.manual_seed(1000 + i)
        t.random_(0, 256, generator=g)
        gens.append(1000 + i)
    torch.cuda.synchronize()
    scratch = torch.empty(w_elems, dtype=torch.uint8, device="cuda")

    def check_weights():
        bad = 0
        for seed, t in zip(gens, weights):
            g = torch.Generator(device="cuda")
            g.manual_seed(seed)
            scratch.random_(0, 256, generator=g)
            if not torch.equal(scratch, t):
                bad += 1
        torch.cuda.synchronize()
        return bad

    # The entry's own bytes (vLLM's class does not allocate through devmem): what the pools
    # took from the device, split by the requested sizes.
    w_alloc = cfg["w_bytes"]
    kv_alloc = pooled - w_alloc
    n_alloc = cfg["w_n"] + cfg["kv_n"]
    rss_before = rss_bytes()

    if policy == "reserve":
        t0 = time.perf_counter()
        devmem.reserve_host_store(w_alloc, wait=True)
        record("reserve", w_alloc, time.perf_counter() - t0)

    for cycle in range(1 + WARM_CYCLES):
        phase = "cold" if cycle == 0 else "warm"
        torch.cuda.synchronize()
        free0, _ = torch.cuda.mem_get_info()
        t0 = time.perf_counter()
        sleep()
        sleep_s = time.perf_counter() - t0
        free1, _ = torch.cuda.mem_get_info()
        store = devmem.stats().host_store_bytes if entry != "vllm_cumem" else 0
        # Registering pinned host memory costs the driver some device memory (page tables for
        # the host mapping, about 2 MiB per GiB seen on the H100): allow 4 MiB per GiB of store.
        freed_ok = free1 - free0 >= (w_alloc + kv_alloc) - 2 * MIB - store // 256
        t0 = time.perf_counter()
        wake()
        wake_s = time.perf_counter() - t0
        bad = check_weights()
        rss_after = rss_bytes()
        record(f"{phase}_sleep", w_alloc, sleep_s, freed_bytes=free1 - free0, freed_ok=freed_ok,
               host_store_bytes=store, allocations=n_alloc, discarded_bytes=kv_alloc)
        record(f"{phase}_wake", w_alloc, wake_s, tensors_differing=bad, rss_before_first_sleep=rss_before,
               rss_after_wake=rss_after, host_store_after_wake=devmem.stats().host_store_bytes)
        if bad or (not freed_ok and entry != "vllm_cumem"):
            print(f"CHECK FAILED: {scenario}/{policy} cycle {cycle}: {bad} tensors differ, freed {free1 - free0}",
                  file=sys.stderr)

    if policy == "keep" and entry == "module":
        # The baseline for the cold sleep, measured in this process after the cycles.
        threads = min(os.cpu_count() or 4, 16)
        record("populate", w_alloc, populate_seconds(w_alloc, threads), threads=threads)

    if scenario == "S1" and policy == "keep" and entry == "module":
        # Discard-only: the KV cache alone, weights stay mapped.
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            devmem.discard("kv_cache")
            ds = time.perf_counter() - t0
            t0 = time.perf_counter()
            devmem.wake_up("kv_cache")
            dw = time.perf_counter() - t0
            record("discard_sleep", kv_alloc, ds, allocations=cfg["kv_n"])
            record("discard_wake", kv_alloc, dw, allocations=cfg["kv_n"])
        # my_malloc + my_free of 32 MiB through the C entry points.
        lib = devmem._lib.load()
        mallocs, frees = [], []
        for _ in range(200):
            t0 = time.perf_counter_ns()
            p = lib.my_malloc(32 * MIB, 0, None)
            t1 = time.perf_counter_ns()
            lib.my_free(p, 32 * MIB, 0, None)
            t2 = time.perf_counter_ns()
            if not p:
                raise RuntimeError(devmem._lib.last_message())
            mallocs.append((t1 - t0) / 1e9)
            frees.append((t2 - t1) / 1e9)
        record("my_malloc_32MiB", 32 * MIB, statistics.median(mallocs), p99=sorted(mallocs)[197])
        record("my_free_32MiB", 32 * MIB, statistics.median(frees), p99=sorted(frees)[197])

    del weights, kv, scratch
    release()
    print(json.dumps(records))


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------

TARGETS = {(s, p): 0.95 for s in ("S1", "S2", "S3") for p in ("warm_sleep", "warm_wake")}


def summarize(records, raw):
    """Adds raw_GBps and ratio, collapses warm cycles to their median, evaluates targets."""
    out = []
    by_key = {}
    for r in records:
        by_key.setdefault((r["scenario"], r["policy"], r.get("entry", "module"), r["phase"]), []).append(r)
    for (scenario, policy, entry, phase), rs in by_key.items():
        r = dict(rs[0])
        r["seconds"] = statistics.median(x["seconds"] for x in rs)
        r["samples"] = len(rs)
        r["all_seconds"] = [x["seconds"] for x in rs]
        direction = "d2h" if phase.endswith("sleep") else "h2d"
        if phase.endswith("_sleep") or phase.endswith("_wake"):
            r["raw_GBps"] = raw[direction]
            r["GBps"] = r["bytes"] / r["seconds"] / 1e9
            r["ratio"] = r["GBps"] / r["raw_GBps"]
        else:
            r["raw_GBps"] = None
            r["GBps"] = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] else None
            r["ratio"] = None
        target = TARGETS.get((scenario, phase))
        if target is not None and policy in ("keep", "reserve") and entry != "vllm_cumem":
            r["target"] = f"ratio >= {target}"
            r["met"] = r["ratio"] >= target
        out.append(r)
    # Cold sleep against populating the same bytes of fresh huge-page memory (same process).
    for r in out:
        if r["phase"] == "cold_sleep" and r["policy"] == "keep":
            prep = next((x for x in out if x["scenario"] == r["scenario"] and x["policy"] == "keep"
                         and x["phase"] == "populate" and x["entry"] == r["entry"]), None)
            if prep:
                r["populate_seconds"] = prep["seconds"]
                r["vs_populate"] = r["seconds"] / prep["seconds"]
                r["target"] = "seconds <= 1.3 x populating the same bytes of fresh huge-page memory"
                r["met"] = r["vs_populate"] <= 1.3
        if r["phase"] == "cold_sleep" and r["policy"] == "reserve":
            warm = next((x for x in out if x["scenario"] == r["scenario"] and x["policy"] == "reserve"
                         and x["phase"] == "warm_sleep" and x["entry"] == r["entry"]), None)
            if warm:
                r["vs_warm"] = r["seconds"] / warm["seconds"]
                r["target"] = "within 10% of the warm sleep"
                r["met"] = r["vs_warm"] <= 1.10
        if r["phase"] == "discard_sleep":
            r["target"], r["met"] = "<= 20 ms", r["seconds"] <= 0.020
        if r["phase"] == "discard_wake":
            r["target"], r["met"] = "<= 30 ms", r["seconds"] <= 0.030
        if r["phase"].startswith("my_"):
            r["target"], r["met"] = "median <= 30 us", r["seconds"] <= 30e-6
        if r["phase"] == "warm_wake" and r["policy"] == "release":
            growth = r["rss_after_wake"] - r["rss_before_first_sleep"]
            r["rss_growth"] = growth
            r["target"], r["met"] = "RSS after wake within 64 MiB of before the first sleep", abs(growth) <= 64 * MIB
        if r["phase"] in ("cold_sleep", "warm_sleep") and r["policy"] == "keep":
            r["store_over_offloaded"] = r["host_store_bytes"] - r["bytes"]
    return out


def print_table(rows, raw, device):
    print(f"\n{device}; raw pinned bandwidth: D2H {raw['d2h']:.1f} GB/s, H2D {raw['h2d']:.1f} GB/s")
    print(f"{'scen':4} {'entry':18} {'policy':8} {'phase':16} {'GiB':>6} {'ms':>9} {'GB/s':>7} {'ratio':>6}  target / result")
    for r in rows:
        gbps = f"{r['GBps']:.1f}" if r.get("GBps") else ""
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else ""
        extra = ""
        if "target" in r:
            extra = f"{r['target']}: {'MET' if r['met'] else 'MISSED'}"
            if "vs_populate" in r:
                extra += f" ({r['vs_populate']:.2f}x)"
            if "vs_warm" in r:
                extra += f" ({r['vs_warm']:.2f}x)"
            if "rss_growth" in r:
                extra += f" ({r['rss_growth'] / MIB:+.0f} MiB)"
        print(f"{r['scenario']:4} {r['entry']:18} {r['policy']:8} {r['phase']:16} {r['bytes'] / GIB:6.2f} {r['seconds'] * 1e3:9.3f} "
              f"{gbps:>7} {ratio:>6}  {extra}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("SCENARIO", "POLICY", "ENTRY"))
    parser.add_argument("--entries", default="module,CuMemAllocator,vllm_backend,torch_memory_saver")
    parser.add_argument("--out", default=None)
    parser.add_argument("--scenarios", default="S1,S2,S3")
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    if args.child:
        run_child(*args.child)
        return 0

    import torch

    device = torch.cuda.get_device_name()
    raw_start = raw_bandwidth(torch)
    records, failures = [], []
    for scenario in args.scenarios.split(","):
        for policy, entry in [(p, e) for e in args.entries.split(",") for p in args.policies.split(",")]:
            cmd = [sys.executable, __file__, "--child", scenario, policy, entry]
            env = dict(os.environ)
            if entry == "torch_memory_saver_preload":
                # As torch_memory_saver's users start a preload-mode process.
                import devmem.torch_memory_saver as tms_module

                with tms_module.configure_subprocess():
                    env["LD_PRELOAD"] = os.environ.get("LD_PRELOAD", "")
                    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if out.returncode != 0 or "CHECK FAILED" in out.stderr:
                failures.append((scenario, policy, entry, out.stderr[-2000:]))
                print(f"{scenario}/{policy}/{entry}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
            lines = [l for l in out.stdout.splitlines() if l.startswith("[")]
            if lines:
                records.extend(json.loads(lines[-1]))
            print(f"{scenario}/{policy}/{entry}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    raw_end = raw_bandwidth(torch)
    raw = {k: (raw_start[k] + raw_end[k]) / 2 for k in raw_start}
    rows = summarize(records, raw)
    print_table(rows, raw, device)
    thp = ""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        pass
    meta = dict(device=device, torch=torch.__version__, raw_start=raw_start, raw_end=raw_end, thp=thp,
                command=" ".join([os.path.basename(sys.executable)] + sys.argv), failures=failures)
    print(f"\nthp: {thp}; raw at start {raw_start}, at end {raw_end}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".meta.json", "w") as f:
            json.dump(meta, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
