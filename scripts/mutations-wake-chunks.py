#!/usr/bin/env python3
"""Mutation check of the wake chunks' guards (issue 23, part 2): applies each mutation to the
working tree in place (restoring the file afterwards), runs tests/wake_chunks.rs on the face given
(cuda, hip, level_zero; cuda_only_* left out elsewhere) and prints the summary and the failing
tests: every mutation must fail at least one. Usage:
python3 scripts/mutations-wake-chunks.py [cuda|hip|level_zero]
"""
import os, re, subprocess, sys

M = [
 ("M40 chunked wake maps every chunk before any copy", "src/backend/layer.rs",
  "        if sizes.len() < 2 {\n            return super::fill_whole", "        if sizes.len() < usize::MAX {\n            return super::fill_whole"),
 ("M41 chunk rollback does not wait for queued copies", "src/backend/layer.rs",
  "        if was_mapped {\n            // Unmapping", "        if false && was_mapped {\n            // Unmapping"),
 ("M42 one-piece rollback does not wait for queued copies", "src/backend/mod.rs",
  "    if let Err(err) = backend.wait_copies(device) {\n        log::error!(\"devmem: waiting for the copies into {va:#x}",
  "    if let Err(err) = Ok::<(), crate::error::Error>(()) {\n        log::error!(\"devmem: waiting for the copies into {va:#x}"),
 ("M43 allocations under two chunks chunked too", "src/backend/layer.rs", "|| size < self.min_chunked ", ""),
 ("M44 DEVMEM_WAKE_CHUNK_MB digits check dropped", "src/backend/settings.rs",
  " && trimmed.bytes().all(|b| b.is_ascii_digit())", ""),
 ("M45 restore copies not clamped to the mapped chunk", "src/store/pipeline.rs",
  "let to = (dst + n as u64).min(end);", "let to = dst + n as u64;"),
]
face = sys.argv[1] if len(sys.argv) > 1 else "cuda"
flt = "all()" if face == "cuda" else "all() - test(/^cuda_only_/)"
env = dict(os.environ, DEVMEM_TEST_BACKEND=face)
for name, path, old, new in M:
    src = open(path).read()
    assert src.count(old) == 1, name
    open(path, "w").write(src.replace(old, new, 1))
    try:
        r = subprocess.run(["cargo", "nextest", "run", "-j", "2", "--no-fail-fast", "--test", "wake_chunks",
                            "-E", flt], capture_output=True, text=True, env=env)
        text = r.stdout + r.stderr
        fails = sorted(set(re.findall(r"FAIL \[[^\]]*\] \([^)]*\) devmem::wake_chunks (\S+)", text)))
        summary = [l.strip() for l in text.splitlines() if "Summary" in l]
        print(f"{name} [{face}] -> {summary[-1] if summary else text[-300:]}\n    fails: {', '.join(fails)}",
              flush=True)
    finally:
        open(path, "w").write(src)
