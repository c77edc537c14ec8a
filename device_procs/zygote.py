"""The device zygote: `python -m device_procs.zygote --socket-fd N --parent-pid P`.

One per VM (or per core process), started by `vmm_core.devices.zygote` as a fresh interpreter --
never a fork of the threaded core.  It imports, once, everything a device process needs (the
device host, the virtio devices, msgpack, pyzmq *without* a `zmq.Context`, the jail and its
seccomp cffi module), then waits on its SEQPACKET socket.  Each request forks a child that takes
the jail launcher's path (`jail.launch.run`: PID namespace with a capability-less
init, the device as pid 2 in its own user/mount/net/IPC/UTS namespaces, uid maps written by its
parent) and then, instead of exec'ing a new interpreter, calls `device_procs.host.main` in place.
A restart then costs three forks and the handshake instead of an interpreter start (~200 ms).

Why this is safe to fork: the zygote is single-threaded (asserted before every fork, by Python's
count and by /proc/self/task) and holds no lock, socket or library state a child could inherit
half-way.  ZeroMQ's threads start in the child, in `host.main`.

Protocol (core -> zygote, one SEQPACKET message each; zygote -> core, one reply each):

    ready                          (zygote, once, after its imports)
    {"launch": {...}, "host_args": [...]} + fds [status_w, bootstrap]
        -> {"pid": <host pid of the launcher child L>}   or   {"error": "..."}

`launch` is the jail launcher's spec (`sandbox.launch_spec`); the zygote fills in the fd numbers
as received and `watch_fd` (its pidfd of the core: L follows the core, not the zygote, so a dying
zygote does not take the running devices with it).  The core reads `pid <device>` and the exit
report on the status pipe exactly as for an exec'd launcher.

Lifetime: PR_SET_PDEATHSIG(SIGKILL) on the core, and exit when the socket reaches EOF.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

# Everything a device process imports, imported once here (its children inherit it).
import msgpack  # noqa: F401
import prctl
import zmq  # noqa: F401 - the module only: a Context (and its threads) is created in the child

import device_procs.host as host
import device_procs.virtio  # noqa: F401 - blk, rng, console and the virtio-mmio transport
from jail import launch, policy, sandbox, seccomp  # noqa: F401
from ipc_protocol.errors import PeerGone, RemoteProtocolError
from ipc_protocol.transport import fds as fdpass

MAX_REQUEST = fdpass.MAX_PAYLOAD


class ZygoteError(Exception):
    """A request the zygote refuses (bad shape); the reply carries the text."""


def _single_threaded() -> bool:
    """Python's view and the kernel's (a native thread would not show in `threading`)."""
    return threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1


def parse_request(payload: bytes, fds: list[int]) -> tuple[dict[str, Any], list[str]]:
    """The launcher spec and host argv of one request, validated; fds are [status, bootstrap]."""
    try:
        request = json.loads(payload)
    except ValueError as err:
        raise ZygoteError(f"request is not JSON: {err}") from None
    if not isinstance(request, dict) or set(request) != {"launch", "host_args"}:
        raise ZygoteError("request must be {launch, host_args}")
    spec, args = request["launch"], request["host_args"]
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise ZygoteError("launch spec must be an object with a config")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ZygoteError("host_args must be a list of strings")
    if len(fds) != 2:
        raise ZygoteError(f"expected 2 fds (status, bootstrap), got {len(fds)}")
    return spec, args


class Zygote:
    def __init__(self, sock: socket.socket, core_pid: int) -> None:
        self.sock = sock
        self.core_pidfd = os.pidfd_open(core_pid)  # inherited by every L: see the docstring
        self.children: set[int] = set()
        # SIGCHLD -> a byte on this pipe, so the poll loop reaps launchers promptly.
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._sig_w)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        # Ctrl-C reaches the whole foreground group: the core decides what a Ctrl-C means.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def serve(self) -> int:
        try:
            self.sock.send(b"ready")
        except OSError:
            return 0  # the core closed its end before we were ready: nothing to serve
        while True:
            ready = select.select([self.sock, self._sig_r], [], [])[0]
            if self._sig_r in ready:
                try:
                    os.read(self._sig_r, 4096)
                except BlockingIOError:
                    pass
                self._reap()
            if self.sock in ready:
                try:
                    payload, fds = fdpass.recv_fds(self.sock)
                except (OSError, PeerGone, RemoteProtocolError):
                    return 0  # the core closed its end (or is gone): so are we
                reply = self._spawn(payload, fds)
                try:
                    self.sock.send(json.dumps(reply).encode())
                except OSError:
                    return 0

    def _reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)

    def _spawn(self, payload: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            try:
                spec, args = parse_request(payload, fds)
            except ZygoteError as err:
                return {"error": str(err)}
            status_fd, bootstrap_fd = fds
            spec = dict(spec, status_fd=status_fd, keep_fds=[bootstrap_fd],
                        parent_pid=os.getpid(), watch_fd=self.core_pidfd)
            args = [*args, "--bootstrap-fd", str(bootstrap_fd)]
            # Never fork a process that runs threads (a lock held by another thread stays held).
            assert _single_threaded(), "the zygote must be single-threaded when it forks"
            pid = os.fork()
            if pid == 0:
                self._become_launcher(spec, args, fds)
            self.children.add(pid)
            return {"pid": pid}
        except OSError as err:
            return {"error": f"fork failed: {err}"}
        finally:
            for fd in fds:  # the child has them; the core keeps its own ends
                os.close(fd)

    def _become_launcher(self, spec: dict[str, Any], args: list[str], fds: list[int]) -> None:
        """In the child: undo what is the zygote's own, then be L (never returns)."""
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
            # detach(): the socket object must not close a recycled fd number when collected.
            os.close(self.sock.detach())
            for fd in (self._sig_r, self._sig_w):
                os.close(fd)
        except BaseException as err:  # noqa: BLE001
            launch._fail(fds[0], "zygote child setup failed", err)
        launch.run(spec, [], then=lambda: host.main(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="device_procs.zygote")
    p.add_argument("--socket-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        prctl.set_name("bhzygote")
        prctl.set_proctitle("bulkhead-zygote")
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != args.parent_pid:
        return 1  # the core died before PDEATHSIG was armed
    _warm_up()
    sock = socket.socket(fileno=args.socket_fd)
    return Zygote(sock, args.parent_pid).serve()


def _warm_up() -> None:
    """Pay the first-use costs (the syscall constant table, policy parsing paths) once here
    rather than in every child: `enter_jail` loads its policy between Configure and Ack, on the
    restart's critical path.  Each child still reads its policy file itself (never stale)."""
    for name in sorted(p.stem for p in policy.CONFIG_DIR.glob("*.toml")):
        try:
            policy.load_policy(name)
        except Exception:  # noqa: BLE001 - the core validates the policy it asks for anyway
            pass


if __name__ == "__main__":
    sys.exit(main())
