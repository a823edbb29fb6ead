#!/usr/bin/env bash
# On the GPU machine (no cargo there): install the carried target/release/libdevmem.so, run the
# C tests against the real libcuda, the demo, and the PyTorch smoke test. Logs go to $OUT.
#   scripts/gpu-check.sh   (with OUT=<dir>; carry target/release/libdevmem.so)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/devmem-gpu}
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rm -rf build/pkg build/prefix build/ctests-gpu
cmake -S . -B build/pkg -DCMAKE_INSTALL_PREFIX="$PWD/build/prefix" >/dev/null && cmake --install build/pkg >/dev/null || status=1
cmake -S ctests -B build/ctests-gpu -DCMAKE_PREFIX_PATH="$PWD/build/prefix" >/dev/null && cmake --build build/ctests-gpu -j 8 >/dev/null || status=1
# The C tests link the installed libdevmem; a DEVMEM_LIBRARY naming another copy (gpu-run.sh
# exports one) would make the preload library load a second copy with its own registry.
(cd build/ctests-gpu && env -u DEVMEM_LIBRARY ctest --output-on-failure -V 2>&1) | tee "$OUT/ctest.log" | grep -E "ok|Passed|Failed|tests passed|tests failed|Error|error" || true
grep -q "100% tests passed" "$OUT/ctest.log" || status=1
echo "--- demo (4 GiB weights, 4 GiB kv cache)"
build/ctests-gpu/demo 4 4 2>&1 | tee "$OUT/demo.log" || status=1
echo "--- PyTorch smoke test"
DEVMEM_LIBRARY="$PWD/build/prefix/lib/libdevmem.so" PYTHONUNBUFFERED=1 python3 tests/gpu/torch_smoke.py 4 2>&1 | tee "$OUT/torch_smoke.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "--- Python package on the GPU (PyTorch scenarios, ABI table)"
(cd bindings/python && DEVMEM_LIBRARY="$OLDPWD/build/prefix/lib/libdevmem.so" DEVMEM_TEST_REAL_DRIVER=1 \
  PYTHONPATH=. python3 -m pytest -v -s -p no:cacheprovider tests_gpu tests/test_abi.py tests/test_torch_conf.py 2>&1) | tee "$OUT/python_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu-check exit status: $status"
exit $status
