#!/usr/bin/env bash
# Proves README's two commands on a "stock" machine, as a clean environment sees it: no
# cmake, no pytest, none of this shell's variables. A directory of links to every program in
# /usr/bin and /bin except cmake, ctest and cpack, and a Python 3 venv without pytest, make
# that PATH (cargo's bin directory added). Then:
#   * scripts/demo.sh must run to the end (it needs only cargo and a C compiler);
#   * scripts/test.sh must stop within seconds, before building anything, naming cmake and
#     pytest and the commands that install them.
#   scripts/stock-machine.sh        (scripts/test.sh runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
clean=build/stock-machine
rm -rf "$clean"
mkdir -p "$clean/bin"
for dir in /usr/bin /bin; do
  for tool in "$dir"/*; do
    name=$(basename "$tool")
    case $name in cmake|ctest|cpack|ccmake|pytest|py.test|python3*|python) continue ;; esac
    [ -e "$clean/bin/$name" ] || ln -s "$tool" "$clean/bin/$name"
  done
done
python3 -m venv --without-pip "$clean/venv"
cargo_bin=$(dirname "$(command -v cargo)")
path="$PWD/$clean/venv/bin:$PWD/$clean/bin:$cargo_bin"
run() { env -i HOME="$HOME" PATH="$path" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
  CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" "$@"; }
run bash -c '! command -v cmake && ! python3 -m pytest --version' >/dev/null 2>&1 \
  || { echo "FAIL: the clean PATH still has cmake or pytest" >&2; exit 1; }

echo "--- scripts/demo.sh with no cmake and no pytest"
run scripts/demo.sh 2>&1 | tail -n 4

echo "--- scripts/test.sh with no cmake and no pytest: must stop before building, naming both"
start=$(date +%s)
if run scripts/test.sh >"$clean/test.log" 2>&1; then
  echo "FAIL: scripts/test.sh ran without cmake and pytest" >&2; exit 1
fi
cat "$clean/test.log"
[ $(( $(date +%s) - start )) -lt 60 ] || { echo "FAIL: the check took a minute: it built first" >&2; exit 1; }
grep -q "apt-get install -y.*cmake" "$clean/test.log" || { echo "FAIL: no cmake install command" >&2; exit 1; }
grep -q "pip install.*pytest" "$clean/test.log" || { echo "FAIL: no pytest install command" >&2; exit 1; }
if grep -q "^===" "$clean/test.log"; then echo "FAIL: a step started" >&2; exit 1; fi
echo "stock machine: both commands behave as README says"
