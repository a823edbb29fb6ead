#!/usr/bin/env python3
"""An RL loop on one GPU: a trainer and a rollout engine share the device through devmem.

A causal LM is built from a ``transformers`` config (random weights, nothing downloaded). Each
cycle:

1. the rollout engine wakes (its weights come back from host memory at the same addresses),
2. the trainer's weights are copied into it (weight sync), and the trainer sleeps,
3. the rollout generates greedily with a KV cache; then it sleeps and wakes once more and
   generates again: the tokens must be identical (same weights, bytes restored exactly),
4. the rollout sleeps (weights offloaded, KV cache discarded) and the device memory it held
   must come back to the driver,
5. the trainer wakes (its parameters and AdamW state must be bit-identical) and runs a step.

Modes (``--mode``):

* ``tms-torch``: ``devmem.torch_memory_saver`` with ``hook_mode="torch"`` (regions are
  PyTorch pools on devmem's pluggable allocator), as verl and SGLang on Intel use it;
* ``tms-preload``: the same module with ``hook_mode="preload"`` (devmem's ``LD_PRELOAD``
  library takes every ``cudaMalloc`` inside a region), as SGLang on CUDA and slime use it; the
  script re-executes itself under ``configure_subprocess()`` to get the preload library;
* ``cumem``: ``devmem.CuMemAllocator``, vLLM's allocator interface (the trainer stays on
  PyTorch's own allocator, as beside a vLLM engine);
* ``all`` (default): each of the above in its own process, then a summary.

It needs only PyTorch with a GPU, ``transformers`` and devmem. Exit status 0 means every
check passed; the last line of each mode is a JSON record of its per-phase times.

    python examples/rl_colocate.py --cycles 4
    python examples/rl_colocate.py --mode tms-torch --preset tiny --cycles 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

# Deterministic cuBLAS, so that equal weights give equal tokens (set before torch loads).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

MODES = ("tms-torch", "tms-preload", "cumem")
PRESETS = {
    # 509 M parameters: 1.0 GB of bf16 rollout weights, 8.1 GB of trainer state (fp32 + AdamW).
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000),
    # A few MB: for a quick check of the mechanics.
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
}
CHILD_ENV = "DEVMEM_RL_COLOCATE_CHILD"


class Failure(Exception):
    """A check of the example failed."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failure(what)
    print(f"  ok: {what}", flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES + ("all",), default="all")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cycles < 1 or args.new_tokens < 1 or args.batch < 1 or args.prompt_len < 1 or args.train_seq < 2:
        p.error("--cycles, --new-tokens, --batch and --prompt-len must be >= 1 and --train-seq >= 2")
    return args


# -- the memory interface each mode uses -----------------------------------------------------


class Saver:
    """What the loop needs from devmem: regions for the trainer's state, the rollout weights and
    the rollout's KV cache, and sleep/wake of the trainer and the rollout."""

    trainer_in_devmem = True

    def trainer_region(self) -> Any:
        raise NotImplementedError

    def weights_region(self) -> Any:
        raise NotImplementedError

    def kv_region(self) -> Any:
        raise NotImplementedError

    def sleep_trainer(self) -> None:
        raise NotImplementedError

    def wake_trainer(self) -> None:
        raise NotImplementedError

    def sleep_rollout(self) -> None:
        raise NotImplementedError

    def wake_rollout(self) -> None:
        raise NotImplementedError

    #: devmem tags whose memory a rollout sleep must give back
    rollout_tags: tuple = ()


class TmsSaver(Saver):
    """torch_memory_saver's API (devmem's module), in torch or preload hook mode."""

    def __init__(self, hook_mode: str) -> None:
        from devmem import torch_memory_saver as module

        self.tms = module.torch_memory_saver
        self.tms.hook_mode = hook_mode
        self.rollout_tags = (module.devmem_tag("weights", True), module.devmem_tag("kv_cache", False))

    def trainer_region(self) -> Any:
        return self.tms.region(tag="train", enable_cpu_backup=True)

    def weights_region(self) -> Any:
        return self.tms.region(tag="weights", enable_cpu_backup=True)

    def kv_region(self) -> Any:
        return self.tms.region(tag="kv_cache")

    def sleep_trainer(self) -> None:
        self.tms.pause("train")

    def wake_trainer(self) -> None:
        self.tms.resume("train")

    def sleep_rollout(self) -> None:
        self.tms.pause("weights")
        self.tms.pause("kv_cache")

    def wake_rollout(self) -> None:
        self.tms.resume("weights")
        self.tms.resume("kv_cache")


