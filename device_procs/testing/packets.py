"""Ethernet, ARP, IPv4/IPv6, ICMP, UDP and TCP frames for tests that play a guest on a virtio-net device.

Just enough to talk to a real kernel through a tap: build frames with correct checksums (or a
partial one for checksum offload, VIRTIO 1.2 §5.1.6.2), and pick received frames apart.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IP6_HLEN = 40
ETH_P_ARP = 0x0806
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
BROADCAST = b"\xff" * 6
ETH_HLEN = 14
IP_HLEN = 20
UDP_HLEN = 8
TCP_HLEN = 20
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6


def ip4(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def ones_sum(data: bytes, start: int = 0) -> int:
    """The 16-bit ones' complement sum of `data` (RFC 1071), not yet inverted."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes, start: int = 0) -> int:
    return ~ones_sum(data, start) & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, src_mac, ip4(src_ip), bytes(6), ip4(target_ip))
    return ethernet(BROADCAST, src_mac, ETH_P_ARP, body)


@dataclass(frozen=True)
class Arp:
    op: int
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str


def parse_arp(frame: bytes) -> Arp | None:
    if len(frame) < ETH_HLEN + 28 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_ARP:
        return None
    _, _, _, _, op, smac, sip, tmac, tip = struct.unpack_from("!HHBBH6s4s6s4s", frame, ETH_HLEN)
    return Arp(op, smac, str(ipaddress.IPv4Address(sip)), tmac, str(ipaddress.IPv4Address(tip)))


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, IP_HLEN + len(payload), ident, 0x4000, ttl, proto, 0,
                         ip4(src), ip4(dst))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def ip_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, proto: int, payload: bytes) -> bytes:
    """An Ethernet frame carrying an IPv4 packet."""
    return ethernet(dst_mac, src_mac, ETH_P_IP, ipv4(src, dst, proto, payload))


def pseudo_header_sum(src: str, dst: str, proto: int, length: int) -> int:
    """RFC 793's pseudo header for IPv4 addresses, RFC 8200 §8.1's for IPv6 ones."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 6:
        return ones_sum(a.packed + b.packed + struct.pack("!I3xB", length, proto))
    return ones_sum(a.packed + b.packed + struct.pack("!BBH", 0, proto, length))


def ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def ip6_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    """An Ethernet frame carrying an IPv6 packet (no extension headers)."""
    return ethernet(dst_mac, src_mac, ETH_P_IPV6, ipv6(src, dst, next_header, payload))


def icmp_echo(ident: int, seq: int, payload: bytes, reply: bool = False) -> bytes:
    body = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes, *, partial: bool = False) -> bytes:
    """A UDP datagram; `partial`: the checksum field holds only the pseudo-header sum, for the
    device to complete (VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_offset 6)."""
    length = UDP_HLEN + len(payload)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + payload
    pseudo = pseudo_header_sum(src, dst, IPPROTO_UDP, length)
    csum = pseudo if partial else (checksum(seg, pseudo) or 0xFFFF)
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes,
        *, window: int = 65535, partial: bool = False, options: bytes = b"") -> bytes:
    """A TCP segment (`options` padded to 32 bits); `partial` as for `udp` (csum_offset 16)."""
    options += b"\0" * (-len(options) % 4)
    offset = ((TCP_HLEN + len(options)) // 4) << 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset, flags, window, 0, 0) + options + payload
    pseudo = pseudo_header_sum(src, dst, IPPROTO_TCP, len(seg))
    csum = pseudo if partial else checksum(seg, pseudo)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


TCP_SYN, TCP_ACK, TCP_PSH = 0x02, 0x10, 0x08


def tcp_mss_option(mss: int) -> bytes:
    return struct.pack("!BBH", 2, 4, mss)


@dataclass(frozen=True)
class Ip:
    src: str
    dst: str
    proto: int
    header: bytes
    payload: bytes

    def l4_checksum_ok(self) -> bool:
        """The TCP/UDP checksum over the pseudo header verifies (sum of all = 0xffff)."""
        pseudo = pseudo_header_sum(self.src, self.dst, self.proto, len(self.payload))
        return ones_sum(self.payload, pseudo) == 0xFFFF


def parse_ipv4(frame: bytes) -> Ip | None:
    if len(frame) < ETH_HLEN + IP_HLEN or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ihl = (frame[ETH_HLEN] & 0xF) * 4
    total = struct.unpack_from("!H", frame, ETH_HLEN + 2)[0]
    header = frame[ETH_HLEN:ETH_HLEN + ihl]
    payload = frame[ETH_HLEN + ihl:ETH_HLEN + total]
    return Ip(str(ipaddress.IPv4Address(header[12:16])), str(ipaddress.IPv4Address(header[16:20])),
              header[9], header, payload)


def parse_ipv6(frame: bytes) -> Ip | None:
    """An IPv6 packet without extension headers (`proto` is its next header)."""
    if len(frame) < ETH_HLEN + IP6_HLEN or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IPV6:
        return None
    header = frame[ETH_HLEN:ETH_HLEN + IP6_HLEN]
    length = struct.unpack_from("!H", header, 4)[0]
    return Ip(str(ipaddress.IPv6Address(header[8:24])), str(ipaddress.IPv6Address(header[24:40])),
              header[6], header, frame[ETH_HLEN + IP6_HLEN:ETH_HLEN + IP6_HLEN + length])


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """What a driver does with VIRTIO_NET_HDR_F_NEEDS_CSUM on receive (§5.1.6.4): fold the sum
    from csum_start to the end (the field holding the pseudo-header sum) and store it."""
    value = checksum(frame[csum_start:])
    at = csum_start + csum_offset
    return frame[:at] + struct.pack("!H", value) + frame[at + 2:]
