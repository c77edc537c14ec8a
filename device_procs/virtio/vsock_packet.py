"""virtio-vsock packets (VIRTIO 1.2 §5.10.6), pure codec: the header, its constants and checks.

Every packet on the rx and tx queues is a 44-byte little-endian `struct virtio_vsock_hdr`
followed by `len` payload bytes (§5.10.6.4), framed any way the driver likes (§2.6.4).  The event
queue carries `struct virtio_vsock_event { le32 id; }` (§5.10.6, "Device Events").

`tx_drop_reason` is the check on a packet the driver transmitted: the reason (the suffix of a
`dropped_*` counter) it must be dropped, or None.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import VirtioError

# struct virtio_vsock_hdr (§5.10.6): src_cid, dst_cid, src_port, dst_port, len, type, op, flags,
# buf_alloc, fwd_cnt; packed.
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 44
EVENT = struct.Struct("<I")

# CIDs (§5.10.4): 0, 1 and 2 (the host) are reserved, as are 0xffffffff and ~0; the upper 32
# bits of a CID are reserved and zeroed.
VMADDR_CID_HOST = 2
RESERVED_CIDS = frozenset({0, 1, VMADDR_CID_HOST, 0xFFFFFFFF})
MAX_CID = 0xFFFFFFFF

# §5.10.6.2 (Addressing): socket types.  Only streams are offered (no SEQPACKET feature).
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

# §5.10.6: op.
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
KNOWN_OPS = frozenset(range(VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_CREDIT_REQUEST + 1))
OP_NAMES = {VIRTIO_VSOCK_OP_INVALID: "INVALID", VIRTIO_VSOCK_OP_REQUEST: "REQUEST",
            VIRTIO_VSOCK_OP_RESPONSE: "RESPONSE", VIRTIO_VSOCK_OP_RST: "RST",
            VIRTIO_VSOCK_OP_SHUTDOWN: "SHUTDOWN", VIRTIO_VSOCK_OP_RW: "RW",
            VIRTIO_VSOCK_OP_CREDIT_UPDATE: "CREDIT_UPDATE",
            VIRTIO_VSOCK_OP_CREDIT_REQUEST: "CREDIT_REQUEST"}

# §5.10.6.5 (Stream Sockets): SHUTDOWN flags, bit 0 "will not receive", bit 1 "will not send".
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND

# §5.10.6 (Device Events).
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

# The largest payload of one packet: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE.  Drivers never send
# more in one packet, and it bounds what one transmit may make the device copy.
MAX_PAYLOAD = 64 * 1024

_LIMITS = {"src_cid": 64, "dst_cid": 64, "src_port": 32, "dst_port": 32, "len": 32, "type": 16,
           "op": 16, "flags": 32, "buf_alloc": 32, "fwd_cnt": 32}


class VsockPacketError(VirtioError, ValueError):
    """Bytes too short for a virtio_vsock_hdr (44 bytes), or a field out of its range."""


@dataclass(frozen=True)
class VsockHeader:
    """One `virtio_vsock_hdr`; every field is range-checked at construction."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def __post_init__(self) -> None:
        for name, bits in _LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 1 << bits:
                raise VsockPacketError(f"vsock header field {name}={value!r} is not a u{bits}")

    def pack(self) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                           self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> "VsockHeader":
        """The header at the start of `data` (later bytes are the payload, not looked at)."""
        if len(data) < HEADER_SIZE:
            raise VsockPacketError(f"vsock packet of {len(data)} bytes is shorter than its "
                                   f"{HEADER_SIZE}-byte header")
        return cls(*HEADER.unpack_from(data, 0))

    @property
    def op_name(self) -> str:
        return OP_NAMES.get(self.op, f"op {self.op}")


def tx_drop_reason(hdr: VsockHeader, payload_len: int, guest_cid: int) -> str | None:
    """Why a transmitted packet with `payload_len` bytes after its header must be dropped.

    "bad_len":  `len` is not what follows the header, or above MAX_PAYLOAD (§5.10.6: `len` is
                the payload size; nothing else frames a packet, so the rest cannot be trusted);
    "bad_cid":  not from `guest_cid` to the host (§5.10.6.4.1: the driver MUST use guest_cid as
                the source; the device only reaches the host, CID 2);
    "bad_type": not a stream (§5.10.6.4: the device answers an unknown type with RST);
    "bad_op":   an op this version does not define (INVALID included).
    """
    if hdr.len != payload_len or hdr.len > MAX_PAYLOAD:
        return "bad_len"
    if hdr.src_cid != guest_cid or hdr.dst_cid != VMADDR_CID_HOST:
        return "bad_cid"
    if hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
        return "bad_type"
    if hdr.op not in KNOWN_OPS:
        return "bad_op"
    return None


def rst_reply(to: VsockHeader) -> VsockHeader:
    """An RST answering packet `to` from the guest: same flow, directions swapped (§5.10.6.5)."""
    return VsockHeader(src_cid=to.dst_cid, dst_cid=to.src_cid, src_port=to.dst_port,
                       dst_port=to.src_port, len=0, type=to.type, op=VIRTIO_VSOCK_OP_RST)


def pack_event(event_id: int) -> bytes:
    return EVENT.pack(event_id)
