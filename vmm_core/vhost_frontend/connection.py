"""One connection from the core to a vhost-user backend: the frontend's half of the protocol.

The message sequence is QEMU's (`../shared/VHOST_USER.md`): GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, SET_OWNER, SET_SLAVE_REQ_FD, GET_CONFIG; at the guest's DRIVER_OK SET_FEATURES,
GET/SET_INFLIGHT_FD, SET_MEM_TABLE, then per ring NUM, BASE, ADDR, CALL, KICK, ENABLE 1.

The backend is untrusted: every reply goes through the codec's checks (sizes, fd counts, flags),
must answer the request it was sent for, and comes within `REPLY_TIMEOUT`; with REPLY_ACK every
request without a reply of its own asks for a status and a refusal raises `BackendRefused`.
Any of these errors ends the connection (the caller reconnects); none reaches the guest.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Sequence

from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import ProtocolError, RemoteProtocolError
from ipc_protocol.transport.vhost_user_socket import VhostUserSocket, close_fds

R = vu.Request
P = vu.ProtocolFeature

REPLY_TIMEOUT = 5.0
# What the core's frontend uses of the protocol features it is offered.
WANTED_PROTOCOL = P.MQ | P.REPLY_ACK | P.SLAVE_REQ | P.CONFIG | P.INFLIGHT_SHMFD
# Ring addresses in SET_VRING_ADDR are "frontend user addresses": the core sends guest-physical
# addresses moved by this much (QEMU sends its own virtual ones), so a backend that mixes the
# two spaces up fails at once instead of working by accident.
USER_OFFSET = 0x7F00_0000_0000


class BackendRefused(ProtocolError):
    """The backend answered a request with a failure status, or lacks something we need."""


@dataclass(frozen=True)
class Ring:
    """One ring as the guest programmed it (guest-physical addresses)."""

    index: int
    size: int
    desc: int
    avail: int
    used: int


def dial(path: str) -> socket.socket:
    """Connect to the backend's socket without blocking; OSError if nobody is listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.connect(path)
    except BlockingIOError:
        sock.close()  # the backlog is full: treat as not there yet
        raise ConnectionRefusedError(errno.EAGAIN, "the backend's listen queue is full") from None
    except BaseException:
        sock.close()
        raise
    return sock


