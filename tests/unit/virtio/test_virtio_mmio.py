"""virtio-mmio register semantics and the device-status state machine (VIRTIO 1.2 §4.2.2, §2.1)."""

from __future__ import annotations

import pytest

from device_procs.testing.driver import DriverError
from device_procs.virtio import mmio as r
from device_procs.virtio.blk import VIRTIO_BLK_F_RO
from device_procs.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1


def test_identity_registers(rng):
    d = rng.driver
    assert d.read_reg(r.MAGIC_VALUE) == 0x74726976
    assert d.read_reg(r.VERSION) == 2
    assert d.read_reg(r.DEVICE_ID) == 4
    assert d.read_reg(r.VENDOR_ID).to_bytes(4, "little") == b"BKHD"
    assert d.read_reg(r.CONFIG_GENERATION) == 0
    assert d.read_reg(r.SHM_LEN_LOW) == 0xFFFFFFFF  # no shared memory regions


def test_device_features_by_selector(blk):
    d = blk.driver
    feats = d.device_features()
    assert feats & VIRTIO_F_VERSION_1 and feats & VIRTIO_F_EVENT_IDX
    assert not feats & VIRTIO_BLK_F_RO
    d.write_reg(r.DEVICE_FEATURES_SEL, 7)
    assert d.read_reg(r.DEVICE_FEATURES) == 0


@pytest.mark.parametrize("offset,size", [(r.MAGIC_VALUE, 1), (r.MAGIC_VALUE, 2), (r.VERSION, 8),
                                         (r.MAGIC_VALUE + 1, 4), (0x0FE, 2)])
def test_wrong_size_or_offset_reads_zero_and_counts(rng, offset, size):
    data = bytearray(b"\xee" * size)
    rng.mmio.read(offset, data)
    assert data == bytes(size)
    assert rng.mmio.invalid_accesses == 1


def test_unknown_and_write_only_registers(rng):
    d = rng.driver
    assert d.read_reg(0x0F0) == 0  # reserved
    assert d.read_reg(r.QUEUE_NOTIFY) == 0  # write-only
    d.write_reg(r.MAGIC_VALUE, 1)  # read-only
    d.write_reg(r.STATUS, 1, size=1)  # wrong size: dropped
    assert rng.mmio.invalid_accesses == 4
    assert d.status == 0


def test_init_sequence_and_status(rng):
    d = rng.driver
    negotiated = d.init()
    assert negotiated & VIRTIO_F_VERSION_1
    assert d.status == r.ACKNOWLEDGE | r.DRIVER | r.FEATURES_OK | r.DRIVER_OK
    assert rng.device.active


def test_features_ok_rejected_without_version_1(rng):
    with pytest.raises(DriverError):
        rng.driver.negotiate(features=VIRTIO_F_EVENT_IDX)
    assert not rng.driver.status & r.FEATURES_OK


def test_features_ok_rejected_for_unknown_features(rng):
    d = rng.driver
    d.reset()
    d.set_status(r.ACKNOWLEDGE | r.DRIVER)
    d.write_driver_features(VIRTIO_F_VERSION_1 | 1 << 3)
    d.set_status(r.FEATURES_OK)
    assert not d.status & r.FEATURES_OK
    assert rng.device.acked_features == 0


def test_driver_features_fixed_after_features_ok(rng):
    d = rng.driver
    d.negotiate()
    d.write_reg(r.DRIVER_FEATURES_SEL, 0)
    d.write_reg(r.DRIVER_FEATURES, 0)
    assert rng.mmio.driver_features & VIRTIO_F_VERSION_1
    assert rng.mmio.ignored_writes == 1


def test_driver_ok_needs_features_ok(rng):
    d = rng.driver
    d.reset()
    d.set_status(r.ACKNOWLEDGE | r.DRIVER | r.DRIVER_OK)
    assert not d.status & r.DRIVER_OK
    assert not rng.device.active


def test_driver_cannot_clear_status_bits(rng):
    d = rng.driver
    d.negotiate()
    d.write_reg(r.STATUS, r.ACKNOWLEDGE)
    assert d.status & r.FEATURES_OK


def test_status_zero_resets_everything(blk):
    d = blk.driver
    d.init()
    assert d.blk_flush() == 0
    blk.mmio.interrupt_status = 3
    d.write_reg(r.STATUS, 0)
    assert d.status == 0
    assert d.interrupt_status == 0
    assert not blk.device.active and blk.device.acked_features == 0
    d.write_reg(r.QUEUE_SEL, 0)
    assert d.read_reg(r.QUEUE_READY) == 0
    d.init()  # and the device works again
    assert d.blk_flush() == 0


