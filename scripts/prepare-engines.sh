#!/usr/bin/env bash
# Here (with network): prepares .engines/ for scripts/gpu-engines.sh on the GPU machine, which
# has no network: the files of vLLM 0.33's wheel that devmem meets (a small zip, see
# bindings/python/conformance/vllm_tree.py) and torch_memory_saver's test suite and example
# programs (its test/ folder, from a checkout given as $1), torch_memory_saver's wheel, vLLM's
# graph-pool modules as a tree with pydantic's wheels. Nothing of these is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
tms=${1:?usage: scripts/prepare-engines.sh PATH_TO_TORCH_MEMORY_SAVER_CHECKOUT}
rm -rf .engines/tms_test .engines/tms_examples
mkdir -p .engines build/vllm-wheel
cp -r "$tms/test" .engines/tms_test
cp -r "$tms/test/examples" .engines/tms_examples
(cd "$tms" && git rev-parse HEAD 2>/dev/null || echo unknown) > .engines/tms_commit.txt
PYTHONPATH=bindings/python python3 - <<'PY'
import zipfile
from conformance import vllm_tree
wheel = vllm_tree.wheel("build/vllm-wheel")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(".engines/vllm-0.33.0-subset.whl", "w", zipfile.ZIP_DEFLATED) as dst:
    names = src.namelist()
    for n in vllm_tree.REAL + vllm_tree.REAL_CUMEM + [n for n in names if n.startswith("vllm/logging_utils/")]:
        if n in names:
            dst.writestr(n, src.read(n))
# The graph-pool modules (capture_pool, VllmConfig's routing) as a ready tree: the GPU image
# lacks pydantic, so its wheels for the GPU's Python (3.12) come along.
import shutil
shutil.rmtree(".engines/vllm-graphs-tree", ignore_errors=True)
vllm_tree.build(".engines/vllm-graphs-tree", wheel, with_graphs=True, with_cumem=True)
print(".engines/ ready")
PY
pip download -q pydantic --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 -d .engines/wheels
# torch_memory_saver's own wheel: its test suite runs against it beside devmem's module.
pip download -q "torch_memory_saver==${TMS_VERSION:-0.0.10}" --no-deps -d .engines
