"""devmem as a vLLM sleep-mode backend, loaded through the ``vllm.general_plugins`` entry point.

Turn it on with ``vllm serve ... --enable-sleep-mode --sleep-mode-backend devmem`` (or
``LLM(..., enable_sleep_mode=True, sleep_mode_backend="devmem")``). vLLM calls :func:`register`
in every process it starts; it

* registers the backend ``devmem`` with vLLM's ``SleepModeBackendFactory``, and
* routes ``vllm.device_allocator.get_mem_allocator_instance()`` to devmem's
  :class:`devmem.CuMemAllocator` in the processes whose engine selected that backend, so the
  weights, KV cache, runtime and LoRA pools vLLM opens are devmem's (modules that imported the
  name before :func:`register` ran are re-pointed; later imports read the routed name), and
* lets ``--sleep-mode-offload-cudagraph`` work with ``devmem``: vLLM's
  ``VllmConfig.use_cumem_cudagraph_pool`` (which sends CUDA-graph capture to the allocator's
  ``"cudagraph"`` pool, offloaded by sleep and restored in place by wake) answers for
  ``devmem`` what vLLM's own condition answers for ``cumem``.

No vLLM file is changed on disk.

Which allocator a process gets is decided once, at its first ``get_mem_allocator_instance()``
call, from the vLLM config in effect: ``get_current_vllm_config_or_none()``, else the
``vllm_config`` of the caller (vLLM's GPU worker opens its first pool before it enters its
config context), else ``DEVMEM_VLLM_ALLOCATOR=1|0``. A later call that sees another choice
raises, because mixing two allocators in one process would leave memory neither can sleep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import types
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger("devmem")

BACKEND_NAME = "devmem"
#: Environment override for processes where no vLLM config is visible: "1" devmem, "0" vLLM's.
ENV_ALLOCATOR = "DEVMEM_VLLM_ALLOCATOR"
#: The name vLLM's modules import from ``vllm.device_allocator`` (vLLM 0.33: the GPU worker,
#: the CUDA-graph pool routing and the LoRA model-runner mixin bind it at import time).
_LOOKUP = "get_mem_allocator_instance"
#: ``VllmConfig``'s property that sends CUDA-graph capture to the allocator's sleeping
#: ``"cudagraph"`` pool; vLLM 0.33 answers True only for ``sleep_mode_backend == "cumem"``.
_GRAPH_POOL_PROPERTY = "use_cumem_cudagraph_pool"

_lock = threading.Lock()
_choice: Optional[bool] = None  # True: devmem's allocator; decided at the first call
_original: Optional[Callable[[], Any]] = None


def _config_selects_devmem(config: Any) -> Optional[bool]:
    model_config = getattr(config, "model_config", None)
    backend = getattr(model_config, "sleep_mode_backend", None)
    return None if backend is None else backend == BACKEND_NAME


def _caller_config() -> Any:
    """The ``vllm_config`` of the frame that asked for the allocator (``self.vllm_config`` of
    a worker, or a local ``vllm_config``), if any."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            break
        local = frame.f_locals
        config = local.get("vllm_config")
        if config is None and "self" in local:
            config = getattr(local["self"], "vllm_config", None)
        if config is not None:
            return config
        frame = frame.f_back
    return None


def _select() -> bool:
    global _choice
    seen: Optional[bool] = None
    try:
        from vllm.config import get_current_vllm_config_or_none

        seen = _config_selects_devmem(get_current_vllm_config_or_none())
    except ImportError:  # pragma: no cover - older vLLM
        pass
    if seen is None:
        seen = _config_selects_devmem(_caller_config())
    if seen is None and os.environ.get(ENV_ALLOCATOR) in ("0", "1"):
        seen = os.environ[ENV_ALLOCATOR] == "1"
    with _lock:
        if _choice is None:
            _choice = bool(seen)
            logger.info("devmem: vLLM's sleep-mode allocator in this process is %s", "devmem" if _choice else "vLLM's")
        elif seen is not None and seen != _choice:
            raise RuntimeError(
                f"devmem: this process already uses {'devmem' if _choice else 'vLLM'}'s sleep-mode allocator, "
                f"but the vLLM config now selects sleep_mode_backend="
                f"{BACKEND_NAME if seen else 'another backend'}; one process cannot mix them "
                f"(set {ENV_ALLOCATOR}=1 or 0 to decide before the first pool is opened)"
            )
        return _choice


