#!/usr/bin/env bash
# Regenerates include/devmem.h from the Rust sources (cbindgen, through build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p devmem
out=$(ls -td target/debug/build/devmem-*/out | head -n1)
cp "$out/devmem.h" include/devmem.h
echo "include/devmem.h refreshed"
