"""An initramfs writer: the "newc" cpio format the kernel unpacks (pure, no cpio binary).

Format (Documentation/driver-api/early-userspace/buffer-format.rst): each member is a 110-byte
ASCII header "070701" + 13 eight-digit hex fields, the NUL-terminated name padded to 4 bytes
(counting the header), then the data padded to 4 bytes; "TRAILER!!!" ends the archive.  The
kernel accepts it gzip-compressed (CONFIG_RD_GZIP).  Output is reproducible: mtimes are zero,
inodes count up, members are sorted by path.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Member:
    path: str  # without a leading "/"
    mode: int  # type bits | permissions
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_header(ino: int, mode: int, nlink: int, filesize: int, name_size: int,
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev[0], rdev[1], name_size, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


class Initramfs:
    """Collects files, directories, symlinks and device nodes; `cpio()` / `cpio_gz()` emit them."""

    def __init__(self) -> None:
        self._members: dict[str, Member] = {}

    def _add(self, member: Member) -> None:
        path = member.path.strip("/")
        if not path or ".." in path.split("/"):
            raise ValueError(f"bad initramfs path {member.path!r}")
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self._members:
                self._members[parent] = Member(parent, stat.S_IFDIR | 0o755)
        self._members[path] = Member(path, member.mode, member.data, member.rdev)

    def directory(self, path: str, perm: int = 0o755) -> None:
        self._add(Member(path, stat.S_IFDIR | perm))

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(Member(path, stat.S_IFREG | perm, bytes(data)))

    def symlink(self, path: str, target: str) -> None:
        self._add(Member(path, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(Member(path, stat.S_IFCHR | perm, b"", (major, minor)))

    @property
    def paths(self) -> list[str]:
        return sorted(self._members)

    def cpio(self) -> bytes:
        out = io.BytesIO()
        ino = 1
        for path in sorted(self._members):
            m = self._members[path]
            name = path.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(m.mode) else 1
            header = newc_header(ino, m.mode, nlink, len(m.data), len(name), m.rdev)
            out.write(header + name + _pad4(len(header) + len(name)))
            out.write(m.data + _pad4(len(m.data)))
            ino += 1
        name = TRAILER.encode() + b"\0"
        header = newc_header(0, 0, 1, 0, len(name))
        out.write(header + name + _pad4(len(header) + len(name)))
        return out.getvalue()

    def cpio_gz(self) -> bytes:
        return gzip.compress(self.cpio(), compresslevel=6, mtime=0)


def read_newc(archive: bytes) -> list[tuple[str, int, bytes]]:
    """Parse a newc archive into (path, mode, data): for tests and for checking a cached image."""
    if archive[:2] == b"\x1f\x8b":
        archive = gzip.decompress(archive)
    out, pos = [], 0
    while True:
        if archive[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad newc magic at offset {pos}")
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, name_size = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = archive[name_start:name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        data = archive[data_start:data_start + filesize]
        pos = data_start + filesize + (-filesize % 4)
        if name == TRAILER:
            return out
        out.append((name, mode, data))
