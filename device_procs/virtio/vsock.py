"""virtio-vsock (VIRTIO 1.2 §5.10), device side, stream sockets only: rx 0, tx 1, event 2.

The device never creates a socket or opens a path.  Host ends of connections come, already
connected, from the *broker* (the trusted core) over an AF_UNIX SOCK_SEQPACKET socket; one
msgpack map per datagram, fds by SCM_RIGHTS:

    broker -> device  {"op": "host_connect", "port": P, "host_port": H} + 1 fd
        a host program wants guest port P: REQUEST (2:H -> cid:P) goes to the guest; on its
        RESPONSE "OK H\\n" is written to the fd (Firecracker's protocol), on RST the fd closes.
    device -> broker  {"op": "guest_connect", "id": N, "port": P}
        the guest sent REQUEST to host port P;
    broker -> device  {"op": "connected", "id": N} + 1 fd   -> RESPONSE to the guest
                      {"op": "refused", "id": N}            -> RST to the guest (ECONNRESET)

Per-connection logic and credit live in `vsock_conn` (sans-I/O), the header in `vsock_packet`.
Driven by the host loop (see `VirtioDevice`): `poll_fds()` lists the broker (POLLIN, always), each
connection fd with POLLIN while the guest has credit for us and rx buffers are posted (none
posted: no POLLIN at all until the next rx kick, as net does) and POLLOUT while guest bytes wait
for it; `next_deadline_ns()` is the earliest connect timeout.

Choices:
- Guest payload goes from guest memory straight to the host fd (writev); what the fd does not
  take is copied and kept, at most BUF_ALLOC bytes per connection: the credit we advertise says
  so, and a guest that sends beyond it is reset (`over_limit`).
- Host bytes are read straight into the guest's rx buffers (readv after the header), so the
  device never holds a data packet; control packets (RESPONSE, CREDIT_UPDATE, SHUTDOWN, RST...)
  wait as per-connection flags (bounded by max_connections) and go out before data.  RSTs for
  flows that have no connection wait in a deque of MAX_REPLIES; when it is full, the tx queue is
  not processed until rx buffers drain it (§5.10.6.1: further processing stops rather than
  consume unbounded resources).
- A malformed transmit (short header, bad len, not from guest_cid to CID 2, bad type or op) is
  dropped and counted, never DEVICE_NEEDS_RESET; a bad type or op also gets an RST (§5.10.6.4).
- Reset closes every connection fd and sends nothing; the event queue's buffers are kept for a
  TRANSPORT_RESET (`transport_reset()`), sent when this process replaces one that died.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from ipc_protocol.guest_memory import GuestMemory
from ipc_protocol.transport.fds import fds_from_ancdata

from .device import COMMON_FEATURES, Interrupt, VirtioDevice
from .errors import DeviceSpecError
from .queue import DescriptorChain, Queue, slice_views, write_stream
from .vsock_conn import State, Verdict, VsockConnection
from .vsock_packet import (EVENT, HEADER_SIZE, MAX_CID, MAX_PAYLOAD, RESERVED_CIDS,
                           VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
                           VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST,
                           VIRTIO_VSOCK_OP_RST, VsockHeader, pack_event, rst_reply,
                           tx_drop_reason)

log = logging.getLogger(__name__)

VIRTIO_ID_VSOCK = 19  # §5.10.1
RXQ = 0
TXQ = 1
EVENTQ = 2
QUEUE_SIZE = 256
EVENT_QUEUE_SIZE = 256  # vhost-user frontends (UML) size every ring 256
CONFIG = struct.Struct("<Q")  # struct virtio_vsock_config { le64 guest_cid; } (§5.10.4)

# RSTs for flows without a connection waiting for rx buffers; at this many, tx stops (§5.10.6.1).
MAX_REPLIES = 64
# Packets read from one host fd per wake-up, broker messages per wake-up: one busy peer cannot
# starve the others or register accesses; the fd stays ready and the next poll comes back.
RX_BUDGET = 32
BROKER_BUDGET = 32
MAX_BROKER_MESSAGE = 512
MAX_BROKER_FDS = 4  # room to receive (and close) a few more than the one a message may carry
# Rounds of "deliver replies, resume tx" after one queue event (each round is bounded too).
MAX_ROUNDS = 8
IOV_MAX = 1024  # readv/writev take at most this many buffers

COUNTERS = ("connections_opened", "connections_refused", "connection_limit", "rst_sent",
            "packets_dropped", "dropped_short_header", "dropped_bad_len", "dropped_bad_cid",
            "dropped_bad_type", "dropped_bad_op", "no_connection", "bytes_to_host",
            "bytes_to_guest", "credit_updates", "credit_requests", "over_limit",
            "protocol_errors", "host_errors", "connect_timeouts", "broker_errors",
            "rx_bad_buffers", "rx_starved", "tx_blocked", "events")


@dataclass(eq=False)
class _Link:
    """A connection and the host fd it runs on (None until the broker answers, or once closed)."""

    conn: VsockConnection
    sock: socket.socket | None = None
    broker_id: int | None = None
    queued: bool = False  # in `_ctrl` (has control packets to deliver)


def _check_cid(cid: Any) -> int:
    if type(cid) is not int or not 0 <= cid <= MAX_CID or cid in RESERVED_CIDS:
        raise DeviceSpecError(f"vsock: cid {cid!r} is not a guest CID: use 3..{MAX_CID - 1} "
                              "(0, 1, 2 and 0xffffffff are reserved, §5.10.4)")
    return cid


def _u32(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 0xFFFFFFFF


class VsockDevice(VirtioDevice):
    """A virtio-vsock device for guest `guest_cid`, fed connections over `broker_fd`."""

    device_type = VIRTIO_ID_VSOCK
    queue_max_sizes = [QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE]
    # §5.10.3: no feature bit -> streams only (SEQPACKET is not offered).
    device_features = COMMON_FEATURES

    def __init__(self, guest_cid: int, broker_fd: int, *, max_connections: int = 256,
                 owns_fd: bool = True, clock: Callable[[], int] = time.monotonic_ns) -> None:
        super().__init__()
        self.guest_cid = _check_cid(guest_cid)
        if type(max_connections) is not int or not 1 <= max_connections <= 65536:
            raise DeviceSpecError(f"vsock: max_connections {max_connections!r} is not in 1..65536")
        # Family and type given, not asked: the jail allows CPython's getsockname check of the
        # fd but not the getsockopt it would add to learn the type.  The broker is the core.
        try:
            broker = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=broker_fd)
        except OSError as e:
            raise DeviceSpecError(f"vsock: the broker fd is not usable ({e.strerror})") from None
        self.broker = broker
        self.max_connections = max_connections
        self._owns_fd = owns_fd
        self._broker_open = True
        self._clock = clock
        self.counters.update({name: 0 for name in COUNTERS})
        self._links: dict[tuple[int, int], _Link] = {}
        self._by_fd: dict[int, tuple[int, int]] = {}
        self._by_id: dict[int, tuple[int, int]] = {}
        self._next_id = 1
        self._clear_queues()

    def _clear_queues(self) -> None:
        self._ctrl: dict[tuple[int, int], None] = {}   # links with control packets, in order
        self._replies: deque[VsockHeader] = deque()     # RSTs for flows without a connection
        self._rx_held: DescriptorChain | None = None    # popped, nothing to put in it yet
        self._rx_starved = False   # the rx queue ran dry: wait for a kick, poll no fd for reading
        self._tx_blocked = False   # `_replies` was full: resume tx once rx delivered some
        self._read_key: tuple[int, int] | None = None  # the connection `on_ready` found readable
        self._event_pending = False

    # -- spec -----------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict[str, Any], fds: dict[str, int]) -> "VsockDevice":
        """{"type": "vsock", "cid": N, "max_connections": M (default 256)}; fd role "broker"
        (duplicated: the caller keeps its own)."""
        if "broker" not in fds:
            raise DeviceSpecError("vsock: no broker fd was passed (the core makes the socket)")
        if "cid" not in spec:
            raise DeviceSpecError("vsock spec is missing required field 'cid'")
        cid = _check_cid(spec["cid"])
        max_connections = spec.get("max_connections", 256)
        fd = os.dup(fds["broker"])
        try:
            return cls(cid, fd, max_connections=max_connections)
        except BaseException:
            os.close(fd)
            raise

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.guest_cid)

    # -- lifecycle --------------------------------------------------------------------------------
    def activate(self, memory: GuestMemory, queues: list[Queue | None], interrupt: Interrupt) -> None:
        super().activate(memory, queues, interrupt)
        self._drop_connections()
        self._clear_queues()

    def reset(self) -> None:
        """§2.4: the driver is gone with every socket it had; nothing is sent."""
        super().reset()
        self._drop_connections()
        self._clear_queues()

    def close(self) -> None:
        self._drop_connections()
        if self._owns_fd:
            self.broker.close()
        elif self.broker.fileno() >= 0:
            self.broker.detach()
        self._broker_open = False

    def _drop_connections(self) -> None:
        for link in self._links.values():
            self._close_fd(link)
        self._links.clear()
        self._by_fd.clear()
        self._by_id.clear()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(connections=len(self._links), pending_replies=len(self._replies),
                   broker_open=self._broker_open)
        return out

    def _queue(self, index: int) -> Queue | None:
        if not self.active or self.broken or index >= len(self.queues):
            return None
        return self.queues[index]

    # -- host loop hooks ---------------------------------------------------------------------------
    def poll_fds(self) -> list[tuple[int, int]]:
        out = [(self.broker.fileno(), select.POLLIN)] if self._broker_open else []
        reading = not self._rx_starved and self._queue(RXQ) is not None
        writing = self._queue(TXQ) is not None
        for link in self._links.values():
            if link.sock is None:
                continue
            events = 0
            if reading and link.conn.read_budget() > 0:
                events |= select.POLLIN
            if writing and link.conn.wants_write():
                events |= select.POLLOUT
            if events:
                out.append((link.sock.fileno(), events))
        return out

    def on_ready(self, fd: int, events: int) -> bool:
        if self._broker_open and fd == self.broker.fileno():
            self._on_broker()
            return self.process_queue(RXQ)
        key = self._by_fd.get(fd)
        link = self._links.get(key) if key is not None else None
        if link is None or link.sock is None:
            return False
        # POLLERR/POLLHUP come whatever we asked for: the write or read sees the error.
        failed = bool(events & (select.POLLERR | select.POLLHUP))
        if events & select.POLLOUT or (failed and link.conn.wants_write()):
            self._flush(link)
        if events & select.POLLIN or failed:
            self._read_key = key
        try:
            return self.process_queue(RXQ)
        finally:
            self._read_key = None

    def next_deadline_ns(self) -> int | None:
        deadlines = [link.conn.deadline_ns for link in self._links.values()
                     if link.conn.deadline_ns is not None]
        return min(deadlines) if deadlines else None

    def on_timer(self, now_ns: int) -> bool:
        for link in [ln for ln in self._links.values() if ln.conn.expired(now_ns)]:
            self.counters["connect_timeouts"] += 1
            self.counters["connections_refused"] += 1
            self._abort(link)
        return self.process_queue(RXQ)

    # -- queues ----------------------------------------------------------------------------------
    def process_queue(self, index: int) -> bool:
        used = super().process_queue(index)
        # Control packets a queue event made go out at once; tx stopped for want of room for
        # replies resumes once rx has taken some.  Each round is bounded, and so are the rounds.
        for _ in range(MAX_ROUNDS):
            more = False
            if (self._replies or self._ctrl) and not self._rx_starved:
                more |= super().process_queue(RXQ)
            if self._tx_blocked and len(self._replies) < MAX_REPLIES:
                more |= super().process_queue(TXQ)
            if not more:
                break
            used = True
        return used

    def drain_queue(self, index: int, queue: Queue) -> bool:
        if index == RXQ:
            return self._drain_rx(queue)
        if index == TXQ:
            return self._drain_tx(queue)
        return self._drain_event(queue)

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        raise AssertionError("vsock drains its queues itself")  # pragma: no cover

    def on_resumed(self) -> None:
        # The predecessor's connections died with it (their host ends were its fds): the
        # guest must drop its sockets rather than wait on them forever.
        self.transport_reset()

    def transport_reset(self) -> bool:
        """Tell the driver its connections are gone (§5.10.6, Device Events), e.g. when this
        device replaces one that died; True if an event buffer was used."""
        self._event_pending = True
        return self.process_queue(EVENTQ)

    def _drain_event(self, queue: Queue) -> bool:
        """Event buffers stay posted until there is an event (§5.10.5: the driver fills the
        event queue at initialisation); without one nothing is popped."""
        used = False
        while self._event_pending:
            chain = queue.pop()
            if chain is None:
                if queue.enable_notification():
                    continue
                return used  # the event waits for a buffer (the next kick of this queue)
            self.counters["chains"] += 1
            used = True
            if chain.writable_len < EVENT.size:
                self.counters["rx_bad_buffers"] += 1
                queue.add_used(chain.head, 0)
                continue
            self._deliver_event(queue, chain)
        return used

    def _deliver_event(self, queue: Queue, chain: DescriptorChain) -> None:
        self._event_pending = False
        write_stream(chain.writable_views, 0, pack_event(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
        queue.add_used(chain.head, EVENT.size)
        self.counters["events"] += 1

    # -- transmit: packets from the guest (§5.10.6.4) ---------------------------------------------
    def _drain_tx(self, queue: Queue) -> bool:
        used = False
        self._tx_blocked = False
        while True:
            if len(self._replies) >= MAX_REPLIES:
                # §5.10.6.1: no room left for replies: stop until rx buffers take them.
                self._tx_blocked = True
                self.counters["tx_blocked"] += 1
                return used
            chain = queue.pop()
            if chain is None:
                if not queue.enable_notification():
                    return used
                continue
            self.counters["chains"] += 1
            self._handle_tx(chain)
            queue.add_used(chain.head, 0)  # §2.7.8: the device wrote nothing
            used = True

    def _drop(self, reason: str) -> None:
        self.counters["packets_dropped"] += 1
        self.counters[f"dropped_{reason}"] += 1

    def _handle_tx(self, chain: DescriptorChain) -> None:
        """One transmitted packet: check it, then act on its flow.  (Writable buffers on the tx
        queue are ignored: §5.10.6.4 says tx buffers are read-only.)"""
        if chain.readable_len < HEADER_SIZE:
            self._drop("short_header")
            return
        raw = b"".join(bytes(v) for v in slice_views(chain.readable_views, 0, HEADER_SIZE))
        hdr = VsockHeader.parse(raw)
        reason = tx_drop_reason(hdr, chain.readable_len - HEADER_SIZE, self.guest_cid)
        if reason is not None:
            self._drop(reason)
            if reason in ("bad_type", "bad_op"):
                # §5.10.6.4.2: an unknown type gets RST; so does an op we cannot follow.
                self._reset_flow(hdr)
            return
        key = (hdr.dst_port, hdr.src_port)
        link = self._links.get(key)
        if hdr.op == VIRTIO_VSOCK_OP_REQUEST and (link is None or link.conn.state is State.CLOSED):
            if link is not None:
                self._forget(link)  # the guest moved on before our RST reached it
            self._guest_request(hdr)
            return
        if link is None:
            # No such connection: RST, as Linux answers a packet for no socket (§5.10.6.5:
            # RST "forcibly disconnects"); never an RST to an RST.
            self.counters["no_connection"] += 1
            self._reply_rst(hdr)
            return
        self._on_guest_packet(link, hdr, chain)

    def _on_guest_packet(self, link: _Link, hdr: VsockHeader, chain: DescriptorChain) -> None:
        connecting = link.conn.state is State.HOST_CONNECTING
        verdict = link.conn.receive(hdr)
        if verdict is Verdict.DATA:
            self._to_host(link, slice_views(chain.readable_views, HEADER_SIZE, hdr.len), hdr.len)
        elif verdict is Verdict.CONNECTED:
            self.counters["connections_opened"] += 1
            self._flush(link)  # the "OK H" line
        elif verdict is Verdict.FORGET:
            if connecting:
                self.counters["connections_refused"] += 1  # nobody listens on that guest port
            self._forget(link)
            return
        elif verdict is Verdict.OVER_LIMIT:
            self.counters["over_limit"] += 1
        elif verdict is Verdict.RESET:
            self.counters["protocol_errors"] += 1
        self._settle(link)

    def _reset_flow(self, hdr: VsockHeader) -> None:
        """RST for the flow of `hdr` (its addresses passed `tx_drop_reason`)."""
        link = self._links.get((hdr.dst_port, hdr.src_port))
        if link is not None:
            self._abort(link)
        else:
            self._reply_rst(hdr)

    def _reply_rst(self, to: VsockHeader) -> None:
        if to.op != VIRTIO_VSOCK_OP_RST:  # never answer an RST with one (no ping-pong)
            self._replies.append(rst_reply(to))

    def _guest_request(self, hdr: VsockHeader) -> None:
        """The guest connects to host port `hdr.dst_port`: ask the broker (§5.10.6.5)."""
        if len(self._links) >= self.max_connections:
            self.counters["connection_limit"] += 1
            self.counters["connections_refused"] += 1
            self._reply_rst(hdr)  # "insufficient resources to establish the connection"
            return
        conn_id = self._next_id
        self._next_id = (self._next_id % 0x7FFFFFFF) + 1
        if not self._to_broker({"op": "guest_connect", "id": conn_id, "port": hdr.dst_port}):
            self.counters["connections_refused"] += 1
            self._reply_rst(hdr)
            return
        link = _Link(VsockConnection.guest_initiated(hdr, self._clock()), broker_id=conn_id)
        self._links[link.conn.key] = link
        self._by_id[conn_id] = link.conn.key

    # -- receive: packets to the guest ------------------------------------------------------------
    def _drain_rx(self, queue: Queue) -> bool:
        # Entered on a kick (buffers were added), a ready fd or the timer: no longer starved.
        self._rx_starved = False
        used = self._deliver_control(queue)
        if self._read_key is not None and not self._rx_starved:
            link = self._links.get(self._read_key)
            if link is not None and link.sock is not None:
                used |= self._read_host(queue, link)
            used |= self._deliver_control(queue)  # a SHUTDOWN or RST the read caused
        return used

    def _pop_rx(self, queue: Queue) -> DescriptorChain | None:
        """The next rx buffer with room for a header and payload; None (starved) when dry."""
        chain, self._rx_held = self._rx_held, None
        while chain is None:
            chain = queue.pop()
            if chain is None:
                if queue.enable_notification():
                    continue
                if not self._rx_starved:
                    self.counters["rx_starved"] += 1
                self._rx_starved = True
                return None
            self.counters["chains"] += 1
            if chain.writable_len <= HEADER_SIZE:
                # No room for a payload (Linux posts 4 KiB): given back empty rather than kept,
                # since a buffer no data fits in would stall reads; not worth a device reset.
                self.counters["rx_bad_buffers"] += 1
                queue.add_used(chain.head, 0)
                chain = None
        return chain

    def _next_control(self) -> tuple[VsockHeader, _Link | None] | None:
        if self._replies:
            return self._replies.popleft(), None
        while self._ctrl:
            key = next(iter(self._ctrl))
            del self._ctrl[key]
            link = self._links.get(key)
            if link is None:
                continue
            link.queued = False
            hdr = link.conn.take_control()
            if hdr is None:
                continue
            if link.conn.has_control():  # round robin: its next packet waits behind the others
                self._schedule(link)
            return hdr, link
        return None

    def _deliver_control(self, queue: Queue) -> bool:
        used = False
        while self._replies or self._ctrl:
            chain = self._pop_rx(queue)
            if chain is None:
                return used
            item = self._next_control()
            if item is None:
                self._rx_held = chain
                return used
            hdr, link = item
            self._put(queue, chain, hdr, 0)
            used = True
            if hdr.op == VIRTIO_VSOCK_OP_RST:
                self.counters["rst_sent"] += 1
                if link is not None:
                    self._forget(link)  # RST is the last packet of a flow
            elif hdr.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
                self.counters["credit_updates"] += 1
            elif hdr.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
                self.counters["credit_requests"] += 1
        return used

    def _put(self, queue: Queue, chain: DescriptorChain, hdr: VsockHeader, payload: int) -> None:
        write_stream(chain.writable_views, 0, hdr.pack())
        queue.add_used(chain.head, HEADER_SIZE + payload)

    def _read_host(self, queue: Queue, link: _Link) -> bool:
        """Read from the host fd into rx buffers as RW packets, within the guest's credit."""
        used = False
        conn = link.conn
        for _ in range(RX_BUDGET):
            budget = min(conn.read_budget(), MAX_PAYLOAD)
            if budget <= 0 or link.sock is None:
                break
            chain = self._pop_rx(queue)
            if chain is None:
                break
            views = slice_views(chain.writable_views, HEADER_SIZE, budget)[:IOV_MAX]
            n = self._readv(link, views)
            if n is None or n == 0:
                self._rx_held = chain
                break
            self._put(queue, chain, conn.sent_data(n), n)
            self.counters["bytes_to_guest"] += n
            used = True
            if n < sum(len(v) for v in views):
                break  # the fd is drained for now
        self._settle(link)
        return used

    def _readv(self, link: _Link, views: list[memoryview]) -> int | None:
        """Bytes read into `views`; 0 at end of file, None if there is nothing to read."""
        assert link.sock is not None
        try:
            n = os.readv(link.sock.fileno(), views)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._host_error(link, "read", e)
            return None
        if n == 0:
            link.conn.on_host_eof()
        return n

    # -- guest bytes to the host fd ---------------------------------------------------------------
    def _to_host(self, link: _Link, views: list[memoryview], length: int) -> None:
        conn = link.conn
        written = 0
        if conn.can_write_direct() and link.sock is not None and length:
            try:
                written = os.writev(link.sock.fileno(), views[:IOV_MAX])
            except BlockingIOError:
                written = 0
            except OSError as e:
                self._host_error(link, "write", e)
                return
            conn.forwarded_direct(written)
            self.counters["bytes_to_host"] += written
        if written < length:
            conn.buffer(b"".join(bytes(v) for v in slice_views(views, written)))

    def _flush(self, link: _Link) -> None:
        """Write what waits for the host fd, until it would block."""
        conn = link.conn
        while conn.wants_write() and link.sock is not None:
            data = conn.next_to_host()
            try:
                n = os.write(link.sock.fileno(), data)
            except BlockingIOError:
                break
            except OSError as e:
                self._host_error(link, "write", e)
                return
            payload = not conn.preamble
            conn.wrote(n)
            if payload:
                self.counters["bytes_to_host"] += n
            if n < len(data):
                break
        self._settle(link)

    def _host_error(self, link: _Link, what: str, err: OSError) -> None:
        # EPIPE/ECONNRESET: the host program is gone; anything else is no better.
        self.counters["host_errors"] += 1
        if err.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("vsock: host %s on port %d failed: %s", what, link.conn.host_port, err)
        self._abort(link)

    # -- connection bookkeeping ------------------------------------------------------------------
    def _settle(self, link: _Link) -> None:
        """Carry out what the connection's state now asks for."""
        conn = link.conn
        if conn.state is not State.CLOSED:
            if conn.host_write_due() and link.sock is not None:
                try:
                    link.sock.shutdown(socket.SHUT_WR)  # the host program reads end of file
                except OSError:
                    pass
                conn.host_write_shut = True
            if conn.finished():
                self._close_fd(link)
                conn.close_clean()
        if conn.state is State.CLOSED:
            self._close_fd(link)
            if not conn.has_control():
                self._forget(link)
                return
        if conn.has_control():
            self._schedule(link)

    def _schedule(self, link: _Link) -> None:
        if not link.queued:
            link.queued = True
            self._ctrl[link.conn.key] = None

    def _abort(self, link: _Link) -> None:
        link.conn.abort()
        self._settle(link)

    def _close_fd(self, link: _Link) -> None:
        if link.sock is not None:
            self._by_fd.pop(link.sock.fileno(), None)
            link.sock.close()
            link.sock = None

    def _forget(self, link: _Link) -> None:
        self._close_fd(link)
        key = link.conn.key
        if self._links.get(key) is link:
            del self._links[key]
        self._ctrl.pop(key, None)
        link.queued = False
        if link.broker_id is not None:
            self._by_id.pop(link.broker_id, None)

    def _attach(self, link: _Link, fd: int) -> bool:
        """Take `fd` as the link's host end (non-blocking); False (fd closed) if unusable."""
        # Family, type and protocol given: CPython would otherwise ask getsockopt, which the jail
        # does not allow (the broker, trusted, only passes connected streams).
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
        except OSError:
            os.close(fd)
            return False
        # The fd comes from the broker and is ours alone, so setting O_NONBLOCK is safe.
        if os.get_blocking(fd):
            os.set_blocking(fd, False)
        link.sock = sock
        self._by_fd[fd] = link.conn.key
        return True

    # -- the broker ----------------------------------------------------------------------------------
    def _to_broker(self, message: dict[str, Any]) -> bool:
        if not self._broker_open:
            return False
        try:
            self.broker.sendmsg([msgpack.packb(message)], [],
                                socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            return True
        except OSError as e:
            self.counters["broker_errors"] += 1
            log.warning("vsock: cannot reach the broker: %s", e)
            return False

    def _on_broker(self) -> None:
        for _ in range(BROKER_BUDGET):
            got = self._recv_broker()
            if got is None:
                return
            message, fds = got
            if not self._broker_message(message, fds):
                # The broker is trusted, so this is a bug there; it must not kill the device.
                for fd in fds:
                    os.close(fd)
                self.counters["broker_errors"] += 1
                log.warning("vsock: bad broker message %r with %d fds", message, len(fds))

    def _recv_broker(self) -> tuple[Any, list[int]] | None:
        """One broker message and its fds (message None: unusable); None when there is none
        (or the broker is gone: then it is not polled any more)."""
        try:
            data, ancdata, flags, _ = self.broker.recvmsg(
                MAX_BROKER_MESSAGE, socket.CMSG_SPACE(4 * MAX_BROKER_FDS),
                socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            log.warning("vsock: broker socket failed: %s", e)
            self._broker_open = False
            return None
        fds, other = fds_from_ancdata(ancdata)
        if not data and not fds:
            log.info("vsock: the broker closed its socket")
            self._broker_open = False
            return None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or other:
            return None, fds
        try:
            return msgpack.unpackb(data, raw=False), fds
        except Exception:
            return None, fds

    def _broker_message(self, message: Any, fds: list[int]) -> bool:
        """Act on one broker message; False (nothing done, fds not taken) if it is malformed."""
        op = message.get("op") if isinstance(message, dict) else None
        if op == "host_connect" and len(fds) == 1 and _u32(message.get("port")) \
                and _u32(message.get("host_port")):
            self._host_connect(message["port"], message["host_port"], fds[0])
        elif op == "connected" and len(fds) == 1 and _u32(message.get("id")):
            self._broker_connected(message["id"], fds[0])
        elif op == "refused" and not fds and _u32(message.get("id")):
            self._broker_refused(message["id"])
        else:
            return False
        return True

    def _host_connect(self, port: int, host_port: int, fd: int) -> None:
        """A host program asked for guest port `port`: REQUEST goes to the guest."""
        key = (host_port, port)
        if not self.active or self.broken or len(self._links) >= self.max_connections \
                or key in self._links:
            if self.active and len(self._links) >= self.max_connections:
                self.counters["connection_limit"] += 1
            self.counters["connections_refused"] += 1
            os.close(fd)  # the host program reads end of file
            return
        link = _Link(VsockConnection.host_initiated(host_port, port, self.guest_cid, self._clock()))
        if not self._attach(link, fd):
            self.counters["connections_refused"] += 1
            return
        self._links[key] = link
        self._schedule(link)

    def _broker_connected(self, conn_id: int, fd: int) -> None:
        key = self._by_id.pop(conn_id, None)
        link = self._links.get(key) if key is not None else None
        if link is None or link.conn.state is not State.GUEST_CONNECTING:
            os.close(fd)  # the guest gave up (RST, timeout, reset) meanwhile
            return
        link.broker_id = None
        if not self._attach(link, fd):
            self.counters["connections_refused"] += 1
            self._abort(link)
            return
        link.conn.broker_connected()
        self.counters["connections_opened"] += 1
        self._settle(link)

    def _broker_refused(self, conn_id: int) -> None:
        key = self._by_id.pop(conn_id, None)
        link = self._links.get(key) if key is not None else None
        if link is not None and link.conn.state is State.GUEST_CONNECTING:
            link.broker_id = None
            self.counters["connections_refused"] += 1
            self._abort(link)
