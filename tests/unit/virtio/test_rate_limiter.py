"""Token buckets and the rate limiter (device_procs/virtio/rate_limiter.py), with a fake clock."""

from __future__ import annotations

import pytest

from device_procs.virtio.errors import DeviceSpecError
from device_procs.virtio.rate_limiter import NS_PER_MS, BucketConfig, RateLimiter, TokenBucket


class FakeClock:
    def __init__(self, start_ns: int = 10**12) -> None:
        self.now = start_ns

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * NS_PER_MS)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limiter(clock, bandwidth=None, ops=None) -> RateLimiter:
    return RateLimiter(BucketConfig(*bandwidth) if bandwidth else None,
                       BucketConfig(*ops) if ops else None, clock=clock)


def test_bucket_starts_full_then_refuses_with_a_deadline(clock):
    rl = limiter(clock, bandwidth=(1000, 1000))  # 1000 bytes per second
    assert rl.try_consume(1000)
    assert rl.deadline_ns() is None
    assert not rl.try_consume(1)
    # One byte takes 1 ms to earn at 1000 B/s.
    assert rl.deadline_ns() == clock.now + NS_PER_MS
    assert rl.throttled == 1


def test_refill_is_exact_and_capped(clock):
    rl = limiter(clock, bandwidth=(1000, 1000))
    assert rl.try_consume(1000)
    clock.advance_ms(100)
    assert not rl.try_consume(101)
    assert rl.try_consume(100)
    clock.advance_ms(10_000)  # far more than a refill: the bucket holds `size`, not more
    assert rl.try_consume(1000)
    assert not rl.try_consume(1)


def test_fractional_tokens_are_carried(clock):
    bucket = TokenBucket(BucketConfig(3, 1000), clock())
    bucket.take(3)
    for _ in range(333):  # 333 ms earns 0.999 of a token, one millisecond at a time
        clock.advance_ms(1)
        bucket.refill(clock())
    assert bucket.budget == 0 and not bucket.can_take(1)
    clock.advance_ms(1)
    bucket.refill(clock())
    assert bucket.budget == 1


def test_wait_ns_accounts_for_the_carry(clock):
    bucket = TokenBucket(BucketConfig(3, 1000), clock())
    bucket.take(3)
    clock.advance_ms(200)  # 0.6 of a token earned
    bucket.refill(clock())
    wait = bucket.wait_ns(1)
    clock.now += wait - 1
    bucket.refill(clock())
    assert not bucket.can_take(1)
    clock.now += 1
    bucket.refill(clock())
    assert bucket.can_take(1)


def test_one_time_burst_is_spent_first_and_never_refilled(clock):
    rl = limiter(clock, bandwidth=(100, 1000, 500))
    assert rl.try_consume(550)  # 500 from the burst, 50 from the bucket
    assert rl.bandwidth.burst == 0 and rl.bandwidth.budget == 50
    clock.advance_ms(5000)
    assert rl.try_consume(100)
    assert not rl.try_consume(1)


def test_refused_request_takes_nothing(clock):
    rl = limiter(clock, bandwidth=(100, 1000, 50))
    rl.bandwidth.budget = 20
    assert not rl.try_consume(80)  # 50 of burst + 20 is not enough: the burst stays whole
    assert rl.bandwidth.burst == 50 and rl.bandwidth.budget == 20
    assert rl.try_consume(70)


def test_request_larger_than_the_bucket_goes_into_debt(clock):
    rl = limiter(clock, bandwidth=(1000, 1000))
    assert rl.try_consume(1500)  # full bucket: let through, 500 bytes of debt
    assert rl.bandwidth.budget == -500
    assert not rl.try_consume(1)
    # The debt (500) and then one token: 501 ms at 1 B/ms.
    assert rl.deadline_ns() == clock.now + 501 * NS_PER_MS
    clock.advance_ms(500)
    assert not rl.try_consume(1)
    clock.advance_ms(1)
    assert rl.try_consume(1)


