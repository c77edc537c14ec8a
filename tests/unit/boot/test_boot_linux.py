"""Loading Linux into guest memory: the plan, the zero page and the errors users can hit."""

import gzip
import struct

import pytest

from vmm_core import layout
from vmm_core.boot import linux
from vmm_core.boot.bootparams import read_e820, read_header_field
from vmm_core.boot.e820 import e820_map
from vmm_core.errors import BootError
from vmm_core.memory import GuestMemory, create_guest_memory

MiB = layout.MiB


def tiny_vmlinux(paddr=0x1000000, vaddr=0xFFFFFFFF81000000, code=b"\xf4" * 64) -> bytes:
    """A minimal ELF64 with one PT_LOAD linked in the kernel half, entry = physical address."""
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, paddr,
                       64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, vaddr, paddr, len(code), len(code) + 0x1000, 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + code


def bzimage_with(vmlinux: bytes, make_bzimage) -> bytes:
    payload = gzip.compress(vmlinux) + struct.pack("<I", len(vmlinux))
    return make_bzimage(kernel=bytes(0x200) + payload + bytes(64), payload_offset=0x200, payload=payload)


@pytest.fixture
def memory():
    mem = create_guest_memory(64 * MiB)
    yield mem
    mem.close()


def test_recognises_kernels(make_bzimage):
    assert linux.is_linux_kernel(bzimage_with(tiny_vmlinux(), make_bzimage))
    assert linux.is_linux_kernel(tiny_vmlinux())
    assert not linux.is_linux_kernel(tiny_vmlinux(vaddr=0x1000000))  # a test-guest ELF
    assert not linux.is_linux_kernel(b"garbage" * 100)


def test_host_decompressed_bzimage(memory, make_bzimage):
    vmlinux = tiny_vmlinux()
    plan = linux.load_linux(memory, bzimage_with(vmlinux, make_bzimage), cmdline="console=ttyS0", initrd=b"I" * 5000,
                            vcpus=2, virtio_slots=[(0xD0000000, 0x1000, 5)])
    assert plan.kernel.kind == "bzimage-host-decompressed" and plan.kernel.compression == "gzip"
    assert plan.entry == 0x1000000
    assert plan.regs["rsi"] == layout.ZERO_PAGE_ADDR == plan.zero_page
    assert memory.read(0x1000000, 64) == b"\xf4" * 64
    assert memory.read(0x1000040, 0x1000) == bytes(0x1000)  # bss zeroed
    assert memory.read(layout.CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    start, end = plan.initrd_range
    assert start % (2 * MiB) == 0 and end <= 64 * MiB and memory.read(start, 5000) == b"I" * 5000
    page = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert read_header_field(page, "ramdisk_image") == start
    assert read_header_field(page, "ramdisk_size") == 5000
    assert read_header_field(page, "cmd_line_ptr") == layout.CMDLINE_ADDR
    assert read_header_field(page, "type_of_loader") == 0xFF
    assert struct.unpack_from("<Q", page, 0x70)[0] == plan.rsdp_addr == layout.ACPI_TABLES_ADDR
    assert read_e820(page) == e820_map(64 * MiB)
    assert memory.read(plan.rsdp_addr, 8) == b"RSD PTR "


def test_bzimage_without_host_decompression(memory, make_bzimage):
    img = bzimage_with(tiny_vmlinux(), make_bzimage)
    plan = linux.load_linux(memory, img, decompress_on_host=False)
    assert plan.kernel.kind == "bzimage"
    assert plan.entry == 0x1000000 + 0x200
    assert memory.read(0x1000000, 16) == img[5 * 512:5 * 512 + 16]


def test_plain_vmlinux(memory):
    plan = linux.load_linux(memory, tiny_vmlinux(), cmdline="x")
    assert plan.kernel.kind == "vmlinux" and plan.entry == 0x1000000
    page = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert page[0x202:0x206] == b"HdrS" and read_header_field(page, "cmdline_size") == 2047


def test_neither_bzimage_nor_elf(memory):
    with pytest.raises(BootError, match="neither a bzImage .* nor an ELF vmlinux"):
        linux.load_linux(memory, b"\x00" * 4096)


def test_test_guest_elf_is_not_linux(memory):
    with pytest.raises(BootError, match="not a Linux vmlinux"):
        linux.plan_kernel(tiny_vmlinux(vaddr=0x1000000))


def test_truncated_bzimage(memory, make_bzimage):
    img = bzimage_with(tiny_vmlinux(), make_bzimage)
    with pytest.raises(BootError, match="truncated"):
        linux.load_linux(memory, img[:len(img) // 2])


def test_unsupported_protocol(memory, make_bzimage):
    img = bytearray(bzimage_with(tiny_vmlinux(), make_bzimage))
    img[0x206:0x208] = (0x0209).to_bytes(2, "little")
    with pytest.raises(BootError, match="boot protocol 2.09"):
        linux.load_linux(memory, bytes(img))


def test_initrd_does_not_fit(memory):
    with pytest.raises(BootError, match=r"initrd of 60\.0 MiB does not fit .* give the VM more memory"):
        linux.load_linux(memory, tiny_vmlinux(), initrd=b"\0" * (60 * MiB))


def test_initrd_respects_addr_max():
    addr = linux.place_initrd(3 * MiB, 512 * MiB, 0x4000000, initrd_addr_max=0x0FFFFFFF)
    assert addr + 3 * MiB <= 0x10000000 and addr % (2 * MiB) == 0
    # falls back to page alignment when 2 MiB alignment would hit the kernel
    addr = linux.place_initrd(MiB, 0x4000000 + 2 * MiB, 0x4000000 + 0x10000, 0x7FFFFFFF)
    assert addr % 4096 == 0 and addr >= 0x4010000


def test_cmdline_too_long(memory, make_bzimage):
    img = make_bzimage(cmdline_size=16)
    with pytest.raises(BootError, match="17 bytes; this kernel accepts at most 16"):
        linux.check_cmdline("x" * 17, 16)
    assert linux.check_cmdline("x" * 16, 16) == b"x" * 16 + b"\0"
    with pytest.raises(BootError, match="cmdline_size"):
        linux.load_linux(memory, img, cmdline="y" * 100, decompress_on_host=False)


def test_kernel_larger_than_ram():
    mem = create_guest_memory(16 * MiB)
    try:
        with pytest.raises(BootError, match="more memory"):
            linux.load_linux(mem, tiny_vmlinux())
    finally:
        mem.close()


def test_debian_kernel_loads(debian_bzimage):
    mem = create_guest_memory(320 * MiB)
    try:
        plan = linux.load_linux(mem, debian_bzimage, cmdline="console=ttyS0", vcpus=2)
        assert plan.kernel.compression == "lz4"
        assert plan.entry == 0x1000000
        assert plan.kernel_range[1] <= plan.kernel.footprint_end
        assert mem.read(0x1000000, 4) != bytes(4)
    finally:
        mem.close()
