#!/usr/bin/env bash
# Issue 14 on the GPU machine: the usual GPU check, then the HIP backend's workaround layer
# (chunks, zero-on-wake; re-reserving is HIP's alone) over the real CUDA driver: the layer test, the C
# tests and the Python GPU tests with it on, and the sleep benchmark through CuMemAllocator
# with the layer off and on (same run, same raw copy bandwidth). Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/devmem-gpu}
mkdir -p "$OUT"
OUT="$OUT/check" scripts/gpu-check.sh > "$OUT/check.log" 2>&1; echo "gpu-check: $?"
lib="$PWD/build/prefix/lib/libdevmem.so"
layer=(DEVMEM_CHUNK_SIZE=256M DEVMEM_ZERO_ON_WAKE=1)
env "${layer[@]}" DEVMEM_LIBRARY="$lib" PYTHONPATH=bindings/python python3 tests/gpu/layer_on_cuda.py \
  > "$OUT/layer_on_cuda.log" 2>&1; echo "layer_on_cuda: $?"
(cd build/ctests-gpu && env "${layer[@]}" ctest --output-on-failure) > "$OUT/layer_ctest.log" 2>&1
echo "ctest with the layer: $?"
(cd bindings/python && env "${layer[@]}" DEVMEM_LIBRARY="$lib" DEVMEM_TEST_REAL_DRIVER=1 PYTHONPATH=. \
  python3 -m pytest -q -p no:cacheprovider tests_gpu) > "$OUT/layer_python_gpu.log" 2>&1
echo "python GPU tests with the layer: $?"; tail -3 "$OUT/layer_python_gpu.log"
for mode in off on; do
  extra=(); [ "$mode" = on ] && extra=("${layer[@]}")
  env "${extra[@]}" DEVMEM_LIBRARY="$lib" PYTHONPATH=bindings/python python3 bench/bench_sleep.py \
    --scenarios S1 --entries CuMemAllocator --policies keep --out "$OUT/bench-layer-$mode.json" \
    > "$OUT/bench-layer-$mode.log" 2>&1; echo "bench layer $mode: $?"
  tail -4 "$OUT/bench-layer-$mode.log"
done
