"""ACPI tables for a hardware-reduced x86 guest: RSDP, XSDT, FADT, MADT and DSDT.

Linux's cloud kernels find the IOAPIC, the other vCPUs and the virtio-mmio devices only through
ACPI (no MP table, no `virtio_mmio.device=` command line), so we describe them here.  The table
builders are pure (bytes in, bytes out); `build_acpi` is the only function that touches guest
memory.  Section numbers refer to ACPI 6.5.

Why each choice:
  * Hardware-reduced ACPI (FADT flag HW_REDUCED_ACPI): no PM1/GPE blocks, no SCI, no FACS.  Power
    off goes through the FADT sleep control register (§4.8.3.7): Linux writes
    (SLP_TYP << 2) | SLP_EN there, with SLP_TYP from `\\_S5`.  Reset goes through RESET_REG.
  * Interrupts of virtio-mmio devices are declared edge-triggered, active-high, exclusive, as
    Firecracker does: our devices signal by writing an irqfd (a pulse: KVM raises and lowers the
    line), not by holding a level until the guest acks InterruptStatus.  A level-triggered IOAPIC
    pin fed pulses loses interrupts that arrive while Remote IRR is set (QEMU can declare Level
    because its virtio-mmio line stays high until the ack); edge also matches the ISA default for
    GSIs 0-15 so no MADT override is needed.  Linux's virtio_mmio handler reads and acks
    InterruptStatus, so an edge is never lost.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from .. import layout
from ..errors import BootError
from ..memory import GuestMemory
from . import aml

# -- identification (what Linux prints for every table) ------------------------------------------
OEM_ID = b"BLKHD "  # 6 bytes
OEM_TABLE_ID = b"BULKHEAD"  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"BLKH"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_ID = b"BULKHEAD"  # FADT Hypervisor Vendor Identity (§5.2.9)

HEADER_SIZE = 36  # System Description Table Header (§5.2.6)
RSDP_SIGNATURE = b"RSD PTR "
RSDP_V1_SIZE = 20
RSDP_SIZE = 36
TABLE_ALIGN = 16  # RSDP must sit on a 16-byte boundary for the legacy scan (§5.2.5.1)

# -- fixed hardware of the hardware-reduced platform: constants for layout.py ------------------------
SLEEP_CONTROL_PORT = 0x3C0  # 8-bit: SLP_TYP bits 2-4, SLP_EN bit 5 (§4.8.3.7)
SLEEP_STATUS_PORT = 0x3C1  # 8-bit: WAK_STS bit 7
RESET_PORT = 0x3C2
RESET_VALUE = 0x01
S5_SLP_TYP = 5  # the value `\_S5` hands the OS; a write of (5 << 2) | SLP_EN = 0x34 means power off
SLEEP_CONTROL_SLP_EN = 1 << 5
SLEEP_CONTROL_SLP_TYP_SHIFT = 2
SLEEP_CONTROL_SLP_TYP_MASK = 0x7 << 2
SLEEP_STATUS_WAK_STS = 1 << 7

# -- FADT (§5.2.9) -----------------------------------------------------------------------------------
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_SIZE = 276
# Fixed Feature Flags (Table 5.10)
FADT_F_WBINVD = 1 << 0
FADT_F_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_F_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
# IA-PC Boot Architecture Flags (Table 5.11)
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
# Generic Address Structure (§5.2.3.2)
GAS_SPACE_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# -- MADT (§5.2.12) ----------------------------------------------------------------------------------
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0  # dual 8259s present as well
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE = 2
MADT_TYPE_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1 << 0
MPS_INTI_CONFORMS = 0  # polarity and trigger mode conform to the bus (ISA: edge, active high)
MPS_INTI_EDGE_HIGH = 0x1 | (0x1 << 2)
IOAPIC_ID = 0  # KVM's in-kernel IOAPIC resets to ID 0
ISA_BUS = 0
PIT_ISA_IRQ = 0
PIT_GSI = 2  # KVM routes ISA IRQ0 to IOAPIC pin 2, as on a PC
LINT1 = 1
ALL_PROCESSORS_UID = 0xFF
MAX_VCPUS = 254  # 8-bit xAPIC IDs, 0xFF is broadcast

DSDT_REVISION = 2  # 64-bit AML integers

COM1_IO_LENGTH = 8
VIRTIO_MMIO_HID = "LNRO0005"


@dataclass(frozen=True)
class VirtioMmioSlot:
    """One virtio-mmio device as the DSDT describes it."""

    base: int
    size: int
    irq: int


# -- helpers ------------------------------------------------------------------------------------------
def checksum(data: bytes) -> int:
    """The byte that makes `data` plus it sum to zero mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header (§5.2.6) with length and checksum filled in, then `body`."""
    if len(signature) != 4:
        raise ValueError(f"ACPI signature {signature!r} must be 4 bytes")
    length = HEADER_SIZE + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                         OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(space_id: int, bit_width: int, address: int, access_size: int, bit_offset: int = 0) -> bytes:
    """A 12-byte Generic Address Structure."""
    return struct.pack("<BBBBQ", space_id, bit_width, bit_offset, access_size, address)


# -- the tables ----------------------------------------------------------------------------------------
def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (§5.2.5.3): no RSDT, only the XSDT; both checksums set."""
    first = bytearray(struct.pack("<8sB6sBI", RSDP_SIGNATURE, 0, OEM_ID, 2, 0))
    first[8] = checksum(first)
    ext = bytearray(first + struct.pack("<IQB3s", RSDP_SIZE, xsdt_addr, 0, b"\0\0\0"))
    ext[32] = checksum(ext)
    return bytes(ext)