def get_mem_allocator_instance() -> Any:
    """vLLM's ``get_mem_allocator_instance``, answering devmem's allocator when devmem is the
    selected sleep-mode backend."""
    if _select():
        from .allocator import CuMemAllocator

        return CuMemAllocator.get_instance()
    assert _original is not None
    return _original()


def _patch_allocator_lookup() -> None:
    global _original
    import vllm.device_allocator as device_allocator

    with _lock:
        current = device_allocator.get_mem_allocator_instance
        if current is not get_mem_allocator_instance:
            # Only the first time: a later call that finds another plugin's wrapper (which may
            # call this function) must not make that wrapper "vLLM's original" (a call cycle).
            if _original is None:
                _original = current
            device_allocator.get_mem_allocator_instance = get_mem_allocator_instance
        original = _original
    if original is None:  # pragma: no cover - another copy of this module routed it
        return
    # Modules imported from now on read the routed name; those imported before bound vLLM's
    # function. Which modules those are depends on the vLLM version and on what the process
    # imported first, so every loaded module that holds vLLM's function under that name is
    # re-pointed (through __dict__: a module's __getattr__ may import things).
    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType) and vars(module).get(_LOOKUP) is original:
            vars(module)[_LOOKUP] = get_mem_allocator_instance


class _View:
    """A read-only view of ``target`` in which the attributes named in ``overrides`` have other
    values."""

    __slots__ = ("_target", "_overrides")

    def __init__(self, target: Any, **overrides: Any) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_target"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"devmem: a view of a vLLM config is read-only (setting {name!r})")


def _graph_pool_for_devmem(original: property) -> property:
    """``original`` (vLLM's ``use_cumem_cudagraph_pool``), also true for ``devmem`` wherever
    vLLM's own condition holds for ``cumem`` (the option, sleep mode, CUDA graphs on, a
    CUDA-like platform): vLLM's code decides, on a view of the config that names ``cumem``.
    For every other backend the answer is vLLM's, unchanged."""
    fget = original.fget
    assert fget is not None

    def use_cumem_cudagraph_pool(self: Any) -> Any:
        answer = fget(self)
        model_config = getattr(self, "model_config", None)
        if answer or getattr(model_config, "sleep_mode_backend", None) != BACKEND_NAME:
            return answer
        return fget(_View(self, model_config=_View(model_config, sleep_mode_backend="cumem")))

    use_cumem_cudagraph_pool.__doc__ = original.__doc__
    use_cumem_cudagraph_pool._devmem_original = original  # type: ignore[attr-defined]
    return property(use_cumem_cudagraph_pool)


