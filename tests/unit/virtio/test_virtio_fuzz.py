"""Property-based fuzzing of chain parsing: random descriptor tables and rings.

Whatever the guest writes, parsing terminates and either returns buffers that lie in RAM, in
the §2.7.4.2 order, within the byte bound, or raises QueueError.  Through a whole device the
same holds with "never raises out of queue_notify" on top.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_procs.testing.chain_walks import walk_native, walk_python
from device_procs.testing.local import LocalHarness
from device_procs.virtio import fastpath
from device_procs.virtio import RngDevice
from device_procs.virtio.errors import QueueError
from device_procs.virtio.queue import MAX_CHAIN_BYTES, Queue
from vmm_core.memory import GuestMemory, create_guest_memory

RAM = 2 << 20
DESC, AVAIL, USED, TABLES = 0x1000, 0x3000, 0x4000, 0x8000
SIZE = 16

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ram():
    mem = create_guest_memory(RAM)
    yield mem
    mem.close()


addresses = st.one_of(
    st.integers(0, RAM - 1),                      # RAM
    st.sampled_from([TABLES, TABLES + 0x100, RAM - 16, RAM - 1, RAM, 0xC000_0000, 0xD000_0000,
                     0x1_0000_0000, 2**64 - 16]),  # edges, the MMIO hole, beyond
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 160, 24, 0x10000, 2**32 - 1]),
                    st.integers(0, 2**32 - 1))
descriptors = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, SIZE + 2))
tables = st.lists(descriptors, min_size=SIZE, max_size=SIZE)
indirect_tables = st.lists(descriptors, min_size=0, max_size=24)


def write_rings(mem: GuestMemory, table, indirect, heads, avail_idx) -> None:
    for i, (addr, length, flags, nxt) in enumerate(table):
        mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    for i, (addr, length, flags, nxt) in enumerate(indirect):
        # Indirect entries' `next` may point past their own table too.
        mem.write(TABLES + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    mem.write(AVAIL, struct.pack("<HH", 0, avail_idx))
    for i, h in enumerate(heads):
        mem.write_u16(AVAIL + 4 + 2 * i, h)
    mem.write(USED, bytes(6 + 8 * SIZE))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables, indirect=indirect_tables,
       heads=st.lists(st.integers(0, SIZE + 4), min_size=SIZE, max_size=SIZE),
       avail_idx=st.integers(0, 0xFFFF), event_idx=st.booleans(), use_indirect=st.booleans())
def test_parse_terminates_and_stays_in_ram(ram, table, indirect, heads, avail_idx, event_idx, use_indirect):
    write_rings(ram, table, indirect, heads, avail_idx)
    q = Queue(ram, SIZE, DESC, AVAIL, USED, max_size=SIZE, event_idx=event_idx, indirect=use_indirect)
    for _ in range(SIZE + 1):  # never more than the queue can hold
        try:
            chain = q.pop()
        except QueueError:
            return
        if chain is None:
            return
        assert 0 <= chain.head < SIZE
        total = 0
        for addr, length in chain.readable + chain.writable:
            assert length > 0 and ram.check(addr, length)
            total += length
        assert total <= MAX_CHAIN_BYTES
        assert [len(v) for v in chain.readable_views] == [n for _, n in chain.readable]
        assert [len(v) for v in chain.writable_views] == [n for _, n in chain.writable]
        q.add_used(chain.head, 0)
    pytest.fail("popped more chains than the avail ring can hold")


@pytest.mark.skipif(not fastpath.available(), reason="the _fastpath extension is not built")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables, indirect=indirect_tables,
       heads=st.lists(st.integers(0, SIZE + 4), min_size=SIZE, max_size=SIZE),
       avail_idx=st.integers(0, 0xFFFF), event_idx=st.booleans(), use_indirect=st.booleans())
def test_c_walker_gives_what_the_python_gives(ram, table, indirect, heads, avail_idx, event_idx,
                                              use_indirect):
    write_rings(ram, table, indirect, heads, avail_idx)
    make = lambda: Queue(ram, SIZE, DESC, AVAIL, USED, max_size=SIZE,  # noqa: E731
                         event_idx=event_idx, indirect=use_indirect)
    assert walk_native(make(), SIZE + 1) == walk_python(make(), SIZE + 1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables, indirect=indirect_tables,
       heads=st.lists(st.integers(0, SIZE + 4), min_size=SIZE, max_size=SIZE),
       avail_idx=st.integers(0, SIZE + 2))
def test_device_survives_random_rings(ram, table, indirect, heads, avail_idx):
    h = LocalHarness(RngDevice(), ram, ram_base=0x10000, ram_size=0x10000)
    h.driver.negotiate()
    h.driver.setup_queue(0, SIZE, desc=DESC, avail=AVAIL, used=USED)
    h.driver.driver_ok()
    write_rings(ram, table, indirect, heads, avail_idx)
    h.mmio.queue_notify(0)  # must not raise
    used = ram.read_u16(USED + 2)
    if not h.mmio.needs_reset:
        assert used == avail_idx  # every available chain came back
    assert used <= SIZE
