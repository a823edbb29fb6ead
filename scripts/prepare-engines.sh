#!/usr/bin/env bash
# Here (with network): prepares .engines/ for scripts/gpu-engines.sh on the GPU machine, which
# has no network: the files of vLLM 0.33's wheel that devmem meets (a small zip, see
# bindings/python/conformance/vllm_tree.py) and torch_memory_saver's example programs (from a
# checkout given as $1). Nothing of either is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
tms=${1:?usage: scripts/prepare-engines.sh PATH_TO_TORCH_MEMORY_SAVER_CHECKOUT}
mkdir -p .engines/tms_examples build/vllm-wheel
for f in simple cpu_backup cuda_graph multi_device nested_region rl_example training_engine; do
  cp "$tms/test/examples/$f.py" .engines/tms_examples/
done
PYTHONPATH=bindings/python python3 - <<'PY'
import zipfile
from conformance import vllm_tree
wheel = vllm_tree.wheel("build/vllm-wheel")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(".engines/vllm-0.33.0-subset.whl", "w", zipfile.ZIP_DEFLATED) as dst:
    names = src.namelist()
    for n in vllm_tree.REAL + vllm_tree.REAL_CUMEM + [n for n in names if n.startswith("vllm/logging_utils/")]:
        if n in names:
            dst.writestr(n, src.read(n))
print(".engines/ ready")
PY
