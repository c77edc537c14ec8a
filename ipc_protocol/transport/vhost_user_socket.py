"""vhost-user messages over a connected AF_UNIX SOCK_STREAM socket (the codec is `ipc_protocol.vhost_user`).

Reads are exact: first the 12-byte header, then exactly `size` payload bytes (bounded by
`MAX_PAYLOAD_BYTES` before anything is read), so we never consume a byte of the next message and
the fds that arrive belong to this one (the kernel attaches SCM_RIGHTS to the bytes of the
sendmsg that carried them).  Every recvmsg asks for MSG_CMSG_CLOEXEC; a message whose control
data was truncated (MSG_CTRUNC: more fds than we have room for), that carries anything but
SCM_RIGHTS, or that the codec refuses has all of its fds closed before the error is raised: a
hostile frontend cannot make us leak descriptors (they count against RLIMIT_NOFILE in the jail).

The socket and the backend-channel socket may be blocking or not -- the latter is a file
description we share with the frontend, so we never change its mode (no `setblocking`, which
would also need ioctl(FIONBIO)): every read waits with poll(2) first and retries on EAGAIN.
"""

from __future__ import annotations

import array
import os
import select
import socket
import time

from ..errors import PeerGone, RemoteProtocolError, TransportTimeout
from .. import vhost_user as vu
from .fds import fds_from_ancdata

_FD_SIZE = array.array("i").itemsize
# Room for more fds than any message may carry, so an excess is counted and refused; beyond this
# the kernel sets MSG_CTRUNC (and closes the rest itself).
_ANC_FDS = vu.MAX_FDS + 8
# Once a message has begun, the rest of it must follow within this (a stalled frontend).
MESSAGE_TIMEOUT = 5.0


def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserSocket:
    """One end of a vhost-user channel: `recv()` one message, `send()` one message.

    `channel` says which request table applies (the connection or the backend channel) and
    `incoming` whether this end receives requests ("requests": a backend on the connection, a
    frontend on the backend channel) or replies.
    """

    def __init__(self, sock: socket.socket, channel: vu.Channel = vu.Channel.FRONTEND, *,
                 incoming: str = "requests") -> None:
        if incoming not in ("requests", "replies"):
            raise ValueError("incoming must be 'requests' or 'replies'")
        self.sock = sock
        self.channel = channel
        self.incoming = incoming

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- receiving ----------------------------------------------------------------------------
    def _wait(self, events: int, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if not poller.poll(None if timeout is None else int(timeout * 1000) + 1):
            raise TransportTimeout("the vhost-user peer stopped in the middle of a message")

    def _read_exact(self, n: int, fds: list[int], deadline: float | None) -> bytes:
        data = b""
        while len(data) < n:
            self._wait(select.POLLIN, deadline)
            try:
                chunk, ancdata, flags, _ = self.sock.recvmsg(
                    n - len(data), socket.CMSG_SPACE(_ANC_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                raise PeerGone("the vhost-user peer reset the connection") from None
            got, bad_cmsg = fds_from_ancdata(ancdata)
            fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise RemoteProtocolError("vhost-user message carried more fds than any message may")
            if bad_cmsg:
                raise RemoteProtocolError("vhost-user message carried control data other than fds")
            if not chunk:
                raise PeerGone("the vhost-user peer closed the connection"
                               + (" in the middle of a message" if data or deadline else ""))
            data += chunk
            if deadline is None:  # the message has begun: the rest is due soon
                deadline = time.monotonic() + MESSAGE_TIMEOUT
        return data

    def recv(self, timeout: float | None = None) -> vu.Message:
        """Read one message (waiting up to `timeout` for it to begin; None: forever).

        Raises `PeerGone` on EOF, `RemoteProtocolError` for a malformed message (its fds closed),
        `TransportTimeout` if it does not begin in time or stalls half-way."""
        fds: list[int] = []
        try:
            if timeout is not None:
                self._wait(select.POLLIN, time.monotonic() + timeout)
            header = vu.parse_header(self._read_exact(vu.HEADER_SIZE, fds, None))
            payload = self._read_exact(header.size, fds, time.monotonic() + MESSAGE_TIMEOUT) \
                if header.size else b""
            decode = vu.decode_request if self.incoming == "requests" else vu.decode_reply
            return decode(header, payload, fds, self.channel)
        except BaseException:
            close_fds(fds)
            raise

    # -- sending --------------------------------------------------------------------------------
    def send(self, msg: vu.Message, timeout: float = MESSAGE_TIMEOUT) -> None:
        """Send one message; its fds go with the first byte (and stay ours to close)."""
        data, fds = vu.encode(msg)
        view = memoryview(data)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        deadline = time.monotonic() + timeout
        while view:
            try:
                sent = self.sock.sendmsg([view], ancillary, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLOUT, deadline)
                continue
            except (BrokenPipeError, ConnectionResetError) as err:
                raise PeerGone(f"the vhost-user peer is gone ({err.strerror})") from None
            view = view[sent:]
            ancillary = []

    def request(self, msg: vu.Message, timeout: float = MESSAGE_TIMEOUT) -> vu.Message | None:
        """Send `msg` and, if it asks for one, wait for its reply (a frontend's round trip)."""
        self.send(msg)
        if not vu.wants_reply(msg):
            return None
        reply = self.recv(timeout)
        if reply.request != msg.request:
            close_fds(reply.fds)
            raise RemoteProtocolError(f"expected the reply to {msg.name}, got one to {reply.name}")
        return reply
