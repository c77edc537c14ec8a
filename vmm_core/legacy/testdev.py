"""The test device of docs/guest_abi.md: an MMIO control page and a PIO probe window.

`TestDev` is the 0x1000-byte MMIO page (EXIT, PUTC, MARK, LAST_*, IRQ_LINE, IRQFD, IRQ_COUNT,
VCPUS and a 256-byte probe window at 0x100); `PioProbe` is 16 ports of scratch at 0x510.  Both
probe windows record their last write in one shared `ProbeLog`, which the MMIO LAST_* registers
read back, so the guest can check exactly what size, offset and value reached the VMM.

Everything VM-side goes through a `TestDevHooks` object.  Offsets outside the documented
registers read as 0 and ignore writes; a control register written with the wrong width is
ignored too (and warned about once), so a guest bug shows as a failed test, not a half value.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, NamedTuple, Protocol

from ._regs import le_value

log = logging.getLogger(__name__)

TESTDEV_SIZE = 0x1000

# MMIO register offsets (guest_abi.md, "The testdev").
REG_EXIT = 0x000  # w32
REG_PUTC = 0x004  # w8
REG_MARK = 0x008  # w32
REG_LAST_SIZE = 0x010  # r32
REG_LAST_OFFSET = 0x018  # r64
REG_LAST_VALUE = 0x020  # r64
REG_IRQ_LINE = 0x030  # w32: gsi | delay_ms << 8
REG_IRQFD = 0x034  # w32: delay_ms
REG_IRQ_COUNT = 0x038  # r32
REG_VCPUS = 0x040  # r32

IRQ_LINE_GSI_MASK = 0xFF
IRQ_LINE_DELAY_SHIFT = 8

MMIO_PROBE_OFFSET = 0x100
MMIO_PROBE_SIZE = 0x100
MMIO_PROBE_ACCESS_SIZES = (1, 2, 4, 8)
PIO_PROBE_SIZE = 0x10
PIO_PROBE_ACCESS_SIZES = (1, 2, 4)

# Write-only registers and their width in bytes.
WRITE_WIDTHS = {REG_EXIT: 4, REG_PUTC: 1, REG_MARK: 4, REG_IRQ_LINE: 4, REG_IRQFD: 4}


def mmio_probe_initial(offset: int) -> int:
    """The MMIO probe window's initial byte at `offset` (ABI: `(o * 7 + 0x5a) & 0xff`)."""
    return (offset * 7 + 0x5A) & 0xFF


def pio_probe_initial(offset: int) -> int:
    """The PIO probe window's initial byte at `offset` (ABI: `(o * 13 + 0x3c) & 0xff`)."""
    return (offset * 13 + 0x3C) & 0xFF


class TestDevHooks(Protocol):
    """What the testdev asks of the VM."""

    def exit(self, code: int) -> None:
        """Stop the VM; `bulkhead` exits with `code`."""

    def putc(self, byte: int) -> None:
        """Append one byte to the serial output stream (the one COM1 writes to)."""

    def mark(self, value: int) -> None:
        """Log a boot-progress marker with the time since start."""

    def irq_line(self, gsi: int, delay_ms: int) -> None:
        """After `delay_ms`, pulse `gsi` with KVM_IRQ_LINE (1 then 0)."""

    def irqfd(self, delay_ms: int) -> None:
        """After `delay_ms`, write the eventfd registered with KVM_IRQFD."""

    def irq_count(self) -> int:
        """How many IRQ_LINE and IRQFD injections have been performed."""

    def vcpus(self) -> int:
        """The number of vCPUs."""


class ProbeRecord(NamedTuple):
    size: int
    offset: int
    value: int


