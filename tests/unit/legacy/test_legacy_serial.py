"""The 16550A UART: register file, DLAB, interrupt identification and priority, loopback."""

from __future__ import annotations

import pytest

from vmm_core.legacy import serial as s
from vmm_core.legacy.serial import Serial


class Uart:
    """A Serial plus what it sent and the IRQ levels it drove."""

    def __init__(self, **kwargs) -> None:
        self.sent = bytearray()
        self.levels: list[bool] = []
        self.dev = Serial(self.sent.extend, self.levels.append, **kwargs)

    def rd(self, reg: int) -> int:
        buf = bytearray(1)
        self.dev.read(reg, buf)
        return buf[0]

    def wr(self, reg: int, value: int) -> None:
        self.dev.write(reg, bytes([value]))


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_thr_write_goes_out(uart: Uart) -> None:
    for b in b"hi\n":
        uart.wr(s.RBR_THR, b)
    assert bytes(uart.sent) == b"hi\n"
    assert uart.dev.tx_bytes == 3


def test_lsr_thre_temt_always_set_dr_follows_input(uart: Uart) -> None:
    assert uart.rd(s.LSR) == s.LSR_THRE | s.LSR_TEMT
    uart.dev.queue_input(b"x")
    assert uart.rd(s.LSR) == s.LSR_THRE | s.LSR_TEMT | s.LSR_DR
    assert uart.rd(s.RBR_THR) == ord("x")
    assert uart.rd(s.LSR) & s.LSR_DR == 0
    assert uart.rd(s.RBR_THR) == 0  # empty RBR reads zero


def test_dlab_switches_offsets_0_and_1_to_the_divisor(uart: Uart) -> None:
    uart.wr(s.IER, 0x05)
    uart.wr(s.LCR, s.LCR_DLAB | 0x03)
    uart.wr(s.RBR_THR, 0x01)  # DLL
    uart.wr(s.IER, 0x00)  # DLM
    assert (uart.rd(s.RBR_THR), uart.rd(s.IER)) == (0x01, 0x00)
    assert uart.sent == b""  # the DLL write did not transmit
    uart.wr(s.LCR, 0x03)
    assert uart.rd(s.IER) == 0x05  # IER untouched by the DLM write
    uart.wr(s.LCR, s.LCR_DLAB)
    assert uart.rd(s.RBR_THR) == 0x01


def test_ier_upper_bits_read_zero(uart: Uart) -> None:
    uart.wr(s.IER, 0xFF)
    assert uart.rd(s.IER) == 0x0F


def test_scratch_register(uart: Uart) -> None:
    uart.wr(s.SCR, 0xA5)
    assert uart.rd(s.SCR) == 0xA5


def test_iir_idle_and_fifo_bits(uart: Uart) -> None:
    assert uart.rd(s.IIR_FCR) == s.IIR_NO_INT
    uart.wr(s.IIR_FCR, s.FCR_FIFO_ENABLE)
    assert uart.rd(s.IIR_FCR) == s.IIR_FIFO_ENABLED | s.IIR_NO_INT


def test_thre_interrupt_on_enable_cleared_by_iir_read(uart: Uart) -> None:
    uart.wr(s.IER, s.IER_ETBEI)
    assert uart.levels == [True]
    assert uart.rd(s.IIR_FCR) == s.IIR_THRE
    assert uart.levels == [True, False]
    assert uart.rd(s.IIR_FCR) == s.IIR_NO_INT
    # A THR write empties at once: THRE again.
    uart.wr(s.RBR_THR, ord("a"))
    assert uart.levels == [True, False, True]
    assert uart.dev.irq_level


def test_thre_not_raised_when_disabled(uart: Uart) -> None:
    uart.wr(s.RBR_THR, ord("a"))
    assert uart.levels == []
    # Writing IER again with ETBEI already set is not a new enable.
    uart.wr(s.IER, s.IER_ETBEI)
    uart.rd(s.IIR_FCR)
    uart.wr(s.IER, s.IER_ETBEI)
    assert uart.rd(s.IIR_FCR) == s.IIR_NO_INT


def test_rda_interrupt_raised_and_lowered(uart: Uart) -> None:
    uart.wr(s.IER, s.IER_ERBFI)
    uart.dev.queue_input(b"ab")
    assert uart.levels == [True]
    assert uart.rd(s.IIR_FCR) == s.IIR_RDA
    assert uart.rd(s.RBR_THR) == ord("a")
    assert uart.dev.irq_level
    assert uart.rd(s.RBR_THR) == ord("b")
    assert uart.levels == [True, False]


