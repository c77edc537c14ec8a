"""The bzImage format and its setup header (Linux Documentation/arch/x86/boot.rst).

A bzImage is the real-mode setup code ((setup_sects + 1) sectors of 512 bytes, the setup header
at 0x1f1 inside it), then the protected-mode kernel: the decompressor, which carries the
compressed `vmlinux` at `payload_offset` (relative to the protected-mode code) for
`payload_length` bytes.  Parsing is pure; nothing here touches guest memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BootError

SECTOR_SIZE = 512
SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
DEFAULT_SETUP_SECTS = 4  # "If this field is 0, the real value is 4."

# Boot protocol versions (major << 8 | minor).
PROTOCOL_2_12 = 0x020C  # xloadflags, hence XLF_KERNEL_64 and the 64-bit entry point

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4

# The 64-bit entry of a protected-mode kernel is 0x200 bytes past its load address.
STARTUP_64_OFFSET = 0x200

# (name, offset in the boot sector, struct format): the setup header fields from boot.rst.
SETUP_HEADER_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("setup_sects", 0x1F1, "B"),
    ("root_flags", 0x1F2, "H"),
    ("syssize", 0x1F4, "I"),
    ("ram_size", 0x1F8, "H"),
    ("vid_mode", 0x1FA, "H"),
    ("root_dev", 0x1FC, "H"),
    ("boot_flag", 0x1FE, "H"),
    ("jump", 0x200, "H"),
    ("header", 0x202, "4s"),
    ("version", 0x206, "H"),
    ("realmode_swtch", 0x208, "I"),
    ("start_sys_seg", 0x20C, "H"),
    ("kernel_version", 0x20E, "H"),
    ("type_of_loader", 0x210, "B"),
    ("loadflags", 0x211, "B"),
    ("setup_move_size", 0x212, "H"),
    ("code32_start", 0x214, "I"),
    ("ramdisk_image", 0x218, "I"),
    ("ramdisk_size", 0x21C, "I"),
    ("bootsect_kludge", 0x220, "I"),
    ("heap_end_ptr", 0x224, "H"),
    ("ext_loader_ver", 0x226, "B"),
    ("ext_loader_type", 0x227, "B"),
    ("cmd_line_ptr", 0x228, "I"),
    ("initrd_addr_max", 0x22C, "I"),
    ("kernel_alignment", 0x230, "I"),
    ("relocatable_kernel", 0x234, "B"),
    ("min_alignment", 0x235, "B"),
    ("xloadflags", 0x236, "H"),
    ("cmdline_size", 0x238, "I"),
    ("hardware_subarch", 0x23C, "I"),
    ("hardware_subarch_data", 0x240, "Q"),
    ("payload_offset", 0x248, "I"),
    ("payload_length", 0x24C, "I"),
    ("setup_data", 0x250, "Q"),
    ("pref_address", 0x258, "Q"),
    ("init_size", 0x260, "I"),
    ("handover_offset", 0x264, "I"),
    ("kernel_info_offset", 0x268, "I"),
)
SETUP_HEADER_END = 0x26C
OFFSETS = {name: off for name, off, _ in SETUP_HEADER_FIELDS}
FORMATS = {name: fmt for name, _, fmt in SETUP_HEADER_FIELDS}


@dataclass(frozen=True)
class SetupHeader:
    """The setup header fields a 64-bit loader reads (names as in boot.rst)."""

    setup_sects: int
    syssize: int
    boot_flag: int
    header: bytes
    version: int
    jump: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    kernel_version: int
    raw: bytes  # the bytes from 0x1f1 up to the end of the header (0x202 + the byte at 0x201)

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel in the file."""
        return ((self.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE

    @property
    def kernel_64(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)


def is_bzimage(data: bytes) -> bool:
    """True if `data` starts with a boot sector carrying the "HdrS" setup header."""
    return (len(data) >= 0x206 and data[0x202:0x206] == HDRS_MAGIC
            and struct.unpack_from("<H", data, 0x1FE)[0] == BOOT_FLAG)


def parse_setup_header(data: bytes, name: str = "kernel") -> SetupHeader:
    """Read and check the setup header of a bzImage for the 64-bit boot protocol."""
    if not is_bzimage(data):
        raise BootError(f"{name} is not a bzImage (no 0xAA55 boot flag and HdrS magic at 0x202)")
    if len(data) < SETUP_HEADER_END:
        raise BootError(f"{name} is truncated: {len(data)} bytes, the setup header alone needs "
                        f"{SETUP_HEADER_END}")
    values = {n: struct.unpack_from("<" + f, data, off)[0] for n, off, f in SETUP_HEADER_FIELDS}
    header_end = 0x202 + data[0x201]  # boot.rst: the header ends at 0x202 + the jump's offset byte
    values["raw"] = bytes(data[SETUP_HEADER_OFFSET:max(header_end, SETUP_HEADER_OFFSET + 1)])
    hdr = SetupHeader(**{k: values[k] for k in SetupHeader.__dataclass_fields__})
    if hdr.version < PROTOCOL_2_12:
        raise BootError(f"{name} speaks boot protocol {hdr.version_text}; Bulkhead needs 2.12 or "
                        "later (Linux 3.8+) for the 64-bit entry point")
    if not hdr.kernel_64:
        raise BootError(f"{name} has no 64-bit entry point (XLF_KERNEL_64 clear): boot an x86-64 "
                        "kernel")
    if not hdr.loadflags & LOADED_HIGH:
        raise BootError(f"{name} is a zImage (LOADED_HIGH clear); only bzImages are supported")
    kernel_bytes = hdr.syssize * 16
    if len(data) < hdr.setup_size + kernel_bytes:
        raise BootError(f"{name} is truncated: {len(data)} bytes, but its header says "
                        f"{hdr.setup_size + kernel_bytes} (setup {hdr.setup_size} + kernel "
                        f"{kernel_bytes}); download it again")
    if hdr.payload_length and hdr.payload_offset + hdr.payload_length > kernel_bytes:
        raise BootError(f"{name}: compressed payload at {hdr.payload_offset:#x}+{hdr.payload_length:#x} "
                        f"runs past the protected-mode kernel ({kernel_bytes:#x} bytes)")
    if hdr.kernel_alignment == 0 or hdr.kernel_alignment & (hdr.kernel_alignment - 1):
        raise BootError(f"{name}: kernel_alignment {hdr.kernel_alignment:#x} is not a power of two")
    return hdr


def protected_mode_kernel(data: bytes, hdr: SetupHeader) -> bytes:
    """The protected-mode part of the image (what a 32/64-bit boot loads at code32_start)."""
    return bytes(data[hdr.setup_size:hdr.setup_size + hdr.syssize * 16])


def compressed_payload(data: bytes, hdr: SetupHeader) -> bytes:
    """The compressed vmlinux carried by the decompressor (boot.rst: payload_offset/length)."""
    if not hdr.payload_length:
        raise BootError("this bzImage does not declare its payload (payload_length 0)")
    start = hdr.setup_size + hdr.payload_offset
    return bytes(data[start:start + hdr.payload_length])


def kernel_version_string(data: bytes, hdr: SetupHeader) -> str:
    """The version string the setup code points at (kernel_version + 0x200), or ''."""
    if not hdr.kernel_version:
        return ""
    start = hdr.kernel_version + 0x200
    end = data.find(b"\0", start, start + 256)
    if start >= len(data) or end < 0:
        return ""
    return data[start:end].decode("ascii", "replace")
