"""Booting Linux through its 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit BOOT
PROTOCOL").

Three kernel forms are accepted:
  * a bzImage, decompressed on the host (the default): the compressed `vmlinux` is pulled out
    of the image (`payload_offset`/`payload_length`), inflated here and its ELF segments loaded
    at their physical addresses; the guest starts at `startup_64` of the real kernel and never
    runs the decompressor.  The bzImage's setup header still goes into the zero page.
  * a bzImage loaded as-is (`decompress=False`): the protected-mode kernel is copied to
    `pref_address` and entered at +0x200; the guest decompresses itself.
  * an uncompressed ELF `vmlinux`: loaded like the first, with a synthetic setup header.

Either way the vCPU enters in 64-bit mode with paging on and the low 4 GiB identity-mapped, the
boot GDT with __BOOT_CS = 0x10 / __BOOT_DS = 0x18, interrupts off, and %rsi = the zero page.
That state is `vmm_core.boot.cpu`'s job; this module says where to jump (`LinuxBootPlan`).

Pure planning (`plan_kernel`, `place_initrd`, `check_cmdline`) is apart from `load_linux`, which
writes guest memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from .. import layout
from ..acpi.tables import VirtioMmioSlot, build_acpi
from ..errors import BootError
from ..memory import GuestMemory
from . import bzimage, decompress
from .bootparams import BootParamsSpec, build_zero_page, synthetic_setup_header
from .e820 import e820_map
from .elf import ElfImage, entry_physical, is_elf, load_elf, parse_elf

PAGE_SIZE = 4096
INITRD_ALIGN = 2 * layout.MiB  # as Firecracker/QEMU do; the kernel only needs page alignment
KERNEL_HALF = 0xFFFF_8000_0000_0000  # a vmlinux links its segments in the kernel's address half
DEFAULT_CMDLINE_SIZE = 2047  # boot.rst: protocol < 2.06 kernels allow 255, newer ones declare theirs
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF  # boot.rst: the limit to assume if the header gives none


@dataclass(frozen=True)
class KernelPlan:
    """What to load and where, decided from the kernel file alone (pure)."""

    kind: str  # "bzimage-host-decompressed", "bzimage", "vmlinux"
    setup_header: bytes  # copied into boot_params at 0x1f1
    cmdline_size: int
    initrd_addr_max: int
    load_addr: int  # lowest byte the kernel occupies
    footprint_end: int  # first byte past everything the kernel needs before it reads e820
    elf: bytes | None = None  # the vmlinux to load segment by segment
    image: bytes | None = None  # or the protected-mode kernel to load at `load_addr`
    entry: int = 0
    compression: str = ""
    version: str = ""


@dataclass(frozen=True)
class LinuxBootPlan:
    """Where the boot vCPU starts and what it finds there.

    The lead's CPU setup (`boot.cpu`): long mode with the identity map, CS 0x10 / DS 0x18, IF=0,
    rsp = BOOT_STACK_POINTER, then `regs` applied on top (rsi = zero page).  Application
    processors get no state: Linux starts them with INIT/SIPI through the LAPIC.
    """

    entry: int
    zero_page: int
    kernel: KernelPlan
    kernel_range: tuple[int, int]
    initrd_range: tuple[int, int] | None
    rsdp_addr: int
    cmdline: bytes
    regs: dict[str, int] = field(default_factory=dict)


# -- recognising kernels -------------------------------------------------------------------------------
def is_vmlinux(data: bytes) -> bool:
    """An ELF whose segments are linked in the kernel half, as Linux's vmlinux is."""
    if not is_elf(data):
        return False
    try:
        image = parse_elf(data)
    except BootError:
        return False
    return any(s.vaddr >= KERNEL_HALF for s in image.segments)


def is_linux_kernel(data: bytes) -> bool:
    """True for a bzImage or a vmlinux (what `prepare_linux_boot` accepts)."""
    return bzimage.is_bzimage(data) or is_vmlinux(data)


# -- pure planning -------------------------------------------------------------------------------------
def _elf_plan(elf: bytes, image: ElfImage, **fields) -> KernelPlan:
    start = min(s.paddr for s in image.segments)
    if start < layout.KERNEL_LOAD_ADDR:
        raise BootError(f"kernel segment at {start:#x} would overwrite the boot structures below "
                        f"{layout.KERNEL_LOAD_ADDR:#x}")
    end = max(image.end, fields.pop("init_end", 0))
    return KernelPlan(load_addr=start, footprint_end=end, elf=elf, entry=entry_physical(image), **fields)


def plan_kernel(data: bytes, *, decompress_on_host: bool = True, name: str = "kernel") -> KernelPlan:
    """Decide how to load `data` (a bzImage or a vmlinux); raise BootError with the reason if not."""
    if bzimage.is_bzimage(data):
        hdr = bzimage.parse_setup_header(data, name)
        common = dict(setup_header=hdr.raw, cmdline_size=hdr.cmdline_size,
                      initrd_addr_max=hdr.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX,
                      version=bzimage.kernel_version_string(data, hdr))
        load_addr = hdr.pref_address if hdr.pref_address >= layout.KERNEL_LOAD_ADDR else \
            _align_up(layout.KERNEL_LOAD_ADDR, hdr.kernel_alignment)
        if decompress_on_host:
            fmt, elf = decompress.decompress_payload(bzimage.compressed_payload(data, hdr))
            if not is_elf(elf):
                raise BootError(f"{name}: the decompressed payload is not an ELF vmlinux")
            return _elf_plan(elf, parse_elf(elf, name), kind="bzimage-host-decompressed",
                             compression=fmt, init_end=load_addr + hdr.init_size, **common)
        return KernelPlan(kind="bzimage", load_addr=load_addr,
                          footprint_end=load_addr + max(hdr.init_size, hdr.syssize * 16),
                          image=bzimage.protected_mode_kernel(data, hdr),
                          entry=load_addr + bzimage.STARTUP_64_OFFSET, **common)
    if is_elf(data):
        if not is_vmlinux(data):
            raise BootError(f"{name} is an ELF but not a Linux vmlinux (no segment linked in the "
                            "kernel's address half)")
        return _elf_plan(data, parse_elf(data, name), kind="vmlinux",
                         setup_header=synthetic_setup_header(DEFAULT_CMDLINE_SIZE),
                         cmdline_size=DEFAULT_CMDLINE_SIZE, initrd_addr_max=DEFAULT_INITRD_ADDR_MAX)
    if len(data) < 0x206:
        raise BootError(f"{name} is {len(data)} bytes: too short to be a kernel (truncated?)")
    raise BootError(f"{name} is neither a bzImage (no HdrS header) nor an ELF vmlinux")


