"""Engine integration on real GPUs, one check per process: ``python engines.py NAME [ARGS]``.

  conformance devmem|vllm   vLLM 0.33's allocator contract (conformance/vllm_allocator.py)
                            against devmem's CuMemAllocator or vLLM's own class
  plugin                    vLLM's plugin loader and sleep-mode backend module (from the wheel)
                            driving devmem with PyTorch tensors
  multi_device              one process, two devices: tagged pools on each, sleep/wake, bytes
                            and mem_get_info checked per device
  graphs                    vLLM 0.33's capture_pool (from the wheel) with --sleep-mode-backend
                            devmem --sleep-mode-offload-cudagraph: a real CUDA graph captured
                            into devmem's "cudagraph" pool, sleep levels 1 and 2 through the
                            backend, graph memory freed and restored, replay correct
                            (VLLM_GRAPHS_TREE: a tree built with with_graphs=True; needs pydantic)
  tp2                       two ranks with NCCL: all_reduce of pool tensors before and after
                            each sleep/wake cycle, per-rank times (JSON lines)

Needs PYTHONPATH to hold bindings/python and, for vllm/plugin, a tree built by
conformance/vllm_tree.py (VLLM_TREE). Prints what it checked; exits non-zero on any failure.
"""

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))
GIB = 1 << 30
MIB = 1 << 20


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"  ok: {what}", flush=True)


