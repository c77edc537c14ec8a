"""The BIOS-e820 memory map we hand Linux, derived from `layout` (pure).

    [0, 0xA0000)                 usable: real-mode area, zero page, page tables, command line
    [0xA0000, 0xE0000)           absent: the legacy VGA/option-ROM window (not described)
    [0xE0000, 0x100000)          ACPI data: our tables (RSDP, XSDT, FADT, MADT, DSDT)
    [0x100000, low end)          usable: kernel, initrd, the rest of low RAM
    [low end, 0xFEC00000)        absent: the MMIO gap (testdev, virtio-mmio); left out of the map so
                                 Linux sees a hole there, the devices are described by ACPI _CRS
    [0xFEC00000, 4 GiB)          reserved: IOAPIC, LAPIC and KVM's TSS/identity-map pages
    [4 GiB, 4 GiB + high)        usable: RAM above the hole, if any

The 0xA0000-0x100000 window is RAM in `GuestMemory` (one region from 0) but, as on a PC, Linux
must not use it as RAM: leaving the VGA window out and marking our tables as ACPI data keeps it
off the page allocator.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout
from ..errors import BootError

# struct boot_e820_entry types (arch/x86/include/asm/e820/types.h, ACPI 6.5 §15.1).
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 bytes, packed
E820_MAX_ENTRIES_ZEROPAGE = 128

LOW_RAM_END = 0xA0000  # top of conventional memory (640 KiB)
BIOS_AREA_START = layout.ACPI_TABLES_ADDR
BIOS_AREA_END = layout.ACPI_TABLES_END
HIGH_RESERVED_START = layout.IOAPIC_ADDR  # IOAPIC .. 4 GiB: APICs and KVM's private pages
MIN_RAM = 2 * layout.MiB

TYPE_NAMES = {E820_RAM: "usable", E820_RESERVED: "reserved", E820_ACPI: "ACPI data",
              E820_NVS: "ACPI NVS", E820_UNUSABLE: "unusable"}


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return E820_ENTRY.pack(self.addr, self.size, self.type)

    def __str__(self) -> str:  # the way Linux prints it: [mem start-end] type
        return f"[mem {self.addr:#018x}-{self.end - 1:#018x}] {TYPE_NAMES.get(self.type, self.type)}"


def e820_map(ram_size: int) -> list[E820Entry]:
    """The e820 table for a VM with `ram_size` bytes of RAM, sorted by address."""
    if ram_size < MIN_RAM:
        raise BootError(f"{ram_size} bytes of RAM cannot boot Linux: give at least {MIN_RAM >> 20} MiB")
    regions = layout.ram_regions(ram_size)
    low_start, low_size = regions[0]
    assert low_start == 0
    entries = [
        E820Entry(0, LOW_RAM_END, E820_RAM),
        E820Entry(BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820_ACPI),
        E820Entry(layout.KERNEL_LOAD_ADDR, low_size - layout.KERNEL_LOAD_ADDR, E820_RAM),
        E820Entry(HIGH_RESERVED_START, layout.MMIO_HOLE_END - HIGH_RESERVED_START, E820_RESERVED),
    ]
    for start, size in regions[1:]:
        entries.append(E820Entry(start, size, E820_RAM))
    return entries


def usable_ranges(entries: list[E820Entry]) -> list[tuple[int, int]]:
    """(start, end) of every usable entry."""
    return [(e.addr, e.end) for e in entries if e.type == E820_RAM]


def pack_e820(entries: list[E820Entry]) -> bytes:
    """The packed table for boot_params.e820_table (at most 128 entries)."""
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"{len(entries)} e820 entries do not fit the zero page "
                        f"({E820_MAX_ENTRIES_ZEROPAGE})")
    return b"".join(e.pack() for e in entries)
