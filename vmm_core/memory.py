"""Guest RAM: one sealed memfd, mapped shared, sliced into regions around the MMIO hole.

The core creates it (`GuestMemory.create`) and registers each region with KVM; a device process
maps the same memfd (`GuestMemory.from_fd`) with the layout the core sends it.  Devices see only
this class: every access is bounds-checked here, and an address that is not RAM raises
`GuestMemoryError`, which device code turns into an error status at the request boundary.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from dataclasses import dataclass

from .errors import GuestMemoryError
from .layout import ram_regions

# fcntl seals (<linux/fcntl.h>); Python exposes them from 3.8 on Linux.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)


@dataclass(frozen=True)
class RegionSpec:
    """Where a region sits in the guest and in the memfd: what a device process needs to map it."""

    guest_phys_addr: int
    size: int
    file_offset: int

    def to_wire(self) -> list[int]:
        return [self.guest_phys_addr, self.size, self.file_offset]

    @classmethod
    def from_wire(cls, value: object) -> "RegionSpec":
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, int) and v >= 0 for v in value)):
            raise GuestMemoryError(f"malformed memory region spec {value!r}")
        return cls(*value)


class MemoryRegion:
    """One contiguous guest-physical range backed by a shared mapping of the memfd."""

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        self.spec = spec
        self.mmap = mmap.mmap(fd, spec.size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=spec.file_offset)
        self.view = memoryview(self.mmap)
        anchor = ctypes.c_char.from_buffer(self.mmap)
        self.host_addr = ctypes.addressof(anchor)
        del anchor

    @property
    def start(self) -> int:
        return self.spec.guest_phys_addr

    @property
    def end(self) -> int:
        return self.spec.guest_phys_addr + self.spec.size

    def close(self) -> None:
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:
            # A caller still holds a memoryview slice; the mapping goes with the process.
            pass


class GuestMemory:
    """Bounds-checked access to guest physical memory."""

    def __init__(self, fd: int, specs: list[RegionSpec], *, owns_fd: bool = True) -> None:
        self.fd = fd
        self._owns_fd = owns_fd
        self.regions = [MemoryRegion(s, fd) for s in sorted(specs, key=lambda s: s.guest_phys_addr)]
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.start:
                raise GuestMemoryError("memory regions overlap")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, ram_size: int, name: str = "bulkhead-guest-ram") -> "GuestMemory":
        """New RAM of `ram_size` bytes laid out around the MMIO hole, in a sealed memfd."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, ram_size)
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
            specs, offset = [], 0
            for gpa, size in ram_regions(ram_size):
                specs.append(RegionSpec(gpa, size, offset))
                offset += size
            return cls(fd, specs)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, specs: list[RegionSpec]) -> "GuestMemory":
        """Map RAM another process created (a device process mapping the core's memfd)."""
        size = os.fstat(fd).st_size
        for s in specs:
            if s.file_offset + s.size > size:
                raise GuestMemoryError(
                    f"region at {s.guest_phys_addr:#x} needs {s.file_offset + s.size} bytes "
                    f"of the memory file, which has {size}")
        return cls(fd, specs)

    @property
    def specs(self) -> list[RegionSpec]:
        return [r.spec for r in self.regions]

    @property
    def size(self) -> int:
        return sum(r.spec.size for r in self.regions)

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- checked access -----------------------------------------------------------------------
    def _find(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length}")
        for r in self.regions:
            if r.start <= gpa < r.end or (length == 0 and gpa == r.end):
                if gpa + length > r.end:
                    break
                return r, gpa - r.start
        raise GuestMemoryError(f"guest range {gpa:#x}..{gpa + length:#x} is not in guest RAM")

    def check(self, gpa: int, length: int) -> bool:
        """True if [gpa, gpa+length) lies inside one RAM region."""
        try:
            self._find(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length); it must lie inside one RAM region."""
        region, off = self._find(gpa, length)
        return region.view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.view(gpa, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read_u16(self, gpa: int) -> int:
        return self.read_int(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self.read_int(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_int(gpa, 8)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 8, value)
