"""The Bus: an ordered map of address ranges to `BusDevice`s (rust-vmm vm-device, crosvm).

It knows nothing of KVM, IPC or devices: `insert` rejects overlaps, `lookup` finds the range
containing an address.  A proxy for a device process is just another `BusDevice`.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from .errors import BusError

log = logging.getLogger(__name__)


@runtime_checkable
class BusDevice(Protocol):
    """A device on a bus.  `offset` is relative to the base of the range it was inserted at."""

    def read(self, offset: int, data: bytearray) -> None:
        """Fill `data` (1, 2, 4 or 8 bytes) with the value at `offset`."""

    def write(self, offset: int, data: bytes) -> None:
        """Accept `data` written at `offset`."""


D = TypeVar("D")


@dataclass(frozen=True, order=True)
class BusRange:
    base: int
    size: int

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise BusError(f"bus range at {self.base:#x} has size {self.size}: it must be positive")
        if self.base < 0:
            raise BusError(f"bus range base {self.base:#x} is negative")

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.size

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.end

    def overlaps(self, other: "BusRange") -> bool:
        return self.base < other.end and other.base < self.end


class Bus(Generic[D]):
    """Ranges kept sorted by base; lookups are a bisection."""

    def __init__(self, name: str = "bus") -> None:
        self.name = name
        self._bases: list[int] = []
        self._entries: list[tuple[BusRange, D]] = []
        self._unclaimed_last_log = 0.0
        self._unclaimed_suppressed = 0
        self.unclaimed_count = 0

    def insert(self, device: D, base: int, size: int) -> BusRange:
        rng = BusRange(base, size)
        i = bisect.bisect_left(self._bases, base)
        for j in (i - 1, i):
            if 0 <= j < len(self._entries) and self._entries[j][0].overlaps(rng):
                other = self._entries[j][0]
                raise BusError(f"{self.name}: range {base:#x}+{size:#x} overlaps "
                               f"{other.base:#x}+{other.size:#x}")
        self._bases.insert(i, base)
        self._entries.insert(i, (rng, device))
        return rng

    def remove(self, base: int) -> D:
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise BusError(f"{self.name}: no range starts at {base:#x}")
        del self._bases[i]
        return self._entries.pop(i)[1]

    def lookup(self, addr: int) -> tuple[BusRange, D] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            rng, dev = self._entries[i]
            if rng.contains(addr):
                return rng, dev
        return None

    def __iter__(self):
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    # -- dispatch -----------------------------------------------------------------------------
    def read(self, addr: int, data: bytearray) -> bool:
        """Dispatch a read; an unclaimed address reads as all-ones and returns False."""
        found = self.lookup(addr)
        if found is None:
            data[:] = b"\xff" * len(data)
            self._unclaimed("read", addr, len(data))
            return False
        rng, dev = found
        dev.read(addr - rng.base, data)  # type: ignore[attr-defined]
        return True

    def write(self, addr: int, data: bytes) -> bool:
        """Dispatch a write; an unclaimed write is dropped and returns False."""
        found = self.lookup(addr)
        if found is None:
            self._unclaimed("write", addr, len(data))
            return False
        rng, dev = found
        dev.write(addr - rng.base, data)  # type: ignore[attr-defined]
        return True

    def _unclaimed(self, kind: str, addr: int, size: int) -> None:
        # Rate-limited: a guest probing ports must not flood the log.
        self.unclaimed_count += 1
        now = time.monotonic()
        if now - self._unclaimed_last_log >= 1.0:
            extra = f" ({self._unclaimed_suppressed} more suppressed)" if self._unclaimed_suppressed else ""
            log.info("%s: unclaimed %s of %d bytes at %#x%s", self.name, kind, size, addr, extra)
            self._unclaimed_last_log = now
            self._unclaimed_suppressed = 0
        else:
            self._unclaimed_suppressed += 1
