"""PyTorch scenarios on a real GPU, one per process: ``python scenarios.py NAME``.

Each prints what it measured and exits 0 only when every check held. test_torch_gpu.py runs
them and also checks the exit status and that nothing printed "pure virtual method called".
"""

import ctypes
import os
import sys
import time

import torch

import devmem

GIB = 1 << 30


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"  ok: {what}")


def tensors():
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = [torch.randn(64 << 20, device="cuda") for _ in range(8)]  # 8 x 256 MiB
    with alloc.use_memory_pool("kv_cache"):
        kv = [torch.empty(128 << 20, dtype=torch.float16, device="cuda") for _ in range(4)]  # 1 GiB
    torch.cuda.synchronize()
    ref = [t.cpu() for t in w]
    ptrs = [t.data_ptr() for t in w]
    check(devmem.allocation_info(ptrs[0]).tag == "weights", "weight tensors carry the weights tag")
    check(devmem.allocation_info(kv[0].data_ptr()).tag == "kv_cache", "kv tensors carry the kv_cache tag")
    free0, _ = torch.cuda.mem_get_info()
    t0 = time.perf_counter()
    alloc.sleep(offload_tags=("weights",))
    sleep_s = time.perf_counter() - t0
    free1, _ = torch.cuda.mem_get_info()
    print(f"  sleep freed {(free1 - free0) / GIB:.2f} GiB by mem_get_info in {sleep_s:.3f} s")
    check(free1 - free0 >= 0.99 * 3 * GIB, "mem_get_info shows the 3 GiB of tensors freed")
    t0 = time.perf_counter()
    alloc.wake_up()
    wake_s = time.perf_counter() - t0
    print(f"  wake in {wake_s:.3f} s")
    check([t.data_ptr() for t in w] == ptrs, "same addresses after wake")
    check(all(torch.equal(t.cpu(), r) for t, r in zip(w, ref)), "every weight byte identical after wake")
    for t in kv:
        t.fill_(2.0)
    check(all(float(t.float().mean()) == 2.0 for t in kv), "kv cache tensors usable after wake")
    usage = alloc.get_current_usage()
    check(usage >= 3 * GIB, f"get_current_usage {usage} covers the tensors")


