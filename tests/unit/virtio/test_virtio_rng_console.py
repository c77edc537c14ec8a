"""virtio-rng (§5.4) and virtio-console port 0 (§5.3)."""

from __future__ import annotations

import os

import pytest

from device_procs.testing.local import LocalHarness
from device_procs.virtio import console as c
from device_procs.virtio import rng as rngmod


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- rng -------------------------------------------------------------------------------------
def test_rng_fills_buffers(rng):
    rng.driver.init()
    a, b = rng.driver.rng_read(4096), rng.driver.rng_read(4096)
    assert len(a) == len(b) == 4096
    assert a != b and a != bytes(4096)
    assert rng.device.stats()["bytes"] == 8192


def test_rng_config_is_empty(rng):
    assert rng.driver.read_config(0, 8) == bytes(8)


def test_rng_indirect_and_multiple_buffers(rng):
    rng.driver.init()
    done = rng.driver.queue(0).submit([b"ignored"], [10, 20], indirect=True)
    assert done.length == 30
    assert len(done.writable_data(rng.memory)) == 30


def test_rng_caps_large_requests(rng):
    rng.driver.init()
    done = rng.driver.queue(0).submit([], [rngmod.MAX_BYTES_PER_REQUEST + 4096])
    assert done.length == rngmod.MAX_BYTES_PER_REQUEST


def test_rng_no_writable_buffer(rng):
    rng.driver.init()
    assert rng.driver.queue(0).submit([b"abc"], []).length == 0


# -- console ----------------------------------------------------------------------------------
def test_console_transmit_to_file(console):
    d = console.driver
    d.init()
    d.console_write(b"hello ")
    d.console_write(b"world\n")
    assert read_file(console.output_path) == b"hello world\n"
    assert console.device.stats()["tx_bytes"] == 12


def test_console_transmit_scattered_indirect(console):
    console.driver.init()
    console.driver.queue(1).submit([b"a", b"bc", b"def"], [], indirect=True)
    assert read_file(console.output_path) == b"abcdef"


def test_console_receive(console):
    d = console.driver
    d.init()
    assert console.device.feed(b"early")  is False  # no buffers yet: kept
    d.console_post_rx(4, count=3)
    assert d.console_read() == b"early"
    console.device.feed(b"xy")
    assert d.console_read() == b"xy"
    assert console.device.stats()["rx_bytes"] == 7


def test_console_receive_waits_for_buffers(console):
    d = console.driver
    d.init()
    d.console_post_rx(8)
    assert d.console_read() == b""  # no input: the buffer stays with the device
    console.device.feed(b"later")
    assert d.console_read() == b"later"


def test_console_input_fd(memory, tmp_path):
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    r, w = os.pipe()
    os.set_blocking(r, False)
    dev = c.ConsoleDevice(out, r)
    h = LocalHarness(dev, memory)
    h.driver.init()
    h.driver.console_post_rx(64)
    assert dev.on_input_ready() is False  # nothing to read
    os.write(w, b"typed\n")
    assert dev.on_input_ready() is True
    assert h.driver.console_read() == b"typed\n"
    dev.close()
    os.close(w)


def test_console_input_bounded(console):
    console.driver.init()
    console.device.feed(b"x" * (c.MAX_PENDING_INPUT + 10))
    assert len(console.device.pending_input) == c.MAX_PENDING_INPUT
    assert console.device.stats()["dropped_input"] == 10


def test_console_output_to_full_pipe_does_not_block(memory):
    r, w = os.pipe()
    os.set_blocking(w, False)
    dev = c.ConsoleDevice(w, None, owns_fds=False)
    h = LocalHarness(dev, memory)
    h.driver.init()
    big = b"z" * (1 << 20)
    h.driver.console_write(big)
    assert dev.stats()["dropped_output"] > 0
    assert dev.stats()["tx_bytes"] + dev.stats()["dropped_output"] == len(big)
    os.close(r)
    os.close(w)


def test_console_emergency_write(console):
    d = console.driver
    d.init()
    d._write(0x100 + c.EMERG_WR_OFFSET, b"!\0\0\0")
    assert read_file(console.output_path) == b"!"


def test_console_config(console):
    cols, rows, max_nr_ports, _ = c.CONFIG.unpack(console.driver.read_config(0, c.CONFIG.size))
    assert max_nr_ports == 1
    assert not console.driver.device_features() & (c.VIRTIO_CONSOLE_F_MULTIPORT | c.VIRTIO_CONSOLE_F_SIZE)


@pytest.mark.parametrize("queue", [0, 1])
def test_console_hostile_ring(console, queue):
    from device_procs.testing import hostile
    d = console.driver
    d.init()
    console.device.feed(b"pending")
    hostile.publish_loop(d.queue(queue))
    console.mmio.queue_notify(queue)
    assert d.needs_reset


def test_console_input_after_needs_reset_is_not_delivered(console):
    from device_procs.testing import hostile
    d = console.driver
    d.init()
    hostile.publish_loop(d.queue(1))
    console.mmio.queue_notify(1)
    d.console_post_rx(8)
    assert console.device.feed(b"x") is False
    assert d.queue(0).get_used() == []
