"""Passing file descriptors between processes with SCM_RIGHTS over a Unix socket pair.

ZeroMQ carries messages only; fds (guest memfd, ring memfd, eventfds, disk image) cross here.
We use SOCK_SEQPACKET so each send is one message: the fds arrive with the message that names
them, never split or merged with the next one.

A *bundle* is one message whose payload is a msgpack list of role names, one per fd, in the order
of the attached fds (``["guest_memory", "ring", ...]``): the receiver gets ``{role: fd}``.
"""

from __future__ import annotations

import array
import os
import select
import socket
from typing import Sequence

import msgpack

from ..errors import LocalProtocolError, PeerGone, RemoteProtocolError, TransportTimeout

MAX_FDS = 64            # well under the kernel's SCM_MAX_FD (253)
MAX_PAYLOAD = 4096
MAX_ROLE_LEN = 32


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected SEQPACKET pair; both ends close-on-exec (pass one on with `pass_fds`)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_fds(sock: socket.socket, payload: bytes, fds: Sequence[int]) -> None:
    if len(fds) > MAX_FDS:
        raise LocalProtocolError(f"cannot pass {len(fds)} fds at once (limit {MAX_FDS})")
    if len(payload) > MAX_PAYLOAD or not payload:
        raise LocalProtocolError(f"fd message payload must be 1..{MAX_PAYLOAD} bytes")
    sent = socket.send_fds(sock, [payload], list(fds))
    if sent != len(payload):
        raise LocalProtocolError(f"short send of fd message ({sent} of {len(payload)} bytes)")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[int], bool]:
    """The fds in recvmsg's control data, and whether anything else was there (which the
    caller refuses, after closing the fds)."""
    fd_size = array.array("i").itemsize
    fds: list[int] = []
    other = False
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % fd_size
            fds.extend(array.array("i", data[:usable]))
        else:
            other = True
    return fds, other


def recv_fds(sock: socket.socket, timeout: float | None = None,
             max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """Receive one message and its fds.

    We call `recvmsg` with MSG_CMSG_CLOEXEC rather than `socket.recv_fds`, which omits that flag:
    without it a received fd would be inherited by anything this process ever spawns.  A truncated
    payload or fd list (MSG_TRUNC / MSG_CTRUNC) is refused — and every fd that did arrive is closed
    so a hostile sender cannot make us leak descriptors.
    """
    if timeout is not None:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise TransportTimeout(f"no fd message within {timeout:.1f} s")
    fd_size = array.array("i").itemsize
    msg, ancdata, flags, _ = sock.recvmsg(MAX_PAYLOAD, socket.CMSG_SPACE(max_fds * fd_size),
                                          socket.MSG_CMSG_CLOEXEC)
    fds, bad_cmsg = fds_from_ancdata(ancdata)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or bad_cmsg:
        _close_all(fds)
        raise RemoteProtocolError("fd message was truncated or carried unexpected control data")
    if not msg:
        _close_all(fds)
        raise PeerGone("the fd socket was closed by the peer")
    return msg, fds


def send_bundle(sock: socket.socket, named_fds: dict[str, int]) -> None:
    """Send fds with their role names (`recv_bundle` gives back the same mapping)."""
    roles = list(named_fds)
    for role in roles:
        if not isinstance(role, str) or not 0 < len(role) <= MAX_ROLE_LEN:
            raise LocalProtocolError(f"bad fd role name {role!r}")
    send_fds(sock, msgpack.packb(roles), [named_fds[r] for r in roles])


def recv_bundle(sock: socket.socket, timeout: float | None = None) -> dict[str, int]:
    """Receive a bundle; on any inconsistency every received fd is closed and an error raised."""
    payload, fds = recv_fds(sock, timeout)
    try:
        try:
            roles = msgpack.unpackb(payload, raw=False)
        except Exception as err:
            raise RemoteProtocolError(f"fd bundle header is not msgpack: {err}") from None
        if (type(roles) is not list or len(roles) != len(fds)
                or not all(type(r) is str and 0 < len(r) <= MAX_ROLE_LEN for r in roles)
                or len(set(roles)) != len(roles)):
            raise RemoteProtocolError(
                f"fd bundle names {roles!r} do not match the {len(fds)} fds received")
        return dict(zip(roles, fds))
    except BaseException:
        _close_all(fds)
        raise