def model():
    alloc = devmem.CuMemAllocator.get_instance()
    torch.manual_seed(0)
    with alloc.use_memory_pool("weights"):
        net = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)]).cuda()
    x = torch.randn(64, 4096, device="cuda")
    cpu_state = {k: v.cpu().clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        before = net(x)
        alloc.sleep(offload_tags=("weights",))
        alloc.wake_up()
        after_offload = net(x)
        check(torch.equal(before, after_offload), "bit-identical outputs after a weights-offload sleep")
        alloc.sleep(offload_tags=())  # level-2 style: weights discarded
        check(devmem.allocation_info(net[0].weight.data_ptr()).state == devmem.State.DISCARDED, "weights discarded")
        alloc.wake_up()
        net.load_state_dict(cpu_state)
        after_reload = net(x)
        check(torch.equal(before, after_reload), "bit-identical outputs after discard, wake and reload")


def graph():
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = torch.randn(4096, 4096, device="cuda")
        static_in = torch.randn(256, 4096, device="cuda")
    expected = static_in @ w
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        static_in @ w  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    with alloc.capture_graph(g, tag="cudagraph"):
        out = static_in @ w
    torch.cuda.synchronize()
    graph_tags = {a.tag for a in devmem.allocations()}
    check("cudagraph" in graph_tags, f"graph capture memory is tagged ({sorted(graph_tags)})")
    check(devmem.allocation_info(out.data_ptr()).tag == "cudagraph", "the graph's output lives in the cudagraph pool")
    alloc.sleep(offload_tags=("weights", "cudagraph"))
    check(devmem.stats("cudagraph").mapped_bytes.current == 0, "graph memory sleeps too")
    alloc.wake_up()
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    check(torch.allclose(out, expected, rtol=1e-3, atol=1e-3), "the CUDA graph replays correctly after wake")


def expandable():
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    check("expandable_segments:True" in conf and "max_split_size_mb:256" in conf, f"started with {conf!r}")
    torch.cuda.init()
    split = lambda: torch.cuda.memory_stats().get("max_split_size")  # noqa: E731
    before = split()
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        inside = split()
        w = torch.randn(32 << 20, device="cuda")
    after = split()
    print(f"  max_split_size before {before}, inside {inside}, after {after}")
    check(before == inside == after == 256 << 20, "max_split_size_mb survives entering and leaving the pool")
    check(devmem.allocation_info(w.data_ptr()).tag == "weights", "the pool allocated through devmem")
    ref = w.cpu()
    alloc.sleep(offload_tags=("weights",))
    alloc.wake_up()
    check(torch.equal(w.cpu(), ref), "sleep/wake works with expandable segments requested")
    y = torch.randn(64 << 20, device="cuda")  # outside the pool: expandable segments back on
    check(devmem.stats().allocations.current >= 1 and y.is_cuda, "ordinary allocations still work")
    try:
        with alloc.use_memory_pool("weights"):
            raise KeyError("body fails")
    except KeyError:
        pass
    check(split() == 256 << 20 and alloc.current_tag == "default", "settings and tag restored after an exception")


def profiling():
    baseline = devmem.MemorySnapshot()
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = torch.randn(256 << 20, device="cuda")  # 1 GiB
    weights = torch.cuda.memory_allocated()
    with devmem.memory_profiling(baseline, weights_memory=weights) as result:
        act = torch.randn(128 << 20, device="cuda")  # 512 MiB peak activation
        del act
    print(f"  {result.non_kv_cache_memory / GIB:.2f} GiB non-KV, peak increase {result.torch_peak_increase / GIB:.2f} GiB, "
          f"non-torch increase {result.non_torch_increase / GIB:.2f} GiB")
    check(result.torch_peak_increase >= 512 << 20, "peak activation memory seen")
    snap = devmem.MemorySnapshot()
    check(snap.devmem_tags["weights"].mapped >= 1 << 30, "devmem's per-tag numbers in the snapshot")
    check(snap.torch_memory >= 1 << 30, "torch memory includes the devmem pool")
    del w


def bad_input():
    alloc = devmem.CuMemAllocator.get_instance()
    for bad in (["weights"], b"weights", 5):
        try:
            with alloc.use_memory_pool(bad):
                pass
        except TypeError as err:
            print(f"  ok: use_memory_pool({bad!r}) -> TypeError: {err}")
        else:
            raise AssertionError(f"use_memory_pool({bad!r}) did not raise")
    with alloc.use_memory_pool("weights"):
        w = torch.ones(1 << 20, device="cuda")
    alloc.sleep("weights")
    alloc.sleep("weights")  # asleep: no-op
    alloc.wake_up()
    alloc.wake_up()  # awake: no-op
    check(float(w.sum()) == float(1 << 20), "double sleep and double wake are no-ops")
    alloc.release_pools()
    try:
        with alloc.use_memory_pool("weights"):
            pass
    except devmem.InvalidStateError as err:
        print(f"  ok: use_memory_pool after release_pools -> InvalidStateError: {err}")
    else:
        raise AssertionError("use_memory_pool after release_pools did not raise")


def _digest(t):
    return int(t.view(torch.int64).sum().item())


def shared_store():
    """The shared store on the real driver: the region is pinned with cuMemHostRegister,
    sleep/wake go through it, close removes it; read-only tags skip the copy and verification
    (the PTX checksum kernel) catches a write."""
    name = f"gpu-{os.getpid()}"
    path = f"/dev/shm/devmem-{os.geteuid()}/devmem-{name}.region"
    devmem.open_shared_store(name, GIB + (64 << 20))
    check(os.path.exists(path), "the region exists while open")
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    w.view(torch.int64).random_()
    ref = _digest(w)
    alloc.sleep(offload_tags=("weights",))
    t = devmem.last_transfer()
    check(t.bytes_saved == GIB, "the first sleep copies the weights into the region")
    alloc.wake_up()
    check(_digest(w) == ref, "bytes intact after a wake from the region")
    devmem.set_read_only("weights", devmem.ReadOnly.VERIFY)
    alloc.sleep(offload_tags=("weights",))  # copies again: the kept copy has a checksum now
    alloc.wake_up()
    alloc.sleep(offload_tags=("weights",))
    t = devmem.last_transfer()
    check((t.bytes_saved, t.bytes_skipped, t.verify_mismatches) == (0, GIB, 0),
          f"verified read-only sleep skips the copy ({t.seconds * 1e3:.1f} ms)")
    alloc.wake_up()
    w[4096] ^= 0x10
    ref = _digest(w)
    alloc.sleep(offload_tags=("weights",))
    t = devmem.last_transfer()
    check((t.bytes_saved, t.verify_mismatches) == (GIB, 1), "the device checksum sees one changed byte")
    alloc.wake_up()
    check(_digest(w) == ref, "the changed byte was saved and restored")
    devmem.set_read_only("weights", False)
    del w
    alloc.release_pools()
    devmem.close_shared_store()
    check(not os.path.exists(path), "the last user's close removed the region")


def durable_write():
    name = os.environ["DEVMEM_GPU_REGION"]
    devmem.open_shared_store(name, GIB + (64 << 20), keep=True)
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    w.view(torch.int64).random_()
    devmem.name_tensors({"w": w})
    with open(os.environ["DEVMEM_GPU_DIGEST"], "w") as f:
        f.write(str(_digest(w)))
    alloc.sleep(offload_tags=("weights",))
    check(True, "slept into a kept region; exiting without waking")
    os._exit(0) if os.environ.get("DEVMEM_GPU_HARD_EXIT") else None


def durable_read():
    name = os.environ["DEVMEM_GPU_REGION"]
    devmem.open_shared_store(name, GIB + (64 << 20))
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        w = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    expect_error = os.environ.get("DEVMEM_GPU_EXPECT") == "checksum"
    devmem.name_tensors({"w": w})
    try:
        devmem.restore_from_store("weights")
    except devmem.RegionError as err:
        check(expect_error and "fail their checksum" in str(err), f"corrupted copy refused: {err}")
    else:
        check(not expect_error, "restore succeeded")
        with open(os.environ["DEVMEM_GPU_DIGEST"]) as f:
            check(_digest(w) == int(f.read()), "identical bytes in the new process")
    del w
    alloc.release_pools()
    devmem.close_shared_store()


def durable():
    """Durable sleep on the real driver: a process sleeps 1 GiB into a kept region and exits;
    a new one restores identical bytes (checksum verified on the device). Then the same with
    one byte of the region file changed: the device checksum refuses it."""
    import subprocess

    for corrupt in (False, True):
        name = f"gpu-durable-{os.getpid()}-{int(corrupt)}"
        env = dict(os.environ, DEVMEM_GPU_REGION=name, DEVMEM_GPU_DIGEST=f"/tmp/{name}.digest")
        run = lambda which, **extra: subprocess.run(  # noqa: E731
            [sys.executable, __file__, which], env=dict(env, **extra), capture_output=True, text=True, timeout=300)
        out = run("durable_write", DEVMEM_GPU_HARD_EXIT="1")
        check(out.returncode == 0, f"writer exited: {out.stderr[-2000:]}")
        path = f"/dev/shm/devmem-{os.geteuid()}/devmem-{name}.region"
        check(os.path.exists(path), "the kept region outlived the writer")
        if corrupt:
            with open(path, "r+b") as f:
                f.seek((2 << 20) + 777)
                b = f.read(1)
                f.seek((2 << 20) + 777)
                f.write(bytes([b[0] ^ 1]))
        out = run("durable_read", **({"DEVMEM_GPU_EXPECT": "checksum"} if corrupt else {}))
        print(out.stdout)
        check(out.returncode == 0 and "durable_read: PASS" in out.stdout, f"reader: {out.stderr[-2000:]}")
        check(not os.path.exists(path), "the reader (last user, not keeping) removed the region")


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)


