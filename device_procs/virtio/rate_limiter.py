"""Token-bucket rate limiting for device queues (Firecracker's model), pure logic.

A `RateLimiter` holds up to two `TokenBucket`s: bandwidth (tokens are bytes) and operations
(tokens are requests).  Each bucket has a `size` (tokens when full), a `refill_time_ms` (time to
refill from empty to full, at a constant rate) and a `one_time_burst` (extra tokens spent first,
once, never refilled: a VM may boot faster than its steady rate).  A bucket starts full.

Two ways to pay:
- `try_consume(nbytes)`: all or nothing, for requests whose size is known before they run (net
  transmit, blk).  A request larger than a bucket is let through when the bucket is full and
  leaves it in debt, which is repaid by refilling before anything else passes; otherwise such a
  request could never run.
- `ready()` then `charge(nbytes)`: pay after the fact, for requests whose size is only known once
  done (net receive: the frame size is known after the tap read into guest buffers).  `ready()`
  is true while no bucket is empty or in debt; `charge` may drive a bucket into debt.
Either way the long-run rate is the bucket's.  When a request must wait, `deadline_ns()` says
when to try again, so a device loop can sleep on a timer instead of polling.

Time is integer nanoseconds from an injectable clock (`time.monotonic_ns` by default), so tests
drive it with a fake clock and refills are exact (no float drift).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import DeviceSpecError

Clock = Callable[[], int]  # nanoseconds, monotonic

NS_PER_MS = 1_000_000
# Sanity bounds for a spec: a refill time of more than a day, or a bucket beyond 2^48 tokens, is
# a typo, not a policy.
MAX_REFILL_TIME_MS = 24 * 3600 * 1000
MAX_TOKENS = 1 << 48


@dataclass(frozen=True)
class BucketConfig:
    """One bucket's parameters, as given in a device spec (Firecracker's field names)."""

    size: int
    refill_time_ms: int
    one_time_burst: int = 0

    def __post_init__(self) -> None:
        for name, value, low in (("size", self.size, 1), ("refill_time_ms", self.refill_time_ms, 1),
                                 ("one_time_burst", self.one_time_burst, 0)):
            if type(value) is not int or value < low:
                raise DeviceSpecError(f"rate limiter bucket field {name!r} must be an integer "
                                      f">= {low}, not {value!r}")
        if self.size > MAX_TOKENS or self.one_time_burst > MAX_TOKENS:
            raise DeviceSpecError(f"rate limiter bucket is larger than {MAX_TOKENS} tokens")
        if self.refill_time_ms > MAX_REFILL_TIME_MS:
            raise DeviceSpecError(f"rate limiter refill_time_ms {self.refill_time_ms} is more than a day")

    @classmethod
    def parse(cls, text: str, what: str) -> "BucketConfig":
        """`SIZE/REFILL_MS[/BURST]`, e.g. `1048576/100` (1 MiB per 100 ms): the form a device
        flag carries (`--net tx_bandwidth=1048576/100`)."""
        parts = text.split("/") if isinstance(text, str) else []
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise DeviceSpecError(f"rate limit {what}={text!r}: give SIZE/REFILL_MS[/BURST] "
                                  "in tokens and milliseconds, e.g. 1048576/100")
        return cls(*numbers)

    @classmethod
    def from_spec(cls, spec: Any, what: str) -> "BucketConfig":
        if not isinstance(spec, dict):
            raise DeviceSpecError(f"rate limiter {what!r} must be a table of size, refill_time_ms "
                                  f"and optional one_time_burst, not {type(spec).__name__}")
        unknown = set(spec) - {"size", "refill_time_ms", "one_time_burst"}
        if unknown:
            raise DeviceSpecError(f"rate limiter {what!r} has unknown field(s) {sorted(unknown)}")
        for key in ("size", "refill_time_ms"):
            if key not in spec:
                raise DeviceSpecError(f"rate limiter {what!r} is missing {key!r}")
        return cls(spec["size"], spec["refill_time_ms"], spec.get("one_time_burst", 0))


class TokenBucket:
    """Tokens refilled at `size` per `refill_time_ms`; the budget may go negative (debt)."""

    def __init__(self, config: BucketConfig, now_ns: int) -> None:
        self.size = config.size
        self.refill_ns = config.refill_time_ms * NS_PER_MS
        self.burst = config.one_time_burst
        self.budget = config.size
        self._last_ns = now_ns
        # Fraction of a token earned but not yet credited, as a numerator over refill_ns: the
        # refill is budget += (elapsed * size + carry) // refill_ns, exactly.
        self._carry = 0

    def refill(self, now_ns: int) -> None:
        elapsed = now_ns - self._last_ns
        if elapsed <= 0:
            return  # a clock that did not move (or went back) earns nothing
        self._last_ns = now_ns
        if self.budget >= self.size:
            self._carry = 0
            return
        earned, self._carry = divmod(elapsed * self.size + self._carry, self.refill_ns)
        self.budget += earned
        if self.budget >= self.size:
            self.budget, self._carry = self.size, 0

    def _deficit(self, tokens: int) -> int:
        """Tokens still missing before `tokens` may be taken (0: now)."""
        if tokens > self.size:
            # Larger than the bucket: wait until it is full, then let it go into debt.
            return max(self.size - self.budget, 0)
        return max(tokens - self.burst - self.budget, 0)

    def can_take(self, tokens: int) -> bool:
        return self._deficit(tokens) == 0

    def take(self, tokens: int) -> None:
        """Consume `tokens` unconditionally: the one-time burst first, then the budget."""
        from_burst = min(self.burst, tokens)
        self.burst -= from_burst
        self.budget -= tokens - from_burst

    def wait_ns(self, tokens: int) -> int:
        """Nanoseconds from the last refill until `can_take(tokens)` holds."""
        deficit = self._deficit(tokens)
        if deficit == 0:
            return 0
        # Smallest t with (t * size + carry) // refill_ns >= deficit.
        need = deficit * self.refill_ns - self._carry
        return max(-(-need // self.size), 1)


class RateLimiter:
    """Bandwidth and/or ops buckets sharing one clock; counts what it throttled."""

    def __init__(self, bandwidth: BucketConfig | None = None, ops: BucketConfig | None = None, *,
                 clock: Clock = time.monotonic_ns) -> None:
        self.clock = clock
        now = clock()
        self.bandwidth = TokenBucket(bandwidth, now) if bandwidth else None
        self.ops = TokenBucket(ops, now) if ops else None
        self._blocked_until: int | None = None
        self.throttled = 0  # requests that had to wait (one per refusal)

    @classmethod
    def from_spec(cls, spec: Any, *, clock: Clock = time.monotonic_ns) -> "RateLimiter | None":
        """{"bandwidth": {...}, "ops": {...}} (either optional); None or {} means no limit."""
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise DeviceSpecError(f"rate limiter spec must be a table with 'bandwidth' and/or 'ops', "
                                  f"not {type(spec).__name__}")
        unknown = set(spec) - {"bandwidth", "ops"}
        if unknown:
            raise DeviceSpecError(f"rate limiter spec has unknown field(s) {sorted(unknown)}; "
                                  "known: bandwidth, ops")
        bandwidth = BucketConfig.from_spec(spec["bandwidth"], "bandwidth") if "bandwidth" in spec else None
        ops = BucketConfig.from_spec(spec["ops"], "ops") if "ops" in spec else None
        return cls(bandwidth, ops, clock=clock) if bandwidth or ops else None

    @classmethod
    def from_fields(cls, bandwidth: str | None, ops: str | None, *, what: str = "",
                    clock: Clock = time.monotonic_ns) -> "RateLimiter | None":
        """From the two flat spec fields (`BucketConfig.parse` form); None if neither is set."""
        bw = BucketConfig.parse(bandwidth, f"{what}bandwidth") if bandwidth else None
        op = BucketConfig.parse(ops, f"{what}ops") if ops else None
        return cls(bw, op, clock=clock) if bw or op else None

    def _refilled(self, nbytes: int, ops: int) -> tuple[int, list[tuple[TokenBucket, int]]]:
        """The time now and (bucket, tokens wanted) for each bucket, refilled up to now."""
        now = self.clock()
        pairs = [(b, n) for b, n in ((self.bandwidth, nbytes), (self.ops, ops)) if b is not None]
        for bucket, _ in pairs:
            bucket.refill(now)
        return now, pairs

    def _admit(self, nbytes: int, ops: int, *, take: bool) -> bool:
        now, pairs = self._refilled(nbytes, ops)
        if not all(bucket.can_take(n) for bucket, n in pairs):
            self._blocked_until = now + max(bucket.wait_ns(n) for bucket, n in pairs)
            self.throttled += 1
            return False
        if take:
            for bucket, n in pairs:
                bucket.take(n)
        self._blocked_until = None
        return True

    def try_consume(self, nbytes: int, ops: int = 1) -> bool:
        """Take `nbytes` bandwidth and `ops` operation tokens, or nothing and set a deadline."""
        return self._admit(nbytes, ops, take=True)

    def ready(self) -> bool:
        """True if a request of unknown size may start (no bucket empty or in debt)."""
        return self._admit(1, 1, take=False)

    def charge(self, nbytes: int, ops: int = 1) -> None:
        """Pay for a request already done; may leave a bucket in debt."""
        for bucket, n in self._refilled(nbytes, ops)[1]:
            bucket.take(n)

    def deadline_ns(self) -> int | None:
        """When the last refused request may succeed, or None if nothing is waiting."""
        return self._blocked_until

    def stats(self) -> dict[str, int]:
        out = {"throttled": self.throttled}
        for name, bucket in (("bandwidth", self.bandwidth), ("ops", self.ops)):
            if bucket is not None:
                out[f"{name}_budget"] = max(bucket.budget, 0)
        return out
