"""The testdev register file of docs/guest_abi.md, both probe windows and their shared log."""

from __future__ import annotations

import struct

import pytest

from vmm_core.legacy import testdev as t
from vmm_core.legacy.testdev import PioProbe, ProbeLog, TestDev


class FakeHooks:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.count = 0
        self.ncpus = 3

    def exit(self, code: int) -> None:
        self.calls.append(("exit", code))

    def putc(self, byte: int) -> None:
        self.calls.append(("putc", byte))

    def mark(self, value: int) -> None:
        self.calls.append(("mark", value))

    def irq_line(self, gsi: int, delay_ms: int) -> None:
        self.calls.append(("irq_line", gsi, delay_ms))

    def irqfd(self, delay_ms: int) -> None:
        self.calls.append(("irqfd", delay_ms))

    def irq_count(self) -> int:
        return self.count

    def vcpus(self) -> int:
        return self.ncpus


class Rig:
    def __init__(self) -> None:
        self.hooks = FakeHooks()
        self.log = ProbeLog()
        self.mmio = TestDev(self.hooks, self.log)
        self.pio = PioProbe(self.log)

    def rd(self, dev, offset: int, size: int) -> int:
        buf = bytearray(size)
        dev.read(offset, buf)
        return int.from_bytes(buf, "little")

    def wr(self, dev, offset: int, value: int, size: int) -> None:
        dev.write(offset, value.to_bytes(size, "little"))

    def last(self) -> tuple[int, int, int]:
        return (self.rd(self.mmio, t.REG_LAST_SIZE, 4), self.rd(self.mmio, t.REG_LAST_OFFSET, 8),
                self.rd(self.mmio, t.REG_LAST_VALUE, 8))


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_register_offsets_match_the_abi_table() -> None:
    assert (t.REG_EXIT, t.REG_PUTC, t.REG_MARK, t.REG_LAST_SIZE, t.REG_LAST_OFFSET,
            t.REG_LAST_VALUE, t.REG_IRQ_LINE, t.REG_IRQFD, t.REG_IRQ_COUNT, t.REG_VCPUS) == (
        0x000, 0x004, 0x008, 0x010, 0x018, 0x020, 0x030, 0x034, 0x038, 0x040)
    assert (t.MMIO_PROBE_OFFSET, t.MMIO_PROBE_SIZE, t.PIO_PROBE_SIZE) == (0x100, 0x100, 0x10)


def test_write_registers_call_hooks(rig: Rig) -> None:
    rig.wr(rig.mmio, t.REG_PUTC, ord("G"), 1)
    rig.wr(rig.mmio, t.REG_MARK, 0xDEAD_BEEF, 4)
    rig.wr(rig.mmio, t.REG_IRQ_LINE, 5 | (250 << 8), 4)
    rig.wr(rig.mmio, t.REG_IRQFD, 40, 4)
    rig.wr(rig.mmio, t.REG_EXIT, 1, 4)
    assert rig.hooks.calls == [("putc", ord("G")), ("mark", 0xDEAD_BEEF), ("irq_line", 5, 250),
                               ("irqfd", 40), ("exit", 1)]


