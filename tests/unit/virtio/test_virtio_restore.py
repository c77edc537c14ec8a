"""state()/restore(): a fresh device process takes over a live queue unnoticed by the driver."""

from __future__ import annotations

import struct

import msgpack
import pytest

from device_procs.testing.local import LocalHarness
from device_procs.virtio import BlkDevice, MmioDevice, RngDevice
from device_procs.virtio import mmio as r
from device_procs.virtio.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT


def replace_device(h: LocalHarness, device) -> MmioDevice:
    """What the supervisor does after a crash: new device + transport, restored from the core's copy."""
    state = msgpack.unpackb(msgpack.packb(h.mmio.state()))
    new = MmioDevice(device, h.memory, h._notify)
    new.restore(state)
    h.device, h.mmio = device, new
    # The driver keeps talking to "the same" registers.
    h.driver._read, h.driver._write = new.read, new.write
    return new


def test_state_is_plain_data(blk):
    blk.driver.init()
    state = blk.mmio.state()
    assert msgpack.unpackb(msgpack.packb(state)) == state
    assert state["status"] == r.ACKNOWLEDGE | r.DRIVER | r.FEATURES_OK | r.DRIVER_OK
    q = blk.driver.queue(0)
    assert state["queues"] == [{"size": 256, "ready": True, "desc": q.desc, "driver": q.avail,
                                "device": q.used}]


def test_restore_mid_stream_blk(blk, image):
    d = blk.driver
    d.init()
    for s in range(5):
        assert d.blk_write(s, bytes([s]) * 512) == 0
    q = d.queue(0)
    # Two requests the old process never saw (kicks lost with it).
    heads = [q.add([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 9), b"\x99" * 512], [1]),
             q.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2)], [512, 1])]
    old_state = blk.mmio.state()
    blk.device.close()
    new = replace_device(blk, BlkDevice(image, serial="bulkhead-disk-0"))
    assert new.state() == old_state
    new.kick_all()
    done = q.get_used()
    assert [c.head for c in done] == heads
    assert done[1].writable_data(blk.memory) == b"\x02" * 512 + b"\0"
    assert d.interrupt_status & r.INT_USED_BUFFER
    # And it simply continues.
    assert d.blk_read(9, 512).data == b"\x99" * 512
    assert d.blk_read(4, 512).data == b"\x04" * 512
    assert d.read_reg(r.STATUS) & r.DRIVER_OK and not d.needs_reset
    blk.device.close()


def test_restore_replays_taken_but_unfinished_chain(memory):
    h = LocalHarness(RngDevice(), memory)
    d = h.driver
    d.init()
    d.rng_read(8)
    q = d.queue(0)
    head = q.add([], [16])
    # The old process popped the chain and died before completing it.
    assert h.device.queues[0].pop().head == head
    replace_device(h, RngDevice())
    h.mmio.kick_all()
    done = q.get_used()
    assert [(c.head, c.length) for c in done] == [(head, 16)]
    assert len(d.rng_read(32)) == 32


def test_restore_with_event_idx_and_wrapped_indices(memory):
    h = LocalHarness(RngDevice(), memory)
    d = h.driver
    d.init(queue_sizes={0: 4})
    for _ in range(11):  # wrap the 4-entry ring several times
        d.rng_read(4)
    replace_device(h, RngDevice())
    assert h.mmio.device.queues[0].next_avail == 11
    for _ in range(6):
        assert len(d.rng_read(4)) == 4
    assert d.queue(0).avail_event() == 17


def test_restore_before_driver_ok(blk, image):
    d = blk.driver
    d.negotiate()
    d.setup_queue(0, 128)
    blk.device.close()
    replace_device(blk, BlkDevice(image))
    assert not blk.device.active
    d.driver_ok()  # the driver finishes initialisation against the new process
    assert blk.device.active
    assert d.blk_flush() == 0
    blk.device.close()


def test_restore_keeps_interrupt_status_and_features(rng):
    rng.driver.init()
    rng.mmio.signal_config()
    replace_device(rng, RngDevice())
    assert rng.driver.interrupt_status == r.INT_CONFIG_CHANGE
    assert rng.driver.read_reg(r.CONFIG_GENERATION) == 1
    assert rng.device.acked_features == rng.driver.negotiated


def test_restore_rejects_other_device(blk):
    blk.driver.init()
    with pytest.raises(ValueError):
        MmioDevice(RngDevice(), blk.memory, lambda: None).restore(blk.mmio.state())


def test_restore_of_corrupt_queue_needs_reset(rng):
    """If the guest broke a ring meanwhile, the restored device reports it, it does not crash."""
    rng.driver.init()
    state = rng.mmio.state()
    state["queues"][0]["desc"] = 0xD000_0000
    new = MmioDevice(RngDevice(), rng.memory, lambda: None)
    new.restore(state)
    assert new.needs_reset
