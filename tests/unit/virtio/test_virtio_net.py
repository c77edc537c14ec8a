"""virtio-net (VIRTIO 1.2 §5.1) on a fake tap: a socketpair(AF_UNIX, SOCK_DGRAM) keeps frame
boundaries like a tap does, so each datagram is one `virtio_net_hdr_v1` + frame."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Iterator

import pytest

from device_procs.testing import hostile
from device_procs.testing.driver import DriverError
from device_procs.testing.local import LocalHarness
from device_procs.virtio import mmio as regs
from device_procs.virtio import net as n
from device_procs.virtio import net_header as nh
from device_procs.virtio.device import COMMON_FEATURES
from device_procs.virtio.errors import DeviceSpecError
from device_procs.virtio.hostfds import HostFds
from device_procs.virtio.net_header import NetHeader
from device_procs.virtio.rate_limiter import NS_PER_MS, BucketConfig, RateLimiter

MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("0a0000000001")
BASIC = COMMON_FEATURES | nh.VIRTIO_NET_F_MAC | nh.VIRTIO_NET_F_STATUS | nh.VIRTIO_NET_F_MTU
CSUM = nh.VIRTIO_NET_F_CSUM | nh.VIRTIO_NET_F_GUEST_CSUM
TSO = (CSUM | nh.VIRTIO_NET_F_HOST_TSO4 | nh.VIRTIO_NET_F_HOST_TSO6 | nh.VIRTIO_NET_F_GUEST_TSO4
       | nh.VIRTIO_NET_F_GUEST_TSO6)
MRG = nh.VIRTIO_NET_F_MRG_RXBUF


def ether(payload_len: int, dst: bytes = MAC, src: bytes = PEER, ethertype: int = 0x0800) -> bytes:
    """An Ethernet frame with a recognisable payload."""
    return dst + src + struct.pack(">H", ethertype) + bytes((i * 7 + 3) & 0xFF for i in range(payload_len))


def hdr(**fields: int) -> bytes:
    return NetHeader(**fields).pack()


class FakeClock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now


class Net:
    """A NetDevice on one end of a datagram socketpair; the test plays the host on the other."""

    def __init__(self, memory, kind: int = socket.SOCK_DGRAM, **kw) -> None:
        self.dev_sock, self.host = socket.socketpair(socket.AF_UNIX, kind)
        self.dev_sock.setblocking(False)
        self.host.setblocking(False)
        self.offloads: list[int] = []
        kw.setdefault("set_offload", self.offloads.append)
        self.device = n.NetDevice(self.dev_sock.fileno(), MAC, owns_fd=False, **kw)
        self.h = LocalHarness(self.device, memory)
        self.driver, self.mmio, self.memory = self.h.driver, self.h.mmio, memory

    def init(self, features: int = BASIC) -> int:
        return self.driver.init(features)

    def pump(self, rounds: int = 100) -> None:
        """The host loop: dispatch ready device fds until nothing the device wants is ready."""
        fds = HostFds(select.poll())
        for _ in range(rounds):
            fds.sync(self.mmio.poll_fds())
            ready = fds.poller.poll(0)
            if not ready:
                return
            for fd, events in ready:
                self.mmio.on_ready(fd, fds.to_select(events))

    def host_send(self, data: bytes) -> None:
        self.host.send(data)

    def host_recv_all(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.host.recv(1 << 17))
            except BlockingIOError:
                return out

    def frame_still_queued(self) -> bool:
        """Is a datagram from the host still waiting at the device's end (unread)?"""
        try:
            self.dev_sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False

    @property
    def c(self) -> dict[str, int]:
        return self.device.counters

    def close(self) -> None:
        self.dev_sock.close()
        self.host.close()


@pytest.fixture(params=["native", "python"])
def net(memory, request) -> Iterator[Net]:
    """Every test through both paths: the C loops (`fastpath`) and the Python reference."""
    t = Net(memory, native=request.param == "native")
    yield t
    t.close()


def waiting_rx_buffers(net: Net) -> int:
    """Posted receive buffers not yet used: held by the Python path, or still in the ring
    (the C path holds nothing between frames)."""
    return net.device.stats()["rx_held_buffers"] + net.device.queues[n.RECEIVEQ].pending()


# -- config space and features (§5.1.3, §5.1.4) --------------------------------------------------
def test_config_space(net):
    mac, status, pairs, mtu = n.CONFIG.unpack(net.driver.read_config(0, n.CONFIG.size))
    assert (mac, status, pairs, mtu) == (MAC, n.VIRTIO_NET_S_LINK_UP, 1, 1500)
    assert net.driver.read_config(0, 1) == MAC[:1]  # Linux reads the MAC byte by byte
    assert net.driver.read_config(5, 1) == MAC[5:]


