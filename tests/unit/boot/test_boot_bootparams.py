"""boot_params field offsets (zero-page.rst / boot.rst) in the page we build."""

import struct

from vmm_core import layout
from vmm_core.boot import bootparams, bzimage
from vmm_core.boot.bootparams import BootParamsSpec, build_zero_page, read_e820, read_header_field
from vmm_core.boot.e820 import e820_map


def spec(**kw):
    base = dict(e820=tuple(e820_map(320 << 20)), cmd_line_ptr=layout.CMDLINE_ADDR, cmdline_len=10,
                ramdisk_image=0x13A00000, ramdisk_size=0x123456, acpi_rsdp_addr=0xE0000)
    base.update(kw)
    return BootParamsSpec(**base)


def test_documented_offsets():
    assert bootparams.BP_HDR == 0x1F1
    assert bootparams.BP_E820_ENTRIES == 0x1E8
    assert bootparams.BP_E820_TABLE == 0x2D0
    assert bootparams.BP_ACPI_RSDP_ADDR == 0x070
    assert bootparams.BP_EXT_RAMDISK_IMAGE == 0x0C0 and bootparams.BP_EXT_CMD_LINE_PTR == 0x0C8


def test_fields_at_their_offsets():
    page = build_zero_page(bootparams.synthetic_setup_header(), spec())
    assert len(page) == 4096
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert page[0x210] == 0xFF  # type_of_loader
    assert page[0x211] & bzimage.LOADED_HIGH and not page[0x211] & bzimage.KASLR_FLAG
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert struct.unpack_from("<I", page, 0x218)[0] == 0x13A00000  # ramdisk_image
    assert struct.unpack_from("<I", page, 0x21C)[0] == 0x123456  # ramdisk_size
    assert struct.unpack_from("<Q", page, 0x070)[0] == 0xE0000  # acpi_rsdp_addr
    assert page[0x1E8] == 4
    assert struct.unpack_from("<QQI", page, 0x2D0) == (0, 0xA0000, 1)
    assert read_e820(page) == list(e820_map(320 << 20))
    assert page[0x1EF] == 0  # sentinel


def test_kernel_header_copied_and_kaslr_cleared():
    hdr = bytearray(bootparams.synthetic_setup_header(cmdline_size=1234))
    hdr[0x211 - 0x1F1] |= bzimage.KASLR_FLAG
    page = build_zero_page(bytes(hdr), spec())
    assert read_header_field(page, "cmdline_size") == 1234
    assert not read_header_field(page, "loadflags") & bzimage.KASLR_FLAG


def test_high_addresses_use_ext_fields():
    page = build_zero_page(bootparams.synthetic_setup_header(),
                           spec(ramdisk_image=0x1_2000_0000, ramdisk_size=0x1_0000_0010))
    assert struct.unpack_from("<I", page, 0x218)[0] == 0x2000_0000
    assert struct.unpack_from("<I", page, 0x0C0)[0] == 1
    assert struct.unpack_from("<I", page, 0x0C4)[0] == 1