def test_failed_status_stops_activation(rng):
    d = rng.driver
    d.negotiate()
    d.setup_queue(0)
    d.set_status(r.FAILED)
    d.set_status(r.DRIVER_OK)
    assert not rng.device.active


def test_queue_registers(blk):
    d = blk.driver
    d.negotiate()
    d.write_reg(r.QUEUE_SEL, 0)
    assert d.read_reg(r.QUEUE_NUM_MAX) == 256
    d.write_reg(r.QUEUE_SEL, 1)
    assert d.read_reg(r.QUEUE_NUM_MAX) == 0  # no such queue
    d.write_reg(r.QUEUE_NUM, 8)  # ignored
    assert blk.mmio.ignored_writes == 1
    q = d.setup_queue(0, 64)
    cfg = blk.mmio.queues[0]
    assert (cfg.size, cfg.ready, cfg.desc, cfg.driver, cfg.device) == (64, True, q.desc, q.avail, q.used)


def test_queue_registers_ignored_when_ready_or_live(blk):
    d = blk.driver
    d.negotiate()
    q = d.setup_queue(0, 64)
    d.write_reg(r.QUEUE_NUM, 32)
    d.write_reg(r.QUEUE_DESC_LOW, 0x5000)
    assert blk.mmio.queues[0].size == 64 and blk.mmio.queues[0].desc == q.desc
    d.write_reg(r.QUEUE_READY, 0)
    d.write_reg(r.QUEUE_NUM, 32)
    assert blk.mmio.queues[0].size == 32
    d.write_reg(r.QUEUE_NUM, 64)
    d.write_reg(r.QUEUE_READY, 1)
    d.driver_ok()
    d.write_reg(r.QUEUE_READY, 0)  # after DRIVER_OK: ignored
    assert d.read_reg(r.QUEUE_READY) == 1


def test_queue_addresses_64_bit(blk, memory):
    d = blk.driver
    d.negotiate()
    d.write_reg(r.QUEUE_SEL, 0)
    d.write_reg(r.QUEUE_DESC_LOW, 0x1000)
    d.write_reg(r.QUEUE_DESC_HIGH, 0x2)
    assert blk.mmio.queues[0].desc == 0x2_0000_1000


def test_interrupt_status_and_ack(rng):
    d = rng.driver
    d.init()
    assert d.rng_read(16)
    assert d.interrupt_status == r.INT_USED_BUFFER
    assert rng.notifications == 1
    assert d.ack_interrupt() == r.INT_USED_BUFFER
    assert d.interrupt_status == 0


def test_config_change_interrupt_bumps_generation(rng):
    rng.driver.init()
    rng.mmio.signal_config()
    assert rng.driver.read_reg(r.CONFIG_GENERATION) == 1
    assert rng.driver.interrupt_status == r.INT_CONFIG_CHANGE


def test_config_space_any_size(blk):
    d = blk.driver
    capacity = int.from_bytes(d.read_config(0, 8), "little")
    assert capacity == 2048
    assert d.read_config(0, 1) == (2048 & 0xFF).to_bytes(1, "little")
    assert int.from_bytes(d.read_config(1, 2), "little") == 2048 >> 8
    assert int.from_bytes(d.read_config(20, 4), "little") == 512  # blk_size
    assert d.read_config(0x400, 4) == bytes(4)  # past the config struct
    assert blk.mmio.invalid_accesses == 0


def test_needs_reset_sets_status_and_config_interrupt(rng):
    d = rng.driver
    d.init()
    rng.mmio.signal_needs_reset("test")
    assert d.needs_reset and rng.mmio.needs_reset
    assert d.interrupt_status & r.INT_CONFIG_CHANGE
    # Kicks are ignored until the driver resets; a driver status write keeps the bit.
    assert not rng.mmio.queue_notify(0)
    d.set_status(r.ACKNOWLEDGE)
    assert d.needs_reset
    d.init()
    assert not d.needs_reset
    assert len(d.rng_read(8)) == 8


def test_notify_for_unknown_queue_is_harmless(rng):
    rng.driver.init()
    assert rng.mmio.queue_notify(5) is False
    rng.driver.write_reg(r.QUEUE_NOTIFY, 0xFFFF)
    assert not rng.driver.needs_reset


def test_kick_before_driver_ok_is_ignored(rng):
    d = rng.driver
    d.negotiate()
    q = d.setup_queue(0)
    q.add([], [16])
    q.kick()
    assert q.get_used() == []
    d.driver_ok()
    q.kick()
    assert len(q.get_used()) == 1
