"""``python -m devmem.torch_memory_saver --pythonpath``: prints the directory that, on
``PYTHONPATH``, makes ``import torch_memory_saver`` load devmem's module.
``python -m devmem.torch_memory_saver --preload-path``: prints devmem's preload library (for
``LD_PRELOAD``).
``python -m devmem.torch_memory_saver SCRIPT [ARGS...]``: runs SCRIPT with the module in place
(child processes inherit it).
``python -m devmem.torch_memory_saver --preload SCRIPT [ARGS...]``: runs SCRIPT in a new process
with devmem's preload library in ``LD_PRELOAD`` too (torch_memory_saver's preload mode, the
default there; set ``TMS_INIT_ENABLE=1`` yourself to make every allocation pausable)."""

import os
import runpy
import sys

from .. import _lib
from . import SHIM_DIR, configure_subprocess, install


def main(argv: "list[str]") -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] == "--pythonpath":
        print(SHIM_DIR)
        return 0
    if argv[0] == "--preload-path":
        path = _lib.preload_library_path()
        if path is None:
            print(f"devmem: this install has no {_lib.PRELOAD_STEM} library", file=sys.stderr)
            return 1
        print(path)
        return 0
    if argv[0] == "--preload":
        if len(argv) < 2:
            print("usage: python -m devmem.torch_memory_saver --preload SCRIPT [ARGS...]", file=sys.stderr)
            return 2
        if _lib.preload_library_path() is None:
            print(f"devmem: this install has no {_lib.PRELOAD_STEM} library", file=sys.stderr)
            return 1
        with configure_subprocess():
            env = dict(os.environ)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + argv[1:], env)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = SHIM_DIR + (os.pathsep + old if old else "")
    install()
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
