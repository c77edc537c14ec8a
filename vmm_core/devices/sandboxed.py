"""Devices in their own processes: the backend on the Bus and the supervisor that restarts them.

`SandboxedBackend` is the `BusDevice` the Bus sees for a sandboxed device.  In normal operation it
forwards to a `ProxyDevice` (shared-memory ring to the child).  When the child fails -- it exits
(pidfd), stops answering, or answers garbage -- the `Supervisor` applies the device's policy:

- `restart`: spawn a fresh child with the same fds (guest memory, irqfd, kick eventfds: the core
  owns them, so kicks sent meanwhile are still counted in the eventfds), replay the transport
  state the proxy shadowed from every register write (`Activate`), and switch the proxy to the
  new rings.  The child resumes its queues from the used index in guest memory and re-runs
  requests that were taken but not completed, then kicks and interrupts.  More than
  `max_restarts` failures within `restart_window` seconds turn the policy into `fail`.
- `fail`: the device reads Status with DEVICE_NEEDS_RESET set and raises a configuration-change
  interrupt (VIRTIO 1.2 §2.1.2); the guest's reset (Status = 0) brings a fresh process.
- `stop-vm`: the VM stops with exit status 67 and a message naming the device and the cause.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from ipc_protocol import messages as msg
from ipc_protocol.transport.zmq_channel import ControlServer, make_runtime_dir

from ..errors import ConfigError
from ..vcpu import StopReason, StopRequest
from .proxy import DEFAULT_TIMEOUT
from .spawn import DeviceFds, DeviceProcess, DeviceStartError, start_device

if TYPE_CHECKING:
    from ..vm import Machine
    from .manager import Slot

log = logging.getLogger(__name__)

POLICIES = ("restart", "fail", "stop-vm")
# virtio-mmio registers the backend answers itself while a device waits for the guest's reset.
REG_INTERRUPT_STATUS = 0x60
REG_STATUS = 0x70
DEVICE_NEEDS_RESET = 0x40
INT_CONFIG_CHANGE = 0x2


def describe_exit(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"killed by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


class SandboxedBackend:
    """The Bus's view of one device process (a `BusDevice`)."""

    def __init__(self, slot: "Slot", machine: "Machine", supervisor: "Supervisor") -> None:
        self.slot = slot
        self.name = slot.spec.name
        self.machine = machine
        self.supervisor = supervisor
        opts = supervisor.options
        self.policy: str = slot.spec.params.get("on_crash") or opts.get("on_device_crash", "restart")
        if self.policy not in POLICIES:
            raise ConfigError(f"--on-device-crash {self.policy}: choose one of {', '.join(POLICIES)}")
        self.timeout: float = opts.get("device_timeout", DEFAULT_TIMEOUT)
        self.generation = 0
        self.state = "starting"
        self.restarts = 0
        self.failures: collections.deque[float] = collections.deque()
        self.causes: list[str] = []
        self.recovery_ms: list[float] = []
        self.needs_reset = False
        self._restart_cond = threading.Condition()
        self.proc: DeviceProcess = self._spawn()
        self.proxy = self.proc.make_proxy(timeout=self.timeout, on_failure=self._on_proxy_failure)
        self.bus_device = self
        self.state = "running"

    # -- process ------------------------------------------------------------------------------
    def _spawn(self) -> DeviceProcess:
        self.generation += 1
        spec = self.slot.spec.device_spec()
        spec.pop("on_crash", None)
        extra: dict[str, int] = {}
        disk_fd = -1
        if spec["type"] == "blk":
            # The core opens the image; the jailed child never sees its path.
            flags = os.O_RDONLY if spec.get("readonly") else os.O_RDWR
            disk_fd = os.open(spec["path"], flags | os.O_CLOEXEC)
            extra["disk"] = disk_fd
        fds = DeviceFds(guest_memory=self.machine.memory.fd, irqfd=self.slot.irqfd,
                        kicks=self.slot.kick_fds, extra=extra)
        try:
            return start_device(self.supervisor.control, self.name, spec, self.machine.memory, fds,
                                generation=self.generation, allow_faults=self.supervisor.allow_faults,
                                **self.supervisor.spawn_options)
        except DeviceStartError as e:
            raise ConfigError(str(e)) from None
        finally:
            if disk_fd >= 0:
                os.close(disk_fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        self.supervisor.watch(self)

    # -- BusDevice ----------------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        if not self.needs_reset:
            self.proxy.read(offset, data)
            if self.proxy.failed and self.policy == "restart" and self._await_restart():
                self.proxy.read(offset, data)  # the fresh process answers, as if nothing happened
            if self.proxy.failed and self.policy == "restart":
                # The child is gone and a restart is under way: the core knows the transport
                # state, so the guest sees its own Status, and InterruptStatus says "used
                # buffers" so the driver re-checks its rings once the new child has resumed them
                # (a spurious interrupt is harmless, VIRTIO 1.2 §2.7.7).  Everything else reads
                # all-ones, as for any absent device.
                if offset == REG_STATUS and len(data) == 4:
                    data[:] = self.proxy.shadow.status.to_bytes(4, "little")
                elif offset == REG_INTERRUPT_STATUS and len(data) == 4:
                    data[:] = (1).to_bytes(4, "little")
            return
        if self.needs_reset:
            value = 0
            if offset == REG_STATUS:
                value = self.proxy.shadow.status | DEVICE_NEEDS_RESET
            elif offset == REG_INTERRUPT_STATUS:
                value = INT_CONFIG_CHANGE
            else:
                data[:] = b"\xff" * len(data)
                return
            data[:] = value.to_bytes(4, "little")[:len(data)].ljust(len(data), b"\0")

    def _await_restart(self) -> bool:
        """Hold a vCPU's read while the supervisor restarts the device, bounded by the device
        timeout; True if a newer process is serving by then."""
        deadline = time.monotonic() + self.timeout
        with self._restart_cond:
            # "running" is set only after the proxy is attached to a fresh process; a read that
            # failed on the old one may arrive here before or after the restart began.
            while not (self.state == "running" and not self.proxy.failed):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.state in ("stopped", "needs-reset", "closing"):
                    return False
                self._restart_cond.wait(remaining)
        return True

    def write(self, offset: int, data: bytes) -> None:
        if self.needs_reset:
            self.proxy.shadow.record(offset, data)
            if offset == REG_STATUS and int.from_bytes(data, "little") == 0:
                self.supervisor.request(self, "guest reset after failure", reset=True)
            return
        self.proxy.write(offset, data)

    # -- failure ------------------------------------------------------------------------------
    def _on_proxy_failure(self, reason: str) -> None:
        self.supervisor.request(self, reason)

    def handle_failure(self, cause: str, reset: bool = False, generation: int | None = None) -> None:
        """Runs on the supervisor thread only.  A report about an earlier generation (the pidfd
        of a process already replaced) is stale and ignored."""
        if generation is not None and generation != self.generation:
            return
        t0 = time.monotonic()
        if reset:
            self._replace(activate=False)
            self.needs_reset = False
            self.state = "running"
            log.warning("device %s: fresh process after the guest's reset (pid %d)", self.name, self.pid)
            return
        if self.state in ("stopped", "closing"):
            return
        with self._restart_cond:
            self.state = "restarting"
        self.proxy.mark_failed(cause)
        self.proc.kill()
        status = self.proc.popen.wait()
        cause = self.supervisor.refine_cause(self, cause, status)
        self.causes.append(cause)
        log.error("device %s stopped: %s", self.name, cause)
        now = time.monotonic()
        self.failures.append(now)
        window = self.supervisor.options.get("restart_window", 30.0)
        while self.failures and now - self.failures[0] > window:
            self.failures.popleft()
        policy = self.policy
        limit = self.supervisor.options.get("max_restarts", 100)
        if policy == "restart" and len(self.failures) > limit:
            log.error("device %s failed %d times in %.0f s: giving up restarts, the device "
                      "now reports DEVICE_NEEDS_RESET", self.name, len(self.failures), window)
            policy = "fail"
        if policy == "stop-vm":
            with self._restart_cond:
                self.state = "stopped"
                self._restart_cond.notify_all()
            self.machine.request_stop(StopRequest(StopReason.DEVICE_FAILED, f"device {self.name} failed: {cause}"))
            return
        if policy == "fail":
            with self._restart_cond:
                self.state = "needs-reset"
                self._restart_cond.notify_all()
            self.needs_reset = True
            os.eventfd_write(self.slot.irqfd, 1)  # the configuration-change interrupt
            return
        backoff = min(0.5, 0.01 * (2 ** max(0, len(self.failures) - 3)))
        if len(self.failures) > 3:
            time.sleep(backoff)
        try:
            self._replace(activate=True)
        except Exception as e:  # noqa: BLE001 - a failed restart is one more failure
            log.error("device %s: restart failed: %s", self.name, e)
            self.supervisor.request(self, f"restart failed: {e}")
            return
        self.restarts += 1
        self.recovery_ms.append((time.monotonic() - t0) * 1000)
        with self._restart_cond:
            self.state = "running"
            self._restart_cond.notify_all()
        log.warning("device %s restarted as pid %d in %.1f ms (restart %d)", self.name, self.pid,
                     self.recovery_ms[-1], self.restarts)

    def _replace(self, activate: bool) -> None:
        old = self.proc
        if old.popen.poll() is None:
            old.kill()
            old.popen.wait()
        self.supervisor.control.forget(old.identity)
        self.supervisor.unwatch(self)
        old.close()
        self.proc = self._spawn()
        if activate:
            request_id = self.proc.next_request_id()
            self.supervisor.control.send(self.proc.identity, self.proxy.shadow.to_activate(request_id))
            reply = self.proc._await(self.supervisor.control, time.monotonic() + 5.0, "Ack")
            if not isinstance(reply, msg.Ack) or reply.request_id != request_id:
                raise DeviceStartError(f"device {self.name}: expected Ack to Activate, got {reply!r}")
        else:
            self.proxy.shadow.record(REG_STATUS, b"\0\0\0\0")
        self.proxy.attach(self.proc.rings.core_endpoint(), [self.proc.pidfd])
        self.supervisor.watch(self)

    # -- reporting ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        rec = sorted(self.recovery_ms)
        return {
            "name": self.name, "type": self.slot.spec.kind, "mode": "sandboxed", "pid": self.pid,
            "state": self.state, "policy": self.policy, "restarts": self.restarts,
            "generation": self.generation, "causes": self.causes[-10:],
            "recovery_ms_p50": rec[len(rec) // 2] if rec else None,
            "recovery_ms_p99": rec[min(len(rec) - 1, int(len(rec) * 0.99))] if rec else None,
            "proxy": self.proxy.stats(),
        }

    def close(self) -> None:
        self.state = "closing"
        self.supervisor.unwatch(self)
        self.proc.shutdown(self.supervisor.control, timeout=1.0)
        self.proc.close()


class Supervisor(threading.Thread):
    """One thread per VM: watches device pidfds and runs every restart.

    Restarts happen here, never on a vCPU thread: a vCPU only learns its read failed (all-ones)
    and goes on.  This thread lives as long as the VM, so PR_SET_PDEATHSIG in the children (which
    fires when the *spawning thread* exits) means "when the VM goes".
    """

    def __init__(self, machine: "Machine", options: dict[str, Any]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.machine = machine
        self.options = options
        self.allow_faults = bool(options.get("allow_faults"))
        self.spawn_options: dict[str, Any] = dict(options.get("spawn_options", {}))
        name = machine.config.name or f"vm{os.getpid()}"
        self.runtime_dir = make_runtime_dir(name)
        self.control = ControlServer(self.runtime_dir)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._requests: collections.deque[tuple[SandboxedBackend, str, bool, int]] = collections.deque()
        self._watched: dict[int, SandboxedBackend] = {}
        self._stopping = False

    def watch(self, backend: SandboxedBackend) -> None:
        with self._lock:
            self._watched[backend.proc.pidfd] = backend
        os.eventfd_write(self._wake, 1)

    def unwatch(self, backend: SandboxedBackend) -> None:
        with self._lock:
            for fd, b in list(self._watched.items()):
                if b is backend:
                    del self._watched[fd]

    def request(self, backend: SandboxedBackend, cause: str, reset: bool = False) -> None:
        with self._lock:
            self._requests.append((backend, cause, reset, backend.generation))
        os.eventfd_write(self._wake, 1)

    def refine_cause(self, backend: SandboxedBackend, cause: str, status: int) -> str:
        """Prefer what the child said about itself (e.g. a seccomp report) over our guess."""
        report = getattr(backend.proc, "seccomp_report", None)
        if report:
            return f"seccomp violation: {report}"
        exit_text = describe_exit(status)
        return cause if exit_text in cause else f"{cause} ({exit_text})"

    def run(self) -> None:
        while not self._stopping:
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            with self._lock:
                watched = dict(self._watched)
            for fd in watched:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(1000):
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                elif fd in watched:
                    b = watched[fd]
                    self.unwatch(b)
                    with self._lock:
                        self._requests.append((b, f"process {b.pid} {describe_exit(b.proc.popen.poll())}",
                                               False, b.generation))
            while True:
                with self._lock:
                    if not self._requests:
                        break
                    backend, cause, reset, generation = self._requests.popleft()
                if self._stopping:
                    break
                try:
                    backend.handle_failure(cause, reset=reset, generation=generation)
                except Exception:  # noqa: BLE001 - the supervisor must outlive any one device
                    log.exception("supervising device %s", backend.name)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self.is_alive():
            self.join(5.0)

    def close(self) -> None:
        self.stop()
        self.control.close()
        os.close(self._wake)
        try:
            for p in self.runtime_dir.iterdir():
                p.unlink()
            self.runtime_dir.rmdir()
        except OSError:
            pass
