"""`ProxyDevice`: the `BusDevice` that stands in the core for a device running in its own process.

The bus cannot tell it from a local device (crosvm's `ProxyDevice`): a register **read** pushes a
READ slot on the request ring and waits — spinning briefly, then sleeping on the response doorbell,
bounded by `timeout` — for the matching READ_DONE; a **write** is posted (pushed, not answered).
The device applies slots in FIFO order, so a read always observes every earlier write.

Everything from the child is untrusted.  A late, malformed or mismatched answer, a corrupt ring
index or a child that exits marks the proxy **failed**, after which reads return all-ones (what
an absent device reads as), writes are dropped, the VM keeps running, the event is logged once
and `on_failure(reason)` is called once (the supervisor's cue to restart the device).

Every register write also feeds a `TransportShadow` — even while failed — so the core always
knows what the guest driver programmed (features, status, queue addresses) and can hand it to a
restarted child (`messages.Activate`).

Thread safety: vCPU threads may access the same device concurrently; a per-device lock
serializes them, so at most one answered request is ever in flight per device.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Sequence

from device_procs.virtio import mmio as regs
from ipc_protocol import messages
from ipc_protocol.errors import PeerGone, ProtocolError, RemoteProtocolError, TransportTimeout
from ipc_protocol.ring import ACCESS_SIZES, U32_MAX, ResponseMatcher, Slot
from ipc_protocol.transport.shm_ring import RingEndpoint

from ..layout import VIRTIO_MMIO_SLOT_SIZE

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 0.5     # seconds a vCPU may wait for a register read before the device is failed
# Spinning before sleeping only pays when core and child own separate CPUs.  Measured (rng read,
# 2-vCPU host): sleep/sleep 29 µs median; both spinning and pinned apart 15 µs; both spinning but
# sharing a loaded CPU 130 µs (each spinner burns the other's time slice).  So: off by default.
DEFAULT_SPIN_US = 0
MAX_SHADOW_QUEUES = 64    # queue indices past this are not real queues (QueueNumMax reads 0)
RECENT_WRITES = 256       # bounded debug log of raw writes: the guest may write forever

_QUEUE_FIELDS = {
    regs.QUEUE_DESC_LOW: ("desc", False), regs.QUEUE_DESC_HIGH: ("desc", True),
    regs.QUEUE_DRIVER_LOW: ("driver", False), regs.QUEUE_DRIVER_HIGH: ("driver", True),
    regs.QUEUE_DEVICE_LOW: ("device", False), regs.QUEUE_DEVICE_HIGH: ("device", True),
}


def _set_half(old: int, value: int, high: bool) -> int:
    return (old & 0xFFFFFFFF) | (value << 32) if high else (old & ~0xFFFFFFFF) | value


class TransportShadow:
    """What the guest driver has programmed into one virtio-mmio register file (VIRTIO 1.2 §4.2.2).

    Decoded from writes alone, so it never depends on the (untrusted) device's answers.  Memory is
    bounded whatever the guest writes: one entry per real register, per queue below
    MAX_SHADOW_QUEUES and per config-space offset inside the slot.
    """

    def __init__(self) -> None:
        self.write_count = 0
        self.recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=RECENT_WRITES)
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.queues: dict[int, dict[str, int]] = {}
        self.config: dict[int, bytes] = {}

    def record(self, offset: int, data: bytes) -> None:
        self.write_count += 1
        self.recent.append((offset, bytes(data)))
        if offset >= regs.CONFIG:
            if offset + len(data) <= VIRTIO_MMIO_SLOT_SIZE:
                self.config[offset - regs.CONFIG] = bytes(data)
            return
        if len(data) != 4 or offset % 4:
            return  # the transport ignores these too (only aligned 32-bit register accesses)
        value = int.from_bytes(data, "little")
        if offset == regs.STATUS:
            if value == 0:  # §4.2.2.1: writing zero resets the device
                self._clear()
            else:
                self.status = value & 0xFF
        elif offset == regs.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == regs.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == regs.DRIVER_FEATURES and self.driver_features_sel in (0, 1):
            self.driver_features = _set_half(self.driver_features, value,
                                             self.driver_features_sel == 1)
        elif offset == regs.QUEUE_SEL:
            self.queue_sel = value
        elif self.queue_sel < MAX_SHADOW_QUEUES:
            self._record_queue(offset, value)

    def _record_queue(self, offset: int, value: int) -> None:
        q = self.queues.get(self.queue_sel)
        if offset == regs.QUEUE_RESET and value == 1:
            self.queues.pop(self.queue_sel, None)
            return
        if offset not in _QUEUE_FIELDS and offset not in (regs.QUEUE_NUM, regs.QUEUE_READY):
            return  # QueueNotify, InterruptACK, ...: events, not state
        if q is None:
            q = self.queues[self.queue_sel] = {"size": 0, "ready": 0, "desc": 0, "driver": 0,
                                               "device": 0}
        if offset == regs.QUEUE_NUM:
            q["size"] = value
        elif offset == regs.QUEUE_READY:
            q["ready"] = value & 1
        else:
            name, high = _QUEUE_FIELDS[offset]
            q[name] = _set_half(q[name], value, high)

    def state(self) -> dict[str, Any]:
        return {"status": self.status, "driver_features": self.driver_features,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel, "queue_sel": self.queue_sel,
                "queues": {i: dict(q) for i, q in sorted(self.queues.items())},
                "config": dict(sorted(self.config.items()))}

    def to_activate(self, request_id: int) -> messages.Activate:
        """The message that makes a fresh child resume this state."""
        queues = tuple((i, q["size"], q["ready"], q["desc"], q["driver"], q["device"])
                       for i, q in sorted(self.queues.items()))
        config = tuple((off, len(d), int.from_bytes(d, "little"))
                       for off, d in sorted(self.config.items()) if len(d) in ACCESS_SIZES)
        return messages.Activate(request_id, self.status, self.driver_features,
                                 self.device_features_sel, self.driver_features_sel,
                                 self.queue_sel, queues, config)


class ProxyDevice:
    """A `BusDevice` forwarding register accesses to a device process over the shared rings."""

    def __init__(self, name: str, ring: RingEndpoint, *, timeout: float = DEFAULT_TIMEOUT,
                 spin_us: int = DEFAULT_SPIN_US,
                 on_failure: Callable[[str], None] | None = None,
                 watch_fds: Sequence[int] = ()) -> None:
        self.name = name
        self.timeout = timeout
        self.spin_us = spin_us
        self.on_failure = on_failure
        self.shadow = TransportShadow()
        self.counters = {"reads": 0, "writes": 0, "dropped_reads": 0, "dropped_writes": 0}
        self._lock = threading.Lock()
        self._seq = 0
        self._attach_locked(ring, watch_fds)

    # -- backend -------------------------------------------------------------------------------
    def _attach_locked(self, ring: RingEndpoint, watch_fds: Sequence[int]) -> None:
        self._ring = ring
        self._watch_fds = tuple(watch_fds)
        self._matcher = ResponseMatcher()
        self.failure_reason: str | None = None

    def attach(self, ring: RingEndpoint, watch_fds: Sequence[int] = ()) -> None:
        """Switch to a new child's rings (after a restart) and clear the failed state."""
        with self._lock:
            self._attach_locked(ring, watch_fds)

    @property
    def failed(self) -> bool:
        return self.failure_reason is not None

    def mark_failed(self, reason: str) -> None:
        """Fail the device from outside (e.g. the supervisor saw the process exit)."""
        with self._lock:
            first = self._fail_locked(reason)
        if first:
            self._notify_failure(reason)

    def _fail_locked(self, reason: str) -> bool:
        if self.failure_reason is not None:
            return False
        self.failure_reason = reason
        log.error("device %s failed: %s; its reads now return all-ones and writes are dropped",
                  self.name, reason)
        return True

    def _notify_failure(self, reason: str) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:  # a buggy callback must not take a vCPU thread down
                log.exception("on_failure callback of device %s raised", self.name)

    # -- BusDevice -----------------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        failure = None
        with self._lock:
            self.counters["reads"] += 1
            if self.failure_reason is None and len(data) in ACCESS_SIZES and 0 <= offset <= U32_MAX:
                try:
                    request = Slot.read(self._next_seq(), offset, len(data))
                    answer = self._request_locked(request)
                    data[:] = answer.data
                    return
                except ProtocolError as err:
                    failure = self._describe(err, f"read of {len(data)} bytes at {offset:#x}")
                    if not self._fail_locked(failure):
                        failure = None
            self.counters["dropped_reads"] += 1
            data[:] = b"\xff" * len(data)
        if failure:
            self._notify_failure(failure)

    def write(self, offset: int, data: bytes) -> None:
        failure = None
        with self._lock:
            self.counters["writes"] += 1
            self.shadow.record(offset, data)  # even when failed: a restart must see it
            if self.failure_reason is None and len(data) in ACCESS_SIZES and 0 <= offset <= U32_MAX:
                try:
                    self._push_locked(Slot.write(self._next_seq(), offset, bytes(data)))
                    return
                except ProtocolError as err:
                    failure = self._describe(err, f"write at {offset:#x}")
                    if not self._fail_locked(failure):
                        failure = None
            self.counters["dropped_writes"] += 1
        if failure:
            self._notify_failure(failure)

    def sync(self) -> bool:
        """Wait until the child has applied every earlier write; False if the device is failed."""
        failure = None
        with self._lock:
            if self.failure_reason is not None:
                return False
            try:
                self._request_locked(Slot.sync(self._next_seq()))
                return True
            except ProtocolError as err:
                failure = self._describe(err, "sync")
                if not self._fail_locked(failure):
                    failure = None
        if failure:
            self._notify_failure(failure)
        return False

    # -- ring plumbing (lock held) ---------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF_FFFF_FFFF_FFFF
        return self._seq

    def _push_locked(self, slot: Slot) -> None:
        if self._ring.send(slot):
            return
        # Full: the child is behind on posted writes.  Wait for room, but no longer than a read.
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            time.sleep(20e-6)
            if self._ring.send(slot):
                return
        raise TransportTimeout(f"request ring stayed full for {self.timeout * 1000:.0f} ms")

    def _request_locked(self, request: Slot) -> Slot:
        self._push_locked(request)
        self._matcher.expect(request)
        answer = self._ring.recv(self.timeout, self.spin_us, self._watch_fds)
        self._matcher.match(answer)
        return answer

    @staticmethod
    def _describe(err: ProtocolError, what: str) -> str:
        if isinstance(err, TransportTimeout):
            return f"no answer to {what}: {err}"
        if isinstance(err, PeerGone):
            return f"process exited during {what}"
        if isinstance(err, RemoteProtocolError):
            return f"invalid answer to {what}: {err}"
        return f"{what}: {err}"

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters, shadow_writes=self.shadow.write_count,
                        failed=int(self.failed))
