"""ACPI sleep/reset registers, the debug-exit port and the boot-progress port."""

from __future__ import annotations

import logging
import struct

import pytest

from vmm_core.legacy import power as p
from vmm_core.legacy.power import AcpiPower, BootProgress, DebugExit


class Events:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.dev = AcpiPower(lambda: self.log.append("poweroff"), lambda: self.log.append("reset"))


@pytest.fixture
def ev() -> Events:
    return Events()


def slp(typ: int, enable: bool = True) -> bytes:
    return bytes([(typ << p.SLP_TYP_SHIFT) | (p.SLP_EN if enable else 0)])


def test_ports_match_the_spec_layout() -> None:
    assert (p.ACPI_SLEEP_CONTROL_PORT, p.ACPI_SLEEP_STATUS_PORT, p.ACPI_RESET_PORT) == (
        0x3C0, 0x3C1, 0x3C2)
    assert p.ACPI_POWER_BASE + p.ACPI_POWER_SIZE == p.ACPI_RESET_PORT + 1


def test_s5_with_slp_en_powers_off(ev: Events) -> None:
    ev.dev.write(p.OFFSET_SLEEP_CONTROL, slp(p.SLP_TYP_S5))
    assert ev.log == ["poweroff"]
    assert slp(5) == b"\x34"  # what a guest writes for \_S5 = 5


def test_s5_without_slp_en_does_nothing(ev: Events) -> None:
    ev.dev.write(p.OFFSET_SLEEP_CONTROL, slp(p.SLP_TYP_S5, enable=False))
    assert ev.log == []


@pytest.mark.parametrize("typ", [0, 1, 2, 3, 4, 6, 7])
def test_other_sleep_types_are_ignored(ev: Events, typ: int) -> None:
    ev.dev.write(p.OFFSET_SLEEP_CONTROL, slp(typ))
    assert ev.log == []


def test_reset_register_needs_reset_value(ev: Events) -> None:
    ev.dev.write(p.OFFSET_RESET, b"\x02")
    assert ev.log == []
    ev.dev.write(p.OFFSET_RESET, bytes([p.ACPI_RESET_VALUE]))
    assert ev.log == ["reset"]


def test_reads_are_zero_and_wak_sts_write_is_harmless(ev: Events) -> None:
    ev.dev.write(p.OFFSET_SLEEP_STATUS, bytes([p.WAK_STS]))
    buf = bytearray(3)
    ev.dev.read(0, buf)
    assert buf == b"\x00\x00\x00"
    assert ev.log == []


def test_wide_write_covers_following_registers(ev: Events) -> None:
    ev.dev.write(p.OFFSET_SLEEP_STATUS, bytes([0, p.ACPI_RESET_VALUE]))
    assert ev.log == ["reset"]


def test_debug_exit_32_bit_code() -> None:
    codes: list[int] = []
    dev = DebugExit(codes.append)
    dev.write(0, struct.pack("<I", 0x1234_5678))
    dev.write(0, b"\x01")  # narrower writes are zero-extended
    dev.write(1, b"\x07")  # not at the port itself: ignored
    assert codes == [0x1234_5678, 1]
    buf = bytearray(4)
    dev.read(0, buf)
    assert buf == bytes(4)


def test_boot_progress_records_time_since_start(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    seen: list[int] = []
    dev = BootProgress(seen.append, clock=lambda: now[0])
    now[0] = 100.25
    with caplog.at_level(logging.INFO, logger="vmm_core.legacy.power"):
        dev.write(0, b"\x2a")
    now[0] = 101.5
    dev.mark(0x99)  # the testdev MARK path
    assert list(dev.marks) == [(0x2A, 0.25), (0x99, 1.5)]
    assert seen == [0x2A, 0x99]
    assert "marker 0x2a at 0.250000 s" in caplog.text


def test_boot_progress_is_bounded_and_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    dev = BootProgress(clock=lambda: 5.0, start=0.0)
    with caplog.at_level(logging.INFO, logger="vmm_core.legacy.power"):
        for i in range(BootProgress.MAX_MARKS + 10):
            dev.write(0, bytes([i & 0xFF]))
    assert len(dev.marks) == BootProgress.MAX_MARKS
    assert dev.count == BootProgress.MAX_MARKS + 10
    assert dev.marks[0][1] == 5.0
    assert len(caplog.records) == BootProgress.LOG_PER_SECOND


def test_are_bus_devices(ev: Events) -> None:
    from vmm_core.bus import BusDevice
    for dev in (ev.dev, DebugExit(lambda c: None), BootProgress()):
        assert isinstance(dev, BusDevice)
