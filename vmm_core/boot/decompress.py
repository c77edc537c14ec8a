"""Host-side decompression of a bzImage payload into the ELF `vmlinux` it carries.

The kernel build compresses `vmlinux.bin` (a stripped ELF, possibly followed by relocation data)
with one of several tools and appends the uncompressed size as a little-endian u32 (the
`size_append` step of scripts/Makefile.lib, which the in-kernel decompressor also reads).  We
detect the format by its magic bytes, decompress it here, and check the length against that
trailer, so the guest can start at `startup_64` of the real kernel and skip its decompressor
(which would run at emulation speed on a host without hardware virtualization).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

from ..errors import BootError

# Magic bytes of each format the x86 kernel can be built with (CONFIG_KERNEL_*).
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZMA_MAGIC = b"\x5d\x00\x00"  # properties byte lc=3 lp=0 pb=2, then the dictionary size
LZO_MAGIC = b"\x89LZO"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"  # 0x184C2102 little-endian: `lz4 -l` legacy frame
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

LZ4_LEGACY_BLOCK_SIZE = 8 << 20  # every legacy block but the last decompresses to 8 MiB
MAX_KERNEL_SIZE = 1 << 30  # refuse to inflate past 1 GiB: no real kernel is that big


def detect_format(payload: bytes) -> str:
    """'gzip', 'bzip2', 'xz', 'lzma', 'lzo', 'lz4' or 'zstd' by the payload's magic bytes."""
    for fmt, magic in (("gzip", GZIP_MAGIC), ("bzip2", BZIP2_MAGIC), ("xz", XZ_MAGIC),
                       ("lzo", LZO_MAGIC), ("lz4", LZ4_LEGACY_MAGIC), ("zstd", ZSTD_MAGIC),
                       ("lzma", LZMA_MAGIC)):
        if payload.startswith(magic):
            return fmt
    raise BootError(f"unknown kernel compression (payload starts {payload[:6].hex()}): expected "
                    "gzip, bzip2, xz, lzma, lz4 or zstd")


def size_trailer(payload: bytes) -> int:
    """The uncompressed size the build appended to the payload (mod 2**32)."""
    if len(payload) < 8:
        raise BootError(f"compressed kernel payload is only {len(payload)} bytes: truncated bzImage")
    return struct.unpack_from("<I", payload, len(payload) - 4)[0]


def lz4_legacy_decompress(stream: bytes, limit: int = MAX_KERNEL_SIZE) -> bytes:
    """Decode an LZ4 legacy frame: magic, then blocks of (u32 compressed size, LZ4 block).

    The frame has no end marker; it ends where the input does, or at the kernel's 4-byte size
    trailer (too short to be a block).  A repeated magic starts a new concatenated frame.
    """
    try:
        import lz4.block
    except ImportError:  # pragma: no cover - lz4 is a declared dependency
        raise BootError("this kernel is lz4-compressed: install the `lz4` Python package") from None
    if not stream.startswith(LZ4_LEGACY_MAGIC):
        raise BootError("not an lz4 legacy frame (magic 0x184C2102 missing)")
    out, pos, total = [], 4, 0
    while len(stream) - pos > 4:
        (chunk,) = struct.unpack_from("<I", stream, pos)
        pos += 4
        if chunk == 0x184C2102:
            continue
        if chunk > len(stream) - pos:
            raise BootError(f"lz4 block of {chunk} bytes at offset {pos - 4} runs past the payload: "
                            "truncated kernel")
        try:
            block = lz4.block.decompress(stream[pos:pos + chunk], uncompressed_size=LZ4_LEGACY_BLOCK_SIZE)
        except lz4.block.LZ4BlockError as e:
            raise BootError(f"corrupt lz4 block at payload offset {pos - 4}: {e}") from None
        pos += chunk
        total += len(block)
        if total > limit:
            raise BootError(f"lz4 kernel inflates past {limit >> 20} MiB: not a kernel")
        out.append(block)
    return b"".join(out)


def _zstd_decompress(payload: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a declared dependency
        raise BootError("this kernel is zstd-compressed: install the `zstandard` Python package") from None
    try:
        dobj = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        data = dobj.decompress(payload)
    except zstandard.ZstdError as e:
        raise BootError(f"corrupt zstd kernel payload: {e}") from None
    if len(data) > limit:
        raise BootError(f"zstd kernel inflates past {limit >> 20} MiB: not a kernel")
    return data


def decompress_payload(payload: bytes, limit: int = MAX_KERNEL_SIZE) -> tuple[str, bytes]:
    """(format, uncompressed bytes) of a bzImage payload; the length must match its size trailer."""
    fmt = detect_format(payload)
    expected = size_trailer(payload)
    try:
        if fmt == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = d.decompress(payload, limit + 1)
        elif fmt == "bzip2":
            data = bz2.BZ2Decompressor().decompress(payload, limit + 1)
        elif fmt == "xz":
            data = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload, limit + 1)
        elif fmt == "lzma":
            data = lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload, limit + 1)
        elif fmt == "lz4":
            data = lz4_legacy_decompress(payload, limit)
        elif fmt == "zstd":
            data = _zstd_decompress(payload, limit)
        else:
            raise BootError("this kernel is LZO-compressed, which Bulkhead cannot decompress on the "
                            "host: use a gzip/xz/lz4/zstd kernel or boot it with decompress=False")
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, gzip.BadGzipFile) as e:
        raise BootError(f"corrupt {fmt} kernel payload: {e}") from None
    if len(data) > limit:
        raise BootError(f"{fmt} kernel inflates past {limit >> 20} MiB: not a kernel")
    if len(data) & 0xFFFF_FFFF != expected:
        raise BootError(f"{fmt} kernel payload inflated to {len(data)} bytes but the image says "
                        f"{expected}: truncated or corrupt bzImage")
    return fmt, data
