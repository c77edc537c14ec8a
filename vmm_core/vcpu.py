"""The vCPU run loop: one thread per vCPU, each exit dispatched to the PIO or MMIO bus.

Stopping: the VM sets `immediate_exit` in every run page and signals each vCPU thread
(SIGUSR1, a no-op handler), so a thread inside KVM_RUN returns with EINTR and one that is about
to enter it returns at once.  Pausing (`PUT /api/v1/vm.pause`) does the same and the thread then
waits outside KVM_RUN until it is resumed; the guest's state stays in KVM.  The loop never raises into the thread: a fatal exit becomes a
`StopRequest` handed to the VM.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

from .bus import Bus
from .errors import GuestMemoryError, KvmError
from .kvm import (FailEntryExit, HltExit, InternalErrorExit, InterruptedExit, IoExit, MmioExit,
                  ShutdownExit, SystemEventExit, Vcpu)
from .kvm._kvm_cffi import lib
from .memory import GuestMemory

log = logging.getLogger(__name__)


class StopReason(IntEnum):
    """Why the VM stopped; the value is the process exit status (`guest_exit` carries its own)."""
    POWEROFF = 0
    GUEST_EXIT = 1  # placeholder: the exit status is the code the guest wrote
    RESET = 65
    VCPU_FATAL = 66
    DEVICE_FAILED = 67
    HANGUP = 129  # SIGHUP: the terminal or session went away; stopped like SIGTERM
    INTERRUPTED = 130
    TERMINATED = 143


@dataclass(frozen=True)
class StopRequest:
    reason: StopReason
    message: str = ""
    code: int | None = None  # the guest-chosen status for GUEST_EXIT

    @property
    def exit_status(self) -> int:
        if self.reason is StopReason.GUEST_EXIT and self.code is not None:
            return self.code & 0xFF
        return int(self.reason)


def _access(read: Callable[[int, bytearray], bool], write: Callable[[int, bytes], bool],
            addr: int, data: memoryview, is_write: bool) -> None:
    """One bus access against `data`, the exit's window in the kvm_run page."""
    if is_write:
        write(addr, bytes(data))
    else:
        buf = bytearray(len(data))
        read(addr, buf)
        data[:] = buf


class VcpuThread(threading.Thread):
    def __init__(self, vcpu: Vcpu, pio_bus: Bus, mmio_bus: Bus, memory: GuestMemory,
                 request_stop: Callable[[StopRequest], None]) -> None:
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.memory = memory
        self.request_stop = request_stop
        self.stopping = False
        self.pausing = False
        self.paused = threading.Event()   # set while the thread waits outside KVM_RUN
        self._resume = threading.Event()
        self._lock = threading.Lock()
        self.exits = 0

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            self.vcpu.set_immediate_exit(True)
            self._resume.set()

    def pause(self) -> None:
        """Ask the thread to leave KVM_RUN and wait (the caller signals it, as for a stop)."""
        with self._lock:
            self._resume.clear()
            self.pausing = True
            self.vcpu.set_immediate_exit(True)

    def resume(self) -> None:
        with self._lock:
            self.pausing = False
            self.vcpu.set_immediate_exit(self.stopping)
            self._resume.set()

    def _wait_paused(self) -> None:
        self.paused.set()
        self._resume.wait()
        self.paused.clear()

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - a vCPU thread must report, never die silently
            log.exception("vCPU %d crashed", self.vcpu.index)
            self.request_stop(StopRequest(StopReason.VCPU_FATAL, f"vCPU {self.vcpu.index}: {exc}"))

    def _loop(self) -> None:
        vcpu = self.vcpu
        pio_read, pio_write = self.pio_bus.read, self.pio_bus.write
        mmio_read, mmio_write = self.mmio_bus.read, self.mmio_bus.write
        while not self.stopping:
            if self.pausing:
                self._wait_paused()
                continue
            exit_ = vcpu.run()
            self.exits += 1
            cls = type(exit_)
            if cls is MmioExit:
                _access(mmio_read, mmio_write, exit_.phys_addr, vcpu.mmio_data(exit_.size), exit_.is_write)
            elif cls is IoExit:
                for i in range(exit_.count):
                    data = vcpu.io_data(exit_.data_offset + i * exit_.size, exit_.size)
                    _access(pio_read, pio_write, exit_.port, data, exit_.is_write)
            elif cls is InterruptedExit:
                continue
            elif cls is HltExit:
                # With the in-kernel irqchip KVM handles HLT itself; a HLT exit means the guest
                # halted with nothing that can wake it.
                self.request_stop(StopRequest(
                    StopReason.VCPU_FATAL, f"vCPU {vcpu.index} halted with interrupts off"
                    f"{self._where()}"))
                return
            elif cls is ShutdownExit:
                self.request_stop(StopRequest(StopReason.RESET, "guest triple fault or reset (KVM_EXIT_SHUTDOWN)"))
                return
            elif cls is SystemEventExit:
                if exit_.type == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                    self.request_stop(StopRequest(StopReason.POWEROFF, "guest powered off"))
                else:
                    self.request_stop(StopRequest(StopReason.RESET, f"guest system event {exit_.type}"))
                return
            elif cls is FailEntryExit:
                self.request_stop(StopRequest(
                    StopReason.VCPU_FATAL,
                    f"vCPU {vcpu.index}: KVM_EXIT_FAIL_ENTRY, hardware reason "
                    f"{exit_.hardware_entry_failure_reason:#x}{self._where()}"))
                return
            elif cls is InternalErrorExit:
                data = " ".join(f"{d:#x}" for d in exit_.data)
                self.request_stop(StopRequest(
                    StopReason.VCPU_FATAL,
                    f"vCPU {vcpu.index}: KVM_EXIT_INTERNAL_ERROR suberror {exit_.suberror}"
                    f" data [{data}]{self._where()}"))
                return
            else:
                self.request_stop(StopRequest(
                    StopReason.VCPU_FATAL, f"vCPU {vcpu.index}: unhandled {exit_}{self._where()}"))
                return

    def _where(self) -> str:
        """rip and the instruction bytes there, for a fatal-exit diagnostic."""
        try:
            regs = self.vcpu.get_regs()
            sregs = self.vcpu.get_sregs()
        except KvmError:
            return ""
        rip = int(regs.rip)
        linear = int(sregs.cs.base) + rip
        text = f" at rip {rip:#x}"
        # The boot page tables identity-map low memory; for a guest with its own tables this is a
        # best effort, labelled as such.
        try:
            code = self.memory.read(linear & 0xFFFF_FFFF_FFFF, 16)
            text += f" (bytes at physical {linear:#x}: {code.hex(' ')})"
        except GuestMemoryError:
            pass
        return text
