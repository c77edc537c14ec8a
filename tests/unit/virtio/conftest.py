"""Fixtures for the virtio unit tests: guest RAM, a temp image, devices behind MmioDevice."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from device_procs.testing.local import LocalHarness
from device_procs.virtio import BlkDevice, ConsoleDevice, RngDevice
from vmm_core.memory import GuestMemory, create_guest_memory

RAM_SIZE = 32 << 20
IMAGE_SECTORS = 2048  # 1 MiB


Harness = LocalHarness


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = create_guest_memory(RAM_SIZE)
    yield mem
    mem.close()


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "disk.img"
    # A recognisable pattern: byte i of sector s is (s * 7 + i) & 0xff.
    with open(path, "wb") as f:
        for s in range(IMAGE_SECTORS):
            f.write(bytes((s * 7 + i) & 0xFF for i in range(512)))
    return str(path)


def _blk(memory, image: str, native: bool) -> Iterator[Harness]:
    dev = BlkDevice(image, serial="bulkhead-disk-0", native=native)
    yield Harness(dev, memory)
    dev.close()


@pytest.fixture(params=["native", "python"])
def blk(memory, image, request) -> Iterator[Harness]:
    """Through both paths: the C loop (`fastpath`) and the Python reference."""
    yield from _blk(memory, image, request.param == "native")


@pytest.fixture
def blk_native(memory, image) -> Iterator[Harness]:
    yield from _blk(memory, image, True)


@pytest.fixture
def blk_python(memory, image) -> Iterator[Harness]:
    yield from _blk(memory, image, False)


@pytest.fixture
def rng(memory) -> Harness:
    return Harness(RngDevice(), memory)


@pytest.fixture
def console(memory, tmp_path) -> Iterator[Harness]:
    dev = ConsoleDevice.open(str(tmp_path / "console.out"))
    h = Harness(dev, memory)
    h.output_path = str(tmp_path / "console.out")  # type: ignore[attr-defined]
    yield h
    dev.close()


@pytest.fixture
def devnull_fd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    os.close(fd)
