"""The narrow ports the device layer is given instead of the whole `Machine`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ..bus import Bus
from ..memory import GuestMemory
from ..vcpu import StopRequest


class EventfdRegistrar(Protocol):
    """What the device manager needs of the KVM VM fd (`vmm_core.kvm.Vm`)."""

    def register_irqfd(self, fd: int, gsi: int) -> None: ...
    def unregister_irqfd(self, fd: int, gsi: int) -> None: ...
    def register_ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None) -> None: ...
    def unregister_ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None) -> None: ...


@dataclass(frozen=True)
class VmPorts:
    vm: EventfdRegistrar
    memory: GuestMemory
    mmio_bus: Bus
    runtime_dir: Path
    request_stop: Callable[[StopRequest], None]
    vm_name: str = "vm"
    cgroup: Any = None  # the VM's `VmCgroupMembership` (devices get cgroups below it), or None
