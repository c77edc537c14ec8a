"""virtio-net against a real tap in network namespaces this test makes (root).

The device runs in this process behind its transport, driven by the host-side `VirtioDriver`
playing the guest, with the host loop of `HostFds`.  Every address lives in a namespace named
`bh-test-<pid>-<n>`, removed afterwards even when a test fails.  What is shown:

- ARP and ICMP echo with the kernel's address on the tap (with and without offloads, MRG_RXBUF);
- receive checksum offload: with GUEST_CSUM the tap hands over partially checksummed frames
  (TUNSETOFFLOAD took effect), without it complete ones;
- receive TSO: with GUEST_TSO4 a TCP burst from a socket in the namespace (the test plays the
  guest's handshake) reaches the guest as one GSO frame of several MSS (7300 bytes here),
  without it as MSS-sized segments;
- transmit checksum offload and TSO end to end: a partially checksummed UDP datagram and one
  20 000-byte TCP GSO frame from the guest are forwarded by the VM's namespace to a peer
  namespace over a veth without offloads (vmm_core/netsetup.py's plan), and arrive there as
  valid segments of at most the MSS with correct checksums computed by the kernel; the same
  for a TCP-over-IPv6 GSO frame (HOST_TSO6, GSO_TCPV6);
- the net seccomp policy (jail_configs/net.toml) holds while the device serves the tap;
- the core's tap opener: netns=new, refusing a non-tap name, attaching to a persistent tap.

Namespaces come from the `netns` fixture (tests/e2e/conftest.py, vmm_core/testing/netns.py).
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import time
from typing import Callable, Iterator

import pytest


from device_procs.testing import packets as pk
from device_procs.testing.local import LocalHarness
from device_procs.virtio import net_header as nh
from device_procs.virtio.device import COMMON_FEATURES
from device_procs.virtio.hostfds import HostFds
from device_procs.virtio.net import OFFERED, NetDevice
from device_procs.virtio.net_header import NetHeader
from vmm_core.devices.tap import (SIOCETHTOOL, NetNamespace, TapError, _ifreq_ioctl, in_namespace,
                                  interface_kind, open_tap)
from vmm_core.memory import create_guest_memory
from vmm_core.netsetup import NetPlan, run
from vmm_core.testing.netns import sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.0.2.15"
PEER_IP = "10.0.2.2"      # the tap's address inside the VM's namespace
FAR_IP = "10.200.0.1"     # the peer namespace's end of the veth (netsetup's link_host)
BASIC = COMMON_FEATURES | nh.VIRTIO_NET_F_MAC | nh.VIRTIO_NET_F_MTU | nh.VIRTIO_NET_F_STATUS
CSUM_TSO = (nh.VIRTIO_NET_F_CSUM | nh.VIRTIO_NET_F_GUEST_CSUM | nh.VIRTIO_NET_F_HOST_TSO4
            | nh.VIRTIO_NET_F_GUEST_TSO4)


def link_mac(ns: str, name: str) -> bytes:
    info = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", name],
                                     capture_output=True, text=True, check=True).stdout)
    return bytes.fromhex(info[0]["address"].replace(":", ""))


class Guest:
    """The device on a real tap, the driver playing the guest, and the host loop."""

    RX_BUFFERS = 64

    def __init__(self, ns_name: str, features: int, *, tap_addr: str | None = f"{PEER_IP}/24",
                 rx_size: int | None = None) -> None:
        self.ns_name = ns_name
        self.ns = NetNamespace.open(ns_name)
        self.tap = open_tap("bhtap0", self.ns)
        if tap_addr:
            sh(ns_name, f"ip addr add {tap_addr} dev bhtap0")
        self.memory = create_guest_memory(64 << 20)
        self.device = NetDevice(self.tap.fd, GUEST_MAC, mtu=self.tap.mtu, owns_fd=False)
        self.h = LocalHarness(self.device, self.memory, ram_size=48 << 20)
        self.driver = self.h.driver
        self.negotiated = self.driver.init(features)
        mergeable = self.negotiated & nh.VIRTIO_NET_F_MRG_RXBUF
        gso_rx = self.negotiated & nh.GUEST_GSO
        # §5.1.6.3.1: without MRG_RXBUF, buffers for the largest frame the driver accepts.
        self.rx_size = rx_size or (4096 if mergeable else 65562 if gso_rx else 1526)
        self.fds = HostFds(select.poll())
        self.refill()

    def refill(self) -> None:
        q = self.driver.queue(0)
        missing = self.RX_BUFFERS - len(q.in_flight)
        if missing > 0:
            self.driver.net_post_rx(self.rx_size, count=missing)

    def serve(self, timeout_ms: int = 10) -> None:
        self.fds.sync(self.h.mmio.poll_fds())
        for fd, events in self.fds.poller.poll(timeout_ms):
            self.h.mmio.on_ready(fd, self.fds.to_select(events))

    def send(self, frame: bytes, header: bytes = bytes(12)) -> None:
        self.driver.net_send(frame, header)

    def recv_until(self, pred: Callable[[bytes, bytes], bool], timeout: float = 5.0) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.serve()
            for header, frame in self.driver.net_recv():
                if pred(header, frame):
                    self.refill()
                    return header, frame
            self.refill()
        raise AssertionError(f"no matching frame in {timeout} s; counters "
                             f"{ {k: v for k, v in self.device.counters.items() if v} }")

    def resolve(self, ip: str) -> bytes:
        """ARP for `ip`; its MAC."""
        self.send(pk.arp_request(GUEST_MAC, GUEST_IP, ip))
        _, frame = self.recv_until(lambda h, f: (a := pk.parse_arp(f)) is not None and a.op == 2
                                   and a.sender_ip == ip)
        arp = pk.parse_arp(frame)
        assert arp is not None and arp.target_mac == GUEST_MAC and arp.target_ip == GUEST_IP
        return arp.sender_mac

    def close(self) -> None:
        self.device.close()
        self.tap.close()
        self.ns.close()
        self.memory.close()


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    made: list[Guest] = []
    yield made
    for g in made:
        g.close()


# -- ARP and ICMP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("features", [BASIC, OFFERED], ids=["plain", "all-offloads-mrg"])
def test_arp_and_icmp_echo_with_the_kernel(netns, guests, features):
    ns = netns()
    g = Guest(ns, features)
    guests.append(g)
    peer_mac = g.resolve(PEER_IP)
    assert peer_mac == link_mac(ns, "bhtap0")
    payload = bytes(range(256)) * 4
    request = pk.icmp_echo(0x4242, 7, payload)
    g.send(pk.ip_frame(peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, pk.IPPROTO_ICMP, request))

    def is_reply(h: bytes, f: bytes) -> bool:
        ip = pk.parse_ipv4(f)
        return ip is not None and ip.proto == pk.IPPROTO_ICMP and ip.payload[0] == 0
    header, frame = g.recv_until(is_reply)
    ip = pk.parse_ipv4(frame)
    assert ip is not None and (ip.src, ip.dst) == (PEER_IP, GUEST_IP)
    assert frame[:6] == GUEST_MAC and frame[6:12] == peer_mac
    assert pk.checksum(ip.header) == 0
    assert ip.payload == pk.icmp_echo(0x4242, 7, payload, reply=True)
    assert NetHeader.unpack(header).num_buffers >= 1
    c = g.device.counters
    assert c["tx_packets"] == 2 and c["rx_packets"] >= 2
    assert not any(v for k, v in c.items() if "dropped" in k or k == "tap_errors")


# -- receive checksum offload (TUNSETOFFLOAD from GUEST_CSUM) ----------------------------------------
@pytest.mark.parametrize("guest_csum", [True, False])
def test_receive_checksum_offload_follows_the_features(netns, guests, guest_csum):
    ns = netns()
    g = Guest(ns, BASIC | (CSUM_TSO if guest_csum else 0))
    guests.append(g)
    assert g.device.offloads == (nh.TUN_F_CSUM | nh.TUN_F_TSO4 if guest_csum else 0)
    g.resolve(PEER_IP)  # the kernel learns our MAC from the request
    sender = in_namespace(g.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sender.sendto(b"offload me" * 20, (GUEST_IP, 7777))
    finally:
        sender.close()

    def is_udp(h: bytes, f: bytes) -> bool:
        ip = pk.parse_ipv4(f)
        return ip is not None and ip.proto == pk.IPPROTO_UDP
    header, frame = g.recv_until(is_udp)
    h = NetHeader.unpack(header)
    ip = pk.parse_ipv4(frame)
    assert ip is not None and ip.payload[8:] == b"offload me" * 20
    if guest_csum:
        # §5.1.6.4: NEEDS_CSUM with csum_start/csum_offset: the driver completes the checksum.
        assert h.flags & nh.VIRTIO_NET_HDR_F_NEEDS_CSUM
        assert (h.csum_start, h.csum_offset) == (pk.ETH_HLEN + pk.IP_HLEN, pk.UDP_CSUM_OFFSET)
        assert not ip.l4_checksum_ok()
        done = pk.parse_ipv4(pk.complete_checksum(frame, h.csum_start, h.csum_offset))
        assert done is not None and done.l4_checksum_ok()
    else:
        assert h.flags == 0 and ip.l4_checksum_ok()


# -- receive segmentation offload (GUEST_TSO4 -> TUN_F_TSO4) -----------------------------------------------
@pytest.mark.parametrize("guest_tso", [True, False])
def test_receive_tso_hands_the_guest_unsegmented_tcp(netns, guests, guest_tso):
    """A TCP socket in the namespace talks to the guest (the test plays its TCP handshake);
    with GUEST_TSO4 the kernel's first burst reaches the guest as one GSO frame larger than the
    MSS, without it as MSS-sized segments."""
    ns = netns()
    features = BASIC | nh.VIRTIO_NET_F_MRG_RXBUF | (CSUM_TSO if guest_tso else nh.VIRTIO_NET_F_GUEST_CSUM)
    g = Guest(ns, features)
    guests.append(g)
    peer_mac = g.resolve(PEER_IP)
    client = in_namespace(g.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        client.setblocking(False)
        client.connect_ex((GUEST_IP, 8080))

        def tcp_with(flags: int) -> Callable[[bytes, bytes], bool]:
            def match(h: bytes, f: bytes) -> bool:
                ip = pk.parse_ipv4(f)
                return ip is not None and ip.proto == pk.IPPROTO_TCP and ip.payload[13] & flags == flags
            return match
        _, syn = g.recv_until(tcp_with(pk.TCP_SYN))
        ip = pk.parse_ipv4(syn)
        sport, isn = struct.unpack_from("!HxxI", ip.payload)[0], struct.unpack_from("!I", ip.payload, 4)[0]
        synack = pk.tcp(GUEST_IP, PEER_IP, 8080, sport, 5000, isn + 1, pk.TCP_SYN | pk.TCP_ACK, b"",
                        options=pk.tcp_mss_option(1460))
        g.send(pk.ip_frame(peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, pk.IPPROTO_TCP, synack))
        deadline = time.monotonic() + 5
        while client.connect_ex((GUEST_IP, 8080)) not in (0, 106):  # EISCONN once established
            assert time.monotonic() < deadline, "the kernel never completed the handshake"
            g.serve()
        data = bytes((i * 13) & 0xFF for i in range(14000))
        client.send(data)  # within the initial window: one burst

        def carries_data(h: bytes, f: bytes) -> bool:
            ip = pk.parse_ipv4(f)
            return ip is not None and ip.proto == pk.IPPROTO_TCP and len(ip.payload) > pk.TCP_HLEN + 12
        header, frame = g.recv_until(carries_data)
        h = NetHeader.unpack(header)
        seg = pk.parse_ipv4(pk.complete_checksum(frame, h.csum_start, h.csum_offset)
                            if h.flags & nh.VIRTIO_NET_HDR_F_NEEDS_CSUM else frame)
        hlen = (seg.payload[12] >> 4) * 4
        payload = seg.payload[hlen:]
        assert seg.l4_checksum_ok() and data.startswith(payload)
        if guest_tso:
            assert h.gso_type == nh.VIRTIO_NET_HDR_GSO_TCPV4 and 0 < h.gso_size <= 1460
            assert len(payload) > h.gso_size  # several segments' worth in one frame
        else:
            assert h.gso_type == nh.VIRTIO_NET_HDR_GSO_NONE and len(payload) <= 1460
    finally:
        client.close()


# -- transmit checksum offload and TSO, forwarded to a peer namespace -------------------------------------
ETHTOOL_STXCSUM, ETHTOOL_STSO, ETHTOOL_SGSO = 0x17, 0x1F, 0x24


def no_offloads(iface: str) -> None:
    """ethtool -K IFACE tx off tso off gso off, through SIOCETHTOOL (no ethtool binary needed):
    the kernel then segments and checksums in software before the frame leaves."""
    import ctypes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in (ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_STXCSUM):
            value = ctypes.create_string_buffer(struct.pack("<II", cmd, 0))
            _ifreq_ioctl(s, SIOCETHTOOL, iface.encode(), struct.pack("<Q", ctypes.addressof(value)))


def assert_tso_segments(segs: list[pk.Ip], data: bytes, *, mss: int, first_seq: int) -> None:
    """What the peer must see of one GSO frame the kernel segmented: valid TCP checksums, at
    most `mss` bytes each, in order from `first_seq`, together exactly `data`."""
    assert all(s.l4_checksum_ok() for s in segs)
    assert all(len(s.payload) - pk.TCP_HLEN <= mss for s in segs)
    seqs = [struct.unpack_from("!I", s.payload, 4)[0] for s in segs]
    assert seqs == sorted(seqs) and seqs[0] == first_seq
    assert b"".join(s.payload[pk.TCP_HLEN:] for s in segs) == data


def test_transmit_checksum_offload_and_tso_end_to_end(netns, guests):
    vm_ns, peer_ns = netns(), netns()
    g = Guest(vm_ns, BASIC | CSUM_TSO | nh.VIRTIO_NET_F_MRG_RXBUF, tap_addr=None)
    guests.append(g)
    plan = NetPlan(f"/run/netns/{vm_ns}", "bhtap0", name=f"t{os.getpid() % 100000}",
                   tap_addr=f"{PEER_IP}/24", host_netns=peer_ns)
    run(plan.up())
    in_namespace(g.ns, lambda: no_offloads(plan.veth_ns))
    peer = NetNamespace.open(peer_ns)
    eth_p_all = socket.htons(0x0003)
    capture = in_namespace(peer, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, eth_p_all))
    peer.close()
    try:
        capture.bind((plan.veth_host, 0))
        capture.settimeout(0.2)
        gateway = g.resolve(PEER_IP)

        def captured(pred: Callable[[pk.Ip], bool], count: int, timeout: float = 5.0) -> list[pk.Ip]:
            got: list[pk.Ip] = []
            deadline = time.monotonic() + timeout
            while len(got) < count and time.monotonic() < deadline:
                g.serve(0)  # the guest answers nothing, but keep its receive side moving
                try:
                    frame, addr = capture.recvfrom(70000)
                except socket.timeout:
                    continue
                ip = pk.parse_ipv4(frame)
                if addr[2] != socket.PACKET_OUTGOING and ip is not None and pred(ip):
                    got.append(ip)
            return got

        # A UDP datagram with only the pseudo-header sum in its checksum (NEEDS_CSUM).
        datagram = pk.udp(GUEST_IP, FAR_IP, 4000, 9999, b"partial checksum" * 8, partial=True)
        csum_hdr = NetHeader(flags=nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34,
                             csum_offset=pk.UDP_CSUM_OFFSET).pack()
        g.send(pk.ip_frame(gateway, GUEST_MAC, GUEST_IP, FAR_IP, pk.IPPROTO_UDP, datagram), csum_hdr)
        (udp,) = captured(lambda ip: ip.proto == pk.IPPROTO_UDP, 1)
        assert udp.payload[8:] == b"partial checksum" * 8 and udp.l4_checksum_ok()

        # One TCP frame of 20 000 payload bytes with GSO TCPV4, MSS 1000.
        data = bytes((i * 31 + 7) & 0xFF for i in range(20000))
        segment = pk.tcp(GUEST_IP, FAR_IP, 40000, 5555, 1000, 0, pk.TCP_ACK | pk.TCP_PSH, data, partial=True)
        tso_hdr = NetHeader(flags=nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=nh.VIRTIO_NET_HDR_GSO_TCPV4,
                            hdr_len=54, gso_size=1000, csum_start=34, csum_offset=pk.TCP_CSUM_OFFSET).pack()
        g.send(pk.ip_frame(gateway, GUEST_MAC, GUEST_IP, FAR_IP, pk.IPPROTO_TCP, segment), tso_hdr)
        ours = struct.pack("!H", 40000)  # the source port
        segs = captured(lambda ip: ip.proto == pk.IPPROTO_TCP and ip.payload[:2] == ours, 20)
        assert len(segs) == 20
        assert all(pk.checksum(s.header) == 0 for s in segs)  # IPv4 has a header checksum
        assert_tso_segments(segs, data, mss=1000, first_seq=1000)
        assert g.device.counters["tx_packets"] == 3
    finally:
        capture.close()
        run(plan.down(), check=False)


def test_tso6_end_to_end_over_ipv6(netns, guests):
    """HOST_TSO6: one 20 000-byte TCP-over-IPv6 GSO frame from the guest, forwarded by the VM's
    namespace to the peer over a veth without offloads, arrives as 20 segments of at most the
    MSS with correct checksums (the kernel segmented what the tap was handed with GSO_TCPV6)."""
    guest6, tap6, link_ns6, far6 = "fd00:2::15", "fd00:2::2", "fd00:200::2", "fd00:200::1"
    vm_ns, peer_ns = netns(), netns()
    for ns in (vm_ns, peer_ns):  # the fixture turns IPv6 off; this test needs it
        sh(ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0")
    g = Guest(vm_ns, BASIC | CSUM_TSO | nh.VIRTIO_NET_F_HOST_TSO6 | nh.VIRTIO_NET_F_MRG_RXBUF,
              tap_addr=None)
    guests.append(g)
    assert g.negotiated & nh.VIRTIO_NET_F_HOST_TSO6
    plan = NetPlan(f"/run/netns/{vm_ns}", "bhtap0", name=f"s{os.getpid() % 100000}",
                   tap_addr=f"{PEER_IP}/24", host_netns=peer_ns)
    run(plan.up())
    sh(vm_ns, f"ip -6 addr add {tap6}/64 dev bhtap0 nodad")
    sh(vm_ns, f"ip -6 addr add {link_ns6}/64 dev {plan.veth_ns} nodad")
    sh(vm_ns, "sysctl -qw net.ipv6.conf.all.forwarding=1")
    sh(peer_ns, f"ip -6 addr add {far6}/64 dev {plan.veth_host} nodad")
    in_namespace(g.ns, lambda: no_offloads(plan.veth_ns))
    peer = NetNamespace.open(peer_ns)
    capture = in_namespace(peer, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                                       socket.htons(0x0003)))
    peer.close()
    try:
        capture.bind((plan.veth_host, 0))
        capture.settimeout(0.2)
        tap_mac = link_mac(vm_ns, "bhtap0")  # the guest's next hop (no NDP needed for sending)
        data = bytes((i * 29 + 3) & 0xFF for i in range(20000))
        segment = pk.tcp(guest6, far6, 40006, 5556, 1000, 0, pk.TCP_ACK | pk.TCP_PSH, data, partial=True)
        csum_start = pk.ETH_HLEN + pk.IP6_HLEN
        tso_hdr = NetHeader(flags=nh.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=nh.VIRTIO_NET_HDR_GSO_TCPV6,
                            hdr_len=csum_start + pk.TCP_HLEN, gso_size=1000, csum_start=csum_start,
                            csum_offset=pk.TCP_CSUM_OFFSET).pack()
        ours = struct.pack("!H", 40006)
        segs: list[pk.Ip] = []
        deadline = time.monotonic() + 10
        # Sent again until it shows up: the namespace's first neighbour lookup of the peer may
        # drop the packet that triggered it (the queue keeps only a few while NDP runs).
        sent, last_send = 0, 0.0
        while len(segs) < 20 and time.monotonic() < deadline:
            if not segs and sent < 5 and time.monotonic() - last_send > 1.0:
                g.send(pk.ip6_frame(tap_mac, GUEST_MAC, guest6, far6, pk.IPPROTO_TCP, segment), tso_hdr)
                sent, last_send = sent + 1, time.monotonic()
            g.serve(0)
            try:
                frame, addr = capture.recvfrom(70000)
            except socket.timeout:
                continue
            ip = pk.parse_ipv6(frame)
            if addr[2] != socket.PACKET_OUTGOING and ip is not None and ip.proto == pk.IPPROTO_TCP \
                    and ip.payload[:2] == ours:
                segs.append(ip)
        assert len(segs) == 20, (len(segs), sent, g.device.counters)
        assert_tso_segments(segs, data, mss=1000, first_seq=1000)
        assert g.device.counters["tx_dropped_gso_type"] == 0
    finally:
        capture.close()
        run(plan.down(), check=False)


# -- the jail policy -----------------------------------------------------------------------------------
def test_net_policy_holds_while_serving_a_tap(netns):
    """Fork a child that opens everything, loads jail_configs/net.toml (trap mode: a violation is
    named), then serves: negotiation (TUNSETOFFLOAD), ARP + ICMP through the kernel, a device reset
    (TUNSETOFFLOAD 0), EAGAIN-free transmit and receive."""
    from jail import seccomp
    from jail.policy import load_policy
    ns = netns()
    policy = load_policy("net")
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            g = Guest(ns, OFFERED)
            seccomp.install(policy, "trap", report_w)
            peer = g.resolve(PEER_IP)
            g.send(pk.ip_frame(peer, GUEST_MAC, GUEST_IP, PEER_IP, pk.IPPROTO_ICMP, pk.icmp_echo(1, 1, b"jail")))
            g.recv_until(lambda h, f: (ip := pk.parse_ipv4(f)) is not None and ip.proto == pk.IPPROTO_ICMP)
            g.driver.reset()
            g.driver.init(BASIC)
            code = 0 if g.device.offloads == 0 else 3
        except BaseException:
            code = 2
        os._exit(code)
    os.close(report_w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(report_r) as f:
        report = f.read()
    violation = seccomp.parse_report_line(report.splitlines()[0]) if report.strip() else None
    assert violation is None, f"net.toml lacks {violation}"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# -- the core's tap opener ----------------------------------------------------------------------------------
def test_tap_in_a_new_namespace_stays_out_of_the_core():
    ns = NetNamespace.open("new")
    try:
        tap = open_tap("bhnew0", ns)
        try:
            assert ns.inode() != os.stat("/proc/self/ns/net").st_ino
            assert interface_kind("bhnew0") is None  # not in the core's namespace
            assert in_namespace(ns, lambda: interface_kind("bhnew0")) == "tap"
            assert os.get_blocking(tap.fd) is False
            assert os.get_inheritable(tap.fd) is False
            out = subprocess.run(["nsenter", f"--net={ns.path}", "ip", "-d", "link", "show", "bhnew0"],
                                 capture_output=True, text=True, check=True).stdout
            assert "vnet_hdr on" in out and "tap" in out and "UP" in out
        finally:
            tap.close()
    finally:
        ns.close()


def test_tap_name_of_another_kind_is_refused(netns):
    ns_name = netns()
    sh(ns_name, "ip link add bhveth0 type veth peer name bhveth1")
    sh(ns_name, "ip tuntap add dev bhtun0 mode tun")
    ns = NetNamespace.open(ns_name)
    try:
        with pytest.raises(TapError, match=r"not a tap \(driver: veth\)"):
            open_tap("bhveth0", ns)
        with pytest.raises(TapError, match=r"not a tap \(driver: tun\)"):
            open_tap("bhtun0", ns)
        with pytest.raises(TapError, match="IFNAMSIZ"):
            open_tap("a-name-far-too-long", ns)
    finally:
        ns.close()


def test_attaching_to_a_persistent_tap_leaves_it(netns):
    ns_name = netns()
    sh(ns_name, "ip tuntap add dev bhper0 mode tap vnet_hdr")
    ns = NetNamespace.open(ns_name)
    try:
        tap = open_tap("bhper0", ns, mtu=1400)
        assert tap.mtu == 1400
        with pytest.raises(TapError, match="already attached"):
            open_tap("bhper0", ns)
        tap.close()
        assert "bhper0" in sh(ns_name, "ip link show bhper0")
    finally:
        ns.close()


def test_tap_resource_opener_keeps_only_a_new_namespace(netns):
    from vmm_core.devices.tap import open_tap_resource
    ns_name = netns()
    tap, keep = open_tap_resource("bhres0", ns_name, 1400, "--net tap=bhres0")
    try:
        assert keep is None and tap.mtu == 1400  # a named namespace outlives the VM anyway
        assert "mtu 1400" in sh(ns_name, "ip link show bhres0")
    finally:
        tap.close()
    tap, keep = open_tap_resource("bhres1", "new", None, "--net tap=bhres1,netns=new")
    try:
        assert keep is not None and keep.owned
        assert in_namespace(keep, lambda: interface_kind("bhres1")) == "tap"
    finally:
        tap.close()
        keep.close()
    with pytest.raises(TapError, match=r"^--net tap=x,netns=nope: netns nope"):
        open_tap_resource("x", "nope", None, "--net tap=x,netns=nope")
