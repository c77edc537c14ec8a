"""The device manager: virtio-mmio slots, IRQs, ioeventfds and irqfds, and where each device runs.

Each virtio device gets a slot (MMIO base + IRQ, from `layout.virtio_slot`), one irqfd eventfd
registered on its GSI, and one kick eventfd per queue (the count comes from its kind) registered
as a KVM ioeventfd on its QueueNotify register with datamatch = queue index.  Kicks and
interrupts therefore never pass through the core.  Its host resources are opened once, here,
before anything runs.  The device itself runs either in its own process behind a `ProxyDevice`
(the default) or, with `--no-sandbox`, in this process behind the very same Bus.

What the rest of the core may ask of the devices is the methods below (`ps`, `stats`,
`inject_fault`, `acpi_slots`, ...); nothing reaches inside.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ipc_protocol import virtio_mmio as regs
from ipc_protocol.kinds import KINDS

from .. import layout
from ..errors import BulkheadError, ConfigError
from .options import DeviceOptions
from .ports import VmPorts
from .resources import DeviceResources, open_resources
from .spec import DeviceSpec, derive_defaults, parse_device_arg

log = logging.getLogger(__name__)

START_WAIT = 20.0  # s a VM waits for one device's first process to be serving
STATS_WAIT = 0.5   # s `stats()` waits for fresh counters from the devices
FAULT_WAIT = 2.0


def parse_disk(text: str, index: int) -> DeviceSpec:
    """`--disk TEXT` (kept for callers of the old parser)."""
    return parse_device_arg(KINDS["blk"], text, index)


class DeviceBackend(Protocol):
    """Where a device runs: in this process or in a child process behind a proxy."""
    bus_device: Any

    def start(self) -> None: ...
    def close(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass
class DeviceSlot:
    spec: DeviceSpec
    index: int
    base: int
    irq: int
    irqfd: int
    kick_fds: list[int]
    resources: DeviceResources
    backend: DeviceBackend | None = None

    @property
    def guest_kit_word(self) -> str:
        return f"{self.spec.kind}@{self.base:#x}:{self.irq}"


class DeviceManager:
    def __init__(self, ports: VmPorts, options: DeviceOptions | None = None) -> None:
        self.ports = ports
        self.options = options or DeviceOptions()
        self.slots: list[DeviceSlot] = []
        self.supervisor = None
        if self.options.sandbox:
            from .supervisor import Supervisor
            self.supervisor = Supervisor(ports, self.options)
            try:
                self.supervisor.start()
            except RuntimeError as err:
                self.supervisor.close()
                raise ConfigError(f"cannot start the device supervisor: {err} (is the VM's "
                                  "--cgroup-pids-max too low?)") from None

    @property
    def sandbox(self) -> bool:
        return self.options.sandbox

    def add_all(self, specs: list[DeviceSpec]) -> list[DeviceSlot]:
        """Wire every device and start them all at once; each first process serves before this
        returns.  Their starts overlap (jail set-up and handshake run in the device processes
        and the supervisor thread), so N sandboxed devices cost about one start, not N; the
        first failure in flag order is the one reported."""
        t0 = time.monotonic()
        slots = [self.add(spec, wait=False) for spec in specs]
        for slot in slots:
            if self.supervisor is not None and slot.backend is not None and \
                    slot.spec.frontend_socket is None:
                self._await_first_start(slot.backend)
        if slots:  # benchmarks/startup.py reads this line
            log.info("devices ready: %d in %.1f ms", len(slots), (time.monotonic() - t0) * 1000)
        return slots

    def add(self, spec: DeviceSpec, wait: bool = True) -> DeviceSlot:
        """Wire a device and start it; unless `wait` is false, its first process serves before
        this returns."""
        if spec.kind not in KINDS:
            raise ConfigError(f"unknown device type {spec.kind!r}")
        if any(s.spec.name == spec.name for s in self.slots):
            raise ConfigError(f"two devices are named {spec.name}")
        index = len(self.slots)
        spec = derive_defaults(spec, self.ports.vm_name,
                               sum(1 for s in self.slots if s.spec.kind == spec.kind))
        try:
            base, irq = layout.virtio_slot(index)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        frontend = spec.frontend_socket is not None
        resources = DeviceResources() if frontend else open_resources(spec)
        vm = self.ports.vm
        irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.register_irqfd(irqfd, irq)
        kick_fds = []
        for q in range(spec.queue_count):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            vm.register_ioeventfd(fd, base + regs.QUEUE_NOTIFY, 4, datamatch=q)
            kick_fds.append(fd)
        slot = DeviceSlot(spec, index, base, irq, irqfd, kick_fds, resources)
        self.slots.append(slot)  # from here on, close() releases it whatever happens
        if frontend:
            from .frontend import FrontendBackend  # the backend is the isolated party
            slot.backend = FrontendBackend(spec, self.ports.memory, irqfd, kick_fds)
        elif self.supervisor is not None:
            from .sandboxed import SandboxedBackend
            backend = SandboxedBackend(spec, resources, self.ports.memory, irqfd, kick_fds,
                                       self.supervisor, self.options, self.ports.cgroup)
            slot.backend = backend
            self.supervisor.add(backend)
            if wait:
                self._await_first_start(backend)
        else:
            from .in_process import InProcessBackend  # the one door to device code
            try:
                slot.backend = InProcessBackend(spec, resources, self.ports.memory, irqfd, kick_fds)
            except BulkheadError as e:
                raise ConfigError(str(e)) from None
        self.ports.mmio_bus.insert(slot.backend.bus_device, base, layout.VIRTIO_MMIO_SLOT_SIZE)
        return slot

    @staticmethod
    def _await_first_start(backend: Any) -> None:
        from .lifecycle import State
        with backend._cond:
            backend._cond.wait_for(lambda: backend.lifecycle.state is not State.STARTING, START_WAIT)
        lc = backend.lifecycle
        if lc.initial_error is not None:
            raise ConfigError(lc.initial_error)
        if lc.state is State.STARTING:
            raise ConfigError(f"device {backend.name} did not start within {START_WAIT:.0f} s")

    def start(self) -> None:
        for slot in self.slots:
            if slot.backend is not None:
                slot.backend.start()

    def find(self, name: str) -> DeviceSlot | None:
        return next((s for s in self.slots if s.spec.name == name), None)

    def names(self) -> list[str]:
        return [s.spec.name for s in self.slots]

    def guest_kit_arg(self) -> str:
        return ",".join(s.guest_kit_word for s in self.slots)

    def acpi_slots(self) -> list[tuple[int, int, int]]:
        """(base, size, irq) of each virtio-mmio device, for the DSDT and the kernel cmdline."""
        return [(s.base, layout.VIRTIO_MMIO_SLOT_SIZE, s.irq) for s in self.slots]

    # -- what the control endpoint may ask ---------------------------------------------------------
    def ps(self) -> list[dict[str, Any]]:
        return [s.backend.describe() for s in self.slots if s.backend is not None]

    def stats(self) -> list[dict[str, Any]]:
        """Per-device stats, after asking the device processes for fresh counters."""
        self._refresh_counters()
        return [s.backend.stats() for s in self.slots if s.backend is not None]

    def _refresh_counters(self) -> None:
        sup = self.supervisor
        if sup is None or not sup.is_alive():
            return
        try:
            sent = sup.call(sup.poll_stats).result(STATS_WAIT)
        except Exception:  # noqa: BLE001 - stale counters are better than no answer
            return
        with sup.stats_cond:
            sup.stats_cond.wait_for(
                lambda: all(b.counters.last_request_id == rid or not b.lifecycle.serving
                            for b, rid in sent.items()), STATS_WAIT)

    def inject_fault(self, device: str, action: str, ms: int) -> str:
        """`bulkhead fault`: BulkheadError (one line for the user) when it cannot be done."""
        slot = self.find(device)
        if slot is None:
            raise ConfigError(f"no device {device} (devices: {', '.join(self.names()) or 'none'})")
        if not self.options.allow_faults:
            raise ConfigError("faults are off: start the VM with --allow-faults")
        sup = self.supervisor
        if slot.spec.frontend_socket is not None:
            raise ConfigError(f"device {device} is served by the vhost-user backend on "
                              f"{slot.spec.frontend_socket}: fault that process itself")
        if sup is None:
            raise ConfigError(f"device {device} runs inside the core (--no-sandbox): faults need "
                              "a device process")
        return sup.call(lambda: sup.inject_fault(slot.backend, action, ms)).result(FAULT_WAIT)

    def close(self) -> None:
        vm = self.ports.vm
        for slot in reversed(self.slots):
            try:
                if slot.backend is not None:  # None: its device never started
                    slot.backend.close()
            except Exception:  # noqa: BLE001 - keep tearing down the others
                log.exception("closing device %s", slot.spec.name)
        if self.supervisor is not None:
            self.supervisor.close()
        for slot in reversed(self.slots):
            for q, fd in enumerate(slot.kick_fds):
                try:
                    vm.unregister_ioeventfd(fd, slot.base + regs.QUEUE_NOTIFY, 4, datamatch=q)
                except Exception:  # noqa: BLE001
                    pass
                os.close(fd)
            try:
                vm.unregister_irqfd(slot.irqfd, slot.irq)
            except Exception:  # noqa: BLE001
                pass
            os.close(slot.irqfd)
            slot.resources.close()
        self.slots = []
