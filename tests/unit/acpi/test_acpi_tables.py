"""Each ACPI table: length, checksum and the fields Linux reads (offsets from ACPI 6.5 §5.2)."""

import struct

import pytest

from vmm_core import layout
from vmm_core.acpi import tables
from vmm_core.acpi.tables import VirtioMmioSlot, layout_acpi
from vmm_core.errors import BootError

SLOTS = [VirtioMmioSlot(layout.virtio_slot(i)[0], layout.VIRTIO_MMIO_SLOT_SIZE, layout.virtio_slot(i)[1])
         for i in range(3)]


def check_header(table: bytes, signature: bytes, revision: int) -> None:
    assert table[:4] == signature
    assert struct.unpack_from("<I", table, 4)[0] == len(table)
    assert table[8] == revision
    assert sum(table) % 256 == 0
    assert table[10:16] == b"BLKHD "
    assert table[16:24] == tables.OEM_TABLE_ID


@pytest.fixture
def image():
    return layout_acpi(2, SLOTS)


def test_rsdp(image):
    addr, rsdp = image.tables[b"RSDP"]
    assert addr == layout.ACPI_TABLES_ADDR == image.rsdp_addr and addr % 16 == 0
    assert len(rsdp) == 36 and rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert rsdp[9:15] == b"BLKHD " and rsdp[15] == 2
    assert struct.unpack_from("<I", rsdp, 16)[0] == 0  # no RSDT
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert struct.unpack_from("<Q", rsdp, 24)[0] == image.tables[b"XSDT"][0]


def test_xsdt_points_at_fadt_and_madt(image):
    _, xsdt = image.tables[b"XSDT"]
    check_header(xsdt, b"XSDT", 1)
    entries = struct.unpack_from("<2Q", xsdt, 36)
    assert len(xsdt) == 36 + 16
    assert entries == (image.tables[b"FACP"][0], image.tables[b"APIC"][0])


def test_fadt(image):
    _, fadt = image.tables[b"FACP"]
    check_header(fadt, b"FACP", 6)
    assert len(fadt) == 276
    assert fadt[131] == tables.FADT_MINOR_REVISION
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & tables.FADT_F_HW_REDUCED_ACPI and flags & tables.FADT_F_RESET_REG_SUP
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & tables.IAPC_VGA_NOT_PRESENT and boot_arch & tables.IAPC_MSI_NOT_SUPPORTED
    assert boot_arch & tables.IAPC_8042 and not boot_arch & tables.IAPC_LEGACY_DEVICES
    assert not boot_arch & tables.IAPC_CMOS_RTC_NOT_PRESENT
    # RESET_REG: SystemIO, 8 bits, byte access, port 0x3c2; value 1.
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x3C2)
    assert fadt[128] == 0x01
    assert struct.unpack_from("<I", fadt, 40)[0] == 0  # 32-bit DSDT unused
    assert struct.unpack_from("<Q", fadt, 140)[0] == image.tables[b"DSDT"][0]
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, 0x3C0)
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, 0x3C1)
    assert struct.unpack_from("<H", fadt, 46)[0] == 0  # no SCI


def test_fadt_optional_devices():
    fadt = tables.fadt(0x1000, i8042=False, cmos_rtc=False)
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert not boot_arch & tables.IAPC_8042 and boot_arch & tables.IAPC_CMOS_RTC_NOT_PRESENT


def parse_madt(madt: bytes):
    entries, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        entries.append((kind, madt[off:off + length]))
        off += length
    assert off == len(madt)
    return entries


@pytest.mark.parametrize("vcpus", [1, 2, 8, 254])
def test_madt(vcpus):
    madt = tables.madt(vcpus)
    check_header(madt, b"APIC", tables.MADT_REVISION)
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)  # PCAT_COMPAT
    entries = parse_madt(madt)
    lapics = [e for k, e in entries if k == 0]
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [
        (i, i, 1) for i in range(vcpus)]
    (ioapic,) = [e for k, e in entries if k == 1]
    assert struct.unpack("<BBBBII", ioapic) == (1, 12, 0, 0, 0xFEC00000, 0)
    (iso,) = [e for k, e in entries if k == 2]
    assert struct.unpack("<BBBBIH", iso) == (2, 10, 0, 0, 2, 0)


@pytest.mark.parametrize("vcpus", [0, 255])
def test_madt_vcpu_limits(vcpus):
    with pytest.raises(BootError, match="vCPUs"):
        tables.madt(vcpus)


def test_dsdt(image):
    _, dsdt = image.tables[b"DSDT"]
    check_header(dsdt, b"DSDT", 2)
    assert dsdt.count(b"\x0dLNRO0005\x00") == 3
    assert b"COM1" in dsdt and b"\x0c\x41\xd0\x05\x01" in dsdt  # EISAID PNP0501
    for slot in SLOTS:
        assert tables.aml.memory32_fixed(slot.base, slot.size) in dsdt
        assert tables.aml.extended_interrupt(slot.irq, edge=True) in dsdt
    assert b"_S5_\x12\x05\x02\x0a\x05\x00" in dsdt


def test_dsdt_accepts_tuples_and_no_devices():
    assert tables.dsdt([(0xD0000000, 0x1000, 5)]) == tables.dsdt([VirtioMmioSlot(0xD0000000, 0x1000, 5)])
    assert b"LNRO" not in tables.dsdt([])


def test_tables_are_aligned_and_disjoint(image):
    spans = sorted((a, a + len(d)) for a, d in image.tables.values())
    for (a0, e0), (a1, _) in zip(spans, spans[1:]):
        assert a0 % 16 == 0 and e0 <= a1
    assert image.end <= layout.ACPI_TABLES_END


def test_too_many_devices_do_not_fit():
    with pytest.raises(BootError, match="ACPI tables need"):
        layout_acpi(1, SLOTS, limit=layout.ACPI_TABLES_ADDR + 512)


def test_build_acpi_writes_guest_memory():
    from vmm_core.memory import GuestMemory, create_guest_memory
    mem = create_guest_memory(16 << 20)
    try:
        rsdp_addr = tables.build_acpi(mem, 2, SLOTS)
        image = layout_acpi(2, SLOTS)
        assert rsdp_addr == layout.ACPI_TABLES_ADDR
        for addr, data in image.tables.values():
            assert mem.read(addr, len(data)) == data
    finally:
        mem.close()
