"""The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data).

Time registers are computed from the host `clock` (UTC) on every read, encoded per register B:
binary or BCD (DM, bit 2) and 24- or 12-hour with the PM flag in bit 7 (24/12, bit 1).  A guest
that sets the clock (`hwclock --systohc`) moves an offset, never the host clock; while register
B's SET bit is on, time writes are staged and take effect together when SET is cleared, as on
the chip.  UIP is always clear (there is no update cycle to race), the alarm registers are plain
storage and no interrupt is ever raised (register C reads 0).  Every other index is 128 bytes of
CMOS RAM.  Bit 7 of the index write is the PC's NMI-disable bit, not part of the index.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from typing import Callable

log = logging.getLogger(__name__)

RTC_SIZE = 2
OFFSET_INDEX = 0  # port 0x70
OFFSET_DATA = 1  # port 0x71
INDEX_NMI_DISABLE = 0x80
INDEX_MASK = 0x7F
CMOS_RAM_SIZE = 128

# Register indexes (MC146818 datasheet, table 3; 0x32 is the IBM PC century byte the FADT names).
REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06  # 1 = Sunday
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH,
             REG_MONTH, REG_YEAR, REG_CENTURY)

# Register A.
REG_A_UIP = 0x80  # update in progress: read-only, always 0 here
REG_A_DV_32KHZ = 0x20  # divider bits 4-6 = 010: 32.768 kHz time base, oscillator running
REG_A_RS_1024HZ = 0x06  # rate select bits 0-3
REG_A_DEFAULT = REG_A_DV_32KHZ | REG_A_RS_1024HZ

# Register B.
REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_DSE = 0x01
REG_B_DEFAULT = REG_B_24H  # BCD, 24-hour: what PC firmware leaves

REG_D_VRT = 0x80  # valid RAM and time: the "battery" is good

HOUR_PM = 0x80  # bit 7 of the hours register in 12-hour mode


def to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class Rtc:
    """A CMOS RTC whose time comes from `clock()` (seconds since the epoch, UTC)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._index = 0
        self.nmi_disabled = False
        self._ram = bytearray(CMOS_RAM_SIZE)
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        self._offset = 0  # whole seconds the guest moved its clock from the host's
        # Fields staged while SET is on: [sec, min, hour, mday, month, year]; None otherwise.
        self._staged: list[int] | None = None

    # -- BusDevice ------------------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        # A wide access covers successive ports, one byte each.
        for i in range(len(data)):
            port = offset + i
            if port == OFFSET_DATA:
                data[i] = self._read_reg(self._index)
            else:
                data[i] = 0xFF  # the index port is write-only

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            port = offset + i
            if port == OFFSET_INDEX:
                self.nmi_disabled = bool(value & INDEX_NMI_DISABLE)
                self._index = value & INDEX_MASK
            elif port == OFFSET_DATA:
                self._write_reg(self._index, value)

    # -- registers ------------------------------------------------------------------------------
    def _read_reg(self, index: int) -> int:
        if index in TIME_REGS:
            # While SET is on the chip stops updating: reads see the staged time.
            fields = self._staged if self._staged is not None else self._fields()
            return self._encode(index, fields)
        if index == REG_A:
            return self._ram[REG_A] & ~REG_A_UIP
        if index == REG_C:
            return 0  # no interrupt flags: this RTC never interrupts
        if index == REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_reg(self, index: int, value: int) -> None:
        if index in TIME_REGS:
            self._write_time(index, value)
        elif index == REG_A:
            self._ram[REG_A] = value & ~REG_A_UIP
        elif index == REG_B:
            self._write_b(value)
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self._ram[index] = value

    def _write_b(self, value: int) -> None:
        was_set = bool(self._ram[REG_B] & REG_B_SET)
        self._ram[REG_B] = value
        if value & REG_B_SET and not was_set:
            self._staged = self._fields()
        elif was_set and not value & REG_B_SET and self._staged is not None:
            staged, self._staged = self._staged, None
            self._commit(staged)

    def _write_time(self, index: int, value: int) -> None:
        fields = self._staged if self._staged is not None else self._fields()
        decoded = self._decode(index, value)
        if index == REG_SECONDS:
            fields[0] = decoded
        elif index == REG_MINUTES:
            fields[1] = decoded
        elif index == REG_HOURS:
            fields[2] = decoded
        elif index == REG_DAY_OF_MONTH:
            fields[3] = decoded
        elif index == REG_MONTH:
            fields[4] = decoded
        elif index == REG_YEAR:
            fields[5] = fields[5] // 100 * 100 + decoded % 100
        elif index == REG_CENTURY:
            fields[5] = decoded * 100 + fields[5] % 100
        # The day of the week follows from the date: a write to it is ignored.
        if self._staged is None:
            self._commit(fields)

    # -- time -----------------------------------------------------------------------------------
    def _fields(self) -> list[int]:
        t = time.gmtime(math.floor(self._clock()) + self._offset)
        return [t.tm_sec, t.tm_min, t.tm_hour, t.tm_mday, t.tm_mon, t.tm_year]

    def _commit(self, fields: list[int]) -> None:
        sec, minute, hour, mday, month, year = fields
        try:
            target = dt.datetime(year, month, mday, hour, minute, sec, tzinfo=dt.timezone.utc)
        except ValueError:
            log.debug("rtc: guest wrote an invalid time %s: ignored", fields)
            return
        self._offset = int(target.timestamp()) - math.floor(self._clock())

    def _encode(self, index: int, fields: list[int]) -> int:
        sec, minute, hour, mday, month, year = fields
        if index == REG_SECONDS:
            value = sec
        elif index == REG_MINUTES:
            value = minute
        elif index == REG_HOURS:
            return self._encode_hour(hour)
        elif index == REG_DAY_OF_WEEK:
            # Python's weekday() is Monday=0; the RTC's is Sunday=1.  A staged date may be
            # half-written and invalid: its weekday reads 0 until it is complete.
            try:
                value = (dt.date(year, month, mday).weekday() + 1) % 7 + 1
            except ValueError:
                value = 0
        elif index == REG_DAY_OF_MONTH:
            value = mday
        elif index == REG_MONTH:
            value = month
        elif index == REG_YEAR:
            value = year % 100
        else:
            value = year // 100
        return self._to_mode(value)

    def _encode_hour(self, hour: int) -> int:
        if self._ram[REG_B] & REG_B_24H:
            return self._to_mode(hour)
        h12 = hour % 12 or 12
        return self._to_mode(h12) | (HOUR_PM if hour >= 12 else 0)

    def _decode(self, index: int, value: int) -> int:
        if index == REG_HOURS and not self._ram[REG_B] & REG_B_24H:
            pm = bool(value & HOUR_PM)
            return self._from_mode(value & ~HOUR_PM) % 12 + (12 if pm else 0)
        return self._from_mode(value)

    def _to_mode(self, value: int) -> int:
        return value if self._ram[REG_B] & REG_B_DM_BINARY else to_bcd(value)

    def _from_mode(self, value: int) -> int:
        return value if self._ram[REG_B] & REG_B_DM_BINARY else from_bcd(value)
