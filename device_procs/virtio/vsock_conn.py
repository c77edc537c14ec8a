"""One virtio-vsock stream connection, device side (VIRTIO 1.2 §5.10.6.3, §5.10.6.5), sans-I/O.

`VsockConnection` is the state machine and the credit accounting of one flow between a host
program (a connected stream fd the device holds; this module never sees it) and a guest socket.
Events come in as method calls (a packet from the guest, bytes read from or written to the host
fd, the broker's answer, a timeout); what must go out comes back as values: a `Verdict`, the
control packets in `take_control()`, bytes in `next_to_host()`.  The device does the I/O.

States:
    HOST_CONNECTING   a host program connected: we sent (or will send) REQUEST, await RESPONSE
    GUEST_CONNECTING  the guest sent REQUEST: we asked the broker, await its answer
    ESTABLISHED       data flows both ways (each direction may already be shut)
    CLOSING           nothing more will flow either way; queued bytes still go to the host
    CLOSED            the host fd is gone; at most our final SHUTDOWN/RST is left to deliver

Credit (§5.10.6.3): we advertise `BUF_ALLOC` bytes of receive space and `fwd_cnt`, the bytes we
wrote to the host fd.  The guest may have at most BUF_ALLOC bytes unacknowledged by the fwd_cnt
we last told it; a packet beyond that resets the connection (`Verdict.OVER_LIMIT`), so what we
buffer for a host that does not read is bounded by BUF_ALLOC.  We send the guest only
`peer_free()` bytes, from the buf_alloc/fwd_cnt in its latest packet.
"""

from __future__ import annotations

import enum

from .vsock_packet import (SHUTDOWN_BOTH, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
                           VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST,
                           VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW,
                           VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV,
                           VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST,
                           VsockHeader)

U32 = 0xFFFFFFFF
# Our receive space per connection (Linux's default buffer size, VIRTIO_VSOCK_DEFAULT_BUF_SIZE).
BUF_ALLOC = 256 * 1024
# A CREDIT_UPDATE goes out once we forwarded this much since the guest last heard our fwd_cnt:
# a sender stalls only when it used all of BUF_ALLOC, so it never waits on us for long.
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 4
# How long a guest may take to answer our REQUEST (Firecracker waits 2 s), and the broker to
# answer a guest's; then the attempt is reset so a silent peer cannot pin a connection slot.
CONNECT_TIMEOUT_NS = 2_000_000_000
BROKER_TIMEOUT_NS = 10_000_000_000

# Control packets of one connection go out in this order: a SHUTDOWN or RST never overtakes
# the handshake, and RST is always the last packet of a flow.
CONTROL_ORDER = (VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                 VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_RST)


class State(enum.Enum):
    HOST_CONNECTING = "host_connecting"
    GUEST_CONNECTING = "guest_connecting"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


class Verdict(enum.Enum):
    """What the device does after a guest packet of this flow."""

    OK = "ok"                # nothing beyond sending what `take_control` now holds
    CONNECTED = "connected"  # RESPONSE to our REQUEST: established (count it)
    DATA = "data"            # RW accepted: forward its payload to the host fd
    RESET = "reset"          # protocol error: close the host fd; an RST is queued
    OVER_LIMIT = "over_limit"  # more than our credit allowed: as RESET, counted apart
    FORGET = "forget"        # the guest reset the flow: close the host fd, forget it


