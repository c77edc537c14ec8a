import os

import pytest

from vmm_core import layout
from vmm_core.errors import GuestMemoryError
from vmm_core.memory import GuestMemory, create_guest_memory, RegionSpec


def test_small_ram_one_region():
    mem = create_guest_memory(16 << 20)
    assert [(r.start, r.spec.size) for r in mem.regions] == [(0, 16 << 20)]
    mem.close()


def test_large_ram_leaves_hole():
    assert layout.ram_regions(4 << 30) == [(0, layout.MMIO_HOLE_START),
                                            (layout.MMIO_HOLE_END, (4 << 30) - layout.MMIO_HOLE_START)]
    assert layout.ram_regions(3 << 30) == [(0, 3 << 30)]


def test_bounds_checked_access():
    mem = create_guest_memory(1 << 20)
    mem.write_u32(0x1000, 0xDEADBEEF)
    assert mem.read_u32(0x1000) == 0xDEADBEEF
    assert mem.read(0x1000, 4) == bytes.fromhex("efbeadde")
    assert mem.check(0, 1 << 20)
    assert not mem.check((1 << 20) - 1, 2)
    for gpa, n in [((1 << 20) - 1, 2), (1 << 20, 1), (-1, 1), (0xD000_0000, 4)]:
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, n)
    mem.close()


def test_memfd_is_sealed_and_shared_with_a_second_mapping():
    mem = create_guest_memory(1 << 20)
    with pytest.raises(OSError):
        os.ftruncate(mem.fd, 4096)  # F_SEAL_SHRINK
    other = GuestMemory.from_fd(os.dup(mem.fd), mem.specs)
    mem.write(0x500, b"hello")
    assert other.read(0x500, 5) == b"hello"
    other.write(0x600, b"back")
    assert mem.read(0x600, 4) == b"back"
    other.close()
    mem.close()


def test_from_fd_rejects_region_past_file_end():
    mem = create_guest_memory(1 << 20)
    with pytest.raises(GuestMemoryError, match="needs"):
        GuestMemory.from_fd(mem.fd, [RegionSpec(0, 2 << 20, 0)])
    mem.close()


def test_region_spec_wire_validation():
    assert RegionSpec.from_wire([0, 4096, 0]) == RegionSpec(0, 4096, 0)
    for bad in ([0, 1], "x", [0, -1, 0], [0, 1.5, 0]):
        with pytest.raises(GuestMemoryError):
            RegionSpec.from_wire(bad)
