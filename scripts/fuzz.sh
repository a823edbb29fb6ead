#!/usr/bin/env bash
# Fuzzes devmem's C ABI on the driver emulator with cargo-fuzz (libFuzzer):
#   scripts/fuzz.sh [seconds]   (default 60; CI runs each target for DEVMEM_FUZZ_SECONDS)
# Needs cargo-fuzz (cargo install cargo-fuzz). The stable toolchain builds it with
# RUSTC_BOOTSTRAP=1 and no sanitizer (-s none): the emulator is not instrumented for ASan, and
# the invariants are checked by the target itself. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
cargo build -p devmem-cuda-emu --release -q
# The target injects faults on purpose: devmem logs every one of them at error level.
export DEVMEM_LOG=${DEVMEM_LOG:-off}
export DEVMEM_FUZZ_EMULATOR="$PWD/target/release/libdevmem_cuda_emu.so"
cd fuzz
for target in $(RUSTC_BOOTSTRAP=1 cargo fuzz list); do
  mkdir -p "corpus/$target"
  echo "=== fuzzing $target for ${seconds}s"
  # regressions/<target>/ holds every input that once failed: each run replays them first.
  mkdir -p "regressions/$target"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -s none "$target" "corpus/$target" "regressions/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1
done
