"""Real device processes without a VM (tests and benchmarks).

`DeviceLab` is what the core gives device processes -- a control server in a private runtime
directory, guest memory, an irqfd and kick eventfds per device -- and starts them exactly as the
core does.  `ProcessHarness` is one device from a lab with a proxy and a driver: it starts a device the way the core does (fresh interpreter, fds by SCM_RIGHTS,
ZeroMQ handshake) and hands back a `ProxyDevice` plus a `VirtioDriver` that plays the guest:
descriptors go into the shared memfd, kicks go to the kick eventfd (what a KVM ioeventfd would
signal), interrupts arrive on the irqfd eventfd (what KVM would inject).
"""

from __future__ import annotations

import os
import select
import shutil
from typing import Any

from ipc_protocol import messages as msg
from ipc_protocol.errors import TransportTimeout

from ipc_protocol.transport.shm_ring import drain_eventfd, make_eventfd
from ipc_protocol.transport.zmq_channel import ControlServer, make_runtime_dir
from ipc_protocol.kinds import KINDS, device_spec_fields
from vmm_core.devices.resources import open_resources
from vmm_core.devices.spec import DeviceSpec
from vmm_core.devices.proxy import ProxyDevice
from vmm_core.devices.spawn import DeviceFds, DeviceProcess, start_device
from vmm_core.memory import GuestMemory, create_guest_memory

from device_procs.testing.driver import VirtioDriver


class DeviceLab:
    """A control server, guest memory and eventfds; starts device processes as the core does."""

    def __init__(self, *, ram_mib: int = 16, tag: str = "lab") -> None:
        self.rundir = make_runtime_dir(tag)
        self.control = ControlServer(self.rundir)
        self.memory = create_guest_memory(ram_mib << 20)
        self.procs: list[DeviceProcess] = []
        self._eventfds: list[int] = []

    def eventfds(self, kind: str) -> tuple[int, list[int]]:
        """A fresh irqfd and one kick eventfd per queue of a `kind` device (closed with the lab)."""
        queues = KINDS[kind].queue_count if kind in KINDS else 1  # a test device: one queue
        irqfd, kicks = make_eventfd(), [make_eventfd() for _ in range(queues)]
        self._eventfds += [irqfd, *kicks]
        return irqfd, kicks

    def start(self, name: str, spec: dict[str, Any], *, irqfd: int | None = None,
              kicks: list[int] | None = None, **spawn_kwargs: Any) -> DeviceProcess:
        """Start `spec` as device `name`; a blk image is opened here and passed as an fd, as the
        core does.  Eventfds are made unless given (a restarted device gets its predecessor's)."""
        if irqfd is None or kicks is None:
            irqfd, kicks = self.eventfds(spec["type"])
        resources = None
        device_spec = dict(spec)
        if spec["type"] in KINDS:  # its host resources, opened here and passed as fds
            params = {k: v for k, v in spec.items() if k != "type"}
            resources = open_resources(DeviceSpec(spec["type"], name, params))
            device_spec = device_spec_fields(spec)
        try:
            proc = start_device(self.control, name, device_spec, self.memory,
                                DeviceFds(self.memory.fd, irqfd, kicks,
                                          dict(resources.fds) if resources else {}),
                                **spawn_kwargs)
        finally:
            if resources is not None:
                resources.close()
        self.procs.append(proc)
        return proc

    def request(self, proc: DeviceProcess, message: msg.Message,
                timeout: float = 2.0) -> msg.Message | None:
        """Send a control message and return the device's answer (None if none came in time)."""
        self.control.send(proc.identity, message)
        try:
            return self.control.recv(timeout, peer=proc.identity)[1]
        except TransportTimeout:
            return None

    def stop(self, proc: DeviceProcess) -> int:
        """Shut one device down (politely, then SIGKILL); its exit status."""
        code = proc.shutdown(self.control, timeout=1.0)
        self.control.forget(proc.identity)
        proc.close()
        self.procs.remove(proc)
        return code

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        self.control.close()
        self.memory.close()
        for fd in self._eventfds:
            os.close(fd)
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> "DeviceLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessHarness:
    """One device process of `spec` (a `create_device` spec) over `ram_mib` of guest memory,
    with a `ProxyDevice` and a `VirtioDriver` that plays the guest through it."""

    def __init__(self, spec: dict[str, Any], name: str | None = None, *, ram_mib: int = 32,
                 timeout: float = 1.0, **spawn_kwargs: Any) -> None:
        self.spec = dict(spec)
        self.name = name or f"{spec['type']}0"
        self.lab = DeviceLab(ram_mib=ram_mib, tag="harness")
        self.memory = self.lab.memory
        self.control = self.lab.control
        self.irqfd, self.kicks = self.lab.eventfds(spec["type"])
        self.failures: list[str] = []
        try:
            self.proc = self.lab.start(self.name, self.spec, irqfd=self.irqfd, kicks=self.kicks,
                                       **spawn_kwargs)
        except BaseException:
            self.lab.close()
            raise
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
        self.lab.close()

    def __enter__(self) -> "ProcessHarness":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
