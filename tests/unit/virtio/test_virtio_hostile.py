"""A hostile guest driver: every broken ring ends in DEVICE_NEEDS_RESET or an error status.

Never a hang (each test has a timeout), never an exception out of `queue_notify`, never a
guest access outside RAM (GuestMemory raises on those; the device must have checked first).
"""

from __future__ import annotations

import pytest

from device_procs.testing import hostile
from device_procs.virtio import mmio as r
from device_procs.virtio.blk import VIRTIO_BLK_S_IOERR

pytestmark = pytest.mark.timeout(20)

CHAIN_CASES = [build for _, build in hostile.CHAIN_CASES]
CASE_IDS = [name for name, _ in hostile.CHAIN_CASES]


@pytest.mark.parametrize("build", CHAIN_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("harness", ["blk_native", "blk_python", "rng"])
def test_hostile_chain_needs_reset(request, harness, build):
    h = request.getfixturevalue(harness)
    h.driver.init()
    q = h.driver.queue(0)
    build(q)
    before = h.notifications
    assert h.mmio.queue_notify(0) is False  # returns, does not raise
    assert h.driver.needs_reset
    assert h.driver.interrupt_status & r.INT_CONFIG_CHANGE
    assert h.notifications == before + 1
    assert q.used_idx() == 0  # nothing was completed
    assert h.mmio.stats()["queue_errors"] == 1
    # The driver recovers by resetting the device (§2.1.2).
    h.driver.init()
    assert not h.driver.needs_reset


def test_hostile_kick_by_register_write(blk):
    blk.driver.init()
    hostile.publish_loop(blk.driver.queue(0))
    blk.driver.write_reg(r.QUEUE_NOTIFY, 0)
    assert blk.driver.needs_reset


def test_zero_length_chain_blk_returns_unused(blk):
    """No writable byte for a status: the chain comes back with length 0, the device lives on."""
    blk.driver.init()
    q = blk.driver.queue(0)
    hostile.publish_zero_length(q)
    q.kick()
    (done,) = q.get_used()
    assert done.length == 0
    assert not blk.driver.needs_reset
    assert blk.device.stats()["malformed"] == 1
    assert blk.driver.blk_flush() == 0


def test_zero_length_chain_rng(rng):
    rng.driver.init()
    q = rng.driver.queue(0)
    hostile.publish_zero_length(q)
    q.kick()
    assert [c.length for c in q.get_used()] == [0]
    assert not rng.driver.needs_reset


@pytest.mark.parametrize("setup", [s for _, s in hostile.QUEUE_SETUP_CASES],
                         ids=[n for n, _ in hostile.QUEUE_SETUP_CASES])
def test_bad_queue_config_needs_reset_at_driver_ok(blk, setup):
    d = blk.driver
    d.negotiate()
    setup(d)
    d.driver_ok()
    assert d.needs_reset
    assert not blk.device.active
    assert blk.mmio.queue_notify(0) is False


def test_sector_past_the_end(blk):
    d = blk.driver
    d.init()
    assert d.blk_read(2048, 512).status == VIRTIO_BLK_S_IOERR
    assert d.blk_read(2047, 1024).status == VIRTIO_BLK_S_IOERR
    assert d.blk_write(2048, b"x" * 512) == VIRTIO_BLK_S_IOERR
    assert d.blk_read(2**64 - 1, 512).status == VIRTIO_BLK_S_IOERR
    assert d.blk_discard([(2047, 2, 0)]) == VIRTIO_BLK_S_IOERR
    assert not d.needs_reset


def test_status_byte_not_writable(blk, memory):
    """Header and 'status' all device-readable: no status can be written; used length 0."""
    d = blk.driver
    d.init()
    q = d.queue(0)
    head = q.add([bytes(16), b"\x77"], [])
    q.kick()
    (done,) = q.get_used()
    assert (done.head, done.length) == (head, 0)
    assert memory.read(done.buffers[1].gpa, 1) == b"\x77"  # readable memory untouched


def test_header_too_short(blk):
    d = blk.driver
    d.init()
    done = d.queue(0).submit([b"\x00" * 8], [1])
    assert done.length == 1
    assert done.writable_data(blk.memory) == bytes([VIRTIO_BLK_S_IOERR])


def test_data_not_whole_sectors(blk):
    d = blk.driver
    d.init()
    assert d.blk_read(0, 100).status == VIRTIO_BLK_S_IOERR
    assert d.blk_write(0, b"x" * 100) == VIRTIO_BLK_S_IOERR


def test_device_keeps_serving_after_hostile_request_in_batch(blk):
    """A bad request between good ones only fails itself."""
    d = blk.driver
    d.init()
    q = d.queue(0)
    q.add([bytes(16)], [512, 1])
    q.add([b"\x00" * 4], [1])
    q.add([bytes(16)], [512, 1])
    q.kick()
    statuses = [c.writable_data(blk.memory)[-1] for c in q.get_used()]
    assert statuses == [0, VIRTIO_BLK_S_IOERR, 0]
