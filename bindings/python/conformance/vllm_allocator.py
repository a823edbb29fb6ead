"""vLLM 0.33's sleep-mode allocator contract as runnable scenarios.

The same scenarios run against vLLM's own ``CuMemAllocator`` and against devmem's, through a
*harness* that allocates and inspects memory:

* ``TorchHarness``: tensors from ``allocator.use_memory_pool(tag)`` on a GPU (either class);
* ``tests/test_vllm_conformance.py`` adds an emulator harness (``devmem.malloc`` under a tag),
  so CI checks devmem's class without a GPU; scenarios that need PyTorch pools say so.

A harness provides: ``allocator``, ``alloc(tag, nbytes) -> buffer`` (``buffer.ptr``),
``fill(buf, byte)``, ``holds(buf, byte) -> bool``, ``free(buf)``, ``device_free() -> int``,
``logger_name`` (where the allocator logs warnings), ``settle(tags)`` (re-enter each tag's pool
once, so the trimming a re-entry does happens before a measurement) and ``needs_torch(what)``
(skips when the harness has no PyTorch pools).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List

MIB = 1 << 20
SIZE = 32 * MIB  # a multiple of 2 MiB: one PyTorch segment, one driver allocation


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _asleep(h: Any, buf: Any) -> bool:
    return bool(h.allocator.pointer_to_data[buf.ptr].is_asleep)


def sleep_offloads_default_tag_and_frees_everything(h: Any) -> None:
    a = h.allocator
    d = h.alloc("default", SIZE)
    kv = h.alloc("kv_cache", SIZE)
    h.fill(d, 0x11)
    h.fill(kv, 0x22)
    before = h.device_free()
    a.sleep()  # None means ("default",)
    assert _asleep(h, d) and _asleep(h, kv)
    assert h.device_free() - before >= 2 * SIZE, "sleep frees both allocations"
    a.wake_up()
    assert not _asleep(h, d) and not _asleep(h, kv)
    assert h.holds(d, 0x11), "the default tag is offloaded and restored"
    h.free(d)
    h.free(kv)


def selective_wake_restores_every_non_deferrable_tag(h: Any) -> None:
    a = h.allocator
    w = h.alloc("weights", SIZE)
    rt = h.alloc("runtime", SIZE)
    kv = h.alloc("kv_cache", SIZE)
    h.fill(w, 0x31)
    h.fill(rt, 0x32)
    a.sleep(offload_tags=("weights", "runtime"))  # vLLM's level 1 (without graphs)
    a.wake_up(["weights"])
    assert not _asleep(h, w) and not _asleep(h, rt), "runtime wakes with any wake"
    assert _asleep(h, kv), "kv_cache is deferrable and was not asked for"
    assert h.holds(w, 0x31) and h.holds(rt, 0x32)
    a.wake_up(["kv_cache"])
    assert not _asleep(h, kv)
    h.fill(kv, 0x33)
    assert h.holds(kv, 0x33)
    for b in (w, rt, kv):
        h.free(b)


def discard_releases_only_the_given_tags(h: Any) -> None:
    a = h.allocator
    w = h.alloc("weights", SIZE)
    kv = h.alloc("kv_cache", SIZE)
    h.fill(w, 0x41)
    before = h.device_free()
    a.discard(("kv_cache",))
    assert _asleep(h, kv) and not _asleep(h, w)
    assert h.device_free() - before >= SIZE
    assert h.holds(w, 0x41)
    a.discard("kv_cache")  # a str is one tag; already asleep: nothing to do
    a.wake_up(["kv_cache"])
    assert not _asleep(h, kv)
    h.free(w)
    h.free(kv)


def sleeping_again_keeps_the_policy_and_warns(h: Any) -> None:
    a = h.allocator
    w = h.alloc("weights", SIZE)
    h.fill(w, 0x51)
    a.sleep(offload_tags=("weights",))
    handler = _Warnings()
    logger = logging.getLogger(h.logger_name)
    logger.addHandler(handler)
    try:
        a.sleep(offload_tags=())  # would discard weights: the earlier offload wins
    finally:
        logger.removeHandler(handler)
    assert any("policy" in m for m in handler.messages), handler.messages
    a.wake_up()
    assert h.holds(w, 0x51), "the backup survived the second sleep"
    h.free(w)


def usage_and_pointer_to_data_track_allocations(h: Any) -> None:
    a = h.allocator
    h.settle(("weights", "kv_cache"))  # earlier free segments are trimmed now, not mid-count
    base = a.get_current_usage()
    w = h.alloc("weights", SIZE)
    kv = h.alloc("kv_cache", 2 * SIZE)
    assert a.get_current_usage() - base == 3 * SIZE
    view = a.pointer_to_data
    assert view[w.ptr].tag == "weights" and view[kv.ptr].tag == "kv_cache"
    assert view[w.ptr].handle[1] == SIZE and view[kv.ptr].handle[1] == 2 * SIZE
    assert w.ptr in view and kv.ptr in view
    a.sleep(offload_tags=("weights",))
    assert view[w.ptr].is_asleep and view[kv.ptr].is_asleep
    assert a.get_current_usage() - base == 3 * SIZE, "asleep allocations still count"
    a.wake_up()
    assert not view[w.ptr].is_asleep
    h.free(w)
    h.free(kv)


def reentering_a_tag_trims_free_segments_of_its_older_pools(h: Any) -> None:
    h.needs_torch("free cached segments live in PyTorch pools")
    a = h.allocator
    keep = h.alloc("weights", SIZE)
    scratch = h.alloc("weights", 4 * SIZE)
    ptr = scratch.ptr
    usage = a.get_current_usage()
    h.free(scratch)  # back to its pool's cache: still device memory
    assert ptr in a.pointer_to_data
    before = h.device_free()
    with a.use_memory_pool("weights"):  # re-entry: the older pool is trimmed
        pass
    assert ptr not in a.pointer_to_data, "the free segment was released"
    assert keep.ptr in a.pointer_to_data, "a segment in use is kept"
    assert usage - a.get_current_usage() == 4 * SIZE
    assert h.device_free() - before >= 4 * SIZE
    h.free(keep)


def cudagraph_pool_is_a_context_manager_yielding_the_pool_id(h: Any) -> None:
    h.needs_torch("graph capture")
    import torch

    a = h.allocator
    with a.use_memory_pool("weights"):
        x = torch.full((1 << 20,), 2.0, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = x * 3  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with a.cudagraph_pool() as pool:
        assert isinstance(pool, tuple), f"pool id is a tuple, got {type(pool)}"
        with torch.cuda.graph(g, pool=pool):
            y = x * 3
    tags = {d.tag for d in a.pointer_to_data.values()}
    assert "cudagraph" in tags, f"graph memory is tagged cudagraph: {tags}"
    a.sleep(offload_tags=("weights", "runtime", "cudagraph"))
    a.wake_up(["weights"])
    x.fill_(5.0)
    g.replay()
    torch.cuda.synchronize()
    assert float(y[0]) == 15.0 and float(y[-1]) == 15.0


SCENARIOS: Dict[str, Callable[[Any], None]] = {
    f.__name__: f
    for f in (
        sleep_offloads_default_tag_and_frees_everything,
        selective_wake_restores_every_non_deferrable_tag,
        discard_releases_only_the_given_tags,
        sleeping_again_keeps_the_policy_and_warns,
        usage_and_pointer_to_data_track_allocations,
        reentering_a_tag_trims_free_segments_of_its_older_pools,
        cudagraph_pool_is_a_context_manager_yielding_the_pool_id,
    )
}


class TorchHarness:
    """Tensors from ``allocator.use_memory_pool(tag)`` on the current CUDA device."""

    def __init__(self, allocator: Any, logger_name: str) -> None:
        import torch

        self.torch = torch
        self.allocator = allocator
        self.logger_name = logger_name

    class _Buf:
        def __init__(self, t: Any) -> None:
            self.t = t
            self.ptr = t.data_ptr()

    def alloc(self, tag: str, nbytes: int) -> Any:
        with self.allocator.use_memory_pool(tag=tag):
            t = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        return self._Buf(t)

    def fill(self, buf: Any, byte: int) -> None:
        buf.t.fill_(byte)
        self.torch.cuda.synchronize()

    def holds(self, buf: Any, byte: int) -> bool:
        return bool((buf.t == byte).all().item())

    def free(self, buf: Any) -> None:
        buf.t = None
        self.torch.cuda.synchronize()

    def device_free(self) -> int:
        self.torch.cuda.synchronize()
        return int(self.torch.cuda.mem_get_info()[0])

    def settle(self, tags: Any) -> None:
        for tag in tags:
            with self.allocator.use_memory_pool(tag=tag):
                pass
        self.torch.cuda.synchronize()

    def needs_torch(self, what: str) -> None:
        return None
