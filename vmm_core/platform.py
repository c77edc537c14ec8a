"""Attach the legacy platform devices (UART, i8042, RTC, ACPI power, debug ports, testdev)
to a Machine's buses, translating each device's callbacks into VM actions."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import layout
from .legacy.i8042 import I8042
from .legacy.rtc import Rtc
from .legacy.serial import SERIAL_PORT_COUNT, Serial
from .vcpu import StopReason, StopRequest

if TYPE_CHECKING:
    from .legacy.power import BootProgress
    from .vm import Machine


class MachineTestDevHooks:
    """What the testdev may ask of the VM (docs/guest_abi.md)."""

    def __init__(self, machine: "Machine", boot_progress: "BootProgress") -> None:
        self.m = machine
        self.boot_progress = boot_progress
        self._irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        machine.vm.register_irqfd(self._irqfd, layout.TESTDEV_IRQFD_GSI)
        machine.add_cleanup(lambda: os.close(self._irqfd))

    def exit(self, code: int) -> None:
        self.m.request_stop(StopRequest(StopReason.GUEST_EXIT, f"guest exit code {code}", code=code))

    def putc(self, byte: int) -> None:
        self.m.serial_write(bytes([byte & 0xFF]))

    def mark(self, value: int) -> None:
        self.boot_progress.mark(value)

    def irq_line(self, gsi: int, delay_ms: int) -> None:
        self.m.after(delay_ms / 1000, lambda: self.m.pulse_irq(gsi))

    def irqfd(self, delay_ms: int) -> None:
        def fire() -> None:
            os.eventfd_write(self._irqfd, 1)
            self.m.irq_injections += 1
        self.m.after(delay_ms / 1000, fire)

    def irq_count(self) -> int:
        return self.m.irq_injections

    def vcpus(self) -> int:
        return self.m.config.vcpus


@dataclass(frozen=True)
class LegacyDevices:
    """The legacy devices the VM talks to later (stdin feeds COM1; boot progress is read)."""

    serial: Serial
    boot_progress: "BootProgress"


def attach_legacy_devices(m: "Machine") -> LegacyDevices:
    from .legacy import power, testdev

    serial = Serial(m.serial_write, lambda level: m.irq_line(layout.SERIAL_COM1_IRQ, level))
    m.pio_bus.insert(serial, layout.COM1_PORT, SERIAL_PORT_COUNT)
    reset = lambda: m.request_stop(StopRequest(StopReason.RESET, "guest requested a reset"))  # noqa: E731
    poweroff = lambda: m.request_stop(StopRequest(StopReason.POWEROFF, "guest powered off (ACPI S5)"))  # noqa: E731
    m.pio_bus.insert(I8042(on_reset=reset), layout.I8042_PORT_DATA, 5)
    m.pio_bus.insert(Rtc(), layout.RTC_PORT, 2)
    m.pio_bus.insert(power.AcpiPower(on_poweroff=poweroff, on_reset=reset),
                     power.ACPI_POWER_BASE, power.ACPI_POWER_SIZE)
    m.pio_bus.insert(power.DebugExit(on_exit=lambda code: m.request_stop(
        StopRequest(StopReason.GUEST_EXIT, f"guest exit code {code}", code=code))),
        layout.DEBUG_EXIT_PORT, power.DEBUG_EXIT_SIZE)
    boot_progress = power.BootProgress(clock=time.monotonic, start=m.start_time)
    m.pio_bus.insert(boot_progress, layout.BOOT_PROGRESS_PORT, power.BOOT_PROGRESS_SIZE)
    hooks = MachineTestDevHooks(m, boot_progress)
    probe_log = testdev.ProbeLog()
    m.mmio_bus.insert(testdev.TestDev(hooks, probe_log), layout.TESTDEV_MMIO_BASE, layout.TESTDEV_MMIO_SIZE)
    m.pio_bus.insert(testdev.PioProbe(probe_log), layout.PIO_PROBE_PORT, layout.PIO_PROBE_SIZE)
    return LegacyDevices(serial, boot_progress)
