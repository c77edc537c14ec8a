"""Little-endian helpers shared by the legacy devices (bus data is always little-endian on x86)."""

from __future__ import annotations


def le_value(data: bytes | bytearray) -> int:
    """The zero-extended little-endian value of an access's bytes."""
    return int.from_bytes(data, "little")


def fill_le(data: bytearray, value: int) -> None:
    """Fill `data` in place with the low `len(data)` bytes of `value`, little-endian."""
    n = len(data)
    data[:] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
