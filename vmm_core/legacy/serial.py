"""An 8250/16550A UART (COM1: ports 0x3f8..0x3ff, IRQ 4), pure logic behind a `BusDevice`.

Register names and bits follow the TI/National PC16550D datasheet.  Transmission is instant: a
byte written to THR goes straight to `out` (or, in loopback, to the receiver), so LSR always
reports THRE|TEMT.  Received bytes come from the host through `queue_input`, into a bounded
buffer that stands in for both the 16-byte RX FIFO and the terminal behind it.

Interrupts behave like the chip's: the line is the OR of the enabled pending sources, IIR
reports the highest-priority one (line status > received data > THR empty > modem status),
and the THRE source is cleared by reading IIR while it is the one reported, or by writing THR.
The `irq` hook is called only when the level changes, so a KVM_IRQ_LINE ioctl is issued per edge.
(On a PC, MCR.OUT2 gates the ISA IRQ; like QEMU and Firecracker we do not gate on it.)
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

# Register offsets from the base port (DLAB = LCR bit 7 switches offsets 0 and 1 to the divisor).
RBR_THR = 0  # read: receiver buffer; write: transmitter holding; DLAB=1: divisor latch low
IER = 1  # interrupt enable; DLAB=1: divisor latch high
IIR_FCR = 2  # read: interrupt identification; write: FIFO control
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
SERIAL_PORT_COUNT = 8

# IER bits.
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 read as zero on a 16550A (Linux probes them to tell UARTs apart)

# IIR values (bit 0 clear = interrupt pending), in priority order, plus the FIFO-enabled bits.
IIR_NO_INT = 0x01
IIR_RLS = 0x06  # receiver line status
IIR_RDA = 0x04  # received data available (at or above the trigger level)
IIR_CTI = 0x0C  # character timeout: data below the trigger level (FIFO mode only)
IIR_THRE = 0x02
IIR_MSR = 0x00
IIR_FIFO_ENABLED = 0xC0

# FCR bits.
FCR_FIFO_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits.
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

# MSR bits: deltas in the low nibble, line states in the high nibble.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA_MASK = 0x0F
# Outside loopback the "modem" is always connected and ready (what a host terminal looks like).
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

DEFAULT_DIVISOR = 12  # 9600 baud from the 1.8432 MHz PC crystal; only stored, never used
DEFAULT_RX_CAPACITY = 4096


class Serial:
    """A 16550A UART.  `out` receives transmitted bytes; `irq(level)` drives the IRQ line."""

    def __init__(self, out: Callable[[bytes], None], irq: Callable[[bool], None] | None,
                 *, rx_capacity: int = DEFAULT_RX_CAPACITY) -> None:
        if rx_capacity <= 0:
            raise ValueError("the serial input buffer needs a positive capacity")
        self._out = out
        self._irq = irq
        self._rx_capacity = rx_capacity
        # queue_input runs on the host's stdin thread, register accesses on a vCPU thread.
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0x03  # 8N1, as firmware would leave it
        self._mcr = MCR_OUT2
        self._fcr = 0
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._overrun = False  # LSR.OE, cleared by reading LSR
        self._thre_pending = False  # the THRE interrupt source (see module docstring)
        self._msr_deltas = 0
        self._irq_level = False
        self.rx_dropped = 0
        self.tx_bytes = 0

    # -- host side ------------------------------------------------------------------------------
    def queue_input(self, data: bytes) -> int:
        """Queue bytes typed by the host; returns how many fit (the rest count in `rx_dropped`)."""
        with self._lock:
            accepted = self._receive(data)
            self._update_irq()
        return accepted

    # -- BusDevice ------------------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        # A wide access to an 8-bit ISA device is split into byte cycles at successive ports.
        with self._lock:
            for i in range(len(data)):
                data[i] = self._read_reg(offset + i)
            self._update_irq()

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                self._write_reg(offset + i, value)
            self._update_irq()

    # -- registers ------------------------------------------------------------------------------
    def _read_reg(self, reg: int) -> int:
        dlab = bool(self._lcr & LCR_DLAB)
        if reg == RBR_THR:
            if dlab:
                return self._divisor & 0xFF
            return self._rx.popleft() if self._rx else 0
        if reg == IER:
            return (self._divisor >> 8) if dlab else self._ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                # Reading IIR while THRE is the reported source clears it (16550D, table 4).
                self._thre_pending = False
            return iir | (IIR_FIFO_ENABLED if self._fcr & FCR_FIFO_ENABLE else 0)
        if reg == LCR:
            return self._lcr
        if reg == MCR:
            return self._mcr
        if reg == LSR:
            lsr = LSR_THRE | LSR_TEMT
            if self._rx:
                lsr |= LSR_DR
            if self._overrun:
                lsr |= LSR_OE
            self._overrun = False
            return lsr
        if reg == MSR:
            msr = self._msr_lines() | self._msr_deltas
            self._msr_deltas = 0
            return msr
        if reg == SCR:
            return self._scr
        return 0  # past the 8 registers: nothing there

    def _write_reg(self, reg: int, value: int) -> None:
        dlab = bool(self._lcr & LCR_DLAB)
        if reg == RBR_THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif reg == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                enabling_thre = value & IER_ETBEI and not self._ier & IER_ETBEI
                self._ier = value & IER_MASK
                # Enabling ETBEI while THR is empty (always, here) raises THRE at once; Linux's
                # 8250 driver relies on this to start transmitting.
                if enabling_thre:
                    self._thre_pending = True
        elif reg == IIR_FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self._lcr = value
        elif reg == MCR:
            self._write_mcr(value & MCR_MASK)
        elif reg == SCR:
            self._scr = value
        # LSR and MSR are read-only (writes are factory-test only on the real part): ignored.

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_FIFO_ENABLE:
            # Switching FIFO mode resets both FIFOs.
            self._rx.clear()
        if value & FCR_CLEAR_RX:
            self._rx.clear()
        # TX is instant, so clearing it has nothing to do.  The clear bits are self-clearing.
        self._fcr = value & ~(FCR_CLEAR_RX | FCR_CLEAR_TX)

    def _write_mcr(self, value: int) -> None:
        before = self._msr_lines()
        self._mcr = value
        after = self._msr_lines()
        changed = before ^ after
        # Delta bits latch until MSR is read; TERI is set only on RI's trailing edge.
        deltas = 0
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:
            deltas |= MSR_TERI
        self._msr_deltas |= deltas

    def _msr_lines(self) -> int:
        if not self._mcr & MCR_LOOP:
            return MSR_CONNECTED
        # Loopback wiring (16550D §8.6): RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        lines = 0
        if self._mcr & MCR_RTS:
            lines |= MSR_CTS
        if self._mcr & MCR_DTR:
            lines |= MSR_DSR
        if self._mcr & MCR_OUT1:
            lines |= MSR_RI
        if self._mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            self._receive(bytes([value]))
        else:
            self.tx_bytes += 1
            self._out(bytes([value]))
        # The byte leaves THR at once, so THR is empty again: a fresh THRE interrupt.
        self._thre_pending = True

    def _receive(self, data: bytes) -> int:
        room = max(0, self._rx_capacity - len(self._rx))
        accepted = data[:room]
        self._rx.extend(accepted)
        dropped = len(data) - len(accepted)
        if dropped:
            if not self.rx_dropped:
                log.warning("serial input buffer full (%d bytes): dropping input",
                            self._rx_capacity)
            self.rx_dropped += dropped
            self._overrun = True
        return len(accepted)

    # -- interrupts -----------------------------------------------------------------------------
    def _iir(self) -> int:
        """The highest-priority pending, enabled interrupt source (16550D table 4)."""
        if self._ier & IER_ELSI and self._overrun:
            return IIR_RLS
        if self._ier & IER_ERBFI and self._rx:
            if self._fcr & FCR_FIFO_ENABLE and len(self._rx) < self._rx_trigger():
                # No clock here: data below the trigger level counts as timed out immediately.
                return IIR_CTI
            return IIR_RDA
        if self._ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if self._ier & IER_EDSSI and self._msr_deltas:
            return IIR_MSR
        return IIR_NO_INT

    def _rx_trigger(self) -> int:
        return RX_TRIGGER_LEVELS[(self._fcr >> FCR_TRIGGER_SHIFT) & 0x3]

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            if self._irq is not None:
                self._irq(level)

    @property
    def irq_level(self) -> bool:
        """The current level of the interrupt line."""
        return self._irq_level
