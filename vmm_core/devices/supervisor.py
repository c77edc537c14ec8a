"""The Supervisor: one thread per VM that owns every receive on the device control socket.

It watches each device's pidfd (exit), sends a `Heartbeat` every `heartbeat_interval` and fails a
device whose oldest unanswered heartbeat is older than `heartbeat_timeout` -- so a hung device is
caught even when the guest never touches its registers -- polls device counters, runs every
restart (`SandboxedBackend.handle_failure`) and carries out the faults and stats queries other
threads ask for through `call()`.

Why one thread: ZeroMQ sockets are not thread-safe and `ControlServer` buffers messages per peer,
so exactly one thread may receive.  Restarts run here, never on a vCPU thread: a vCPU only learns
its read failed (all-ones, or it waits for the restart bounded by the device timeout).  This
thread lives as long as the VM, so PR_SET_PDEATHSIG in the children (which fires when the
*spawning thread* exits) means "when the VM goes".
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

import zmq

from ipc_protocol import messages as msg
from ipc_protocol.errors import LocalProtocolError, ProtocolError, TransportTimeout
from ipc_protocol.transport.zmq_channel import ControlServer, PeerProtocolError

from ..errors import BulkheadError
from .spawn import vm_zygote

if TYPE_CHECKING:
    from ..vm import Machine
    from .sandboxed import SandboxedBackend

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 0.25
DEFAULT_HEARTBEAT_TIMEOUT = 0.5
STATS_EVERY_TICKS = 4  # device counters polled about once a second (they die with a process)


class FaultRefused(BulkheadError):
    """The fault cannot be injected now (device restarting, or the fault kind is unsupported)."""


def describe_exit(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"killed by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


class Supervisor(threading.Thread):
    def __init__(self, machine: "Machine", options: dict[str, Any]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.machine = machine
        self.options = options
        self.allow_faults = bool(options.get("allow_faults"))
        self.spawn_options: dict[str, Any] = dict(options.get("spawn_options", {}))
        self.heartbeat_interval: float = options.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
        self.heartbeat_timeout: float = options.get("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT)
        self.runtime_dir = machine.runtime_dir
        # The VM's device zygote: started here, on the thread building the VM (inside its cgroup)
        # and before this VM opens its ZeroMQ socket.  It is a fresh interpreter, never a fork.
        self.zygote = vm_zygote(self.spawn_options)
        self.control = ControlServer(self.runtime_dir)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._requests: collections.deque[tuple["SandboxedBackend", str, bool, int]] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._watched: dict[int, "SandboxedBackend"] = {}
        self.backends: list["SandboxedBackend"] = []
        self.stats_cond = threading.Condition()
        self._hb_seq = 0
        self._ticks = 0
        self._last_tick = time.monotonic()
        self._stopping = False

    # -- registration (any thread) ----------------------------------------------------------------
    def watch(self, backend: "SandboxedBackend") -> None:
        with self._lock:
            self._watched[backend.proc.pidfd] = backend
            if backend not in self.backends:
                self.backends.append(backend)
        os.eventfd_write(self._wake, 1)

    def unwatch(self, backend: "SandboxedBackend") -> None:
        with self._lock:
            for fd, b in list(self._watched.items()):
                if b is backend:
                    del self._watched[fd]

    def request(self, backend: "SandboxedBackend", cause: str, reset: bool = False) -> None:
        """Report a failure of `backend`'s current process; the restart runs on this thread."""
        with self._lock:
            self._requests.append((backend, cause, reset, backend.generation))
        os.eventfd_write(self._wake, 1)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the supervisor thread (device control sends belong there too)."""
        fut: Future = Future()
        with self._lock:
            self._calls.append((fn, fut))
        os.eventfd_write(self._wake, 1)
        return fut

    def refine_cause(self, backend: "SandboxedBackend", cause: str, status: int) -> str:
        """Prefer what the child said about itself (e.g. a seccomp report) over our guess."""
        report = getattr(backend.proc, "seccomp_report", None)
        if report:
            return f"seccomp violation: {report}"
        exit_text = describe_exit(status)
        return cause if exit_text in cause else f"{cause} ({exit_text})"

    # -- faults and stats (supervisor thread, through call()) --------------------------------------
    def inject_fault(self, backend: "SandboxedBackend", action: str, ms: int) -> str:
        if backend.state != "running" or backend.needs_reset:
            raise FaultRefused(f"device {backend.name} is {backend.state}: try again when it runs")
        if action == "kill":
            pid = backend.pid
            backend.proc.kill()
            return f"sent SIGKILL to {backend.name} (pid {pid})"
        kind, args = {"hang": ("hang", {}), "slow": ("stall_ms", {"ms": ms}),
                      "crash-in-request": ("crash_in_request", {}),
                      "bad-reply": ("garbage_response", {}),
                      "seccomp": ("syscall", {"name": "socket"})}[action]
        try:
            fault = msg.Fault(kind, args)
        except LocalProtocolError:
            raise FaultRefused(f"fault {action}: the device protocol has no {kind!r} fault kind "
                               "yet (it comes with the jail)") from None
        self.control.send(backend.proc.identity, fault)
        return f"sent {action} to {backend.name} (pid {backend.pid})"

    def poll_stats(self) -> dict["SandboxedBackend", int]:
        """Ask every running device for its counters; {backend: request id} to wait for."""
        sent = {}
        for b in list(self.backends):
            if b.state == "running" and not b.needs_reset:
                request_id = b.proc.next_request_id()
                try:
                    self.control.send(b.proc.identity, msg.Stats(request_id))
                except ProtocolError:
                    continue
                sent[b] = request_id
        return sent

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        next_tick = time.monotonic() + self.heartbeat_interval
        while not self._stopping:
            poller = zmq.Poller()
            poller.register(self._wake, zmq.POLLIN)
            poller.register(self.control.socket, zmq.POLLIN)
            with self._lock:
                watched = dict(self._watched)
            for fd in watched:
                poller.register(fd, zmq.POLLIN)
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            for fd, _ in poller.poll(timeout_ms):
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
            self._drain_control()
            self._run_calls()
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self.heartbeat_interval
            self._run_requests()

    def _by_identity(self) -> dict[bytes, "SandboxedBackend"]:
        return {b.proc.identity: b for b in self.backends}

    def _drain_control(self) -> None:
        """Every message waiting on the control socket (and in its per-peer inbox)."""
        peers = self._by_identity()
        while True:
            try:
                peer, m = self.control.recv(0)
            except TransportTimeout:
                return
            except PeerProtocolError as err:
                b = peers.get(err.peer)
                if b is not None:
                    self.request(b, f"invalid control message: {err}")
                continue
            except ProtocolError as err:
                log.warning("control socket: %s", err)
                continue
            b = peers.get(peer)
            if b is None:
                continue  # a late message from a replaced incarnation
            if isinstance(m, msg.HeartbeatAck):
                b.heartbeat_acked(m.seq)
            elif isinstance(m, msg.StatsReply):
                with self.stats_cond:
                    b.stats_replied(m.request_id, m.counters)
                    self.stats_cond.notify_all()
            elif isinstance(m, msg.ErrorReport):
                log.warning("device %s reports %s: %s", b.name, m.code, m.text)
            else:
                log.warning("device %s sent an unexpected %s", b.name, m.TAG)

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                fut.set_exception(err)

    def _tick(self) -> None:
        now = time.monotonic()
        # If this thread itself was held up (a restart, a starved host), the devices were not
        # silent: don't blame them for our delay, start their clocks again.
        self_late = now - self._last_tick > self.heartbeat_interval + self.heartbeat_timeout
        self._last_tick = now
        self._ticks += 1
        for b in list(self.backends):
            if b.state != "running" or b.needs_reset:
                b.hb_pending_since = None
                continue
            if b.hb_pending_since is not None:
                silent = now - b.hb_pending_since
                if self_late:
                    b.hb_pending_since = now
                elif silent > self.heartbeat_timeout:
                    b.hb_pending_since = None
                    self.request(b, f"heartbeat timeout (silent for {silent * 1000:.0f} ms)")
                    continue
            self._hb_seq += 1
            try:
                self.control.send(b.proc.identity, msg.Heartbeat(self._hb_seq))
            except ProtocolError:
                pass  # not connected yet, or gone: its clock keeps running either way
            if b.hb_pending_since is None:
                b.hb_pending_since, b.hb_pending_seq = now, self._hb_seq
        if self._ticks % STATS_EVERY_TICKS == 0:
            self.poll_stats()

    def _run_requests(self) -> None:
        while True:
            with self._lock:
                if not self._requests or self._stopping:
                    return
                backend, cause, reset, generation = self._requests.popleft()
            try:
                backend.handle_failure(cause, reset=reset, generation=generation)
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one device
                log.exception("supervising device %s", backend.name)

    # -- teardown ----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self.is_alive():
            self.join(5.0)
        with self._lock:
            calls, self._calls = list(self._calls), collections.deque()
        for _, fut in calls:
            fut.cancel()

    def close(self) -> None:
        self.stop()
        self.control.close()
        os.close(self._wake)
        if self.zygote is not None:
            self.zygote.close()
