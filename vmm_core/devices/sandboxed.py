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
import threading
import time
from typing import TYPE_CHECKING, Any

from ipc_protocol import messages as msg

from ..errors import ConfigError
from ..vcpu import StopReason, StopRequest
from .proxy import DEFAULT_TIMEOUT
from .spawn import DeviceFds, DeviceProcess, DeviceStartError, start_device
from .stats import DeviceCounters, LatencyReservoir, percentile
from .supervisor import Supervisor

if TYPE_CHECKING:
    from ..vm import Machine
    from .manager import Slot

log = logging.getLogger(__name__)

POLICIES = ("restart", "fail", "stop-vm")
CRASH_LOOP_UPTIME = 0.1  # seconds: dying sooner after a (re)start than this counts as a crash loop
# virtio-mmio registers the backend answers itself while a device waits for the guest's reset.
REG_INTERRUPT_STATUS = 0x60
REG_STATUS = 0x70
DEVICE_NEEDS_RESET = 0x40
INT_CONFIG_CHANGE = 0x2


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
        self.causes: collections.deque[str] = collections.deque(maxlen=20)
        self.failure_count = 0
        self.recovery_ms: collections.deque[float] = collections.deque(maxlen=1000)
        self.needs_reset = False
        # Supervisor-thread state: the oldest unanswered heartbeat, and an armed fault.
        self.hb_pending_since: float | None = None
        self.hb_pending_seq = 0
        self.heartbeat_rtt_ms: float | None = None
        self.read_latency = LatencyReservoir()
        self.counters = DeviceCounters()
        self._restart_cond = threading.Condition()
        self.proc: DeviceProcess = self._spawn()
        self.serving_since = time.monotonic()
        self.quick_failures = 0
        self.start_failed = False
        self.proxy = self.proc.make_proxy(timeout=self.timeout, on_failure=self._on_proxy_failure,
                                          spin_us=self.supervisor.options.get("ring_spin_us", 0))
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
                                spin_us=self.supervisor.options.get("ring_spin_us", 0),
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
        # Timed as the vCPU sees it: ring round trip, or the wait for a restart, or a timeout.
        t0 = time.perf_counter_ns()
        try:
            self._read(offset, data)
        finally:
            self.read_latency.add(time.perf_counter_ns() - t0)

    def _read(self, offset: int, data: bytearray) -> None:
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
        exited_by_itself = self.proc.popen.poll() is not None
        self.proc.kill()
        status = self.proc.popen.wait()
        if exited_by_itself:  # our own SIGKILL (e.g. after a heartbeat timeout) says nothing
            cause = self.supervisor.refine_cause(self, cause, status)
        self.causes.append(cause)
        self.failure_count += 1
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
        # Back off only in a crash loop: a process that died within CRASH_LOOP_UPTIME of starting
        # to serve (a request that kills every incarnation, a broken image).  A device that had
        # been serving is restarted at once, however often it is killed.
        if self.start_failed or now - self.serving_since < CRASH_LOOP_UPTIME:
            self.quick_failures += 1
        else:
            self.quick_failures = 0
        if self.quick_failures >= 2:
            backoff = min(0.5, 0.01 * 2 ** (self.quick_failures - 2))
            log.warning("device %s is crash-looping (%d quick failures): backing off %.0f ms",
                        self.name, self.quick_failures, backoff * 1000)
            time.sleep(backoff)
        self.start_failed = False
        try:
            self._replace(activate=True)
        except Exception as e:  # noqa: BLE001 - a failed restart is one more failure
            self.start_failed = True  # a device that cannot even start is crash-looping
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
        self.serving_since = time.monotonic()
        self.hb_pending_since = None
        self.supervisor.watch(self)

    # -- supervisor-thread callbacks ----------------------------------------------------------------
    def heartbeat_acked(self, seq: int) -> None:
        # Answers come in order, so an answer to a later heartbeat covers the earlier ones.
        if self.hb_pending_since is not None and seq >= self.hb_pending_seq:
            if seq == self.hb_pending_seq:
                self.heartbeat_rtt_ms = (time.monotonic() - self.hb_pending_since) * 1000
            self.hb_pending_since = None

    def stats_replied(self, request_id: int, counters: dict[str, int]) -> None:
        self.counters.update(self.generation, request_id, counters)

    # -- reporting ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """One `bulkhead ps` row."""
        return {"name": self.name, "type": self.slot.spec.kind, "mode": "sandboxed",
                "pid": self.pid, "state": "needs-reset" if self.needs_reset else self.state,
                "restarts": self.restarts, "policy": self.policy, "generation": self.generation}

    def stats(self) -> dict[str, Any]:
        """One device in `bulkhead stats` (counters as of the supervisor's last poll)."""
        rec = sorted(self.recovery_ms)
        proxy = self.proxy.stats()
        return {**self.describe(), **self.counters.summary(),
                "failures": self.failure_count, "last_causes": list(self.causes)[-5:],
                "recovery_ms": {"count": len(rec), "p50": _round(percentile(rec, 0.5)),
                                "p99": _round(percentile(rec, 0.99)),
                                "last": _round(self.recovery_ms[-1]) if rec else None},
                "mmio_read_us": self.read_latency.summary_us(),
                "heartbeat_rtt_ms": _round(self.heartbeat_rtt_ms),
                "proxy": proxy}

    def close(self) -> None:
        self.state = "closing"
        self.supervisor.unwatch(self)
        self.proc.shutdown(self.supervisor.control, timeout=1.0)
        self.proc.close()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
