"""Setup-header parsing (boot.rst offsets) on synthetic images and on Debian's real bzImage."""

import struct

import pytest

from vmm_core.boot import bzimage
from vmm_core.boot.bzimage import OFFSETS, compressed_payload, parse_setup_header
from vmm_core.errors import BootError


def test_documented_offsets():
    assert OFFSETS["setup_sects"] == 0x1F1 and OFFSETS["boot_flag"] == 0x1FE
    assert OFFSETS["header"] == 0x202 and OFFSETS["version"] == 0x206
    assert OFFSETS["loadflags"] == 0x211 and OFFSETS["cmd_line_ptr"] == 0x228
    assert OFFSETS["initrd_addr_max"] == 0x22C and OFFSETS["xloadflags"] == 0x236
    assert OFFSETS["cmdline_size"] == 0x238 and OFFSETS["payload_offset"] == 0x248
    assert OFFSETS["pref_address"] == 0x258 and OFFSETS["init_size"] == 0x260


def test_parse_synthetic(make_bzimage):
    img = make_bzimage()
    hdr = parse_setup_header(img)
    assert hdr.version_text == "2.15" and hdr.kernel_64
    assert hdr.setup_size == 5 * 512
    assert hdr.cmdline_size == 2047 and hdr.pref_address == 0x1000000
    assert len(hdr.raw) == 0x202 + 0x6A - 0x1F1
    assert compressed_payload(img, hdr) == b"PAYLOAD!"


def test_setup_sects_zero_means_four(make_bzimage):
    img = bytearray(make_bzimage(setup_sects=4))
    img[0x1F1] = 0
    assert parse_setup_header(bytes(img)).setup_size == 5 * 512


@pytest.mark.parametrize("data, message", [
    (b"hello world" * 100, "not a bzImage"),
    (b"", "not a bzImage"),
])
def test_not_a_bzimage(data, message):
    with pytest.raises(BootError, match=message):
        parse_setup_header(data)


def test_old_protocol_rejected(make_bzimage):
    with pytest.raises(BootError, match=r"boot protocol 2\.10.*needs 2\.12"):
        parse_setup_header(make_bzimage(version=0x020A))


def test_32bit_kernel_rejected(make_bzimage):
    with pytest.raises(BootError, match="XLF_KERNEL_64"):
        parse_setup_header(make_bzimage(xloadflags=0))


def test_zimage_rejected(make_bzimage):
    with pytest.raises(BootError, match="zImage"):
        parse_setup_header(make_bzimage(loadflags=0))


def test_truncated(make_bzimage):
    img = make_bzimage()
    with pytest.raises(BootError, match="truncated"):
        parse_setup_header(img[:len(img) - 100])
    with pytest.raises(BootError, match="truncated"):
        parse_setup_header(img[:0x210])


def test_payload_past_kernel(make_bzimage):
    img = bytearray(make_bzimage())
    struct.pack_into("<I", img, OFFSETS["payload_length"], 1 << 20)
    with pytest.raises(BootError, match="payload"):
        parse_setup_header(bytes(img))


def test_debian_bzimage_header(debian_bzimage, debian_assets):
    hdr = parse_setup_header(debian_bzimage, "vmlinuz")
    assert hdr.version >= 0x020F  # Linux 6.1 speaks 2.15
    assert hdr.kernel_64 and hdr.xloadflags & bzimage.XLF_CAN_BE_LOADED_ABOVE_4G
    assert hdr.loadflags & bzimage.LOADED_HIGH
    assert hdr.relocatable_kernel == 1
    assert hdr.cmdline_size == 2047
    assert hdr.pref_address == 0x1000000
    assert hdr.kernel_alignment == 0x200000
    assert hdr.init_size > 0x1000000
    assert hdr.payload_length > 1 << 20
    assert compressed_payload(debian_bzimage, hdr)[:4] == b"\x02\x21\x4c\x18"  # lz4 legacy
    version = bzimage.kernel_version_string(debian_bzimage, hdr)
    assert version.startswith(debian_assets.kernel_version)