def test_offered_features(net):
    offered = net.driver.device_features()
    for bit in (nh.VIRTIO_NET_F_MAC, nh.VIRTIO_NET_F_STATUS, nh.VIRTIO_NET_F_MTU, CSUM, TSO, MRG,
                nh.VIRTIO_NET_F_HOST_ECN, nh.VIRTIO_NET_F_GUEST_ECN, COMMON_FEATURES):
        assert offered & bit == bit
    assert offered & nh.VIRTIO_NET_F_CTRL_VQ and offered & nh.VIRTIO_NET_F_CTRL_RX
    assert offered & nh.GUEST_GSO == nh.GUEST_GSO
    net.driver.write_reg(regs.QUEUE_SEL, 2)
    assert net.driver.read_reg(regs.QUEUE_NUM_MAX) == n.CONTROL_QUEUE_SIZE  # controlq (§5.1.2)
    net.driver.write_reg(regs.QUEUE_SEL, 3)
    assert net.driver.read_reg(regs.QUEUE_NUM_MAX) == 0


def test_link_status_change_notifies(net):
    net.init()
    before = net.mmio.config_generation
    net.device.set_link(False)
    assert net.mmio.config_generation == before + 1
    assert net.mmio.interrupt_status & regs.INT_CONFIG_CHANGE
    assert n.CONFIG.unpack(net.driver.read_config(0, n.CONFIG.size))[1] == 0


@pytest.mark.parametrize("features,dropped", [
    (nh.VIRTIO_NET_F_GUEST_TSO4, nh.VIRTIO_NET_F_GUEST_TSO4),              # needs GUEST_CSUM
    (nh.VIRTIO_NET_F_HOST_TSO6, nh.VIRTIO_NET_F_HOST_TSO6),                # needs CSUM
    (CSUM | nh.VIRTIO_NET_F_HOST_ECN, nh.VIRTIO_NET_F_HOST_ECN),           # needs HOST_TSO4/6
    (nh.VIRTIO_NET_F_HOST_TSO4 | nh.VIRTIO_NET_F_HOST_ECN,                 # transitively: no CSUM
     nh.VIRTIO_NET_F_HOST_TSO4 | nh.VIRTIO_NET_F_HOST_ECN),
    (nh.VIRTIO_NET_F_GUEST_CSUM | nh.VIRTIO_NET_F_GUEST_ECN, nh.VIRTIO_NET_F_GUEST_ECN),
    (nh.VIRTIO_NET_F_CTRL_RX, nh.VIRTIO_NET_F_CTRL_RX),                    # needs CTRL_VQ
])
def test_broken_feature_dependencies_act_as_not_negotiated(net, features, dropped):
    """§5.1.3.1: the device treats a feature whose requirement is missing as not negotiated
    (the transport, shared with the core's shadow, does not refuse per kind)."""
    assert nh.feature_error(features)
    net.driver.negotiate(BASIC | features)
    assert net.device.acked_features == (BASIC | features) & ~dropped
    assert net.c["feature_errors"] == 1
    assert net.offloads[-1] == nh.tap_offloads((BASIC | features) & ~dropped)


def test_broken_dependency_offload_is_never_applied(net):
    net.driver.negotiate(BASIC | nh.VIRTIO_NET_F_GUEST_TSO4)  # TSO without GUEST_CSUM
    assert net.offloads[-1] == 0


@pytest.mark.parametrize("features,flags", [
    (0, 0),
    (nh.VIRTIO_NET_F_CSUM | nh.VIRTIO_NET_F_HOST_TSO4, 0),  # what the guest sends is not the tap's
    (nh.VIRTIO_NET_F_GUEST_CSUM, nh.TUN_F_CSUM),
    (nh.VIRTIO_NET_F_GUEST_CSUM | nh.VIRTIO_NET_F_GUEST_TSO4, nh.TUN_F_CSUM | nh.TUN_F_TSO4),
    (TSO | nh.VIRTIO_NET_F_GUEST_ECN, nh.TUN_F_CSUM | nh.TUN_F_TSO4 | nh.TUN_F_TSO6 | nh.TUN_F_TSO_ECN),
    (nh.VIRTIO_NET_F_GUEST_CSUM | nh.VIRTIO_NET_F_GUEST_UFO, nh.TUN_F_CSUM | nh.TUN_F_UFO),
    (nh.VIRTIO_NET_F_GUEST_TSO4, 0),  # without GUEST_CSUM no offload at all
])
def test_tap_offloads_from_features(features, flags):
    assert nh.tap_offloads(features) == flags


def test_offloads_set_at_features_ok_and_cleared_at_reset(net):
    net.driver.negotiate(BASIC | TSO)  # starts with a reset: a persistent tap's old offloads go
    assert net.offloads == [0, nh.TUN_F_CSUM | nh.TUN_F_TSO4 | nh.TUN_F_TSO6]
    net.driver.reset()
    assert net.offloads[-1] == 0
    net.driver.negotiate(BASIC)
    assert net.offloads[-1] == 0 and net.device.stats()["offloads"] == 0


