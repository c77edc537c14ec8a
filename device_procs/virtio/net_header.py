"""virtio-net feature bits, the packet header and the checks on it (VIRTIO 1.2 §5.1), pure logic.

The 12-byte `virtio_net_hdr_v1` (§5.1.6) travels unchanged between the driver and a tap opened
with IFF_VNET_HDR and TUNSETVNETHDRSZ 12, so the device never rewrites a header on its way.  What
it does is *check* it: a header the driver may not send given the negotiated features would make
the host kernel segment or checksum on the guest's say-so, so such a frame is dropped and counted
(`check_tx`); one the tap hands over that the driver did not ask for is dropped too (`check_rx`).
Each check returns a reason (the suffix of a `tx_dropped_*`/`rx_dropped_*` counter) or None.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Feature bits (§5.1.3).
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_GUEST_UFO = 1 << 10
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_HOST_UFO = 1 << 14
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_F_CTRL_VQ = 1 << 17
VIRTIO_NET_F_CTRL_RX = 1 << 18

GUEST_GSO = VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_UFO

# §5.1.3.1 "Feature bit requirements": feature -> features of which at least one must be there.
FEATURE_REQUIRES: dict[int, int] = {
    VIRTIO_NET_F_GUEST_TSO4: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO6: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN: VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO6: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN: VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_RX: VIRTIO_NET_F_CTRL_VQ,
}
FEATURE_NAMES = {
    VIRTIO_NET_F_CSUM: "CSUM", VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4", VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6",
    VIRTIO_NET_F_GUEST_ECN: "GUEST_ECN", VIRTIO_NET_F_GUEST_UFO: "GUEST_UFO",
    VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4", VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6",
    VIRTIO_NET_F_HOST_ECN: "HOST_ECN", VIRTIO_NET_F_HOST_UFO: "HOST_UFO",
    VIRTIO_NET_F_CTRL_VQ: "CTRL_VQ", VIRTIO_NET_F_CTRL_RX: "CTRL_RX",
}

# Header flags and GSO types (§5.1.6).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

# Which negotiated feature lets the driver send (HOST_*) / the device deliver (GUEST_*) a GSO type.
TX_GSO_FEATURE = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
                  VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
                  VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_HOST_UFO}
RX_GSO_FEATURE = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_GUEST_TSO4,
                  VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_GUEST_TSO6,
                  VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_GUEST_UFO}

# struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
# num_buffers.  With VERSION_1 it is always 12 bytes, MRG_RXBUF or not (§5.1.6).
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size
NUM_BUFFERS_OFFSET = 10

ETH_HLEN = 14
VLAN_HLEN = 4
ETH_MIN_MTU = 68        # §5.1.4.1: mtu between 68 and 65535
ETH_MAX_MTU = 65535
TCP_CSUM_OFFSET = 16    # offsetof(struct tcphdr, check)
TCP_HLEN_MIN = 20
# §5.1.6.3: a GSO packet is at most 65550 bytes (64 KiB of IP plus the Ethernet header); we
# also allow one VLAN tag, which Linux counts in its own GSO limit.
MAX_GSO_FRAME = 65550 + VLAN_HLEN

# Tap offloads (TUNSETOFFLOAD, <linux/if_tun.h>): what the tap may hand us = what the driver
# can receive.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10


@dataclass(frozen=True)
class NetHeader:
    """A decoded `virtio_net_hdr_v1` (§5.1.6); little-endian, as VERSION_1 requires."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> "NetHeader":
        return cls(*HEADER.unpack(data))

    def pack(self) -> bytes:
        return HEADER.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                           self.csum_start, self.csum_offset, self.num_buffers)

    @property
    def gso_base(self) -> int:
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN


def feature_error(features: int) -> str | None:
    """Why `features` breaks a §5.1.3.1 dependency, or None."""
    for feature, needs in FEATURE_REQUIRES.items():
        if features & feature and not features & needs:
            wanted = " or ".join(name for bit, name in FEATURE_NAMES.items() if needs & bit)
            return f"VIRTIO_NET_F_{FEATURE_NAMES[feature]} requires VIRTIO_NET_F_{wanted} (§5.1.3.1)"
    return None


def effective_features(features: int) -> int:
    """`features` without every feature whose §5.1.3.1 requirement is missing (transitively:
    HOST_ECN goes with HOST_TSO4 when CSUM is missing)."""
    while (problem := next((f for f, needs in FEATURE_REQUIRES.items()
                            if features & f and not features & needs), None)) is not None:
        features &= ~problem
    return features


