"""CuMemAllocator's pools under nesting and threads (issue 20, finding 9), without PyTorch: a
stand-in for ``torch.cuda`` whose MemPool hands out devmem allocations made under the calling
thread's tag, as PyTorch's caching allocator does through ``my_malloc``, and keeps freed
segments cached. A pool that some context is still inside must never be trimmed; the
allocator's current tag is per thread."""

import contextlib
import threading
import types

import pytest

import devmem
from conftest import EMULATED
from devmem import allocator as allocator_module

pytestmark = pytest.mark.skipif(not EMULATED, reason="runs on the emulator")
MIB = 1 << 20
WAIT = 30  # seconds: a thread that waits longer has deadlocked


class FakePool:
    """A MemPool: segments are devmem allocations; a freed tensor leaves its segment cached."""

    def __init__(self, allocator=None):
        self.allocator = allocator
        self.segments = {}  # address -> bytes in use (0: free, cached for reuse)
        self.on_snapshot = None

    @property
    def id(self):
        return (0, id(self))

    def snapshot(self):
        if self.on_snapshot is not None:
            self.on_snapshot()
        return [{"address": p, "allocated_size": n} for p, n in self.segments.items()]


class FakePluggable:
    def __init__(self, path, alloc_fn, free_fn):
        self.path = path

    def allocator(self):
        return self


class FakeCuda:
    """The parts of ``torch.cuda`` CuMemAllocator uses; the active pool is per thread."""

    MemPool = FakePool

    def __init__(self):
        self._local = threading.local()
        self.memory = types.SimpleNamespace(CUDAPluggableAllocator=FakePluggable)
        self.pools = []

    def is_available(self):
        return True

    def is_initialized(self):
        return False

    def current_device(self):
        return 0

    @contextlib.contextmanager
    def use_mem_pool(self, pool):
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(pool)
        self.pools.append(pool)
        try:
            yield
        finally:
            stack.pop()

    def pool(self):
        return self._local.stack[-1]

    def alloc(self, nbytes):
        """A new segment in the thread's current pool, under the thread's devmem tag."""
        ptr = devmem.malloc(nbytes)
        self.pool().segments[ptr] = nbytes
        return ptr

    def release(self, ptr):
        """The tensor is gone; its segment stays cached in its pool (allocated_size 0)."""
        for pool in self.pools:
            if ptr in pool.segments:
                pool.segments[ptr] = 0

    def current_blas_handle(self):
        """PyTorch's ``current_blas_handle``: the first call on a thread's stream makes the
        cuBLAS workspace through the caching allocator, so in the active pool if there is one."""
        if not hasattr(self._local, "workspace"):
            stack = self._local.__dict__.get("stack")
            self._local.workspace = self.alloc(MIB) if stack else None
        return 1

    def matmul(self):
        """A matrix product: cuBLAS uses the stream's workspace, made at the first product."""
        self.current_blas_handle()
        return self._local.workspace

    def free_all(self):
        for pool in self.pools:
            for ptr in pool.segments:
                devmem.free(ptr)  # trimmed segments too: that releases their address range
            pool.segments.clear()


@pytest.fixture
def fake(monkeypatch):
    cuda = FakeCuda()
    torch = types.SimpleNamespace(cuda=cuda, version=types.SimpleNamespace(hip=None))
    monkeypatch.setattr(allocator_module, "_torch", lambda: torch)
    yield cuda
    cuda.free_all()


def mapped(ptr):
    """Whether ``ptr`` is still a live, mapped devmem allocation (a trimmed one is not)."""
    try:
        return devmem.allocation_info(ptr).state == devmem.State.MAPPED
    except devmem.UnknownPointerError:
        return False


def test_nested_weights_kv_weights_never_trims_the_outer_pool(fake):
    alloc = devmem.CuMemAllocator()
    with alloc.use_memory_pool("weights"):
        outer = fake.pool()
        w = fake.alloc(2 * MIB)
        cached = fake.alloc(2 * MIB)
        fake.release(cached)  # a free segment the outer pool will hand out again
        with alloc.use_memory_pool("kv_cache"):
            kv = fake.alloc(2 * MIB)
            with alloc.use_memory_pool("weights"):
                assert alloc.current_tag == "weights"
                inner = fake.alloc(2 * MIB)
                assert devmem.allocation_info(inner).tag == "weights"
                assert mapped(cached), "entering 'weights' again trimmed the outer 'weights' pool still in use"
            assert alloc.current_tag == "kv_cache" and devmem.current_tag() == "kv_cache"
            assert mapped(cached), "leaving the inner pool trimmed the outer one"
        assert alloc.current_tag == "weights" and devmem.current_tag() == "weights"
        assert fake.pool() is outer
        assert mapped(cached) and mapped(w) and mapped(kv)
        again = fake.alloc(2 * MIB)  # the outer pool goes on allocating
        assert devmem.allocation_info(again).tag == "weights"
    assert alloc.current_tag == "default" and devmem.current_tag() == "default"
    # Leaving the outermost pool trims its free segments; tensors in use stay.
    assert not mapped(cached)
    assert mapped(w) and mapped(again) and mapped(kv) and mapped(inner)
    alloc.release_pools()