def test_oversized_request_waits_for_a_full_bucket(clock):
    rl = limiter(clock, bandwidth=(1000, 1000))
    assert rl.try_consume(400)
    assert not rl.try_consume(5000)
    assert rl.deadline_ns() == clock.now + 400 * NS_PER_MS
    clock.advance_ms(400)
    assert rl.try_consume(5000)


def test_bandwidth_and_ops_are_taken_together_or_not_at_all(clock):
    rl = limiter(clock, bandwidth=(10_000, 1000), ops=(2, 1000))
    assert rl.try_consume(100) and rl.try_consume(100)
    assert not rl.try_consume(100)  # out of ops
    assert rl.bandwidth.budget == 9800  # the refused request did not pay for bandwidth
    assert rl.deadline_ns() == clock.now + 500 * NS_PER_MS  # one op per 500 ms
    clock.advance_ms(500)
    assert rl.try_consume(100)


def test_deadline_is_the_later_bucket(clock):
    rl = limiter(clock, bandwidth=(1000, 1000), ops=(10, 1000))
    assert rl.try_consume(1000)
    assert not rl.try_consume(200)  # bandwidth needs 200 ms; ops has tokens
    assert rl.deadline_ns() == clock.now + 200 * NS_PER_MS


def test_post_paid_ready_then_charge(clock):
    rl = limiter(clock, bandwidth=(1000, 1000))
    assert rl.ready()
    rl.charge(3000)  # the request turned out large: debt
    assert not rl.ready()
    assert rl.deadline_ns() == clock.now + 2001 * NS_PER_MS
    clock.advance_ms(2001)
    assert rl.ready()
    assert rl.deadline_ns() is None


def test_clock_going_back_earns_nothing(clock):
    rl = limiter(clock, bandwidth=(1000, 1000))
    assert rl.try_consume(1000)
    clock.advance_ms(-500)
    assert not rl.try_consume(1)
    clock.advance_ms(501)  # only time after the last refill counts
    assert rl.try_consume(1)


def test_long_run_rate(clock):
    """Greedy consumer for 10 s: what passes is the rate times the time plus the full bucket."""
    rl = limiter(clock, bandwidth=(64_000, 100), ops=(1000, 1000))  # 640 kB/s, 1000 ops/s
    sent = 0
    end = clock.now + 10_000 * NS_PER_MS
    while clock.now < end:
        if rl.try_consume(1500):
            sent += 1500
        else:
            clock.now = min(rl.deadline_ns(), end)
    expected = 640_000 * 10 + 64_000
    assert expected - 1500 <= sent <= expected + 1500


def test_ops_only_limit(clock):
    rl = limiter(clock, ops=(5, 1000))
    assert all(rl.try_consume(10**9) for _ in range(5))  # bytes are free without a bandwidth bucket
    assert not rl.try_consume(0)


def test_from_spec(clock):
    assert RateLimiter.from_spec(None) is None
    assert RateLimiter.from_spec({}) is None
    rl = RateLimiter.from_spec({"bandwidth": {"size": 100, "refill_time_ms": 10, "one_time_burst": 5},
                                "ops": {"size": 2, "refill_time_ms": 1}}, clock=clock)
    assert rl is not None and rl.bandwidth.size == 100 and rl.bandwidth.burst == 5 and rl.ops.size == 2
    assert rl.stats() == {"throttled": 0, "bandwidth_budget": 100, "ops_budget": 2}


@pytest.mark.parametrize("spec,match", [
    ([1], "table"),
    ({"bandwith": {}}, "unknown"),
    ({"bandwidth": 5}, "bandwidth"),
    ({"bandwidth": {"size": 1}}, "refill_time_ms"),
    ({"ops": {"size": 0, "refill_time_ms": 1}}, "size"),
    ({"ops": {"size": True, "refill_time_ms": 1}}, "size"),
    ({"ops": {"size": 1, "refill_time_ms": -1}}, "refill_time_ms"),
    ({"ops": {"size": 1, "refill_time_ms": 1, "one_time_burst": -1}}, "one_time_burst"),
    ({"ops": {"size": 1, "refill_time_ms": 1, "burst": 1}}, "unknown"),
    ({"ops": {"size": 1, "refill_time_ms": 10**12}}, "day"),
])
def test_bad_specs_are_named(spec, match):
    with pytest.raises(DeviceSpecError, match=match):
        RateLimiter.from_spec(spec)


