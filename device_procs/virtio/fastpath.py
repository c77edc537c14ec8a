"""The Python side of `_fastpath` (C, built from `_fastpath_build.py`): one `FastRing` per live
`Queue`, which lends the C loops the queue's positions and takes them back after each call, so
the `Queue` stays the one record of where the ring is and the Python paths can take over at any
chain.  `available()` is False where the extension is not built; devices then use the Python
paths, which remain the reference implementation (the unit tests compare both).
"""

from __future__ import annotations

import ctypes
from typing import Any

from .errors import QueueError
from .queue import CHAIN_ERRORS, Queue

try:
    from ._fastpath import ffi, lib
except ImportError:  # not built (./dev.sh setup builds it): the Python paths serve
    ffi = lib = None

# The C return codes; the error codes name entries of CHAIN_ERRORS.
OK, EMPTY, SLOW, EAGAIN, TAP_ERROR, STOP = 0, 1, 2, 3, 4, 5
ERROR_NAMES = {10: "pending", 11: "head", 12: "loop", 13: "indirect_not_negotiated",
               14: "indirect_nested", 15: "indirect_next", 16: "indirect_len",
               17: "indirect_entries", 18: "indirect_ram", 19: "order", 20: "bytes",
               21: "buffer_ram", 22: "next"}
# The drop reasons bh_check_tx / bh_check_rx return, as net_header names them.
DROP_REASONS = (None, "runt", "flags", "csum", "hdr_len", "gso_type", "gso_size", "oversize")

COUNTERS = ("chains", "tx_packets", "tx_bytes", "tx_eagain", "tx_dropped_no_header",
            "tx_dropped_runt", "tx_dropped_flags", "tx_dropped_csum", "tx_dropped_hdr_len",
            "tx_dropped_gso_type", "tx_dropped_gso_size", "tx_dropped_oversize",
            "tx_dropped_tap_error", "rx_packets", "rx_bytes", "rx_buffers", "rx_bad_buffers",
            "rx_dropped_runt", "rx_dropped_csum", "rx_dropped_oversize", "rx_dropped_gso_type",
            "rx_dropped_too_big", "rx_dropped_filtered")

BLK_COUNTERS = ("chains", "requests", "reads", "writes", "bytes_read", "bytes_written", "errors")


def available() -> bool:
    return lib is not None


def _address_of(view: memoryview) -> int:
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def chain_error(code: int, a0: int, a1: int) -> QueueError:
    """The QueueError the Python walker raises for the same fault."""
    return QueueError(CHAIN_ERRORS[ERROR_NAMES[code]].format(a0, a1))


