"""Payload decompression by magic, the size trailer, and Debian's lz4 kernel."""

import bz2
import gzip
import lzma
import struct

import pytest

from vmm_core.boot import decompress
from vmm_core.boot.bzimage import compressed_payload, parse_setup_header
from vmm_core.boot.elf import parse_elf
from vmm_core.errors import BootError

DATA = b"\x7fELF" + bytes(range(256)) * 4000


def with_trailer(compressed: bytes, size: int = len(DATA)) -> bytes:
    return compressed + struct.pack("<I", size)


def lz4_legacy(data: bytes, block: int = 300_000) -> bytes:
    import lz4.block
    out = decompress.LZ4_LEGACY_MAGIC
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i:i + block], store_size=False)
        out += struct.pack("<I", len(c)) + c
    return out


@pytest.mark.parametrize("fmt, compress", [
    ("gzip", lambda d: gzip.compress(d)),
    ("bzip2", bz2.compress),
    ("xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ)),
    ("lzma", lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)),
    ("lz4", lz4_legacy),
    ("zstd", lambda d: __import__("zstandard").ZstdCompressor().compress(d)),
])
def test_formats_round_trip(fmt, compress):
    payload = with_trailer(compress(DATA))
    assert decompress.detect_format(payload) == fmt
    assert decompress.decompress_payload(payload) == (fmt, DATA)


def test_size_trailer_mismatch():
    with pytest.raises(BootError, match="truncated or corrupt"):
        decompress.decompress_payload(with_trailer(gzip.compress(DATA), len(DATA) + 1))


def test_unknown_and_lzo():
    with pytest.raises(BootError, match="unknown kernel compression"):
        decompress.decompress_payload(b"\x00" * 64)
    with pytest.raises(BootError, match="LZO"):
        decompress.decompress_payload(decompress.LZO_MAGIC + b"\x00" * 64)


def test_truncated_lz4():
    payload = with_trailer(lz4_legacy(DATA))
    with pytest.raises(BootError, match="truncated|corrupt"):
        decompress.decompress_payload(payload[:len(payload) // 2])


def test_corrupt_gzip():
    payload = bytearray(with_trailer(gzip.compress(DATA)))
    payload[20:40] = b"\xff" * 20
    with pytest.raises(BootError, match="corrupt|truncated"):
        decompress.decompress_payload(bytes(payload))


def test_inflation_limit():
    with pytest.raises(BootError, match="inflates past"):
        decompress.decompress_payload(with_trailer(gzip.compress(DATA)), limit=1000)


def test_debian_payload_is_vmlinux(debian_bzimage):
    hdr = parse_setup_header(debian_bzimage)
    fmt, vmlinux = decompress.decompress_payload(compressed_payload(debian_bzimage, hdr))
    assert fmt == "lz4"
    image = parse_elf(vmlinux)
    assert image.entry == 0x1000000  # phys_startup_64 at LOAD_PHYSICAL_ADDR
    assert min(s.paddr for s in image.segments) == hdr.pref_address
    assert any(s.vaddr >= 0xFFFFFFFF80000000 for s in image.segments)