class BackendConnection:
    def __init__(self, sock: socket.socket) -> None:
        self.conn = VhostUserSocket(sock, vu.Channel.FRONTEND, incoming="replies")
        self.channel: VhostUserSocket | None = None  # the backend channel (SLAVE_REQ)
        self.features = 0   # offered, bit 30 included
        self.protocol = 0   # negotiated

    def fileno(self) -> int:
        return self.conn.fileno()

    # -- requests -------------------------------------------------------------------------------
    def _exchange(self, req: int, payload: vu.Payload | None = None,
                  fds: Sequence[int] = ()) -> vu.Message | None:
        ack = bool(self.protocol & P.REPLY_ACK) and not vu.has_own_reply(req)
        reply = self.conn.request(vu.request(req, payload, need_reply=ack, fds=fds), REPLY_TIMEOUT)
        if reply is not None and ack:
            close_fds(reply.fds)
            if not isinstance(reply.payload, vu.U64Value):
                raise RemoteProtocolError(f"the status reply to {reply.name} is not a u64")
            if reply.payload.value:
                raise BackendRefused(f"the backend refused {reply.name} (status {reply.payload.value})")
            return None
        return reply

    def call(self, req: int, payload: vu.Payload | None = None, fds: Sequence[int] = ()) -> vu.Payload | None:
        reply = self._exchange(req, payload, fds)
        if reply is None:
            return None
        close_fds(reply.fds)
        return reply.payload

    def _u64(self, req: int) -> int:
        value = self.call(req)
        if not isinstance(value, vu.U64Value):
            raise RemoteProtocolError(f"the reply to {vu.request_name(req)} is not a u64")
        return value.value

    # -- the steps ------------------------------------------------------------------------------
    def handshake(self, queues: int, *, need_config: bool) -> None:
        """Features, protocol features, queue count, owner, backend channel."""
        self.features = self._u64(R.GET_FEATURES)
        self.protocol = 0
        if self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            wanted = self._u64(R.GET_PROTOCOL_FEATURES) & int(WANTED_PROTOCOL)
            self.call(R.SET_PROTOCOL_FEATURES, vu.U64Value(wanted))
            self.protocol = wanted  # REPLY_ACK applies from the next request on
        if need_config and not self.protocol & P.CONFIG:
            raise BackendRefused("the backend does not offer the CONFIG protocol feature, which "
                                 "this device needs (its config space comes from the backend)")
        if self.protocol & P.MQ:
            count = self._u64(R.GET_QUEUE_NUM)
            if count < queues:
                raise BackendRefused(f"the backend has {count} queues, the device needs {queues}")
        elif queues > 1:
            raise BackendRefused(f"the backend does not offer MQ, the device needs {queues} queues")
        self.call(R.SET_OWNER)
        if self.protocol & P.SLAVE_REQ:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                self.call(R.SET_SLAVE_REQ_FD, fds=[theirs.fileno()])
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self.channel = VhostUserSocket(ours, vu.Channel.BACKEND, incoming="requests")

    @property
    def has_inflight(self) -> bool:
        return bool(self.protocol & P.INFLIGHT_SHMFD)

    def get_config(self, size: int) -> bytes:
        reply = self.call(R.GET_CONFIG, vu.Config(0, size, 0, bytes(size)))
        if not isinstance(reply, vu.Config):
            raise BackendRefused(f"the backend could not give its {size}-byte config space")
        if (reply.offset, reply.size) != (0, size):
            raise RemoteProtocolError(f"GET_CONFIG answered {reply.offset}+{reply.size}, asked 0+{size}")
        return reply.data

    def set_config(self, offset: int, data: bytes) -> None:
        self.call(R.SET_CONFIG, vu.Config(offset, len(data), vu.Config.FLAG_WRITABLE, data))

    def set_features(self, negotiated: int) -> None:
        self.call(R.SET_FEATURES, vu.U64Value(
            negotiated | (self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES)))

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, vu.Inflight]:
        reply = self._exchange(R.GET_INFLIGHT_FD, vu.Inflight(0, 0, num_queues, queue_size))
        if reply is None or not isinstance(reply.payload, vu.Inflight) or not reply.fds:
            if reply is not None:
                close_fds(reply.fds)
            raise BackendRefused("the backend offered INFLIGHT_SHMFD but gave no buffer")
        return reply.fds[0], reply.payload

    def set_inflight(self, fd: int, desc: vu.Inflight) -> None:
        self.call(R.SET_INFLIGHT_FD, desc, fds=[fd])

    def set_mem_table(self, regions: Sequence[tuple[int, int, int]], fd: int) -> None:
        """`regions`: (guest address, size, offset in `fd`), all of guest RAM."""
        rows = tuple(vu.MemoryRegion(gpa, size, gpa + USER_OFFSET, off) for gpa, size, off in regions)
        self.call(R.SET_MEM_TABLE, vu.MemoryTable(rows), fds=[fd] * len(rows))

    def start_ring(self, ring: Ring, base: int, kick_fd: int, call_fd: int) -> None:
        i = ring.index
        self.call(R.SET_VRING_NUM, vu.VringState(i, ring.size))
        self.call(R.SET_VRING_BASE, vu.VringState(i, base))
        self.call(R.SET_VRING_ADDR, vu.VringAddr(i, 0, ring.desc + USER_OFFSET, ring.used + USER_OFFSET,
                                                 ring.avail + USER_OFFSET, 0))
        # CALL before KICK: libvhost-user starts the ring at SET_VRING_KICK and would complete
        # a pending request before it has a call fd (vu_panic "Error writing eventfd").
        self.call(R.SET_VRING_CALL, vu.VringFd(i, False), fds=[call_fd])
        self.call(R.SET_VRING_KICK, vu.VringFd(i, False), fds=[kick_fd])
        if self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            self.call(R.SET_VRING_ENABLE, vu.VringState(i, 1))

    def stop_ring(self, index: int) -> int:
        """Disable, then GET_VRING_BASE (which stops the ring): the backend's next avail index."""
        if self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            self.call(R.SET_VRING_ENABLE, vu.VringState(index, 0))
        state = self.call(R.GET_VRING_BASE, vu.VringState(index, 0))
        if not isinstance(state, vu.VringState) or state.index != index:
            raise RemoteProtocolError(f"GET_VRING_BASE for ring {index} answered {state!r}")
        return state.num

    def close(self) -> None:
        self.conn.close()
        if self.channel is not None:
            self.channel.close()
            self.channel = None

