"""The C chain walk and net loops (`device_procs.virtio._fastpath`) against the Python reference:
the same rings through both, the same results.  (The hypothesis tables of test_virtio_fuzz.py
run through both walkers there; every NetDevice unit test runs on both paths.)"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_procs.testing import hostile
from device_procs.testing.chain_walks import walk_native, walk_python
from device_procs.testing.local import LocalHarness
from device_procs.virtio import RngDevice
from device_procs.virtio import fastpath
from device_procs.virtio import net_header as nh
from device_procs.virtio.errors import QueueError
from device_procs.virtio.queue import (VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT,
                                       VIRTQ_DESC_F_WRITE as WRITE, Queue)
from device_procs.vhost_user.inflight import InflightQueue, InflightRegion, region_size
from vmm_core.memory import create_guest_memory

pytestmark = pytest.mark.skipif(not fastpath.available(),
                                reason="the _fastpath extension is not built (./dev.sh setup)")


def twin_queues(h: LocalHarness, index: int = 0) -> tuple[Queue, Queue]:
    dq, dev = h.driver.queue(index), h.device.queues[index]
    make = lambda: Queue(h.memory, dq.size, dq.desc, dq.avail, dq.used, max_size=dq.size,  # noqa: E731
                         event_idx=dev.event_idx, indirect=dev.indirect)
    return make(), make()


@pytest.mark.parametrize("build", [b for _, b in hostile.CHAIN_CASES],
                         ids=[n for n, _ in hostile.CHAIN_CASES])
def test_every_hostile_chain_fails_the_same_way_in_c(memory, build):
    h = LocalHarness(RngDevice(), memory)
    h.driver.init()
    build(h.driver.queue(0))
    py, c = twin_queues(h)
    expected = walk_python(py, 8)
    assert isinstance(expected[-1], str), expected  # every case is broken somewhere
    assert walk_native(c, 8) == expected


def test_good_chains_walk_the_same_in_c_direct_indirect_and_split(memory):
    h = LocalHarness(RngDevice(), memory)
    h.driver.init()
    q = h.driver.queue(0)
    q.add([b"a" * 10, b"b" * 3], [100, 7])
    q.add([], [4096, 1, 2, 3], indirect=True)
    q.add([b"x"], [])
    py, c = twin_queues(h)
    expected = walk_python(py, 8)
    assert expected[-1] is None and len(expected) == 4
    assert walk_native(c, 8) == expected


def test_more_buffers_than_iov_max_is_left_to_the_python(memory):
    h = LocalHarness(RngDevice(), memory)
    h.driver.init()
    # 10 direct one-byte writable buffers, then an indirect table of 1 024 more: 1 034.
    q = h.driver.queue(0)
    arena = h.driver.arena
    table, scratch = arena.alloc(16 * 1024, 16), arena.alloc(64)
    for i in range(1024):
        q.write_desc(i, scratch, 1, WRITE | (NEXT if i < 1023 else 0), i + 1, table=table)
    for i in range(10):
        q.write_desc(i, scratch, 1, WRITE | NEXT, i + 1)
    q.write_desc(10, table, 16 * 1024, INDIRECT)
    q.publish(0)
    py, c = twin_queues(h)
    chain = py.pop()
    assert chain is not None and len(chain.writable) == 1034  # the Python takes it
    ring = fastpath.FastRing(c)
    head = c.take()
    assert fastpath.lib.bh_walk(ring.vq, head, ring.chain) == fastpath.SLOW
    assert ring.chain.nw == 1034


headers = st.tuples(st.integers(0, 255), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x80, 2, 0xFF]),
                    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                    st.sampled_from([0, 16, 6, 0xFFFF]) | st.integers(0, 0xFFFF))
feature_sets = st.integers(0, (1 << 19) - 1)


@settings(max_examples=3000, deadline=None)
@given(h=headers, frame_len=st.integers(0, 70000) | st.sampled_from([13, 14, 1514, 1518, 1519, 65554, 65555]),
       features=feature_sets, mtu=st.sampled_from([68, 1500, 9000, 65535]) | st.integers(68, 65535))
def test_header_checks_match_the_python(h, frame_len, features, mtu):
    raw = struct.pack("<BBHHHHH", *h, 0)
    header = nh.NetHeader.unpack(raw)
    lib = fastpath.lib
    assert fastpath.DROP_REASONS[lib.bh_check_tx(raw, frame_len, features, mtu)] == \
        nh.check_tx(header, frame_len, features, mtu)
    assert fastpath.DROP_REASONS[lib.bh_check_rx(raw, frame_len, features, mtu)] == \
        nh.check_rx(header, frame_len, features, mtu)


def test_transmit_keeps_the_inflight_region_as_the_python_does():
    """vhost-user's inflight tracking (taken, last batch, used idx) written by the C transmit
    loop byte for byte as by InflightQueue, on two identical guests."""
    sides = []
    for native in (False, True):
        mem = create_guest_memory(1 << 20)
        desc, avail, used, data = 0x1000, 0x2000, 0x3000, 0x10000
        frame = bytes(12) + bytes(range(60))
        for i in range(5):
            mem.write(data + 128 * i, frame)
            mem.write(desc + 16 * i, struct.pack("<QIHH", data + 128 * i, len(frame), 0, 0))
            mem.write_u16(avail + 4 + 2 * i, 4 - i)  # heads out of order
        mem.write_u16(avail + 2, 5)
        buf = bytearray(region_size(8))
        region = InflightRegion(memoryview(buf), 8)
        region.initialise(8, 0)
        q = InflightQueue(mem, 8, desc, avail, used, max_size=8, region=region)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        if native:
            counters = {name: 0 for name in fastpath.COUNTERS}
            rc, _ = fastpath.FastRing(q).net_tx(a.fileno(), 0, 1500, counters)
            assert rc == fastpath.EMPTY and counters["tx_packets"] == 5
        else:
            while (head := q.take()) is not None:
                chain = q.parse_chain(head)
                a.send(chain.read_all())
                q.add_used(head, 0)
        got = [b.recv(4096) for _ in range(5)]
        assert got == [frame] * 5
        sides.append((bytes(buf), mem.read(used, 6 + 8 * 8), q.counter, q.next_avail))
        a.close()
        b.close()
        mem.close()
    assert sides[0] == sides[1]


def test_the_python_names_of_the_c_codes_are_the_c_ones():
    lib = fastpath.lib
    assert (fastpath.OK, fastpath.EMPTY, fastpath.SLOW, fastpath.EAGAIN, fastpath.TAP_ERROR,
            fastpath.STOP) == (lib.BH_OK, lib.BH_EMPTY, lib.BH_SLOW, lib.BH_EAGAIN,
                               lib.BH_TAP_ERROR, lib.BH_STOP)
    for code, name in fastpath.ERROR_NAMES.items():
        assert getattr(lib, f"BH_E_{name.upper()}") == code
