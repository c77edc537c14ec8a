"""`struct boot_params`, the "zero page" a 64-bit Linux entry finds in %rsi (pure).

Offsets are those of arch/x86/include/uapi/asm/bootparam.h as documented in
Documentation/arch/x86/zero-page.rst; the setup header at 0x1f1 is the one in `bzimage`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BootError
from . import bzimage
from .e820 import E820_ENTRY, E820Entry, pack_e820

ZERO_PAGE_SIZE = 4096

# boot_params fields (zero-page.rst).
BP_ACPI_RSDP_ADDR = 0x070  # u64, protocol 2.14+
BP_EXT_RAMDISK_IMAGE = 0x0C0  # u32: bits 32-63 of ramdisk_image
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8  # u8
BP_SENTINEL = 0x1EF  # u8: a loader that copies the header blindly leaves it non-zero
BP_HDR = 0x1F1  # struct setup_header
BP_E820_TABLE = 0x2D0  # struct boot_e820_entry[128]

LOADER_TYPE_UNDEFINED = 0xFF  # type_of_loader: "undefined" boot loader ID (boot.rst)


@dataclass(frozen=True)
class BootParamsSpec:
    """What goes into the zero page besides the kernel's own header."""

    e820: tuple[E820Entry, ...]
    cmd_line_ptr: int
    cmdline_len: int  # bytes without the NUL
    ramdisk_image: int = 0
    ramdisk_size: int = 0
    acpi_rsdp_addr: int = 0


def synthetic_setup_header(cmdline_size: int = 2047) -> bytes:
    """A setup header for an ELF vmlinux loaded without its bzImage (boot flag, HdrS, 2.15).

    Mirrors what a bzImage of a current kernel declares, so the kernel's own checks pass.
    """
    hdr = bytearray(bzimage.SETUP_HEADER_END - BP_HDR)

    def put(name: str, value) -> None:
        struct.pack_into("<" + bzimage.FORMATS[name], hdr, bzimage.OFFSETS[name] - BP_HDR, value)

    put("boot_flag", bzimage.BOOT_FLAG)
    put("header", bzimage.HDRS_MAGIC)
    put("version", 0x020F)
    put("kernel_alignment", 0x1000000)
    put("xloadflags", bzimage.XLF_KERNEL_64)
    put("cmdline_size", cmdline_size)
    put("initrd_addr_max", 0x7FFFFFFF)
    put("loadflags", bzimage.LOADED_HIGH)
    return bytes(hdr)


def build_zero_page(setup_header: bytes, spec: BootParamsSpec) -> bytes:
    """A 4 KiB boot_params: the kernel's setup header plus what the loader fills in.

    `setup_header` is the raw header from the image (0x1f1 up to 0x202 + the byte at 0x201),
    copied as boot.rst asks so that fields we do not know stay as the kernel set them.
    """
    page = bytearray(ZERO_PAGE_SIZE)
    if len(setup_header) > BP_E820_TABLE - BP_HDR:
        raise BootError(f"setup header of {len(setup_header)} bytes overruns boot_params")
    page[BP_HDR:BP_HDR + len(setup_header)] = setup_header

    def put(name: str, value: int) -> None:
        struct.pack_into("<" + bzimage.FORMATS[name], page, bzimage.OFFSETS[name], value)

    put("type_of_loader", LOADER_TYPE_UNDEFINED)
    # LOADED_HIGH: the kernel sits at 1 MiB or above.  KASLR_FLAG is the decompressor's report
    # that it randomized the kernel; we start the kernel where it was linked, so clear it.
    loadflags = (page[bzimage.OFFSETS["loadflags"]] | bzimage.LOADED_HIGH) & ~bzimage.KASLR_FLAG
    put("loadflags", loadflags & 0xFF)
    put("cmd_line_ptr", spec.cmd_line_ptr & 0xFFFF_FFFF)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, spec.cmd_line_ptr >> 32)
    put("ramdisk_image", spec.ramdisk_image & 0xFFFF_FFFF)
    put("ramdisk_size", spec.ramdisk_size & 0xFFFF_FFFF)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_IMAGE, spec.ramdisk_image >> 32)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_SIZE, spec.ramdisk_size >> 32)
    struct.pack_into("<Q", page, BP_ACPI_RSDP_ADDR, spec.acpi_rsdp_addr)
    table = pack_e820(list(spec.e820))
    page[BP_E820_ENTRIES] = len(spec.e820)
    page[BP_E820_TABLE:BP_E820_TABLE + len(table)] = table
    page[BP_SENTINEL] = 0
    return bytes(page)


def read_e820(page: bytes) -> list[E820Entry]:
    """Decode the e820 table of a zero page (for tests and diagnostics)."""
    count = page[BP_E820_ENTRIES]
    return [E820Entry(*E820_ENTRY.unpack_from(page, BP_E820_TABLE + i * E820_ENTRY.size))
            for i in range(count)]


def read_header_field(page: bytes, name: str) -> int:
    return struct.unpack_from("<" + bzimage.FORMATS[name], page, bzimage.OFFSETS[name])[0]
