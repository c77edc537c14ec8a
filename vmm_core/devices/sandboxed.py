"""A device in its own process: the `BusDevice` the Bus sees, over its `ProxyDevice`.

In normal operation a register access goes to the proxy (the shared-memory ring to the child).
When the child fails — it exits (pidfd), stops answering, or answers garbage — the supervisor
feeds the device's `Lifecycle`, which applies the policy:

- `restart`: a fresh child gets the same fds (guest memory, irqfd, kick eventfds, host resources:
  the core owns them, so kicks sent meanwhile are still counted in the eventfds) and the
  transport state the proxy shadowed from every register write (`Activate`); the proxy then
  switches to its rings.  The child resumes its queues from the used index in guest memory and
  re-runs requests that were taken but not completed, then kicks and interrupts.  More than
  `max_restarts` failures within `restart_window` seconds turn the policy into `fail`.
- `fail`: the device reads Status with DEVICE_NEEDS_RESET set and raises a configuration-change
  interrupt (VIRTIO 1.2 §2.1.2); the guest's reset (Status = 0) brings a fresh process.
- `stop-vm`: the VM stops with exit status 67 and a message naming the device and the cause.

While a restart is under way a vCPU's read waits for it (bounded by the device timeout); past
that, the guest reads its own Status and an InterruptStatus that sends it back to its rings.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from ipc_protocol import virtio_mmio as regs

from .lifecycle import Lifecycle, State
from .options import DeviceOptions
from .proxy import ProxyDevice
from .resources import DeviceResources
from .spawn import DeviceFds, DeviceProcess, spawn_device
from .spec import DeviceSpec
from .stats import DeviceCounters, LatencyReservoir, percentile
from .untrusted import escape

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

DEVICE_LOG_BUDGET = 20  # log lines per second a device may have the core write


class SandboxedBackend:
    """The Bus's view of one device process (a `BusDevice`)."""

    def __init__(self, spec: DeviceSpec, resources: DeviceResources, memory: "GuestMemory",
                 irqfd: int, kick_fds: list[int], supervisor: "Supervisor",
                 options: DeviceOptions, cgroup: Any = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.kind = spec.device_kind
        self.resources = resources
        self.memory = memory
        self.irqfd = irqfd
        self.kick_fds = kick_fds
        self.supervisor = supervisor
        self.options = options
        self.policy = options.supervision.with_on_crash(spec.on_crash)
        self.ring_spin_us = options.ring_spin_us
        self.timeout = self.policy.device_timeout
        self.lifecycle = Lifecycle(self.name, self.policy)
        # The device's own cgroup (memory limit, CPU quota), below the VM's; its launcher joins
        # it before forking, so every incarnation is born inside.
        self.cgroup = None
        self.jail = options.jail
        if cgroup is not None and options.jail is not None:
            self.cgroup = cgroup.device_cgroup(self.name, options.device_memory_max,
                                               options.device_cpu_quota)
            self.jail = dataclasses.replace(options.jail,
                                            cgroup_procs=tuple(self.cgroup.procs_files()))
        self._oom_kills = 0
        self._limit_hits = 0
        self.proc: DeviceProcess | None = None      # the process serving (or that last served)
        self.pending: DeviceProcess | None = None   # a process in its handshake
        self._proc_generation = 0
        self.proxy = ProxyDevice(self.name, None, queue_max_sizes=self.kind.queue_max_sizes,
                                 timeout=self.timeout, spin_us=self.ring_spin_us,
                                 on_failure=self._on_proxy_failure, device_id=self.kind.virtio_id)
        self.bus_device = self
        self._cond = threading.Condition()
        # Supervisor-thread state: the oldest unanswered heartbeat, message budget, a pending hang.
        self.hb_pending_since: float | None = None
        self.hb_pending_seq = 0
        self.heartbeat_rtt_ms: float | None = None
        self.messages_this_tick = 0
        self.hung = False
        self._log_window = (0.0, 0)
        self.read_latency = LatencyReservoir()
        self.counters = DeviceCounters()

    # -- processes (spawner and supervisor threads) ------------------------------------------------
    def device_spec(self) -> dict[str, Any]:
        return self.spec.device_spec()

    def spawn_process(self, generation: int) -> DeviceProcess:
        """Start incarnation `generation` (runs on the VM's spawner thread)."""
        fds = DeviceFds(guest_memory=self.memory.fd, irqfd=self.irqfd, kicks=self.kick_fds,
                        extra=dict(self.resources.fds))
        return spawn_device(self.name, self.kind.name,
                            control_endpoint=self.supervisor.control.endpoint, fds=fds,
                            generation=generation, allow_faults=self.options.allow_faults,
                            jail=self.jail if self.jail is not None else False,
                            spawn_method=self.supervisor.spawn_method,
                            zygote=self.supervisor.zygote,
                            start_timeout=self.supervisor.policy.start_timeout)

    def attach(self, proc: DeviceProcess, generation: int) -> None:
        """`proc` finished its handshake: it serves from now on."""
        self.pending = None
        self.proc = proc
        self._proc_generation = generation
        self.hb_pending_since = None
        self.hung = False
        self.proxy.attach(proc.rings.core_endpoint(), [proc.pidfd], proc.rings.register_page)

    def memory_killed(self) -> bool:
        """Whether the kernel killed a process of this device for its memory limit since the
        last time we asked (the cgroup's OOM-kill count grew)."""
        if self.cgroup is None:
            return False
        count = self.cgroup.oom_kills()
        grew, self._oom_kills = count > self._oom_kills, count
        return grew

    def at_memory_limit(self) -> bool:
        """Whether this device's allocations met its memory limit since the last time we asked
        (the supervisor asks when a heartbeat goes out, and again if it goes unanswered)."""
        if self.cgroup is None:
            return False
        count = self.cgroup.memory_limit_hits()
        grew, self._limit_hits = count > self._limit_hits, count
        return grew

    def proc_gone(self) -> None:
        """The serving process exited: stop watching its pidfd (it is reaped by the Kill)."""

    def take_processes(self, generation: int | None) -> list[DeviceProcess]:
        """Hand over (for killing) the processes of `generation` (None: all of them)."""
        out = []
        if self.pending is not None and (generation is None or generation == self.lifecycle.generation):
            out.append(self.pending)
            self.pending = None
        if self.proc is not None and (generation is None or generation == self._proc_generation):
            self.proxy.mark_failed("process stopped", notify=False)
            out.append(self.proc)
            self.proc = None
        return out

    def state_changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def enter_needs_reset(self, reason: str) -> None:
        os.eventfd_write(self.irqfd, 1)  # the configuration-change interrupt (§2.1.2)

    def _on_proxy_failure(self, reason: str) -> None:
        from .lifecycle import Died
        self.supervisor.event(self, Died(self._proc_generation, time.monotonic(), reason))

    # -- BusDevice ----------------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        # Timed as the vCPU sees it: ring round trip, or the wait for a restart, or a timeout.
        t0 = time.perf_counter_ns()
        try:
            self._read(offset, data)
        finally:
            self.read_latency.add(time.perf_counter_ns() - t0)

    def _read(self, offset: int, data: bytearray) -> None:
        state = self.lifecycle.state
        if state is State.RUNNING:
            self.proxy.read(offset, data)
            if not self.proxy.failed:
                return
        if state is not State.NEEDS_RESET and self.policy.on_crash == "restart":
            if self._await_restart():
                self.proxy.read(offset, data)  # the fresh process answers, as if nothing happened
                if not self.proxy.failed:
                    return
            # Still restarting: the guest sees its own Status, and InterruptStatus says "used
            # buffers" so the driver re-checks its rings once the new child has resumed them (a
            # spurious interrupt is harmless, §2.7.7).  Everything else reads all-ones, as for
            # any absent device.
            value = {regs.STATUS: self.proxy.shadow.status, regs.INTERRUPT_STATUS: 1}.get(offset)
        elif self.lifecycle.state is State.NEEDS_RESET:
            value = {regs.STATUS: self.proxy.shadow.status | regs.DEVICE_NEEDS_RESET,
                     regs.INTERRUPT_STATUS: regs.INT_CONFIG_CHANGE}.get(offset)
        else:
            value = None
        if value is None or len(data) != 4:
            data[:] = b"\xff" * len(data)
        else:
            data[:] = value.to_bytes(4, "little")

    def _await_restart(self) -> bool:
        """Hold a vCPU's read while the supervisor restarts the device, bounded by the device
        timeout; True if a newer process is serving by then."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while not (self.lifecycle.serving and not self.proxy.failed):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.lifecycle.state in (State.STOPPED, State.NEEDS_RESET,
                                                              State.CLOSING):
                    return False
                self._cond.wait(remaining)
        return True

    def write(self, offset: int, data: bytes) -> None:
        if self.lifecycle.state is State.NEEDS_RESET:
            self.proxy.shadow.record(offset, data)
            if offset == regs.STATUS and len(data) == 4 and int.from_bytes(data, "little") == 0:
                from .lifecycle import GuestReset
                self.supervisor.event(self, GuestReset(time.monotonic()))
            return
        self.proxy.write(offset, data)  # shadowed even while failed: a restart must see it

    # -- supervisor-thread callbacks ----------------------------------------------------------------
    def heartbeat_acked(self, seq: int) -> None:
        # Answers come in order, so an answer to a later heartbeat covers the earlier ones.
        if self.hb_pending_since is not None and seq >= self.hb_pending_seq:
            if seq == self.hb_pending_seq:
                self.heartbeat_rtt_ms = (time.monotonic() - self.hb_pending_since) * 1000
            self.hb_pending_since = None

    def stats_replied(self, request_id: int, counters: dict[str, int]) -> None:
        self.counters.update(self._proc_generation, request_id, counters)

    def device_log(self, level: str, text: str) -> None:
        """A device's own log line: escaped, and at most DEVICE_LOG_BUDGET a second."""
        now = time.monotonic()
        start, count = self._log_window
        if now - start >= 1.0:
            start, count = now, 0
        count += 1
        self._log_window = (start, count)
        if count <= DEVICE_LOG_BUDGET:
            getattr(log, level if level != "debug" else "debug")("device %s: %s", self.name,
                                                                 escape(text))
        elif count == DEVICE_LOG_BUDGET + 1:
            log.warning("device %s: more than %d log lines a second; dropping the rest",
                        self.name, DEVICE_LOG_BUDGET)

    # -- reporting ----------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        proc = self.proc or self.pending
        return proc.pid if proc is not None else 0

    @property
    def generation(self) -> int:
        return self.lifecycle.generation

    @property
    def state(self) -> str:
        return self.lifecycle.display_state

    @property
    def restarts(self) -> int:
        return self.lifecycle.restarts

    def describe(self) -> dict[str, Any]:
        """One `bulkhead ps` row."""
        return {"name": self.name, "type": self.kind.name, "mode": "sandboxed",
                "pid": self.pid, "state": self.state, "restarts": self.restarts,
                "policy": self.policy.on_crash, "generation": self.generation,
                "spawn": self.proc.spawn_method if self.proc is not None else None}

    def stats(self) -> dict[str, Any]:
        """One device in `bulkhead stats` (counters as of the supervisor's last poll)."""
        rec = sorted(self.lifecycle.recovery_ms)
        return {**self.describe(), **self.counters.summary(),
                "failures": self.lifecycle.failure_count,
                "last_causes": list(self.lifecycle.causes)[-5:],
                "recovery_ms": {"count": len(rec), "p50": _round(percentile(rec, 0.5)),
                                "p99": _round(percentile(rec, 0.99)),
                                "last": _round(self.lifecycle.recovery_ms[-1]) if rec else None},
                "mmio_read_us": self.read_latency.summary_us(),
                "heartbeat_rtt_ms": _round(self.heartbeat_rtt_ms),
                "cpu_throttled": self.cgroup.cpu_throttled() if self.cgroup is not None else 0,
                "limits": self.cgroup.limits() if self.cgroup is not None else {},
                "proxy": self.proxy.stats()}

    def start(self) -> None:
        """Nothing to do: the process was started when the device was added."""

    def close(self) -> None:
        self.supervisor.close_backend(self)
        self.state_changed()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
