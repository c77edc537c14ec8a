"""A real device process without a VM: the host-side driver harness (tests and benchmarks).

`ProcessHarness` starts a device the way the core does (fresh interpreter, fds by SCM_RIGHTS,
ZeroMQ handshake) and hands back a `ProxyDevice` plus a `VirtioDriver` that plays the guest:
descriptors go into the shared memfd, kicks go to the kick eventfd (what a KVM ioeventfd would
signal), interrupts arrive on the irqfd eventfd (what KVM would inject).
"""

from __future__ import annotations

import os
import select
import shutil
from typing import Any

from ipc_protocol.transport.shm_ring import drain_eventfd, make_eventfd
from ipc_protocol.transport.zmq_channel import ControlServer, make_runtime_dir
from vmm_core.devices.manager import QUEUE_COUNTS
from vmm_core.devices.proxy import ProxyDevice
from vmm_core.devices.spawn import DeviceFds, DeviceProcess, start_device
from vmm_core.memory import GuestMemory

from .driver import VirtioDriver


class ProcessHarness:
    """One device process of `spec` (a `create_device` spec) over `ram_mib` of guest memory."""

    def __init__(self, spec: dict[str, Any], name: str | None = None, *, ram_mib: int = 32,
                 timeout: float = 1.0, **spawn_kwargs: Any) -> None:
        self.spec = dict(spec)
        self.name = name or f"{spec['type']}0"
        self.rundir = make_runtime_dir("harness")
        self.control = ControlServer(self.rundir)
        self.memory = GuestMemory.create(ram_mib << 20)
        self.irqfd = make_eventfd()
        self.kicks = [make_eventfd() for _ in range(QUEUE_COUNTS[spec["type"]])]
        self.failures: list[str] = []
        extra: dict[str, int] = {}
        disk_fd = -1
        if spec["type"] == "blk":
            disk_fd = os.open(spec["path"], (os.O_RDONLY if spec.get("readonly") else os.O_RDWR) | os.O_CLOEXEC)
            extra["disk"] = disk_fd
        try:
            self.proc: DeviceProcess = start_device(
                self.control, self.name, self.spec, self.memory,
                DeviceFds(self.memory.fd, self.irqfd, self.kicks, extra), **spawn_kwargs)
        except BaseException:
            self._release()
            raise
        finally:
            if disk_fd >= 0:
                os.close(disk_fd)
        self.proxy: ProxyDevice = self.proc.make_proxy(timeout=timeout, on_failure=self.failures.append)
        self.driver = VirtioDriver(self.proxy.read, self.proxy.write, self.memory,
                                   ram_size=(ram_mib - 1) << 20,
                                   kick=lambda index: os.eventfd_write(self.kicks[index], 1))

    def wait_interrupt(self, timeout: float = 2.0) -> bool:
        """True if the device signalled its irqfd within `timeout` seconds (and consume it)."""
        ready = select.select([self.irqfd], [], [], timeout)[0]
        if ready:
            drain_eventfd(self.irqfd)
        return bool(ready)

    @property
    def alive(self) -> bool:
        return self.proc.popen.poll() is None

    def close(self) -> None:
        self.proc.shutdown(self.control, timeout=1.0)
        self.proc.close()
        self._release()

    def _release(self) -> None:
        self.control.close()
        self.memory.close()
        for fd in [self.irqfd, *self.kicks]:
            os.close(fd)
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> "ProcessHarness":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
