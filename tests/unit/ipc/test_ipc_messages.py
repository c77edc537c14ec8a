"""ipc_protocol.messages: closed set, strict msgpack codec, version rules."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc_protocol import messages as m
from ipc_protocol.errors import LocalProtocolError, RemoteProtocolError

SAMPLES = [
    m.Hello(1, 0, "blk0", "blk", 4242),
    m.Configure(1, {"type": "blk", "path": "/d.img", "readonly": False}, ((0, 1 << 20, 0),), 64, 50),
    m.Activate(2, 0xF, 1 << 32, 1, 1, 0, ((0, 256, 1, 0x1000, 0x2000, 0x3000),)),
    m.Ready(1, 1 << 32), m.Log("warning", "queue 0: bad descriptor"),
    m.Reset(3), m.Ack(3), m.Stats(4), m.StatsReply(4, {"reads": 10, "writes": 3}),
    m.Heartbeat(5), m.HeartbeatAck(5), m.Shutdown("bye"), m.ErrorReport(m.E_CONFIG, "no file"),
    m.Fault("stall_ms", {"ms": 10}),
]


def test_every_message_type_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg: m.Message) -> None:
    assert m.decode(m.encode(msg)) == msg


def packed(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("data, match", [
    (packed({"type": "Nope"}), "unknown control message type"),
    (packed({"type": "Heartbeat", "seq": 1, "extra": 2}), "unknown fields"),
    (packed({"type": "Heartbeat"}), "missing"),
    (packed({"type": "Heartbeat", "seq": -1}), "outside"),
    (packed({"type": "Heartbeat", "seq": True}), "integer"),
    (packed({"type": "Heartbeat", "seq": 1.5}), "integer"),
    (packed({"type": "Shutdown", "reason": "x" * 201}), "exceeds"),
    (packed({"type": "Hello", "version_major": 1, "version_minor": 0, "name": "a",
             "device_type": "gpu", "pid": 1}), "not one of"),
    (packed([1, 2]), "not a map"),
    (b"\xc1", "not valid msgpack"),
    (b"\x81", "not valid msgpack"),  # truncated map
    (msgpack.packb({"type": "Heartbeat", "seq": msgpack.ExtType(1, b"x")}), "extension"),
    (b"\0" * (m.MAX_MESSAGE_BYTES + 1), "exceeds"),
    (packed({"type": "Configure", "request_id": 1, "spec": {}, "memory": [[1, 2]],
             "ring_capacity": 4, "spin_us": 0}), "row 0"),
])
def test_decode_rejects_malformed_input(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        m.decode(data)


def test_building_an_invalid_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        m.Heartbeat(-1)
    with pytest.raises(LocalProtocolError):
        m.Fault("explode", {})
    with pytest.raises(LocalProtocolError):
        m.encode("not a message")  # type: ignore[arg-type]


def test_version_negotiation() -> None:
    assert m.negotiate_version(1, 5, local=(1, 2)) == (1, 2)
    assert m.negotiate_version(1, 0, local=(1, 2)) == (1, 0)
    with pytest.raises(RemoteProtocolError, match="protocol 2.0"):
        m.negotiate_version(2, 0, local=(1, 0))


def test_check_hello() -> None:
    hello = m.Hello(m.PROTOCOL_MAJOR, 9, "rng0", "rng", 10)
    assert m.check_hello(hello, "rng0", 10) is hello
    with pytest.raises(RemoteProtocolError):
        m.check_hello(m.HeartbeatAck(1))
    with pytest.raises(RemoteProtocolError):
        m.check_hello(hello, expected_name="blk0")
    with pytest.raises(RemoteProtocolError):
        m.check_hello(m.Hello(m.PROTOCOL_MAJOR + 1, 0, "rng0", "rng", 10))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_remote_error(data: bytes) -> None:
    try:
        m.decode(data)
    except RemoteProtocolError:
        pass


json_like = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([t.TAG for t in m.MESSAGE_TYPES]),
       st.dictionaries(st.text(max_size=15), json_like, max_size=6))
def test_structured_garbage_never_raises_anything_but_remote_error(tag: str, body: dict) -> None:
    try:
        m.decode(packed({**body, "type": tag}))
    except RemoteProtocolError:
        pass
