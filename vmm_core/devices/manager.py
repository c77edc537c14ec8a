"""The device manager: virtio-mmio slots, IRQs, ioeventfds and irqfds, and where each device runs.

Each virtio device gets a slot (MMIO base + IRQ, from `layout.virtio_slot`), one irqfd eventfd
registered on its GSI, and one kick eventfd per queue registered as a KVM ioeventfd on its
QueueNotify register with datamatch = queue index.  Kicks and interrupts therefore never pass
through the core.  The device itself runs either in its own process behind a `ProxyDevice`
(the default) or, with `--no-sandbox`, in this process behind the very same Bus.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import layout
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..vm import Machine

log = logging.getLogger(__name__)

# virtio-mmio QueueNotify register offset (VIRTIO 1.2 §4.2.2).
QUEUE_NOTIFY_OFFSET = 0x50

# Queues per device type: the core registers their kick ioeventfds before the device exists.
QUEUE_COUNTS = {"blk": 1, "rng": 1, "console": 2}


@dataclass
class DeviceSpec:
    """What the user asked for: `--disk PATH[,readonly]`, `--rng`, `--console PATH`."""
    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def device_spec(self) -> dict[str, Any]:
        """The `device_procs.virtio.create_device` spec (core-side options removed)."""
        return {"type": self.kind, **{k: v for k, v in self.params.items() if k != "on_crash"}}


def parse_disk(text: str, index: int) -> DeviceSpec:
    path, _, opts = text.partition(",")
    readonly = False
    on_crash = None
    for opt in filter(None, opts.split(",")):
        if opt in ("readonly", "ro"):
            readonly = True
        elif opt.startswith("on-crash="):
            on_crash = opt.split("=", 1)[1]
            if on_crash not in ("restart", "fail", "stop-vm"):
                raise ConfigError(f"--disk {text}: on-crash must be restart, fail or stop-vm")
        else:
            raise ConfigError(f"--disk {text}: unknown option {opt!r} (known: readonly, on-crash=POLICY)")
    if not path:
        raise ConfigError("--disk needs a path: --disk PATH[,readonly]")
    if not os.path.isfile(path):
        raise ConfigError(f"--disk {path}: no such file (create one with `truncate -s 64M {path}`)")
    if not os.access(path, os.R_OK if readonly else os.R_OK | os.W_OK):
        raise ConfigError(f"--disk {path}: permission denied")
    if os.path.getsize(path) < 512:
        raise ConfigError(f"--disk {path}: the image is smaller than one 512-byte sector")
    params = {"path": os.path.abspath(path), "readonly": readonly, "serial": f"bulkhead-blk{index}"}
    if on_crash:
        params["on_crash"] = on_crash
    return DeviceSpec("blk", f"blk{index}", params)


def parse_console(path: str) -> DeviceSpec:
    """`--console PATH` (a file, created or truncated) or `--console stdout` (the terminal)."""
    if path == "stdout":
        # The device process inherits the core's stdout and opens it before entering its jail.
        return DeviceSpec("console", "console0", {"path": "/dev/stdout"})
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--console {path}: directory {parent} does not exist")
    return DeviceSpec("console", "console0", {"path": os.path.abspath(path)})


class DeviceBackend(Protocol):
    """Where a device runs: in this process or in a child process behind a proxy."""
    bus_device: Any

    def start(self) -> None: ...
    def close(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass
class Slot:
    spec: DeviceSpec
    index: int
    base: int
    irq: int
    irqfd: int
    kick_fds: list[int]
    backend: DeviceBackend | None = None

    @property
    def guest_kit_word(self) -> str:
        return f"{self.spec.kind}@{self.base:#x}:{self.irq}"


class InProcessBackend:
    """`--no-sandbox`: the device classes run in the core; a thread turns kicks into
    `queue_notify` and the device signals its irqfd itself, exactly as a device process would."""

    def __init__(self, slot: Slot, machine: "Machine") -> None:
        from device_procs.virtio import MmioDevice, create_device
        self.slot = slot
        device = create_device(slot.spec.device_spec())
        irqfd = slot.irqfd
        self.mmio = MmioDevice(device, machine.memory, lambda: os.eventfd_write(irqfd, 1))
        self.bus_device = self.mmio
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve_kicks, name=f"kicks-{slot.spec.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve_kicks(self) -> None:
        poller = select.poll()
        queue_of = {fd: i for i, fd in enumerate(self.slot.kick_fds)}
        for fd in queue_of:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_r:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                self.mmio.queue_notify(queue_of[fd])

    def describe(self) -> dict[str, Any]:
        return {"name": self.slot.spec.name, "type": self.slot.spec.kind, "mode": "in-process",
                "pid": os.getpid(), "state": "running", "restarts": 0, "policy": "-"}

    def stats(self) -> dict[str, Any]:
        from .stats import DeviceCounters
        counters = DeviceCounters()
        counters.update(1, 0, {k: int(v) for k, v in self.mmio.stats().items()
                               if isinstance(v, (bool, int))})
        return {**self.describe(), **counters.summary(), "failures": 0}

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(2.0)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self.mmio.device.close()


class DeviceManager:
    def __init__(self, machine: "Machine", sandbox: bool = True, options: dict[str, Any] | None = None) -> None:
        self.machine = machine
        self.sandbox = sandbox
        self.options = options or {}
        self.slots: list[Slot] = []
        self.supervisor = None

    def _get_supervisor(self):
        if self.supervisor is None:
            from .supervisor import Supervisor
            self.supervisor = Supervisor(self.machine, self.options)
        return self.supervisor

    def add(self, spec: DeviceSpec) -> Slot:
        if spec.kind not in QUEUE_COUNTS:
            raise ConfigError(f"unknown device type {spec.kind!r}")
        if any(s.spec.name == spec.name for s in self.slots):
            raise ConfigError(f"two devices are named {spec.name}")
        index = len(self.slots)
        try:
            base, irq = layout.virtio_slot(index)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        vm = self.machine.vm
        irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.register_irqfd(irqfd, irq)
        kick_fds = []
        for q in range(QUEUE_COUNTS[spec.kind]):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            vm.register_ioeventfd(fd, base + QUEUE_NOTIFY_OFFSET, 4, datamatch=q)
            kick_fds.append(fd)
        slot = Slot(spec, index, base, irq, irqfd, kick_fds)
        self.slots.append(slot)
        if self.sandbox:
            from .sandboxed import SandboxedBackend
            slot.backend = SandboxedBackend(slot, self.machine, self._get_supervisor())
        else:
            slot.backend = InProcessBackend(slot, self.machine)
        self.machine.mmio_bus.insert(slot.backend.bus_device, base, layout.VIRTIO_MMIO_SLOT_SIZE)
        return slot

    def start(self) -> None:
        for slot in self.slots:
            slot.backend.start()
        if self.supervisor is not None:
            self.supervisor.start()

    def find(self, name: str) -> Slot | None:
        return next((s for s in self.slots if s.spec.name == name), None)

    def guest_kit_arg(self) -> str:
        return ",".join(s.guest_kit_word for s in self.slots)

    def acpi_slots(self) -> list[tuple[int, int, int]]:
        return [(s.base, layout.VIRTIO_MMIO_SLOT_SIZE, s.irq) for s in self.slots]

    def close(self) -> None:
        vm = self.machine.vm
        if self.supervisor is not None:
            self.supervisor.stop()
        for slot in reversed(self.slots):
            try:
                if slot.backend is not None:  # None: its device never started
                    slot.backend.close()
            except Exception:  # noqa: BLE001 - keep tearing down the others
                log.exception("closing device %s", slot.spec.name)
            for q, fd in enumerate(slot.kick_fds):
                try:
                    vm.unregister_ioeventfd(fd, slot.base + QUEUE_NOTIFY_OFFSET, 4, datamatch=q)
                except Exception:  # noqa: BLE001
                    pass
                os.close(fd)
            try:
                vm.unregister_irqfd(slot.irqfd, slot.irq)
            except Exception:  # noqa: BLE001
                pass
            os.close(slot.irqfd)
        self.slots = []
        if self.supervisor is not None:
            self.supervisor.close()