IDENTITY_BYTES = 768 << 20
PROMPT = [[1, 306, 4658, 278, 6593, 310, 2834, 338]]


def _logits_digest(model):
    with torch.no_grad():
        out = model(torch.tensor(PROMPT, device="cuda")).logits
    return float(out.double().abs().sum())


def identity_write():
    """A real model (Llama from its config, bf16, ~300 MB) allocated in devmem's weights pool,
    its named parameters slept into a kept region; the process exits without waking."""
    import json

    from transformers import LlamaForCausalLM

    name = os.environ["DEVMEM_GPU_REGION"]
    devmem.open_shared_store(name, IDENTITY_BYTES, keep=True)
    alloc = devmem.CuMemAllocator.get_instance()
    torch.manual_seed(0)
    with alloc.use_memory_pool("weights"):
        model = LlamaForCausalLM(_llama_config()).to(dtype=torch.bfloat16, device="cuda")
    named = dict(model.named_parameters())
    devmem.name_tensors(named)
    record = {"digests": {n: _digest(p.detach()) for n, p in named.items()}, "logits": _logits_digest(model)}
    with open(os.environ["DEVMEM_GPU_DIGEST"], "w") as f:
        json.dump(record, f)
    alloc.sleep(offload_tags=("weights",))
    check(True, f"{len(named)} named parameters slept into a kept region; exiting without waking")
    print("identity_write: PASS", flush=True)  # os._exit skips the dispatcher's PASS line
    os._exit(0)


