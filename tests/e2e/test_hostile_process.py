"""A hostile guest against a real device process (no VM: the host-side driver plays the guest).

Every broken ring ends with DEVICE_NEEDS_RESET and a configuration interrupt, nothing completed,
the device process alive and serving again after a reset, and the core's proxy never failed.
"""

import time

import pytest

from device_procs.testing import hostile
from vmm_core.testing.process import ProcessHarness
from device_procs.virtio import mmio as r
from device_procs.virtio.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK

pytestmark = pytest.mark.timeout(60)

SECTORS = 2048


@pytest.fixture(scope="module")
def blk(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "disk.img"
    path.write_bytes(bytes(SECTORS * 512))
    with ProcessHarness({"type": "blk", "path": str(path)}) as h:
        yield h


@pytest.fixture(scope="module")
def rng():
    with ProcessHarness({"type": "rng"}) as h:
        yield h


def wait_needs_reset(h, timeout=2.0) -> bool:
    """Wait for the configuration interrupt that comes with DEVICE_NEEDS_RESET."""
    deadline = time.monotonic() + timeout
    while not h.driver.needs_reset:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        h.wait_interrupt(remaining)
    return True


def assert_still_serving(h):
    assert h.alive and not h.proxy.failed and not h.failures
    h.driver.init()  # the reset (§2.1.2) brings the device back
    assert not h.driver.needs_reset
    if h.spec["type"] == "blk":
        assert h.driver.blk_write(1, b"\x5a" * 512) == VIRTIO_BLK_S_OK
        got = h.driver.blk_read(1, 512)
        assert got.status == VIRTIO_BLK_S_OK and got.data == b"\x5a" * 512
    else:
        assert h.driver.rng_read(32)


@pytest.mark.parametrize("build", [b for _, b in hostile.CHAIN_CASES],
                         ids=[n for n, _ in hostile.CHAIN_CASES])
@pytest.mark.parametrize("device", ["blk", "rng"])
def test_hostile_chain_in_device_process(request, device, build):
    h = request.getfixturevalue(device)
    h.driver.init()
    q = h.driver.queue(0)
    h.wait_interrupt(0)  # forget interrupts from earlier requests
    build(q)
    q.kick()
    assert wait_needs_reset(h), "the device process did not report DEVICE_NEEDS_RESET"
    assert h.driver.interrupt_status & r.INT_CONFIG_CHANGE
    assert q.used_idx() == 0
    assert_still_serving(h)


@pytest.mark.parametrize("setup", [s for _, s in hostile.QUEUE_SETUP_CASES],
                         ids=[n for n, _ in hostile.QUEUE_SETUP_CASES])
def test_bad_queue_config_in_device_process(blk, setup):
    d = blk.driver
    d.negotiate()
    setup(d)
    d.driver_ok()
    assert d.needs_reset
    assert_still_serving(blk)


def test_sector_past_the_end_fails_cleanly(blk):
    d = blk.driver
    d.init()
    assert d.blk_read(SECTORS, 512).status == VIRTIO_BLK_S_IOERR
    assert d.blk_write(SECTORS - 1, b"x" * 1024) == VIRTIO_BLK_S_IOERR
    assert d.blk_read(2**64 - 1, 512).status == VIRTIO_BLK_S_IOERR
    assert not d.needs_reset
    assert_still_serving(blk)
