"""The Supervisor: one thread per VM that owns every device process and every receive on their
control socket, and carries out each device's `Lifecycle` actions.

What it watches: each process's pidfd (exit), the control socket (handshakes, heartbeat answers,
counters, logs), the proxies' failure reports, the clock (heartbeats every `heartbeat_interval`;
a device whose oldest unanswered heartbeat is older than `heartbeat_timeout` is failed, so a hung
device is caught even when the guest never touches its registers; crash-loop back-offs).

It never blocks on a device: a spawn runs on one of the VM's spawner threads and comes back as an event;
the Hello -> Configure -> Ready (-> Activate -> Ack) handshake is a sequence of messages this
loop answers as they arrive, each bounded by a deadline.  pidfds are looked at before messages,
and each device may send at most `MESSAGE_BUDGET` messages per heartbeat interval: a device
flooding its channel (even with valid answers) is failed instead of pinning this thread.

Why one thread: ZeroMQ sockets are not thread-safe and `ControlServer` buffers messages per peer,
so exactly one thread may receive.  The spawner threads live as long as the VM, so
PR_SET_PDEATHSIG in the launchers (which fires when the *spawning thread* exits) means "when the
VM goes".
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import zmq

from ipc_protocol import messages as msg
from ipc_protocol.errors import LocalProtocolError, ProtocolError, TransportTimeout
from ipc_protocol.transport.zmq_channel import ControlServer, PeerProtocolError

from ..errors import BulkheadError
from ..vcpu import StopReason, StopRequest
from . import lifecycle as lc
from .options import DeviceOptions
from .spawn import DeviceProcess, DeviceStartError, routing_identity
from .untrusted import escape
from .zygote import Zygote, ZygoteError, take_prestarted

if TYPE_CHECKING:
    from .ports import VmPorts
    from .sandboxed import SandboxedBackend

log = logging.getLogger(__name__)

STATS_EVERY_TICKS = 4      # device counters polled about once a second (they die with a process)
MESSAGE_BUDGET = 256       # messages one device may send per heartbeat interval
DRAIN_BATCH = 512          # messages handled per loop turn before pidfds and timers again
EARLY_LIMIT = 16           # messages kept from a device whose spawn has not come back yet
KILL_WAIT = 2.0            # s to wait for a SIGKILLed device's launcher to report and exit


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


@dataclass
class Handshake:
    """A process of `generation` on its way to serving: which message it owes us next."""

    backend: "SandboxedBackend"
    generation: int
    proc: DeviceProcess
    activate: bool
    deadline: float
    phase: str = "Hello"      # Hello -> Ready -> (Ack to Activate)
    request_id: int = 0


class Spawner:
    """The VM's long-lived threads that start device processes (see the module docstring).

    A spawn waits for the new launcher to report its device's pid (~15-20 ms, mostly in the
    child processes), so `THREADS` of them let a VM's devices start side by side rather than
    one after another; jobs for one device never overlap (its next spawn is submitted only
    after the last one came back)."""

    THREADS = 4

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"device-spawner-{i}", daemon=True)
                         for i in range(self.THREADS)]

    def start(self) -> None:
        """Start the threads; RuntimeError (the pids limit) if one cannot be, none left running."""
        started = []
        try:
            for t in self._threads:
                t.start()
                started.append(t)
        except RuntimeError:
            for _ in started:
                self._jobs.put(None)
            raise

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - a job reports its own failure; never die here
                log.exception("device spawn job failed")

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + 15.0
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))


class Supervisor(threading.Thread):
    def __init__(self, ports: "VmPorts", options: DeviceOptions) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.ports = ports
        self.options = options
        self.policy = options.supervision
        self.allow_faults = options.allow_faults
        # The VM's device zygote: prestarted by `bulkhead run` (then moved into the VM's cgroup
        # here) or started here, on the thread building the VM (inside its cgroup), before this
        # VM opens its ZeroMQ socket.  It is a fresh interpreter, never a fork.
        self.zygote: Zygote | None = None
        self.spawn_method = options.spawn_method if options.jail is not None else "exec"
        if self.spawn_method == "zygote":
            self.zygote = take_prestarted()
            if self.zygote is not None and ports.cgroup is not None and self.zygote.pid is not None:
                ports.cgroup.adopt(self.zygote.pid)
            if self.zygote is None:
                try:
                    self.zygote = Zygote()
                except ZygoteError as err:
                    log.warning("%s: devices start as fresh interpreters", err)
                    self.spawn_method = "exec"
        self.control = ControlServer(ports.runtime_dir)
        self.spawner = Spawner()
        try:
            self.spawner.start()
        except RuntimeError as err:  # can't start new thread: the pids limit
            self.control.close()
            if self.zygote is not None:
                self.zygote.close()
            raise BulkheadError(f"cannot start the device supervisor: {err} (is the VM's "
                                "--cgroup-pids-max too low?)") from None
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self.backends: list["SandboxedBackend"] = []
        self._handshakes: dict[bytes, Handshake] = {}
        # A device may say Hello before its spawn job comes back to this thread (the job
        # posts, the control socket may wake us first): kept here until `_spawned`.
        self._early: dict[bytes, list[msg.Message]] = {}
        self.stats_cond = threading.Condition()
        self._hb_seq = 0
        self._ticks = 0
        self._last_tick = time.monotonic()
        self._stopping = False

    # -- any thread ---------------------------------------------------------------------------
    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the supervisor thread."""
        with self._lock:
            self._posted.append(fn)
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # closed: the VM is going

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the supervisor thread; its result (or exception) in a Future."""
        fut: Future = Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as err:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(err)

        self.post(run)
        return fut

    def event(self, backend: "SandboxedBackend", ev: lc.Event) -> None:
        """Feed `backend`'s lifecycle from any thread (the proxy's failures, a guest reset)."""
        self.post(lambda: self.handle(backend, ev))

    def add(self, backend: "SandboxedBackend") -> None:
        with self._lock:
            self.backends.append(backend)
        self.post(lambda: self._execute(backend, backend.lifecycle.start()))

    # -- lifecycle actions (supervisor thread) -----------------------------------------------------
    def handle(self, backend: "SandboxedBackend", ev: lc.Event) -> None:
        self._execute(backend, backend.lifecycle.handle(ev))

    def _execute(self, backend: "SandboxedBackend", actions: list[lc.Action]) -> None:
        for a in actions:
            if isinstance(a, lc.Kill):
                self._kill(backend, a.generation)
            elif isinstance(a, lc.Spawn):
                self._spawn(backend, a.generation, a.activate)
            elif isinstance(a, lc.FailDevice):
                backend.enter_needs_reset(a.reason)
            elif isinstance(a, lc.StopVm):
                self.ports.request_stop(StopRequest(StopReason.DEVICE_FAILED, a.message))
            elif isinstance(a, lc.Log):
                getattr(log, a.level)("%s", a.text)
            elif isinstance(a, lc.Restarted):
                log.warning("device %s restarted as pid %d in %.1f ms (restart %d)", backend.name,
                            backend.pid, a.ms, a.count)
        backend.state_changed()

    def _spawn(self, backend: "SandboxedBackend", generation: int, activate: bool) -> None:
        self._early[routing_identity(backend.name, generation)] = []

        def job() -> None:
            try:
                proc: DeviceProcess | BaseException = backend.spawn_process(generation)
            except BaseException as err:  # noqa: BLE001 - comes back as an event
                proc = err
            self.post(lambda: self._spawned(backend, generation, activate, proc))
        self.spawner.submit(job)

    def _spawned(self, backend: "SandboxedBackend", generation: int, activate: bool,
                 proc: DeviceProcess | BaseException) -> None:
        now = time.monotonic()
        early = self._early.pop(routing_identity(backend.name, generation), [])
        if isinstance(proc, BaseException):
            text = str(proc) if isinstance(proc, BulkheadError) else f"{type(proc).__name__}: {proc}"
            self.handle(backend, lc.StartFailed(generation, now, text))
            return
        if generation != backend.lifecycle.generation or self._stopping \
                or backend.lifecycle.state is lc.State.CLOSING:
            self._discard(proc)
            return
        backend.pending = proc
        hs = Handshake(backend, generation, proc, activate, now + self.policy.start_timeout)
        self._handshakes[proc.identity] = hs
        for m in early:  # what it said before we knew it (its Hello, a log line)
            if self._handshakes.get(proc.identity) is hs:
                self._handshake_step(hs, m)

    def _complete(self, hs: Handshake) -> None:
        del self._handshakes[hs.proc.identity]
        hs.backend.attach(hs.proc, hs.generation)
        self.handle(hs.backend, lc.Started(hs.generation, time.monotonic()))

    def _abort_handshake(self, hs: Handshake, error: str) -> None:
        self._handshakes.pop(hs.proc.identity, None)
        self.handle(hs.backend, lc.StartFailed(hs.generation, time.monotonic(), error))

    def _kill(self, backend: "SandboxedBackend", generation: int) -> None:
        for hs in [h for h in self._handshakes.values() if h.backend is backend
                   and h.generation == generation]:
            del self._handshakes[hs.proc.identity]
        for proc in backend.take_processes(generation):
            self._discard(proc)

    def _discard(self, proc: DeviceProcess) -> None:
        """SIGKILL (through its pidfd), reap, forget: a process we are done with."""
        proc.kill()
        try:
            proc.popen.wait(KILL_WAIT)
        except Exception:  # noqa: BLE001 - a launcher that will not die is reaped at close
            log.warning("device %s (pid %d) did not exit after SIGKILL", proc.name, proc.pid)
        self.control.forget(proc.identity)
        proc.close()

    def cause_of_exit(self, proc: DeviceProcess, memory_killed: bool = False) -> str:
        """The core's own account of a process's end: from its exit status, as the kernel (through
        the launcher outside the jail) reported it; a seccomp report is believed only from a
        process SIGSYS killed."""
        status = proc.popen.poll()
        report = proc.seccomp_report
        if report:
            return f"seccomp violation: {report}"
        if memory_killed:
            limit = self.options.device_memory_max
            return f"memory limit ({limit >> 20 if limit else '?'} MiB): process {proc.pid} " \
                   f"{describe_exit(status)}"
        return f"process {proc.pid} {describe_exit(status)}"

    def _silence_cause(self, backend: "SandboxedBackend", silent: float) -> str:
        """Why a device stopped answering heartbeats, as far as the core can tell: a device
        stalled in reclaim at its memory limit (or killed for it meanwhile) is named for the
        limit, not for the silence that followed."""
        heard = f"silent for {silent * 1000:.0f} ms"
        if backend.memory_killed() or backend.at_memory_limit():
            limit = self.options.device_memory_max
            return f"memory limit ({limit >> 20 if limit else '?'} MiB): {heard} at its limit"
        return f"heartbeat timeout ({heard})"

    # -- faults and stats (supervisor thread, through call()) --------------------------------------
    def inject_fault(self, backend: "SandboxedBackend", action: str, ms: int) -> str:
        if not backend.lifecycle.serving or backend.proc is None:
            raise FaultRefused(f"device {backend.name} is {backend.lifecycle.display_state}: "
                               "try again when it runs")
        if backend.hung:
            raise FaultRefused(f"device {backend.name} is hung already (a fault is pending): "
                               "wait for its restart")
        proc = backend.proc
        if action == "kill":
            proc.kill()
            return f"sent SIGKILL to {backend.name} (pid {proc.pid})"
        kind, args = {"hang": ("hang", {}), "slow": ("stall_ms", {"ms": ms}),
                      "crash-in-request": ("crash_in_request", {}),
                      "bad-reply": ("garbage_response", {}),
                      "seccomp": ("syscall", {"name": "socket"}),
                      "flood-acks": ("flood_acks", {"count": 50_000}),
                      "flood-frames": ("flood_frames", {"mib": 512}),
                      "fill-doorbell": ("fill_doorbell", {}),
                      "grow-memory": ("grow_memory", {}),
                      "spin": ("spin", {"ms": ms or 1000})}[action]
        try:
            fault = msg.Fault(kind, args)
        except LocalProtocolError:
            raise FaultRefused(f"fault {action}: the device protocol has no {kind!r} fault kind") \
                from None
        self.control.send(proc.identity, fault)
        if action == "hang":
            backend.hung = True
        return f"sent {action} to {backend.name} (pid {proc.pid})"

    def poll_stats(self) -> dict["SandboxedBackend", int]:
        """Ask every running device for its counters; {backend: request id} to wait for."""
        sent = {}
        for b in list(self.backends):
            if b.lifecycle.serving and b.proc is not None:
                request_id = b.proc.next_request_id()
                try:
                    self.control.send(b.proc.identity, msg.Stats(request_id))
                except ProtocolError:
                    continue
                sent[b] = request_id
        return sent

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        next_tick = time.monotonic() + self.policy.heartbeat_interval
        while not self._stopping:
            watched = self._watched()
            poller = zmq.Poller()
            poller.register(self._wake, zmq.POLLIN)
            poller.register(self.control.socket, zmq.POLLIN)
            for fd in watched:
                poller.register(fd, zmq.POLLIN)
            wait = next_tick
            for d in (b.lifecycle.next_deadline() for b in self.backends):
                if d is not None:
                    wait = min(wait, d)
            for hs in self._handshakes.values():
                wait = min(wait, hs.deadline)
            ready = {fd for fd, _ in poller.poll(max(0, int((wait - time.monotonic()) * 1000)))}
            if self._wake in ready:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            for fd in ready & set(watched):  # exits first: a flood cannot hide a death
                self._exited(*watched[fd])
            self._drain_control()
            self._run_posted()
            now = time.monotonic()
            for b in list(self.backends):
                self._execute(b, b.lifecycle.handle(lc.Tick(now)))
            for hs in [h for h in self._handshakes.values() if now >= h.deadline]:
                self._abort_handshake(hs, f"device {hs.proc.name} sent no {hs.phase} within "
                                        f"{self.policy.start_timeout:g} s (a loaded host may need a "
                                        "longer --device-start-timeout)")
            if now >= next_tick:
                self._tick(now)
                next_tick = time.monotonic() + self.policy.heartbeat_interval

    def _watched(self) -> dict[int, tuple["SandboxedBackend", DeviceProcess]]:
        out = {}
        for b in self.backends:
            for proc in (b.proc, b.pending):
                if proc is not None and proc.pidfd >= 0:
                    out[proc.pidfd] = (b, proc)
        return out

    def _exited(self, backend: "SandboxedBackend", proc: DeviceProcess) -> None:
        hs = self._handshakes.get(proc.identity)
        if hs is not None:
            # Its last word (an ErrorReport sent just before exiting, e.g. a jail error) beats
            # our guess; else the launcher's account of the exit.
            last = self._last_error(proc)
            describe = getattr(proc.popen, "describe", None)
            proc.popen.poll()
            how = last or (f"device {proc.name} {describe()}" if describe else
                           f"device {proc.name} exited with status {proc.popen.returncode}")
            self._abort_handshake(hs, f"{how} before sending {hs.phase}")
            return
        if proc is backend.proc:
            backend.proc_gone()
            self.handle(backend, lc.Died(backend.lifecycle.generation, time.monotonic(),
                                         self.cause_of_exit(proc, backend.memory_killed())))

    def _last_error(self, proc: DeviceProcess) -> str | None:
        try:
            while True:
                _, m = self.control.recv(0.02, peer=proc.identity)
                if isinstance(m, msg.ErrorReport):
                    return f"device {proc.name} refused to start: {m.code}: {escape(m.text)}"
        except (TransportTimeout, ProtocolError):
            return None

    def _by_identity(self) -> dict[bytes, "SandboxedBackend"]:
        return {b.proc.identity: b for b in self.backends if b.proc is not None}

    def _drain_control(self) -> None:
        """The messages waiting on the control socket, at most DRAIN_BATCH per turn."""
        peers = self._by_identity()
        for _ in range(DRAIN_BATCH):
            try:
                peer, m = self.control.recv(0)
            except TransportTimeout:
                return
            except PeerProtocolError as err:
                hs = self._handshakes.get(err.peer)
                if hs is not None:
                    self._abort_handshake(hs, f"device {hs.proc.name}: {escape(str(err))}")
                elif err.peer in peers:
                    b = peers[err.peer]
                    self.handle(b, lc.Died(b.lifecycle.generation, time.monotonic(),
                                           f"invalid control message: {escape(str(err))}"))
                continue
            except ProtocolError as err:
                log.warning("control socket: %s", escape(str(err)))
                continue
            hs = self._handshakes.get(peer)
            if hs is not None:
                self._handshake_step(hs, m)
                continue
            early = self._early.get(peer)
            if early is not None:
                if len(early) < EARLY_LIMIT:
                    early.append(m)
                continue
            b = peers.get(peer)
            if b is None:
                continue  # a late message from a replaced incarnation
            b.messages_this_tick += 1
            if b.messages_this_tick > MESSAGE_BUDGET:
                if b.messages_this_tick == MESSAGE_BUDGET + 1:
                    self.handle(b, lc.Died(b.lifecycle.generation, time.monotonic(),
                                           f"control message flood: more than {MESSAGE_BUDGET} "
                                           f"messages in {self.policy.heartbeat_interval * 1000:.0f} ms"))
                continue
            self._from_device(b, m)

    def _handshake_step(self, hs: Handshake, m: msg.Message) -> None:
        b, proc = hs.backend, hs.proc
        if isinstance(m, msg.Log):  # a device may log while it starts
            b.device_log(m.level, m.text)
            return
        if isinstance(m, msg.ErrorReport):
            self._abort_handshake(hs, f"device {proc.name} refused to start: {m.code}: "
                                      f"{escape(m.text)}")
            return
        try:
            if hs.phase == "Hello":
                proc.check_hello(m)
                configure = proc.configure_message(b.device_spec(), b.memory, b.ring_spin_us)
                hs.phase, hs.request_id = "Ready", configure.request_id
                self.control.send(proc.identity, configure)
            elif hs.phase == "Ready":
                proc.check_ready(m, hs.request_id)
                b.proxy.shadow.set_device_features(proc.device_features)
                if not hs.activate:
                    self._complete(hs)
                    return
                hs.request_id = proc.next_request_id()
                hs.phase = "Ack"
                self.control.send(proc.identity, b.proxy.shadow.to_activate(hs.request_id))
            elif hs.phase == "Ack":
                if not isinstance(m, msg.Ack) or m.request_id != hs.request_id:
                    raise DeviceStartError(f"device {proc.name}: expected Ack to Activate, "
                                           f"got {m.TAG}")
                self._complete(hs)
        except (DeviceStartError, ProtocolError) as err:
            if isinstance(err, DeviceStartError) and hs.phase == "Hello":
                try:
                    self.control.send(proc.identity, msg.ErrorReport(msg.E_VERSION, str(err)[:1000]))
                except ProtocolError:
                    pass
            self._abort_handshake(hs, escape(str(err)))

    def _from_device(self, b: "SandboxedBackend", m: msg.Message) -> None:
        if isinstance(m, msg.HeartbeatAck):
            b.heartbeat_acked(m.seq)
        elif isinstance(m, msg.StatsReply):
            with self.stats_cond:
                b.stats_replied(m.request_id, m.counters)
                self.stats_cond.notify_all()
        elif isinstance(m, msg.Log):
            b.device_log(m.level, m.text)
        elif isinstance(m, msg.ErrorReport):
            log.warning("device %s reports %s: %s", b.name, escape(m.code, 32), escape(m.text))
        else:
            log.warning("device %s sent an unexpected %s", b.name, m.TAG)

    def _run_posted(self) -> None:
        while True:
            with self._lock:
                if not self._posted:
                    return
                fn = self._posted.popleft()
            try:
                fn()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one device
                log.exception("supervisor task failed")

    def _tick(self, now: float) -> None:
        # If this thread itself was held up (a starved host), the devices were not silent:
        # don't blame them for our delay, start their clocks again.
        self_late = now - self._last_tick > self.policy.heartbeat_interval + self.policy.heartbeat_timeout
        self._last_tick = now
        self._ticks += 1
        for b in list(self.backends):
            b.messages_this_tick = 0
            if not b.lifecycle.serving or b.proc is None:
                b.hb_pending_since = None
                continue
            if b.hb_pending_since is not None:
                silent = now - b.hb_pending_since
                if self_late:
                    b.hb_pending_since = now
                elif silent > self.policy.heartbeat_timeout:
                    b.hb_pending_since = None
                    self.handle(b, lc.Died(b.lifecycle.generation, now, self._silence_cause(b, silent)))
                    continue
            b.proxy.check_page()  # a failure comes back to this thread as an event
            self._hb_seq += 1
            try:
                self.control.send(b.proc.identity, msg.Heartbeat(self._hb_seq))
            except ProtocolError:
                pass  # not connected yet, or gone: its clock keeps running either way
            if b.hb_pending_since is None:
                b.hb_pending_since, b.hb_pending_seq = now, self._hb_seq
                b.at_memory_limit()  # from now: did the limit hold it up while it was silent?
        if self._ticks % STATS_EVERY_TICKS == 0:
            self.poll_stats()

    # -- teardown ----------------------------------------------------------------------------------
    def close_backend(self, backend: "SandboxedBackend") -> None:
        """Shut one device down for good (politely first), from the thread closing the VM."""
        done = threading.Event()

        def close() -> None:
            try:
                proc = backend.proc
                if proc is not None and proc.popen.poll() is None:
                    try:  # ask politely first: a device exits 0 on Shutdown
                        self.control.send(proc.identity, msg.Shutdown("the VM is stopping"))
                        proc.popen.wait(1.0)
                    except Exception:  # noqa: BLE001 - then SIGKILL, below
                        pass
                self._execute(backend, backend.lifecycle.handle(lc.Close()))
            finally:
                done.set()

        if self.is_alive():
            self.post(close)
            done.wait(KILL_WAIT + 3.0)
        else:
            close()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass
        if self.is_alive():
            self.join(5.0)
        with self._lock:
            posted, self._posted = list(self._posted), collections.deque()
        for fn in posted:  # close requests still waiting: run them here
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("supervisor task failed at stop")

    def close(self) -> None:
        self.stop()
        for hs in list(self._handshakes.values()):
            self._discard(hs.proc)
        self._handshakes.clear()
        for b in self.backends:
            for proc in b.take_processes(None):
                self._discard(proc)
        self.spawner.stop()
        self.control.close()
        os.close(self._wake)
        if self.zygote is not None:
            self.zygote.close()
