"""Per-device statistics kept by the core: register-read latency and counters that survive restarts.

`LatencyReservoir`: the last `size` samples in a ring (a deque append per read: cheap enough for
the vCPU path) plus an exact count and maximum; percentiles are computed only when asked.

`DeviceCounters`: a device process counts its own requests and bytes, and loses them when it
dies.  The core keeps the last counters each incarnation reported and adds those of the dead ones
to a base, so totals only lose what a process counted since its last report (polled about once a
second by the supervisor).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

# Unified names for `bulkhead stats`, summed from each device type's own counters.
REQUEST_KEYS = ("requests", "chains")
BYTE_KEYS = ("bytes", "bytes_read", "bytes_written", "tx_bytes", "rx_bytes")
ERROR_KEYS = ("errors", "malformed", "queue_errors", "unsupported")
THROTTLE_KEYS = ("throttled", "throttled_tx", "throttled_rx")  # requests a rate limiter held back


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


class LatencyReservoir:
    def __init__(self, size: int = 4096) -> None:
        self._samples: collections.deque[int] = collections.deque(maxlen=size)
        self.count = 0
        self.max_ns = 0

    def add(self, ns: int) -> None:
        # deque.append is atomic under the GIL; count/max may race between vCPUs by one sample.
        self._samples.append(ns)
        self.count += 1
        if ns > self.max_ns:
            self.max_ns = ns

    def summary_us(self) -> dict[str, Any]:
        s = sorted(self._samples)
        us = lambda v: None if v is None else round(v / 1000, 1)  # noqa: E731
        return {"count": self.count, "p50": us(percentile(s, 0.5)), "p90": us(percentile(s, 0.9)),
                "p99": us(percentile(s, 0.99)), "max": us(self.max_ns) if self.count else None}


class DeviceCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: collections.Counter[str] = collections.Counter()
        self._current: dict[str, int] = {}
        self._generation = 0
        self.last_request_id = 0

    def update(self, generation: int, request_id: int, counters: dict[str, int]) -> None:
        with self._lock:
            if generation != self._generation:
                self._base.update(self._current)  # the previous incarnation's last report
                self._generation = generation
            self._current = {k: v for k, v in counters.items() if isinstance(v, int)}
            self.last_request_id = request_id

    def totals(self) -> dict[str, int]:
        with self._lock:
            total = collections.Counter(self._base)
            total.update(self._current)
        return dict(total)

    def summary(self) -> dict[str, Any]:
        t = self.totals()
        # blk and rng count requests; the console only counts descriptor chains.
        requests = next((t[k] for k in REQUEST_KEYS if k in t), 0)
        return {"requests": requests,
                "bytes": sum(t.get(k, 0) for k in BYTE_KEYS),
                "errors": sum(t.get(k, 0) for k in ERROR_KEYS),
                "throttled": sum(t.get(k, 0) for k in THROTTLE_KEYS), "device": t}
