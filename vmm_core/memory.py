"""Guest RAM for one VM: a sealed memfd, mapped shared, sliced into regions around the MMIO hole.

The core creates it here and registers each region with KVM; device processes map the same memfd
through `ipc_protocol.guest_memory.GuestMemory` (the checked accessors both sides share) with the
layout the core sends them.  Sealing (no shrink, no grow) keeps a device from truncating the file
under the core's mappings.
"""

from __future__ import annotations

import fcntl
import os

from ipc_protocol.guest_memory import GuestMemory, MemoryRegion, RegionSpec

from .layout import ram_regions

__all__ = ["GuestMemory", "MemoryRegion", "RegionSpec", "create_guest_memory", "seal"]

# fcntl seals (<linux/fcntl.h>); Python exposes them from 3.8 on Linux.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)


def seal(fd: int) -> None:
    """Fix a memfd's size for good (no shrink, no grow, no more seals)."""
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)


def create_guest_memory(ram_size: int, name: str = "bulkhead-guest-ram") -> GuestMemory:
    """New RAM of `ram_size` bytes laid out around the MMIO hole, in a sealed memfd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, ram_size)
        seal(fd)
        specs, offset = [], 0
        for gpa, size in ram_regions(ram_size):
            specs.append(RegionSpec(gpa, size, offset))
            offset += size
        return GuestMemory.from_fd(fd, specs)
    except BaseException:
        os.close(fd)
        raise
