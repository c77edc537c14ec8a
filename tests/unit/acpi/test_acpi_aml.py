"""AML encodings against hand-assembled bytes from the ACPI 6.5 §20 grammar."""

import pytest

from vmm_core.acpi import aml


@pytest.mark.parametrize("payload, encoded", [
    (0, b"\x01"),
    (62, b"\x3f"),                        # 62 + 1 = 63: last one-byte length
    (63, b"\x41\x04"),                    # 63 + 2 = 65 = 0x41: two bytes, nibble 1, then 0x04
    (0xFFD, b"\x4f\xff"),                 # 0xFFF: largest two-byte length
    (0xFFE, b"\x81\x00\x01"),             # 0xFFE + 3 = 0x1001: first three-byte length
    (0xFFFFC, b"\x8f\xff\xff"),           # 0xFFFFF
    (0xFFFFD, b"\xc1\x00\x00\x01"),       # 0xFFFFD + 4 = 0x100001: first four-byte length
    (aml.PKG_LENGTH_MAX - 4, b"\xcf\xff\xff\xff"),
])
def test_pkg_length_boundaries(payload, encoded):
    assert aml.pkg_length(payload) == encoded


def test_pkg_length_too_long():
    with pytest.raises(ValueError, match="PkgLength"):
        aml.pkg_length(aml.PKG_LENGTH_MAX)


def test_pkg_length_decodes_back():
    for payload in (0, 1, 62, 63, 64, 200, 4093, 4094, 70000, 1 << 20, (1 << 27) + 5):
        enc = aml.pkg_length(payload)
        count = (enc[0] >> 6) + 1
        assert len(enc) == count
        if count == 1:
            value = enc[0] & 0x3F
        else:
            value = enc[0] & 0x0F
            for i, b in enumerate(enc[1:]):
                value |= b << (4 + 8 * i)
        assert value == payload + count


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"), (0xFFFF, b"\x0b\xff\xff"), (0x10000, b"\x0c\x00\x00\x01\x00"),
    (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"), (0x1_0000_0000, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    (0xFFFF_FFFF_FFFF_FFFF, b"\xff"),
])
def test_integers(value, encoded):
    assert aml.integer(value) == encoded


def test_integer_range():
    with pytest.raises(ValueError):
        aml.integer(-1)
    with pytest.raises(ValueError):
        aml.integer(1 << 64)


def test_names():
    assert aml.name_seg("_SB") == b"_SB_"
    assert aml.name_string("COM1") == b"COM1"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\A.B.C") == b"\\\x2f\x03A___B___C___"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("1ABC", "abcd", "TOOLONG", ""):
        with pytest.raises(ValueError):
            aml.name_seg(bad)


def test_string_and_eisa_id():
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.eisa_id_value("PNP0501") == 0x0105D041
    assert aml.eisa_id_value("PNP0A03") == 0x030AD041
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    with pytest.raises(ValueError):
        aml.eisa_id("pnp0501")


def test_name_buffer_package_method():
    assert aml.name("_UID", aml.integer(0)) == b"\x08_UID\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.package(aml.integer(5), aml.integer(0)) == b"\x12\x05\x02\x0a\x05\x00"
    # Method(_STA, 0, NotSerialized) { Return (0x0F) }
    assert aml.method("_STA", aml.return_(aml.integer(0x0F))) == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("FOO", arg_count=2, serialized=True)[-1] == 0x0A


def test_device_and_scope_long_bodies():
    body = aml.name("_HID", aml.string("X" * 100))
    dev = aml.device("DEV0", body)
    assert dev[:2] == b"\x5b\x82"
    assert dev[2] >> 6 == 1  # two-byte PkgLength
    assert dev[4:8] == b"DEV0" and dev[8:] == body
    sc = aml.scope("\\_SB_", dev)
    assert sc[0] == 0x10 and sc[3:8] == b"\\_SB_"


def test_resource_descriptors():
    assert aml.io_port(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.memory32_fixed(0xD0000000, 0x1000) == (
        b"\x86\x09\x00\x01" + b"\x00\x00\x00\xd0" + b"\x00\x10\x00\x00")
    assert aml.extended_interrupt(5, edge=True) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.extended_interrupt(9, edge=False, active_low=True, shared=True)[3] == 0x0D
    with pytest.raises(ValueError):
        aml.extended_interrupt(edge=True)


def test_resource_template_checksum():
    rt = aml.resource_template(aml.memory32_fixed(0xD0000000, 0x1000), aml.extended_interrupt(5, edge=True))
    assert rt[0] == 0x11
    data = rt[2 + 1 + 1:]  # BufferOp, 1-byte PkgLength, ByteConst prefix + size byte
    assert rt[2] == 0x0A and rt[3] == len(data)
    assert data[-2] == 0x79
    assert sum(data) % 256 == 0
