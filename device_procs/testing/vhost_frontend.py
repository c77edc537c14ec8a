"""A vhost-user frontend double: plays the VMM (QEMU, UML) on a vhost-user socket, and the guest
through the ordinary `VirtioDriver` request helpers (blk_read, rng_read, console_write, ...).

Guest RAM is a memfd mapped here and passed in SET_MEM_TABLE (split into `regions` regions, one
fd each, like QEMU); the ring addresses it sends are *user* addresses, `user_offset` away from the
guest addresses (QEMU sends its virtual addresses; pass `user_offset=0` to behave like UML).
Kicks and calls are eventfds; the backend channel (SET_SLAVE_REQ_FD) is a socketpair whose
requests `poll_backend_channel` answers.

    frontend = VhostUserFrontend.connect(path, queues=1)
    frontend.handshake()
    frontend.driver.init()                    # SET_FEATURES, SET_MEM_TABLE, inflight, rings
    frontend.driver.blk_write(0, b"x" * 512)
    frontend.stop()                           # clean stop: SET_VRING_ENABLE 0, GET_VRING_BASE
    frontend.reconnect(VhostUserFrontend.dial(path))   # a fresh backend continues the rings

The same double drives our backend and qemu-storage-daemon, which keeps it honest.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Sequence

from device_procs.virtio.device import VIRTIO_F_VERSION_1
from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import TransportTimeout
from ipc_protocol.guest_memory import GuestMemory, RegionSpec
from ipc_protocol.transport.vhost_user_socket import VhostUserSocket, close_fds

from .driver import DriverError, DriverQueue, VirtioDriver

R = vu.Request
P = vu.ProtocolFeature
# What this frontend knows how to use.
SUPPORTED_PROTOCOL = P.MQ | P.REPLY_ACK | P.SLAVE_REQ | P.CONFIG | P.INFLIGHT_SHMFD
DEFAULT_USER_OFFSET = 0x7F00_0000_0000  # "QEMU virtual addresses": far from the guest's


def dial(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect to a backend's listening socket, retrying while it is not there yet."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class VhostUserFrontend:
    """The VMM's half of a vhost-user connection, with guest memory and eventfds of its own."""

    def __init__(self, sock: socket.socket, *, queues: int, ram_mib: int = 16, regions: int = 1,
                 user_offset: int = DEFAULT_USER_OFFSET, protocol: int | None = None) -> None:
        self.queues = queues
        self.user_offset = user_offset
        self.wanted_protocol = SUPPORTED_PROTOCOL if protocol is None else protocol
        size = ram_mib << 20
        if regions < 1 or size % (regions << 12):
            raise DriverError(f"{ram_mib} MiB cannot be split into {regions} page-aligned regions")
        self.memfd = os.memfd_create("bulkhead-vhost-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, size)
        part = size // regions
        self.specs = [RegionSpec(i * part, part, i * part) for i in range(regions)]
        self.memory = GuestMemory([(s, self.memfd) for s in self.specs])
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(queues)]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(queues)]
        self.inflight: tuple[int, vu.Inflight] | None = None  # kept across backend restarts
        self.backend_requests: list[vu.Message] = []
        self.channel: VhostUserSocket | None = None
        self.conn = VhostUserSocket(sock, vu.Channel.FRONTEND, incoming="replies")
        self.features = 0           # offered by the backend (virtio bits + bit 30)
        self.protocol = 0           # negotiated protocol features
        self.bases: dict[int, int] = {}  # from GET_VRING_BASE at a clean stop
        self.driver = VhostUserDriver(self, ram_size=size - (1 << 20))

    @classmethod
    def connect(cls, path: str, **kwargs: object) -> "VhostUserFrontend":
        return cls(dial(path), **kwargs)  # type: ignore[arg-type]

    # -- messages -------------------------------------------------------------------------------
    def exchange(self, req: int, payload: vu.Payload | None = None, fds: Sequence[int] = (),
                 timeout: float = 5.0) -> vu.Message | None:
        """Send a request and return its reply message (None if it has none).  With REPLY_ACK
        negotiated every request without a reply of its own asks for a status, as UML does;
        a non-zero status raises `DriverError`."""
        ack = bool(self.protocol & P.REPLY_ACK) and not vu.has_own_reply(req)
        reply = self.conn.request(vu.request(req, payload, need_reply=ack, fds=fds), timeout)
        if reply is not None and ack:
            assert isinstance(reply.payload, vu.U64Value)
            if reply.payload.value:
                raise DriverError(f"backend refused {reply.name} (status {reply.payload.value})")
            return None
        return reply

    def call(self, req: int, payload: vu.Payload | None = None, fds: Sequence[int] = (),
             timeout: float = 5.0) -> vu.Payload | None:
        """`exchange` for the requests whose reply carries no fd: the reply's payload."""
        reply = self.exchange(req, payload, fds, timeout)
        if reply is None:
            return None
        close_fds(reply.fds)
        return reply.payload

    def handshake(self) -> None:
        """What QEMU and UML do first: features, protocol features, owner, backend channel."""
        features = self.call(R.GET_FEATURES)
        assert isinstance(features, vu.U64Value)
        self.features = features.value
        self.protocol = 0
        if self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            offered = self.call(R.GET_PROTOCOL_FEATURES)
            assert isinstance(offered, vu.U64Value)
            wanted = offered.value & int(self.wanted_protocol)
            self.protocol = wanted  # REPLY_ACK already applies to SET_PROTOCOL_FEATURES (UML)
            self.call(R.SET_PROTOCOL_FEATURES, vu.U64Value(wanted))
        if self.protocol & P.MQ:
            count = self.call(R.GET_QUEUE_NUM)
            assert isinstance(count, vu.U64Value)
            if count.value < self.queues:
                raise DriverError(f"backend has {count.value} queues, we need {self.queues}")
        self.call(R.SET_OWNER)
        if self.protocol & P.SLAVE_REQ:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.call(R.SET_SLAVE_REQ_FD, fds=[theirs.fileno()])
            finally:
                theirs.close()
            if self.channel is not None:
                self.channel.close()
            self.channel = VhostUserSocket(ours, vu.Channel.BACKEND, incoming="requests")

    def get_config(self, offset: int, size: int, *, from_zero: bool = False) -> bytes:
        """GET_CONFIG; `from_zero` asks the UML way (offset 0, size offset+size)."""
        start, length = (0, offset + size) if from_zero else (offset, size)
        reply = self.call(R.GET_CONFIG, vu.Config(start, length, 0, bytes(length)))
        if not isinstance(reply, vu.Config):
            raise DriverError(f"GET_CONFIG {start}+{length} failed (empty reply)")
        if (reply.offset, reply.size) != (start, length):
            raise DriverError(f"GET_CONFIG answered {reply.offset}+{reply.size}, asked {start}+{length}")
        return reply.data[offset - start:offset - start + size]

    def set_config(self, offset: int, data: bytes) -> None:
        self.call(R.SET_CONFIG, vu.Config(offset, len(data), 0, data))

    def set_mem_table(self) -> None:
        regions = tuple(vu.MemoryRegion(s.guest_phys_addr, s.size,
                                        s.guest_phys_addr + self.user_offset, s.file_offset)
                        for s in self.specs)
        self.call(R.SET_MEM_TABLE, vu.MemoryTable(regions), fds=[self.memfd] * len(regions))

    def setup_inflight(self, queue_size: int) -> None:
        """GET_INFLIGHT_FD once (the buffer outlives backends), SET_INFLIGHT_FD on every connection."""
        if not self.protocol & P.INFLIGHT_SHMFD:
            return
        if self.inflight is None:
            reply = self.exchange(R.GET_INFLIGHT_FD, vu.Inflight(0, 0, self.queues, queue_size))
            assert reply is not None and isinstance(reply.payload, vu.Inflight)
            if reply.payload.mmap_size == 0:
                raise DriverError("backend offered INFLIGHT_SHMFD but gave no buffer")
            self.inflight = (reply.fds[0], reply.payload)
        fd, desc = self.inflight
        self.call(R.SET_INFLIGHT_FD, desc, fds=[fd])

    def user_addr(self, gpa: int) -> int:
        return gpa + self.user_offset

    # -- the backend channel ------------------------------------------------------------------------
    def poll_backend_channel(self, timeout: float = 0.0) -> list[vu.Message]:
        """Answer the backend's requests that arrived (REPLY_ACK 0 when asked); return them."""
        got: list[vu.Message] = []
        while self.channel is not None:
            try:
                msg = self.channel.recv(timeout)
            except TransportTimeout:
                break
            timeout = 0.0
            got.append(msg)
            if msg.need_reply:
                self.channel.send(vu.ack(msg))
        self.backend_requests += got
        return got

    # -- rings ---------------------------------------------------------------------------------------
    def program_ring(self, q: DriverQueue, base: int) -> None:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK, then ENABLE 1 (UML's and QEMU's order)."""
        i = q.index
        self.call(R.SET_VRING_NUM, vu.VringState(i, q.size))
        self.call(R.SET_VRING_BASE, vu.VringState(i, base))
        self.call(R.SET_VRING_ADDR, vu.VringAddr(i, 0, self.user_addr(q.desc), self.user_addr(q.used),
                                                 self.user_addr(q.avail), 0))
        self.call(R.SET_VRING_CALL, vu.VringFd(i, False), fds=[self.calls[i]])
        self.call(R.SET_VRING_KICK, vu.VringFd(i, False), fds=[self.kicks[i]])
        if self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            self.call(R.SET_VRING_ENABLE, vu.VringState(i, 1))

    def stop(self) -> dict[int, int]:
        """A clean stop (QEMU's): disable every ring, then GET_VRING_BASE (which stops it)."""
        for i in reversed(sorted(self.driver.queues)):
            self.call(R.SET_VRING_ENABLE, vu.VringState(i, 0))
        for i in sorted(self.driver.queues):
            state = self.call(R.GET_VRING_BASE, vu.VringState(i, 0))
            assert isinstance(state, vu.VringState)
            self.bases[i] = state.num
        return dict(self.bases)

    def reconnect(self, sock: socket.socket) -> None:
        """Continue with a fresh backend on `sock`: same guest memory, rings and inflight buffer.

        A ring resumes at the base a clean `stop()` returned, or else (the backend crashed) at
        the used index in guest memory, as QEMU does; with INFLIGHT_SHMFD the backend then
        resubmits what was in flight."""
        self.conn.close()
        self.conn = VhostUserSocket(sock, vu.Channel.FRONTEND, incoming="replies")
        self.handshake()
        self.call(R.SET_FEATURES, vu.U64Value(self.driver.negotiated
                                              | (self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES)))
        queues = [self.driver.queues[i] for i in sorted(self.driver.queues)]
        if queues:
            self.setup_inflight(queues[0].size)
        self.set_mem_table()
        for q in queues:
            self.program_ring(q, self.bases.pop(q.index, q.used_idx()))

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def wait_call(self, index: int, timeout: float = 2.0) -> bool:
        """True if the backend signalled ring `index`'s call fd in time (and consume it)."""
        if not select.select([self.calls[index]], [], [], timeout)[0]:
            return False
        os.eventfd_read(self.calls[index])
        return True

    def close(self) -> None:
        self.conn.close()
        if self.channel is not None:
            self.channel.close()
        if self.inflight is not None:
            os.close(self.inflight[0])
            self.inflight = None
        close_fds(self.kicks + self.calls)
        self.memory.close()
        os.close(self.memfd)

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_registers(*_: object) -> None:
    raise DriverError("a vhost-user device has no register file: use the frontend's messages")


class VhostUserDriver(VirtioDriver):
    """`VirtioDriver` with the transport part done over vhost-user: the request helpers
    (blk_*, rng_read, console_*) and the ring layout are the ones the MMIO tests use."""

    def __init__(self, frontend: VhostUserFrontend, *, ram_size: int) -> None:
        super().__init__(_no_registers, _no_registers, frontend.memory, ram_size=ram_size,
                         kick=frontend.kick)
        self.frontend = frontend

    def reset(self) -> None:
        """A driver reset as UML makes one: rings forgotten, features re-sent at the next init."""
        self.arena.floor = self.arena.pos = 0
        self.queues.clear()
        self.negotiated = 0

    def negotiate(self, features: int | None = None) -> int:
        self.reset()
        offered = self.frontend.features & ~vu.VHOST_USER_F_PROTOCOL_FEATURES
        wanted = offered if features is None else offered & features
        if not wanted & VIRTIO_F_VERSION_1:
            raise DriverError("the backend does not offer VIRTIO_F_VERSION_1")
        self.frontend.call(R.SET_FEATURES, vu.U64Value(
            wanted | (self.frontend.features & vu.VHOST_USER_F_PROTOCOL_FEATURES)))
        self.negotiated = wanted
        return wanted

    def setup_queue(self, index: int, size: int | None = None, *, desc: int | None = None,
                    avail: int | None = None, used: int | None = None, ready: bool = True) -> DriverQueue:
        size = 256 if size is None else size  # UML's MAX_SUPPORTED_QUEUE_SIZE
        desc, avail, used = self.alloc_rings(size, desc, avail, used)
        q = DriverQueue(self, index, max(size, 1), desc, avail, used)
        self.queues[index] = q
        if ready:
            self.frontend.program_ring(q, 0)
        return q

    def init(self, features: int | None = None, queue_sizes: dict[int, int] | None = None,
             num_queues: int | None = None) -> int:
        """SET_FEATURES, the inflight buffer, SET_MEM_TABLE, then every ring (QEMU's order)."""
        negotiated = self.negotiate(features)
        count = self.frontend.queues if num_queues is None else num_queues
        sizes = {i: (queue_sizes or {}).get(i, 256) for i in range(count)}
        if count:
            self.frontend.setup_inflight(max(sizes.values()))
        self.frontend.set_mem_table()
        for i in range(count):
            self.setup_queue(i, sizes[i])
        return negotiated

    def driver_ok(self) -> None:
        """Nothing to do: vhost-user has no status register (rings start with their kick)."""

    def read_config(self, offset: int, size: int) -> bytes:
        return self.frontend.get_config(offset, size)

    @property
    def status(self) -> int:
        raise DriverError("vhost-user has no device status (no DEVICE_NEEDS_RESET either)")

    @property
    def needs_reset(self) -> bool:
        return False
