"""devmem.torch_memory_saver without PyTorch: names, defaults, errors, pause/resume by
policy, the memory margin and the import shim. Regions, graphs and get_cpu_backup need
PyTorch pools and run on the GPU with torch_memory_saver's own examples."""

import ctypes
import inspect
import os
import subprocess
import sys

import pytest

import devmem
import devmem.torch_memory_saver as tms_module
from conftest import EMULATED
from devmem.torch_memory_saver import BACKUP_SUFFIX, TorchMemorySaver, devmem_tag, torch_memory_saver

pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")
MIB = 1 << 20


def test_names_and_defaults_are_torch_memory_savers():
    region = inspect.signature(TorchMemorySaver.region).parameters
    assert region["tag"].default == "default"
    assert region["enable_cpu_backup"].default is False, "torch_memory_saver's default: no host copy"
    graph = inspect.signature(TorchMemorySaver.cuda_graph).parameters
    assert list(graph)[1:6] == ["cuda_graph", "pool", "stream", "capture_error_mode", "tag"]
    assert graph["capture_error_mode"].default == "global" and graph["enable_cpu_backup"].default is False
    assert inspect.signature(TorchMemorySaver.get_cpu_backup).parameters["zero_copy"].default is False
    assert inspect.signature(TorchMemorySaver.pause).parameters["tag"].default is None
    assert torch_memory_saver.enabled is True
    assert callable(tms_module.configure_subprocess)


def test_unsupported_options_raise_naming_the_alternative():
    saver = TorchMemorySaver()
    saver.hook_mode = "torch"
    with pytest.raises(ValueError, match="'torch' or 'preload'"):
        saver.hook_mode = "LD_PRELOAD"
    with pytest.raises(NotImplementedError, match="HostPolicy.KEEP"):
        saver.retain_cpu_backup = True
    saver.retain_cpu_backup = False
    assert saver.retain_cpu_backup is False
    with pytest.raises(ValueError, match="non-negative"):
        saver.memory_margin_bytes = -1
    for kwargs, err, match in (
        (dict(enable_cpu_backup=True, cpu_backup_backend="mmap"), ValueError, "pinned"),
        (dict(cpu_backup_backend="pinned"), ValueError, "requires enable_cpu_backup"),
        (dict(enable_disk_backup=True), NotImplementedError, "disk"),
        (dict(enable_cpu_backup=1), TypeError, "bool"),
    ):
        with pytest.raises(err, match=match):
            with saver.region(**kwargs):
                pass
    with pytest.raises(devmem.InvalidTagError):
        devmem_tag("x" * 250, True)


def _alloc(saver, tag, backup, byte):
    """What region() does for allocations, without PyTorch: the devmem tag of (tag, backup)."""
    name = saver._remember(tag, backup)
    with devmem.use_tag(name):
        p = devmem.malloc(2 * MIB)
    ctypes.memset(p, byte, 2 * MIB)
    return p


def test_one_tag_holds_backed_up_and_discardable_allocations():
    saver = TorchMemorySaver()
    kept = _alloc(saver, "default", True, 0x10)
    dropped = _alloc(saver, "default", False, 0x20)
    other = _alloc(saver, "kv_cache", False, 0x30)
    saver.pause("default")
    assert devmem.allocation_info(kept).state == devmem.State.OFFLOADED
    assert devmem.allocation_info(dropped).state == devmem.State.DISCARDED
    assert devmem.allocation_info(other).state == devmem.State.MAPPED
    saver.resume("default")
    assert ctypes.string_at(kept, 2 * MIB) == b"\x10" * (2 * MIB)
    saver.pause()
    assert devmem.allocation_info(other).state == devmem.State.DISCARDED
    saver.resume()
    assert all(devmem.allocation_info(p).state == devmem.State.MAPPED for p in (kept, dropped, other))
    saver.pause("never-used")  # nothing of that tag: nothing happens
    saver.resume("never-used")
    with pytest.raises(TypeError):
        saver.pause(b"default")
    for p in (kept, dropped, other):
        devmem.free(p)


def test_memory_margin_refuses_a_resume_that_would_leave_too_little():
    saver = TorchMemorySaver()
    p = _alloc(saver, "w", True, 0x44)
    saver.pause("w")
    saver.memory_margin_bytes = devmem.mem_get_info()[0]  # everything must stay free
    with pytest.raises(devmem.OutOfMemoryError, match="memory_margin_bytes"):
        saver.resume("w")
    assert devmem.allocation_info(p).state == devmem.State.OFFLOADED, "nothing was resumed"
    saver.memory_margin_bytes = 0
    saver.resume("w")
    assert ctypes.string_at(p, 2 * MIB) == b"\x44" * (2 * MIB)
    devmem.free(p)


def test_import_shim_resolves_torch_memory_saver_in_child_processes():
    code = "import torch_memory_saver, devmem.torch_memory_saver as d; print(torch_memory_saver is d)"
    path = subprocess.run(
        [sys.executable, "-m", "devmem.torch_memory_saver", "--pythonpath"], capture_output=True, text=True, check=True
    ).stdout.strip()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr
    with tms_module.configure_subprocess():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


# Issue 20, finding 12: devmem tags are one-to-one. A user tag ending with the backup suffix
# would share the devmem tag of another tag's CPU-backed allocations, and pausing it would
# discard their backups; such a tag is refused.


def test_a_tag_ending_with_the_backup_suffix_is_refused_and_backups_survive():
    saver = TorchMemorySaver()
    backed = _alloc(saver, "w", True, 0x5C)
    saver.pause("w")
    assert devmem.allocation_info(backed).state == devmem.State.OFFLOADED
    clash = "w" + BACKUP_SUFFIX
    with pytest.raises(ValueError, match="'w:cpu_backup' ends with ':cpu_backup'") as info:
        _alloc(saver, clash, False, 0x11)
    assert "reserves" in str(info.value)
    with pytest.raises(ValueError, match="w:cpu_backup"):
        with saver.region(tag=clash):
            pass
    with pytest.raises(ValueError, match="w:cpu_backup"):
        with saver.region(tag=clash, enable_cpu_backup=True):
            pass
    with pytest.raises(ValueError, match="w:cpu_backup"):
        saver.pause(clash)  # would have discarded w's backed-up bytes
    with pytest.raises(ValueError, match="w:cpu_backup"):
        saver.resume(clash)
    with pytest.raises(ValueError, match="w:cpu_backup"):
        devmem_tag(clash, False)
    assert devmem.allocation_info(backed).state == devmem.State.OFFLOADED, "w's backup was kept"
    saver.resume("w")
    assert ctypes.string_at(backed, 2 * MIB) == b"\x5c" * (2 * MIB)
    devmem.free(backed)


def test_devmem_tags_are_one_to_one():
    names = {}
    for tag in ("w", "w:cpu", "cpu_backup", "w:cpu_backup_x", ":cpu_backupw", "x" * 200):
        for backup in (False, True):
            name = devmem_tag(tag, backup)
            assert name not in names, f"{(tag, backup)} and {names[name]} share devmem tag {name!r}"
            names[name] = (tag, backup)
    with pytest.raises(ValueError):
        devmem_tag(BACKUP_SUFFIX, True)
