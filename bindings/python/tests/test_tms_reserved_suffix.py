"""devmem.torch_memory_saver's devmem tags are one-to-one (issue 20, finding 12): a user tag
ending with the backup suffix would share the devmem tag of another tag's CPU-backed
allocations, and pausing it would discard their backups. Such a tag is refused."""

import ctypes

import pytest

import devmem
from conftest import EMULATED
from devmem.torch_memory_saver import BACKUP_SUFFIX, TorchMemorySaver, devmem_tag

pytestmark = pytest.mark.skipif(not EMULATED, reason="reads device memory through host pointers")
MIB = 1 << 20


def _alloc(saver, tag, backup, byte):
    """What region() does for allocations, without PyTorch: the devmem tag of (tag, backup)."""
    name = saver._remember(tag, backup)
    with devmem.use_tag(name):
        p = devmem.malloc(2 * MIB)
    ctypes.memset(p, byte, 2 * MIB)
    return p


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