def identity_read():
    """A new process allocates the same parameters in the reverse order, behind a pad, with
    initialisation kernels still queued; a restore as the wrong rank is refused with nothing
    copied; the right one fills every parameter by name; the model built over them computes
    the writer's logits."""
    import json

    from transformers import LlamaForCausalLM

    name = os.environ["DEVMEM_GPU_REGION"]
    with open(os.environ["DEVMEM_GPU_DIGEST"]) as f:
        record = json.load(f)
    devmem.open_shared_store(name, IDENTITY_BYTES)
    with torch.device("meta"):
        shapes = {n: (p.shape, torch.bfloat16) for n, p in LlamaForCausalLM(_llama_config()).named_parameters()}
    alloc = devmem.CuMemAllocator.get_instance()
    with alloc.use_memory_pool("weights"):
        pad = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
        params = {n: torch.empty(shape, dtype=dtype, device="cuda") for n, (shape, dtype) in reversed(list(shapes.items()))}
    for t in params.values():
        t.normal_()  # queued initialisation kernels, not synchronised: the restore must order after them
    devmem.name_tensors(params)
    probe = next(iter(params.values()))
    torch.cuda.synchronize()
    before = _digest(probe)
    try:
        devmem.restore_from_store("weights", rank=1, world=2)
    except devmem.DevmemError as err:
        check(_digest(probe) == before, f"the wrong rank is refused, nothing copied: {type(err).__name__}: {str(err)[:200]}")
    else:
        check(False, "a restore as rank 1 of 2 was accepted")
    for t in params.values():
        t.normal_()
    t0 = time.perf_counter()
    result = devmem.restore_from_store("weights")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in params.values())
    bad = [n for n, t in params.items() if _digest(t) != record["digests"][n]]
    check(not bad, f"{len(params)} parameters restored by name in reverse allocation order after queued kernels "
                   f"({nbytes / GIB:.2f} GiB in {seconds:.3f} s, {nbytes / seconds / 1e9:.1f} GB/s; {result})")
    model = LlamaForCausalLM(_llama_config()).to(dtype=torch.bfloat16, device="cuda")  # PyTorch's own pool
    for n, p in model.named_parameters():
        p.data = params[n]  # the model computes over the restored devmem tensors
    logits = _logits_digest(model)
    check(abs(logits - record["logits"]) <= 1e-6 * abs(record["logits"]),
          f"the model over the restored parameters computes the writer's logits ({logits:.6e})")
    del pad, params, model
    alloc.release_pools()
    devmem.close_shared_store()


def identity():
    """Restore by identity on the real driver with a real model (see identity_write/read)."""
    import subprocess

    name = f"gpu-identity-{os.getpid()}"
    env = dict(os.environ, DEVMEM_GPU_REGION=name, DEVMEM_GPU_DIGEST=f"/tmp/{name}.json")
    for which in ("identity_write", "identity_read"):
        out = subprocess.run([sys.executable, __file__, which], env=env, capture_output=True, text=True, timeout=300)
        print(out.stdout)
        check(out.returncode == 0 and f"{which}: PASS" in out.stdout, f"{which}: {out.stderr[-3000:]}")


if __name__ == "__main__":
    name = sys.argv[1]
    print(f"{name}: torch {torch.__version__} on {torch.cuda.get_device_name()}")
    globals()[name]()
    print(f"{name}: PASS")
    sys.stdout.flush()
