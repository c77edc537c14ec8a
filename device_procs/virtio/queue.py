"""Split virtqueues (VIRTIO 1.2 §2.7), device side: ring access and descriptor-chain walking.

Parse, then execute: `Queue.pop()` turns the next available chain into a `DescriptorChain` value
(readable and writable buffers, already checked against guest RAM) before any device logic sees
it.  Every guest-controlled number is checked here, each check citing the spec; a violation
raises `QueueError`, which the device turns into DEVICE_NEEDS_RESET.  Walking always terminates
(step limits) and never touches memory outside RAM (`GuestMemory` views, checked up front).

Ring layout (§2.7, "Virtqueues: Split"), queue size N:
    descriptor table  16 * N bytes, 16-aligned: {le64 addr, le32 len, le16 flags, le16 next}
    available ring     6 + 2N bytes, 2-aligned: {flags, idx, ring[N], used_event}  (le16 each)
    used ring          6 + 8N bytes, 4-aligned: {flags, idx, ring[N] {le32 id, le32 len}, avail_event}
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ipc_protocol.guest_memory import GuestMemoryError
from ipc_protocol.guest_memory import GuestMemory

from .errors import QueueError

# Descriptor flags (§2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags (§2.7.6, §2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
# §2.7: "Queue Size ... The maximum Queue Size value is 32768."
MAX_QUEUE_SIZE = 32768
# §2.7.5.3.1 asks for a whole chain no longer than the queue size, but Linux sizes indirect
# tables from seg_max rather than the queue size; like QEMU we accept tables of up to 1024
# entries and still bound every walk.
MAX_INDIRECT_DESCRIPTORS = 1024
# Our own bound on the bytes one chain may describe: 64 MiB is far above what Linux sends in
# one request (its block layer caps requests at a few MiB) and keeps a hostile chain from
# making a device allocate or copy without limit.
MAX_CHAIN_BYTES = 64 * 1024 * 1024

# What a broken ring or chain is, by name (the C walker in `_fastpath` reports the same names by
# code, with the same values, so both say the same thing to the user).
CHAIN_ERRORS = {
    "pending": "available idx moved {0} entries ahead of a {1}-entry queue",
    "head": "chain head {0} is outside the {1}-entry descriptor table",
    "loop": "descriptor chain from head {0} is longer than its table (a loop?)",
    "indirect_not_negotiated": "indirect descriptor used but VIRTIO_F_INDIRECT_DESC not negotiated",
    "indirect_nested": "indirect descriptor inside an indirect table",
    "indirect_next": "descriptor has both INDIRECT and NEXT set",
    "indirect_len": "indirect table length {0} is not a non-zero multiple of 16",
    "indirect_entries": f"indirect table has {{0}} entries, more than {MAX_INDIRECT_DESCRIPTORS}",
    "indirect_ram": "indirect table {0:#x}+{1} is not in guest RAM",
    "order": "device-readable descriptor after a device-writable one",
    "bytes": f"descriptor chain describes more than {MAX_CHAIN_BYTES} bytes",
    "buffer_ram": "buffer {0:#x}+{1} is not in guest RAM",
    "next": "next descriptor {0} is outside the {1}-entry table",
}

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def _alignment_error(name: str, addr: int, align: int) -> str | None:
    return None if addr % align == 0 else f"{name} address {addr:#x} is not {align}-byte aligned"


@dataclass(frozen=True)
class DescriptorChain:
    """One parsed chain: what the device may read and where it may write, in order.

    `readable`/`writable` hold (guest address, length) pairs; `readable_views`/`writable_views`
    the matching memoryviews of guest RAM (zero-length descriptors are dropped).  Device-readable
    buffers always precede device-writable ones (§2.7.4.2), so each list is one byte stream.
    """

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]
    readable_views: tuple[memoryview, ...] = field(repr=False)
    writable_views: tuple[memoryview, ...] = field(repr=False)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def read_all(self) -> bytes:
        """The whole device-readable stream, copied."""
        return b"".join(bytes(v) for v in self.readable_views)


def slice_views(views: tuple[memoryview, ...] | list[memoryview], start: int,
                length: int | None = None) -> list[memoryview]:
    """The part [start, start+length) of a byte stream made of `views`, as views (no copy).

    Devices use it to find a header or status byte wherever the driver split the buffers:
    §2.6.4 forbids assuming any particular framing.
    """
    out: list[memoryview] = []
    remaining = None if length is None else length
    pos = 0
    for v in views:
        n = len(v)
        if pos + n <= start:
            pos += n
            continue
        lo = max(0, start - pos)
        hi = n if remaining is None else min(n, lo + remaining)
        if hi > lo:
            out.append(v[lo:hi])
            if remaining is not None:
                remaining -= hi - lo
                if remaining == 0:
                    break
        pos += n
    return out


def write_stream(views: list[memoryview] | tuple[memoryview, ...], start: int,
                 data: bytes | bytearray) -> None:
    """Write `data` at offset `start` of the byte stream made of `views` (§2.6.4: any framing)."""
    pos = 0
    for view in slice_views(views, start, len(data)):
        view[:] = data[pos:pos + len(view)]
        pos += len(view)


class Queue:
    """The device's side of one split virtqueue, configured by the driver through the transport.

    `next_avail` is the next available-ring slot to consume, `used_idx` the device's copy of the
    used index.  On a fresh activation both are 0 (§2.7.14: the driver zeroes the rings).  To
    continue a queue in a new device process, pass `resume=True`: both start from the used index
    in guest memory.  Because our devices complete chains in order and each consumed chain yields
    one used element, every chain the old process popped but did not finish is popped again.
    """

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, driver_addr: int,
                 device_addr: int, *, max_size: int, event_idx: bool = False,
                 indirect: bool = False, resume: bool = False) -> None:
        # §2.7: "Queue Size value is always a power of 2" for split queues; §4.2.3.2 (mmio):
        # the driver MUST NOT exceed QueueNumMax.
        if size <= 0 or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two")
        if size > max_size or size > MAX_QUEUE_SIZE:
            raise QueueError(f"queue size {size} exceeds the maximum {min(max_size, MAX_QUEUE_SIZE)}")
        # §2.7, alignment table: descriptor table 16, available ring 2, used ring 4.
        for name, addr, align in (("descriptor table", desc_addr, 16),
                                  ("available ring", driver_addr, 2),
                                  ("used ring", device_addr, 4)):
            err = _alignment_error(name, addr, align)
            if err:
                raise QueueError(err)
        self.memory = memory
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.event_idx = event_idx
        self.indirect = indirect
        # Whole rings must be RAM (a queue in the MMIO hole is an error, not a device access).
        try:
            self._desc = memory.view(desc_addr, DESC_SIZE * size)
            self._avail = memory.view(driver_addr, 6 + 2 * size)
            self._used = memory.view(device_addr, 6 + USED_ELEM_SIZE * size)
        except GuestMemoryError as e:
            raise QueueError(f"virtqueue ring is not in guest RAM: {e}") from None
        self.used_idx = _U16.unpack_from(self._used, 2)[0] if resume else 0
        self.next_avail = self.used_idx
        self.signalled_used = self.used_idx

    # -- available ring -----------------------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def pending(self) -> int:
        """How many chains the driver has made available that we have not consumed."""
        pending = (self.avail_idx() - self.next_avail) & 0xFFFF
        # §2.7.13.3: the driver adds at most Queue Size entries beyond what the device used,
        # so a larger gap means a corrupt idx (and would make us re-read stale slots).
        if pending > self.size:
            raise QueueError(CHAIN_ERRORS["pending"].format(pending, self.size))
        return pending

    def pop(self) -> DescriptorChain | None:
        """Consume and parse the next available chain, or None if the ring is empty."""
        head = self.take()
        return None if head is None else self.parse_chain(head)

    def take(self) -> int | None:
        """Consume the next available head without parsing its chain (None if the ring is
        empty); a transport that tracks chains in flight (vhost-user) hooks in here."""
        if not self.pending():
            return None
        slot = self.next_avail % self.size
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return head

    def enable_notification(self) -> bool:
        """Ask for a kick on the next available buffer; True if more arrived meanwhile.

        With EVENT_IDX (§2.7.10) the device publishes avail_event = next_avail; without it we
        never set VIRTQ_USED_F_NO_NOTIFY, so kicks are always on.  The re-check closes the race
        with a driver that added a buffer before seeing the new avail_event.
        """
        if self.event_idx:
            _U16.pack_into(self._used, 4 + USED_ELEM_SIZE * self.size, self.next_avail)
        return self.pending() > 0

    # -- descriptor chains --------------------------------------------------------------------
    def _read_desc(self, table: memoryview, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(table, DESC_SIZE * index)

    def parse_chain(self, head: int) -> DescriptorChain:
        """Walk the chain starting at descriptor `head`, checking every limit."""
        # §2.7.6: ring[] entries are descriptor-table indices, so below Queue Size.
        if head >= self.size:
            raise QueueError(CHAIN_ERRORS["head"].format(head, self.size))
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        r_views: list[memoryview] = []
        w_views: list[memoryview] = []
        total = 0
        table, table_len, index = self._desc, self.size, head
        in_indirect = False
        # §2.7.5.3.1 / §2.7.4: a chain is at most Queue Size descriptors (plus one indirect
        # table, bounded separately), so a longer walk can only be a loop.
        steps_left = self.size
        while True:
            if steps_left == 0:
                raise QueueError(CHAIN_ERRORS["loop"].format(head))
            steps_left -= 1
            addr, length, flags, nxt = self._read_desc(table, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # §2.7.5.3.1: INDIRECT only if negotiated ...
                if not self.indirect:
                    raise QueueError(CHAIN_ERRORS["indirect_not_negotiated"])
                # ... "MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor"
                if in_indirect:
                    raise QueueError(CHAIN_ERRORS["indirect_nested"])
                # ... "MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT"
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(CHAIN_ERRORS["indirect_next"])
                # §2.7.5.3: the table is len/16 descriptors; it must hold at least one, and we
                # bound its size (see MAX_INDIRECT_DESCRIPTORS).
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(CHAIN_ERRORS["indirect_len"].format(length))
                entries = length // DESC_SIZE
                if entries > MAX_INDIRECT_DESCRIPTORS:
                    raise QueueError(CHAIN_ERRORS["indirect_entries"].format(entries))
                try:
                    table = self.memory.view(addr, length)
                except GuestMemoryError:
                    raise QueueError(CHAIN_ERRORS["indirect_ram"].format(addr, length)) from None
                # §2.7.5.3.2: an indirect table's chain starts at its entry 0 and, like any
                # chain, visits each entry at most once.
                table_len, index, in_indirect, steps_left = entries, 0, True, entries
                continue
            if length:
                # §2.7.4.2: "The driver MUST place any device-writable descriptor elements
                # after any device-readable descriptor elements."
                if flags & VIRTQ_DESC_F_WRITE:
                    target, views = writable, w_views
                elif writable:
                    raise QueueError(CHAIN_ERRORS["order"])
                else:
                    target, views = readable, r_views
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise QueueError(CHAIN_ERRORS["bytes"])
                try:
                    views.append(self.memory.view(addr, length))
                except GuestMemoryError:
                    raise QueueError(CHAIN_ERRORS["buffer_ram"].format(addr, length)) from None
                target.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            # §2.7.5: next indexes the same table; outside it there is no descriptor.
            if nxt >= table_len:
                raise QueueError(CHAIN_ERRORS["next"].format(nxt, table_len))
            index = nxt
        return DescriptorChain(head, tuple(readable), tuple(writable), tuple(r_views), tuple(w_views))

    # -- used ring ----------------------------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Return chain `head` to the driver with `length` bytes written (§2.7.8)."""
        slot = self.used_idx % self.size
        # The element first, then idx: the driver reads the element only once idx covers it.
        _USED_ELEM.pack_into(self._used, 4 + USED_ELEM_SIZE * slot, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.used_idx)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added since the last one.

        §2.7.10 with EVENT_IDX: notify iff used_event lies in (old, new]; without it, unless the
        driver set VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7).
        """
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        self.signalled_used = new
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
