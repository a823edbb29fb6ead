"""``python -m devmem.torch_memory_saver --pythonpath``: prints the directory that, on
``PYTHONPATH``, makes ``import torch_memory_saver`` load devmem's module.
``python -m devmem.torch_memory_saver SCRIPT [ARGS...]``: runs SCRIPT with it in place (child
processes inherit it)."""

import os
import runpy
import sys

from . import SHIM_DIR, install


def main(argv: "list[str]") -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] == "--pythonpath":
        print(SHIM_DIR)
        return 0
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = SHIM_DIR + (os.pathsep + old if old else "")
    install()
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
