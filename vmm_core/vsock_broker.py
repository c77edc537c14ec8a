"""The vsock broker: the trusted side of virtio-vsock, which makes and accepts every host connection.

The jailed vsock device (`device_procs.virtio.vsock`) never creates a socket or opens a path.
The broker listens on the VM's vsock socket (Firecracker's host protocol) and talks to the
device over an AF_UNIX SOCK_SEQPACKET pair, one msgpack map per datagram, fds by SCM_RIGHTS:

- **host -> guest**: a host program connects to `socket_path` and writes `CONNECT <port>\\n`;
  the broker reads exactly that line (the bytes after it stay in the socket for the guest),
  picks a host-side port and sends `{"op": "host_connect", "port": P, "host_port": H}` with the
  connection.  The device writes `OK <H>\\n` once the guest accepts, or closes it (refused).
- **guest -> host**: the device sends `{"op": "guest_connect", "id": N, "port": P}`; the broker
  connects to `<socket_path>_<P>` (non-blocking: a full backlog is a refusal) and answers
  `{"op": "connected", "id": N}` with the connection, or `{"op": "refused", "id": N}`.

Every byte from the device is untrusted: messages are size-capped, checked field by field,
and fds the device sends are closed; a device that floods is read at most `DEVICE_BUDGET`
messages per wake-up.  Host programs that connect but never finish their CONNECT line are
closed after `CONNECT_TIMEOUT`, and at most `MAX_PENDING` wait at a time.

A guest CID is unique among the host's running VMs: `claim_cid` takes an exclusive OFD lock on
`<host runtime dir>/vsock-cids/<cid>`, held while the VM (or `bulkhead device vsock`) runs and
released by the kernel when its holder dies, so a crashed core never leaves a CID taken.

`VsockBroker` runs on its own thread (the core's vCPU and supervisor threads never wait for a
host program); `open()` returns the device's end of the pair, `close()` stops the thread,
closes everything and removes the socket.
"""

from __future__ import annotations

import array
import logging
import os
import re
import select
import socket
import threading
import time
from dataclasses import dataclass

import msgpack

from ipc_protocol.transport.fds import fds_from_ancdata, socketpair

from .errors import BulkheadError
from .unix_socket import listen

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
MAX_PENDING = 64
MAX_LINE = 64
MAX_MESSAGE = 512
DEVICE_BUDGET = 64
FIRST_HOST_PORT = 1 << 30  # host-side ports the broker hands out (Firecracker starts at 1 << 30)
_CONNECT = re.compile(rb"CONNECT ([0-9]{1,10})\n")


def claim_cid(cid: int, what: str = "--vsock cid=") -> int:
    """Hold `cid` for this process; the lock fd (close it to release).  BulkheadError if a
    running VM holds it."""
    from .identities import claim_cid as claim
    held = claim(cid, f"pid={os.getpid()}")
    if held is None:
        raise BulkheadError(f"{what}{cid}: another running VM has this CID; choose another "
                            "(or leave cid out: the lowest free one is allocated)")
    fd, held.fd = held.fd, -1  # the caller owns the lock's fd now
    return fd


@dataclass
class _Pending:
    sock: socket.socket
    deadline: float


