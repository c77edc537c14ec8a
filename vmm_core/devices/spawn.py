"""Starting a device process and shaking hands with it.

The child is never a fork of the core (multi-threaded: vCPUs, libzmq; a forked copy of a threaded
process may inherit locks held by threads that no longer exist): it is forked by the VM's zygote
(a single-threaded interpreter with the device stack imported) or is a fresh interpreter
(`python -m device_procs.host`), see "Spawn method" below.

fd-passing protocol (what `device_procs.host` expects):

1. The only fd inherited (`pass_fds`) is one end of a SOCK_SEQPACKET socket pair, named on argv:

       python -m device_procs.host --name blk0 --type blk --identity blk0.1
           --control ipc:///run/user/0/bulkhead-vm-x/control.sock --bootstrap-fd 3
           --parent-pid 1234 [--factory mod:fn] [--allow-faults]

2. The core sends one SCM_RIGHTS bundle (`transport.fds.send_bundle`) whose roles are:
   `guest_memory` (memfd), `ring` (ring memfd), `request_doorbell`, `response_doorbell`,
   `irqfd` (eventfd; KVM irqfd target in a VM), `kick0`..`kickN` (one eventfd per queue, the
   KVM ioeventfd targets), and optionally `disk` (the image, opened by the core).
3. Child -> core `Hello` on ZeroMQ; core -> child `Configure` (spec, memory layout, ring size);
   child builds the device, enters its jail, answers `Ack`.  Or `ErrorReport` and exit.

Passing fds by SCM_RIGHTS rather than inheritance keeps argv free of fd numbers, lets the child
receive them after it has set PDEATHSIG, and is the same path a restarted child will use.

Jail (the default, `jail=True`): the child is started through `jail.launch` (user,
mount, PID, net, IPC and UTS namespaces; root-in-namespace = the VM's unprivileged uid/gid) and
calls `enter_jail` once configured (see `device_procs.host`).  The process tree is then
core -> launcher -> device; `DeviceProcess.pid` is the device's host pid, `popen` stands for the
launcher but reports the *device's* exit the Popen way (-signal or code), and `seccomp_report`
names a trapped syscall.  `jail=False` keeps the plain child for debugging and comparisons.

Spawn method (`spawn_method`, `bulkhead run --spawn-method`, default "zygote"):

- "zygote": the launcher is *forked* by the VM's zygote (`vmm_core.devices.zygote`), a process
  that has the device stack imported; the launcher runs the same jail steps and then the host's
  `main` in place of exec.  Tree: core -> zygote -> launcher -> device.  Same fds over the same
  bootstrap socket, same handshake; ~10x cheaper than an interpreter start.  If the zygote cannot
  serve, the log says so and this spawn falls back to "exec".
- "exec": a fresh interpreter per device (the launcher, then the host, are exec'd).
Unjailed devices (`jail=False`) are always exec'd.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from jail.errors import JailError
from jail.options import JailOptions, JailOrOptions, jailed_popen
from ipc_protocol import messages as msg
from ipc_protocol.kinds import KINDS
from ipc_protocol.errors import ProtocolError, TransportTimeout
from ipc_protocol.transport import fds as fdpass
from ipc_protocol.transport.shm_ring import DEFAULT_CAPACITY, ShmRings
from ipc_protocol.transport.zmq_channel import SUN_PATH_MAX, ControlServer

from ..errors import BulkheadError
from ..memory import GuestMemory
from .options import DEFAULT_START_TIMEOUT
from .proxy import DEFAULT_TIMEOUT, ProxyDevice
from .zygote import Zygote, ZygoteError, default_zygote

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = DEFAULT_START_TIMEOUT  # for tools; the supervisor takes its policy's
SPAWN_METHODS = ("zygote", "exec")
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


class DeviceStartError(BulkheadError):
    """A device process did not start or refused its configuration."""


@dataclass
class DeviceFds:
    """The fds the core hands a device (the core keeps its own copies)."""

    guest_memory: int
    irqfd: int
    kicks: Sequence[int] = ()
    extra: dict[str, int] = field(default_factory=dict)  # host resources by role: {"disk": fd}


class PopenLike(Protocol):
    """What callers use of a child: `subprocess.Popen`, or the jail's `LauncherPopen`."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class DeviceProcess:
    """A running device process: its Popen(-like), pidfd, rings and control identity."""

    def __init__(self, name: str, device_type: str, identity: bytes, popen: PopenLike,
                 rings: ShmRings, ring_capacity: int, device_pid: int | None = None,
                 spawn_method: str = "exec") -> None:
        self.name = name
        self.spawn_method = spawn_method  # how it was actually started ("zygote" or "exec")
        self.device_type = device_type
        self.identity = identity
        self.popen = popen
        self.pid = device_pid if device_pid is not None else popen.pid
        # A pidfd names this exact process (no pid reuse race); it turns readable when it exits.
        # Jailed, it is the launcher's: it exits just after the device, once the device's exit
        # status (and any seccomp report) is on the status pipe, so a watcher woken by it can
        # read a complete `popen.poll()`.  Kills go to the device itself (`_kill_pidfd`).
        self.pidfd = os.pidfd_open(popen.pid)
        self._kill_pidfd = os.pidfd_open(self.pid) if self.pid != popen.pid else -1
        self.jailed = self.pid != popen.pid
        self.rings = rings
        self.ring_capacity = ring_capacity
        self.hello: msg.Hello | None = None
        self.device_features = 0
        self._request_id = 0

    @property
    def seccomp_report(self) -> str | None:
        """`socket(2)` once a device killed in trap mode has been waited for; for a kill-mode
        SIGSYS, a hint that trap mode names the call; else None."""
        report = getattr(self.popen, "seccomp_report", None)
        return report() if callable(report) else None

    def next_request_id(self) -> int:
        self._request_id = (self._request_id + 1) & 0xFFFF_FFFF
        return self._request_id

    def check_hello(self, hello: msg.Message) -> msg.Hello:
        """The child's first message, or `DeviceStartError` (the child is told why)."""
        try:
            self.hello = msg.check_hello(hello, expected_name=self.name, expected_pid=self.pid)
        except ProtocolError as err:
            raise DeviceStartError(f"device {self.name}: {err}") from None
        return self.hello

    def configure_message(self, spec: dict[str, Any], memory: GuestMemory,
                          spin_us: int) -> msg.Configure:
        return msg.Configure(self.next_request_id(), dict(spec),
                             tuple(tuple(s.to_wire()) for s in memory.specs),
                             self.ring_capacity, spin_us)

    def check_ready(self, reply: msg.Message, request_id: int) -> None:
        if not isinstance(reply, msg.Ready) or reply.request_id != request_id:
            raise DeviceStartError(f"device {self.name}: expected Ready, got {reply!r}")
        self.device_features = reply.device_features

    def handshake(self, control: ControlServer, spec: dict[str, Any], memory: GuestMemory, *,
                  spin_us: int = 0, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Hello -> Configure -> Ready, waiting here (tools and tests; the supervisor runs the
        same steps as events).  Raises `DeviceStartError` with the child's reason."""
        deadline = time.monotonic() + timeout
        try:
            self.check_hello(self._await(control, deadline, "Hello"))
        except DeviceStartError as err:
            control.send(self.identity, msg.ErrorReport(msg.E_VERSION, str(err)[:1000]))
            raise
        configure = self.configure_message(spec, memory, spin_us)
        control.send(self.identity, configure)
        self.check_ready(self._await(control, deadline, "Ready"), configure.request_id)

    def _await(self, control: ControlServer, deadline: float, what: str) -> msg.Message:
        # Short polls so a child that dies during start-up is reported at once, with its status.
        while True:
            if self.popen.poll() is not None:
                self._raise_exited(control, what)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceStartError(f"device {self.name} sent no {what} in time")
            try:
                _, reply = control.recv(min(0.05, remaining), peer=self.identity)
            except TransportTimeout:
                continue
            except ProtocolError as err:
                raise DeviceStartError(f"device {self.name}: {err}") from None
            if isinstance(reply, msg.Log):  # a device may log while it starts
                log.info("device %s: %s", self.name, reply.text.encode("unicode_escape").decode())
                continue
            if isinstance(reply, msg.ErrorReport):
                raise DeviceStartError(f"device {self.name} refused to start: "
                                       f"{reply.code}: {reply.text}")
            return reply

    def _raise_exited(self, control: ControlServer, what: str) -> None:
        """The child is gone: its last word (an ErrorReport sent just before exiting, e.g. a jail
        error) beats our guess; else the launcher's account of the exit (jail set-up errors)."""
        last = None
        try:
            while not isinstance(last, msg.ErrorReport):
                _, last = control.recv(0.05, peer=self.identity)
        except (TransportTimeout, ProtocolError):
            pass
        if isinstance(last, msg.ErrorReport):
            raise DeviceStartError(f"device {self.name} refused to start: {last.code}: {last.text}")
        describe = getattr(self.popen, "describe", None)
        how = describe() if describe else f"exited with status {self.popen.returncode}"
        raise DeviceStartError(f"device {self.name} {how} before sending {what}")

    def make_proxy(self, *, timeout: float = DEFAULT_TIMEOUT, spin_us: int = 0,
                   on_failure: Callable[[str], None] | None = None) -> ProxyDevice:
        """A `ProxyDevice` on this child's rings that also notices its exit through the pidfd."""
        kind = KINDS.get(self.device_type)
        proxy = ProxyDevice(self.name, self.rings.core_endpoint(),
                            queue_max_sizes=kind.queue_max_sizes if kind else (),
                            timeout=timeout, spin_us=spin_us, on_failure=on_failure,
                            watch_fds=[self.pidfd], device_id=kind.virtio_id if kind else None,
                            page=self.rings.register_page)
        proxy.shadow.set_device_features(self.device_features)
        return proxy

    def shutdown(self, control: ControlServer | None, timeout: float = 2.0) -> int:
        """Ask politely (Shutdown), then SIGKILL; returns the exit status."""
        if control is not None and self.popen.poll() is None:
            try:
                control.send(self.identity, msg.Shutdown("core shutting down"))
            except ProtocolError:
                pass
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait()

    def kill(self) -> None:
        """SIGKILL the device (jailed: the device itself, not its launcher, which then reports
        the signal and exits)."""
        if self.popen.poll() is None:
            try:
                signal.pidfd_send_signal(self._kill_pidfd if self.jailed else self.pidfd,
                                         signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Release the core's handles (call after the process is gone)."""
        for attr in ("pidfd", "_kill_pidfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        closer = getattr(self.popen, "close", None)
        if closer is not None:
            closer()
        self.rings.close()


def routing_identity(name: str, generation: int) -> bytes:
    """The ZeroMQ routing id of `name`'s process of `generation` (known before it exists)."""
    return f"{name}.{generation}".encode()


def spawn_device(name: str, device_type: str, *, control_endpoint: str, fds: DeviceFds,
                 ring_capacity: int = DEFAULT_CAPACITY, generation: int = 1,
                 factory: str | None = None, allow_faults: bool = False,
                 log_level: str = "WARNING", jail: JailOrOptions = True,
                 spawn_method: str | None = None, zygote: Zygote | None = None,
                 start_timeout: float = HANDSHAKE_TIMEOUT) -> DeviceProcess:
    """Start the child and send it its fds; the handshake is `DeviceProcess.handshake`.

    `jail`: True (default: the device type's policy, seccomp `kill`, the per-VM uid/gid), False
    (a plain child, for debugging), or a `JailOptions` / dict of its fields, e.g.
    `{"seccomp": "trap", "uid": 300000, "gid": 300000}`.
    `spawn_method`: "zygote" or "exec" (see the module docstring); `zygote`: the VM's zygote
    (default: this process's, started on first use); `start_timeout`: how long the device waits
    for its fds and Configure (the supervisor passes its policy's, so both ends wait alike).

    Call from a long-lived thread: PR_SET_PDEATHSIG in the child fires when the *spawning thread*
    exits, not only the core process.
    """
    method = spawn_method or "zygote"
    if method not in SPAWN_METHODS:
        raise DeviceStartError(f"device {name}: spawn method {method!r}: choose one of "
                               f"{', '.join(SPAWN_METHODS)}")
    try:
        options = JailOptions.coerce(jail)
    except JailError as err:
        raise DeviceStartError(f"device {name}: {err}") from None
    identity = routing_identity(name, generation)
    relay = None
    device_endpoint = control_endpoint
    if options is not None and options.namespaces and control_endpoint.startswith("ipc://"):
        # Jailed, the device talks to its launcher's relay, never to our socket (jail/relay.py).
        rundir = os.path.dirname(control_endpoint[len("ipc://"):])
        device_endpoint = f"ipc://{rundir}/relay-{identity.decode()}.sock"
        if len(device_endpoint[len("ipc://"):].encode()) > SUN_PATH_MAX:
            raise DeviceStartError(
                f"device {name}: its socket path in {rundir} is longer than a Unix socket "
                f"allows ({SUN_PATH_MAX} bytes): set XDG_RUNTIME_DIR to a shorter directory")
        relay = {"downstream": device_endpoint, "upstream": control_endpoint,
                 "identity": identity.decode()}
    rings = ShmRings.create(ring_capacity, name=f"bulkhead-ring-{name}")
    parent_sock, child_sock = fdpass.socketpair()
    host_args = ["--name", name, "--type", device_type, "--identity", identity.decode(),
                 "--control", device_endpoint, "--parent-pid", str(os.getpid()),
                 "--log-level", log_level, "--bootstrap-timeout", f"{start_timeout:g}"]
    if factory:
        host_args += ["--factory", factory]
    if allow_faults:
        host_args.append("--allow-faults")
    argv = [sys.executable, "-m", "device_procs.host", *host_args,
            "--bootstrap-fd", str(child_sock.fileno())]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    device_pid: int | None = None
    popen: PopenLike
    try:
        if options is None:
            method = "exec"
            popen = subprocess.Popen(argv, pass_fds=[child_sock.fileno()], close_fds=True,
                                     stdin=subprocess.DEVNULL, env=env, cwd=_REPO_ROOT)
        else:
            jail_args = (options, name, device_type, argv, child_sock.fileno())
            kind = KINDS.get(device_type)
            fsize = kind.fsize_limit({r: os.fstat(fd).st_size for r, fd in fds.extra.items()}) \
                if kind else None
            jail_kwargs: dict[str, Any] = {"fsize": fsize, "relay": relay, "env": env,
                                           "cwd": _REPO_ROOT}
            launcher = None
            if method == "zygote":
                try:
                    start = (zygote or default_zygote()).launcher_start(host_args,
                                                                        child_sock.fileno())
                    launcher = jailed_popen(*jail_args, **jail_kwargs, start=start)
                except ZygoteError as err:
                    if "Errno 11" in str(err):  # EAGAIN: no process left (pids limit); exec
                        raise DeviceStartError(   # would fail the same way
                            f"device {name} could not be started: {err} (is the VM's "
                            "--cgroup-pids-max too low?)") from None
                    log.warning("device %s: %s; starting it as a fresh interpreter", name, err)
                    method = "exec"
                    # A zygote that failed half-way may have forked a child that holds the old
                    # bootstrap socket: the fds go over a new pair.
                    parent_sock.close()
                    child_sock.close()
                    parent_sock, child_sock = fdpass.socketpair()
                    argv[-1] = str(child_sock.fileno())
                    jail_args = (options, name, device_type, argv, child_sock.fileno())
            popen = launcher or jailed_popen(*jail_args, **jail_kwargs)
            device_pid = popen.device_pid
    except JailError as err:  # e.g. no user namespaces, or a policy file with an error
        rings.close()
        raise DeviceStartError(str(err) if str(err).startswith(f"device {name}")
                               else f"device {name}: {err}") from None
    except OSError as err:  # fork or pipe: out of processes or fds
        rings.close()
        raise DeviceStartError(f"device {name} could not be started: {err.strerror or err} "
                               "(is the VM's --cgroup-pids-max too low?)") from None
    except BaseException:
        rings.close()
        raise
    finally:
        child_sock.close()
    try:
        bundle = {"guest_memory": fds.guest_memory, **rings.fds, "irqfd": fds.irqfd}
        bundle.update({f"kick{i}": fd for i, fd in enumerate(fds.kicks)})
        bundle.update(fds.extra)
        fdpass.send_bundle(parent_sock, bundle)
    except BaseException:
        popen.kill()
        popen.wait()
        rings.close()
        raise
    finally:
        parent_sock.close()
    proc = DeviceProcess(name, device_type, identity, popen, rings, ring_capacity, device_pid,
                         spawn_method=method)
    log.info("spawned device %s (%s) as pid %d%s via %s", name, device_type, proc.pid,
             " (jailed)" if proc.jailed else "", method)
    return proc


def start_device(control: ControlServer, name: str, spec: dict[str, Any], memory: GuestMemory,
                 fds: DeviceFds, *, device_type: str | None = None, spin_us: int = 0,
                 on_spawn: Callable[[DeviceProcess], None] | None = None,
                 **spawn_kwargs: Any) -> DeviceProcess:
    """Spawn + handshake; on failure the child is killed and its resources released.

    `on_spawn(proc)` runs between the two (`jail learn` attaches its syscall supervisor there)."""
    proc = spawn_device(name, device_type or spec["type"], control_endpoint=control.endpoint,
                        fds=fds, **spawn_kwargs)
    try:
        if on_spawn is not None:
            on_spawn(proc)
        proc.handshake(control, spec, memory, spin_us=spin_us)
    except BaseException:
        proc.kill()
        proc.popen.wait()
        control.forget(proc.identity)
        proc.close()
        raise
    return proc
