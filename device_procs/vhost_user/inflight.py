"""Inflight I/O tracking for split virtqueues (vhost-user spec, "Inflight I/O tracking").

The backend records, in a shared buffer the frontend keeps across backend restarts, which chains
it has taken from the available ring and not yet returned.  A fresh backend that receives the
buffer again (SET_INFLIGHT_FD after a crash) resubmits those chains, in the order they were
taken, and continues the available ring after them.

Layout, one region per queue, each `region_size(queue_size)` bytes (we choose the size: the
frontend only stores the fd and the description we return)::

    QueueRegionSplit  u64 features (0) | u16 version (1; 0 = not initialised) | u16 desc_num
                      | u16 last_batch_head | u16 used_idx                              16 bytes
    DescStateSplit[desc_num]  u8 inflight | 5 bytes padding | u16 next | u64 counter    16 bytes each

Everything in the buffer is frontend-writable, so every value read back is range-checked (heads
below the queue size, inflight 0 or 1, batch walks bounded); a corrupt buffer can at worst make us
resubmit chains that then fail the ordinary chain checks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from device_procs.virtio.queue import Queue

from .errors import VhostUserError

REGION_HEADER = struct.Struct("=QHHHH")
DESC_STATE = struct.Struct("=B5xHQ")
INFLIGHT_VERSION = 1
ALIGNMENT = 64
_VERSION_OFFSET, _USED_IDX_OFFSET, _LAST_BATCH_OFFSET = 8, 14, 12


def region_size(queue_size: int) -> int:
    """Bytes of one queue's region, rounded up to a cache line."""
    raw = REGION_HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def buffer_size(num_queues: int, queue_size: int) -> int:
    return num_queues * region_size(queue_size)


@dataclass
class Recovery:
    """What a region says after a restart: chains to resubmit (oldest first), the next counter."""

    resubmit: list[int]
    next_counter: int

    @property
    def inflight(self) -> int:
        return len(self.resubmit)


class InflightRegion:
    """One queue's region in the (mapped) inflight buffer."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < region_size(queue_size):
            raise VhostUserError(f"inflight region of {len(view)} bytes is too small for "
                                 f"{queue_size} descriptors")
        self.view = view
        self.queue_size = queue_size

    @property
    def version(self) -> int:
        return struct.unpack_from("=H", self.view, _VERSION_OFFSET)[0]

    def initialise(self, ring_size: int, used_idx: int) -> None:
        """A fresh region: no chain in flight, version 1, in step with the ring's used idx (so
        that a crash before the first completion is not mistaken for a split batch)."""
        self.view[:region_size(self.queue_size)] = bytes(region_size(self.queue_size))
        REGION_HEADER.pack_into(self.view, 0, 0, INFLIGHT_VERSION, ring_size, 0, used_idx)

    def clear(self) -> None:
        """Forget everything (a driver reset: nothing must be resubmitted)."""
        self.view[:region_size(self.queue_size)] = bytes(region_size(self.queue_size))

    def _desc(self, head: int) -> tuple[int, int, int]:
        return DESC_STATE.unpack_from(self.view, REGION_HEADER.size + DESC_STATE.size * head)

    def _set_desc(self, head: int, inflight: int, nxt: int, counter: int) -> None:
        DESC_STATE.pack_into(self.view, REGION_HEADER.size + DESC_STATE.size * head,
                             inflight, nxt, counter)

    # -- the two tracking steps ---------------------------------------------------------------
    def taken(self, head: int, counter: int) -> None:
        """A chain left the available ring: remember it and its age."""
        _, nxt, _ = self._desc(head)
        self._set_desc(head, 1, nxt, counter & 0xFFFF_FFFF_FFFF_FFFF)

    def before_used(self, head: int) -> None:
        """About to return `head` (a batch of one): link it as the last batch."""
        inflight, _, counter = self._desc(head)
        last = struct.unpack_from("=H", self.view, _LAST_BATCH_OFFSET)[0]
        self._set_desc(head, inflight, last, counter)
        struct.pack_into("=H", self.view, _LAST_BATCH_OFFSET, head)

    def after_used(self, head: int, used_idx: int) -> None:
        """The used ring's idx now covers `head`: it is no longer in flight."""
        _, nxt, counter = self._desc(head)
        self._set_desc(head, 0, nxt, counter)
        struct.pack_into("=H", self.view, _USED_IDX_OFFSET, used_idx)

    # -- after a restart --------------------------------------------------------------------------
    def recover(self, ring_used_idx: int, ring_size: int) -> Recovery:
        """Repair the last batch if the crash split it, then list the chains still in flight."""
        if ring_size > self.queue_size:
            raise VhostUserError(f"ring of {ring_size} entries is larger than its inflight region "
                                 f"({self.queue_size})")
        _, _, _, last_batch, used_idx = REGION_HEADER.unpack_from(self.view, 0)
        if used_idx != ring_used_idx:
            # The used idx moved past entries still marked in flight: clear that batch.
            head = last_batch
            for _ in range(min((ring_used_idx - used_idx) & 0xFFFF, ring_size)):
                if head >= ring_size:
                    break
                _, nxt, counter = self._desc(head)
                self._set_desc(head, 0, nxt, counter)
                head = nxt
            struct.pack_into("=H", self.view, _USED_IDX_OFFSET, ring_used_idx)
        # Only heads below the ring size can be chains; entries beyond it are ignored.
        found: list[tuple[int, int]] = []
        for head in range(ring_size):
            inflight, _, counter = self._desc(head)
            if inflight not in (0, 1):
                raise VhostUserError(f"inflight region entry {head} holds {inflight}, not 0 or 1")
            if inflight:
                found.append((counter, head))
        found.sort()
        next_counter = found[-1][0] + 1 if found else 0
        return Recovery([head for _, head in found], next_counter)


class InflightQueue(Queue):
    """A `Queue` that records taken and returned chains in an `InflightRegion`, and after a
    restart hands out the recovered chains before new ones."""

    def __init__(self, *args: object, region: InflightRegion, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.region = region
        self.resubmit: list[int] = []
        self.counter = 0

    def resume_from(self, recovery: Recovery) -> None:
        """Continue after a restart: every chain taken is either returned (covered by the used
        idx) or in flight, so the available ring continues after both; the chains in flight
        are handed out again first, oldest first."""
        self.resubmit = list(recovery.resubmit)
        self.counter = recovery.next_counter
        self.next_avail = (self.used_idx + recovery.inflight) & 0xFFFF
        self.signalled_used = self.used_idx

    def take(self) -> int | None:
        if self.resubmit:
            return self.resubmit.pop(0)
        head = super().take()
        if head is not None and head < self.size:  # an out-of-range head fails in parse_chain
            self.region.taken(head, self.counter)
            self.counter += 1
        return head

    def pending(self) -> int:
        return len(self.resubmit) + super().pending()

    def add_used(self, head: int, length: int) -> None:
        self.region.before_used(head)
        super().add_used(head, length)
        self.region.after_used(head, self.used_idx)
