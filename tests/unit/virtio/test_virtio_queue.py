"""Split-virtqueue parsing (VIRTIO 1.2 §2.7): chains, indirect tables, EVENT_IDX, used ring."""

from __future__ import annotations

import struct

import pytest

from device_procs.virtio.errors import QueueError
from device_procs.virtio.queue import (MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                       VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Queue, slice_views)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DESC, AVAIL, USED = 0x10000, 0x20000, 0x30000
SIZE = 16


class Rings:
    """Hand-written rings at fixed addresses."""

    def __init__(self, memory, size: int = SIZE) -> None:
        self.m, self.size, self.idx = memory, size, 0

    def desc(self, i, addr, length, flags=0, nxt=0, table=DESC):
        self.m.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head):
        self.m.write_u16(AVAIL + 4 + 2 * (self.idx % self.size), head)
        self.idx = (self.idx + 1) & 0xFFFF
        self.m.write_u16(AVAIL + 2, self.idx)

    def used(self, slot):
        return struct.unpack("<II", self.m.read(USED + 4 + 8 * slot, 8))

    def queue(self, **kw) -> Queue:
        kw.setdefault("max_size", 256)
        kw.setdefault("indirect", True)
        return Queue(self.m, self.size, DESC, AVAIL, USED, **kw)


@pytest.fixture
def rings(memory):
    return Rings(memory)


def test_empty_ring_pops_nothing(rings):
    assert rings.queue().pop() is None


def test_direct_chain(rings, memory):
    memory.write(0x40000, b"hello")
    rings.desc(3, 0x40000, 5, NEXT, 7)
    rings.desc(7, 0x41000, 100, NEXT | WRITE, 2)
    rings.desc(2, 0x42000, 1, WRITE)
    rings.publish(3)
    chain = rings.queue().pop()
    assert chain.head == 3
    assert chain.readable == ((0x40000, 5),)
    assert chain.writable == ((0x41000, 100), (0x42000, 1))
    assert chain.read_all() == b"hello"
    assert (chain.readable_len, chain.writable_len) == (5, 101)
    chain.writable_views[1][0] = 0x55
    assert memory.read(0x42000, 1) == b"\x55"


def test_zero_length_descriptors_are_dropped(rings):
    rings.desc(0, 0x40000, 0, NEXT, 1)
    rings.desc(1, 0x40000, 8, WRITE)
    rings.publish(0)
    chain = rings.queue().pop()
    assert chain.readable == () and chain.writable == ((0x40000, 8),)


def test_indirect_chain(rings):
    table = 0x50000
    rings.desc(0, 0x40000, 16, NEXT, 1, table=table)
    rings.desc(1, 0x41000, 32, WRITE, table=table)
    rings.desc(5, table, 32, INDIRECT | WRITE)  # WRITE on the table descriptor is ignored
    rings.publish(5)
    chain = rings.queue().pop()
    assert chain.head == 5
    assert chain.readable == ((0x40000, 16),) and chain.writable == ((0x41000, 32),)


def test_direct_then_indirect(rings):
    table = 0x50000
    rings.desc(0, 0x41000, 8, WRITE, table=table)
    rings.desc(0, 0x40000, 16, NEXT, 1)
    rings.desc(1, table, 16, INDIRECT)
    rings.publish(0)
    chain = rings.queue().pop()
    assert chain.readable == ((0x40000, 16),) and chain.writable == ((0x41000, 8),)


def test_indirect_not_negotiated(rings):
    rings.desc(0, 0x50000, 16, INDIRECT)
    rings.publish(0)
    with pytest.raises(QueueError, match="not negotiated"):
        rings.queue(indirect=False).pop()


@pytest.mark.parametrize("setup,match", [
    (lambda r: (r.desc(0, 0x40000, 8, NEXT, 1), r.desc(1, 0x40000, 8, NEXT, 0)), "loop"),
    (lambda r: r.desc(0, 0x40000, 8, NEXT, SIZE), "outside"),
    (lambda r: r.desc(0, 0x40000, 8, WRITE | NEXT, 1) or r.desc(1, 0x40000, 8), "readable"),
    (lambda r: r.desc(0, 0xD000_0000, 8), "not in guest RAM"),
    (lambda r: r.desc(0, (32 << 20) - 4, 8), "not in guest RAM"),
    (lambda r: r.desc(0, 0x50000, 24, INDIRECT), "multiple of 16"),
    (lambda r: r.desc(0, 0x50000, 0, INDIRECT), "multiple of 16"),
    (lambda r: r.desc(0, 0x50000, 16 * 1025, INDIRECT), "entries"),
    (lambda r: r.desc(0, 0x50000, 16, INDIRECT | NEXT, 1), "both"),
    (lambda r: r.desc(0, 0xD000_0000, 16, INDIRECT), "not in guest RAM"),
    (lambda r: (r.desc(0, 0x50000, 16, INDIRECT, table=0x50000), r.desc(0, 0x50000, 16, INDIRECT)),
     "inside an indirect"),
    (lambda r: (r.desc(0, 0x40000, 8, NEXT, 1, table=0x50000), r.desc(1, 0x40000, 8, NEXT, 0, table=0x50000),
                r.desc(0, 0x50000, 32, INDIRECT)), "loop"),
    (lambda r: (r.desc(0, 0x40000, 8, NEXT, 2, table=0x50000), r.desc(0, 0x50000, 32, INDIRECT)), "outside"),
    (lambda r: (r.desc(0, 0x1000, 0x1F0_0000, WRITE | NEXT, 1), r.desc(1, 0x1000, 0x1F0_0000, WRITE | NEXT, 2),
                r.desc(2, 0x1000, 0x1F0_0000, WRITE | NEXT, 3), r.desc(3, 0x1000, 0x1F0_0000, WRITE | NEXT, 4),
                r.desc(4, 0x1000, 0x1F0_0000, WRITE)), "more than"),
])
def test_chain_violations(rings, setup, match):
    setup(rings)
    rings.publish(0)
    with pytest.raises(QueueError, match=match):
        rings.queue().pop()


