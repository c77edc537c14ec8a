"""`--no-sandbox`: the device classes run inside the core.

This is the one module of the core that imports device code (`device_procs`), on purpose: it is
the baseline benchmarks compare the sandbox with, and a debugging aid.  A thread turns kicks into
`queue_notify` and the device signals its irqfd itself, exactly as a device process would; the
host resources are the same fds the core opened for a sandboxed device.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Any

from device_procs.virtio import MmioDevice, create_device
from device_procs.virtio.hostfds import HostFds

from ..memory import GuestMemory
from .resources import DeviceResources
from .spec import DeviceSpec
from .stats import DeviceCounters


class InProcessBackend:
    def __init__(self, spec: DeviceSpec, resources: DeviceResources, memory: GuestMemory,
                 irqfd: int, kick_fds: list[int]) -> None:
        self.spec = spec
        self.name = spec.name
        self.kick_fds = kick_fds
        device = create_device(spec.full_spec(), resources.fds)
        self.mmio = MmioDevice(device, memory, lambda: os.eventfd_write(irqfd, 1))
        self.bus_device = self.mmio
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve_kicks, name=f"kicks-{spec.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve_kicks(self) -> None:
        """Kicks, the device's own host fds and timers: what a device process's loop does."""
        poller = select.poll()
        queue_of = {fd: i for i, fd in enumerate(self.kick_fds)}
        for fd in queue_of:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        host_fds = HostFds(poller)
        while True:
            host_fds.sync(self.mmio.poll_fds())
            for fd, events in poller.poll(host_fds.timeout_ms(self.mmio.next_deadline_ns(), None)):
                if fd == self._stop_r:
                    return
                if host_fds.owns(fd):
                    self.mmio.on_ready(fd, host_fds.to_select(events))
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                self.mmio.queue_notify(queue_of[fd])
            host_fds.fire_timer(self.mmio)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.spec.kind, "mode": "in-process",
                "pid": os.getpid(), "state": "running", "restarts": 0, "policy": "-"}

    def stats(self) -> dict[str, Any]:
        counters = DeviceCounters()
        counters.update(1, 0, {k: int(v) for k, v in self.mmio.stats().items()
                               if isinstance(v, (bool, int))})
        return {**self.describe(), **counters.summary(), "failures": 0}

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(2.0)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self.mmio.device.close()
