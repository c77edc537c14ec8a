"""Just enough of the 8042 keyboard controller for Linux to probe it and to reboot with `reboot=k`.

There is no keyboard or mouse behind it and it raises no interrupts: Linux drives controller
commands by polling the status register, and bytes written to the devices go nowhere.  Pass
`i8042.noaux` (as Firecracker does) so Linux does not wait for an AUX port loop test.

The device spans ports 0x60..0x64 (base 0x60, size 5):

    offset 0  port 0x60  data: reads the output buffer (0 when empty); writes a command's parameter
    offset 1  port 0x61  not the 8042 (system control port B, normally KVM's in-kernel PIT speaker
                         device); reads 0x20 so a PIT-calibration loop waiting for timer 2 ends
    offset 2  port 0x62  nothing: reads 0
    offset 3  port 0x63  nothing: reads 0
    offset 4  port 0x64  reads the status register; writes a controller command
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

I8042_SIZE = 5
OFFSET_DATA = 0  # port 0x60
OFFSET_PORT_B = 1  # port 0x61
OFFSET_COMMAND = 4  # port 0x64
PORT_B_TIMER2_OUT = 0x20

# Status register bits.
STATUS_OBF = 0x01  # output buffer full: a byte waits at port 0x60
STATUS_IBF = 0x02  # input buffer full: never, commands are taken at once
STATUS_SYS = 0x04  # system flag, set by a passed self-test (mirrors command byte bit 2)
STATUS_CMD = 0x08  # the last write went to port 0x64
STATUS_UNLOCKED = 0x10  # keyboard not inhibited

# Controller command byte ("CTR") bits.
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_SYS | CTR_XLATE  # as firmware leaves it: translation on, interrupts off

# Output port bits (commands 0xD0/0xD1).
OUTPORT_RESET_N = 0x01  # system reset line, active low
OUTPORT_A20 = 0x02
OUTPORT_DEFAULT = OUTPORT_RESET_N | OUTPORT_A20

# Controller commands.
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_PULSE_BASE = 0xF0  # 0xF0..0xFF pulse output port bits 0-3 whose command bit is clear
CMD_PULSE_RESET = 0xFE  # pulse bit 0 only: the reset line

SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00
OUTPUT_BUFFER_MAX = 16  # responses a guest could queue without reading; more are dropped


class I8042:
    """The 8042 controller; `on_reset()` is called when the guest pulses the CPU reset line."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._ctr = CTR_DEFAULT
        self._outport = OUTPORT_DEFAULT
        self._output: deque[int] = deque(maxlen=OUTPUT_BUFFER_MAX)
        self._pending: int | None = None  # a command waiting for its parameter on port 0x60
        self._last_was_command = False
        self.reset_count = 0

    # -- BusDevice ------------------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        value = 0
        if offset == OFFSET_DATA:
            value = self._output.popleft() if self._output else 0
        elif offset == OFFSET_PORT_B:
            value = PORT_B_TIMER2_OUT
        elif offset == OFFSET_COMMAND:
            value = self._status()
        data[:] = bytes(len(data))
        if data:
            data[0] = value

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset == OFFSET_DATA:
            self._last_was_command = False
            self._write_data(value)
        elif offset == OFFSET_COMMAND:
            self._last_was_command = True
            self._command(value)
        # Writes to 0x61..0x63 are not ours to act on: ignored.

    # -- controller -----------------------------------------------------------------------------
    def _status(self) -> int:
        status = STATUS_UNLOCKED
        if self._output:
            status |= STATUS_OBF
        if self._ctr & CTR_SYS:
            status |= STATUS_SYS
        if self._last_was_command:
            status |= STATUS_CMD
        return status

    def _respond(self, value: int) -> None:
        self._output.append(value)

    def _command(self, cmd: int) -> None:
        self._pending = None  # a new command abandons one waiting for its parameter
        if cmd == CMD_READ_CTR:
            self._respond(self._ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPORT):
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUX_DISABLE
        elif cmd == CMD_SELF_TEST:
            self._ctr |= CTR_SYS
            self._respond(SELF_TEST_PASSED)
        elif cmd == CMD_KBD_TEST:
            self._respond(INTERFACE_TEST_PASSED)
        elif cmd == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBD_DISABLE
        elif cmd == CMD_READ_OUTPORT:
            self._respond(self._outport)
        elif cmd >= CMD_PULSE_BASE:
            # Bits 0-3 clear in the command select the output port lines pulsed low.
            if not cmd & OUTPORT_RESET_N:
                self._reset("pulse command %#x" % cmd)
        else:
            log.debug("i8042: ignoring unsupported command %#x", cmd)

    def _write_data(self, value: int) -> None:
        cmd, self._pending = self._pending, None
        if cmd == CMD_WRITE_CTR:
            self._ctr = value
        elif cmd == CMD_WRITE_OUTPORT:
            self._outport = value
            if not value & OUTPORT_RESET_N:
                self._reset("output port write %#x" % value)
        # Without a pending command the byte is for the keyboard, and there is none: dropped.

    def _reset(self, why: str) -> None:
        log.info("i8042: guest requested a reset (%s)", why)
        self.reset_count += 1
        self._on_reset()

    @property
    def command_byte(self) -> int:
        return self._ctr
