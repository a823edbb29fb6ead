#!/usr/bin/env bash
# On the GPU machine (no cargo, no network): the engine integrations against the real driver
# and PyTorch. Carry target/release/libdevmem.so (and the preload library beside it, when built)
# and .engines/ (made by scripts/prepare-engines.sh: vLLM 0.33's plugin/allocator files from its
# wheel and torch_memory_saver's test suite). Logs go to $OUT:
#   engines.log      vLLM allocator conformance (devmem's class and vLLM's), the vLLM plugin,
#                    one process on two devices, TP=2 with NCCL
#   tms.log          torch_memory_saver's own examples against devmem.torch_memory_saver, each
#                    example in both hook modes (preload under LD_PRELOAD)
#   tms-suite.log    torch_memory_saver's pytest suite (test/) against devmem's module
#   rl-colocate.log  examples/rl_colocate.py (every mode)
#   tms-suite-real.log  the same suite against torch_memory_saver's own wheel (.engines/*.whl)
# ENGINES_ONLY=engines,tms,suite,suite_real,rl (comma list) runs only those parts.
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
# vLLM's graph-pool modules need pydantic, which the GPU image lacks: carried wheels, installed
# into a private folder used only by the graphs check.
if ls .engines/wheels/pydantic-*.whl >/dev/null 2>&1 && [ -d .engines/vllm-graphs-tree ]; then
  python3 -m pip install -q --no-index --find-links .engines/wheels --target /tmp/devmem-pydantic pydantic >/dev/null 2>&1 \
    && export VLLM_GRAPHS_TREE="$root/.engines/vllm-graphs-tree"
fi
status=0
engines() {
  for check in "conformance devmem" "conformance vllm" plugin graphs multi_device tp2; do
    echo "=== engines.py $check"
    if [ "$check" = graphs ]; then
      if [ -z "${VLLM_GRAPHS_TREE:-}" ]; then echo "FAILED: graphs (no .engines/vllm-graphs-tree or pydantic wheels)"; status=1; continue; fi
      PYTHONPATH="$PYTHONPATH:/tmp/devmem-pydantic" python3 bindings/python/tests_gpu/engines.py graphs 2>&1 || { echo "FAILED: graphs"; status=1; }
      continue
    fi
    # shellcheck disable=SC2086
    OUT=/tmp python3 bindings/python/tests_gpu/engines.py $check 2>&1 || { echo "FAILED: $check"; status=1; }
  done
}
shim=$(python3 -m devmem.torch_memory_saver --pythonpath)
want() { [ -z "${ENGINES_ONLY:-}" ] || [[ ",$ENGINES_ONLY," == *",$1,"* ]]; }
if want engines; then
  engines | tee "$OUT/engines.log"
  grep -q "^FAILED" "$OUT/engines.log" && status=1
fi
tms() {
  for ex in simple cpu_backup cuda_graph multi_device nested_region rl_example training_engine; do
    for mode in torch preload; do
      echo "=== torch_memory_saver example $ex (hook_mode=$mode)"
      pre=""
      [ "$mode" = preload ] && pre=$(python3 -c "import os, devmem.torch_memory_saver as t
with t.configure_subprocess(): print(os.environ.get('LD_PRELOAD', ''))")
      if (cd .engines/tms_examples && PYTHONPATH="$shim:$PYTHONPATH" LD_PRELOAD="$pre" timeout 300 python3 "$ex.py" "$mode" 2>&1); then
        echo "RESULT $ex $mode: PASS"
      else
        echo "RESULT $ex $mode: FAIL (exit $?)"
      fi
    done
  done
}
if want tms; then tms | tee "$OUT/tms.log"; fi
if want suite; then
  echo "=== torch_memory_saver's test suite ($(cat .engines/tms_commit.txt 2>/dev/null)) against devmem" | tee "$OUT/tms-suite.log"
  (cd .engines/tms_test && PYTHONPATH="$shim:$PYTHONPATH:." timeout "${SUITE_TIMEOUT:-540}" python3 -m pytest -v -rA -p no:cacheprovider --continue-on-collection-errors \
    test_examples.py test_configure_subprocess.py test_utils.py 2>&1) | tee -a "$OUT/tms-suite.log"
fi
if want suite_real; then
  # The same suite against torch_memory_saver's own wheel (carried in .engines/), for comparison.
  whl=$(ls .engines/torch_memory_saver-*.whl 2>/dev/null | head -1)
  echo "=== torch_memory_saver's test suite against torch_memory_saver's own wheel ${whl##*/}" | tee "$OUT/tms-suite-real.log"
  if [ -n "$whl" ] && python3 -m pip install -q --no-deps --target /tmp/tms-real "$whl" >>"$OUT/tms-suite-real.log" 2>&1; then
    (cd .engines/tms_test && env -u DEVMEM_LIBRARY PYTHONPATH="/tmp/tms-real:." timeout "${SUITE_TIMEOUT:-540}" python3 -m pytest -v -rA -p no:cacheprovider --continue-on-collection-errors \
      test_examples.py test_configure_subprocess.py test_utils.py 2>&1) | tee -a "$OUT/tms-suite-real.log"
  else
    echo "FAILED: no torch_memory_saver wheel carried, or it would not install" | tee -a "$OUT/tms-suite-real.log"
  fi
fi
if want rl; then
  timeout "${RL_TIMEOUT:-900}" python3 examples/rl_colocate.py --mode all --cycles "${RL_CYCLES:-4}" 2>&1 | tee "$OUT/rl-colocate.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "gpu-engines exit status: $status"
exit $status
