"""virtio-vsock (VIRTIO 1.2 §5.10) behind MmioDevice, driven by the test driver playing the guest.

The broker is a real socketpair(AF_UNIX, SOCK_SEQPACKET) whose far end the test holds; host
programs are real socketpair(AF_UNIX, SOCK_STREAM) ends.  `Bed.pump` is the host loop (poll the
device's fds, dispatch, fire its timer); `Flow` is what a guest kernel keeps per socket.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import select
import socket
from typing import Iterator

import msgpack
import pytest

from device_procs.testing import hostile
from device_procs.testing.local import LocalHarness
from device_procs.virtio import vsock as vs
from device_procs.virtio import vsock_packet as vp
from device_procs.virtio.device import COMMON_FEATURES
from device_procs.virtio.errors import DeviceSpecError
from device_procs.virtio.hostfds import HostFds
from device_procs.virtio.vsock_conn import BUF_ALLOC, CONNECT_TIMEOUT_NS
from device_procs.virtio.vsock_packet import VsockHeader

pytestmark = pytest.mark.timeout(60)

CID = 3
RX_BUF = 4096 + vp.HEADER_SIZE  # what Linux posts: a 4 KiB payload after the header
G_BUF = 256 * 1024              # the guest's buf_alloc
REQUEST, RESPONSE, RST = vp.VIRTIO_VSOCK_OP_REQUEST, vp.VIRTIO_VSOCK_OP_RESPONSE, vp.VIRTIO_VSOCK_OP_RST
SHUTDOWN, RW = vp.VIRTIO_VSOCK_OP_SHUTDOWN, vp.VIRTIO_VSOCK_OP_RW
CREDIT_UPDATE, CREDIT_REQUEST = vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE, vp.VIRTIO_VSOCK_OP_CREDIT_REQUEST


class FakeClock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now


class Flow:
    """The guest's side of one flow, credit kept the way Linux's virtio transport does."""

    def __init__(self, guest_port: int, host_port: int, buf_alloc: int = G_BUF) -> None:
        self.guest_port, self.host_port, self.buf_alloc = guest_port, host_port, buf_alloc
        self.tx_cnt = 0                 # payload bytes the guest sent
        self.fwd_cnt = 0                # payload bytes the guest application consumed
        self.told_fwd_cnt = 0
        self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.received = bytearray()
        self.log: list[VsockHeader] = []  # every packet of the flow the device sent

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def peer_free(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    def ops(self) -> list[int]:
        return [h.op for h in self.log]


class Bed:
    def __init__(self, memory, **kw) -> None:
        self.broker, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.broker.setblocking(False)
        self.clock = FakeClock()
        self.device = vs.VsockDevice(CID, dev_end.detach(), clock=self.clock, **kw)
        self.h = LocalHarness(self.device, memory)
        self.driver, self.mmio, self.memory = self.h.driver, self.h.mmio, memory
        self.fds = HostFds(select.poll(), clock=self.clock)
        self.flows: dict[tuple[int, int], Flow] = {}
        self.strays: list[VsockHeader] = []   # packets of no flow the guest knows
        self.refill = True                    # post used rx buffers again, as Linux does

    @property
    def c(self) -> dict[str, int]:
        return self.device.counters

    # -- the guest driver ------------------------------------------------------------------------
    def init(self, rx_buffers: int = 32, rx_size: int = RX_BUF, split: int = 0) -> None:
        self.driver.init()
        for _ in range(4):  # §5.10.5: event buffers first, then rx
            self.driver.queue(vs.EVENTQ).add([], [4])
        self.driver.queue(vs.EVENTQ).kick()
        self.rx_size, self.split = rx_size, split
        self.post_rx(rx_buffers)

    def post_rx(self, count: int, kick: bool = True) -> None:
        q = self.driver.queue(vs.RXQ)
        size, split = self.rx_size, self.split
        for _ in range(count):
            q.add([], [split, size - split] if 0 < split < size else [size])
        if kick and count:
            q.kick()

    def recv(self, refill: bool | None = None) -> list[tuple[VsockHeader, bytes]]:
        """Packets the device put in rx buffers since the last call (the buffers are posted
        again, as Linux does)."""
        done = self.driver.queue(vs.RXQ).get_used()
        out = []
        for c in done:
            data = c.writable_data(self.memory)[:c.length]
            hdr = VsockHeader.parse(data)
            assert len(data) == vp.HEADER_SIZE + hdr.len  # used length = header + payload
            assert (hdr.src_cid, hdr.dst_cid) == (2, CID)
            out.append((hdr, data[vp.HEADER_SIZE:]))
        if self.refill if refill is None else refill:
            self.post_rx(len(done))
        return out

    def send_raw(self, hdr: VsockHeader, payload: bytes = b"", *, split: bool = False) -> None:
        raw = hdr.pack() + payload
        parts = [raw[:10], raw[10:50], raw[50:]] if split else [raw]
        self.driver.queue(vs.TXQ).submit([p for p in parts if p], [])

    def header(self, op: int, src_port: int, dst_port: int, length: int = 0, **fields: int) -> VsockHeader:
        base = dict(src_cid=CID, dst_cid=2, src_port=src_port, dst_port=dst_port, len=length,
                    type=vp.VIRTIO_VSOCK_TYPE_STREAM, op=op, flags=0, buf_alloc=G_BUF, fwd_cnt=0)
        base.update(fields)
        return VsockHeader(**base)

    def send(self, flow: Flow, op: int, payload: bytes = b"", flags: int = 0, **kw: bool) -> None:
        """A packet of `flow` from the guest, carrying its credit (§5.10.6.3.1)."""
        if op == RW:
            assert len(payload) <= flow.peer_free(), "the test guest broke the device's credit"
            flow.tx_cnt += len(payload)
        flow.told_fwd_cnt = flow.fwd_cnt
        self.send_raw(self.header(op, flow.guest_port, flow.host_port, len(payload), flags=flags,
                                  buf_alloc=flow.buf_alloc, fwd_cnt=flow.fwd_cnt), payload, **kw)

    def dispatch(self) -> list[tuple[VsockHeader, bytes]]:
        """Receive and hand packets to their flows, checking the device kept to our credit."""
        packets = self.recv()
        for hdr, payload in packets:
            flow = self.flows.get((hdr.src_port, hdr.dst_port))
            if flow is None:
                self.strays.append(hdr)
                continue
            assert hdr.type == vp.VIRTIO_VSOCK_TYPE_STREAM
            flow.log.append(hdr)
            flow.peer_buf_alloc, flow.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
            if hdr.op == RW:
                flow.received += payload
                # §5.10.6.3.2: never more than the space we told the device about.
                assert len(flow.received) - flow.told_fwd_cnt <= flow.buf_alloc
            elif hdr.op == CREDIT_REQUEST:
                self.send(flow, CREDIT_UPDATE)
        return packets

    def consume(self, flow: Flow) -> None:
        """The guest application reads what arrived: tell the device (as Linux does)."""
        if flow.fwd_cnt != len(flow.received):
            flow.fwd_cnt = len(flow.received)
            self.send(flow, CREDIT_UPDATE)

    # -- the host loop ---------------------------------------------------------------------------
    def pump(self, rounds: int = 200) -> int:
        """Dispatch ready device fds (and the timer) until nothing is ready; the rounds used."""
        for n in range(rounds):
            self.fds.fire_timer(self.mmio)
            self.fds.sync(self.mmio.poll_fds())
            ready = self.fds.poller.poll(0)
            if not ready:
                return n
            for fd, events in ready:
                self.mmio.on_ready(fd, self.fds.to_select(events))
        return rounds

    def wanted(self) -> dict[int, int]:
        return dict(self.mmio.poll_fds())

    # -- the broker ----------------------------------------------------------------------------
    def to_device(self, message: dict, fd: int | None = None) -> None:
        socket.send_fds(self.broker, [msgpack.packb(message)], [] if fd is None else [fd])

    def from_device(self) -> dict | None:
        try:
            data, fds, _, _ = socket.recv_fds(self.broker, 4096, 4)
        except BlockingIOError:
            return None
        assert fds == []
        return msgpack.unpackb(data)

    def host_connect(self, port: int, host_port: int) -> socket.socket:
        """A host program connected and asked for guest `port`: its end."""
        app, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.to_device({"op": "host_connect", "port": port, "host_port": host_port}, dev_end.fileno())
        dev_end.close()
        self.pump()
        return app

    def open_from_host(self, port: int = 1234, host_port: int = 5000,
                       buf_alloc: int = G_BUF) -> tuple[socket.socket, Flow]:
        flow = Flow(port, host_port, buf_alloc)
        self.flows[flow.key] = flow
        app = self.host_connect(port, host_port)
        self.dispatch()
        (req,) = flow.log
        assert (req.op, req.src_port, req.dst_port, req.buf_alloc) == (REQUEST, host_port, port, BUF_ALLOC)
        self.send(flow, RESPONSE)
        self.pump()
        app.settimeout(5)
        assert app.recv(64) == b"OK %d\n" % host_port
        app.setblocking(False)
        return app, flow

    def open_from_guest(self, host_port: int = 80, guest_port: int = 40000,
                        buf_alloc: int = G_BUF) -> tuple[socket.socket, Flow]:
        flow = Flow(guest_port, host_port, buf_alloc)
        self.flows[flow.key] = flow
        self.send(flow, REQUEST)
        msg = self.from_device()
        assert msg is not None and msg["op"] == "guest_connect" and msg["port"] == host_port
        app, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.to_device({"op": "connected", "id": msg["id"]}, dev_end.fileno())
        dev_end.close()
        self.pump()
        self.dispatch()
        assert flow.ops() == [RESPONSE]
        app.setblocking(False)
        return app, flow

    def close(self) -> None:
        self.device.close()
        self.broker.close()


@pytest.fixture
def bed(memory) -> Iterator[Bed]:
    t = Bed(memory)
    yield t
    t.close()


def read_all(app: socket.socket, limit: int = 1 << 22) -> tuple[bytes, bool]:
    """What the host end can read now, and whether it saw end of file."""
    out = bytearray()
    while len(out) < limit:
        try:
            chunk = app.recv(1 << 16)
        except BlockingIOError:
            return bytes(out), False
        except ConnectionResetError:
            return bytes(out), True
        if not chunk:
            return bytes(out), True
        out += chunk
    return bytes(out), False


def fd_count() -> int:
    gc.collect()  # sockets an earlier test dropped without closing
    return len(os.listdir("/proc/self/fd"))


# -- config space and features (§5.10.3, §5.10.4) -------------------------------------------------
def test_config_space_and_features(bed):
    assert bed.driver.read_config(0, 8) == CID.to_bytes(8, "little")
    assert bed.driver.read_config(0, 4) == CID.to_bytes(4, "little")
    assert bed.driver.device_features() == COMMON_FEATURES  # no SEQPACKET: streams only
    assert bed.driver.read_reg(0x008) == 19                 # DeviceID (§5.10.1)
    sizes = []
    for i in range(4):
        bed.driver.write_reg(0x030, i)                      # QueueSel
        sizes.append(bed.driver.read_reg(0x034))            # QueueNumMax
    assert sizes == [vs.QUEUE_SIZE, vs.QUEUE_SIZE, vs.EVENT_QUEUE_SIZE, 0]


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFFFFFF, 1 << 32, -1, "3", True])
def test_reserved_cids_are_refused(cid):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(DeviceSpecError, match="cid"):
        vs.VsockDevice(cid, a.fileno(), owns_fd=False)
    a.close()
    b.close()


def test_from_spec_duplicates_the_broker_fd():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev = vs.VsockDevice.from_spec({"type": "vsock", "cid": 42, "max_connections": 8}, {"broker": a.fileno()})
    assert dev.guest_cid == 42 and dev.max_connections == 8
    assert dev.broker.fileno() != a.fileno()
    dev.close()
    os.fstat(a.fileno())  # the caller's fd is still open
    a.close()
    b.close()


@pytest.mark.parametrize("spec,fds,match", [
    ({"cid": 3}, {}, "broker"),
    ({}, None, "cid"),
    ({"cid": 2}, None, "reserved"),
    ({"cid": 3, "max_connections": 0}, None, "max_connections"),
    ({"cid": 3, "max_connections": "9"}, None, "max_connections"),
])
def test_bad_specs_are_named(spec, fds, match):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceSpecError, match=match):
        vs.VsockDevice.from_spec({"type": "vsock", **spec}, {"broker": a.fileno()} if fds is None else fds)
    assert set(os.listdir("/proc/self/fd")) <= before  # no dup left behind
    a.close()
    b.close()


# -- host -> guest connections --------------------------------------------------------------------
def test_host_connect_request_response_and_ok_line(bed):
    bed.init()
    app, flow = bed.open_from_host(port=1234, host_port=5000)
    (req,) = flow.log
    assert (req.src_cid, req.dst_cid, req.fwd_cnt, req.len) == (2, CID, 0, 0)
    assert bed.c["connections_opened"] == 1
    fd = [fd for fd, ev in bed.wanted().items() if ev & select.POLLIN and fd != bed.device.broker.fileno()]
    assert len(fd) == 1 and not os.get_blocking(fd[0])  # the device made the broker's fd non-blocking
    app.sendall(b"hello guest")
    bed.pump()
    bed.dispatch()
    assert bytes(flow.received) == b"hello guest" and flow.ops()[-1] == RW
    bed.send(flow, RW, b"hello host")
    assert read_all(app) == (b"hello host", False)
    assert bed.c["bytes_to_host"] == 10 and bed.c["bytes_to_guest"] == 11
    app.close()


def test_guest_refuses_a_host_connection(bed):
    bed.init()
    flow = Flow(22, 6000)
    bed.flows[flow.key] = flow
    app = bed.host_connect(22, 6000)
    bed.dispatch()
    assert flow.ops() == [REQUEST]
    bed.send(flow, RST)  # nobody listens on guest port 22
    app.setblocking(False)
    assert read_all(app) == (b"", True)
    assert bed.c["connections_refused"] == 1 and bed.device.stats()["connections"] == 0
    bed.pump()
    bed.dispatch()
    assert flow.ops() == [REQUEST]  # no RST answers an RST
    app.close()


def test_a_silent_guest_times_out(bed):
    bed.init()
    flow = Flow(22, 6001)
    bed.flows[flow.key] = flow
    app = bed.host_connect(22, 6001)
    bed.dispatch()
    assert flow.ops() == [REQUEST]
    assert bed.mmio.next_deadline_ns() == bed.clock.now + CONNECT_TIMEOUT_NS
    bed.clock.now += CONNECT_TIMEOUT_NS
    bed.pump()
    bed.dispatch()
    assert flow.ops() == [REQUEST, RST]  # the guest is told the attempt is over
    app.setblocking(False)
    assert read_all(app) == (b"", True)
    assert bed.c["connect_timeouts"] == 1 and bed.mmio.next_deadline_ns() is None
    app.close()


def test_host_connect_before_the_driver_is_refused(bed):
    app = bed.host_connect(1, 2)
    app.setblocking(False)
    assert read_all(app) == (b"", True) and bed.c["connections_refused"] == 1
    app.close()


def test_duplicate_host_port_is_refused(bed):
    bed.init()
    app, flow = bed.open_from_host(1234, 5000)
    dup = bed.host_connect(1234, 5000)
    dup.setblocking(False)
    assert read_all(dup) == (b"", True) and bed.c["connections_refused"] == 1
    assert read_all(app) == (b"", False)  # the first one lives on
    app.close()
    dup.close()


# -- guest -> host connections through the broker -------------------------------------------------
def test_guest_connect_through_the_broker(bed):
    bed.init()
    app, flow = bed.open_from_guest(host_port=80, guest_port=40000)
    (resp,) = flow.log
    assert (resp.src_port, resp.dst_port, resp.buf_alloc) == (80, 40000, BUF_ALLOC)
    assert bed.c["connections_opened"] == 1
    bed.send(flow, RW, b"GET /")
    assert read_all(app) == (b"GET /", False)
    app.sendall(b"200 OK")
    bed.pump()
    bed.dispatch()
    assert bytes(flow.received) == b"200 OK"
    app.close()


def test_broker_refusal_resets_the_guest(bed):
    bed.init()
    flow = Flow(40001, 81)
    bed.flows[flow.key] = flow
    bed.send(flow, REQUEST)
    msg = bed.from_device()
    assert msg == {"op": "guest_connect", "id": msg["id"], "port": 81}
    bed.to_device({"op": "refused", "id": msg["id"]})
    bed.pump()
    bed.dispatch()
    assert flow.ops() == [RST]  # the guest's connect() fails with ECONNRESET
    assert bed.c["connections_refused"] == 1 and bed.c["rst_sent"] == 1
    assert bed.device.stats()["connections"] == 0


def test_a_late_or_unknown_broker_answer_closes_its_fd(bed):
    bed.init()
    flow = Flow(40002, 82)
    bed.flows[flow.key] = flow
    bed.send(flow, REQUEST)
    msg = bed.from_device()
    bed.send(flow, RST)  # the guest gives up first
    for conn_id in (msg["id"], 999):
        app, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        bed.to_device({"op": "connected", "id": conn_id}, dev_end.fileno())
        dev_end.close()
        bed.pump()
        app.setblocking(False)
        assert read_all(app) == (b"", True)
        app.close()
    bed.dispatch()
    assert flow.ops() == [] and bed.device.stats()["connections"] == 0


def test_bad_broker_messages_are_counted_and_their_fds_closed(bed):
    bed.init()
    for message in ({"op": "bogus"}, {"op": "host_connect", "port": -1, "host_port": 1},
                    {"op": "refused", "id": 1}, [1, 2]):
        app, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        bed.to_device(message, dev_end.fileno())
        dev_end.close()
        bed.pump()
        app.setblocking(False)
        assert read_all(app) == (b"", True)
        app.close()
    bed.broker.send(b"\xc1 not msgpack")
    bed.pump()
    assert bed.c["broker_errors"] == 5
    assert bed.device.stats()["broker_open"]


def test_broker_gone_refuses_guest_connections(bed):
    bed.init()
    bed.broker.close()
    bed.pump()
    assert bed.device.stats()["broker_open"] is False
    assert bed.device.broker.fileno() not in bed.wanted()  # no busy loop on a dead socket
    flow = Flow(40003, 83)
    bed.flows[flow.key] = flow
    bed.send(flow, REQUEST)
    bed.dispatch()
    assert flow.ops() == [RST] and bed.c["connections_refused"] == 1
    bed.broker = socket.socket()  # for Bed.close


# -- data, both ways, within credit (§5.10.6.3) ----------------------------------------------------
def test_one_mib_host_to_guest(bed):
    bed.init(rx_buffers=64)
    app, flow = bed.open_from_host(buf_alloc=64 * 1024)
    data = random.Random(1).randbytes(1 << 20)
    sent = rounds = 0
    while len(flow.received) < len(data):
        rounds += 1
        assert rounds < 20000, f"stalled at {len(flow.received)} bytes"
        if sent < len(data):
            try:
                sent += app.send(data[sent:sent + 65536])
            except BlockingIOError:
                pass
        bed.pump()
        bed.dispatch()
        if rounds % 3 == 0:
            bed.consume(flow)  # the guest application reads now and then
    assert hashlib.sha256(flow.received).digest() == hashlib.sha256(data).digest()
    assert bed.c["bytes_to_guest"] == len(data)
    assert bed.c["credit_requests"] >= 1  # it ran out of the guest's 64 KiB and asked
    assert RW in flow.ops() and all(h.len <= 4096 for h in flow.log)
    app.close()


def test_one_mib_guest_to_host(bed):
    bed.init(rx_buffers=16)
    app, flow = bed.open_from_guest()
    data = random.Random(2).randbytes(1 << 20)
    got = bytearray()
    pos = rounds = 0
    while len(got) < len(data):
        rounds += 1
        assert rounds < 20000, f"stalled at {len(got)} bytes"
        n = min(flow.peer_free(), vp.MAX_PAYLOAD, len(data) - pos)
        if n > 0:
            bed.send(flow, RW, data[pos:pos + n], split=rounds % 2 == 0)
            pos += n
        if rounds % 2:
            got += read_all(app, 100_000)[0]  # a host program reading slowly
        bed.pump()
        bed.dispatch()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert bed.c["bytes_to_host"] == len(data)
    assert bed.c["credit_updates"] >= 3 and bed.c["over_limit"] == 0
    assert CREDIT_UPDATE in flow.ops() and flow.peer_fwd_cnt <= len(data)
    app.close()


def test_split_rx_buffers(memory):
    """Older Linux posts the header and the payload as two descriptors (§2.6.4: any framing)."""
    t = Bed(memory)
    t.init(split=vp.HEADER_SIZE)
    app, flow = t.open_from_host()
    app.sendall(bytes(range(256)) * 40)
    t.pump()
    t.dispatch()
    assert bytes(flow.received) == bytes(range(256)) * 40
    app.close()
    t.close()


def test_credit_request_and_update(bed):
    bed.init()
    app, flow = bed.open_from_guest()
    bed.send(flow, CREDIT_REQUEST)
    bed.dispatch()
    upd = flow.log[-1]
    assert (upd.op, upd.buf_alloc, upd.fwd_cnt) == (CREDIT_UPDATE, BUF_ALLOC, 0)
    chunk = bytes(60000)
    bed.send(flow, RW, chunk)
    bed.send(flow, RW, chunk)  # 120000 forwarded: more than a quarter of buf_alloc
    assert len(read_all(app)[0]) == 120000
    bed.pump()
    bed.dispatch()
    upd = flow.log[-1]
    assert (upd.op, upd.fwd_cnt) == (CREDIT_UPDATE, 120000)
    assert bed.c["credit_updates"] == 2
    app.close()


def test_device_waits_for_guest_credit(bed):
    bed.init()
    app, flow = bed.open_from_host(buf_alloc=1000)
    app.sendall(bytes(3000))
    bed.pump()
    bed.dispatch()
    assert len(flow.received) == 1000 and flow.ops()[-1] == CREDIT_REQUEST
    assert all(not ev & select.POLLIN for fd, ev in bed.wanted().items()
               if fd != bed.device.broker.fileno())  # no credit: the host fd is not read
    bed.consume(flow)
    bed.pump()
    bed.dispatch()
    assert len(flow.received) == 2000
    bed.consume(flow)
    bed.pump()
    bed.dispatch()
    assert len(flow.received) == 3000
    app.close()


def test_guest_over_its_credit_is_reset(bed):
    bed.init(rx_buffers=1)
    bed.refill = False
    app, flow = bed.open_from_guest()  # the RESPONSE takes the only rx buffer: no credit
    # update can reach the guest, so the device's credit stays what the RESPONSE said
    for _ in range(BUF_ALLOC // vp.MAX_PAYLOAD):
        bed.send(flow, RW, bytes(vp.MAX_PAYLOAD))  # exactly the credit: fine
    assert bed.c["over_limit"] == 0
    flow.peer_buf_alloc += 1  # a guest that miscounts
    bed.send(flow, RW, b"x")
    assert bed.c["over_limit"] == 1
    got, eof = read_all(app)
    assert eof and len(got) <= BUF_ALLOC  # the fd is closed, queued bytes dropped, not more
    bed.post_rx(1)
    bed.dispatch()
    assert flow.ops()[-1] == RST and bed.c["rst_sent"] == 1
    assert bed.device.stats()["connections"] == 0
    app.close()


def test_no_rx_buffers_stops_reading_until_a_kick(bed):
    bed.init(rx_buffers=1)
    app, flow = bed.open_from_host()
    bed.recv(refill=False)
    app.sendall(bytes(10000))
    assert bed.pump() < 200  # settles: no busy loop
    assert bed.c["rx_starved"] >= 1
    assert all(not ev & select.POLLIN for fd, ev in bed.wanted().items()
               if fd != bed.device.broker.fileno())
    assert bed.pump() == 0
    bed.post_rx(4)
    bed.pump()
    bed.dispatch()
    assert len(flow.received) == 10000
    app.close()


# -- shutdown (§5.10.6.5) ----------------------------------------------------------------------------
def test_guest_shutdown_send_then_host_closes(bed):
    bed.init()
    app, flow = bed.open_from_host()
    bed.send(flow, RW, b"last words")
    bed.send(flow, SHUTDOWN, flags=vp.VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert read_all(app) == (b"last words", True)  # then end of file
    app.sendall(b"still listening")                # the other direction still works
    bed.pump()
    bed.dispatch()
    assert bytes(flow.received) == b"still listening"
    app.shutdown(socket.SHUT_WR)
    bed.pump()
    bed.dispatch()
    assert flow.ops()[-2:] == [SHUTDOWN, RST]  # both directions shut: RST, forgotten
    assert flow.log[-2].flags == vp.VIRTIO_VSOCK_SHUTDOWN_SEND
    assert bed.device.stats()["connections"] == 0
    app.close()


def test_guest_shutdown_both_flushes_queued_bytes_first(bed):
    bed.init()
    app, flow = bed.open_from_guest()
    data = random.Random(3).randbytes(BUF_ALLOC)
    for i in range(0, len(data), vp.MAX_PAYLOAD):  # more than the socket buffer takes
        bed.send(flow, RW, data[i:i + vp.MAX_PAYLOAD])
    bed.send(flow, SHUTDOWN, flags=vp.SHUTDOWN_BOTH)
    bed.dispatch()
    assert RST not in flow.ops()  # bytes still wait for the host
    got, eof = bytearray(), False
    while not eof:
        chunk, eof = read_all(app)
        got += chunk
        bed.pump()
    assert bytes(got) == data
    bed.dispatch()
    assert flow.ops()[-1] == RST and bed.device.stats()["connections"] == 0
    app.close()


def test_host_eof_sends_shutdown_to_the_guest(bed):
    bed.init()
    app, flow = bed.open_from_guest()
    app.sendall(b"bye")
    app.shutdown(socket.SHUT_WR)
    bed.pump()
    bed.dispatch()
    assert bytes(flow.received) == b"bye"
    assert flow.log[-1].op == SHUTDOWN and flow.log[-1].flags == vp.VIRTIO_VSOCK_SHUTDOWN_SEND
    bed.send(flow, RW, b"answer")  # the guest may still send
    assert read_all(app) == (b"answer", False)
    bed.send(flow, SHUTDOWN, flags=vp.SHUTDOWN_BOTH)
    bed.dispatch()
    assert flow.ops()[-1] == RST
    assert read_all(app) == (b"", True)
    app.close()


def test_guest_rst_closes_the_host_end(bed):
    bed.init()
    app, flow = bed.open_from_host()
    bed.send(flow, RST)
    assert read_all(app) == (b"", True)
    bed.pump()
    bed.dispatch()
    assert flow.ops() == [REQUEST] and bed.c["rst_sent"] == 0
    app.close()


def test_host_vanishing_resets_the_guest(bed):
    bed.init()
    app, flow = bed.open_from_host()
    app.close()
    bed.pump()
    bed.dispatch()
    assert flow.ops()[-1] == SHUTDOWN  # end of file first
    bed.send(flow, RW, b"into the void")  # the write fails: EPIPE
    bed.dispatch()
    assert flow.ops()[-1] == RST and bed.c["host_errors"] == 1


# -- malformed transmits (§5.10.6.4) ------------------------------------------------------------------
MALFORMED = [
    # (fields, payload, counter, answered with RST)
    ({"src_cid": CID + 1}, b"", "bad_cid", False),
    ({"dst_cid": 7}, b"", "bad_cid", False),
    ({"src_cid": CID | 1 << 32}, b"", "bad_cid", False),
    ({"len": 10}, b"12345", "bad_len", False),
    ({"len": 0}, b"12345", "bad_len", False),
    ({"len": vp.MAX_PAYLOAD + 1}, bytes(vp.MAX_PAYLOAD + 1), "bad_len", False),
    ({"op": 0}, b"", "bad_op", True),
    ({"op": 9}, b"", "bad_op", True),
    ({"type": vp.VIRTIO_VSOCK_TYPE_SEQPACKET}, b"", "bad_type", True),
]


@pytest.mark.parametrize("fields,payload,reason,rst", MALFORMED)
def test_malformed_packets_are_dropped_and_counted(bed, fields, payload, reason, rst):
    bed.init()
    fields = {"op": REQUEST, "len": len(payload), **fields}
    bed.send_raw(bed.header(fields.pop("op"), 1000, 80, **fields), payload)
    assert bed.c[f"dropped_{reason}"] == 1 and bed.c["packets_dropped"] == 1
    assert bed.from_device() is None and bed.device.stats()["connections"] == 0
    bed.dispatch()
    assert [h.op for h in bed.strays] == ([RST] if rst else [])
    if rst:  # the reply is for the same flow and type (§5.10.6.4: RST for an unknown type)
        assert (bed.strays[0].src_port, bed.strays[0].dst_port) == (80, 1000)
        assert bed.strays[0].type == fields.get("type", vp.VIRTIO_VSOCK_TYPE_STREAM)
    assert not bed.driver.needs_reset
    app, flow = bed.open_from_guest()  # the device goes on working
    app.close()


def test_short_headers_are_dropped(bed):
    bed.init()
    bed.driver.queue(vs.TXQ).submit([bytes(43)], [])
    bed.driver.queue(vs.TXQ).submit([bytes(20), bytes(20)], [])
    bed.driver.queue(vs.TXQ).submit([], [64])  # device-writable only
    assert bed.c["dropped_short_header"] == 3 and bed.c["packets_dropped"] == 3
    assert not bed.driver.needs_reset


def test_unknown_op_on_a_live_connection_resets_it(bed):
    bed.init()
    app, flow = bed.open_from_host()
    bed.send_raw(bed.header(42, flow.guest_port, flow.host_port))
    bed.dispatch()
    assert flow.ops()[-1] == RST and read_all(app) == (b"", True)
    app.close()


def test_packets_for_no_connection_get_rst(bed):
    bed.init()
    bed.send_raw(bed.header(RW, 1000, 80, 3), b"abc")
    bed.send_raw(bed.header(RST, 1000, 80))  # but an RST is never answered
    bed.dispatch()
    assert [h.op for h in bed.strays] == [RST] and bed.c["no_connection"] == 2


def test_a_full_reply_queue_stops_tx_until_rx_drains_it(bed):
    bed.init(rx_buffers=0)
    q = bed.driver.queue(vs.TXQ)
    n = vs.MAX_REPLIES + 10
    for i in range(n):
        q.add([bed.header(RW, 1000 + i, 80).pack()], [])
    q.kick()
    assert len(q.get_used()) == vs.MAX_REPLIES and bed.c["tx_blocked"] >= 1
    bed.post_rx(n)
    assert len(q.get_used()) == 10  # resumed once rx took the replies
    bed.post_rx(0)
    bed.dispatch()
    assert [h.op for h in bed.strays] == [RST] * n


def test_hostile_ring_needs_reset(bed):
    bed.init()
    hostile.publish_loop(bed.driver.queue(vs.TXQ))
    bed.mmio.queue_notify(vs.TXQ)
    assert bed.driver.needs_reset
    bed.init()
    assert not bed.driver.needs_reset


# -- limits and lifetimes ------------------------------------------------------------------------------
def test_max_connections(memory):
    t = Bed(memory, max_connections=2)
    t.init()
    a, _ = t.open_from_host(1, 5001)
    b, _ = t.open_from_guest(80, 40000)
    c = t.host_connect(3, 5003)
    c.setblocking(False)
    assert read_all(c) == (b"", True)  # closed at once
    flow = Flow(40001, 80)
    t.flows[flow.key] = flow
    t.send(flow, REQUEST)
    t.dispatch()
    assert flow.ops() == [RST] and t.from_device() is None  # refused without asking the broker
    assert t.c["connection_limit"] == 2 and t.c["connections_refused"] == 2
    for s in (a, b, c):
        s.close()
    t.close()


def test_no_fd_leak_after_200_short_connections(bed):
    bed.init()
    before = fd_count()
    for i in range(100):
        app, flow = bed.open_from_host(port=2000 + i, host_port=6000 + i)
        app.sendall(b"ping")
        bed.pump()
        bed.dispatch()
        bed.send(flow, RW, b"pong")
        assert read_all(app) == (b"pong", False)
        bed.send(flow, SHUTDOWN, flags=vp.SHUTDOWN_BOTH)  # the guest closes first
        bed.dispatch()
        assert read_all(app) == (b"", True) and flow.ops()[-1] == RST
        app.close()
        app, flow = bed.open_from_guest(host_port=80, guest_port=30000 + i)
        bed.send(flow, RW, b"ping")
        assert read_all(app) == (b"ping", False)
        app.close()                                        # the host closes first
        bed.pump()
        bed.dispatch()
        assert flow.ops()[-1] == SHUTDOWN
        bed.send(flow, SHUTDOWN, flags=vp.SHUTDOWN_BOTH)
        bed.dispatch()
        assert flow.ops()[-1] == RST
    assert bed.c["connections_opened"] == 200 and bed.c["rst_sent"] == 200
    assert bed.device.stats()["connections"] == 0
    assert fd_count() == before


def test_reset_closes_every_connection_fd(bed):
    bed.init()
    before = fd_count()
    apps = [bed.open_from_host(1, 5001)[0], bed.open_from_guest(80, 40000)[0],
            bed.host_connect(2, 5002)]                       # still awaiting the guest
    flow = Flow(40001, 81)
    bed.send(flow, REQUEST)                                  # still awaiting the broker
    msg = bed.from_device()
    apps[0].sendall(b"unread")
    bed.driver.reset()
    assert bed.device.stats()["connections"] == 0
    for app in apps:
        app.setblocking(False)
        assert read_all(app) == (b"", True)
    late, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bed.to_device({"op": "connected", "id": msg["id"]}, dev_end.fileno())
    dev_end.close()
    bed.pump()
    late.setblocking(False)
    assert read_all(late) == (b"", True)                      # the late answer's fd is closed
    for s in apps + [late]:
        s.close()
    assert fd_count() == before
    bed.init()
    app, _ = bed.open_from_host(1, 5001)                      # the next driver starts afresh
    app.close()


def test_close_closes_every_fd(memory):
    before = fd_count()
    t = Bed(memory)
    t.init()
    apps = [t.open_from_host()[0], t.open_from_guest()[0]]
    t.close()
    for app in apps:
        app.setblocking(False)
        assert read_all(app) == (b"", True)
        app.close()
    assert fd_count() == before


def test_transport_reset_event(bed):
    bed.init()
    assert bed.device.transport_reset()
    (done,) = bed.driver.queue(vs.EVENTQ).get_used()
    assert done.length == 4 and done.writable_data(bed.memory) == vp.pack_event(
        vp.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
    assert bed.c["events"] == 1