def conformance(which):
    from conformance import vllm_allocator as contract

    if which == "vllm":
        sys.path.insert(0, os.environ["VLLM_TREE"])
        from vllm.device_allocator.cumem import CuMemAllocator

        harness = contract.TorchHarness(CuMemAllocator.get_instance(), "vllm.device_allocator.cumem")
    else:
        import devmem

        harness = contract.TorchHarness(devmem.CuMemAllocator.get_instance(), "devmem")
    failed = []
    for name, scenario in contract.SCENARIOS.items():
        try:
            scenario(harness)
            print(f"PASS {which} {name}", flush=True)
        except Exception as err:  # report every scenario, then fail
            failed.append(name)
            print(f"FAIL {which} {name}: {type(err).__name__}: {err}", flush=True)
    print(f"{which}: {len(contract.SCENARIOS) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


def plugin():
    import importlib
    import importlib.metadata

    from conformance import vllm_tree

    tree = os.environ["VLLM_TREE"]
    sys.path.insert(0, tree)
    if "devmem" not in [e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")]:
        # A source tree, not a pip install: declare the entry point as pyproject.toml does.
        vllm_tree.entry_point_dist(tree, os.path.join(HERE, os.pardir, "pyproject.toml"))
        importlib.invalidate_caches()
    import vllm.plugins

    import devmem

    vllm.plugins.load_general_plugins()
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    class ModelConfig:
        sleep_mode_backend = "devmem"

    class VllmConfig:
        model_config = ModelConfig()

    importlib.import_module("vllm.config").set_for_test(VllmConfig())
    import vllm.device_allocator as da

    allocator = da.get_mem_allocator_instance()
    check(allocator is devmem.CuMemAllocator.get_instance(), "get_mem_allocator_instance() is devmem's allocator")
    backend = SleepModeBackendFactory.create_backend(ModelConfig())
    check(type(backend).__name__ == "DevmemSleepModeBackend", "the factory builds devmem's backend by name")
    with allocator.use_memory_pool("weights"):
        w = torch.randn(256 * MIB // 4, device="cuda")
    with allocator.use_memory_pool("kv_cache"):
        kv = torch.ones(512 * MIB // 4, device="cuda")
    ref = w.cpu()
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    t0 = time.perf_counter()
    backend.suspend(1)
    t1 = time.perf_counter()
    freed = torch.cuda.mem_get_info()[0] - free0
    check(freed >= 768 * MIB - 4 * MIB, f"suspend(1) freed {freed / MIB:.0f} MiB in {t1 - t0:.3f} s")
    check(backend.state() == "SUSPENDED", "state SUSPENDED")
    backend.resume(["weights"])
    check(torch.equal(w.cpu(), ref), "weights identical after resume(['weights'])")
    check(devmem.allocation_info(kv.data_ptr()).state == devmem.State.DISCARDED, "kv_cache deferred")
    backend.resume(["kv_cache"])
    kv.fill_(3.0)
    check(float(kv.sum()) == 3.0 * kv.numel(), "kv_cache usable after resume(['kv_cache'])")
    backend.discard(("kv_cache",))
    check(devmem.allocation_info(kv.data_ptr()).state == devmem.State.DISCARDED, "discard releases kv_cache")
    backend.resume()
    backend.suspend(2)
    check(devmem.allocation_info(w.data_ptr()).state == devmem.State.DISCARDED, "suspend(2) discards weights")
    backend.resume()
    check(backend.state() == "RUNNING", "state RUNNING")
    return 0


def graphs():
    """A real CUDA graph through vLLM's own capture_pool with devmem as the sleep backend."""
    import importlib

    sys.path.insert(0, os.environ["VLLM_GRAPHS_TREE"])
    import devmem
    from devmem import vllm_plugin

    vllm_plugin.register()
    from vllm.compilation.cudagraph_pool import capture_pool
    from vllm.config import CompilationConfig, CUDAGraphMode, ModelConfig, VllmConfig
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    config = VllmConfig(
        model_config=ModelConfig(enable_sleep_mode=True, sleep_mode_backend="devmem", sleep_mode_offload_cudagraph=True),
        compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE),
    )
    importlib.import_module("vllm.config").set_for_test(config)
    check(config.use_cumem_cudagraph_pool is True, "vLLM's use_cumem_cudagraph_pool is True for devmem")
    allocator = devmem.CuMemAllocator.get_instance()
    with allocator.use_memory_pool("weights"):
        w = torch.randn(2048, 2048, device="cuda")
    w_host = w.cpu()
    x = torch.randn(64, 2048, device="cuda")  # the static input, in PyTorch's own pool
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.relu(x @ w)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with capture_pool(None, config) as pool:
        with torch.cuda.graph(g, pool=pool):
            y = torch.relu(x @ w) + 1.0
    g.replay()
    torch.cuda.synchronize()
    ref = y.cpu()
    info = devmem.allocation_info(y.data_ptr())
    check(info.tag == "cudagraph", f"the graph's output lives in devmem's cudagraph pool ({info.size >> 20} MiB allocation)")
    backend = SleepModeBackendFactory.create_backend(config.model_config)
    for level in (1, 2):
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        backend.suspend(level)
        t1 = time.perf_counter()
        freed = torch.cuda.mem_get_info()[0] - free0
        state = devmem.allocation_info(y.data_ptr()).state
        check(state == devmem.State.OFFLOADED, f"level {level}: graph memory offloaded ({state}), {freed >> 20} MiB freed in {t1 - t0:.3f} s")
        check(freed >= info.size + w.numel() * 4, f"level {level}: graph memory and weights went back to the driver")
        backend.resume()
        if level == 2:
            w.copy_(w_host)  # level 2 discards weights: the engine reloads them
        y.zero_()
        g.replay()
        torch.cuda.synchronize()
        check(torch.equal(y.cpu(), ref), f"level {level}: the graph replays after wake without re-capture, output identical")
    return 0


def multi_device():
    import devmem

    n = torch.cuda.device_count()
    if n < 2:
        print(f"SKIP multi_device: {n} device(s)")
        return 0
    alloc = devmem.CuMemAllocator.get_instance()
    tensors, refs = {}, {}
    for d in range(2):
        with torch.cuda.device(d):
            torch.manual_seed(d)
            with alloc.use_memory_pool("weights"):
                tensors[("w", d)] = torch.randn(256 * MIB, device=d)
            with alloc.use_memory_pool("kv_cache"):
                tensors[("kv", d)] = torch.empty(512 * MIB, dtype=torch.uint8, device=d)
            refs[d] = tensors[("w", d)].cpu()
    for d in range(2):
        check(devmem.allocation_info(tensors[("w", d)].data_ptr()).device == d, f"device {d} tensors are devmem's, on device {d}")
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    before = [torch.cuda.mem_get_info(d)[0] for d in range(2)]
    alloc.sleep(offload_tags=("weights",))
    after = [torch.cuda.mem_get_info(d)[0] for d in range(2)]
    for d in range(2):
        freed = after[d] - before[d]
        check(freed >= (1024 + 512) * MIB - 8 * MIB, f"device {d}: sleep freed {freed / MIB:.0f} MiB (mem_get_info)")
    alloc.wake_up()
    for d in range(2):
        check(torch.equal(tensors[("w", d)].cpu(), refs[d]), f"device {d}: weights identical after wake")
        back = before[d] - torch.cuda.mem_get_info(d)[0]
        check(abs(back) <= 8 * MIB, f"device {d}: wake maps the memory again ({back / MIB:+.0f} MiB vs before)")
    return 0


def tp2_rank(rank, world, port, out):
    import torch.distributed as dist

    import devmem

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = torch.full((1 * GIB // 4,), float(rank + 1), device="cuda")
        x = torch.full((64 * MIB // 4,), float(rank + 1), device="cuda")
    with alloc.use_memory_pool("kv_cache"):
        kv = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    expect = float(sum(range(1, world + 1)))
    records = []
    for cycle in range(3):
        y = x.clone()
        dist.all_reduce(y)
        torch.cuda.synchronize()
        assert float(y[0]) == expect and float(y[-1]) == expect, f"all_reduce before cycle {cycle}: {float(y[0])}"
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        alloc.sleep(offload_tags=("weights",))
        t1 = time.perf_counter()
        freed = torch.cuda.mem_get_info()[0] - free0
        alloc.wake_up()
        t2 = time.perf_counter()
        assert float(w.min()) == rank + 1 and float(w.max()) == rank + 1, "weights changed"
        assert float(x.min()) == rank + 1, "all_reduce input changed"
        dist.all_reduce(x_copy := x.clone())
        torch.cuda.synchronize()
        assert float(x_copy[0]) == expect, f"all_reduce after cycle {cycle}: {float(x_copy[0])}"
        records.append(dict(rank=rank, cycle=cycle, sleep_s=t1 - t0, wake_s=t2 - t1, freed_bytes=freed,
                            offloaded_bytes=w.numel() * 4 + x.numel() * 4, discarded_bytes=kv.numel()))
    with open(os.path.join(out, f"tp2_rank{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: 3 cycles, all_reduce correct before and after each, weights intact", flush=True)


def tp2():
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        print("SKIP tp2: fewer than 2 devices")
        return 0
    out = os.environ.get("OUT", "/tmp")
    mp.spawn(tp2_rank, args=(2, 29511, out), nprocs=2, join=True)
    for rank in range(2):
        with open(os.path.join(out, f"tp2_rank{rank}.json")) as f:
            for r in json.load(f):
                print(json.dumps(r))
    return 0


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    sys.exit({"conformance": conformance, "plugin": plugin, "graphs": graphs, "multi_device": multi_device, "tp2": tp2}[name](*args))
