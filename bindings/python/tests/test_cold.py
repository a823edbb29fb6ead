"""Growing the host store ahead of need and the residual report, through the module (emulator)."""

import logging
import time

import pytest

import devmem
from conftest import EMULATED

pytestmark = pytest.mark.skipif(not EMULATED, reason="exact byte counts on the emulator")
MIB = 1 << 20


def test_grow_ahead_switch():
    assert devmem.host_grow_ahead() is False  # conftest turns it off for the other tests
    with pytest.raises(TypeError):
        devmem.set_host_grow_ahead(1)
    devmem.set_host_grow_ahead(True)
    try:
        assert devmem.host_grow_ahead() is True
        with devmem.use_tag("ahead"):
            p = devmem.malloc(32 * MIB)
        deadline = time.monotonic() + 10
        while devmem.stats().host_store_bytes < 32 * MIB and time.monotonic() < deadline:
            time.sleep(0.01)
        assert devmem.stats().host_store_bytes >= 32 * MIB
    finally:
        devmem.set_host_grow_ahead(False)
    devmem.free(p)
    devmem.release_host_store()
    assert devmem.stats().host_store_bytes == 0


def test_residual_after_sleep_and_with_one_tag_awake(caplog):
    with devmem.use_tag("res-a"):
        a = devmem.malloc(8 * MIB)
    with devmem.use_tag("res-b"):
        b = devmem.malloc(4 * MIB)
    r = devmem.residual()
    assert (r.devmem_mapped, r.devmem_other) == (12 * MIB, 0)
    assert r.driver_used >= r.devmem_mapped and r.total >= r.driver_used
    devmem.offload("res-a")
    assert devmem.residual().devmem_mapped == 4 * MIB
    devmem.sleep("res-b")
    r = devmem.residual(0)
    assert r.devmem_mapped == 0
    assert r.rest == r.driver_used - (r.torch_outside_devmem or 0)
    with caplog.at_level(logging.INFO, logger="devmem"):
        devmem.log_residual(0)
    assert "still uses" in caplog.text and "devmem 0.00 mapped" in caplog.text
    devmem.wake_up()
    devmem.free(a)
    devmem.free(b)


def test_residual_bad_device():
    with pytest.raises(devmem.InvalidArgumentError, match="device 7 does not exist"):
        devmem.residual(7)