class ProbeLog:
    """The last write to either probe window.  vCPU threads write it concurrently, so the
    three fields change together under a lock and are read as one snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = ProbeRecord(0, 0, 0)

    def record(self, size: int, offset: int, value: int) -> None:
        with self._lock:
            self._last = ProbeRecord(size, offset, value)

    def last(self) -> ProbeRecord:
        with self._lock:
            return self._last


class _ProbeWindow:
    """Scratch bytes plus the size check and truncation both windows share."""

    def __init__(self, size: int, sizes: tuple[int, ...], initial: Callable[[int], int],
                 probe_log: ProbeLog) -> None:
        self._bytes = bytearray(initial(o) for o in range(size))
        self._sizes = sizes
        self._log = probe_log

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))
        if len(data) not in self._sizes or not 0 <= offset < len(self._bytes):
            return  # unsupported size or outside: reads 0
        # An access crossing the window's end gets the bytes inside; the rest read 0.
        chunk = self._bytes[offset:offset + len(data)]
        data[:len(chunk)] = chunk

    def write(self, offset: int, data: bytes) -> None:
        if len(data) not in self._sizes or not 0 <= offset < len(self._bytes):
            return
        end = min(offset + len(data), len(self._bytes))
        self._bytes[offset:end] = data[:end - offset]
        # LAST_* describe the access the guest made, even when it was truncated.
        self._log.record(len(data), offset, le_value(data))


class PioProbe:
    """Ports 0x510..0x51f: 16 bytes of scratch, accesses of 1, 2 or 4 bytes."""

    __test__ = False  # not a pytest test class

    def __init__(self, probe_log: ProbeLog) -> None:
        self._window = _ProbeWindow(PIO_PROBE_SIZE, PIO_PROBE_ACCESS_SIZES, pio_probe_initial,
                                    probe_log)

    def read(self, offset: int, data: bytearray) -> None:
        self._window.read(offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._window.write(offset, data)


class TestDev:
    """The MMIO testdev page; `probe_log` is shared with the `PioProbe`."""

    __test__ = False  # not a pytest test class

    def __init__(self, hooks: TestDevHooks, probe_log: ProbeLog) -> None:
        self._hooks = hooks
        self._log = probe_log
        self._probe = _ProbeWindow(MMIO_PROBE_SIZE, MMIO_PROBE_ACCESS_SIZES, mmio_probe_initial,
                                   probe_log)
        self._warned: set[tuple[int, int]] = set()

    def read(self, offset: int, data: bytearray) -> None:
        if MMIO_PROBE_OFFSET <= offset < MMIO_PROBE_OFFSET + MMIO_PROBE_SIZE:
            self._probe.read(offset - MMIO_PROBE_OFFSET, data)
            return
        # Readable registers as a little-endian register file, so a narrower read of a 64-bit
        # register (its low or high half) works; bytes not in a register read 0.
        data[:] = bytes(len(data))
        regs = self._readable(offset, len(data))
        for i in range(len(data)):
            addr = offset + i
            for base, (width, value) in regs.items():
                if base <= addr < base + width:
                    data[i] = (value >> (8 * (addr - base))) & 0xFF

    def write(self, offset: int, data: bytes) -> None:
        if MMIO_PROBE_OFFSET <= offset < MMIO_PROBE_OFFSET + MMIO_PROBE_SIZE:
            self._probe.write(offset - MMIO_PROBE_OFFSET, data)
            return
        width = WRITE_WIDTHS.get(offset)
        if width is None:
            return  # not a writable register: ignored
        if len(data) != width:
            if (offset, len(data)) not in self._warned:
                self._warned.add((offset, len(data)))
                log.warning("testdev: ignored %d-byte write at %#x (the register takes %d bytes)",
                            len(data), offset, width)
            return
        value = le_value(data)
        if offset == REG_EXIT:
            self._hooks.exit(value)
        elif offset == REG_PUTC:
            self._hooks.putc(value)
        elif offset == REG_MARK:
            self._hooks.mark(value)
        elif offset == REG_IRQ_LINE:
            self._hooks.irq_line(value & IRQ_LINE_GSI_MASK, value >> IRQ_LINE_DELAY_SHIFT)
        elif offset == REG_IRQFD:
            self._hooks.irqfd(value)

    def _readable(self, offset: int, size: int) -> dict[int, tuple[int, int]]:
        """{base: (width, value)} of the readable registers the access touches; hooks are
        only called for registers actually read."""
        end = offset + size
        regs: dict[int, tuple[int, int]] = {}

        def touches(base: int, width: int) -> bool:
            return base < end and offset < base + width

        if touches(REG_LAST_SIZE, 4) or touches(REG_LAST_OFFSET, 8) or touches(REG_LAST_VALUE, 8):
            last = self._log.last()
            regs[REG_LAST_SIZE] = (4, last.size)
            regs[REG_LAST_OFFSET] = (8, last.offset)
            regs[REG_LAST_VALUE] = (8, last.value)
        if touches(REG_IRQ_COUNT, 4):
            regs[REG_IRQ_COUNT] = (4, self._hooks.irq_count() & 0xFFFF_FFFF)
        if touches(REG_VCPUS, 4):
            regs[REG_VCPUS] = (4, self._hooks.vcpus() & 0xFFFF_FFFF)
        return regs
