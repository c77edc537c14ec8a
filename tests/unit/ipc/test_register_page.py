"""The register page: the device publishes, the core answers reads from it (no round trip)."""

from __future__ import annotations

import gc
import os

import pytest

from ipc_protocol import register_page as rp
from ipc_protocol import virtio_mmio as regs
from ipc_protocol.register_page import RegisterPage
from ipc_protocol.transport.shm_ring import ShmRings
from vmm_core.devices.proxy import ProxyDevice


def page_pair() -> tuple[RegisterPage, RegisterPage, int]:
    """Two independent mappings of one memfd page, as the core and the device have them."""
    fd = os.memfd_create("test-page")
    os.ftruncate(fd, rp.PAGE_BYTES)
    core = RegisterPage(fd, 0)
    core.initialize()
    return core, RegisterPage(fd, 0), fd


def test_what_the_device_publishes_the_core_reads() -> None:
    core, device, fd = page_pair()
    assert not core.valid  # nothing published yet: the core asks through the ring
    device.publish(b"\x01\x02\x03", generation=7, needs_reset=False)
    assert core.valid and core.config_generation() == 7 and not core.needs_reset()
    assert core.read_config(1, 4) == b"\x02\x03\0\0"  # zero past the config, as the device reads
    assert core.read_config(8, 2) == b"\0\0"
    device.publish(b"", generation=8, needs_reset=True)
    assert core.needs_reset() and core.config_generation() == 8
    device.set_applied(41)
    assert core.applied_seq() == 41
    os.close(fd)


def test_interrupt_status_is_or_by_device_and_ack_by_core() -> None:
    core, device, fd = page_pair()
    device.raise_interrupt(regs.INT_USED_BUFFER)
    device.raise_interrupt(regs.INT_CONFIG_CHANGE | 0xF0)  # bits beyond §4.2.2's two: masked
    assert core.interrupt_status() == regs.INT_USED_BUFFER | regs.INT_CONFIG_CHANGE
    core.ack(regs.INT_USED_BUFFER)
    assert device.interrupt_status() == regs.INT_CONFIG_CHANGE
    os.close(fd)


def test_interrupt_bits_cross_processes() -> None:
    core, _, fd = page_pair()
    pid = os.fork()
    if pid == 0:  # the child maps the page itself, as a device process does
        RegisterPage(fd, 0).raise_interrupt(regs.INT_USED_BUFFER)
        os._exit(0)
    os.waitpid(pid, 0)
    assert core.interrupt_status() == regs.INT_USED_BUFFER
    os.close(fd)


def test_hostile_page_values_are_bounded() -> None:
    core, device, fd = page_pair()
    device.publish(b"\xaa" * 8, generation=1, needs_reset=False)
    os.pwrite(fd, (1 << 31).to_bytes(4, "little"), rp._CONFIG_LEN)  # a config length of 2 GiB
    assert core.read_config(0, 4) == b"\xaa" * 4
    assert core.read_config(rp.MAX_CONFIG + 4, 4) == bytes(4)  # never past the page
    assert "config length" in core.corruption()  # and the device is failed for it
    os.pwrite(fd, (3).to_bytes(4, "little"), rp._CONFIG_SEQ)  # a lock held odd forever
    assert core.read_config(0, 4) is None  # bounded retries, then the ring
    os.close(fd)


def test_the_page_outlives_closed_rings_and_garbage_collection() -> None:
    """Regression: a cffi pointer into a memoryview crashed the core at exit when the collector
    cleared the view; the page is its own mapping, alive while anyone holds it."""
    rings = ShmRings.create(8)
    page = rings.register_page
    cycle: list[object] = [page]
    cycle.append(cycle)
    rings.close()
    del cycle
    gc.collect()
    page.raise_interrupt(regs.INT_USED_BUFFER)
    assert page.interrupt_status() == regs.INT_USED_BUFFER


@pytest.fixture
def local_proxy():
    """A proxy whose device never answers the ring: whatever it reads, it read locally."""
    core = ShmRings.create(8)
    device_page = RegisterPage(core.memfd, os.fstat(core.memfd).st_size - rp.PAGE_BYTES)
    failures: list[str] = []
    proxy = ProxyDevice("local0", core.core_endpoint(), queue_max_sizes=(256,), timeout=0.05,
                        on_failure=failures.append, device_id=2, page=core.register_page)
    yield proxy, device_page, failures
    core.close()


def read32(proxy: ProxyDevice, offset: int) -> int:
    data = bytearray(4)
    proxy.read(offset, data)
    return int.from_bytes(data, "little")


def test_proxy_answers_the_hot_registers_without_the_device(local_proxy) -> None:
    proxy, device, failures = local_proxy
    device.publish(b"\x10\x00\x00\x00", generation=3, needs_reset=False)
    assert read32(proxy, regs.MAGIC_VALUE) == regs.MAGIC
    assert read32(proxy, regs.DEVICE_ID) == 2
    assert read32(proxy, regs.CONFIG_GENERATION) == 3
    assert read32(proxy, regs.CONFIG) == 0x10
    device.raise_interrupt(regs.INT_USED_BUFFER)
    assert read32(proxy, regs.INTERRUPT_STATUS) == regs.INT_USED_BUFFER
    proxy.write(regs.INTERRUPT_ACK, regs.INT_USED_BUFFER.to_bytes(4, "little"))
    assert device.interrupt_status() == 0  # the ACK never went to the device
    assert not proxy.failed and failures == []
    assert proxy.stats()["local_reads"] == 5 and proxy.stats()["local_writes"] == 1


def test_a_config_read_after_a_posted_write_waits_for_the_device(local_proxy) -> None:
    proxy, device, _ = local_proxy
    device.publish(b"\x00" * 4, generation=0, needs_reset=False)
    proxy.write(regs.CONFIG, b"\x05")  # posted; the device has not applied it
    data = bytearray(4)
    proxy.read(regs.CONFIG, data)  # not answered from a stale page: the ring (silent: failed)
    assert proxy.failed


def test_a_page_no_device_would_write_is_reported() -> None:
    core, device, fd = page_pair()
    assert core.corruption() is None
    device.publish(b"\x01", generation=1, needs_reset=True)
    device.raise_interrupt(0xFF)  # masked to the two defined bits
    assert core.corruption() is None
    device.corrupt()
    assert "magic" in core.corruption()
    os.close(fd)


@pytest.mark.parametrize("check", ["guest read", "heartbeat"])
def test_a_corrupt_page_fails_the_device(local_proxy, check) -> None:
    """Found when the guest next reads, or by the supervisor's check every heartbeat."""
    proxy, device, failures = local_proxy
    device.publish(b"", generation=0, needs_reset=False)
    device.corrupt()
    if check == "guest read":
        assert read32(proxy, regs.INTERRUPT_STATUS) == 0xFFFFFFFF
    else:
        proxy.check_page()
    assert proxy.failed and len(failures) == 1 and "invalid answer" in failures[0], failures
    assert "register page" in failures[0]
