"""``python -m devmem.keeper ARGS...``: runs the bundled ``devmem-keeper`` executable (the
process that holds exported GPU memory across restarts; see docs/keeper.md) with ARGS.

A thin wrapper: it finds the binary with :func:`devmem._lib.keeper_binary_path` and replaces
this Python process with it, so exit codes and signals are the keeper's own.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from . import _lib


def binary() -> str:
    """The keeper executable's path, or raises FileNotFoundError saying where it looked."""
    path = _lib.keeper_binary_path()
    if path is None:
        raise FileNotFoundError(
            "no devmem-keeper executable: this devmem package was installed without one (built "
            "without cargo?). Set DEVMEM_KEEPER_BINARY to a devmem-keeper built with "
            "`cargo build --release -p devmem-keeper`."
        )
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = binary()
    except FileNotFoundError as e:
        print(f"devmem.keeper: {e}", file=sys.stderr)
        return 127
    try:
        os.execv(path, [path, *args])
    except OSError as e:
        print(f"devmem.keeper: cannot run {path}: {e}", file=sys.stderr)
        return 126
    return 0  # not reached: execv replaced this process


if __name__ == "__main__":
    sys.exit(main())
