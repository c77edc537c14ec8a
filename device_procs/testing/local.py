"""A device behind its transport in this process, with a driver playing the guest."""

from __future__ import annotations

from device_procs.virtio import MmioDevice, VirtioDevice
from ipc_protocol.guest_memory import GuestMemory

from .driver import VirtioDriver


class LocalHarness:
    """`device` behind an `MmioDevice`, driven by a `VirtioDriver`; counts guest notifications."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, **driver_kw) -> None:
        self.device = device
        self.memory = memory
        self.notifications = 0
        self.mmio = MmioDevice(device, memory, self._notify)
        self.driver = VirtioDriver(self.mmio.read, self.mmio.write, memory, **driver_kw)

    def _notify(self) -> None:
        self.notifications += 1