def test_two_threads_each_inside_a_pool_keep_their_tags_and_segments(fake):
    alloc = devmem.CuMemAllocator()
    a_inside, b_done = threading.Event(), threading.Event()
    errors = []
    seen = {}

    def thread_a():
        try:
            with alloc.use_memory_pool("weights"):
                seen["a_cached"] = cached = fake.alloc(2 * MIB)
                fake.release(cached)
                a_inside.set()
                assert b_done.wait(WAIT)
                seen["a_tag"] = alloc.current_tag
                seen["a_cached_mapped"] = mapped(cached)
                seen["a_more"] = fake.alloc(2 * MIB)
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            a_inside.set()

    def thread_b():
        try:
            assert a_inside.wait(WAIT)
            with alloc.use_memory_pool("kv_cache"):
                seen["b_tag"] = alloc.current_tag
                seen["b_kv"] = fake.alloc(2 * MIB)
                with alloc.use_memory_pool("weights"):  # A is still inside its weights pool
                    seen["b_w"] = fake.alloc(2 * MIB)
                seen["b_tag_after"] = alloc.current_tag
        except BaseException as err:
            errors.append(err)
        finally:
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    assert a_inside.wait(WAIT)
    assert alloc.current_tag == "default", "another thread's pool changed this thread's tag"
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    assert not errors, errors
    assert seen["a_cached_mapped"], "thread B entering 'weights' trimmed thread A's pool while A allocated from it"
    assert seen["a_tag"] == "weights"
    assert seen["b_tag"] == "kv_cache" and seen["b_tag_after"] == "kv_cache"
    assert devmem.allocation_info(seen["a_more"]).tag == "weights"
    assert devmem.allocation_info(seen["b_kv"]).tag == "kv_cache"
    assert alloc.current_tag == "default"
    assert not mapped(seen["a_cached"]), "A's pool is trimmed once A has left it"
    alloc.release_pools()


def test_re_entering_a_tag_trims_only_pools_nobody_is_inside(fake):
    alloc = devmem.CuMemAllocator()
    with alloc.use_memory_pool("weights"):
        keep = fake.alloc(2 * MIB)
        idle = fake.alloc(2 * MIB)
    fake.release(idle)  # freed after its pool was left: cached in an idle pool
    assert mapped(idle)
    with alloc.use_memory_pool("weights"):
        assert not mapped(idle), "an idle older pool of the tag is trimmed on re-entry"
        assert mapped(keep)
    alloc.release_pools()


def test_pool_table_lock_is_not_held_across_pytorch_calls(fake):
    """A trim asks PyTorch for the pool's segments; another thread entering a pool meanwhile
    must not wait for it (the lock is not held across PyTorch or library calls)."""
    alloc = devmem.CuMemAllocator()
    with alloc.use_memory_pool("weights"):
        pool = fake.pool()
        p = fake.alloc(2 * MIB)
    results = []

    def other():
        with alloc.use_memory_pool("kv_cache"):
            results.append(fake.alloc(2 * MIB))

    def during_snapshot():
        pool.on_snapshot = None
        t = threading.Thread(target=other)
        t.start()
        t.join(WAIT)
        results.append(not t.is_alive())

    pool.on_snapshot = during_snapshot
    with alloc.use_memory_pool("weights"):  # trims the idle older pool: snapshot() runs
        pass
    assert results[-1] is True, "another thread could not enter a pool while one was being trimmed"
    assert devmem.allocation_info(results[0]).tag == "kv_cache" and mapped(p)
    alloc.release_pools()


def test_many_threads_entering_and_leaving_pools_keep_the_table_consistent(fake):
    alloc = devmem.CuMemAllocator()
    barrier = threading.Barrier(8)
    errors = []

    def worker(i):
        try:
            barrier.wait(WAIT)
            for _ in range(5):
                tag = ("weights", "kv_cache")[i % 2]
                with alloc.use_memory_pool(tag):
                    p = fake.alloc(MIB)
                    assert alloc.current_tag == tag and devmem.current_tag() == tag
                    assert mapped(p)
                    fake.release(p)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors, errors
    assert sum(len(v) for v in alloc.allocator_and_pools.values()) == 40
    assert not alloc._users and not alloc._trimming, "every context left, nothing is being trimmed"
    alloc.release_pools()


def test_the_cublas_workspace_is_never_made_inside_a_pool(fake):
    """A trainer's first matrix product runs inside its pool; pausing the trainer must not take
    cuBLAS's workspace with it (CUBLAS_STATUS_EXECUTION_FAILED on the H200 otherwise)."""
    alloc = devmem.CuMemAllocator()
    with alloc.use_memory_pool("train"):
        w = fake.alloc(2 * MIB)
        workspace = fake.matmul()
    assert workspace is None, "the cuBLAS workspace was made inside the 'train' pool"
    alloc.sleep(offload_tags=("train",))
    assert devmem.allocation_info(w).state == devmem.State.OFFLOADED
    alloc.wake_up()