def test_wrong_width_control_write_is_ignored(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.wr(rig.mmio, t.REG_PUTC, ord("x"), 4)
    rig.wr(rig.mmio, t.REG_PUTC, ord("x"), 4)
    rig.wr(rig.mmio, t.REG_EXIT, 0, 1)
    assert rig.hooks.calls == []
    assert len([r for r in caplog.records if "ignored" in r.message]) == 2  # once per (reg, size)


def test_read_registers(rig: Rig) -> None:
    rig.hooks.count = 7
    assert rig.rd(rig.mmio, t.REG_IRQ_COUNT, 4) == 7
    assert rig.rd(rig.mmio, t.REG_VCPUS, 4) == 3
    assert rig.last() == (0, 0, 0)


def test_undocumented_offsets_read_zero_and_ignore_writes(rig: Rig) -> None:
    for off in (0x00C, 0x014, 0x03C, 0x044, 0x200, 0xFF8):
        rig.wr(rig.mmio, off, 0xFFFF_FFFF, 4)
        assert rig.rd(rig.mmio, off, 4) == 0
    assert rig.rd(rig.mmio, t.REG_EXIT, 4) == 0  # write-only reads 0
    rig.wr(rig.mmio, t.REG_VCPUS, 9, 4)  # read-only ignores writes
    assert rig.rd(rig.mmio, t.REG_VCPUS, 4) == 3
    assert rig.hooks.calls == []


def test_mmio_probe_initial_pattern(rig: Rig) -> None:
    for o in (0, 1, 0x37, 0xFF):
        assert rig.rd(rig.mmio, t.MMIO_PROBE_OFFSET + o, 1) == (o * 7 + 0x5A) & 0xFF
    expected = bytes((o * 7 + 0x5A) & 0xFF for o in range(8, 16))
    assert rig.rd(rig.mmio, t.MMIO_PROBE_OFFSET + 8, 8) == int.from_bytes(expected, "little")


def test_pio_probe_initial_pattern(rig: Rig) -> None:
    for o in range(t.PIO_PROBE_SIZE):
        assert rig.rd(rig.pio, o, 1) == (o * 13 + 0x3C) & 0xFF


@pytest.mark.parametrize("size", t.MMIO_PROBE_ACCESS_SIZES)
def test_mmio_probe_write_stores_and_records(rig: Rig, size: int) -> None:
    value = 0x1122_3344_5566_7788 & ((1 << (8 * size)) - 1)
    rig.wr(rig.mmio, t.MMIO_PROBE_OFFSET + 0x40, value, size)
    assert rig.rd(rig.mmio, t.MMIO_PROBE_OFFSET + 0x40, size) == value
    assert rig.last() == (size, 0x40, value)


@pytest.mark.parametrize("size", t.PIO_PROBE_ACCESS_SIZES)
def test_pio_probe_write_stores_and_records(rig: Rig, size: int) -> None:
    value = 0xA1B2_C3D4 & ((1 << (8 * size)) - 1)
    rig.wr(rig.pio, 4, value, size)
    assert rig.rd(rig.pio, 4, size) == value
    assert rig.last() == (size, 4, value)


def test_probe_log_is_shared_last_write_wins(rig: Rig) -> None:
    rig.wr(rig.mmio, t.MMIO_PROBE_OFFSET + 1, 0xAB, 1)
    rig.wr(rig.pio, 0xF, 0xCD, 1)
    assert rig.last() == (1, 0xF, 0xCD)
    rig.wr(rig.mmio, t.MMIO_PROBE_OFFSET + 2, 0xEF01, 2)
    assert rig.last() == (2, 2, 0xEF01)


@pytest.mark.parametrize("size", [3, 5, 6, 7, 16])
def test_mmio_probe_rejects_odd_sizes(rig: Rig, size: int) -> None:
    rig.mmio.write(t.MMIO_PROBE_OFFSET, bytes(size))
    assert rig.last() == (0, 0, 0)
    assert rig.rd(rig.mmio, t.MMIO_PROBE_OFFSET, 1) == 0x5A
    buf = bytearray(size)
    rig.mmio.read(t.MMIO_PROBE_OFFSET, buf)
    assert buf == bytes(size)


def test_pio_probe_rejects_8_bytes(rig: Rig) -> None:
    rig.pio.write(0, bytes(8))
    assert rig.last() == (0, 0, 0)
    assert rig.rd(rig.pio, 0, 1) == 0x3C


def test_mmio_probe_access_crossing_the_end_is_truncated(rig: Rig) -> None:
    rig.wr(rig.mmio, t.MMIO_PROBE_OFFSET + 0xFC, 0x8877_6655_4433_2211, 8)
    assert rig.last() == (8, 0xFC, 0x8877_6655_4433_2211)
    assert rig.rd(rig.mmio, t.MMIO_PROBE_OFFSET + 0xFC, 8) == 0x4433_2211  # the rest reads 0
    assert rig.rd(rig.mmio, 0x200, 4) == 0  # nothing spilled past the window


def test_pio_probe_access_crossing_the_end_is_truncated(rig: Rig) -> None:
    rig.wr(rig.pio, 0xE, 0xDDCC_BBAA, 4)
    assert rig.last() == (4, 0xE, 0xDDCC_BBAA)
    assert rig.rd(rig.pio, 0xE, 4) == 0xBBAA
    rig.wr(rig.pio, 0x10, 1, 1)  # past the window: ignored, never raises
    assert rig.rd(rig.pio, 0x10, 1) == 0
    assert rig.last() == (4, 0xE, 0xDDCC_BBAA)


def test_last_registers_narrow_reads(rig: Rig) -> None:
    rig.wr(rig.mmio, t.MMIO_PROBE_OFFSET, 0x0102_0304_0506_0708, 8)
    assert rig.rd(rig.mmio, t.REG_LAST_VALUE, 4) == 0x0506_0708
    assert rig.rd(rig.mmio, t.REG_LAST_VALUE + 4, 4) == 0x0102_0304
    assert rig.rd(rig.mmio, t.REG_LAST_SIZE, 8) == 8  # the upper half is unused: 0


def test_hook_counters_only_called_when_read(rig: Rig) -> None:
    def boom() -> int:
        raise AssertionError("vcpus() should not be called")
    rig.hooks.vcpus = boom  # type: ignore[method-assign]
    assert rig.rd(rig.mmio, t.REG_IRQ_COUNT, 4) == 0


def test_exit_code_is_32_bit(rig: Rig) -> None:
    rig.mmio.write(t.REG_EXIT, struct.pack("<I", 0xFFFF_FFFF))
    assert rig.hooks.calls == [("exit", 0xFFFF_FFFF)]


def test_are_bus_devices(rig: Rig) -> None:
    from vmm_core.bus import BusDevice
    assert isinstance(rig.mmio, BusDevice) and isinstance(rig.pio, BusDevice)


def test_on_a_bus_at_the_layout_addresses(rig: Rig) -> None:
    from vmm_core import layout
    from vmm_core.bus import Bus
    mmio, pio = Bus("mmio"), Bus("pio")
    mmio.insert(rig.mmio, layout.TESTDEV_MMIO_BASE, t.TESTDEV_SIZE)
    pio.insert(rig.pio, layout.PIO_PROBE_PORT, layout.PIO_PROBE_SIZE)
    pio.write(layout.PIO_PROBE_PORT + 3, b"\x99")
    buf = bytearray(8)
    mmio.read(layout.TESTDEV_MMIO_BASE + t.REG_LAST_OFFSET, buf)
    assert int.from_bytes(buf, "little") == 3
