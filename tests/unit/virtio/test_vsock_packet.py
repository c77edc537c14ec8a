"""The virtio-vsock packet codec (VIRTIO 1.2 §5.10.6): the 44-byte header and the tx checks."""

from __future__ import annotations

import struct

import pytest

from device_procs.virtio import vsock_packet as vp
from device_procs.virtio.vsock_packet import VsockHeader, VsockPacketError

CID = 3


def hdr(**fields: int) -> VsockHeader:
    base = dict(src_cid=CID, dst_cid=vp.VMADDR_CID_HOST, src_port=1024, dst_port=80, len=0,
                type=vp.VIRTIO_VSOCK_TYPE_STREAM, op=vp.VIRTIO_VSOCK_OP_RW)
    base.update(fields)
    return VsockHeader(**base)


def test_header_layout_is_the_packed_little_endian_struct():
    h = VsockHeader(src_cid=0x0102030405060708, dst_cid=2, src_port=0xAABBCCDD, dst_port=7,
                    len=100, type=1, op=5, flags=3, buf_alloc=262144, fwd_cnt=0xFFFFFFFF)
    raw = h.pack()
    assert len(raw) == vp.HEADER_SIZE == 44
    # Hand-computed offsets of struct virtio_vsock_hdr.
    assert raw[0:8] == bytes.fromhex("0807060504030201")
    assert struct.unpack_from("<Q", raw, 8)[0] == 2
    assert struct.unpack_from("<I", raw, 16)[0] == 0xAABBCCDD
    assert struct.unpack_from("<I", raw, 20)[0] == 7
    assert struct.unpack_from("<I", raw, 24)[0] == 100
    assert struct.unpack_from("<HH", raw, 28) == (1, 5)
    assert struct.unpack_from("<III", raw, 32) == (3, 262144, 0xFFFFFFFF)


def test_parse_round_trips_and_ignores_the_payload():
    h = hdr(len=5, flags=2, buf_alloc=4096, fwd_cnt=17)
    assert VsockHeader.parse(h.pack()) == h
    assert VsockHeader.parse(h.pack() + b"hello") == h
    assert VsockHeader.parse(memoryview(bytearray(h.pack()))) == h


def test_parse_refuses_a_short_header():
    with pytest.raises(VsockPacketError, match="shorter"):
        VsockHeader.parse(bytes(43))


@pytest.mark.parametrize("field,value", [("src_port", 1 << 32), ("op", 1 << 16), ("len", -1),
                                         ("dst_cid", 1 << 64), ("flags", "1")])
def test_fields_are_range_checked(field, value):
    with pytest.raises(VsockPacketError, match=field):
        hdr(**{field: value})


def test_constants():
    assert (vp.VIRTIO_VSOCK_OP_REQUEST, vp.VIRTIO_VSOCK_OP_RESPONSE, vp.VIRTIO_VSOCK_OP_RST,
            vp.VIRTIO_VSOCK_OP_SHUTDOWN, vp.VIRTIO_VSOCK_OP_RW, vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE,
            vp.VIRTIO_VSOCK_OP_CREDIT_REQUEST) == (1, 2, 3, 4, 5, 6, 7)
    assert (vp.VIRTIO_VSOCK_SHUTDOWN_RCV, vp.VIRTIO_VSOCK_SHUTDOWN_SEND) == (1, 2)
    assert vp.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET == 0
    assert vp.pack_event(0) == bytes(4)
    assert hdr(op=99).op_name == "op 99" and hdr().op_name == "RW"


def test_a_good_packet_passes():
    assert vp.tx_drop_reason(hdr(len=10), 10, CID) is None
    assert vp.tx_drop_reason(hdr(len=vp.MAX_PAYLOAD), vp.MAX_PAYLOAD, CID) is None


@pytest.mark.parametrize("fields,payload_len,reason", [
    ({"len": 10}, 9, "bad_len"),
    ({"len": 10}, 11, "bad_len"),                    # trailing bytes are not ignored either
    ({"len": vp.MAX_PAYLOAD + 1}, vp.MAX_PAYLOAD + 1, "bad_len"),
    ({"src_cid": CID + 1}, 0, "bad_cid"),
    ({"src_cid": CID | 1 << 32}, 0, "bad_cid"),       # the reserved upper half is not ignored
    ({"dst_cid": 3}, 0, "bad_cid"),                   # only the host is reachable
    ({"dst_cid": 2 | 1 << 40}, 0, "bad_cid"),
    ({"type": vp.VIRTIO_VSOCK_TYPE_SEQPACKET}, 0, "bad_type"),
    ({"type": 0}, 0, "bad_type"),
    ({"op": vp.VIRTIO_VSOCK_OP_INVALID}, 0, "bad_op"),
    ({"op": 8}, 0, "bad_op"),
])
def test_bad_packets_have_a_reason(fields, payload_len, reason):
    assert vp.tx_drop_reason(hdr(**fields), payload_len, CID) == reason


def test_rst_reply_swaps_the_addresses():
    rst = vp.rst_reply(hdr(src_port=1111, dst_port=22, len=4, op=vp.VIRTIO_VSOCK_OP_REQUEST))
    assert (rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port) == (2, 22, CID, 1111)
    assert (rst.op, rst.len, rst.type) == (vp.VIRTIO_VSOCK_OP_RST, 0, vp.VIRTIO_VSOCK_TYPE_STREAM)
