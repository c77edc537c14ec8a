"""The e820 map for several RAM sizes, against layout's RAM regions."""

import pytest

from vmm_core import layout
from vmm_core.boot.e820 import (E820_ACPI, E820_RAM, E820_RESERVED, E820Entry, e820_map, pack_e820,
                                usable_ranges)
from vmm_core.errors import BootError

MiB, GiB = layout.MiB, layout.GiB


def check_sorted_disjoint(entries):
    for a, b in zip(entries, entries[1:]):
        assert a.end <= b.addr


@pytest.mark.parametrize("ram", [32 * MiB, 320 * MiB, 2 * GiB, 3 * GiB, 3 * GiB + 512 * MiB, 8 * GiB])
def test_usable_ranges_are_ram(ram):
    entries = e820_map(ram)
    check_sorted_disjoint(entries)
    regions = layout.ram_regions(ram)
    for start, end in usable_ranges(entries):
        assert any(r0 <= start and end <= r0 + size for r0, size in regions), (hex(start), hex(end))
    # everything in RAM except the legacy window is usable
    usable = sum(end - start for start, end in usable_ranges(entries))
    assert usable == ram - (0x100000 - 0xA0000)


def test_small_vm():
    assert e820_map(320 * MiB) == [
        E820Entry(0, 0xA0000, E820_RAM),
        E820Entry(0xE0000, 0x20000, E820_ACPI),
        E820Entry(0x100000, 320 * MiB - 0x100000, E820_RAM),
        E820Entry(0xFEC00000, 0x1400000, E820_RESERVED),
    ]


def test_exactly_three_gib_has_no_high_ram():
    entries = e820_map(3 * GiB)
    assert entries[-1] == E820Entry(0xFEC00000, 0x1400000, E820_RESERVED)
    assert entries[2].end == layout.MMIO_HOLE_START


def test_above_hole():
    entries = e820_map(5 * GiB)
    assert entries[2] == E820Entry(0x100000, layout.MMIO_HOLE_START - 0x100000, E820_RAM)
    assert entries[-1] == E820Entry(4 * GiB, 2 * GiB, E820_RAM)
    # the MMIO window (testdev, virtio-mmio) is left out of the map entirely
    for e in entries:
        assert not (e.addr < layout.VIRTIO_MMIO_BASE + 0x1000 and e.end > layout.TESTDEV_MMIO_BASE)
    # IOAPIC, LAPIC and KVM's private pages are covered by the reserved entry
    reserved = [e for e in entries if e.type == E820_RESERVED]
    for addr in (layout.IOAPIC_ADDR, layout.LAPIC_ADDR, layout.KVM_TSS_ADDR, layout.KVM_IDENTITY_MAP_ADDR):
        assert any(e.addr <= addr < e.end for e in reserved)


def test_too_little_ram():
    with pytest.raises(BootError, match="at least"):
        e820_map(1 * MiB)


def test_pack_and_str():
    packed = pack_e820(e820_map(64 * MiB))
    assert len(packed) == 4 * 20
    assert packed[:20] == (0).to_bytes(8, "little") + (0xA0000).to_bytes(8, "little") + (1).to_bytes(4, "little")
    assert str(E820Entry(0x100000, 0x1000, E820_RAM)) == "[mem 0x0000000000100000-0x0000000000100fff] usable"
    with pytest.raises(BootError):
        pack_e820([E820Entry(i * 4096, 4096, E820_RAM) for i in range(129)])
