"""Legacy PC devices, pure Python `BusDevice`s with no KVM imports.

Everything a device needs from the VM (output streams, IRQ lines, reset/poweroff/exit actions)
arrives as constructor callables, so each device is unit-tested with plain Python.
"""

from .i8042 import I8042
from .power import AcpiPower, BootProgress, DebugExit
from .rtc import Rtc
from .serial import Serial
from .testdev import PioProbe, ProbeLog, TestDev, TestDevHooks

__all__ = ["AcpiPower", "BootProgress", "DebugExit", "I8042", "PioProbe", "ProbeLog", "Rtc",
           "Serial", "TestDev", "TestDevHooks"]
