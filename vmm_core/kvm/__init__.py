"""KVM through cffi: one class per fd (`Kvm`, `Vm`, `Vcpu`) and typed exits."""

from .exits import (Exit, FailEntryExit, HltExit, InternalErrorExit, InterruptedExit, IoExit,
                    MmioExit, OtherExit, ShutdownExit, SystemEventExit)
from .system import Kvm
from .vcpu import Vcpu
from .vm import Vm

__all__ = ["Kvm", "Vm", "Vcpu", "Exit", "IoExit", "MmioExit", "HltExit", "ShutdownExit",
           "SystemEventExit", "FailEntryExit", "InternalErrorExit", "InterruptedExit", "OtherExit"]
