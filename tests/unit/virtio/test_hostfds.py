"""HostFds: a poller kept in step with a device's poll_fds() and timer (select.poll and zmq.Poller)."""

from __future__ import annotations

import os
import select

import pytest
import zmq

from device_procs.virtio.hostfds import HostFds


class Timer:
    def __init__(self, deadline: int | None) -> None:
        self.deadline, self.fired = deadline, []

    def next_deadline_ns(self) -> int | None:
        return self.deadline

    def on_timer(self, now_ns: int) -> bool:
        self.fired.append(now_ns)
        return True


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("kind", ["select", "zmq"])
def test_sync_registers_modifies_and_unregisters(pipe, kind):
    r, w = pipe
    poller = select.poll() if kind == "select" else zmq.Poller()
    fds = HostFds(poller) if kind == "select" else HostFds(poller, **HostFds.ZMQ_FLAGS)

    def ready() -> dict[int, int]:
        got = poller.poll(0)
        return {fd: fds.to_select(ev) for fd, ev in got}

    fds.sync([(w, select.POLLOUT)])
    assert ready() == {w: select.POLLOUT} and fds.owns(w) and not fds.owns(r)
    fds.sync([(r, select.POLLIN)])  # w dropped, r added
    assert ready() == {}
    os.write(w, b"x")
    assert ready() == {r: select.POLLIN}
    fds.sync([(r, select.POLLIN), (r, select.POLLOUT)])  # merged into one registration
    assert fds.registered == {r: select.POLLIN | select.POLLOUT}
    fds.sync([])
    assert ready() == {} and fds.registered == {}


def test_error_events_are_translated():
    r, w = os.pipe()
    fds = HostFds(select.poll())
    fds.sync([(w, select.POLLOUT)])
    os.close(r)
    ((fd, ev),) = fds.poller.poll(0)
    assert fd == w and fds.to_select(ev) & select.POLLERR  # a closed reader: POLLERR on the writer
    os.close(w)
    assert HostFds(zmq.Poller(), **HostFds.ZMQ_FLAGS).to_select(4) == select.POLLERR


def test_timeout_and_timer():
    now = [1_000_000_000]
    fds = HostFds(select.poll(), clock=lambda: now[0])
    assert fds.timeout_ms(None, 250) == 250 and fds.timeout_ms(None, None) is None
    assert fds.timeout_ms(now[0] + 10_500_000, 250) == 11  # rounded up: never early
    assert fds.timeout_ms(now[0] + 10**12, 250) == 250
    assert fds.timeout_ms(now[0] - 5, 250) == 0
    t = Timer(now[0] + 100)
    assert not fds.fire_timer(t) and t.fired == []
    now[0] += 100
    assert fds.fire_timer(t) and t.fired == [now[0]]
    assert not fds.fire_timer(Timer(None))