class VsockConnection:
    """The flow (host CID 2, `host_port`) <-> (`guest_cid`, `guest_port`); see the module doc."""

    def __init__(self, host_port: int, guest_port: int, guest_cid: int, state: State,
                 deadline_ns: int | None) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.guest_cid = guest_cid
        self.state = state
        self.deadline_ns = deadline_ns
        self.pending: set[int] = set()   # control ops to send (CONTROL_ORDER)
        # Our receive side: bytes the guest sent (rx_cnt) and we wrote to the host (fwd_cnt).
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.advertised_fwd_cnt = 0      # the fwd_cnt in the last packet we gave the guest
        self.preamble = b""              # "OK <port>\n" for the host program, before any data
        self.to_host = bytearray()       # guest payload not yet written to the host fd
        # Our send side: the guest's credit.
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.credit_requested = False    # a CREDIT_REQUEST is out and no credit came back yet
        self._update_asked = False       # the pending CREDIT_UPDATE answers a CREDIT_REQUEST
        # Shutdown (§5.10.6.5): what the guest told us (permanent), what happened on the host.
        self.guest_shut = 0
        self.host_eof = False
        self.host_write_shut = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def host_initiated(cls, host_port: int, guest_port: int, guest_cid: int,
                       now_ns: int) -> "VsockConnection":
        """A host program asked for `guest_port`: REQUEST goes to the guest."""
        conn = cls(host_port, guest_port, guest_cid, State.HOST_CONNECTING,
                   now_ns + CONNECT_TIMEOUT_NS)
        conn.pending.add(VIRTIO_VSOCK_OP_REQUEST)
        return conn

    @classmethod
    def guest_initiated(cls, request: VsockHeader, now_ns: int) -> "VsockConnection":
        """The guest's REQUEST to host port `request.dst_port`: the broker decides."""
        conn = cls(request.dst_port, request.src_port, request.src_cid, State.GUEST_CONNECTING,
                   now_ns + BROKER_TIMEOUT_NS)
        conn._peer_credit(request)
        return conn

    # -- credit (§5.10.6.3) -------------------------------------------------------------------
    def peer_free(self) -> int:
        """peer_free = peer_buf_alloc - (tx_cnt - peer_fwd_cnt), never below 0 (a peer claiming
        to have forwarded more than we sent gets no credit rather than a huge one)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def _peer_credit(self, hdr: VsockHeader) -> None:
        # §5.10.6.3.1: every packet of a stream carries valid buf_alloc and fwd_cnt.
        self.peer_buf_alloc, self.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if self.peer_free() > 0:
            self.credit_requested = False

    def _forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & U32
        if (self.fwd_cnt - self.advertised_fwd_cnt) & U32 >= CREDIT_UPDATE_THRESHOLD:
            self.pending.add(VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    # -- packets from the guest ---------------------------------------------------------------
    def receive(self, hdr: VsockHeader) -> Verdict:
        """A packet of this flow from the guest, already checked by `tx_drop_reason`."""
        op = hdr.op
        if self.state is State.CLOSED:
            # Our RST is on its way; only the guest's own RST matters now.
            return Verdict.FORGET if op == VIRTIO_VSOCK_OP_RST else Verdict.OK
        self._peer_credit(hdr)
        if op == VIRTIO_VSOCK_OP_RST:
            self.state, self.pending = State.CLOSED, set()
            return Verdict.FORGET
        if op == VIRTIO_VSOCK_OP_RESPONSE:
            return self._on_response()
        if op == VIRTIO_VSOCK_OP_RW:
            return self._on_data(hdr.len)
        if op == VIRTIO_VSOCK_OP_SHUTDOWN:
            return self._on_shutdown(hdr.flags)
        if op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            if self.state in (State.ESTABLISHED, State.CLOSING):
                self.pending.add(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
                self._update_asked = True
            return Verdict.OK
        if op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            return Verdict.OK
        return self._protocol_error()  # a second REQUEST on a live flow

    def _on_response(self) -> Verdict:
        if self.state is not State.HOST_CONNECTING or VIRTIO_VSOCK_OP_REQUEST in self.pending:
            return self._protocol_error()
        self.state, self.deadline_ns = State.ESTABLISHED, None
        # Firecracker's host protocol: the program that sent "CONNECT <port>" reads this line.
        self.preamble = b"OK %d\n" % self.host_port
        return Verdict.CONNECTED

    def _on_data(self, n: int) -> Verdict:
        if self.state is not State.ESTABLISHED or self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
            return self._protocol_error()  # before the handshake, or after "will not send"
        # §5.10.6.3.1: the driver sends RW only within the space we told it about.
        if (self.rx_cnt + n - self.advertised_fwd_cnt) & U32 > BUF_ALLOC:
            self.abort()
            return Verdict.OVER_LIMIT
        self.rx_cnt = (self.rx_cnt + n) & U32
        return Verdict.DATA

    def _on_shutdown(self, flags: int) -> Verdict:
        if self.state not in (State.ESTABLISHED, State.CLOSING):
            return self._protocol_error()
        # §5.10.6.5: the hints are permanent; later packets with bits clear do not reset them.
        self.guest_shut |= flags & SHUTDOWN_BOTH
        self._update_state()
        return Verdict.OK

    def _protocol_error(self) -> Verdict:
        self.abort()
        return Verdict.RESET

    # -- the broker, the host fd and the clock ------------------------------------------------
    def broker_connected(self) -> None:
        """The broker gave us the host end of a guest connection: RESPONSE goes out."""
        assert self.state is State.GUEST_CONNECTING
        self.state, self.deadline_ns = State.ESTABLISHED, None
        self.pending.add(VIRTIO_VSOCK_OP_RESPONSE)

    def expired(self, now_ns: int) -> bool:
        return self.deadline_ns is not None and now_ns >= self.deadline_ns

    def on_host_eof(self) -> None:
        """The host program will send no more: SHUTDOWN(SEND) to the guest (§5.10.6.5)."""
        if self.host_eof:
            return
        self.host_eof = True
        if not self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV:
            self.pending.add(VIRTIO_VSOCK_OP_SHUTDOWN)
        self._update_state()

    def sent_data(self, n: int) -> VsockHeader:
        """We put `n` bytes read from the host in an RW packet for the guest: its header."""
        assert 0 < n <= self.peer_free()
        self.tx_cnt = (self.tx_cnt + n) & U32
        if self.peer_free() == 0 and not self.credit_requested:
            # §5.10.6.3: out of credit; ask rather than wait for an update that may not come.
            self.credit_requested = True
            self.pending.add(VIRTIO_VSOCK_OP_CREDIT_REQUEST)
        return self._header(VIRTIO_VSOCK_OP_RW, n)

    def read_budget(self) -> int:
        """How many bytes we may read from the host fd for the guest now (0: do not poll)."""
        if (self.state is not State.ESTABLISHED or VIRTIO_VSOCK_OP_RESPONSE in self.pending
                or self.host_eof or self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV):
            return 0
        return self.peer_free()

    def wants_write(self) -> bool:
        return self.state in (State.ESTABLISHED, State.CLOSING) and self.has_to_host()

    def has_to_host(self) -> bool:
        return bool(self.preamble or self.to_host)

    def can_write_direct(self) -> bool:
        """Nothing queued: a payload may go from guest memory straight to the host fd."""
        return self.state is State.ESTABLISHED and not self.has_to_host()

    def forwarded_direct(self, n: int) -> None:
        """`n` payload bytes went straight to the host fd."""
        self._forwarded(n)
        self._update_state()

    def buffer(self, data: bytes | bytearray) -> None:
        """Payload the host fd did not take now (bounded by the credit check in `receive`)."""
        self.to_host += data

    def next_to_host(self) -> bytes | bytearray:
        """What to write to the host fd next (the preamble alone first, then payload)."""
        return self.preamble or self.to_host

    def wrote(self, n: int) -> None:
        """`n` bytes of `next_to_host()` were written."""
        if self.preamble:
            self.preamble = self.preamble[n:]
            return
        del self.to_host[:n]
        self._forwarded(n)
        self._update_state()

    def host_write_due(self) -> bool:
        """The guest will send no more and all it sent is written: shut the fd's write side
        so the host program reads end of file."""
        return (self.state in (State.ESTABLISHED, State.CLOSING) and not self.host_write_shut
                and bool(self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) and not self.has_to_host())

    def finished(self) -> bool:
        """Both directions are shut and flushed: close the fd, then `close_clean()`."""
        return self.state is State.CLOSING and not self.has_to_host()

    def _update_state(self) -> None:
        to_guest_done = self.host_eof or self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV
        if (self.state is State.ESTABLISHED and to_guest_done
                and self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND):
            self.state = State.CLOSING

    # -- closing ------------------------------------------------------------------------------
    def guest_knows(self) -> bool:
        """Whether the guest has heard of this flow (our REQUEST may not have gone out yet)."""
        return not (self.state is State.HOST_CONNECTING and VIRTIO_VSOCK_OP_REQUEST in self.pending)

    def close_clean(self) -> None:
        """Both sides are done (§5.10.6.5 clean disconnect): a pending SHUTDOWN, then RST."""
        self.pending &= {VIRTIO_VSOCK_OP_SHUTDOWN}
        self.pending.add(VIRTIO_VSOCK_OP_RST)
        self._closed()

    def abort(self) -> None:
        """Reset the flow now (an error on either side): RST only, if the guest knows of it."""
        self.pending = {VIRTIO_VSOCK_OP_RST} if self.guest_knows() else set()
        self._closed()

    def _closed(self) -> None:
        self.state, self.deadline_ns = State.CLOSED, None
        self.preamble, self.to_host = b"", bytearray()

    # -- packets to the guest -----------------------------------------------------------------
    def has_control(self) -> bool:
        return bool(self.pending)

    def take_control(self) -> VsockHeader | None:
        """The next control packet to put on the rx queue, in CONTROL_ORDER (None: none)."""
        for op in CONTROL_ORDER:
            if op in self.pending:
                self.pending.discard(op)
                if op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
                    self._update_asked = False
                flags = VIRTIO_VSOCK_SHUTDOWN_SEND if op == VIRTIO_VSOCK_OP_SHUTDOWN else 0
                return self._header(op, 0, flags)
        return None

    def _header(self, op: int, length: int, flags: int = 0) -> VsockHeader:
        # §5.10.6.3.2: every packet carries our current buf_alloc and fwd_cnt, so any packet
        # is a credit update; an unrequested pending one becomes redundant.
        self.advertised_fwd_cnt = self.fwd_cnt
        if op != VIRTIO_VSOCK_OP_CREDIT_UPDATE and not self._update_asked:
            self.pending.discard(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        return VsockHeader(src_cid=VMADDR_CID_HOST, dst_cid=self.guest_cid,
                           src_port=self.host_port, dst_port=self.guest_port, len=length,
                           type=VIRTIO_VSOCK_TYPE_STREAM, op=op, flags=flags,
                           buf_alloc=BUF_ALLOC, fwd_cnt=self.fwd_cnt)
