#!/usr/bin/env bash
# Regenerates include/devmem.h from the Rust sources (cbindgen, through build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p devmem
header=$(ls -t target/debug/build/devmem-*/out/devmem.h | head -n1)
cp "$header" include/devmem.h
echo "include/devmem.h refreshed"
