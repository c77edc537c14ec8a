"""ipc_protocol.ring over plain bytearrays: layout, SPSC behaviour, validation of peer data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc_protocol.errors import LocalProtocolError, RemoteProtocolError
from ipc_protocol.ring import (CONSUMER_INDEX_OFFSET, PRODUCER_INDEX_OFFSET, SLOT_SIZE,
                               SLOTS_OFFSET, Op, ResponseMatcher, Slot, decode_slot, encode_slot,
                               initialize_ring, request_consumer, request_producer,
                               response_consumer, response_producer, ring_bytes)


def new_ring(capacity: int = 4) -> bytearray:
    buf = bytearray(ring_bytes(capacity))
    initialize_ring(buf, capacity)
    return buf


def test_layout_constants_keep_indices_on_separate_cache_lines() -> None:
    assert SLOT_SIZE == 24
    assert PRODUCER_INDEX_OFFSET // 64 != CONSUMER_INDEX_OFFSET // 64
    assert SLOTS_OFFSET % 64 == 0
    assert ring_bytes(4) % 64 == 0 and ring_bytes(4) >= SLOTS_OFFSET + 4 * SLOT_SIZE


def test_push_until_full_then_pop_in_fifo_order() -> None:
    buf = new_ring(4)
    prod, cons = request_producer(buf, 4), request_consumer(buf, 4)
    assert cons.pop() is None
    slots = [Slot.write(i, 0x70 + i, bytes([i]) * 4) for i in range(4)]
    assert all(prod.push(s) for s in slots)
    assert prod.push(Slot.read(9, 0, 4)) is False  # full: nothing written
    assert [cons.pop() for _ in range(4)] == slots
    assert cons.pop() is None
    assert prod.push(Slot.read(9, 0, 4)) is True  # space again after the consumer advanced


def test_indices_wrap_around_many_times() -> None:
    buf = new_ring(2)
    prod, cons = request_producer(buf, 2), request_consumer(buf, 2)
    for i in range(1000):
        assert prod.push(Slot.write(i, 4, i.to_bytes(2, "little")))
        got = cons.pop()
        assert got is not None and got.seq == i and got.data == i.to_bytes(2, "little")


@pytest.mark.parametrize("bad", [
    dict(op=Op.READ, seq=1, offset=0, size=3),
    dict(op=Op.READ, seq=1, offset=0, size=4, data=b"abcd"),
    dict(op=Op.WRITE, seq=1, offset=0, size=4, data=b"ab"),
    dict(op=Op.WRITE, seq=-1, offset=0, size=1, data=b"a"),
    dict(op=Op.WRITE, seq=1, offset=1 << 32, size=1, data=b"a"),
    dict(op=Op.SYNC, seq=1, offset=4),
    dict(op=5, seq=1),
])
def test_building_an_invalid_slot_is_a_local_error(bad: dict) -> None:
    with pytest.raises(LocalProtocolError):
        Slot(**bad)


def test_bad_capacity_and_small_buffer_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        ring_bytes(3)
    with pytest.raises(LocalProtocolError):
        request_producer(bytearray(100), 4)
    with pytest.raises(LocalProtocolError):
        request_producer(bytes(ring_bytes(4)), 4)  # read-only


def raw_slot(op: int, size: int, reserved: int, offset: int, seq: int, data: bytes) -> bytes:
    return struct.pack("<BBHIQ8s", op, size, reserved, offset, seq, data)


@pytest.mark.parametrize("raw", [
    raw_slot(77, 4, 0, 0, 1, b"\0" * 8),                   # unknown op
    raw_slot(Op.READ_DONE, 3, 0, 0, 1, b"\0" * 8),         # size not an access size
    raw_slot(Op.READ_DONE, 4, 1, 0, 1, b"\0" * 8),         # reserved bits set
    raw_slot(Op.READ_DONE, 2, 0, 0, 1, b"\1\1\1" + b"\0" * 5),  # junk past the data
    raw_slot(Op.SYNC_DONE, 0, 0, 8, 1, b"\0" * 8),         # sync with an offset
    raw_slot(Op.READ, 4, 0, 0, 1, b"\0" * 8),              # a request op on the response ring
    b"\0" * 10,                                             # wrong length
])
def test_invalid_slot_from_peer_is_a_remote_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_slot(raw, allowed_ops=(Op.READ_DONE, Op.SYNC_DONE))


def test_corrupt_peer_index_is_a_remote_error() -> None:
    buf = new_ring(4)
    cons = response_consumer(buf, 4)
    struct.pack_into("<Q", buf, PRODUCER_INDEX_OFFSET, 5)  # 5 slots "pending" in a 4-slot ring
    with pytest.raises(RemoteProtocolError, match="corrupt"):
        cons.pop()
    prod = request_producer(buf, 4)
    struct.pack_into("<Q", buf, CONSUMER_INDEX_OFFSET, 3)  # consumer "ahead" of the producer
    with pytest.raises(RemoteProtocolError, match="corrupt"):
        prod.push(Slot.sync(1))


def test_own_index_is_never_read_back_from_shared_memory() -> None:
    buf = new_ring(4)
    prod, cons = response_producer(buf, 4), response_consumer(buf, 4)
    prod.push(Slot(Op.SYNC_DONE, 1))
    struct.pack_into("<Q", buf, CONSUMER_INDEX_OFFSET, 0xDEAD)  # peer scribbles *our* index
    assert cons.pop() == Slot(Op.SYNC_DONE, 1)  # we still use our private tail
    assert cons.pop() is None


def test_matcher_accepts_the_right_answer_and_rejects_mismatches() -> None:
    m = ResponseMatcher()
    req = Slot.read(7, 0x70, 4)
    m.expect(req)
    with pytest.raises(RemoteProtocolError, match="seq"):
        m.match(Slot(Op.READ_DONE, 8, 0x70, 4, b"abcd"))
    with pytest.raises(RemoteProtocolError, match="size"):
        m.match(Slot(Op.READ_DONE, 7, 0x70, 2, b"ab"))
    with pytest.raises(RemoteProtocolError, match="op"):
        m.match(Slot(Op.SYNC_DONE, 7))
    assert m.match(req.answer(b"abcd")) is req
    with pytest.raises(RemoteProtocolError, match="no answer was pending"):
        m.match(req.answer(b"abcd"))
    with pytest.raises(LocalProtocolError):
        m.expect(Slot.write(1, 0, b"a"))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=SLOT_SIZE, max_size=SLOT_SIZE))
def test_any_slot_bytes_decode_or_raise_remote_error(raw: bytes) -> None:
    try:
        slot = decode_slot(raw)
    except RemoteProtocolError:
        return
    assert encode_slot(slot) == raw  # whatever is accepted round-trips exactly


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.just("pop"), st.sampled_from([1, 2, 4, 8])), max_size=60))
def test_ring_behaves_like_a_bounded_fifo(actions: list) -> None:
    capacity = 4
    buf = new_ring(capacity)
    prod, cons = request_producer(buf, capacity), request_consumer(buf, capacity)
    model: list[Slot] = []
    for seq, action in enumerate(actions):
        if action == "pop":
            assert cons.pop() == (model.pop(0) if model else None)
        else:
            slot = Slot.write(seq, seq, bytes([seq & 0xFF]) * action)
            assert prod.push(slot) == (len(model) < capacity)
            if len(model) < capacity:
                model.append(slot)
