"""Keeping a serve loop's poller in step with a device's host-fd and timer hooks.

A device's `poll_fds()` changes as it runs (a net device polls its tap only while the guest has
posted receive buffers), and `next_deadline_ns()` says when it wants `on_timer`.  `HostFds` holds
what is registered, applies the difference after every dispatch, and translates events for a
poller whose flags differ from `select`'s (pyzmq's `zmq.Poller`: POLLIN 1, POLLOUT 2, POLLERR 4).

A serve loop, for a device `dev` (an `MmioDevice`) and a poller it already polls kicks with:

    fds = HostFds(poller)                       # or HostFds(zmq_poller, **HostFds.ZMQ_FLAGS)
    while True:
        fds.sync(dev.poll_fds())
        for target, revents in poller.poll(fds.timeout_ms(dev.next_deadline_ns(), default_ms)):
            if fds.owns(target):
                dev.on_ready(target, fds.to_select(revents))
            ...                                 # kicks, doorbells, control as before
        fds.fire_timer(dev)                     # on_timer if its deadline has passed

All on the thread that does register accesses (the device is not thread-safe beyond the
`MmioDevice` lock).
"""

from __future__ import annotations

import select
import time
from typing import Any, Callable, Protocol


class Poller(Protocol):
    def register(self, fd: Any, eventmask: int = ...) -> Any: ...
    def unregister(self, fd: Any) -> Any: ...


class TimerTarget(Protocol):
    def next_deadline_ns(self) -> int | None: ...
    def on_timer(self, now_ns: int) -> bool: ...


class HostFds:
    """The device fds registered in `poller`, with their interest in `select` terms."""

    ZMQ_FLAGS = {"pollin": 1, "pollout": 2, "pollerr": 4}

    def __init__(self, poller: Poller, *, pollin: int = select.POLLIN, pollout: int = select.POLLOUT,
                 pollerr: int = select.POLLERR | select.POLLHUP,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.poller = poller
        self._in, self._out, self._err = pollin, pollout, pollerr
        self.clock = clock
        self.registered: dict[int, int] = {}  # fd -> select events

    def _native(self, events: int) -> int:
        return (self._in if events & select.POLLIN else 0) | (self._out if events & select.POLLOUT else 0)

    def to_select(self, revents: int) -> int:
        """A poller's returned events as select.POLLIN / POLLOUT / POLLERR bits."""
        return ((select.POLLIN if revents & self._in else 0)
                | (select.POLLOUT if revents & self._out else 0)
                | (select.POLLERR if revents & self._err else 0))

    def sync(self, wanted: list[tuple[int, int]]) -> None:
        """Register, modify and unregister so that exactly `wanted` is polled."""
        want = {}
        for fd, events in wanted:
            want[fd] = want.get(fd, 0) | events
        for fd in list(self.registered):
            if fd not in want:
                self.poller.unregister(fd)
                del self.registered[fd]
        for fd, events in want.items():
            if self.registered.get(fd) != events:
                # Both select.poll and zmq.Poller take a second register() as a modification.
                self.poller.register(fd, self._native(events))
                self.registered[fd] = events

    def owns(self, target: Any) -> bool:
        return isinstance(target, int) and target in self.registered

    def timeout_ms(self, deadline_ns: int | None, default_ms: int | None) -> int | None:
        """Poll timeout: until the device's deadline, never beyond `default_ms` (None: forever)."""
        if deadline_ns is None:
            return default_ms
        wait = max(0, -(-(deadline_ns - self.clock()) // 1_000_000))
        return wait if default_ms is None else min(wait, default_ms)

    def fire_timer(self, device: TimerTarget) -> bool:
        """Call `device.on_timer` if its deadline has passed; True if buffers were used."""
        deadline = device.next_deadline_ns()
        now = self.clock()
        return device.on_timer(now) if deadline is not None and now >= deadline else False
