"""Walk every available chain of a ring through the Python walker or the C one (`fastpath`),
with results in one comparable form: (head, readable, writable) per chain, then None (empty) or
the error message.  For the differential tests of the two."""

from __future__ import annotations

from device_procs.virtio import fastpath
from device_procs.virtio.errors import QueueError
from device_procs.virtio.queue import Queue


def walk_python(queue: Queue, limit: int) -> list:
    """Pop chains until the ring is empty or broken: each chain's buffers, then None or the
    error message."""
    out: list = []
    for _ in range(limit):
        try:
            chain = queue.pop()
        except QueueError as e:
            out.append(str(e))
            return out
        if chain is None:
            out.append(None)
            return out
        out.append((chain.head, list(chain.readable), list(chain.writable)))
        queue.add_used(chain.head, 0)
    return out


def walk_native(queue: Queue, limit: int) -> list:
    """The same through bh_pending / bh_walk; the host pointers are checked to be exactly the
    RAM the guest addresses name."""
    ring = fastpath.FastRing(queue)
    ffi, lib = fastpath.ffi, fastpath.lib
    pending = ffi.new("uint32_t *")
    out: list = []
    for _ in range(limit):
        ring.vq.next_avail = queue.next_avail
        rc = lib.bh_pending(ring.vq, pending)
        if rc:
            out.append(str(fastpath.chain_error(rc, pending[0], queue.size)))
            return out
        if pending[0] == 0:
            out.append(None)
            return out
        head = queue.take()
        assert head is not None
        c = ring.chain
        rc = lib.bh_walk(ring.vq, head, c)
        if rc in fastpath.ERROR_NAMES:
            out.append(str(fastpath.chain_error(rc, c.a0, c.a1)))
            return out
        assert rc == fastpath.OK
        sides = []
        for n, iov, addrs in ((c.nr, c.riov, c.raddr), (c.nw, c.wiov, c.waddr)):
            bufs = [(addrs[i], iov[i].iov_len) for i in range(n)]
            for i, (addr, length) in enumerate(bufs):
                assert int(ffi.cast("uintptr_t", iov[i].iov_base)) == \
                    queue.memory.host_address(addr, length)
            sides.append(bufs)
        out.append((head, sides[0], sides[1]))
        queue.add_used(head, 0)
    return out
