"""Power and debug ports: ACPI hardware-reduced sleep/reset registers, debug exit, boot progress.

`AcpiPower` implements the ACPI 6.x §4.8.3.7 Sleep Control and Sleep Status registers plus the
FADT RESET_REG, as three consecutive 8-bit I/O ports the FADT points at (SLEEP_CONTROL_REG,
SLEEP_STATUS_REG and RESET_REG are Generic Address Structures: SystemIO, width 8).  Only S5 is
supported: the DSDT's `\\_S5` package must carry SLP_TYP_S5 so the guest writes it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

from ._regs import le_value

log = logging.getLogger(__name__)

# Ports (copy into layout.py; the FADT's GAS entries use them).
ACPI_SLEEP_CONTROL_PORT = 0x3C0
ACPI_SLEEP_STATUS_PORT = 0x3C1
ACPI_RESET_PORT = 0x3C2
ACPI_POWER_BASE = ACPI_SLEEP_CONTROL_PORT
ACPI_POWER_SIZE = 3
ACPI_RESET_VALUE = 0x01  # the FADT's RESET_VALUE
DEBUG_EXIT_SIZE = 1  # the bus dispatches on the first port, so a 32-bit write at 0x501 lands here
BOOT_PROGRESS_SIZE = 1  # port 0x80

# Offsets within AcpiPower.
OFFSET_SLEEP_CONTROL = 0
OFFSET_SLEEP_STATUS = 1
OFFSET_RESET = 2

# Sleep Control Register (ACPI 6.x §4.8.3.7.1).
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7  # bits 2..4
SLP_EN = 0x20  # bit 5
SLP_TYP_S5 = 5  # our \_S5 value: soft off
# Sleep Status Register (§4.8.3.7.2).
WAK_STS = 0x80  # bit 7, write 1 to clear


class AcpiPower:
    """Sleep control/status and reset registers at 0x3c0..0x3c2."""

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        # Set on wake from a sleep state; we never sleep, so it stays clear (kept for W1C shape).
        self._wak_sts = False

    def read(self, offset: int, data: bytearray) -> None:
        for i in range(len(data)):
            # Sleep control and reset are write-only (read 0); status has only WAK_STS.
            data[i] = WAK_STS if offset + i == OFFSET_SLEEP_STATUS and self._wak_sts else 0

    def write(self, offset: int, data: bytes) -> None:
        # Each register is 8 bits wide; a wider write covers the following ones too.
        for i, value in enumerate(data):
            reg = offset + i
            if reg == OFFSET_SLEEP_CONTROL:
                self._sleep_control(value)
            elif reg == OFFSET_SLEEP_STATUS:
                if value & WAK_STS:
                    self._wak_sts = False
            elif reg == OFFSET_RESET:
                if value == ACPI_RESET_VALUE:
                    log.info("acpi: guest wrote the reset register")
                    self._on_reset()
                else:
                    log.debug("acpi: reset register write %#x is not RESET_VALUE: ignored", value)

    def _sleep_control(self, value: int) -> None:
        if not value & SLP_EN:
            return  # SLP_TYP alone does nothing until SLP_EN is written with it
        slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
        if slp_typ == SLP_TYP_S5:
            log.info("acpi: guest entered S5 (soft off)")
            self._on_poweroff()
        else:
            # S1-S4 are not offered in the DSDT; a guest asking anyway just keeps running.
            log.warning("acpi: guest asked for unsupported sleep type %d: ignored", slp_typ)


class DebugExit:
    """Port 0x501: a write of `code` stops the VM with that exit status (`on_exit(code)`)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        # The ABI says a 32-bit write; narrower ones are zero-extended rather than lost, so a
        # guest bug still ends the VM.  Only a write starting at the port itself counts.
        if offset != 0 or not data:
            return
        code = le_value(data[:4])
        log.info("debug-exit: guest exits with code %d", code)
        self._on_exit(code)


class BootProgress:
    """Port 0x80 (and the testdev MARK register): boot-progress markers with their times.

    Each mark is kept as `(value, seconds since start)` in `marks` (the most recent
    `MAX_MARKS`) and logged, rate-limited because Linux may use port 0x80 as an I/O delay.
    """

    MAX_MARKS = 1024
    LOG_PER_SECOND = 20

    def __init__(self, on_mark: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, start: float | None = None) -> None:
        self._on_mark = on_mark
        self._clock = clock
        self._start = clock() if start is None else start
        self.marks: deque[tuple[int, float]] = deque(maxlen=self.MAX_MARKS)
        self.count = 0
        self._log_window = 0.0
        self._logged_in_window = 0
        self._suppressed = 0

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and data:
            self.mark(data[0])  # an 8-bit port: wider writes keep only their low byte

    def mark(self, value: int) -> None:
        """Record one marker; also the entry point for the testdev's MARK register."""
        now = self._clock()
        elapsed = now - self._start
        self.marks.append((value, elapsed))
        self.count += 1
        self._log(value, elapsed, now)
        if self._on_mark is not None:
            self._on_mark(value)

    def _log(self, value: int, elapsed: float, now: float) -> None:
        if now - self._log_window >= 1.0:
            if self._suppressed:
                log.info("boot progress: %d more markers not logged", self._suppressed)
            self._log_window = now
            self._logged_in_window = 0
            self._suppressed = 0
        if self._logged_in_window < self.LOG_PER_SECOND:
            self._logged_in_window += 1
            log.info("boot progress: marker %#x at %.6f s", value, elapsed)
        else:
            self._suppressed += 1
