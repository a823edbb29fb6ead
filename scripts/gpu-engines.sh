#!/usr/bin/env bash
# On the GPU machine (no cargo, no network): the engine integrations against the real driver
# and PyTorch. Carry target/release/libdevmem.so and .engines/ (made by
# scripts/prepare-engines.sh: vLLM 0.33's plugin/allocator files from its wheel and
# torch_memory_saver's example programs). Logs go to $OUT:
#   engines.log  vLLM allocator conformance (devmem's class and vLLM's), the vLLM plugin,
#                one process on two devices, TP=2 with NCCL
#   tms.log      torch_memory_saver's own examples against devmem.torch_memory_saver (torch mode)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/devmem-gpu}
mkdir -p "$OUT"
root=$PWD
export DEVMEM_LIBRARY="$root/target/release/libdevmem.so" PYTHONUNBUFFERED=1
export PYTHONPATH="$root/bindings/python"
tree=/tmp/devmem-vllm-tree
rm -rf "$tree"
python3 -c "from conformance import vllm_tree; vllm_tree.build('$tree', '$root/.engines/vllm-0.33.0-subset.whl', with_cumem=True)"
export VLLM_TREE="$tree"
status=0
engines() {
  for check in "conformance devmem" "conformance vllm" plugin multi_device tp2; do
    echo "=== engines.py $check"
    # shellcheck disable=SC2086
    OUT=/tmp python3 bindings/python/tests_gpu/engines.py $check 2>&1 || { echo "FAILED: $check"; status=1; }
  done
}
engines | tee "$OUT/engines.log"
grep -q "^FAILED" "$OUT/engines.log" && status=1
shim=$(python3 -m devmem.torch_memory_saver --pythonpath)
tms() {
  for ex in simple cpu_backup cuda_graph multi_device nested_region rl_example training_engine; do
    echo "=== torch_memory_saver example $ex (hook_mode=torch)"
    if (cd .engines/tms_examples && PYTHONPATH="$shim:$PYTHONPATH" timeout 300 python3 "$ex.py" torch 2>&1); then
      echo "RESULT $ex: PASS"
    else
      echo "RESULT $ex: FAIL (exit $?)"
    fi
  done
}
tms | tee "$OUT/tms.log"
echo "gpu-engines exit status: $status"
exit $status
