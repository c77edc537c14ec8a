import pytest

from vmm_core.bus import Bus, BusRange
from vmm_core.errors import BusError


class Recorder:
    def __init__(self, fill: int = 0):
        self.fill = fill
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset, data):
        data[:] = bytes([self.fill + offset & 0xFF]) * len(data)

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def test_ranges_reject_overlap_both_sides():
    bus: Bus[int] = Bus("t")
    bus.insert(1, 0x100, 0x10)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(2, 0x10F, 1)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(2, 0xF8, 0x10)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(2, 0x0, 0x1000)
    bus.insert(2, 0x110, 1)  # adjacent is fine
    bus.insert(3, 0xFF, 1)
    assert len(bus) == 3


def test_lookup_returns_range_and_device():
    bus: Bus[int] = Bus()
    bus.insert(7, 0x3F8, 8)
    bus.insert(9, 0x60, 5)
    assert bus.lookup(0x3F8) == (BusRange(0x3F8, 8), 7)
    assert bus.lookup(0x3FF) == (BusRange(0x3F8, 8), 7)
    assert bus.lookup(0x400) is None
    assert bus.lookup(0x5F) is None
    assert bus.lookup(0x64)[1] == 9


def test_bad_ranges():
    with pytest.raises(BusError):
        BusRange(0, 0)
    with pytest.raises(BusError):
        BusRange(-1, 4)


def test_remove():
    bus: Bus[int] = Bus()
    bus.insert(1, 0x10, 4)
    assert bus.remove(0x10) == 1
    assert bus.lookup(0x10) is None
    with pytest.raises(BusError):
        bus.remove(0x10)


def test_dispatch_offsets_and_unclaimed_all_ones():
    bus: Bus[Recorder] = Bus()
    dev = Recorder(fill=0x40)
    bus.insert(dev, 0x1000, 0x100)
    buf = bytearray(4)
    assert bus.read(0x1004, buf)
    assert buf == bytes([0x44]) * 4
    assert bus.write(0x10FF, b"\x01")
    assert dev.writes == [(0xFF, b"\x01")]
    buf = bytearray(2)
    assert not bus.read(0x2000, buf)
    assert buf == b"\xff\xff"
    assert not bus.write(0x2000, b"\x00")
    assert bus.unclaimed_count == 2