def tap_offloads(features: int) -> int:
    """The TUNSETOFFLOAD flags matching what the driver negotiated to *receive* (GUEST_*).

    The tap then hands us partially checksummed (TUN_F_CSUM) or unsegmented (TSO/UFO) frames
    only when the driver can take them; with 0 the kernel checksums and segments everything.
    """
    if not features & VIRTIO_NET_F_GUEST_CSUM:
        return 0  # the kernel ignores TSO without CSUM, and so does the spec (§5.1.3.1)
    flags = TUN_F_CSUM
    if features & VIRTIO_NET_F_GUEST_TSO4:
        flags |= TUN_F_TSO4
    if features & VIRTIO_NET_F_GUEST_TSO6:
        flags |= TUN_F_TSO6
    if features & VIRTIO_NET_F_GUEST_ECN and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    if features & VIRTIO_NET_F_GUEST_UFO:
        flags |= TUN_F_UFO
    return flags


def max_plain_frame(mtu: int) -> int:
    """The largest non-GSO frame: MTU plus the Ethernet header and one VLAN tag (§5.1.4.1)."""
    return mtu + ETH_HLEN + VLAN_HLEN


def _check_csum(h: NetHeader, frame_len: int) -> str | None:
    # §5.1.6.2.1: the checksum goes at csum_start + csum_offset, inside the packet.
    if h.csum_start + h.csum_offset + 2 > frame_len:
        return "csum"
    return None


def check_tx(h: NetHeader, frame_len: int, features: int, mtu: int) -> str | None:
    """Why a frame of `frame_len` bytes (after the header) with header `h` must not be sent."""
    if frame_len < ETH_HLEN:
        return "runt"
    # §5.1.6.2.1: "The driver MUST NOT set the VIRTIO_NET_HDR_F_DATA_VALID and
    # VIRTIO_NET_HDR_F_RSC_INFO bits"; passed on, DATA_VALID would make the host trust a checksum
    # nobody computed.  Other unknown bits are ignored, as §5.1.6.2.2 requires.
    if h.flags & (VIRTIO_NET_HDR_F_DATA_VALID | VIRTIO_NET_HDR_F_RSC_INFO):
        return "flags"
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        # §5.1.6.2.1: without VIRTIO_NET_F_CSUM the driver MUST set flags to zero.
        if not features & VIRTIO_NET_F_CSUM:
            return "csum"
        err = _check_csum(h, frame_len)
        if err:
            return err
    if h.hdr_len > frame_len:
        # §5.1.6.2.2: hdr_len is only a hint, but one beyond the frame is no header length.
        return "hdr_len"
    base = h.gso_base
    if h.gso_type == VIRTIO_NET_HDR_GSO_NONE:
        # §5.1.4.2: with gso_type NONE no more than mtu plus the link-level header.
        return "oversize" if frame_len > max_plain_frame(mtu) else None
    # §5.1.6.2.1: TCPV4/TCPV6/UDP only with HOST_TSO4/TSO6/UFO negotiated; UDP_L4 needs
    # HOST_USO, never offered; ECN alone (base NONE) or unknown bits are no GSO type.
    needed = TX_GSO_FEATURE.get(base)
    if needed is None or not features & needed:
        return "gso_type"
    if h.gso_type & VIRTIO_NET_HDR_GSO_ECN and not features & VIRTIO_NET_F_HOST_ECN:
        return "gso_type"
    # §5.1.6.2.1: "If gso_type differs from VIRTIO_NET_HDR_GSO_NONE, then the driver MUST also
    # set the VIRTIO_NET_HDR_F_NEEDS_CSUM bit in flags and MUST set gso_size".
    if not h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return "csum"
    if base in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) and (
            h.csum_offset != TCP_CSUM_OFFSET or h.csum_start + TCP_HLEN_MIN > frame_len):
        return "csum"  # TSO needs the TCP checksum and a whole TCP header
    # A segment (MSS) larger than the MTU would leave the host as oversized frames.
    if h.gso_size == 0 or h.gso_size > mtu:
        return "gso_size"
    if frame_len > MAX_GSO_FRAME:
        return "oversize"
    return None


def check_rx(h: NetHeader, frame_len: int, features: int, mtu: int) -> str | None:
    """Why a frame from the tap must not reach the driver (the tap should never send these)."""
    if frame_len < ETH_HLEN:
        return "runt"
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not features & VIRTIO_NET_F_GUEST_CSUM:
        return "csum"  # §5.1.6.4.1: without GUEST_CSUM, flags MUST be zero
    if h.gso_type == VIRTIO_NET_HDR_GSO_NONE:
        # §5.1.4.1: "The device MUST NOT pass received packets that exceed mtu (plus low level
        # ethernet header length) size with gso_type NONE".
        return "oversize" if frame_len > max_plain_frame(mtu) else None
    # §5.1.6.4.1: no GSO type the driver did not negotiate to receive.
    needed = RX_GSO_FEATURE.get(h.gso_base)
    if needed is None or not features & needed:
        return "gso_type"
    if h.gso_type & VIRTIO_NET_HDR_GSO_ECN and not features & VIRTIO_NET_F_GUEST_ECN:
        return "gso_type"
    return "oversize" if frame_len > MAX_GSO_FRAME else None
