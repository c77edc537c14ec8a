"""The i8042: status polling, the probe commands Linux sends, and every reset path."""

from __future__ import annotations

import pytest

from vmm_core.legacy import i8042 as k
from vmm_core.legacy.i8042 import I8042


class Kbc:
    def __init__(self) -> None:
        self.resets = 0
        self.dev = I8042(self._on_reset)

    def _on_reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        buf = bytearray(1)
        self.dev.read(k.OFFSET_COMMAND, buf)
        return buf[0]

    def data(self) -> int:
        buf = bytearray(1)
        self.dev.read(k.OFFSET_DATA, buf)
        return buf[0]

    def cmd(self, value: int) -> None:
        self.dev.write(k.OFFSET_COMMAND, bytes([value]))

    def put(self, value: int) -> None:
        self.dev.write(k.OFFSET_DATA, bytes([value]))


@pytest.fixture
def kbc() -> Kbc:
    return Kbc()


def test_idle_status_is_empty_and_ready(kbc: Kbc) -> None:
    st = kbc.status()
    assert st & (k.STATUS_OBF | k.STATUS_IBF) == 0
    assert kbc.data() == 0


def test_reboot_k_path_pulse_reset(kbc: Kbc) -> None:
    # Linux's kb_wait() polls until IBF clears, then writes 0xFE to port 0x64.
    assert kbc.status() & k.STATUS_IBF == 0
    kbc.cmd(k.CMD_PULSE_RESET)
    assert kbc.resets == 1
    assert kbc.dev.reset_count == 1


def test_pulse_without_reset_bit_does_not_reset(kbc: Kbc) -> None:
    kbc.cmd(0xFF)  # pulse nothing
    kbc.cmd(0xFD)  # pulse bit 1 (A20) only
    assert kbc.resets == 0
    kbc.cmd(0xF0)  # pulse all four, including reset
    assert kbc.resets == 1


def test_output_port_write_with_bit0_clear_resets(kbc: Kbc) -> None:
    kbc.cmd(k.CMD_WRITE_OUTPORT)
    kbc.put(k.OUTPORT_A20 | k.OUTPORT_RESET_N)
    assert kbc.resets == 0
    kbc.cmd(k.CMD_READ_OUTPORT)
    assert kbc.data() == k.OUTPORT_A20 | k.OUTPORT_RESET_N
    kbc.cmd(k.CMD_WRITE_OUTPORT)
    kbc.put(k.OUTPORT_A20)
    assert kbc.resets == 1


def test_self_test_and_interface_test(kbc: Kbc) -> None:
    kbc.cmd(k.CMD_SELF_TEST)
    assert kbc.status() & (k.STATUS_OBF | k.STATUS_SYS | k.STATUS_CMD) == (
        k.STATUS_OBF | k.STATUS_SYS | k.STATUS_CMD)
    assert kbc.data() == k.SELF_TEST_PASSED
    assert kbc.status() & k.STATUS_OBF == 0
    kbc.cmd(k.CMD_KBD_TEST)
    assert kbc.data() == k.INTERFACE_TEST_PASSED


def test_command_byte_read_write(kbc: Kbc) -> None:
    kbc.cmd(k.CMD_READ_CTR)
    assert kbc.data() == k.CTR_DEFAULT
    kbc.cmd(k.CMD_WRITE_CTR)
    assert kbc.status() & k.STATUS_CMD
    kbc.put(0x65)
    assert kbc.status() & k.STATUS_CMD == 0
    kbc.cmd(k.CMD_READ_CTR)
    assert kbc.data() == 0x65


def test_port_enable_disable_commands_toggle_command_byte(kbc: Kbc) -> None:
    kbc.cmd(k.CMD_KBD_DISABLE)
    kbc.cmd(k.CMD_AUX_DISABLE)
    assert kbc.dev.command_byte & (k.CTR_KBD_DISABLE | k.CTR_AUX_DISABLE) == (
        k.CTR_KBD_DISABLE | k.CTR_AUX_DISABLE)
    kbc.cmd(k.CMD_KBD_ENABLE)
    kbc.cmd(k.CMD_AUX_ENABLE)
    assert kbc.dev.command_byte & (k.CTR_KBD_DISABLE | k.CTR_AUX_DISABLE) == 0


def test_data_without_pending_command_is_dropped(kbc: Kbc) -> None:
    kbc.put(0xF2)  # "identify keyboard": there is no keyboard
    assert kbc.status() & k.STATUS_OBF == 0
    kbc.cmd(k.CMD_READ_CTR)
    assert kbc.data() == k.CTR_DEFAULT  # command byte unchanged


def test_new_command_abandons_pending_parameter(kbc: Kbc) -> None:
    kbc.cmd(k.CMD_WRITE_OUTPORT)
    kbc.cmd(k.CMD_KBD_TEST)
    kbc.put(0x00)  # would reset if still the D1 parameter
    assert kbc.resets == 0


def test_unused_offsets_and_unknown_commands_are_harmless(kbc: Kbc) -> None:
    kbc.cmd(0xC0)
    buf = bytearray(1)
    kbc.dev.read(k.OFFSET_PORT_B, buf)
    assert buf[0] == k.PORT_B_TIMER2_OUT
    kbc.dev.read(2, buf)
    assert buf[0] == 0
    kbc.dev.write(3, b"\xfe")
    kbc.dev.write(k.OFFSET_COMMAND, b"")
    assert kbc.resets == 0


def test_output_buffer_is_bounded(kbc: Kbc) -> None:
    for _ in range(100):
        kbc.cmd(k.CMD_SELF_TEST)
    drained = 0
    while kbc.status() & k.STATUS_OBF:
        kbc.data()
        drained += 1
    assert drained == k.OUTPUT_BUFFER_MAX


def test_is_a_bus_device(kbc: Kbc) -> None:
    from vmm_core.bus import BusDevice
    assert isinstance(kbc.dev, BusDevice)
