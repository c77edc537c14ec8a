"""Shared fixtures: the real Debian cloud kernel, fetched once per session through guest_assets."""

import shutil
import struct

import pytest

from vmm_core.boot import bzimage
from vmm_core.boot.bzimage import OFFSETS


def make_bzimage(*, version=0x020F, xloadflags=bzimage.XLF_KERNEL_64, loadflags=bzimage.LOADED_HIGH,
                 setup_sects=4, kernel=b"\x90" * 4096, payload_offset=0x100, payload=b"PAYLOAD!",
                 cmdline_size=2047) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)

    def put(name, value):
        struct.pack_into("<" + bzimage.FORMATS[name], setup, OFFSETS[name], value)

    put("setup_sects", setup_sects)
    put("boot_flag", 0xAA55)
    put("jump", 0x6AEB)  # jmp short: header ends at 0x202 + 0x6a
    put("header", b"HdrS")
    put("version", version)
    put("loadflags", loadflags)
    put("xloadflags", xloadflags)
    put("kernel_alignment", 0x200000)
    put("relocatable_kernel", 1)
    put("cmdline_size", cmdline_size)
    put("initrd_addr_max", 0x7FFFFFFF)
    put("pref_address", 0x1000000)
    put("init_size", 0x800000)
    kernel = bytearray(kernel)
    kernel += bytes(-len(kernel) % 16)  # the kernel build pads to whole paragraphs
    kernel[payload_offset:payload_offset + len(payload)] = payload
    put("payload_offset", payload_offset)
    put("payload_length", len(payload))
    put("syssize", (len(kernel) + 15) // 16)
    return bytes(setup) + bytes(kernel)


@pytest.fixture(name="make_bzimage")
def make_bzimage_fixture():
    """A factory of synthetic bzImages: make_bzimage(version=..., payload=..., ...)."""
    return make_bzimage


@pytest.fixture(scope="session")
def debian_assets():
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("needs a Debian host with apt-get and dpkg to fetch the reference kernel")
    from vmm_core.guest_assets import fetch_guest_assets
    return fetch_guest_assets(log=lambda msg: None)


@pytest.fixture(scope="session")
def debian_bzimage(debian_assets) -> bytes:
    with open(debian_assets.kernel, "rb") as f:
        return f.read()
