"""An encoder for the small subset of AML (ACPI 6.5 §20, "ACPI Machine Language") our DSDT needs.

Every function returns the encoded bytes of one term; terms compose by concatenation, so a DSDT
body is `scope("\\_SB_", device("COM1", name("_HID", eisa_id("PNP0501")), ...))`.  Nothing here
knows about guest memory or table headers (that is `tables.py`).

Grammar references below are to ACPI 6.5 §20.2 (AML grammar definition).  Resource descriptors
(`_CRS` contents) follow §6.4 (Resource Data Types for ACPI).
"""

from __future__ import annotations

import re

# -- opcodes (§20.2.5, §20.3) -----------------------------------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
RETURN_OP = 0xA4
NOTIFY_OP = 0x86
ONES_OP = 0xFF
NULL_NAME = 0x00

# -- resource descriptors (§6.4) ---------------------------------------------------------------------
SMALL_IO_PORT = 0x47  # small item 0x08, length 7 (§6.4.2.5)
SMALL_END_TAG = 0x79  # small item 0x0F, length 1 (§6.4.2.9)
LARGE_MEMORY32_FIXED = 0x86  # large item 0x06 (§6.4.3.4)
LARGE_EXTENDED_INTERRUPT = 0x89  # large item 0x09 (§6.4.3.6)

# Extended Interrupt Descriptor, byte 3 (Interrupt Vector Flags).
INT_FLAG_CONSUMER = 1 << 0
INT_FLAG_EDGE = 1 << 1  # 0 = level-triggered
INT_FLAG_ACTIVE_LOW = 1 << 2  # 0 = active-high
INT_FLAG_SHARED = 1 << 3  # 0 = exclusive

PKG_LENGTH_MAX = (1 << 28) - 1
_NAME_SEG_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