def check_cmdline(cmdline: bytes | str, cmdline_size: int) -> bytes:
    """The NUL-terminated command line, if the kernel and our CMDLINE_MAX allow its length."""
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise BootError("the kernel command line contains a NUL byte")
    limit = min(cmdline_size, layout.CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise BootError(f"kernel command line is {len(raw)} bytes; this kernel accepts at most "
                        f"{limit} (cmdline_size): shorten it")
    return raw + b"\0"


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def place_initrd(size: int, ram_size: int, kernel_end: int, initrd_addr_max: int) -> int:
    """Highest INITRD_ALIGN-aligned address (page-aligned if that cannot fit) for the initrd.

    It must lie in low RAM above the kernel's footprint and end at or below initrd_addr_max.
    """
    if size <= 0:
        raise BootError("the initrd is empty")
    low_end = layout.ram_regions(ram_size)[0][1]
    top = min(low_end, initrd_addr_max + 1)
    for align in (INITRD_ALIGN, PAGE_SIZE):
        addr = (top - size) // align * align
        if addr >= _align_up(kernel_end, PAGE_SIZE):
            return addr
    room = max(0, top - _align_up(kernel_end, PAGE_SIZE))
    raise BootError(f"initrd of {size / layout.MiB:.1f} MiB does not fit in guest RAM: "
                    f"{room / layout.MiB:.1f} MiB free between the kernel (ends {kernel_end:#x}) and "
                    f"{top:#x}; give the VM more memory")


# -- loading into guest memory --------------------------------------------------------------------------
def load_linux(memory: GuestMemory, kernel: bytes, *, cmdline: bytes | str = b"",
               initrd: bytes | None = None, vcpus: int = 1,
               virtio_slots: Iterable[VirtioMmioSlot | tuple[int, int, int]] = (),
               decompress_on_host: bool = True, name: str = "kernel") -> LinuxBootPlan:
    """Load kernel, initrd, command line, ACPI tables and the zero page; return the entry plan."""
    plan = plan_kernel(kernel, decompress_on_host=decompress_on_host, name=name)
    cmd = check_cmdline(cmdline, plan.cmdline_size)
    ram_size = memory.size
    low_end = layout.ram_regions(ram_size)[0][1]
    if plan.footprint_end > low_end:
        raise BootError(f"{name} needs guest RAM up to {plan.footprint_end / layout.MiB:.0f} MiB but "
                        f"there are {low_end / layout.MiB:.0f} MiB below the MMIO hole: give the VM "
                        "more memory")
    if plan.elf is not None:
        image = load_elf(memory, plan.elf, name)
        kernel_range = (plan.load_addr, image.end)
    else:
        assert plan.image is not None
        memory.write(plan.load_addr, plan.image)
        kernel_range = (plan.load_addr, plan.load_addr + len(plan.image))

    initrd_range = None
    if initrd is not None:
        addr = place_initrd(len(initrd), ram_size, plan.footprint_end, plan.initrd_addr_max)
        memory.write(addr, initrd)
        initrd_range = (addr, addr + len(initrd))

    memory.write(layout.CMDLINE_ADDR, cmd)
    rsdp_addr = build_acpi(memory, vcpus, virtio_slots)
    spec = BootParamsSpec(
        e820=tuple(e820_map(ram_size)), cmd_line_ptr=layout.CMDLINE_ADDR, cmdline_len=len(cmd) - 1,
        ramdisk_image=initrd_range[0] if initrd_range else 0,
        ramdisk_size=len(initrd) if initrd is not None else 0, acpi_rsdp_addr=rsdp_addr)
    memory.write(layout.ZERO_PAGE_ADDR, build_zero_page(plan.setup_header, spec))
    return LinuxBootPlan(
        entry=plan.entry, zero_page=layout.ZERO_PAGE_ADDR, kernel=plan, kernel_range=kernel_range,
        initrd_range=initrd_range, rsdp_addr=rsdp_addr, cmdline=cmd,
        regs={"rsi": layout.ZERO_PAGE_ADDR, "rdi": 0, "rbp": 0, "rbx": 0})


def prepare_linux_boot(memory: GuestMemory, data: bytes, *, kernel: str, cmdline: str,
                       initrd_path: str | None, vcpus: int,
                       virtio_slots: list[tuple[int, int, int]]) -> LinuxBootPlan:
    """What `Machine` calls: reads the initrd file, then `load_linux`."""
    initrd = None
    if initrd_path:
        try:
            with open(initrd_path, "rb") as f:
                initrd = f.read()
        except OSError as e:
            raise BootError(f"--initrd {initrd_path}: {e.strerror}") from None
    return load_linux(memory, data, cmdline=cmdline, initrd=initrd, vcpus=vcpus,
                      virtio_slots=virtio_slots,
                      name=os.path.basename(kernel) or "kernel")