def test_flat_fields(clock):
    assert RateLimiter.from_fields(None, "") is None
    rl = RateLimiter.from_fields("1048576/100", "1000/1000/50", clock=clock)
    assert rl is not None and (rl.bandwidth.size, rl.bandwidth.refill_ns) == (1048576, 100 * NS_PER_MS)
    assert (rl.ops.size, rl.ops.burst) == (1000, 50)


@pytest.mark.parametrize("text", ["100", "a/b", "1/2/3/4", "0/100", "100/0", "-1/5", "1.5/100", ""])
def test_flat_field_errors(text):
    with pytest.raises(DeviceSpecError, match="tx_bandwidth|size|refill|SIZE"):
        RateLimiter.from_fields(text or "x", None, what="tx_")


# -- blk with a limiter (BlkDevice(rate_limiter=...)) ------------------------------------------
def blk_with_limiter(memory, image, clock, **buckets):
    from device_procs.testing.local import LocalHarness
    from device_procs.virtio.blk import BlkDevice
    rl = limiter(clock, **buckets)
    h = LocalHarness(BlkDevice(image, rate_limiter=rl), memory)
    h.driver.init()
    return h


def blk_reads(h, count: int):
    """Queue `count` one-sector reads and kick once; the queue."""
    from device_procs.virtio import blk as b
    q = h.driver.queue(0)
    for sector in range(count):
        q.add([b.HEADER.pack(b.VIRTIO_BLK_T_IN, 0, sector)], [512, 1])
    q.kick()
    return q


def test_blk_throttles_and_resumes_on_the_timer(memory, image, clock):
    h = blk_with_limiter(memory, image, clock, ops=(2, 1000))
    q = blk_reads(h, 3)
    assert len(q.get_used()) == 2  # the third waits for an op token
    dev = h.device
    assert dev.counters["throttled"] == 1 and 0 in dev.held
    deadline = h.mmio.next_deadline_ns()
    assert deadline == clock.now + 500 * NS_PER_MS
    q.kick()  # a kick while throttled takes nothing more
    assert q.get_used() == []
    assert not h.mmio.on_timer(clock.now)  # too early: still throttled
    clock.now = deadline
    notified = h.notifications
    assert h.mmio.on_timer(clock.now)
    done = q.get_used()
    assert len(done) == 1 and done[0].length == 513
    assert h.notifications == notified + 1
    assert h.mmio.next_deadline_ns() is None


def test_blk_bandwidth_counts_data_bytes(memory, image, clock):
    h = blk_with_limiter(memory, image, clock, bandwidth=(4096, 1000))
    d = h.driver
    assert d.blk_read(0, 4096).status == 0
    assert d.blk_flush() == 0  # no data: free of bandwidth
    q = blk_reads(h, 1)
    assert q.get_used() == []
    clock.advance_ms(125)  # 512 bytes at 4096 B/s
    assert h.mmio.on_timer(clock.now)
    assert len(q.get_used()) == 1


def test_blk_reset_drops_a_held_request(memory, image, clock):
    h = blk_with_limiter(memory, image, clock, ops=(1, 1000))
    blk_reads(h, 2)
    assert 0 in h.device.held
    h.driver.reset()
    assert h.device.held == {} and h.mmio.next_deadline_ns() is None


def test_blk_without_limiter_never_throttles(blk):
    blk.driver.init()
    for _ in range(50):
        assert blk.driver.blk_read(0, 512).status == 0
    assert blk.device.counters["throttled"] == 0 and blk.mmio.next_deadline_ns() is None
