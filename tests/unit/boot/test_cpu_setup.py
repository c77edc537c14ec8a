import struct

from vmm_core import layout
from vmm_core.boot import cpu


def test_identity_map_covers_4gib_user_accessible():
    tables = cpu.page_tables()
    pml4 = struct.unpack_from("<Q", tables[layout.PML4_ADDR])[0]
    assert pml4 & ~0xFFF == layout.PDPT_ADDR and pml4 & 0x7 == 0x7
    for gib in range(4):
        pdpte = struct.unpack_from("<Q", tables[layout.PDPT_ADDR], gib * 8)[0]
        pd = tables[pdpte & ~0xFFF]
        for i in (0, 511):
            e = struct.unpack_from("<Q", pd, i * 8)[0]
            assert e & ~0xFFF & ~cpu.PTE_PAGE_SIZE == (gib << 30) + (i << 21)
            assert e & cpu.PTE_PAGE_SIZE and e & cpu.PTE_USER and e & cpu.PTE_WRITABLE


def test_gdt_descriptors_decode():
    table = cpu.gdt()
    cs = cpu.segment_from_entry(table[2], 0x10)
    assert cs["l"] == 1 and cs["db"] == 0 and cs["dpl"] == 0 and cs["type"] == 0xB and cs["present"] == 1
    assert cs["limit"] == 0xFFFFFFFF
    ds = cpu.segment_from_entry(table[3], 0x18)
    assert ds["db"] == 1 and ds["type"] == 0x3 and ds["s"] == 1
    ucs = cpu.segment_from_entry(table[5], 0x28)
    assert ucs["dpl"] == 3 and ucs["l"] == 1
    tss = cpu.segment_from_entry(table[6], 0x30)
    assert tss["base"] == layout.ENTRY_TSS_ADDR and tss["type"] == 0xB and tss["s"] == 0
    assert table[7] == 0  # upper half of the 16-byte TSS descriptor (base < 4 GiB)


def test_gdt_entry_bit_layout():
    e = cpu.gdt_entry(0xA09B, 0x12345678, 0xABCDE)
    assert e & 0xFFFF == 0xBCDE
    assert (e >> 16) & 0xFFFFFF == 0x345678
    assert (e >> 56) & 0xFF == 0x12
    assert (e >> 48) & 0xF == 0xA
    assert (e >> 40) & 0xFF == 0x9B


def test_lint_value():
    assert cpu.lint_value(0x10000, cpu.APIC_MODE_EXTINT) == 0x700
    assert cpu.lint_value(0x10000, cpu.APIC_MODE_NMI) == 0x400
