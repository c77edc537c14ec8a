"""Which chains of a split virtqueue a vhost-user backend holds, learnt by watching the rings.

A backend without INFLIGHT_SHMFD (qemu-storage-daemon 7.2) that dies takes with it the list of
requests it had taken and not completed, and it completes out of order: resuming a fresh backend
at the used index (QEMU's way) re-runs chains that already completed -- whose descriptors the
guest may have reused for another request -- and forgets older ones still outstanding.  The core
cannot ask a dead backend, but the rings are in guest memory it maps.

`RingWatch` samples both rings of one queue (the core's watcher thread calls `sample` about
every millisecond): every head made available joins `outstanding`, in avail order; every head
the backend put in the used ring leaves it.  The used index is read *before* the available
index, so a completion seen in a sample always belongs to an available entry seen in the same
or an earlier one.  Between two samples each ring may advance by at most its size; more means
entries were overwritten unseen and the watch is no longer `exact` (counted, and reported: the
resume then falls back to the used index).

`resubmit_layout` is the recovery: the driver's outstanding requests number exactly
avail_idx - used_idx, so they fit the avail slots [used_idx, avail_idx) -- slots the driver has
already published and never reads back, disjoint from the ones it is filling now.  Writing the
outstanding heads there, oldest first, and starting the new backend at the used index makes it
run each outstanding request once and nothing else.

Sans-I/O: the reads are callables, so unit tests drive it with plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

U16 = 0x10000


@dataclass
class RingWatch:
    size: int
    avail_pos: int = 0           # the next available position not yet seen (mod 2^16)
    used_pos: int = 0            # the next used position not yet seen
    # Per head: publications minus completions seen, and where it was last published.  Within
    # one sample the order of the two rings' events is unknown (a head may complete and be
    # published again between two looks), so counts, not a set: a head is outstanding when
    # its count is 1, and a correct driver and backend never leave another value at rest.
    counts: dict[int, int] = field(default_factory=dict)
    last_pos: dict[int, int] = field(default_factory=dict)
    exact: bool = True
    strays: int = 0              # completions of heads that were not outstanding

    def reset(self, avail_idx: int = 0, used_idx: int = 0,
              outstanding: list[int] | None = None) -> None:
        """A fresh ring (guest reset, or a ring programmed at these indices), with the heads a
        backend resumed at `used_idx` will take as the ones outstanding, oldest first."""
        self.avail_pos, self.used_pos = avail_idx & 0xFFFF, used_idx & 0xFFFF
        self.counts.clear()
        self.last_pos.clear()
        for i, head in enumerate(outstanding or ()):
            self.counts[head] = self.counts.get(head, 0) + 1
            self.last_pos[head] = (used_idx + i) % U16
        self.exact = True
        self.strays = 0

    @property
    def outstanding(self) -> dict[int, int]:
        """head -> avail position of the outstanding heads, oldest publication first."""
        heads = sorted((h for h, n in self.counts.items() if n == 1),
                       key=lambda h: (self.last_pos[h] - self.avail_pos) % U16)
        return {h: self.last_pos[h] for h in heads}

    def sample(self, used_idx: Callable[[], int], avail_idx: Callable[[], int],
               avail_entry: Callable[[int], int], used_id: Callable[[int], int]) -> None:
        """Catch up with both rings.  `avail_entry(slot)` / `used_id(slot)` read ring slots."""
        used_now = used_idx() & 0xFFFF
        avail_now = avail_idx() & 0xFFFF
        new_avail = (avail_now - self.avail_pos) % U16
        if new_avail > self.size:
            self.exact = False  # more than a ring's worth since the last look: some unseen
            new_avail = self.size
            self.avail_pos = (avail_now - self.size) % U16
        for i in range(new_avail):
            pos = (self.avail_pos + i) % U16
            head = avail_entry(pos % self.size)
            if head >= self.size:
                self.strays += 1
                continue
            self.counts[head] = self.counts.get(head, 0) + 1
            self.last_pos[head] = pos
        self.avail_pos = avail_now
        new_used = (used_now - self.used_pos) % U16
        if new_used > self.size:
            self.exact = False
            new_used = self.size
            self.used_pos = (used_now - self.size) % U16
        for i in range(new_used):
            head = used_id((self.used_pos + i) % U16 % self.size)
            n = self.counts.get(head, 0)
            if n <= 0:
                self.strays += 1
                continue
            if n == 1:
                del self.counts[head]
            else:
                self.counts[head] = n - 1
        self.used_pos = used_now

    def pending(self, avail_idx: int, used_idx: int) -> int:
        return (avail_idx - used_idx) % U16

    def consistent(self, avail_idx: int, used_idx: int) -> bool:
        """The watch accounts for every request the driver is waiting for, and for no other."""
        return (self.exact and not self.strays and all(n == 1 for n in self.counts.values())
                and len(self.counts) == self.pending(avail_idx, used_idx))

    def resubmit_layout(self, used_idx: int) -> list[tuple[int, int]]:
        """(avail slot, head) writes that put the outstanding heads, oldest first, at the
        positions [used_idx, used_idx + n); the watch is renumbered to match."""
        heads = list(self.outstanding)
        writes = [(((used_idx + i) % U16) % self.size, h) for i, h in enumerate(heads)]
        for i, h in enumerate(heads):
            self.last_pos[h] = (used_idx + i) % U16
        return writes
