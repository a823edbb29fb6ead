#!/usr/bin/env bash
# Runs every test: formatting, clippy, the Rust tests against the driver emulator (including
# the header-freshness check), rustdoc, the Python tests, a short fuzzing run, then installs
# the package into build/prefix and runs the C tests against it (as a user would, through find_package(devmem)), under valgrind too when
# it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${DEVMEM_JOBS:-2}

step() { printf '\n=== %s\n' "$*"; }

# Everything this script needs, checked before anything is built.
command -v cargo >/dev/null 2>&1 || { echo "scripts/test.sh needs cargo: https://rustup.rs" >&2; exit 1; }
apt=() cargo_tools=() pip=()
for tool in cmake c++ cc readelf prlimit; do
  command -v "$tool" >/dev/null 2>&1 || case $tool in
    c++) apt+=(g++) ;; cc) apt+=(gcc) ;; readelf) apt+=(binutils) ;; prlimit) apt+=(util-linux) ;;
    *) apt+=("$tool") ;; esac
done
cargo nextest --version >/dev/null 2>&1 || cargo_tools+=(cargo-nextest)
if [ "${DEVMEM_FUZZ_SECONDS:-30}" -gt 0 ]; then
  cargo fuzz --version >/dev/null 2>&1 || cargo_tools+=(cargo-fuzz)