def test_head_outside_table(rings):
    rings.publish(SIZE)
    with pytest.raises(QueueError, match="outside"):
        rings.queue().pop()


def test_avail_idx_too_far_ahead(rings, memory):
    memory.write_u16(AVAIL + 2, SIZE + 1)
    with pytest.raises(QueueError, match="ahead"):
        rings.queue().pop()


@pytest.mark.parametrize("size", [0, 3, 100, 512, MAX_QUEUE_SIZE * 2])
def test_bad_queue_sizes(memory, size):
    with pytest.raises(QueueError):
        Queue(memory, size, DESC, AVAIL, USED, max_size=256)


@pytest.mark.parametrize("desc,avail,used", [
    (DESC + 8, AVAIL, USED), (DESC, AVAIL + 1, USED), (DESC, AVAIL, USED + 2),  # misaligned
    (0xD000_0000, AVAIL, USED), (DESC, 0xC000_0000, USED), (DESC, AVAIL, (32 << 20) - 64),  # not RAM
])
def test_bad_ring_addresses(memory, desc, avail, used):
    with pytest.raises(QueueError):
        Queue(memory, 16, desc, avail, used, max_size=256)


def test_used_ring_element_then_idx(rings):
    q = rings.queue()
    for head in (4, 9):
        rings.desc(head, 0x40000, 8, WRITE)
        rings.publish(head)
    q.add_used(q.pop().head, 8)
    q.add_used(q.pop().head, 3)
    assert rings.used(0) == (4, 8) and rings.used(1) == (9, 3)
    assert rings.m.read_u16(USED + 2) == 2


def test_ring_wraps_around(rings):
    q = rings.queue()
    rings.desc(0, 0x40000, 8, WRITE)
    for n in range(3 * SIZE + 5):
        rings.publish(0)
        assert q.pop().head == 0
        q.add_used(0, n)
    assert q.used_idx == 3 * SIZE + 5


def test_notification_without_event_idx(rings, memory):
    q = rings.queue()
    assert not q.needs_notification()  # nothing used yet
    rings.desc(0, 0x40000, 8, WRITE)
    rings.publish(0)
    q.add_used(q.pop().head, 0)
    assert q.needs_notification()
    memory.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    rings.publish(0)
    q.add_used(q.pop().head, 0)
    assert not q.needs_notification()


def test_event_idx_used_event(rings, memory):
    """§2.7.10: interrupt only when the used idx passes used_event."""
    q = rings.queue(event_idx=True)
    rings.desc(0, 0x40000, 8, WRITE)
    memory.write_u16(AVAIL + 4 + 2 * SIZE, 2)  # used_event: interrupt after the 3rd buffer
    results = []
    for _ in range(4):
        rings.publish(0)
        q.add_used(q.pop().head, 0)
        results.append(q.needs_notification())
    assert results == [False, False, True, False]


def test_event_idx_batched_crossing(rings, memory):
    q = rings.queue(event_idx=True)
    rings.desc(0, 0x40000, 8, WRITE)
    memory.write_u16(AVAIL + 4 + 2 * SIZE, 1)
    for _ in range(3):
        rings.publish(0)
        q.add_used(q.pop().head, 0)
    assert q.needs_notification()  # used_event 1 lies within (0, 3]


def test_event_idx_avail_event_published(rings, memory):
    q = rings.queue(event_idx=True)
    rings.desc(0, 0x40000, 8, WRITE)
    rings.publish(0)
    rings.publish(0)
    q.pop(), q.pop()
    assert not q.enable_notification()
    assert memory.read_u16(USED + 4 + 8 * SIZE) == 2
    rings.publish(0)
    assert q.enable_notification()  # a buffer arrived: keep going


def test_resume_from_used_idx(rings, memory):
    memory.write_u16(USED + 2, 7)
    q = rings.queue(resume=True)
    assert (q.next_avail, q.used_idx) == (7, 7)


def test_slice_views():
    views = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"hi")]
    assert b"".join(slice_views(views, 2, 4)) == b"cdef"
    assert b"".join(slice_views(views, 8)) == b"i"
    assert slice_views(views, 9) == []
    assert b"".join(slice_views(views, 0, 0)) == b""
    assert b"".join(slice_views(views, 3)) == b"defghi"
