"""The CMOS RTC with a fixed clock: BCD/binary and 12/24-hour per register B, RAM, guest sets."""

from __future__ import annotations

import calendar

import pytest

from vmm_core.legacy import rtc as r
from vmm_core.legacy.rtc import Rtc

# Saturday 2024-03-09 15:04:05 UTC.
FIXED = calendar.timegm((2024, 3, 9, 15, 4, 5, 0, 0, 0))


class Cmos:
    def __init__(self, now: float = FIXED) -> None:
        self.now = now
        self.dev = Rtc(clock=lambda: self.now)

    def get(self, index: int) -> int:
        self.dev.write(r.OFFSET_INDEX, bytes([index]))
        buf = bytearray(1)
        self.dev.read(r.OFFSET_DATA, buf)
        return buf[0]

    def set(self, index: int, value: int) -> None:
        self.dev.write(r.OFFSET_INDEX, bytes([index]))
        self.dev.write(r.OFFSET_DATA, bytes([value]))


@pytest.fixture
def cmos() -> Cmos:
    return Cmos()


def time_regs(cmos: Cmos) -> tuple[int, ...]:
    return tuple(cmos.get(i) for i in (r.REG_SECONDS, r.REG_MINUTES, r.REG_HOURS,
                                       r.REG_DAY_OF_WEEK, r.REG_DAY_OF_MONTH, r.REG_MONTH,
                                       r.REG_YEAR, r.REG_CENTURY))


def test_default_bcd_24h(cmos: Cmos) -> None:
    assert cmos.get(r.REG_B) == r.REG_B_24H
    assert time_regs(cmos) == (0x05, 0x04, 0x15, 7, 0x09, 0x03, 0x24, 0x20)


def test_binary_mode(cmos: Cmos) -> None:
    cmos.set(r.REG_B, r.REG_B_24H | r.REG_B_DM_BINARY)
    assert time_regs(cmos) == (5, 4, 15, 7, 9, 3, 24, 20)


@pytest.mark.parametrize("hour, bcd, binary", [
    (0, 0x12, 12),  # midnight is 12 AM
    (9, 0x09, 9),
    (12, 0x80 | 0x12, 0x80 | 12),  # noon is 12 PM
    (15, 0x80 | 0x03, 0x80 | 3),
    (23, 0x80 | 0x11, 0x80 | 11),
])
def test_12_hour_mode(hour: int, bcd: int, binary: int) -> None:
    cmos = Cmos(calendar.timegm((2024, 3, 9, hour, 0, 0, 0, 0, 0)))
    cmos.set(r.REG_B, 0)
    assert cmos.get(r.REG_HOURS) == bcd
    cmos.set(r.REG_B, r.REG_B_DM_BINARY)
    assert cmos.get(r.REG_HOURS) == binary


def test_clock_follows_host_time(cmos: Cmos) -> None:
    cmos.now += 61.9
    assert cmos.get(r.REG_SECONDS) == 0x06
    assert cmos.get(r.REG_MINUTES) == 0x05


def test_day_of_week_sunday_is_one() -> None:
    cmos = Cmos(calendar.timegm((2024, 3, 10, 0, 0, 0, 0, 0, 0)))
    assert cmos.get(r.REG_DAY_OF_WEEK) == 1


def test_registers_a_c_d(cmos: Cmos) -> None:
    assert cmos.get(r.REG_A) == r.REG_A_DEFAULT
    cmos.set(r.REG_A, 0xFF)
    assert cmos.get(r.REG_A) == 0x7F  # UIP stays clear
    assert cmos.get(r.REG_C) == 0
    assert cmos.get(r.REG_D) == r.REG_D_VRT
    cmos.set(r.REG_D, 0)
    assert cmos.get(r.REG_D) == r.REG_D_VRT


