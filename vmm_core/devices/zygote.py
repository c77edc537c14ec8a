"""The core's side of the device zygote (`device_procs.zygote`): start it, ask it for devices.

A restart through a fresh interpreter costs ~200 ms of interpreter start and imports; the zygote
pays that once per VM and then forks each device (jail launcher semantics included) from a
process that has everything imported.  The zygote itself is a fresh interpreter too (`subprocess`,
i.e. fork+exec with no Python code between them): the threaded core never forks Python code.

    zygote = Zygote()                 # early, from the VM's main thread (`prestart`: before the
                                      # core's own setup; moved into the VM's cgroup when it exists)
    start = zygote.launcher_start(host_args, bootstrap_fd)   # a `sandbox.LauncherStart`
    ...                               # `sandbox.spawn(..., start=start)` does the rest
    zygote.close()                    # with the VM; the zygote also exits on EOF and PDEATHSIG

If the zygote has died, the next request starts a new one and says so in the log; if that fails
(or a request fails), `ZygoteError` tells the caller to fall back to a fresh interpreter.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from jail.sandbox import LauncherStart
from ipc_protocol.errors import ProtocolError
from ipc_protocol.transport import fds as fdpass

from ..errors import BulkheadError

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0   # a fresh interpreter importing the device stack: ~0.3 s, more when loaded
REPLY_TIMEOUT = 5.0    # one fork: milliseconds
# The launcher's exit status belongs to its parent, the zygote; the core only sees it end.  L
# always reports the device's end on the status pipe before exiting, which is what counts.
UNKNOWN_STATUS = 1
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


class ZygoteError(BulkheadError):
    """The zygote could not be started or did not fork the device: start a fresh interpreter."""


class PidfdPopen:
    """`subprocess.Popen`'s poll/wait/kill for a process that is not our child (the launcher the
    zygote forked), backed by a pidfd: it turns readable when the process has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self._check(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._check(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return code

    def _check(self, timeout: float | None) -> int | None:
        if self.returncode is None and select.select([self.pidfd], [], [], timeout)[0]:
            self.returncode = UNKNOWN_STATUS
            os.close(self.pidfd)
            self.pidfd = -1
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One zygote process (restarted on demand) and the SEQPACKET socket to it; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._closed = False
        self.starts = 0
        self._start()

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def alive(self) -> bool:
        with self._lock:
            return self._popen is not None and self._popen.poll() is None

    # -- process ------------------------------------------------------------------------------
    def _start(self) -> None:
        """Start the zygote (not waiting for its imports: the first request does)."""
        parent, child = fdpass.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "device_procs.zygote", "--socket-fd", str(child.fileno()),
                 "--parent-pid", str(os.getpid())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env, cwd=_REPO_ROOT)
        except OSError as err:
            parent.close()
            raise ZygoteError(f"cannot start the device zygote: {err}") from None
        finally:
            child.close()
        self._sock, self._ready = parent, False
        self.starts += 1
        log.info("device zygote started as pid %d", self._popen.pid)

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # EOF: the zygote exits by itself
            self._sock = None
        if self._popen is not None:
            try:
                self._popen.wait(2.0)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
            self._popen = None

    def _ensure(self) -> socket.socket:
        """The socket to a live, ready zygote; a dead one is replaced (and the log says so)."""
        if self._closed:
            raise ZygoteError("the device zygote is closed")
        if self._popen is None or self._popen.poll() is not None:
            if self._popen is not None:
                log.warning("device zygote (pid %d) is gone (status %s): starting a new one",
                            self._popen.pid, self._popen.returncode)
                self._stop()
            self._start()
        assert self._sock is not None and self._popen is not None
        if not self._ready:
            try:
                _wait_readable(self._sock, READY_TIMEOUT)
                hello = self._sock.recv(64)
            except (OSError, ZygoteError) as err:
                self._abandon()
                raise ZygoteError(f"the device zygote did not get ready: {err}") from None
            if hello != b"ready":
                self._abandon()
                raise ZygoteError(f"the device zygote said {hello!r} instead of ready")
            self._ready = True
        return self._sock

    def _abandon(self) -> None:
        """Kill a zygote that misbehaves; the next request starts a new one."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()
        self._stop()

    # -- requests -----------------------------------------------------------------------------
    def spawn(self, launch: dict[str, Any], host_args: Sequence[str], status_fd: int,
              bootstrap_fd: int) -> int:
        """Fork a jail launcher running the device host with `host_args`; its host pid."""
        payload = json.dumps({"launch": launch, "host_args": list(host_args)}).encode()
        with self._lock:
            sock = self._ensure()
            try:
                fdpass.send_fds(sock, payload, [status_fd, bootstrap_fd])
                _wait_readable(sock, REPLY_TIMEOUT)
                raw = sock.recv(fdpass.MAX_PAYLOAD)
            except (OSError, ProtocolError, ZygoteError) as err:
                self._abandon()
                raise ZygoteError(f"the device zygote failed a request: {err}") from None
        try:
            reply = json.loads(raw) if raw else {"error": "the zygote closed its socket"}
        except ValueError:
            reply = {"error": f"unreadable reply {raw[:80]!r}"}
        if not isinstance(reply, dict) or not isinstance(reply.get("pid"), int):
            raise ZygoteError(f"the device zygote did not fork: {reply.get('error', reply)}"
                              if isinstance(reply, dict) else f"bad zygote reply {reply!r}")
        return reply["pid"]

    def launcher_start(self, host_args: Sequence[str], bootstrap_fd: int) -> LauncherStart:
        """The `start` hook of `sandbox.spawn`: the launcher comes from this zygote."""
        def start(launch: dict[str, Any], status_fd: int) -> PidfdPopen:
            return PidfdPopen(self.spawn(launch, host_args, status_fd, bootstrap_fd))
        return start

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop()


def _wait_readable(sock: socket.socket, timeout: float) -> None:
    if not select.select([sock], [], [], timeout)[0]:
        raise ZygoteError(f"no answer within {timeout:.0f} s")


_default: Zygote | None = None
_default_lock = threading.Lock()
_prestarted: Zygote | None = None


def prestart() -> None:
    """Start this process's VM zygote now, from `bulkhead run`'s main thread before the core's
    own imports and KVM setup, so its interpreter start and imports (~150 ms) overlap them
    instead of delaying the first device.  The VM's supervisor takes it (`take_prestarted`) and
    moves it into the VM's cgroup; the caller calls `discard_prestarted` when the VM is over."""
    global _prestarted
    if _prestarted is None:
        try:
            _prestarted = Zygote()
        except ZygoteError as err:
            log.info("%s: the supervisor will try again", err)
            return
        atexit.register(discard_prestarted)  # a usage error ends the process before `cmd_run`


def take_prestarted() -> Zygote | None:
    """The prestarted zygote, once (None if there is none or it has died)."""
    global _prestarted
    zygote, _prestarted = _prestarted, None
    if zygote is not None and not zygote.alive():
        zygote.close()
        return None
    return zygote


def discard_prestarted() -> None:
    """Close a prestarted zygote nobody took (the VM failed before its devices)."""
    zygote = take_prestarted()
    if zygote is not None:
        zygote.close()


def default_zygote() -> Zygote:
    """This process's zygote for devices started outside a VM's supervisor (tests, benchmarks,
    `jail learn`): started on first use, closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Zygote()
            atexit.register(_default.close)
        return _default
