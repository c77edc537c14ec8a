"""Helpers shared by the legacy devices (bus data is always little-endian on x86)."""

from __future__ import annotations


def le_value(data: bytes | bytearray) -> int:
    """The zero-extended little-endian value of an access's bytes."""
    return int.from_bytes(data, "little")