def test_offload_failure_is_counted_not_fatal(memory):
    def refuse(flags: int) -> None:
        raise OSError(errno.EINVAL, "no")
    t = Net(memory, set_offload=refuse)
    t.init(BASIC | TSO)
    assert t.c["offload_errors"] >= 2 and not t.driver.needs_reset  # the reset's 0, then 7 (retried)
    t.close()


def test_real_tunsetoffload_on_a_non_tap_fails_softly(memory):
    """The default offload setter is the TUNSETOFFLOAD ioctl; a socket refuses it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    dev = n.NetDevice(a.fileno(), MAC, owns_fd=False)
    h = LocalHarness(dev, memory)
    h.driver.init(BASIC | TSO)
    assert dev.counters["offload_errors"] >= 2 and dev.offloads is None
    a.close()
    b.close()


# -- transmit (§5.1.6.2) --------------------------------------------------------------------------
@pytest.mark.parametrize("split_header", [False, True])
def test_tx_passes_the_header_through_unchanged(net, split_header):
    net.init(BASIC | TSO)
    header = hdr(flags=nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16, hdr_len=54)
    frame = ether(400)
    done = net.driver.net_send(frame, header, split_header=split_header)
    assert done.length == 0  # nothing written to a transmit buffer
    assert net.host_recv_all() == [header + frame]
    assert (net.c["tx_packets"], net.c["tx_bytes"]) == (1, len(frame))


def test_tx_gso_frame_passes_through(net):
    net.init(BASIC | TSO)
    header = hdr(flags=nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=nh.VIRTIO_NET_HDR_GSO_TCPV4,
                 hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16)
    frame = ether(20000)
    net.driver.net_send(frame, header)
    assert net.host_recv_all() == [header + frame]


def test_tx_indirect_chain(net):
    net.init(BASIC)
    frame = ether(100)
    net.driver.queue(1).submit([bytes(12), frame[:20], frame[20:]], [], indirect=True)
    assert net.host_recv_all() == [bytes(12) + frame]


def test_tx_chain_of_more_buffers_than_writev_takes_is_still_sent(net):
    """1 084 descriptors (60 direct, then an indirect table of 1 024): past IOV_MAX, so the C loop
    hands it to the Python path, which sends it whole."""
    net.init(BASIC)
    q, arena = net.driver.queue(1), net.driver.arena
    frame = ether(1069)  # 1 083 bytes: with the header, 1 084 pieces
    pieces = [bytes(12)] + [frame[i:i + 1] for i in range(len(frame))]
    addrs = []
    for p in pieces:
        addrs.append(arena.alloc(len(p)))
        net.memory.write(addrs[-1], p)
    table = arena.alloc(16 * 1024, 16)
    for i in range(1024):  # the last 1 024 pieces, through the table
        a = addrs[60 + i]
        q.write_desc(i, a, len(pieces[60 + i]), 1 if i < 1023 else 0, i + 1, table=table)
    for i in range(60):
        q.write_desc(i, addrs[i], len(pieces[i]), 1, i + 1)
    q.write_desc(60, table, 16 * 1024, 4)  # VIRTQ_DESC_F_INDIRECT
    q.publish(0)
    q.kick()
    net.pump()
    assert net.host_recv_all() == [bytes(12) + frame]
    assert net.c["tx_packets"] == 1 and q.used_idx() == 1


TX_BAD = [
    # (features, header fields, frame length, counter)
    (BASIC, {}, 10, "runt"),
    (BASIC, {"flags": nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, "csum_start": 34, "csum_offset": 16}, 200, "csum"),
    (BASIC | TSO, {"flags": nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, "csum_start": 190, "csum_offset": 16},
     200, "csum"),
    (BASIC | TSO, {"flags": nh.VIRTIO_NET_HDR_F_DATA_VALID}, 200, "flags"),
    (BASIC | TSO, {"flags": nh.VIRTIO_NET_HDR_F_RSC_INFO}, 200, "flags"),
    (BASIC | TSO, {"hdr_len": 201}, 200, "hdr_len"),
    (BASIC, {}, 1500 + 18 + 1, "oversize"),
    (BASIC | CSUM, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 1448,
                    "csum_start": 34, "csum_offset": 16}, 5000, "gso_type"),  # no HOST_TSO4
    (BASIC | TSO, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_UDP, "gso_size": 1400,
                   "csum_start": 34, "csum_offset": 6}, 5000, "gso_type"),  # no HOST_UFO
    (BASIC | TSO, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_UDP_L4, "gso_size": 1400,
                   "csum_start": 34, "csum_offset": 6}, 5000, "gso_type"),  # USO never offered
    (BASIC | TSO, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4 | nh.VIRTIO_NET_HDR_GSO_ECN,
                   "gso_size": 1448, "csum_start": 34, "csum_offset": 16}, 5000, "gso_type"),
    (BASIC | TSO, {"gso_type": nh.VIRTIO_NET_HDR_GSO_ECN}, 200, "gso_type"),
    (BASIC | TSO, {"gso_type": 0x42}, 200, "gso_type"),
    (BASIC | TSO, {"gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 1448}, 5000, "csum"),
    (BASIC | TSO, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 1448,
                   "csum_start": 34, "csum_offset": 6}, 5000, "csum"),  # not the TCP checksum
    (BASIC | TSO, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 0,
                   "csum_start": 34, "csum_offset": 16}, 5000, "gso_size"),
    (BASIC | TSO, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV6, "gso_size": 1501,
                   "csum_start": 54, "csum_offset": 16}, 5000, "gso_size"),
    (BASIC | TSO, {"flags": 1, "gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 1448,
                   "csum_start": 34, "csum_offset": 16}, nh.MAX_GSO_FRAME + 1, "oversize"),
]


@pytest.mark.parametrize("features,fields,length,reason", TX_BAD)
def test_tx_malformed_frames_are_dropped_and_counted(net, features, fields, length, reason):
    net.init(features)
    done = net.driver.net_send(ether(length - 14) if length >= 14 else bytes(length), hdr(**fields))
    assert done.length == 0
    assert net.c[f"tx_dropped_{reason}"] == 1
    assert sum(v for k, v in net.c.items() if k.startswith("tx_dropped_")) == 1
    assert net.host_recv_all() == []
    assert not net.driver.needs_reset
    # The queue keeps working.
    net.driver.net_send(ether(60))
    assert len(net.host_recv_all()) == 1


def test_tx_chain_without_a_header(net):
    net.init()
    net.driver.queue(1).submit([b"short"], [])
    assert net.c["tx_dropped_no_header"] == 1 and net.host_recv_all() == []
    net.driver.queue(1).submit([], [64])  # only device-writable buffers: no header either
    assert net.c["tx_dropped_no_header"] == 2 and not net.driver.needs_reset


def test_tx_unknown_flag_bits_are_ignored(net):
    net.init(BASIC)  # §5.1.6.2.2: the device MUST ignore flag bits it does not recognise
    net.driver.net_send(ether(60), hdr(flags=0x80))
    assert len(net.host_recv_all()) == 1


def test_tx_eagain_keeps_the_chain_and_retries_on_pollout(net):
    net.init()
    q = net.driver.queue(1)
    frame = ether(1000)
    for _ in range(200):  # far more than an AF_UNIX datagram queue holds
        q.add([bytes(12) + frame], [])
    q.kick()
    assert net.c["tx_eagain"] >= 1
    sent_before = net.c["tx_packets"]
    assert sent_before < 200
    wanted = dict(net.mmio.poll_fds())
    assert wanted[net.dev_sock.fileno()] & select.POLLOUT
    got = []
    for _ in range(200):
        got += net.host_recv_all()
        net.pump()
        if len(got) == 200:
            break
    got += net.host_recv_all()
    assert len(got) == 200 and all(g == bytes(12) + frame for g in got)
    assert len(q.get_used()) == 200
    assert net.c["tx_dropped_tap_error"] == 0
    assert not any(ev & select.POLLOUT for _, ev in net.mmio.poll_fds())


def test_tx_write_error_drops_and_counts(memory):
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    r.setblocking(False)
    r.shutdown(socket.SHUT_WR)  # writes now fail with EPIPE
    dev = n.NetDevice(r.fileno(), MAC, owns_fd=False, set_offload=lambda f: None)
    h = LocalHarness(dev, memory)
    h.driver.init(BASIC)
    h.driver.net_send(ether(60))
    assert dev.counters["tx_dropped_tap_error"] == 1 and not h.driver.needs_reset
    r.close()
    w.close()


# -- receive (§5.1.6.3, §5.1.6.4) -----------------------------------------------------------------
def test_rx_without_buffers_stops_polling_the_tap(net):
    net.init()
    assert net.mmio.poll_fds() == [(net.dev_sock.fileno(), select.POLLIN)]
    net.host_send(bytes(12) + ether(100))
    net.pump()
    # No buffers: nothing was read (no drop), and the tap is no longer polled (no busy loop).
    assert net.frame_still_queued()
    assert net.mmio.poll_fds() == []
    assert net.c["rx_starved"] == 1 and net.c["rx_packets"] == 0
    net.pump()
    assert net.c["rx_starved"] == 1  # not polled, not even tried again
    net.driver.net_post_rx(count=4)  # the kick resumes receiving
    frames = net.driver.net_recv()
    assert frames == [(hdr(num_buffers=1), ether(100))]
    assert net.mmio.poll_fds() == [(net.dev_sock.fileno(), select.POLLIN)]


def test_rx_passes_the_header_through_and_sets_num_buffers(net):
    net.init(BASIC | TSO)
    net.driver.net_post_rx(count=2, split=5)  # the header split across two descriptors
    header = hdr(flags=nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16, num_buffers=77)
    net.host_send(header + ether(300))
    net.pump()
    ((got_header, frame),) = net.driver.net_recv()
    # Everything but num_buffers as the tap gave it; num_buffers is the device's (1: no MRG_RXBUF).
    assert got_header == header[:10] + struct.pack("<H", 1)
    assert frame == ether(300)
    assert (net.c["rx_packets"], net.c["rx_bytes"]) == (1, 314)


def test_rx_several_frames_per_wakeup(net):
    net.init()
    net.driver.net_post_rx(count=8)
    for i in range(5):
        net.host_send(bytes(12) + ether(60 + i))
    net.pump()
    frames = net.driver.net_recv(5)
    assert [f for _, f in frames] == [ether(60 + i) for i in range(5)]


def test_rx_mergeable_spreads_a_frame_over_buffers(net):
    net.init(BASIC | MRG)
    net.driver.net_post_rx(512, count=4)
    frame = ether(1200)  # 12 + 1214 bytes: 512 + 512 + 202
    net.host_send(bytes(12) + frame)
    net.pump()
    used = net.driver.queue(0).get_used()
    assert [c.length for c in used] == [512, 512, 202]
    data = b"".join(c.writable_data(net.memory)[:c.length] for c in used)
    assert NetHeader.unpack(data[:12]).num_buffers == 3
    assert data[12:] == frame
    assert waiting_rx_buffers(net) == 1  # the fourth buffer waits for the next frame


def test_rx_mergeable_driver_helper_reassembles(net):
    net.init(BASIC | MRG)
    net.driver.net_post_rx(256, count=16)
    frames = [ether(100), ether(1000), ether(40)]
    for f in frames:
        net.host_send(bytes(12) + f)
    net.pump()
    got = net.driver.net_recv(3)
    assert [f for _, f in got] == frames
    assert [NetHeader.unpack(h).num_buffers for h, _ in got] == [1, 5, 1]


def test_rx_mergeable_frame_waits_for_more_buffers(net):
    net.init(BASIC | MRG)
    net.driver.net_post_rx(512, count=1)
    frame = ether(1400)
    net.host_send(bytes(12) + frame)
    net.pump()
    assert net.driver.net_recv() == []
    assert net.mmio.poll_fds() == []  # waiting for buffers, not polling
    net.driver.net_post_rx(512, count=3)
    ((header, got),) = net.driver.net_recv()
    assert got == frame and NetHeader.unpack(header).num_buffers == 3


def test_rx_too_small_buffer_without_mrg_drops_the_frame(net):
    net.init()
    net.driver.net_post_rx(200)
    net.host_send(bytes(12) + ether(1000))
    net.host_send(bytes(12) + ether(100))
    net.pump()
    assert net.c["rx_dropped_too_big"] == 1
    # The buffer is still usable by the next frame that fits.
    assert [f for _, f in net.driver.net_recv()] == [ether(100)]


def test_rx_buffer_smaller_than_the_header_is_returned_empty(net):
    net.init(BASIC | MRG)
    net.driver.queue(0).add([], [8])
    net.driver.net_post_rx(1526)
    net.host_send(bytes(12) + ether(60))
    net.pump()
    used = net.driver.queue(0).get_used()
    assert [c.length for c in used] == [0, 12 + 74]
    assert net.c["rx_bad_buffers"] == 1 and not net.driver.needs_reset


RX_BAD = [
    (BASIC, {"gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4, "gso_size": 1448}, 3000, "gso_type"),
    (BASIC | TSO, {"gso_type": nh.VIRTIO_NET_HDR_GSO_TCPV4 | nh.VIRTIO_NET_HDR_GSO_ECN,
                   "gso_size": 1448}, 3000, "gso_type"),  # no GUEST_ECN
    (BASIC, {"flags": nh.VIRTIO_NET_HDR_F_NEEDS_CSUM}, 100, "csum"),
    (BASIC, {}, 1500 + 18 + 1, "oversize"),
    (BASIC, {}, 8, "runt"),
]


@pytest.mark.parametrize("features,fields,length,reason", RX_BAD)
def test_rx_frames_the_driver_cannot_take_are_dropped(net, features, fields, length, reason):
    net.init(features | MRG)
    net.driver.net_post_rx(4096, count=4)
    net.host_send(hdr(**fields) + (ether(length - 14) if length >= 14 else bytes(length)))
    net.pump()
    assert net.c[f"rx_dropped_{reason}"] == 1 and net.driver.net_recv() == []
    net.host_send(bytes(12) + ether(50))
    net.pump()
    assert len(net.driver.net_recv()) == 1


def test_rx_gso_frame_with_guest_tso(net):
    net.init(BASIC | TSO | MRG)
    net.driver.net_post_rx(4096, count=32)
    header = hdr(flags=nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=nh.VIRTIO_NET_HDR_GSO_TCPV4,
                 hdr_len=66, gso_size=1448, csum_start=34, csum_offset=16)
    frame = ether(60000)
    net.host_send(header + frame)
    net.pump()
    ((got_header, got),) = net.driver.net_recv()
    assert got == frame and got_header[:10] == header[:10]
    assert NetHeader.unpack(got_header).num_buffers == 15  # 60026 bytes over 4096-byte buffers


def test_rx_before_driver_ok_does_not_read(net):
    net.driver.negotiate(BASIC)
    assert net.mmio.poll_fds() == []


def test_rx_eof_on_the_tap_takes_the_link_down(memory):
    net = Net(memory, socket.SOCK_SEQPACKET)  # with EOF: reads return 0, poll stays readable
    net.init()
    net.driver.net_post_rx()
    net.host.close()
    net.pump()
    assert net.c["tap_errors"] == 1 and not net.device.link_up
    assert net.mmio.poll_fds() == []  # no busy loop on a dead tap
    net.dev_sock.close()


def test_rx_read_error_takes_the_link_down(net):
    net.init()
    net.driver.net_post_rx()
    net.device.tap_fd = 999  # closed: EBADF
    net.mmio.on_ready(999, select.POLLIN)
    assert net.c["tap_errors"] == 1 and not net.device.link_up
    assert net.mmio.interrupt_status & regs.INT_CONFIG_CHANGE
    assert net.mmio.poll_fds() == []
    net.device.tap_fd = net.dev_sock.fileno()


# -- broken rings are still DEVICE_NEEDS_RESET -------------------------------------------------------
def test_hostile_transmit_ring_needs_reset(net):
    net.init()
    hostile.publish_loop(net.driver.queue(1))
    net.mmio.queue_notify(1)
    assert net.driver.needs_reset


def test_hostile_receive_ring_needs_reset(net):
    net.init()
    hostile.publish_loop(net.driver.queue(0))
    net.host_send(bytes(12) + ether(60))
    net.pump()
    assert net.driver.needs_reset
    assert net.mmio.poll_fds() == []  # a broken device polls nothing


# -- rate limiting ----------------------------------------------------------------------------------
def test_tx_rate_limited_waits_for_the_timer(memory):
    clock = FakeClock()
    t = Net(memory, tx_limiter=RateLimiter(ops=BucketConfig(2, 1000), clock=clock))
    t.init()
    q = t.driver.queue(1)
    for _ in range(3):
        q.add([bytes(12) + ether(60)], [])
    q.kick()
    assert len(t.host_recv_all()) == 2 and t.c["throttled_tx"] == 1
    deadline = t.mmio.next_deadline_ns()
    assert deadline == clock.now + 500 * NS_PER_MS
    q.kick()  # kicks while throttled send nothing
    assert t.host_recv_all() == []
    clock.now = deadline
    assert t.mmio.on_timer(clock.now)
    assert len(t.host_recv_all()) == 1 and len(q.get_used()) == 3
    assert t.mmio.next_deadline_ns() is None
    t.close()


def test_rx_rate_limited_stops_polling_until_the_deadline(memory):
    clock = FakeClock()
    t = Net(memory, rx_limiter=RateLimiter(BucketConfig(1000, 1000), clock=clock))
    t.init()
    t.driver.net_post_rx(count=4)
    for _ in range(3):
        t.host_send(bytes(12) + ether(900 - 14))
    t.pump()
    # Receive pays after the read (the frame size is known only then): the first frame leaves
    # 100 bytes, the second may start and leaves a debt of 800, the third waits.
    assert len(t.driver.net_recv()) == 2
    assert t.c["throttled_rx"] == 1
    assert t.mmio.poll_fds() == []  # not reading the tap while throttled
    assert t.frame_still_queued()
    deadline = t.mmio.next_deadline_ns()
    assert deadline == clock.now + 801 * NS_PER_MS  # repay 800, then earn 1
    clock.now = deadline
    fds = HostFds(select.poll(), clock=clock)
    assert fds.fire_timer(t.mmio)
    assert len(t.driver.net_recv()) == 1
    t.close()


# -- spec ---------------------------------------------------------------------------------------------
def test_from_spec_duplicates_the_tap_fd(net):
    dev = n.NetDevice.from_spec({"type": "net", "mac": "02:00:00:aa:bb:cc", "mtu": 9000,
                                 "tx_ops": "10/100", "rx_bandwidth": "1048576/100/4096",
                                 "netns": "new"}, {"tap": net.dev_sock.fileno()})
    assert dev.mac == bytes.fromhex("020000aabbcc") and dev.mtu == 9000
    assert dev.tap_fd != net.dev_sock.fileno()  # a dup: the caller keeps its own
    assert dev.tx_limiter is not None and dev.tx_limiter.ops.size == 10 and dev.tx_limiter.bandwidth is None
    assert dev.rx_limiter is not None and dev.rx_limiter.bandwidth.burst == 4096
    dev.close()
    os.fstat(net.dev_sock.fileno())  # still open


def test_create_device_through_the_kind(net, monkeypatch):
    from ipc_protocol import kinds
    from ipc_protocol.kinds import NET
    from device_procs.virtio import create_device
    monkeypatch.setitem(kinds.KINDS, "net", NET)
    dev = create_device({"type": "net", "mac": "52:54:00:12:34:56"}, {"tap": net.dev_sock.fileno()})
    assert isinstance(dev, n.NetDevice) and dev.mtu == 1500
    dev.close()
    with pytest.raises(DeviceSpecError, match="queues"):
        create_device({"type": "net", "mac": "52:54:00:12:34:56", "queues": 2}, {"tap": 0})


@pytest.mark.parametrize("spec,fds,match", [
    ({"mac": "52:54:00:00:00:01"}, {}, "tap fd"),
    ({}, None, "mac"),
    ({"mac": "52:54:00:00:01"}, None, "six hex"),
    ({"mac": "52:54:00:00:00:zz"}, None, "six hex"),
    ({"mac": 5}, None, "six hex"),
    ({"mac": "01:00:5e:00:00:01"}, None, "multicast"),
    ({"mac": "52:54:00:00:00:01", "mtu": 40}, None, "mtu"),
    ({"mac": "52:54:00:00:00:01", "mtu": "1500"}, None, "mtu"),
    ({"mac": "52:54:00:00:00:01", "tx_bandwidth": "fast"}, None, "tx_bandwidth"),
    ({"mac": "52:54:00:00:00:01", "rx_ops": "0/10"}, None, "size"),
])
def test_bad_specs_are_named(net, spec, fds, match):
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceSpecError, match=match):
        n.NetDevice.from_spec({"type": "net", **spec}, {"tap": net.dev_sock.fileno()} if fds is None else fds)
    assert set(os.listdir("/proc/self/fd")) <= before  # no dup left behind


def test_blocking_tap_fd_is_refused(memory):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(DeviceSpecError, match="non-blocking"):
        n.NetDevice(a.fileno(), MAC, owns_fd=False)
    a.close()
    b.close()


# -- a restarted device process ------------------------------------------------------------------------
def test_restore_resends_held_transmits_and_reuses_held_receive_buffers(net):
    """A new device process (restore from the core's copy of the transport) resumes at the used
    index: a transmit the old one held is sent again, receive buffers it held are popped again."""
    import msgpack
    from device_procs.virtio import MmioDevice
    net.init(BASIC | MRG | TSO)
    net.driver.net_post_rx(512, count=8)
    net.host_send(bytes(12) + ether(100))
    net.pump()
    assert len(net.driver.net_recv()) == 1
    if not net.device.native:
        assert net.device.stats()["rx_held_buffers"] > 0  # (the C path holds none)
    q = net.driver.queue(1)
    q.add([bytes(12) + ether(70)], [])  # never kicked: the old process dies before it
    state = msgpack.unpackb(msgpack.packb(net.mmio.state()))
    offloads = []
    new_dev = n.NetDevice(net.dev_sock.fileno(), MAC, owns_fd=False, set_offload=offloads.append)
    new = MmioDevice(new_dev, net.memory, net.h._notify)
    new.restore(state)
    net.h.device, net.h.mmio, net.mmio, net.device = new_dev, new, new, new_dev
    net.driver._read, net.driver._write = new.read, new.write
    assert offloads[-1] == nh.TUN_F_CSUM | nh.TUN_F_TSO4 | nh.TUN_F_TSO6  # re-applied
    new.kick_all()
    assert net.host_recv_all() == [bytes(12) + ether(70)]
    assert len(q.get_used()) == 1
    net.host_send(bytes(12) + ether(1000))
    net.pump()
    ((header, frame),) = net.driver.net_recv()
    assert frame == ether(1000) and NetHeader.unpack(header).num_buffers == 3


def test_rx_mergeable_frame_larger_than_the_whole_ring_is_dropped(memory):
    t = Net(memory)
    t.init(BASIC | MRG | TSO)  # 256-entry rings; only 20-byte buffers posted
    t.driver.net_post_rx(20, count=256)
    t.host_send(hdr(flags=1, gso_type=nh.VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1448, csum_start=34,
                    csum_offset=16) + ether(20000))
    t.host_send(bytes(12) + ether(4))
    t.pump()
    assert t.c["rx_dropped_too_big"] == 1
    assert [f for _, f in t.driver.net_recv()] == [ether(4)]
    t.close()


# -- control queue (§5.1.6.5) -----------------------------------------------------------------------------
from device_procs.virtio import net_ctrl as nc  # noqa: E402

CTRL = nh.VIRTIO_NET_F_CTRL_VQ | nh.VIRTIO_NET_F_CTRL_RX
OTHER = bytes.fromhex("525400999999")
MCAST = bytes.fromhex("01005e000001")
MCAST2 = bytes.fromhex("333300000001")


def mac_tables(uni: list[bytes], multi: list[bytes]) -> bytes:
    return (struct.pack("<I", len(uni)) + b"".join(uni) + struct.pack("<I", len(multi)) + b"".join(multi))


def deliver(net: Net, dst: bytes) -> bool:
    """Send a frame for `dst` from the tap; did the driver get it?"""
    net.host_send(bytes(12) + ether(50, dst=dst))
    net.pump()
    return len(net.driver.net_recv()) == 1


def test_ctrl_rx_filter(net):
    net.init(BASIC | CTRL)
    net.driver.net_post_rx(count=32)
    # Until the driver sets a mode, everything passes (promiscuous, as QEMU starts).
    assert deliver(net, OTHER)
    assert net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == nc.VIRTIO_NET_OK
    assert net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                               mac_tables([], [MCAST])) == nc.VIRTIO_NET_OK
    assert deliver(net, MAC) and deliver(net, b"\xff" * 6) and deliver(net, MCAST)
    assert not deliver(net, OTHER) and not deliver(net, MCAST2)
    assert net.c["rx_dropped_filtered"] == 2
    assert net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\1") == nc.VIRTIO_NET_OK
    assert deliver(net, MCAST2) and not deliver(net, OTHER)
    assert net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                               mac_tables([OTHER], [])) == nc.VIRTIO_NET_OK
    assert deliver(net, OTHER)
    assert net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == nc.VIRTIO_NET_OK
    assert deliver(net, bytes.fromhex("525400777777"))
    assert net.c["ctrl_ok"] == 5 and not net.driver.needs_reset


def test_ctrl_filter_is_emptied_by_reset(net):
    net.init(BASIC | CTRL)
    net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_PROMISC, b"\0")
    net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_tables([OTHER], []))
    net.init(BASIC | CTRL)
    f = net.device.rx_filter
    assert f.promisc and f.unicast == set() and f.multicast == set()


def test_ctrl_table_overflow_stops_filtering_that_kind(net):
    net.init(BASIC | CTRL)
    net.driver.net_post_rx(count=8)
    many = [bytes([0x01, 0, 0x5E, 0, i >> 8, i & 0xFF]) for i in range(nc.MAC_TABLE_ENTRIES + 1)]
    net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_PROMISC, b"\0")
    assert net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                               mac_tables([], many)) == nc.VIRTIO_NET_OK
    assert deliver(net, MCAST2)       # every multicast passes now
    assert not deliver(net, OTHER)    # unicast is still filtered


@pytest.mark.parametrize("cls,cmd,data", [
    (nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_PROMISC, b""),          # no on/off byte
    (nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_PROMISC, b"\2"),        # not 0 or 1
    (nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\1\1"),     # too long
    (nc.VIRTIO_NET_CTRL_RX, 2, b"\1"),                                    # ALLUNI: RX_EXTRA not offered
    (nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET, b"\1\0\0\0"),  # entries past the end
    (nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_tables([], []) + b"x"),  # trailing
    (nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_tables([MCAST], [])),  # multicast as unicast
    (nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_TABLE_SET, mac_tables([], [OTHER])),  # unicast as multicast
    (nc.VIRTIO_NET_CTRL_MAC, nc.VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER),      # CTRL_MAC_ADDR not offered
    (2, 0, b"\1\0"),                                                      # VLAN
    (4, 0, b"\1\0"),                                                      # MQ
    (0xFF, 0, b""),
])
def test_ctrl_commands_not_supported_are_err(net, cls, cmd, data):
    net.init(BASIC | CTRL)
    assert net.driver.net_ctrl(cls, cmd, data) == nc.VIRTIO_NET_ERR
    assert net.c["ctrl_err"] == 1 and not net.driver.needs_reset
    assert net.device.rx_filter.promisc and not net.device.rx_filter.multicast


def test_ctrl_rx_commands_need_ctrl_rx(net):
    net.init(BASIC | nh.VIRTIO_NET_F_CTRL_VQ)
    assert net.driver.net_ctrl(nc.VIRTIO_NET_CTRL_RX, nc.VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == nc.VIRTIO_NET_ERR
    net.driver.net_post_rx()
    assert deliver(net, OTHER)  # no CTRL_RX: no filtering at all


def test_ctrl_malformed_chains(net):
    net.init(BASIC | CTRL)
    q = net.driver.queue(2)
    assert q.submit([b"\0\0\1"], []).length == 0  # no ack byte: returned unused
    assert net.c["ctrl_malformed"] == 1
    done = q.submit([b"\0"], [1])                   # no command byte: ERR
    assert done.writable_data(net.memory) == bytes([nc.VIRTIO_NET_ERR]) and done.length == 1
    done = q.submit([bytes([0, 0]) + bytes(nc.MAX_COMMAND_BYTES)], [1])  # larger than any command
    assert done.writable_data(net.memory) == bytes([nc.VIRTIO_NET_ERR])
    # The ack is the last writable byte, wherever the driver split its buffers (§2.6.4).
    done = q.submit([b"\0", b"\0", b"\0"], [3, 1])
    assert done.writable_data(net.memory)[-1] == nc.VIRTIO_NET_OK
    assert not net.driver.needs_reset


def test_ctrl_hostile_ring_needs_reset(net):
    net.init(BASIC | CTRL)
    hostile.publish_loop(net.driver.queue(2))
    net.mmio.queue_notify(2)
    assert net.driver.needs_reset
