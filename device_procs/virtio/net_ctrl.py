"""The virtio-net control queue (VIRTIO 1.2 §5.1.6.5), minimal: receive mode and MAC filter.

Parse, then execute: `ControlCommand.parse(chain)` reads `struct virtio_net_ctrl` (class,
command, data in device-readable memory; the ack is the last device-writable byte), and
`RxFilter.execute(cmd, features)` applies it and returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
Supported, with VIRTIO_NET_F_CTRL_RX: VIRTIO_NET_CTRL_RX_PROMISC / ALLMULTI and
VIRTIO_NET_CTRL_MAC_TABLE_SET.  Everything else (RX_EXTRA modes, MAC_ADDR_SET, VLAN, announce,
MQ, guest offloads) is answered VIRTIO_NET_ERR: those features are not offered.

`RxFilter.accepts(frame)` is then the receive filter (§5.1.6.5.2: best effort).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .queue import DescriptorChain, slice_views

VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1

VIRTIO_NET_F_CTRL_RX = 1 << 18
# More addresses than this in one table and the filter stops filtering that kind (unicast or
# multicast) rather than grow without bound: the §5.1.6.5.2 footnote allows "silently switch to
# allmulti or promiscuous mode if it is given too many addresses".
MAC_TABLE_ENTRIES = 64
# The largest command we read: two tables of a few hundred addresses is all Linux ever sends.
MAX_COMMAND_BYTES = 8 + 2 * 6 * 1024
BROADCAST = b"\xff" * 6


@dataclass(frozen=True)
class ControlCommand:
    """One parsed control request; `ack` is None when the chain has no writable byte for it."""

    cls: int
    command: int
    data: bytes
    ack: memoryview | None

    @classmethod
    def parse(cls, chain: DescriptorChain) -> "ControlCommand":
        writable = chain.writable_len
        ack = slice_views(chain.writable_views, writable - 1, 1) if writable else []
        raw = b"".join(bytes(v) for v in slice_views(chain.readable_views, 0, MAX_COMMAND_BYTES + 1))
        if len(raw) < 2 or len(raw) > MAX_COMMAND_BYTES:
            # No class/command, or more than any command: ERR (class 0xff never matches).
            return cls(0xFF, 0xFF, b"", ack[0] if ack else None)
        return cls(raw[0], raw[1], raw[2:], ack[0] if ack else None)


def _parse_mac_tables(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """struct virtio_net_ctrl_mac twice (unicast, then multicast), exactly filling `data`."""
    tables = []
    pos = 0
    for _ in range(2):
        if pos + 4 > len(data):
            return None
        (entries,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if entries > (len(data) - pos) // 6:
            return None
        tables.append([data[pos + 6 * i:pos + 6 * i + 6] for i in range(entries)])
        pos += 6 * entries
    return (tables[0], tables[1]) if pos == len(data) else None


@dataclass
class RxFilter:
    """Receive mode and MAC filter.  Until a driver with CTRL_RX sets them, everything passes
    (promiscuous, as QEMU starts): a driver that never filters must not lose frames."""

    mac: bytes
    promisc: bool = True
    allmulti: bool = False
    unicast: set[bytes] = field(default_factory=set)
    multicast: set[bytes] = field(default_factory=set)
    all_unicast: bool = False   # the unicast table overflowed
    all_multicast: bool = False  # the multicast table overflowed
    generation: int = field(default=0, compare=False)  # bumped on changes (the C path caches)

    def reset(self) -> None:
        """§5.1.6.5.2: "The device MUST have an empty MAC filtering table on reset"."""
        self.generation += 1
        self.promisc, self.allmulti = True, False
        self.unicast, self.multicast = set(), set()
        self.all_unicast = self.all_multicast = False

    def execute(self, cmd: ControlCommand, features: int) -> int:
        self.generation += 1
        if not features & VIRTIO_NET_F_CTRL_RX:
            return VIRTIO_NET_ERR  # §5.1.6.5.1/2: RX and MAC classes only with CTRL_RX
        if cmd.cls == VIRTIO_NET_CTRL_RX and cmd.command in (VIRTIO_NET_CTRL_RX_PROMISC,
                                                             VIRTIO_NET_CTRL_RX_ALLMULTI):
            # The data is one byte, 0 (off) or 1 (on).
            if len(cmd.data) != 1 or cmd.data[0] > 1:
                return VIRTIO_NET_ERR
            if cmd.command == VIRTIO_NET_CTRL_RX_PROMISC:
                self.promisc = bool(cmd.data[0])
            else:
                self.allmulti = bool(cmd.data[0])
            return VIRTIO_NET_OK
        if cmd.cls == VIRTIO_NET_CTRL_MAC and cmd.command == VIRTIO_NET_CTRL_MAC_TABLE_SET:
            tables = _parse_mac_tables(cmd.data)
            if tables is None:
                return VIRTIO_NET_ERR
            uni, multi = tables
            # §5.1.6.5.2: the first table holds non-multicast addresses, the second multicast.
            if any(m[0] & 1 for m in uni) or any(not m[0] & 1 for m in multi):
                return VIRTIO_NET_ERR
            # "MUST update the MAC filtering table before it consumes the command": it is
            # updated here, before the chain goes back on the used ring.
            self.all_unicast = len(uni) > MAC_TABLE_ENTRIES
            self.all_multicast = len(multi) > MAC_TABLE_ENTRIES
            self.unicast = set() if self.all_unicast else set(uni)
            self.multicast = set() if self.all_multicast else set(multi)
            return VIRTIO_NET_OK
        return VIRTIO_NET_ERR

    def accepts(self, dst: bytes) -> bool:
        """Whether a frame for destination MAC `dst` reaches the driver."""
        if self.promisc or dst == BROADCAST:
            return True
        if dst[0] & 1:
            return self.allmulti or self.all_multicast or dst in self.multicast
        return dst == self.mac or self.all_unicast or dst in self.unicast
