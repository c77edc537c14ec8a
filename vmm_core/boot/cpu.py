"""64-bit long-mode entry state shared by every loader (test guest and Linux).

Pure builders (page tables, GDT descriptors) return bytes/ints; `setup_long_mode` applies them
to a vCPU.  Layout: identity map of 0..4 GiB in 2 MiB pages, every entry user-accessible (the
test guest runs its drivers at CPL3; Linux builds its own tables at once).  Selectors follow the
Linux 64-bit boot protocol: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
"""

from __future__ import annotations

import struct

from ..layout import ENTRY_TSS_ADDR, GDT_ADDR, IDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR
from ..memory import GuestMemory

# Page-table entry bits (Intel SDM vol. 3 §4.5).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_PAGE_SIZE = 1 << 7  # 2 MiB page in a PD entry

# Control registers and EFER.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

SEL_KERNEL_CS = 0x10
SEL_KERNEL_DS = 0x18
SEL_USER_DS = 0x20
SEL_USER_CS = 0x28
SEL_TSS = 0x30
TSS_SIZE = 0x68

IDENTITY_MAP_GIB = 4


def page_tables() -> dict[int, bytes]:
    """{guest address: page bytes} for an identity map of the low 4 GiB with 2 MiB pages."""
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER
    pml4 = struct.pack("<Q", PDPT_ADDR | flags).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_ADDR + i * 4096) | flags)
                    for i in range(IDENTITY_MAP_GIB)).ljust(4096, b"\0")
    tables = {PML4_ADDR: pml4, PDPT_ADDR: pdpt}
    for gib in range(IDENTITY_MAP_GIB):
        pd = b"".join(struct.pack("<Q", ((gib << 30) + (i << 21)) | flags | PTE_PAGE_SIZE)
                      for i in range(512))
        tables[PD_ADDR + gib * 4096] = pd
    return tables


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A legacy 8-byte segment descriptor; `flags` packs access byte (low 8) and G/DB/L/AVL (high 4)."""
    return (((base & 0xFF000000) << 32) | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF)
            | ((limit & 0xF0000) << 32) | ((flags & 0xF0FF) << 40))


# access byte | (granularity/size nibble << 12)
_CODE64_KERNEL = 0xA09B  # G=1 L=1, P=1 DPL=0 S=1 type=execute/read, accessed
_DATA_KERNEL = 0xC093    # G=1 D/B=1, P=1 DPL=0 S=1 type=read/write, accessed
_DATA_USER = 0xC0F3      # as above, DPL=3
_CODE64_USER = 0xA0FB    # as above, DPL=3
_TSS64 = 0x008B          # P=1 type=64-bit TSS (busy)


def gdt() -> list[int]:
    """Eight 8-byte slots: null, unused, kernel CS/DS, user DS/CS, then a 16-byte TSS descriptor."""
    tss_low = gdt_entry(_TSS64, ENTRY_TSS_ADDR, TSS_SIZE - 1)
    tss_high = ENTRY_TSS_ADDR >> 32
    return [0, 0, gdt_entry(_CODE64_KERNEL, 0, 0xFFFFF), gdt_entry(_DATA_KERNEL, 0, 0xFFFFF),
            gdt_entry(_DATA_USER, 0, 0xFFFFF), gdt_entry(_CODE64_USER, 0, 0xFFFFF), tss_low, tss_high]


def segment_from_entry(entry: int, selector: int) -> dict[str, int]:
    """The `struct kvm_segment` fields a descriptor stands for."""
    base = ((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000)
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    return {
        "base": base, "limit": limit, "selector": selector,
        "type": (entry >> 40) & 0xF, "present": (entry >> 47) & 1, "dpl": (entry >> 45) & 3,
        "db": (entry >> 54) & 1, "s": (entry >> 44) & 1, "l": (entry >> 53) & 1, "g": g,
        "avl": (entry >> 52) & 1, "unusable": 0,
    }


def write_boot_structures(memory: GuestMemory) -> None:
    """Page tables, GDT and an empty TSS, written once per VM."""
    for addr, page in page_tables().items():
        memory.write(addr, page)
    memory.write(GDT_ADDR, b"".join(struct.pack("<Q", e) for e in gdt()))
    memory.write(ENTRY_TSS_ADDR, bytes(TSS_SIZE))


def long_mode_sregs(sregs) -> None:
    """Fill a `struct kvm_sregs` (from KVM_GET_SREGS, so apic_base etc. stay) for 64-bit entry."""
    table = gdt()
    code = segment_from_entry(table[SEL_KERNEL_CS >> 3], SEL_KERNEL_CS)
    data = segment_from_entry(table[SEL_KERNEL_DS >> 3], SEL_KERNEL_DS)
    tss = segment_from_entry(table[SEL_TSS >> 3], SEL_TSS)
    for name, value in code.items():
        setattr(sregs.cs, name, value)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        for name, value in data.items():
            setattr(seg, name, value)
    for name, value in tss.items():
        setattr(sregs.tr, name, value)
    sregs.gdt.base = GDT_ADDR
    sregs.gdt.limit = len(table) * 8 - 1
    sregs.idt.base = IDT_ADDR
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE


# MSRs a fresh vCPU gets (Intel SDM numbers), as Firecracker/crosvm set them for Linux.
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
}

# Local APIC LVT registers (offsets in the 1 KiB register page) and delivery modes.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


def lint_value(old: int, mode: int) -> int:
    """LVT entry with delivery mode `mode` (bits 8-10) and unmasked, other bits kept."""
    return (old & ~0x10700) | (mode << 8)
