#!/usr/bin/env bash
# Builds devmem and runs the demo: sleep/wake of a few GiB on the GPU when one is present,
# otherwise of a smaller amount on the driver emulator; the demo's first line says which.
#   scripts/demo.sh [GiB of weights] [GiB of kv cache]
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v cargo >/dev/null 2>&1; then
  cargo build --workspace --release --quiet
fi
[ -f target/release/libdevmem.so ] || { echo "target/release/libdevmem.so is missing: run cargo build --release --workspace" >&2; exit 1; }
cmake -S . -B build/pkg -DCMAKE_INSTALL_PREFIX="$PWD/build/prefix" >/dev/null
cmake --install build/pkg >/dev/null
cmake -S ctests -B build/demo -DCMAKE_PREFIX_PATH="$PWD/build/prefix" >/dev/null
cmake --build build/demo --target demo >/dev/null
if [ -e /dev/nvidiactl ] && ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  exec build/demo/demo "${1:-4}" "${2:-4}"
else
  echo "no NVIDIA GPU here: running on the driver emulator"
  DEVMEM_CUDA_LIBRARY="$PWD/build/prefix/lib/devmem/libdevmem_cuda_emu.so" DEVMEM_EMU_CAPACITY=2G \
    exec build/demo/demo "${1:-0.5}" "${2:-0.5}"
fi
