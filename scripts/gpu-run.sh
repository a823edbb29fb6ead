#!/usr/bin/env bash
# On the GPU machine (no cargo, no network): everything a one-GPU run issue records, in parts,
# each writing its logs under $OUT/<part>/. Carry target/release/libdevmem.so, the preload
# library and the keeper binary beside it, and .engines/ (scripts/prepare-engines.sh).
#   PARTS=check,bench,engines,keeper,cold,chunks OUT=<dir> scripts/gpu-run.sh
# Parts:
#   check    scripts/gpu-check.sh: C tests, demo, PyTorch smoke test, the Python GPU scenarios
#            (trustworthy store: durable restore, a real model restored by identity)
#   bench    bench/bench_sleep.py S1-S3 through every entry point (module, CuMemAllocator, vLLM
#            backend, torch_memory_saver in both hook modes, vLLM 0.33's own allocator), then
#            bench/compare_warm.py against the earlier results of the same GPU model
#   engines  scripts/gpu-engines.sh (ENGINES_ONLY, default every part): conformance, plugin,
#            graphs, torch_memory_saver examples and suite (devmem and its own wheel), RL loop
#   keeper   bench/bench_keeper.py: re-attach through the keeper vs durable restore vs torch.load
#   chunks   bench/wake_chunks.py: one large tensor's wake per DEVMEM_WAKE_CHUNK_MB
#   cold     bench/bench_cold.py: first sleep vs warm, one huge tensor's wake, durable read
#            options, residual device memory after sleep
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/devmem-gpu}
PARTS=${PARTS:-check,bench,engines,keeper,cold,chunks}
mkdir -p "$OUT"
root=$PWD
export DEVMEM_LIBRARY="$root/target/release/libdevmem.so" PYTHONUNBUFFERED=1
export PYTHONPATH="$root/bindings/python"
[ -x "$root/target/release/devmem-keeper" ] && export DEVMEM_KEEPER_BINARY="$root/target/release/devmem-keeper"
want() { [[ ",$PARTS," == *",$1,"* ]]; }
# TIMEOUT_<part>=<seconds> bounds one part (0 or unset: none), so a slow part cannot take the
# later ones' time in a call with a hard limit.
limit() { local v="TIMEOUT_$1"; echo "${!v:-0}"; }
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
git -C "$root" log -1 --format='%H %s' 2>/dev/null | tee "$OUT/commit.txt" || true
if want check; then
  mkdir -p "$OUT/check"
  OUT="$OUT/check" timeout "$(limit check)" bash scripts/gpu-check.sh >"$OUT/check/gpu-check.log" 2>&1 || status=1
  tail -3 "$OUT/check/gpu-check.log"
fi
if want bench; then
  mkdir -p "$OUT/bench"
  tree=/tmp/devmem-vllm-tree
  rm -rf "$tree"
  python3 -c "from conformance import vllm_tree; vllm_tree.build('$tree', '$root/.engines/vllm-0.33.0-subset.whl', with_cumem=True)"
  PYTHONPATH="$tree:$PYTHONPATH" VLLM_TREE="$tree" timeout "$(limit bench)" python3 bench/bench_sleep.py --out "$OUT/bench/bench.json" \
    --scenarios "${BENCH_SCENARIOS:-S1,S2,S3}" --policies keep \
    --entries "${BENCH_ENTRIES:-module,CuMemAllocator,vllm_backend,torch_memory_saver,torch_memory_saver_preload,vllm_cumem}" \
    >"$OUT/bench/bench.log" 2>&1 || status=1
  tail -45 "$OUT/bench/bench.log"
  python3 bench/compare_warm.py "$OUT/bench/bench.json" 2>&1 | tee "$OUT/bench/compare.log"
fi
if want engines; then
  mkdir -p "$OUT/engines"
  OUT="$OUT/engines" timeout "$(limit engines)" bash scripts/gpu-engines.sh >"$OUT/engines/gpu-engines.log" 2>&1 || status=1
  grep -E "^(=== |FAILED|RESULT|rl_colocate|PASS|FAIL)|passed|failed" "$OUT/engines/gpu-engines.log" | tail -60
fi
if want keeper; then
  mkdir -p "$OUT/keeper"
  timeout "$(limit keeper)" python3 bench/bench_keeper.py --out "$OUT/keeper/keeper.json" ${KEEPER_ARGS:---gib 8 80} >"$OUT/keeper/keeper.log" 2>&1 || status=1
  tail -30 "$OUT/keeper/keeper.log"
fi
if want cold; then
  mkdir -p "$OUT/cold"
  timeout "$(limit cold)" python3 bench/bench_cold.py --out "$OUT/cold/cold.json" ${COLD_ARGS:-} >"$OUT/cold/cold.log" 2>&1 || status=1
  tail -30 "$OUT/cold/cold.log"
fi
if want chunks; then
  mkdir -p "$OUT/chunks"
  timeout "$(limit chunks)" python3 bench/wake_chunks.py --json "$OUT/chunks/wake-chunks.json" ${CHUNKS_ARGS:-} >"$OUT/chunks/wake-chunks.log" 2>&1 || status=1
  tail -15 "$OUT/chunks/wake-chunks.log"
fi
(cd "$OUT" && tar czf ../gpu-run-logs.tgz . && mv ../gpu-run-logs.tgz .) 2>/dev/null
echo "gpu-run exit status: $status"
exit $status