def test_rx_below_fifo_trigger_reports_timeout(uart: Uart) -> None:
    uart.wr(s.IER, s.IER_ERBFI)
    uart.wr(s.IIR_FCR, s.FCR_FIFO_ENABLE | (2 << s.FCR_TRIGGER_SHIFT))  # trigger at 8
    uart.dev.queue_input(b"abc")
    assert uart.rd(s.IIR_FCR) == s.IIR_FIFO_ENABLED | s.IIR_CTI
    uart.dev.queue_input(b"defgh")
    assert uart.rd(s.IIR_FCR) == s.IIR_FIFO_ENABLED | s.IIR_RDA


def test_iir_priority_rls_over_rda_over_thre() -> None:
    dev = Uart(rx_capacity=2)
    dev.wr(s.IER, s.IER_ERBFI | s.IER_ETBEI | s.IER_ELSI)
    assert dev.dev.queue_input(b"abc") == 2  # one byte overruns
    assert dev.rd(s.IIR_FCR) == s.IIR_RLS
    assert dev.rd(s.LSR) & s.LSR_OE
    assert dev.rd(s.LSR) & s.LSR_OE == 0  # OE clears on read
    assert dev.rd(s.IIR_FCR) == s.IIR_RDA
    dev.rd(s.RBR_THR)
    dev.rd(s.RBR_THR)
    assert dev.rd(s.IIR_FCR) == s.IIR_THRE  # THRE was pending underneath all along
    assert dev.rd(s.IIR_FCR) == s.IIR_NO_INT
    assert dev.levels[-1] is False


def test_input_overflow_counts_drops() -> None:
    dev = Uart(rx_capacity=4)
    assert dev.dev.queue_input(b"123456") == 4
    assert dev.dev.rx_dropped == 2
    assert dev.dev.queue_input(b"7") == 0
    assert dev.dev.rx_dropped == 3
    assert bytes(dev.rd(s.RBR_THR) for _ in range(4)) == b"1234"


def test_fcr_clear_rx(uart: Uart) -> None:
    uart.dev.queue_input(b"abc")
    uart.wr(s.IIR_FCR, s.FCR_CLEAR_RX)
    assert uart.rd(s.LSR) & s.LSR_DR == 0


def test_loopback_routes_tx_to_rx_and_wires_modem_lines(uart: Uart) -> None:
    assert uart.rd(s.MSR) == s.MSR_CONNECTED
    # Linux's 8250 probe: MCR = LOOP|RTS|OUT2 must read back CTS|DCD in MSR's high nibble.
    uart.wr(s.MCR, s.MCR_LOOP | s.MCR_RTS | s.MCR_OUT2)
    assert uart.rd(s.MSR) & 0xF0 == s.MSR_CTS | s.MSR_DCD
    uart.wr(s.RBR_THR, 0x42)
    assert uart.sent == b""
    assert uart.rd(s.LSR) & s.LSR_DR
    assert uart.rd(s.RBR_THR) == 0x42
    uart.wr(s.MCR, s.MCR_OUT2)
    uart.wr(s.RBR_THR, 0x43)
    assert bytes(uart.sent) == b"\x43"


def test_loopback_msr_deltas_and_modem_status_interrupt(uart: Uart) -> None:
    uart.wr(s.MCR, s.MCR_LOOP)
    uart.rd(s.MSR)  # clear the deltas of entering loopback
    uart.wr(s.IER, s.IER_EDSSI)
    uart.wr(s.MCR, s.MCR_LOOP | s.MCR_DTR | s.MCR_OUT1)
    assert uart.rd(s.IIR_FCR) == s.IIR_MSR
    assert uart.rd(s.MSR) == s.MSR_DSR | s.MSR_RI | s.MSR_DDSR
    assert uart.rd(s.IIR_FCR) == s.IIR_NO_INT
    uart.wr(s.MCR, s.MCR_LOOP | s.MCR_DTR)  # RI falls: trailing edge
    assert uart.rd(s.MSR) == s.MSR_DSR | s.MSR_TERI


def test_wide_access_is_split_into_byte_cycles(uart: Uart) -> None:
    uart.dev.write(s.LCR, b"\x03\x0b")  # LCR then MCR
    assert (uart.rd(s.LCR), uart.rd(s.MCR)) == (0x03, 0x0B)
    buf = bytearray(2)
    uart.dev.read(7, buf)  # SCR then past the end
    assert buf == b"\x00\x00"


def test_no_irq_hook_is_fine() -> None:
    dev = Serial(lambda b: None, None)
    dev.write(s.IER, bytes([s.IER_ETBEI]))
    assert dev.irq_level


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Serial(lambda b: None, None, rx_capacity=0)


def test_is_a_bus_device() -> None:
    from vmm_core.bus import BusDevice
    assert isinstance(Serial(lambda b: None, None), BusDevice)