fi
python3 -m pytest --version >/dev/null 2>&1 || pip+=(pytest)
python3 -c "import pydantic" >/dev/null 2>&1 || pip+=("pydantic>=2")
if [ ${#apt[@]} -gt 0 ] || [ ${#cargo_tools[@]} -gt 0 ] || [ ${#pip[@]} -gt 0 ]; then
  echo "scripts/test.sh needs tools this machine lacks. .ci/run installs them and runs the tests;" >&2
  echo "or install them yourself:" >&2
  [ ${#apt[@]} -gt 0 ] && echo "  sudo apt-get update && sudo apt-get install -y ${apt[*]}" >&2
  [ ${#cargo_tools[@]} -gt 0 ] && echo "  cargo install --locked ${cargo_tools[*]}" >&2
  [ ${#pip[@]} -gt 0 ] && echo "  python3 -m pip install ${pip[*]}" >&2
  exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -j "$jobs" -- -D warnings
step "cargo build (debug and release)"
cargo build --workspace -j "$jobs"
cargo build --workspace --release -j "$jobs"
step "README's two commands on a stock machine (no cmake, no pytest, a clean environment)"
scripts/stock-machine.sh

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -j "$jobs" --quiet
# Tests that need something this machine may lack are named needs_<what>_*; they are
# filtered out (nextest reports them as skipped) only when the machine lacks it.
filter="all()"
cg_probe=""
while IFS=: read -r _ ctrls path; do
  case ",$ctrls," in
    *,memory,*) base=/sys/fs/cgroup/memory ;;
    ,,) base=/sys/fs/cgroup; [ -e "$base$path/memory.max" ] || continue ;;
    *) continue ;;
  esac
  if mkdir "$base$path/devmem-probe-$$" 2>/dev/null; then
    rmdir "$base$path/devmem-probe-$$"; cg_probe=yes; break
  fi
done </proc/self/cgroup
if [ -z "$cg_probe" ]; then
  echo "note: no writable memory cgroup here: needs_cgroup_* tests are skipped"
  filter="$filter - test(/^needs_cgroup_/)"
fi
if ! { if [ "$(id -u)" -eq 0 ]; then setpriv --reuid=65534 --regid=65534 --clear-groups prlimit --nproc=1 true; else prlimit --nproc=1 true; fi; } 2>/dev/null; then
  echo "note: cannot run a process under prlimit --nproc as an unprivileged user: needs_setpriv_* tests are skipped"
  filter="$filter - test(/^needs_setpriv_/)"
fi
tmpfs_probe=$(mktemp -d)
if mount -t tmpfs -o size=1m tmpfs "$tmpfs_probe" 2>/dev/null; then
  umount "$tmpfs_probe"
else
  echo "note: cannot mount a tmpfs here (needs root): needs_tmpfs_* tests are skipped"
  filter="$filter - test(/^needs_tmpfs_/)"
fi
rmdir "$tmpfs_probe"
step "Rust tests against the emulator's CUDA face (cargo nextest: one process per test)"
cargo nextest run --workspace -j "$jobs" --no-fail-fast -E "$filter"
step "the same Rust tests against the emulator's Level Zero face (cuda_only_* skipped)"
DEVMEM_TEST_BACKEND=level_zero cargo nextest run --workspace -j "$jobs" --no-fail-fast \
  -E "$filter - test(/^cuda_only_/)"
step "the same Rust tests against the emulator's HIP face (chunks and re-reserving on; cuda_only_* skipped)"
DEVMEM_TEST_BACKEND=hip cargo nextest run --workspace -j "$jobs" --no-fail-fast \
  -E "$filter - test(/^cuda_only_/)"

# From here on, a synchronisation violation in the emulator stops the test that caused it.
export DEVMEM_EMU_STRICT=1

step "Python package tests against the emulator (source tree, library from target/release)"
(cd bindings/python && PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests)
(cd bindings/python && DEVMEM_TEST_BACKEND=level_zero PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests)
(cd bindings/python && DEVMEM_TEST_BACKEND=hip PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests)
step "Python package installed with one pip command into build/venv (bundles libdevmem.so and the emulator, which these tests use)"
rm -rf build/venv
python3 -m venv build/venv
build/venv/bin/pip install -q --disable-pip-version-check "./bindings/python[test]"
ls build/venv/lib/python3*/site-packages/devmem/libdevmem*.so build/venv/lib/python3*/site-packages/devmem/_emulator*.so \
  build/venv/lib/python3*/site-packages/devmem/torch_memory_saver_hook_mode_preload.abi3.so
(cd bindings/python/tests && env -u DEVMEM_LIBRARY DEVMEM_TEST_BUNDLED=1 ../../../build/venv/bin/python -m pytest -q -p no:cacheprovider --rootdir . .)

step "Python wheel for manylinux_2_28 (cargo-zigbuild, pip wheel, auditwheel), installed into a clean venv with no cargo on PATH"
scripts/wheel.sh
step "Python package tests against the wheel's own libraries (linked by zig for glibc 2.28)"
build/wheel-venv/bin/pip install -q --disable-pip-version-check pytest "pydantic>=2"
(cd bindings/python/tests && env -u DEVMEM_LIBRARY DEVMEM_TEST_BUNDLED=1 ../../../build/wheel-venv/bin/python -m pytest -q -p no:cacheprovider --rootdir . .)

step "install the package into build/prefix"
rm -rf build/pkg build/prefix build/ctests build/ctests-asan build/ctests-ze build/ctests-hip
cmake -S . -B build/pkg -DCMAKE_INSTALL_PREFIX="$PWD/build/prefix" >/dev/null
cmake --install build/pkg
lib=build/prefix/lib/libdevmem.so.0.1.0
if readelf -S "$lib" | grep -q '\.debug_info'; then echo "FAIL: $lib still has debug info" >&2; exit 1; fi
readelf -S build/prefix/lib/.debug/libdevmem.so.0.1.0.debug | grep -q '\.debug_info' \
  || { echo "FAIL: the separate debug file lacks .debug_info" >&2; exit 1; }
readelf -p .gnu_debuglink "$lib" | grep -q 'libdevmem.so.0.1.0.debug' \
  || { echo "FAIL: $lib has no .gnu_debuglink" >&2; exit 1; }
echo "installed $(du -k "$lib" | cut -f1) KiB stripped, debug info in build/prefix/lib/.debug/"
build/prefix/bin/devmem-keeper --help >/dev/null \
  || { echo "FAIL: build/prefix/bin/devmem-keeper is missing or does not run" >&2; exit 1; }
valgrind_opt=OFF
if command -v valgrind >/dev/null 2>&1; then valgrind_opt=ON; fi
step "C tests against the installed package and the emulator (valgrind: $valgrind_opt)"
cmake -S ctests -B build/ctests -DCMAKE_PREFIX_PATH="$PWD/build/prefix" \
  -DDEVMEM_CTEST_EMULATOR=ON -DDEVMEM_CTEST_VALGRIND="$valgrind_opt" -DDEVMEM_SOAK_CYCLES=10 >/dev/null
cmake --build build/ctests -j "$jobs"
ctest --test-dir build/ctests --output-on-failure -j "$jobs"
step "C tests against the installed package and the emulator's Level Zero face"
cmake -S ctests -B build/ctests-ze -DCMAKE_PREFIX_PATH="$PWD/build/prefix" \
  -DDEVMEM_CTEST_EMULATOR=ON -DDEVMEM_CTEST_BACKEND=level_zero -DDEVMEM_SOAK_CYCLES=10 >/dev/null
cmake --build build/ctests-ze -j "$jobs"
ctest --test-dir build/ctests-ze --output-on-failure -j "$jobs"
step "C tests against the installed package and the emulator's HIP face"
cmake -S ctests -B build/ctests-hip -DCMAKE_PREFIX_PATH="$PWD/build/prefix" \
  -DDEVMEM_CTEST_EMULATOR=ON -DDEVMEM_CTEST_BACKEND=hip -DDEVMEM_SOAK_CYCLES=10 >/dev/null
cmake --build build/ctests-hip -j "$jobs"
ctest --test-dir build/ctests-hip --output-on-failure -j "$jobs"
step "fuzzing the C ABI briefly (scripts/fuzz.sh; the recorded long run is in fuzz/README.md)"
if [ "${DEVMEM_FUZZ_SECONDS:-30}" -gt 0 ]; then scripts/fuzz.sh "${DEVMEM_FUZZ_SECONDS:-30}"; fi

step "C tests under AddressSanitizer and UBSan, against the emulator"
cmake -S ctests -B build/ctests-asan -DCMAKE_PREFIX_PATH="$PWD/build/prefix" \
  -DDEVMEM_CTEST_EMULATOR=ON -DDEVMEM_CTEST_SANITIZE=ON -DDEVMEM_SOAK_CYCLES=5 >/dev/null
cmake --build build/ctests-asan -j "$jobs"
ctest --test-dir build/ctests-asan --output-on-failure -j "$jobs"
