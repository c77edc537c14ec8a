"""A stand-in device process for jail tests and for `learn`: `python -m jail.probe`.

It imports what a device process imports (zmq, msgpack, the jail), opens what a device opens (a
disk image, a console file, eventfds, a ZeroMQ connection whose I/O thread is running), enters
the jail from $BULKHEAD_JAIL, prints `ready` and then serves one JSON command per line on
`--cmd-fd`, answering one JSON line on `--reply-fd`:

  {"op": "ping"}                      -> {"ok": true, "pid": ..}
  {"op": "prctl"}                     -> {"dumpable": .., "pdeathsig": ..} (seccomp mode off only)
  {"op": "work"}                      -> the device workload once (the syscalls `learn` records):
                                         blk preadv/pwritev/fsync/fallocate, rng getrandom,
                                         console write, a kick eventfd, a msgpack zmq round trip
  {"op": "violate", "what": NAME}     -> attempts something the jail forbids (see VIOLATIONS);
                                         answers only if the attempt failed without killing us
  {"op": "exit"}
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import mmap
import os
import socket
import sys
from typing import Any, Callable

import msgpack
import zmq

from jail.sandbox import JailConfig, enter_jail, seal_jail, start_library_threads

_libc = ctypes.CDLL(None, use_errno=True)
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00): any request the policy does not name


def _syscall(nr: int, *args: int) -> int:
    rc = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return -ctypes.get_errno() if rc < 0 else rc


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.image = os.open(args.image, os.O_RDWR) if args.image else -1
        self.console = os.open(args.console, os.O_WRONLY | os.O_APPEND) if args.console else -1
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ctx: zmq.Context[Any] | None = None

    def connect_zmq(self) -> None:
        """A PAIR over an abstract ipc socket, proven up by one round trip (as the host's Hello)."""
        self.ctx = zmq.Context()
        endpoint = f"ipc://@bulkhead-probe-{os.getpid()}-{id(self)}"
        self.a = self.ctx.socket(zmq.PAIR)
        self.b = self.ctx.socket(zmq.PAIR)
        for s in (self.a, self.b):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, -1)
        self.a.bind(endpoint)
        self.b.connect(endpoint)
        self.a.send(msgpack.packb({"hello": 1}))
        assert msgpack.unpackb(self.b.recv()) == {"hello": 1}

    def work(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": True}
        if self.image >= 0:
            data = bytes(range(256)) * 16
            os.pwritev(self.image, [data[:512], data[512:]], 4096)
            buf = bytearray(4096)
            os.preadv(self.image, [buf], 4096)
            os.fsync(self.image)
            os.fdatasync(self.image)
            os.posix_fallocate(self.image, 0, 8192)
            out["blk"] = bytes(buf) == data
        if self.args.rng:
            out["rng"] = len(os.getrandom(64)) == 64
        if self.console >= 0:
            out["console"] = os.write(self.console, b"probe console line\n") > 0
        os.eventfd_write(self.kick, 1)
        out["kick"] = os.eventfd_read(self.kick) == 1
        os.eventfd_write(self.call, 1)
        if self.ctx is not None:
            self.b.send(msgpack.packb({"seq": 1, "data": b"x" * 100}))
            poller = zmq.Poller()
            poller.register(self.a, zmq.POLLIN)
            out["zmq"] = bool(poller.poll(2000)) and msgpack.unpackb(self.a.recv())["seq"] == 1
        return out

    def violate(self, what: str) -> dict[str, Any]:
        action = VIOLATIONS[what]
        try:
            result = action(self)
        except OSError as err:
            return {"ok": False, "errno": errno.errorcode.get(err.errno or 0, str(err.errno))}
        if isinstance(result, int) and result < 0:
            return {"ok": False, "errno": errno.errorcode.get(-result, str(-result))}
        return {"ok": True, "result": repr(result)}

    def serve(self, cmd_fd: int, reply_fd: int) -> int:
        pending = b""
        poller = zmq.Poller()
        poller.register(cmd_fd, zmq.POLLIN)
        poller.register(self.kick, zmq.POLLIN)
        if self.ctx is not None:
            poller.register(self.a, zmq.POLLIN)
        os.write(reply_fd, b'{"ready": true}\n')
        while True:
            events = dict(poller.poll())
            if cmd_fd not in events:
                continue
            chunk = os.read(cmd_fd, 4096)
            if not chunk:
                return 0
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cmd = json.loads(line)
                if cmd["op"] == "exit":
                    return 0
                reply = self.dispatch(cmd)
                os.write(reply_fd, json.dumps(reply).encode() + b"\n")

    def dispatch(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["op"] == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd["op"] == "prctl":  # PR_GET_DUMPABLE, PR_GET_PDEATHSIG (needs seccomp mode 'off')
            sig = ctypes.c_int(0)
            _libc.prctl(2, ctypes.byref(sig), 0, 0, 0)
            return {"ok": True, "dumpable": _libc.prctl(3, 0, 0, 0, 0), "pdeathsig": sig.value}
        if cmd["op"] == "work":
            return self.work()
        if cmd["op"] == "violate":
            return self.violate(cmd["what"])
        return {"ok": False, "error": f"unknown op {cmd['op']!r}"}


VIOLATIONS: dict[str, Callable[[Probe], Any]] = {
    "open_passwd": lambda p: os.open("/etc/passwd", os.O_RDONLY),
    "socket": lambda p: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
    "execve": lambda p: os.execv("/bin/sh", ["sh", "-c", "true"]),
    "ptrace": lambda p: _syscall(101, 0, 0, 0, 0),  # PTRACE_TRACEME
    "mount": lambda p: _syscall(165, 0, 0, 0, 0, 0),
    "kill_parent": lambda p: os.kill(p.args.parent_pid, 9),
    "mmap_exec": lambda p: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC),
    "mprotect_exec": lambda p: _syscall(10, 0, 4096, 7),
    "ioctl_kvm": lambda p: fcntl.ioctl(p.call, KVM_GET_API_VERSION),
    "unshare": lambda p: _syscall(272, 0x10000000),  # CLONE_NEWUSER
    "thread": lambda p: __import__("threading").Thread(target=lambda: None).start(),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jail.probe")
    ap.add_argument("--cmd-fd", type=int, required=True)
    ap.add_argument("--reply-fd", type=int, required=True)
    ap.add_argument("--image")
    ap.add_argument("--console")
    ap.add_argument("--rng", action="store_true", help="getrandom in the workload (rng device)")
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--no-zmq", action="store_true")
    ap.add_argument("--two-phase", action="store_true",
                    help="enter the jail before starting zmq threads, seal it after connecting")
    args = ap.parse_args(argv)
    probe = Probe(args)
    cfg = JailConfig.from_env()
    if args.two_phase:
        enter_jail(cfg, seccomp=False)
        if not args.no_zmq:
            probe.connect_zmq()
        seal_jail()
    else:
        if not args.no_zmq:  # as the device host does: libzmq's threads born without capabilities
            start_library_threads(probe.connect_zmq, cfg)
        enter_jail(cfg)
    return probe.serve(args.cmd_fd, args.reply_fd)


if __name__ == "__main__":
    sys.exit(main())