def test_cmos_ram_and_nmi_bit(cmos: Cmos) -> None:
    cmos.set(0x40, 0xAB)
    cmos.set(r.INDEX_NMI_DISABLE | 0x7F, 0xCD)
    assert cmos.dev.nmi_disabled
    assert cmos.get(0x40) == 0xAB
    assert cmos.get(0x7F) == 0xCD
    assert not cmos.dev.nmi_disabled
    cmos.set(r.REG_SECONDS_ALARM, 0x30)
    assert cmos.get(r.REG_SECONDS_ALARM) == 0x30


def test_index_port_reads_ff_and_word_access_splits(cmos: Cmos) -> None:
    buf = bytearray(1)
    cmos.dev.read(r.OFFSET_INDEX, buf)
    assert buf[0] == 0xFF
    cmos.dev.write(r.OFFSET_INDEX, bytes([0x41, 0x99]))  # index then data, as `outw` does
    assert cmos.get(0x41) == 0x99


def test_guest_sets_time_directly(cmos: Cmos) -> None:
    cmos.set(r.REG_MINUTES, 0x30)
    assert cmos.get(r.REG_MINUTES) == 0x30
    cmos.now += 60
    assert cmos.get(r.REG_MINUTES) == 0x31  # keeps running from the new time
    assert cmos.get(r.REG_HOURS) == 0x15


def test_set_bit_stages_writes_until_cleared(cmos: Cmos) -> None:
    cmos.set(r.REG_B, r.REG_B_24H | r.REG_B_SET)
    # 2031-02-28 10:20:30, written in an order with an invalid intermediate date.
    for index, value in ((r.REG_DAY_OF_MONTH, 0x28), (r.REG_MONTH, 0x02), (r.REG_YEAR, 0x31),
                         (r.REG_HOURS, 0x10), (r.REG_MINUTES, 0x20), (r.REG_SECONDS, 0x30)):
        cmos.set(index, value)
    cmos.now += 100  # frozen while SET
    assert cmos.get(r.REG_SECONDS) == 0x30
    cmos.set(r.REG_B, r.REG_B_24H)
    assert time_regs(cmos) == (0x30, 0x20, 0x10, 6, 0x28, 0x02, 0x31, 0x20)
    cmos.now += 5
    assert cmos.get(r.REG_SECONDS) == 0x35


def test_invalid_guest_time_is_ignored(cmos: Cmos) -> None:
    cmos.set(r.REG_MONTH, 0x13)
    assert cmos.get(r.REG_MONTH) == 0x03


def test_12_hour_write_decodes_pm(cmos: Cmos) -> None:
    cmos.set(r.REG_B, r.REG_B_DM_BINARY)
    cmos.set(r.REG_HOURS, 0x80 | 12)  # 12 PM
    cmos.set(r.REG_B, r.REG_B_DM_BINARY | r.REG_B_24H)
    assert cmos.get(r.REG_HOURS) == 12
    cmos.set(r.REG_B, r.REG_B_DM_BINARY)
    cmos.set(r.REG_HOURS, 12)  # 12 AM
    cmos.set(r.REG_B, r.REG_B_DM_BINARY | r.REG_B_24H)
    assert cmos.get(r.REG_HOURS) == 0


def test_century_write(cmos: Cmos) -> None:
    cmos.set(r.REG_CENTURY, 0x21)
    assert (cmos.get(r.REG_CENTURY), cmos.get(r.REG_YEAR)) == (0x21, 0x24)


def test_half_written_staged_date_reads_safely(cmos: Cmos) -> None:
    cmos.set(r.REG_B, r.REG_B_24H | r.REG_B_SET)
    cmos.set(r.REG_DAY_OF_MONTH, 0x31)
    cmos.set(r.REG_MONTH, 0x02)  # 31 February, for now
    assert cmos.get(r.REG_DAY_OF_WEEK) == 0
    cmos.set(r.REG_B, r.REG_B_24H)  # committed invalid: ignored, host time stays
    assert time_regs(cmos) == (0x05, 0x04, 0x15, 7, 0x09, 0x03, 0x24, 0x20)


def test_is_a_bus_device(cmos: Cmos) -> None:
    from vmm_core.bus import BusDevice
    assert isinstance(cmos.dev, BusDevice)
