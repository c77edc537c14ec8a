"""The vhost-user codec (ipc_protocol/vhost_user.py): pure, bytes in and out, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import LocalProtocolError, RemoteProtocolError

R = vu.Request


def wire(request: int, payload: bytes, flags: int = vu.VHOST_USER_VERSION) -> tuple[vu.Header, bytes]:
    header = vu.parse_header(vu.HEADER.pack(request, flags, len(payload)))
    return header, payload


def roundtrip(msg: vu.Message, incoming: str = "requests") -> vu.Message:
    data, fds = vu.encode(msg)
    header = vu.parse_header(data[:vu.HEADER_SIZE])
    decode = vu.decode_request if incoming == "requests" else vu.decode_reply
    return decode(header, data[vu.HEADER_SIZE:], fds, msg.channel)


REGION = vu.MemoryRegion(0x0, 1 << 20, 0x7F00_0000_0000, 0)
REGION2 = vu.MemoryRegion(1 << 20, 1 << 20, 0x7F00_0010_0000, 1 << 20)

REQUESTS = [
    vu.request(R.GET_FEATURES),
    vu.request(R.SET_FEATURES, vu.U64Value((1 << 32) | (1 << 30))),
    vu.request(R.SET_OWNER, need_reply=True),
    vu.request(R.SET_MEM_TABLE, vu.MemoryTable((REGION, REGION2)), fds=[7, 8]),
    vu.request(R.SET_VRING_NUM, vu.VringState(1, 256)),
    vu.request(R.SET_VRING_ADDR, vu.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0xFFFF_FFFF_FFFF_FFFF)),
    vu.request(R.SET_VRING_KICK, vu.VringFd(3, False), fds=[9]),
    vu.request(R.SET_VRING_CALL, vu.VringFd(0, True)),
    vu.request(R.SET_VRING_ERR, vu.VringFd(255, False), fds=[4]),
    vu.request(R.GET_VRING_BASE, vu.VringState(0, 0)),
    vu.request(R.GET_CONFIG, vu.Config(0, 24, 0, bytes(24))),
    vu.request(R.SET_CONFIG, vu.Config(8, 4, 0, b"\x41\0\0\0")),
    vu.request(R.GET_INFLIGHT_FD, vu.Inflight(0, 0, 1, 256)),
    vu.request(R.SET_INFLIGHT_FD, vu.Inflight(4160, 0, 1, 256), fds=[5]),
    vu.request(R.SET_SLAVE_REQ_FD, fds=[6]),
    vu.request(R.SET_LOG_BASE, vu.Log(4096, 0), fds=[6]),
    vu.request(vu.BackendRequest.CONFIG_CHANGE_MSG, need_reply=True, channel=vu.Channel.BACKEND),
    vu.request(vu.BackendRequest.VRING_CALL, vu.VringState(1, 0), channel=vu.Channel.BACKEND),
]


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: m.name)
def test_every_modelled_request_round_trips(msg: vu.Message) -> None:
    assert roundtrip(msg) == msg


def test_replies_round_trip_with_their_own_types_and_fds() -> None:
    get_base = vu.request(R.GET_VRING_BASE, vu.VringState(0, 0))
    assert roundtrip(vu.reply_to(get_base, vu.VringState(0, 17)), "replies").payload == vu.VringState(0, 17)
    cfg = vu.request(R.GET_CONFIG, vu.Config(0, 8, 0, bytes(8)))
    assert roundtrip(vu.reply_to(cfg, vu.Config(0, 8, 0, b"12345678")), "replies").payload.data == b"12345678"
    failed = roundtrip(vu.reply_to(cfg, vu.Empty()), "replies")
    assert isinstance(failed.payload, vu.Empty)  # "zero length of payload to indicate an error"
    inflight = vu.request(R.GET_INFLIGHT_FD, vu.Inflight(0, 0, 1, 128))
    got = roundtrip(vu.reply_to(inflight, vu.Inflight(2112, 0, 1, 128), fds=[11]), "replies")
    assert got.fds == (11,) and got.payload.mmap_size == 2112
    none = roundtrip(vu.reply_to(inflight, vu.Inflight(0, 0, 0, 0)), "replies")
    assert none.fds == () and none.payload.mmap_size == 0  # a refusal carries no fd
    ack = roundtrip(vu.ack(vu.request(R.SET_OWNER, need_reply=True), ok=False), "replies")
    assert ack.payload == vu.U64Value(1) and ack.is_reply and not ack.need_reply


def test_header_checks() -> None:
    with pytest.raises(RemoteProtocolError, match="version"):
        vu.parse_header(vu.HEADER.pack(1, 2, 0))
    with pytest.raises(RemoteProtocolError, match="undefined bits"):
        vu.parse_header(vu.HEADER.pack(1, 1 | 1 << 4, 0))
    with pytest.raises(RemoteProtocolError, match="cannot itself ask"):
        vu.parse_header(vu.HEADER.pack(1, 1 | vu.FLAG_REPLY | vu.FLAG_NEED_REPLY, 0))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        vu.parse_header(vu.HEADER.pack(1, 1, vu.MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(LocalProtocolError):
        vu.parse_header(b"\0" * 11)
    assert vu.parse_header(vu.HEADER.pack(24, 1 | vu.FLAG_NEED_REPLY, 268)).need_reply


@pytest.mark.parametrize("request_, size", [
    (R.SET_FEATURES, 4), (R.SET_FEATURES, 16), (R.GET_FEATURES, 8), (R.SET_VRING_NUM, 12),
    (R.SET_VRING_ADDR, 32), (R.SET_VRING_ADDR, 48), (R.SET_VRING_KICK, 4),
    (R.SET_MEM_TABLE, 4), (R.SET_MEM_TABLE, 8 + 31), (R.GET_CONFIG, 11),
    (R.SET_INFLIGHT_FD, 16), (R.SET_INFLIGHT_FD, 32), (R.SET_OWNER, 1),
])
def test_payload_sizes_must_match_the_request(request_: int, size: int) -> None:
    with pytest.raises(RemoteProtocolError):
        vu.decode_request(*wire(request_, bytes(size)), fds=[])


@pytest.mark.parametrize("msg, fds", [
    (REQUESTS[3], [7]),             # SET_MEM_TABLE: one fd per region
    (REQUESTS[3], [7, 8, 9]),
    (REQUESTS[6], []),              # SET_VRING_KICK without NOFD: one fd
    (REQUESTS[7], [3]),             # SET_VRING_CALL with NOFD: none
    (REQUESTS[0], [3]),             # GET_FEATURES: none
    (REQUESTS[13], []),             # SET_INFLIGHT_FD: one
    (REQUESTS[14], [1, 2]),         # SET_SLAVE_REQ_FD: one
])
def test_fd_counts_are_exact(msg: vu.Message, fds: list[int]) -> None:
    data, _ = vu.encode(msg)
    with pytest.raises(RemoteProtocolError, match="fds"):
        vu.decode_request(vu.parse_header(data[:12]), data[12:], fds, msg.channel)
    with pytest.raises(LocalProtocolError, match="fds"):
        vu.request(msg.request, msg.payload, fds=fds, channel=msg.channel)


def test_unmodelled_and_unknown_requests_decode_raw_and_carry_no_fd() -> None:
    for code in (R.IOTLB_MSG, R.ADD_MEM_REG, R.POSTCOPY_ADVISE, 99, 0xFFFF_FFFF):
        msg = vu.decode_request(*wire(code, b"\1\2\3"), fds=[])
        assert isinstance(msg.payload, vu.Raw) and msg.payload.data == b"\1\2\3"
        assert not vu.has_own_reply(code)
        with pytest.raises(RemoteProtocolError, match="0 fds"):
            vu.decode_request(*wire(code, b""), fds=[5])
    assert "request 99" in repr(vu.decode_request(*wire(99, b""), fds=[]))


def test_memory_table_rules() -> None:
    # UML sends its two-slot array with a count of 1: unused trailing slots are ignored.
    uml = struct.pack("=II", 1, 0) + REGION.encode() + bytes(32)
    table = vu.decode_request(*wire(R.SET_MEM_TABLE, uml), fds=[3]).payload
    assert table.regions == (REGION,)
    too_many_announced = struct.pack("=II", 2, 0) + REGION.encode()
    with pytest.raises(RemoteProtocolError, match="announces 2"):
        vu.decode_request(*wire(R.SET_MEM_TABLE, too_many_announced), fds=[3, 4])
    nine = struct.pack("=II", 9, 0) + REGION.encode() * 9
    with pytest.raises(RemoteProtocolError, match="more than 8"):
        vu.decode_request(*wire(R.SET_MEM_TABLE, nine[:vu.MAX_PAYLOAD_BYTES]), fds=list(range(9)))
    for gpa, size, user in ((0, 0, 0),                            # empty
                            (0, 1 << 20, (1 << 64) - 4096),       # wraps in user space
                            ((1 << 64) - 4096, 8192, 0)):         # wraps in guest space
        with pytest.raises(LocalProtocolError):
            vu.MemoryRegion(gpa, size, user, 0)
    wrapping = struct.pack("=II", 1, 0) + struct.pack("=QQQQ", (1 << 64) - 4096, 8192, 0, 0)
    with pytest.raises(RemoteProtocolError, match="wraps"):
        vu.decode_request(*wire(R.SET_MEM_TABLE, wrapping), fds=[3])
    overlap_guest = vu.MemoryRegion(0x80000, 1 << 20, 0x9000_0000, 0)
    overlap_user = vu.MemoryRegion(0x4000_0000, 1 << 20, REGION.user_addr + 4096, 0)
    for other, space in ((overlap_guest, "guest"), (overlap_user, "user")):
        raw = struct.pack("=II", 2, 0) + REGION.encode() + other.encode()
        with pytest.raises(RemoteProtocolError, match=f"overlap in {space}"):
            vu.decode_request(*wire(R.SET_MEM_TABLE, raw), fds=[3, 4])


def test_translate_user_needs_the_whole_range_inside_the_region() -> None:
    assert REGION.translate_user(REGION.user_addr + 0x100, 16) == 0x100
    assert REGION.translate_user(REGION.user_addr + (1 << 20) - 8, 16) is None
    assert REGION.translate_user(REGION.user_addr - 1, 2) is None


def test_config_and_inflight_payloads() -> None:
    with pytest.raises(RemoteProtocolError, match="size field"):
        vu.decode_request(*wire(R.GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(4)), fds=[])
    with pytest.raises(RemoteProtocolError):  # a 257-byte config space does not exist
        vu.decode_request(*wire(R.GET_CONFIG, struct.pack("=III", 0, 257, 0) + bytes(257)), fds=[])
    with pytest.raises(LocalProtocolError, match="wraps"):
        vu.Config(0xFFFF_FFFF, 2, 0, b"ab")
    packed = struct.pack("=QQHH", 4160, 0, 1, 256)
    assert vu.decode_request(*wire(R.GET_INFLIGHT_FD, packed), fds=[]).payload.queue_size == 256
    padded = vu.Inflight(4160, 0, 1, 256).encode()
    assert len(padded) == 24  # QEMU drops the connection on a 20-byte reply
    assert vu.decode_request(*wire(R.GET_INFLIGHT_FD, padded), fds=[]).payload == vu.Inflight(4160, 0, 1, 256)


def test_vring_fd_u64_allows_only_index_and_nofd() -> None:
    for value in (1 << 9, 1 << 32, 0x1FF | 1 << 63):
        with pytest.raises(RemoteProtocolError, match="bits other"):
            vu.decode_request(*wire(R.SET_VRING_KICK, struct.pack("=Q", value)), fds=[])
    assert vu.decode_request(*wire(R.SET_VRING_KICK, struct.pack("=Q", 0x105)), fds=[]).payload == \
        vu.VringFd(5, True)


def test_direction_is_checked() -> None:
    reply = vu.encode(vu.ack(vu.request(R.SET_OWNER, need_reply=True)))[0]
    with pytest.raises(RemoteProtocolError, match="expected a request"):
        vu.decode_request(vu.parse_header(reply[:12]), reply[12:], [])
    req = vu.encode(vu.request(R.GET_FEATURES))[0]
    with pytest.raises(RemoteProtocolError, match="expected a reply"):
        vu.decode_reply(vu.parse_header(req[:12]), req[12:], [])


def test_building_invalid_messages_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="carries VringState"):
        vu.request(R.SET_VRING_NUM, vu.U64Value(1))
    with pytest.raises(LocalProtocolError):
        vu.VringState(1 << 32, 0)
    with pytest.raises(LocalProtocolError):
        vu.U64Value(-1)
    with pytest.raises(LocalProtocolError):
        vu.VringFd(256, False)
    with pytest.raises(LocalProtocolError, match="at most"):
        vu.Message(R.SET_OWNER, vu.Empty(), fds=tuple(range(9)))
    with pytest.raises(LocalProtocolError, match="carries 0 fds"):
        vu.reply_to(vu.request(R.GET_CONFIG, vu.Config(0, 0, 0)), vu.Empty(), fds=[3])
    assert vu.wants_reply(vu.request(R.GET_FEATURES))
    assert not vu.wants_reply(vu.request(R.SET_OWNER))
    assert vu.wants_reply(vu.request(R.SET_OWNER, need_reply=True))


# -- fuzz: whatever a frontend sends, the decoder answers with a message or RemoteProtocolError ---

KNOWN = [int(r) for r in vu.Request] + [0, 41, 1000]


@settings(max_examples=1500, deadline=None)
@given(request_=st.sampled_from(KNOWN) | st.integers(0, 0xFFFF_FFFF),
       flags=st.sampled_from([1, 1 | vu.FLAG_NEED_REPLY, 1 | vu.FLAG_REPLY]) | st.integers(0, 0xFFFF_FFFF),
       payload=st.binary(max_size=300), nfds=st.integers(0, 9),
       channel=st.sampled_from(list(vu.Channel)))
def test_fuzz_decoder(request_: int, flags: int, payload: bytes, nfds: int, channel: vu.Channel) -> None:
    raw = vu.HEADER.pack(request_, flags, len(payload))
    try:
        header = vu.parse_header(raw)
        decode = vu.decode_reply if header.is_reply else vu.decode_request
        msg = decode(header, payload, list(range(100, 100 + nfds)), channel)
    except RemoteProtocolError:
        return
    # Accepted: it must re-encode to a message that decodes to the same value.
    assert roundtrip(msg, "replies" if msg.is_reply else "requests") == msg


@settings(max_examples=500, deadline=None)
@given(regions=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 30),
                                  st.integers(0, 1 << 47), st.integers(0, 1 << 30)),
                        max_size=9),
       count=st.integers(0, 10), nfds=st.integers(0, 10))
def test_fuzz_memory_tables(regions: list[tuple[int, int, int, int]], count: int, nfds: int) -> None:
    raw = struct.pack("=II", count, 0) + b"".join(struct.pack("=QQQQ", *r) for r in regions)
    try:
        msg = vu.decode_request(*wire(R.SET_MEM_TABLE, raw), fds=list(range(nfds)))
    except RemoteProtocolError:
        return
    rows = msg.payload.regions
    assert len(rows) == count == nfds <= min(len(regions), 8)
    for i, a in enumerate(rows):
        assert a.size > 0
        for b in rows[i + 1:]:
            assert a.guest_phys_addr + a.size <= b.guest_phys_addr or b.guest_phys_addr + b.size <= a.guest_phys_addr
            assert a.user_addr + a.size <= b.user_addr or b.user_addr + b.size <= a.user_addr