def xsdt(table_addrs: Sequence[int]) -> bytes:
    """XSDT (§5.2.8): 64-bit pointers to every table but the DSDT (which the FADT points to)."""
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in table_addrs))


def fadt(dsdt_addr: int, *, i8042: bool = True, cmos_rtc: bool = True) -> bytes:
    """FADT revision 6.5 (§5.2.9) for a hardware-reduced platform."""
    boot_arch = IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED
    if i8042:
        boot_arch |= IAPC_8042
    if not cmos_rtc:
        boot_arch |= IAPC_CMOS_RTC_NOT_PRESENT
    flags = (FADT_F_WBINVD | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON | FADT_F_RESET_REG_SUP
             | FADT_F_HW_REDUCED_ACPI)
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    # FIRMWARE_CTRL, DSDT (32-bit), SCI_INT, SMI_CMD and all PM blocks stay zero: hardware-reduced.
    put(109, "<H", boot_arch)  # IAPC_BOOT_ARCH
    put(112, "<I", flags)  # Flags
    body[116 - HEADER_SIZE:128 - HEADER_SIZE] = gas(GAS_SPACE_SYSTEM_IO, 8, RESET_PORT, GAS_ACCESS_BYTE)
    put(128, "<B", RESET_VALUE)  # RESET_VALUE
    put(131, "<B", FADT_MINOR_REVISION)  # FADT Minor Version
    put(140, "<Q", dsdt_addr)  # X_DSDT
    body[244 - HEADER_SIZE:256 - HEADER_SIZE] = gas(
        GAS_SPACE_SYSTEM_IO, 8, SLEEP_CONTROL_PORT, GAS_ACCESS_BYTE)  # SLEEP_CONTROL_REG
    body[256 - HEADER_SIZE:268 - HEADER_SIZE] = gas(
        GAS_SPACE_SYSTEM_IO, 8, SLEEP_STATUS_PORT, GAS_ACCESS_BYTE)  # SLEEP_STATUS_REG
    body[268 - HEADER_SIZE:276 - HEADER_SIZE] = HYPERVISOR_VENDOR_ID
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(vcpus: int) -> bytes:
    """MADT (§5.2.12): one enabled Local APIC per vCPU, the IOAPIC, IRQ0 -> GSI2, LINT1 = NMI."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise BootError(f"{vcpus} vCPUs cannot be described with xAPIC IDs: give 1 to {MAX_VCPUS}")
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT)
    for cpu in range(vcpus):  # ACPI Processor UID = APIC ID = vCPU index
        body += struct.pack("<BBBBI", MADT_TYPE_LOCAL_APIC, 8, cpu, cpu, LOCAL_APIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_TYPE_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, PIT_ISA_IRQ,
                        PIT_GSI, MPS_INTI_CONFORMS)
    body += struct.pack("<BBBHB", MADT_TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID,
                        MPS_INTI_EDGE_HIGH, LINT1)
    return sdt(b"APIC", MADT_REVISION, body)


def virtio_device_name(index: int) -> str:
    return f"VR{index:02X}"


def dsdt_body(virtio_slots: Iterable[VirtioMmioSlot | tuple[int, int, int]]) -> bytes:
    """The AML of the DSDT: COM1, the virtio-mmio devices, the power button and its Generic
    Event Device under \\_SB, and \\_S5."""
    com1 = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(0)),
        aml.method("_STA", aml.return_(aml.integer(0x0F))),  # present, enabled, shown, functioning
        aml.name("_CRS", aml.resource_template(
            aml.io_port(layout.COM1_PORT, layout.COM1_PORT, 1, COM1_IO_LENGTH),
            aml.extended_interrupt(layout.SERIAL_COM1_IRQ, edge=True))),
    )
    devices = [com1]
    for index, slot in enumerate(virtio_slots):
        base, size, irq = (slot.base, slot.size, slot.irq) if isinstance(slot, VirtioMmioSlot) else slot
        if index > 0xFF:
            raise BootError("at most 256 virtio-mmio devices can be named in the DSDT")
        devices.append(aml.device(
            virtio_device_name(index),
            aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
            aml.name("_UID", aml.integer(index)),
            aml.name("_CCA", aml.integer(1)),  # cache-coherent DMA
            aml.name("_CRS", aml.resource_template(
                aml.memory32_fixed(base, size),
                aml.extended_interrupt(irq, edge=True))),
        ))
    # The power button of a hardware-reduced platform (ACPI 6.4 §5.6.9, §4.8.2.2.1.2): the
    # Generic Event Device signals its interrupt, the OS runs _EVT, which notifies the button
    # device (0x80: "button pressed"); the OS then powers off through SLEEP_CONTROL_REG.
    devices.append(aml.device(
        "PWRB",
        aml.name("_HID", aml.eisa_id("PNP0C0C")),
        aml.name("_UID", aml.integer(0)),
    ))
    devices.append(aml.device(
        "GED0",
        aml.name("_HID", aml.string("ACPI0013")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(aml.extended_interrupt(layout.ACPI_GED_IRQ, edge=True))),
        aml.method("_EVT", aml.notify("\\_SB_.PWRB", 0x80), arg_count=1, serialized=True),
    ))
    s5 = aml.name("\\_S5_", aml.package(aml.integer(S5_SLP_TYP), aml.integer(0)))
    return aml.scope("\\_SB_", *devices) + s5


def dsdt(virtio_slots: Iterable[VirtioMmioSlot | tuple[int, int, int]]) -> bytes:
    return sdt(b"DSDT", DSDT_REVISION, dsdt_body(virtio_slots))


# -- placement -------------------------------------------------------------------------------------------
def _align(value: int, alignment: int = TABLE_ALIGN) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass(frozen=True)
class AcpiImage:
    """Every table placed at its guest address: what `build_acpi` writes."""

    rsdp_addr: int
    tables: dict[bytes, tuple[int, bytes]]  # signature (b"RSDP" for the RSDP) -> (address, bytes)

    @property
    def end(self) -> int:
        return max(addr + len(data) for addr, data in self.tables.values())


def layout_acpi(vcpus: int, virtio_slots: Iterable[VirtioMmioSlot | tuple[int, int, int]] = (),
                *, base: int = layout.ACPI_TABLES_ADDR, limit: int = layout.ACPI_TABLES_END,
                i8042: bool = True, cmos_rtc: bool = True) -> AcpiImage:
    """Build and place the tables from `base`: RSDP, XSDT, FADT, MADT, DSDT, 16-byte aligned."""
    if base % TABLE_ALIGN:
        raise ValueError(f"ACPI base {base:#x} is not 16-byte aligned")
    dsdt_table = dsdt(virtio_slots)
    madt_table = madt(vcpus)
    rsdp_addr = base
    xsdt_addr = _align(rsdp_addr + RSDP_SIZE)
    fadt_addr = _align(xsdt_addr + HEADER_SIZE + 2 * 8)
    madt_addr = _align(fadt_addr + FADT_SIZE)
    dsdt_addr = _align(madt_addr + len(madt_table))
    tables = {
        b"RSDP": (rsdp_addr, rsdp(xsdt_addr)),
        b"XSDT": (xsdt_addr, xsdt([fadt_addr, madt_addr])),
        b"FACP": (fadt_addr, fadt(dsdt_addr, i8042=i8042, cmos_rtc=cmos_rtc)),
        b"APIC": (madt_addr, madt_table),
        b"DSDT": (dsdt_addr, dsdt_table),
    }
    image = AcpiImage(rsdp_addr, tables)
    if image.end > limit:
        raise BootError(f"ACPI tables need {image.end - base} bytes but only {limit - base} "
                        f"fit at {base:#x}: use fewer virtio devices or vCPUs")
    return image


def build_acpi(memory: GuestMemory, vcpus: int,
               virtio_slots: Iterable[VirtioMmioSlot | tuple[int, int, int]] = (),
               *, i8042: bool = True, cmos_rtc: bool = True) -> int:
    """Write every table into guest memory at ACPI_TABLES_ADDR; return the RSDP address."""
    image = layout_acpi(vcpus, virtio_slots, i8042=i8042, cmos_rtc=cmos_rtc)
    memory.write(layout.ACPI_TABLES_ADDR, bytes(layout.ACPI_TABLES_END - layout.ACPI_TABLES_ADDR))
    for addr, data in image.tables.values():
        memory.write(addr, data)
    return image.rsdp_addr