class CumemSaver(Saver):
    """vLLM's allocator interface: ``devmem.CuMemAllocator``; the trainer uses PyTorch's own
    allocator, as a trainer beside a vLLM engine does."""

    trainer_in_devmem = False
    rollout_tags = ("weights", "kv_cache")

    def __init__(self) -> None:
        from devmem import CuMemAllocator

        self.allocator = CuMemAllocator.get_instance()

    def trainer_region(self) -> Any:
        return contextlib.nullcontext()

    def weights_region(self) -> Any:
        return self.allocator.use_memory_pool(tag="weights")

    def kv_region(self) -> Any:
        return self.allocator.use_memory_pool(tag="kv_cache")

    def sleep_trainer(self) -> None:
        pass

    def wake_trainer(self) -> None:
        pass

    def sleep_rollout(self) -> None:
        self.allocator.sleep(offload_tags=("weights",))  # vLLM's level 1: the KV cache is dropped

    def wake_rollout(self) -> None:
        self.allocator.wake_up()


# -- the loop ----------------------------------------------------------------------------------


class Timer:
    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.phases: Dict[str, List[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        self.torch.cuda.synchronize()
        self.phases.setdefault(phase, []).append(time.perf_counter() - t0)


def fingerprint(torch: Any, tensors: List[Any]) -> Any:
    """An exact, order-sensitive digest of the tensors' bytes (integer sums of their words)."""
    sums = []
    for i, t in enumerate(tensors):
        words = t.detach().contiguous().view(-1).view(torch.uint8)
        words = words[: words.numel() // 4 * 4].view(torch.int32)
        sums.append(words.sum(dtype=torch.int64) * (i + 1))
    return torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64)


def devmem_bytes(tags: tuple, mapped: bool) -> int:
    import devmem

    return sum(a.size for a in devmem.allocations()
               if a.tag in tags and (a.state == devmem.State.MAPPED) == mapped)


def generate(torch: Any, model: Any, prompts: Any, new_tokens: int) -> Any:
    """Greedy decoding with the model's KV cache: (tokens on the host, the KV cache, which the
    caller keeps alive as an engine keeps its cache between requests)."""
    with torch.no_grad():
        out = model(input_ids=prompts, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        del out
    # Allocated in the KV-cache region, which the next sleep discards: keep a host copy.
    return torch.cat(tokens, dim=1).cpu(), past


def run_mode(mode: str, args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    import transformers

    import devmem

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    saver: Saver = CumemSaver() if mode == "cumem" else TmsSaver("preload" if mode == "tms-preload" else "torch")
    device = torch.device("cuda", torch.cuda.current_device())
    config = transformers.LlamaConfig(**PRESETS[args.preset], max_position_embeddings=4096)
    timer = Timer(torch)
    print(f"== {mode}: transformers {transformers.__version__}, torch {torch.__version__}, devmem "
          f"{devmem.version()}, {torch.cuda.get_device_name(device)}, preset {args.preset}", flush=True)

    # The trainer: fp32 parameters and AdamW state.
    with timer("build"), saver.trainer_region(), torch.device(device):
        trainer = transformers.LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(trainer.parameters(), lr=args.lr)
    params = list(trainer.parameters())
    # The rollout engine: bf16 weights in their own region.
    with timer("build"), saver.weights_region(), torch.device(device):
        rollout = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    print(f"  trainer {sum(p.numel() for p in params) / 1e6:.0f} M parameters; rollout weights "
          f"{devmem_bytes(saver.rollout_tags, True) / 2**20:.0f} MiB in devmem", flush=True)

    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=gen).to(device)
    history: List[Any] = []
    freed_report: List[Dict[str, int]] = []
    rollout_asleep = False

    def train_step() -> float:
        batch = torch.randint(0, config.vocab_size, (args.batch, args.train_seq), generator=gen).to(device)
        with saver.trainer_region():
            loss = trainer(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    # AdamW creates its state at the first step, inside the trainer's region.
    with timer("train"):
        loss = train_step()
    print(f"  first training step: loss {loss:.4f}", flush=True)

    for cycle in range(args.cycles):
        print(f"-- cycle {cycle}", flush=True)
        if rollout_asleep:
            with timer("wake_rollout"):
                saver.wake_rollout()
        with timer("weight_sync"), torch.no_grad():
            for dst, src in zip(rollout.parameters(), params):
                dst.copy_(src)
        if saver.trainer_in_devmem:
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.is_cuda]
            before = fingerprint(torch, params + state)
            with timer("sleep_trainer"):
                saver.sleep_trainer()
        with timer("generate"), saver.kv_region():
            tokens, kv_cache = generate(torch, rollout, prompts, args.new_tokens)
        # Same weights after a sleep/wake round trip: the same bytes and the same tokens.
        weights = fingerprint(torch, list(rollout.parameters()) + list(rollout.buffers()))
        mapped = devmem_bytes(saver.rollout_tags, True)
        kv_mapped = devmem_bytes(saver.rollout_tags[1:], True)
        check(kv_mapped > 0, f"the live KV cache is devmem's ({kv_mapped / 2**20:.0f} MiB, tag {saver.rollout_tags[1]!r})")
        torch.cuda.synchronize()
        free_before, reserved_before = torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device)
        with timer("sleep_rollout"):
            saver.sleep_rollout()
        freed = torch.cuda.mem_get_info(device)[0] - free_before
        # What PyTorch gave back itself (sleep empties its cache first) is not devmem's doing.
        by_devmem = freed - (reserved_before - torch.cuda.memory_reserved(device))
        slept = devmem_bytes(saver.rollout_tags, False)
        freed_report.append({"cycle": cycle, "devmem_mapped_bytes": mapped, "devmem_slept_bytes": slept,
                             "kv_cache_bytes": kv_mapped, "freed_bytes": freed, "freed_by_devmem_bytes": by_devmem})
        check(devmem_bytes(saver.rollout_tags, True) == 0, "rollout sleep left no devmem memory of its tags mapped")
        check(devmem_bytes(saver.rollout_tags[1:], False) > 0, "the live KV cache was put to sleep (discarded)")
        # The driver's own bookkeeping (streams, events made at the first sleep) may take a few MiB.
        check(by_devmem >= slept - max(16 << 20, slept // 100),
              f"rollout sleep: devmem gave {by_devmem / 2**20:.0f} MiB back to the driver for the "
              f"{slept / 2**20:.0f} MiB of weights and KV cache it put to sleep")
        with timer("wake_rollout"):
            saver.wake_rollout()
        del kv_cache  # its contents were discarded by the sleep; never read again
        check(torch.equal(weights, fingerprint(torch, list(rollout.parameters()) + list(rollout.buffers()))),
              "rollout weights bit-identical after sleep/wake")
        with saver.kv_region():
            again, kv_cache = generate(torch, rollout, prompts, args.new_tokens)
        del kv_cache
        check(torch.equal(tokens, again), f"{tokens.numel()} tokens identical before and after sleep/wake")
        history.append(tokens)
        if cycle > 0:
            same = torch.equal(history[-1], history[-2])
            print(f"  tokens {'unchanged' if same else 'changed'} after the training step (informational)")
        with timer("sleep_rollout"):
            saver.sleep_rollout()
        rollout_asleep = True
        if saver.trainer_in_devmem:
            with timer("wake_trainer"):
                saver.wake_trainer()
            check(torch.equal(before, fingerprint(torch, params + state)),
                  "trainer parameters and AdamW state bit-identical after its sleep/wake")
        with timer("train"):
            loss = train_step()
        print(f"  training step: loss {loss:.4f}", flush=True)

    record = {
        "mode": mode, "preset": args.preset, "cycles": args.cycles, "device": torch.cuda.get_device_name(device),
        "phases_s": {k: {"mean": sum(v) / len(v), "max": max(v), "n": len(v)} for k, v in timer.phases.items()},
        "rollout_sleep": freed_report,
    }
    print(json.dumps(record), flush=True)
    return record


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.mode == "all":
        failed = []
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode]
            for name in ("preset", "cycles", "new_tokens", "batch", "prompt_len", "train_seq", "lr", "seed"):
                cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
            rc = subprocess.call(cmd)
            print(f"== {mode}: {'PASS' if rc == 0 else f'FAIL (exit {rc})'}", flush=True)
            if rc:
                failed.append(mode)
        return 1 if failed else 0
    if args.mode == "tms-preload" and os.environ.get(CHILD_ENV) != "1":
        # Preload mode needs the library in LD_PRELOAD before the process starts.
        from devmem.torch_memory_saver import configure_subprocess

        with configure_subprocess():
            env = dict(os.environ, **{CHILD_ENV: "1"})
        sys.stdout.flush()
        child_args = argv if argv is not None else sys.argv[1:]
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(child_args), env)
    try:
        run_mode(args.mode, args)
    except Failure as err:
        print(f"FAIL: {err}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
