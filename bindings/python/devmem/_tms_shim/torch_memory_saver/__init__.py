"""Importing ``torch_memory_saver`` with this directory's parent on ``PYTHONPATH`` yields
devmem's torch_memory_saver-compatible module (see devmem.torch_memory_saver)."""

import devmem.torch_memory_saver as _devmem_tms

_devmem_tms.install()