# -- PkgLength and names ---------------------------------------------------------------------------------
def pkg_length(payload_len: int) -> bytes:
    """Encode the PkgLength of a package whose contents after the PkgLength are `payload_len` bytes.

    The encoded value counts the PkgLength bytes themselves (§20.2.4).  One byte holds values up
    to 63 in bits 0-5; otherwise bits 6-7 of the lead byte give the number of following bytes
    (1-3), the lead byte's bits 0-3 hold the least significant nibble and each following byte
    the next 8 bits.
    """
    if payload_len < 0:
        raise ValueError("negative package length")
    for count in range(1, 5):
        total = payload_len + count
        if count == 1:
            if total < 0x40:
                return bytes([total])
            continue
        if total < 1 << (4 + 8 * (count - 1)):
            out = [((count - 1) << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(count - 1):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError(f"package of {payload_len} bytes exceeds the AML PkgLength limit {PKG_LENGTH_MAX}")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg: lead char A-Z or '_', then A-Z, 0-9, '_'; short names pad with '_'."""
    if not _NAME_SEG_RE.match(seg):
        raise ValueError(f"invalid AML NameSeg {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional root '\\' or parent '^' prefixes, then dot-separated NameSegs."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"AML name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# -- data objects ----------------------------------------------------------------------------------------
def integer(value: int) -> bytes:
    """ComputationalData for an integer, using the shortest encoding (Zero/One/Ones/prefixes)."""
    if value < 0 or value > 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"AML integer {value} out of 64-bit range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == 0xFFFF_FFFF_FFFF_FFFF:
        return bytes([ONES_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    return bytes([QWORD_PREFIX]) + value.to_bytes(8, "little")


def string(text: str) -> bytes:
    """A String: ASCII characters 0x01-0x7F, NUL-terminated."""
    data = text.encode("ascii")
    if b"\x00" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\x00"


def eisa_id_value(eisa_id: str) -> int:
    """The 32-bit compressed EISA ID of e.g. "PNP0501" (what ASL `EISAID()` produces).

    Three uppercase letters are packed 5 bits each (letter - 0x40) into bits 30-16 of a big-endian
    word followed by four hex digits; the word is stored little-endian, so PNP0501 = 0x0105D041.
    """
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", eisa_id):
        raise ValueError(f"invalid EISA ID {eisa_id!r}: want three letters and four hex digits")
    c1, c2, c3 = (ord(c) - 0x40 for c in eisa_id[:3])
    big_endian = (c1 << 26) | (c2 << 21) | (c3 << 16) | int(eisa_id[3:], 16)
    return int.from_bytes(big_endian.to_bytes(4, "big"), "little")


def eisa_id(text: str) -> bytes:
    """The EISAID as an AML integer (always a DWord constant)."""
    return bytes([DWORD_PREFIX]) + eisa_id_value(text).to_bytes(4, "little")


def buffer(data: bytes) -> bytes:
    """DefBuffer: BufferOp PkgLength BufferSize ByteList."""
    body = integer(len(data)) + bytes(data)
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    """DefPackage with up to 255 already-encoded elements."""
    if len(elements) > 255:
        raise ValueError("an AML Package holds at most 255 elements (use VarPackage)")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


# -- named objects and namespace modifiers -----------------------------------------------------------------
def name(path: str, value: bytes) -> bytes:
    """DefName: NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope: ScopeOp PkgLength NameString TermList."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice: ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, *terms: bytes, arg_count: int = 0, serialized: bool = False,
           sync_level: int = 0) -> bytes:
    """DefMethod: MethodOp PkgLength NameString MethodFlags TermList."""
    if not 0 <= arg_count <= 7 or not 0 <= sync_level <= 15:
        raise ValueError("AML method takes 0-7 arguments and a sync level 0-15")
    flags = arg_count | (int(serialized) << 3) | (sync_level << 4)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def notify(path: str, value: int) -> bytes:
    """DefNotify: NotifyOp NotifyObject NotifyValue (ASL `Notify(path, value)`)."""
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


def return_(value: bytes) -> bytes:
    """DefReturn: ReturnOp ArgObject."""
    return bytes([RETURN_OP]) + value


# -- resource templates (§6.4) -------------------------------------------------------------------------------
def io_port(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """I/O Port Descriptor (§6.4.2.5): ASL `IO(Decode16, min, max, align, len)`."""
    if not (0 <= minimum <= maximum <= 0xFFFF and 0 <= alignment <= 0xFF and 0 <= length <= 0xFF):
        raise ValueError("IO descriptor: 16-bit ports, 8-bit alignment and length")
    return (bytes([SMALL_IO_PORT, int(decode16)]) + minimum.to_bytes(2, "little")
            + maximum.to_bytes(2, "little") + bytes([alignment, length]))


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """32-Bit Fixed Memory Range Descriptor (§6.4.3.4): ASL `Memory32Fixed(ReadWrite, base, len)`."""
    if not (0 <= base <= 0xFFFF_FFFF and 0 <= length <= 0xFFFF_FFFF):
        raise ValueError("Memory32Fixed: base and length must fit 32 bits")
    return (bytes([LARGE_MEMORY32_FIXED]) + (9).to_bytes(2, "little") + bytes([int(writable)])
            + base.to_bytes(4, "little") + length.to_bytes(4, "little"))


def extended_interrupt(*gsis: int, edge: bool, active_low: bool = False, shared: bool = False,
                       consumer: bool = True) -> bytes:
    """Extended Interrupt Descriptor (§6.4.3.6): ASL `Interrupt(ResourceConsumer, Edge, ...)`."""
    if not 1 <= len(gsis) <= 255 or not all(0 <= g <= 0xFFFF_FFFF for g in gsis):
        raise ValueError("Interrupt descriptor: 1-255 interrupt numbers of 32 bits")
    flags = ((INT_FLAG_CONSUMER if consumer else 0) | (INT_FLAG_EDGE if edge else 0)
             | (INT_FLAG_ACTIVE_LOW if active_low else 0) | (INT_FLAG_SHARED if shared else 0))
    body = bytes([flags, len(gsis)]) + b"".join(g.to_bytes(4, "little") for g in gsis)
    return bytes([LARGE_EXTENDED_INTERRUPT]) + len(body).to_bytes(2, "little") + body


def resource_template(*descriptors: bytes) -> bytes:
    """A ResourceTemplate: a Buffer of descriptors closed by an End Tag (§6.4.2.9).

    The End Tag's checksum byte makes all bytes of the template sum to zero mod 256.
    """
    data = b"".join(descriptors) + bytes([SMALL_END_TAG])
    return buffer(data + bytes([(-sum(data)) & 0xFF]))
