"""torch_memory_saver's ``hooks`` package layout (``hooks.mode_preload``), for code and tests
that import from it."""