def _patch_graph_pool_routing() -> None:
    """Wraps ``VllmConfig.use_cumem_cudagraph_pool`` once per process. vLLM 0.33 reads it where
    it captures graphs (``vllm.compilation.cudagraph_pool.capture_pool``), where it defaults
    ``NCCL_GRAPH_REGISTER`` to 0 (``VllmConfig.__post_init__``) and where custom all-reduce
    leaves graph buffers unregistered (they cannot be IPC-shared); each holds for devmem's
    pool as for vLLM's."""
    try:
        from vllm.config import VllmConfig
    except ImportError as err:
        logger.info("devmem: no vllm.config.VllmConfig (%s): CUDA-graph memory is not routed to devmem", err)
        return
    with _lock:
        current = VllmConfig.__dict__.get(_GRAPH_POOL_PROPERTY)
        if not isinstance(current, property) or current.fget is None:
            logger.info(
                "devmem: this vLLM has no VllmConfig.%s: CUDA-graph memory stays in PyTorch's graph pool",
                _GRAPH_POOL_PROPERTY,
            )
            return
        if not hasattr(current.fget, "_devmem_original"):
            setattr(VllmConfig, _GRAPH_POOL_PROPERTY, _graph_pool_for_devmem(current))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the ``devmem`` sleep-mode backend and
    routes the allocator lookup and the CUDA-graph pool choice. Safe to call more than once."""
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    if BACKEND_NAME not in SleepModeBackendFactory._registry:
        SleepModeBackendFactory.register_backend(BACKEND_NAME, __name__, "DevmemSleepModeBackend")
    _patch_allocator_lookup()
    _patch_graph_pool_routing()


def _asleep_bytes() -> Optional[int]:
    """Bytes of devmem allocations asleep now (offloaded or discarded), or None when the
    library cannot say. Frees (``empty_cache`` returning cached segments) do not raise it."""
    try:
        from . import api

        s = api.stats()
        return s.offloaded_bytes.current + s.discarded_bytes.current
    except Exception:  # the library is unusable: the state cannot be judged from it
        return None


def _backend_base() -> Any:
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackend

    return SleepModeBackend


class DevmemSleepModeBackend(_backend_base()):  # type: ignore[misc]
    """vLLM's sleep-mode levels on devmem.

    * ``suspend(1)``: weights, runtime state and graph pools are saved to host memory, the KV
      cache (and any other tag) is discarded; every byte devmem holds goes back to the driver.
    * ``suspend(2)``: as level 1, but weights are discarded too (reloaded by vLLM on wake).
    * ``resume(tags)``: maps memory again and restores backups; ``tags`` may defer
      ``weights`` and ``kv_cache``, every other tag always comes back.
    * ``discard(tags)``: releases those tags without saving them (``release_kv_cache_memory``).

    ``state()`` changes only when the call it describes succeeds. After a failed call it says
    what happened: ``SUSPENDED`` when the call put allocations to sleep before it failed (a
    failed sleep keeps what it saved asleep), else the state before the call (a failed wake
    undoes its mappings).
    """

    @contextlib.contextmanager
    def _transition(self, during: Optional[str], after: str) -> Iterator[None]:
        """``during`` while the body runs (None: unchanged), ``after`` once it returns; on an
        exception, the state that describes what the failed call left behind."""
        previous = self._state
        asleep = _asleep_bytes()
        if during is not None:
            self._state = during
        try:
            yield
        except BaseException:
            now = _asleep_bytes()
            released = asleep is not None and now is not None and now > asleep
            self._state = "SUSPENDED" if released else previous
            raise
        self._state = after

    def _allocator(self) -> Any:
        from .allocator import CuMemAllocator

        allocator = get_mem_allocator_instance() if _original is not None else CuMemAllocator.get_instance()
        if not isinstance(allocator, CuMemAllocator):
            raise RuntimeError(
                "devmem: sleep_mode_backend='devmem' but this process's pools come from vLLM's allocator; "
                f"set {ENV_ALLOCATOR}=1 so devmem's allocator is chosen before the first pool is opened"
            )
        return allocator

    def suspend(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, not {level!r}")
        allocator = self._allocator()
        offload_tags: List[str] = ["runtime", "cudagraph"]
        if level == 1:
            offload_tags.insert(0, "weights")
        with self._transition(None, "SUSPENDED"):
            # A model without graphs (enforce_eager) has no "cudagraph" allocations: no warning.
            allocator.sleep(offload_tags=tuple(offload_tags), strict=None)
        from . import api

        api.log_residual(what=f"level-{level} sleep")

    def resume(self, tags: Optional[List[str]] = None) -> None:
        allocator = self._allocator()
        with self._transition("RESUMING", "RUNNING"):
            allocator.wake_up(tags)

    def discard(self, tags: Any) -> None:
        allocator = self._allocator()
        with self._transition(None, "SUSPENDED"):
            allocator.discard(tags)

    @classmethod
    def is_supported(cls) -> bool:
        try:
            from . import api

            return api.device_count() > 0
        except Exception as err:  # the library or driver is missing: not supported here
            logger.info("devmem: sleep-mode backend unavailable: %s", err)
            return False

    @classmethod
    def preserves_communicators(cls) -> bool:
        # NCCL's buffers are not devmem allocations; communicators are never torn down.
        return True

    @classmethod
    def preserves_compiled_artifacts(cls) -> bool:
        # Only device memory is released; compiled kernels live in the process.
        return True

    @classmethod
    def preserves_graphs_with_communicators(cls) -> bool:
        # Not shown: a graph that captured a collective on devmem memory may replay against
        # NCCL's stale registration of the released pages (NCCL_GRAPH_REGISTER=1, the default)
        # and hang. Until a GPU run shows replay after sleep/wake with NCCL_GRAPH_REGISTER=0,
        # say False (docs/engines.md, "NCCL, collectives and CUDA graphs").
        return False

    @classmethod
    def supports_durable_storage(cls) -> bool:
        # Two ways state outlives the process: a kept shared store (open_shared_store(keep=True),
        # or DEVMEM_SHARED_STORE with DEVMEM_SHARED_KEEP=1; a new process calls
        # restore_from_store), or a keeper answering at its socket (keep_for_restart here, then
        # attach_after_restart in the new process: the GPU memory itself stays, nothing copied).
        from . import api

        if api.shared_store_durable():
            return True
        try:
            return api.keeper_available()
        except Exception:  # no socket path can be formed: no keeper
            return False

    @staticmethod
    def _identity(instance: str, rank: Optional[int], world: Optional[int]) -> Tuple[str, int, int]:
        if rank is None or world is None:
            try:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    rank = dist.get_rank() if rank is None else rank
                    world = dist.get_world_size() if world is None else world
            except ImportError:
                pass
        return instance, 0 if rank is None else rank, 1 if world is None else world

    def keep_for_restart(
        self,
        instance: str,
        tags: Sequence[str] = ("weights",),
        *,
        rank: Optional[int] = None,
        world: Optional[int] = None,
        socket: Optional[str] = None,
    ) -> None:
        """Hands the GPU memory of ``tags`` (named first with :func:`devmem.name_tensors`) to
        the keeper under (``instance``, rank, world, tag), so the next engine process maps it
        with :meth:`attach_after_restart` instead of loading or copying. Rank and world default
        to ``torch.distributed``'s when it is initialised, else 0 and 1. Nothing changes here:
        the memory stays mapped and usable in this process. Raises :class:`devmem.DevmemError`
        (naming the keeper's answer) when the keeper is missing, full or refuses."""
        from . import api

        instance, rank, world = self._identity(instance, rank, world)
        api.keep(list(tags), instance=instance, rank=rank, world=world, socket=socket)

    def attach_after_restart(
        self,
        instance: str,
        tags: Sequence[str] = ("weights",),
        *,
        rank: Optional[int] = None,
        world: Optional[int] = None,
        read_only: bool = False,
        socket: Optional[str] = None,
        release: bool = False,
    ) -> Any:
        """In the new engine process, after the model's tensors were allocated and named as
        before: maps the memory the keeper holds for ``tags`` at them, without copying, and
        returns devmem's transfer record (``bytes_restored`` 0). Any name, size, rank or world
        that does not match is refused before anything is mapped. ``release`` has the keeper
        drop its copy of the handles afterwards (the memory then lives as long as this
        process's allocations)."""
        from . import api

        instance, rank, world = self._identity(instance, rank, world)
        out = api.attach(list(tags), instance=instance, rank=rank, world=world, read_only=read_only, socket=socket)
        if release:
            api.release_kept(list(tags), instance=instance, rank=rank, world=world, socket=socket)
        return out