class FastRing:
    """The C view (`struct bh_vq`) of one `Queue`, valid while its guest memory is open."""

    def __init__(self, queue: Queue) -> None:
        assert lib is not None
        self.queue = queue
        mem = queue.memory
        self._regions = ffi.new("struct bh_region[]", max(1, len(mem.regions)))
        for i, r in enumerate(mem.regions):
            self._regions[i].gpa = r.start
            self._regions[i].size = r.spec.size
            self._regions[i].host = ffi.cast("uint8_t *", r.host_addr)
        vq = self.vq = ffi.new("struct bh_vq *")
        vq.desc = ffi.cast("uint8_t *", mem.host_address(queue.desc_addr, 16 * queue.size))
        vq.avail = ffi.cast("uint8_t *", mem.host_address(queue.driver_addr, 6 + 2 * queue.size))
        vq.used = ffi.cast("uint8_t *", mem.host_address(queue.device_addr, 6 + 8 * queue.size))
        vq.size = queue.size
        vq.event_idx = int(queue.event_idx)
        vq.indirect = int(queue.indirect)
        vq.regions = self._regions
        vq.nregions = len(mem.regions)
        region = getattr(queue, "region", None)  # vhost-user's InflightQueue
        self._inflight = region is not None
        # The address only, not a held buffer export (the backend releases that view when the
        # inflight fd is replaced, which happens only while no queue, hence no ring, is live).
        vq.inflight = ffi.cast("uint8_t *", _address_of(region.view)) if region is not None else ffi.NULL
        self.chain = ffi.new("struct bh_chain *")
        self.counters = ffi.new("struct bh_net_counters *")
        self._err = ffi.new("int32_t *")
        self._blk_counters: Any = None

    def usable(self) -> bool:
        """False while the queue hands out recovered chains first (a resumed vhost-user ring)."""
        return not getattr(self.queue, "resubmit", None)

    def _lend(self) -> None:
        q, vq = self.queue, self.vq
        vq.next_avail, vq.used_idx = q.next_avail, q.used_idx
        if self._inflight:
            vq.counter = q.counter  # type: ignore[attr-defined]

    def _take_back(self) -> None:
        q, vq = self.queue, self.vq
        q.next_avail, q.used_idx = vq.next_avail, vq.used_idx
        if self._inflight:
            q.counter = vq.counter  # type: ignore[attr-defined]

    @staticmethod
    def _fold(k: Any, names: tuple[str, ...], counters: dict[str, Any]) -> None:
        """Add the C counters `k` into the device's and zero them."""
        for name in names:
            if v := getattr(k, name):
                counters[name] += v
                setattr(k, name, 0)

    def _raise_if_broken(self, rc: int) -> None:
        if rc in ERROR_NAMES:
            c = self.chain
            raise chain_error(rc, c.a0, c.a1)

    # -- virtio-net -------------------------------------------------------------------------------
    def net_tx(self, fd: int, features: int, mtu: int, counters: dict[str, Any]) -> tuple[int, int]:
        """Transmit until the ring or the tap stops; (code, errno for TAP_ERROR)."""
        self._lend()
        self._err[0] = 0
        try:
            rc = lib.bh_net_tx(self.vq, self.chain, fd, features, mtu, self.counters, self._err)
        finally:
            self._take_back()
            self._fold(self.counters, COUNTERS, counters)
        self._raise_if_broken(rc)
        return rc, self._err[0]

    def net_rx(self, fd: int, features: int, mtu: int, rx_filter: Any, bounce: bytearray,
               budget: int, counters: dict[str, Any]) -> tuple[int, int]:
        """Receive up to `budget` frames (`rx_filter`: a NativeFilter's struct); (code, errno
        for TAP_ERROR or the length of a frame that spilled into `bounce` for STOP; else 0)."""
        self._lend()
        self._err[0] = 0
        keep = ffi.from_buffer(bounce)
        try:
            rc = lib.bh_net_rx(self.vq, self.chain, fd, features, mtu, rx_filter,
                               keep, len(bounce), budget, self.counters, self._err)
        finally:
            self._take_back()
            self._fold(self.counters, COUNTERS, counters)
        self._raise_if_broken(rc)
        return rc, self._err[0]

    # -- virtio-blk -------------------------------------------------------------------------------
    def blk(self, fd: int, capacity: int, readonly: bool, counters: dict[str, Any]) -> int:
        """Serve reads and writes until the ring is empty (EMPTY) or the next chain is one the
        Python must take (SLOW)."""
        self._lend()
        if self._blk_counters is None:
            self._blk_counters = ffi.new("struct bh_blk_counters *")
        k = self._blk_counters
        try:
            rc = lib.bh_blk(self.vq, self.chain, fd, capacity, int(readonly), k)
        finally:
            self._take_back()
            self._fold(k, BLK_COUNTERS, counters)
        self._raise_if_broken(rc)
        return rc

    # After net_rx's STOP with a spilled frame: the guest buffers it was read into (not used).
    def gathered_capacity(self) -> int:
        c = self.chain
        return sum(c.wiov[i].iov_len for i in range(c.nr))

    def gathered(self) -> bytes:
        c = self.chain
        return b"".join(bytes(ffi.buffer(c.wiov[i].iov_base, c.wiov[i].iov_len))
                        for i in range(c.nr))


class NativeFilter:
    """A `net_ctrl.RxFilter` as `struct bh_rx_filter`, rebuilt when the filter changed."""

    def __init__(self) -> None:
        assert ffi is not None
        self.struct = ffi.new("struct bh_rx_filter *")
        self._key: tuple[int, int, bool] | None = None
        self._tables: list[Any] = []

    def get(self, rx_filter: Any, enabled: bool) -> Any:
        key = (id(rx_filter), rx_filter.generation, enabled)
        if key != self._key:
            f = self.struct
            f.enabled = int(enabled)
            f.promisc = int(rx_filter.promisc)
            f.allmulti = int(rx_filter.allmulti or rx_filter.all_multicast)
            f.all_unicast = int(rx_filter.all_unicast)
            f.mac = rx_filter.mac
            uni = ffi.new("uint8_t[]", b"".join(sorted(rx_filter.unicast)) or b"\0")
            multi = ffi.new("uint8_t[]", b"".join(sorted(rx_filter.multicast)) or b"\0")
            self._tables = [uni, multi]
            f.unicast, f.n_unicast = uni, len(rx_filter.unicast)
            f.multicast, f.n_multicast = multi, len(rx_filter.multicast)
            self._key = key
        return self.struct


def ring_for(cache: dict[int, FastRing], index: int, queue: Queue) -> FastRing | None:
    """The FastRing of `queue` (made on first use, remade when the queue object changed), or
    None when the C paths are not built or cannot take this queue now."""
    if lib is None:
        return None
    ring = cache.get(index)
    if ring is None or ring.queue is not queue:
        ring = cache[index] = FastRing(queue)
    return ring if ring.usable() else None
