import struct

import pytest

from vmm_core.boot.elf import entry_physical, load_elf, parse_elf
from vmm_core.errors import BootError
from vmm_core.memory import GuestMemory, create_guest_memory


def make_elf(segments, entry=0x100000, machine=62, etype=2, cls=2):
    ehdr_size, phdr_size = 64, 56
    phoff = ehdr_size
    data_off = phoff + phdr_size * len(segments)
    phdrs, blobs = b"", b""
    for vaddr, paddr, payload, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(blobs), vaddr, paddr, len(payload), memsz, 0x1000)
        blobs += payload
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, etype, machine, 1, entry, phoff, 0, 0,
                       ehdr_size, phdr_size, len(segments), 64, 0, 0)
    return ehdr + phdrs + blobs


def test_load_copies_and_zero_fills():
    mem = create_guest_memory(4 << 20)
    mem.write(0x100000, b"\xff" * 32)
    image = load_elf(mem, make_elf([(0x100000, 0x100000, b"abcd", 16)]))
    assert image.entry == 0x100000
    assert mem.read(0x100000, 16) == b"abcd" + bytes(12)
    assert mem.read(0x100010, 4) == b"\xff" * 4
    mem.close()


def test_entry_physical_for_high_virtual_link():
    image = parse_elf(make_elf([(0xFFFFFFFF81000000, 0x1000000, b"x", 1)], entry=0xFFFFFFFF81000000))
    assert entry_physical(image) == 0x1000000


@pytest.mark.parametrize("blob,msg", [
    (b"MZ\x90\x00" + bytes(100), "not an ELF"),
    (make_elf([(0, 0x100000, b"x", 1)], machine=3), "not x86-64"),
    (make_elf([(0, 0x100000, b"x", 1)], cls=1), "64-bit"),
    (make_elf([(0, 0x100000, b"x", 1)], etype=3), "not an executable"),
    (make_elf([(0, 0x100000, b"abcdef", 6)])[:-3], "truncated"),
    (make_elf([]), "no loadable"),
])
def test_bad_images(blob, msg):
    with pytest.raises(BootError, match=msg):
        parse_elf(blob)


def test_segment_outside_ram_is_a_boot_error():
    mem = create_guest_memory(2 << 20)
    with pytest.raises(BootError, match="does not fit"):
        load_elf(mem, make_elf([(0x400000, 0x400000, b"x", 1)]))
    mem.close()
