"""The ring transport: both rings in one sealed memfd, mapped shared, plus two eventfd doorbells.

    memfd:  [ request ring (core -> device) | response ring (device -> core) ]
    request doorbell:  eventfd the core writes after pushing; the device polls it
    response doorbell: eventfd the device writes after pushing; the core waits on it

The producer rings the doorbell after *every* push.  That costs one write(2) per slot but can
never lose a wake-up: an eventfd counter remembers the signal until the consumer reads it, so a
consumer that checks the ring, finds it empty and then sleeps is woken by any push that raced
with its check.  (A "consumer is sleeping" flag in shared memory would save the syscall but needs
a store-load fence Python cannot express.)

A waiting consumer may first spin for a bounded time (`spin_us`) re-checking the ring, which saves
the sleep/wake latency when the answer is microseconds away, then sleeps on the eventfd, bounded
by a timeout.  While sleeping it can also watch extra fds (the child's pidfd) so a dead peer is
noticed at once rather than at the timeout.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import time
from typing import Iterable

from ..register_page import PAGE_BYTES, RegisterPage
from ..errors import LocalProtocolError, PeerGone, TransportTimeout
from ..ring import (RingConsumer, RingProducer, Slot, initialize_ring, request_consumer,
                    request_producer, response_consumer, response_producer, ring_bytes)

# Seals (<linux/fcntl.h>).  Shrinking must be impossible: if the untrusted device could truncate
# the memfd, the core's next access to its mapping would raise SIGBUS and kill the whole VMM.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)

DEFAULT_CAPACITY = 64


def ring_pair_layout(capacity: int) -> tuple[int, int, int]:
    """(request ring offset, response ring offset, total bytes) inside the memfd; the register
    page (`ipc_protocol.register_page`) is the last PAGE_BYTES before `total`, page-aligned."""
    one = ring_bytes(capacity)
    total = (2 * one + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE + PAGE_BYTES
    return 0, one, total


def make_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd (passed to children explicitly, never by accident)."""
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def drain_eventfd(fd: int) -> int:
    """Read and reset an eventfd's counter; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class ShmRings:
    """The shared memory and doorbells of one device's ring pair (either side's view).

    The core calls `create`; the device calls `attach` with the fds it received.  Either way this
    object owns its fds and mapping and releases them in `close`.
    """

    def __init__(self, memfd: int, request_doorbell: int, response_doorbell: int,
                 capacity: int) -> None:
        self.capacity = capacity
        self.memfd = memfd
        self.request_doorbell = request_doorbell
        self.response_doorbell = response_doorbell
        req_off, resp_off, total = ring_pair_layout(capacity)
        size = os.fstat(memfd).st_size
        if size < total:
            raise LocalProtocolError(f"ring memfd has {size} bytes, {total} needed")
        self._mmap = mmap.mmap(memfd, total, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(self._mmap)
        self.request_buffer = view[req_off:resp_off]
        self.response_buffer = view[resp_off:total - PAGE_BYTES]
        self._views = [view, self.request_buffer, self.response_buffer]
        self.register_page = RegisterPage(memfd, total - PAGE_BYTES)

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY, name: str = "bulkhead-ring") -> "ShmRings":
        _, _, total = ring_pair_layout(capacity)
        memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        fds = [memfd]
        try:
            os.ftruncate(memfd, total)
            fcntl.fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
            fds += [make_eventfd(), make_eventfd()]
            rings = cls(memfd, fds[1], fds[2], capacity)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        initialize_ring(rings.request_buffer, capacity)
        initialize_ring(rings.response_buffer, capacity)
        rings.register_page.initialize()
        return rings

    @classmethod
    def attach(cls, memfd: int, request_doorbell: int, response_doorbell: int,
               capacity: int) -> "ShmRings":
        return cls(memfd, request_doorbell, response_doorbell, capacity)

    @property
    def fds(self) -> dict[str, int]:
        """The fds a device process needs, by role name (what `spawn` passes on)."""
        return {"ring": self.memfd, "request_doorbell": self.request_doorbell,
                "response_doorbell": self.response_doorbell}

    def core_endpoint(self) -> "RingEndpoint":
        return RingEndpoint(request_producer(self.request_buffer, self.capacity),
                            response_consumer(self.response_buffer, self.capacity),
                            outgoing_doorbell=self.request_doorbell,
                            incoming_doorbell=self.response_doorbell)

    def device_endpoint(self) -> "RingEndpoint":
        return RingEndpoint(response_producer(self.response_buffer, self.capacity),
                            request_consumer(self.request_buffer, self.capacity),
                            outgoing_doorbell=self.response_doorbell,
                            incoming_doorbell=self.request_doorbell)

    def close(self) -> None:
        self.register_page = None  # type: ignore[assignment]  # unmapped with its last user
        for v in reversed(self._views):
            v.release()
        self._views = []
        try:
            self._mmap.close()
        except BufferError:
            pass  # an endpoint still holds a view: the mapping goes when the process does
        for fd in (self.memfd, self.request_doorbell, self.response_doorbell):
            if fd >= 0:
                os.close(fd)
        self.memfd = self.request_doorbell = self.response_doorbell = -1


class RingEndpoint:
    """One side's pair of ring ends plus doorbells: `send` slots, `recv` slots."""

    def __init__(self, producer: RingProducer, consumer: RingConsumer, *,
                 outgoing_doorbell: int, incoming_doorbell: int) -> None:
        self.producer = producer
        self.consumer = consumer
        self.outgoing_doorbell = outgoing_doorbell
        self.incoming_doorbell = incoming_doorbell

    def send(self, slot: Slot) -> bool:
        """Push and ring the peer's doorbell; False (nothing sent) when the ring is full."""
        if not self.producer.push(slot):
            return False
        self.ring_doorbell()
        return True

    def ring_doorbell(self) -> None:
        try:
            os.eventfd_write(self.outgoing_doorbell, 1)
        except BlockingIOError:
            # The counter is at its maximum: the peer (who may have filled it on purpose) is
            # signalled already.  A full doorbell is the peer's business, never ours.
            pass

    def try_recv(self) -> Slot | None:
        return self.consumer.pop()

    def drain_doorbell(self) -> int:
        return drain_eventfd(self.incoming_doorbell)

    def recv(self, timeout: float, spin_us: int = 0, watch_fds: Iterable[int] = ()) -> Slot:
        """Wait for the next slot: spin up to `spin_us`, then sleep on the doorbell.

        Raises `TransportTimeout` after `timeout` seconds, `PeerGone` if a `watch_fds` fd (e.g. the
        peer's pidfd) becomes readable first, `RemoteProtocolError` if the slot is invalid.
        """
        slot = self.consumer.pop()
        if slot is not None:
            return slot
        start = time.monotonic()
        deadline = start + timeout
        if spin_us > 0:
            spin_end = min(deadline, start + spin_us / 1e6)
            while time.monotonic() < spin_end:
                slot = self.consumer.pop()
                if slot is not None:
                    return slot
        poller = select.poll()
        poller.register(self.incoming_doorbell, select.POLLIN)
        watched = set()
        for fd in watch_fds:
            poller.register(fd, select.POLLIN)
            watched.add(fd)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(f"no answer on the ring within {timeout * 1000:.0f} ms")
            events = poller.poll(max(1, int(remaining * 1000 + 0.999)))
            for fd, _ in events:
                if fd == self.incoming_doorbell:
                    drain_eventfd(fd)
            slot = self.consumer.pop()  # check the ring before a dead pidfd: a last answer wins
            if slot is not None:
                return slot
            for fd, _ in events:
                if fd in watched:
                    raise PeerGone("the device process exited while an answer was awaited")


__all__ = ["ShmRings", "RingEndpoint", "ring_pair_layout", "make_eventfd", "drain_eventfd",
           "DEFAULT_CAPACITY"]
