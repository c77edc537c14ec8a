"""The guest physical memory map, in one place (x86-64).

    0x0000_0000  real-mode IVT/BDA (left zero)
    0x0000_0500  GDT                         (boot.cpu)
    0x0000_0520  IDT (empty; the guest installs its own)
    0x0000_7000  Linux zero page (boot_params)
    0x0000_8ff0  initial stack pointer
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000-0xefff four PDs (identity 4 GiB, 2 MiB pages)
    0x0000_f000  TSS used for entry (the guest replaces it)
    0x0002_0000  kernel command line (up to CMDLINE_MAX bytes)
    0x000e_0000  ACPI tables (RSDP found here by legacy scan too)
    0x0010_0000  kernel / test guest load address (1 MiB)
    ...          RAM up to min(ram, MMIO_HOLE_START)
    0xc000_0000  MMIO hole start: testdev page (guest_kit control registers)
    0xd000_0000  virtio-mmio slots, VIRTIO_MMIO_SLOT_SIZE apart
    0xfec0_0000  IOAPIC
    0xfee0_0000  local APIC
    0x1_0000_0000 RAM above 4 GiB, if any
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four pages: 0xb000..0xefff
ENTRY_TSS_ADDR = 0xF000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 4096
ACPI_TABLES_ADDR = 0xE0000
ACPI_TABLES_END = 0x100000
KERNEL_LOAD_ADDR = 0x100000

MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
TESTDEV_MMIO_BASE = 0xC000_0000
TESTDEV_MMIO_SIZE = 0x1000
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SLOT_SIZE = 0x1000
VIRTIO_MMIO_MAX_SLOTS = 64
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
# KVM needs three pages for the real-mode TSS (KVM_SET_TSS_ADDR) and one for the identity map,
# inside the hole and clear of every device.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000

# Legacy interrupt lines.
SERIAL_COM1_IRQ = 4
RTC_IRQ = 8
# Lines handed to virtio-mmio slots in order: all reachable through the 8259 PIC (the test guest)
# and the IOAPIC (Linux), avoiding the timer, keyboard, cascade, COM1/COM2, RTC, mouse and IDE.
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15)
TESTDEV_IRQFD_GSI = 3  # the testdev's own irqfd line (COM2's, unused here)
# The ACPI Generic Event Device's line (the legacy FPU-error IRQ, free on this platform): the
# power button of a hardware-reduced platform (no SCI, no fixed PWRBTN event).
ACPI_GED_IRQ = 13

# Port I/O.
COM1_PORT = 0x3F8
I8042_PORT_DATA = 0x60
I8042_PORT_CMD = 0x64
RTC_PORT = 0x70
BOOT_PROGRESS_PORT = 0x80
DEBUG_EXIT_PORT = 0x501
PIO_PROBE_PORT = 0x510  # 16 ports of testdev scratch space
PIO_PROBE_SIZE = 0x10


def ram_regions(ram_size: int) -> list[tuple[int, int]]:
    """(guest_phys_addr, size) of each RAM region for `ram_size` bytes, leaving the MMIO hole."""
    if ram_size <= 0:
        raise ValueError("RAM size must be positive")
    low = min(ram_size, MMIO_HOLE_START)
    regions = [(0, low)]
    if ram_size > low:
        regions.append((MMIO_HOLE_END, ram_size - low))
    return regions


def virtio_slot(index: int) -> tuple[int, int]:
    """(mmio base, irq) of virtio-mmio slot `index`."""
    if not 0 <= index < min(VIRTIO_MMIO_MAX_SLOTS, len(VIRTIO_IRQS)):
        raise ValueError(f"no virtio-mmio slot {index}: at most {len(VIRTIO_IRQS)} virtio devices")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT_SIZE, VIRTIO_IRQS[index]
