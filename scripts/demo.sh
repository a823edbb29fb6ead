#!/usr/bin/env bash
# Builds devmem and runs the demo: sleep/wake of a few GiB on the GPU when one is present,
# otherwise of a smaller amount on the driver emulator; the demo's first line says which.
#   scripts/demo.sh [GiB of weights] [GiB of kv cache]
# Needs only cargo and a C compiler (cc).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v cargo >/dev/null 2>&1 || missing+=("cargo (https://rustup.rs)")
command -v cc >/dev/null 2>&1 || missing+=("a C compiler: sudo apt-get install -y gcc")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'scripts/demo.sh needs: %s\n' "${missing[@]}" >&2
  exit 1
fi
cargo build --workspace --release --quiet
# The library's SONAME is libdevmem.so.0: link against a directory that has that name.
mkdir -p build/demo/lib
ln -sf "$PWD/target/release/libdevmem.so" build/demo/lib/libdevmem.so.0
ln -sf "$PWD/target/release/libdevmem.so" build/demo/lib/libdevmem.so
cc -std=c11 -O2 -Iinclude examples/demo.c ctests/common.c -Lbuild/demo/lib -ldevmem \
  -Wl,-rpath,"$PWD/build/demo/lib" -ldl -o build/demo/demo
if [ -e /dev/nvidiactl ] && ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  exec build/demo/demo "${1:-4}" "${2:-4}"
else
  echo "no NVIDIA GPU here: running on the driver emulator"
  DEVMEM_CUDA_LIBRARY="$PWD/target/release/libdevmem_cuda_emu.so" DEVMEM_EMU_CAPACITY=2G \
    exec build/demo/demo "${1:-0.5}" "${2:-0.5}"
fi
