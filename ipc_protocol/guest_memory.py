"""Guest RAM as both sides see it: regions of shared files, every access bounds-checked.

The core creates guest RAM as one sealed memfd (`vmm_core.memory.create_guest_memory`) and
registers each region with KVM; a device process maps the same file with the layout the core
sends it (`Configure.memory`), and a vhost-user backend maps the regions its frontend sends, one
fd per region (`SET_MEM_TABLE`).  Devices see only this class: an address that is not RAM raises
`GuestMemoryError`, which device code turns into an error status at the request boundary.

This module is a leaf shared by the core and the device processes (it imports neither).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import BulkheadError


class GuestMemoryError(BulkheadError):
    """A guest physical address range is not backed by guest RAM.

    Raised only by the checked accessors of `GuestMemory`; device code catches it at the request
    boundary and turns it into a device error status, so it never ends a process by accident.
    """


@dataclass(frozen=True)
class RegionSpec:
    """Where a region sits in the guest and in its file: what a peer needs to map it."""

    guest_phys_addr: int
    size: int
    file_offset: int

    def to_wire(self) -> list[int]:
        return [self.guest_phys_addr, self.size, self.file_offset]

    @classmethod
    def from_wire(cls, value: object) -> "RegionSpec":
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(type(v) is int and v >= 0 for v in value)):
            raise GuestMemoryError(f"malformed memory region spec {value!r}")
        return cls(*value)


class MemoryRegion:
    """One contiguous guest-physical range backed by a shared mapping of `fd`."""

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        if spec.size <= 0:
            raise GuestMemoryError(f"memory region at {spec.guest_phys_addr:#x} has size 0")
        if spec.file_offset % mmap.ALLOCATIONGRANULARITY:
            raise GuestMemoryError(f"memory region at {spec.guest_phys_addr:#x}: file offset "
                                   f"{spec.file_offset:#x} is not page-aligned")
        size = os.fstat(fd).st_size
        if spec.file_offset + spec.size > size:
            raise GuestMemoryError(
                f"region at {spec.guest_phys_addr:#x} needs {spec.file_offset + spec.size} bytes "
                f"of its memory file, which has {size}")
        self.spec = spec
        self.fd = fd
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
    """Bounds-checked access to guest physical memory made of one or more mapped regions."""

    def __init__(self, regions: Iterable[tuple[RegionSpec, int]], *,
                 owned_fds: Sequence[int] = ()) -> None:
        self._owned = list(owned_fds)
        self.regions: list[MemoryRegion] = []
        try:
            for spec, fd in sorted(regions, key=lambda r: r[0].guest_phys_addr):
                self.regions.append(MemoryRegion(spec, fd))
            for a, b in zip(self.regions, self.regions[1:]):
                if a.end > b.start:
                    raise GuestMemoryError(
                        f"memory regions {a.start:#x}+{a.spec.size:#x} and "
                        f"{b.start:#x}+{b.spec.size:#x} overlap")
        except BaseException:
            self._owned = []  # not constructed: the caller still owns its fds
            self.close()
            raise

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_fd(cls, fd: int, specs: Sequence[RegionSpec], *, owns_fd: bool = True) -> "GuestMemory":
        """Map regions of one file (the core's memfd); once mapped, the fd is closed with the
        memory (on failure it stays the caller's)."""
        return cls([(s, fd) for s in specs], owned_fds=[fd] if owns_fd else [])

    @property
    def fd(self) -> int:
        """The one file all regions live in (guest RAM made by the core)."""
        fds = {r.fd for r in self.regions}
        if len(fds) != 1:
            raise GuestMemoryError(f"guest memory spans {len(fds)} files, not one")
        return fds.pop()

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
        for fd in self._owned:
            if fd >= 0:
                os.close(fd)
        self._owned = []

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

    def host_address(self, gpa: int, length: int) -> int:
        """This process's address of [gpa, gpa+length), which must lie inside one RAM region
        (for native code that walks the rings; valid while the memory is open)."""
        region, off = self._find(gpa, length)
        return region.host_addr + off

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

    def write_u16(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 4, value)