class VsockBroker:
    """Brokers one VM's vsock connections; see the module doc."""

    def __init__(self, socket_path: str, cid: int, *, what: str = "--vsock socket",
                 cid_what: str = "--vsock cid=") -> None:
        self.socket_path = socket_path
        self.cid, self.cid_what = cid, cid_what
        self._cid_lock = -1
        self.what = what
        self.listener: socket.socket | None = None
        self.device_end: socket.socket | None = None
        self._ours: socket.socket | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_port = FIRST_HOST_PORT
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.counters = {"host_connects": 0, "host_refused": 0, "guest_connects": 0,
                         "guest_refused": 0, "device_errors": 0}

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self) -> int:
        """Listen, start the thread; the fd to give the device (role "broker")."""
        if len(self.socket_path) + 12 > 107:  # sun_path, with room for "_<port>"
            raise BulkheadError(f"{self.what} {self.socket_path}: path too long for a Unix socket")
        self._cid_lock = claim_cid(self.cid, self.cid_what)
        try:
            self.listener = listen(self.socket_path, self.what, backlog=16)
        except BaseException:
            os.close(self._cid_lock)
            self._cid_lock = -1
            raise
        self.listener.setblocking(False)
        self._ours, self.device_end = socketpair()
        self._ours.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="bulkhead-vsock-broker", daemon=True)
        self._thread.start()
        return self.device_end.fileno()

    def close(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for p in self._pending.values():
            p.sock.close()
        self._pending.clear()
        for sock in (self.listener, self._ours, self.device_end):
            if sock is not None:
                sock.close()
        if self.listener is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        self.listener = self._ours = self.device_end = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if self._cid_lock >= 0:
            os.close(self._cid_lock)
            self._cid_lock = -1

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        assert self.listener is not None and self._ours is not None
        while not self._stop:
            watched = [self.listener, self._ours, self._wake_r, *(p.sock for p in self._pending.values())]
            timeout = None
            if self._pending:
                timeout = max(0.0, min(p.deadline for p in self._pending.values()) - time.monotonic())
            try:
                ready = select.select(watched, [], [], timeout)[0]
            except (OSError, ValueError):
                return  # closed under us: stopping
            for r in ready:
                if r is self.listener:
                    self._accept()
                elif r is self._ours:
                    self._from_device()
                elif isinstance(r, socket.socket):
                    self._read_line(r)
            self._expire()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("vsock: accept failed: %s", err)
            return
        if len(self._pending) >= MAX_PENDING:
            self.counters["host_refused"] += 1
            sock.close()
            return
        sock.setblocking(False)
        self._pending[sock.fileno()] = _Pending(sock, time.monotonic() + CONNECT_TIMEOUT)

    def _read_line(self, sock: socket.socket) -> None:
        """`CONNECT <port>\\n`, read without consuming anything after it (peek, then take)."""
        try:
            head = sock.recv(MAX_LINE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            head = b""
        newline = head.find(b"\n")
        if head and newline < 0 and len(head) < MAX_LINE:
            return  # not all there yet
        pending = self._pending.pop(sock.fileno())
        m = _CONNECT.fullmatch(head[:newline + 1]) if newline >= 0 else None
        port = int(m.group(1)) if m else -1
        if not 0 <= port < 1 << 32:
            self.counters["host_refused"] += 1
            self._say(sock, b"ERROR bad CONNECT line\n")
            pending.sock.close()
            return
        sock.recv(newline + 1)  # consume the line; what follows is the guest's
        host_port = self._next_port
        self._next_port = FIRST_HOST_PORT + (self._next_port + 1 - FIRST_HOST_PORT) % (1 << 30)
        sock.setblocking(True)  # the device sets its own copy non-blocking (it is not shared)
        if self._send({"op": "host_connect", "port": port, "host_port": host_port}, sock.fileno()):
            self.counters["host_connects"] += 1
        else:
            self.counters["host_refused"] += 1
        sock.close()  # the device holds it now (or nobody: the host program sees EOF)

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, p in list(self._pending.items()):
            if now >= p.deadline:
                del self._pending[fd]
                self.counters["host_refused"] += 1
                p.sock.close()

    def _from_device(self) -> None:
        assert self._ours is not None
        for _ in range(DEVICE_BUDGET):
            try:
                data, anc, flags, _ = self._ours.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(16 * 4),
                                                        socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            fds, other = fds_from_ancdata(anc)
            for fd in fds:  # the device has no business sending fds (or other control data)
                os.close(fd)
            if fds or other:
                self.counters["device_errors"] += 1
            if not data:
                return
            self._on_device_message(data, flags)

    def _on_device_message(self, data: bytes, flags: int) -> None:
        msg = None
        if not flags & socket.MSG_TRUNC and len(data) <= MAX_MESSAGE:
            try:
                msg = msgpack.unpackb(data, raw=False, max_str_len=32, max_bin_len=0,
                                      max_array_len=0, max_map_len=8, max_ext_len=0)
            except Exception:  # noqa: BLE001 - any undecodable bytes: counted, ignored
                msg = None
        ok = (isinstance(msg, dict) and msg.get("op") == "guest_connect"
              and type(msg.get("id")) is int and 0 <= msg["id"] < 1 << 63
              and type(msg.get("port")) is int and 0 <= msg["port"] < 1 << 32)
        if not ok:
            self.counters["device_errors"] += 1
            return
        self.counters["guest_connects"] += 1
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.setblocking(False)  # a full backlog (EAGAIN) is a refusal, not a wait
            conn.connect(f"{self.socket_path}_{msg['port']}")
            conn.setblocking(True)
        except OSError:
            conn.close()
            self.counters["guest_refused"] += 1
            self._send({"op": "refused", "id": msg["id"]})
            return
        try:
            self._send({"op": "connected", "id": msg["id"]}, conn.fileno())
        finally:
            conn.close()

    def _send(self, message: dict, fd: int | None = None) -> bool:
        assert self._ours is not None
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())] \
            if fd is not None else []
        try:
            self._ours.sendmsg([msgpack.packb(message)], anc)
            return True
        except OSError as err:  # the device is not reading (or is being restarted)
            log.info("vsock: cannot pass %s to the device: %s", message.get("op"), err)
            return False

    @staticmethod
    def _say(sock: socket.socket, text: bytes) -> None:
        try:
            sock.send(text, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass
