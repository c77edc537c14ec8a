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
import select
import threading
import time
from typing import Any, Callable, Sequence

from ipc_protocol import messages
from ipc_protocol import virtio_mmio as regs
from ipc_protocol.errors import PeerGone, ProtocolError, RemoteProtocolError, TransportTimeout
from ipc_protocol.ring import ACCESS_SIZES, U32_MAX, ResponseMatcher, Slot
from ipc_protocol.transport.shm_ring import RingEndpoint
from ipc_protocol.register_page import RegisterPage
from ipc_protocol.virtio_mmio import TransportState

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 0.5     # seconds a vCPU may wait for a register read before the device is failed
RECENT_WRITES = 256       # bounded debug log of raw writes: the guest may write forever


_CONSTANT_REGISTERS = regs.FIXED_REGISTERS

# Registers the device answers with a value (the constants above, and these); it answers any
# other aligned register read -- the write-only ones (QueueDescLow, QueueSel, ...) and the
# holes -- with 0 and counts it invalid.  So do we, without the round trip.
_ANSWERED_BY_DEVICE = {*_CONSTANT_REGISTERS, regs.DEVICE_ID, regs.INTERRUPT_STATUS,
                       regs.CONFIG_GENERATION, regs.STATUS, regs.DEVICE_FEATURES,
                       regs.QUEUE_NUM_MAX, regs.QUEUE_READY}


class TransportShadow:
    """The core's copy of what the guest driver programmed into one device's register file.

    Fed by every register write (never by the device's answers) through the one rule set both
    sides share (`TransportState.apply_write`), so it holds exactly what the device accepted and
    its size is bounded by the device's real queue count.  Config-space writes are events for
    every device kind here (console emerg_wr) and are not replayed.  Only Status reads teach it
    something from the device: DEVICE_NEEDS_RESET, which only the device can set (§2.1.2)."""

    def __init__(self, queue_max_sizes: Sequence[int], device_features: int = 0) -> None:
        self.transport = TransportState(list(queue_max_sizes), device_features)
        self.write_count = 0
        self.recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=RECENT_WRITES)

    @property
    def status(self) -> int:
        return self.transport.status

    def set_device_features(self, features: int) -> None:
        """What the device process said it offers (in `Ready`); only decides what this shadow
        accepts for that same device."""
        self.transport.device_features = features

    def record(self, offset: int, data: bytes) -> None:
        self.write_count += 1
        self.recent.append((offset, bytes(data)))
        self.transport.apply_write(offset, bytes(data))

    def observe_read(self, offset: int, data: bytes) -> None:
        if offset == regs.STATUS and len(data) == 4 and \
                int.from_bytes(data, "little") & regs.DEVICE_NEEDS_RESET:
            self.transport.mark_needs_reset()

    def state(self) -> dict[str, Any]:
        """Plain data for logs and tests: the wire form with queues by index."""
        wire = self.transport.to_wire()
        wire["queues"] = {i: {"size": size, "ready": ready, "desc": desc, "driver": drv,
                              "device": dev} for i, size, ready, desc, drv, dev in wire["queues"]}
        return wire

    def to_activate(self, request_id: int) -> messages.Activate:
        """The message that makes a fresh child resume this state."""
        return messages.Activate.from_transport(request_id, self.transport.to_wire())


class ProxyDevice:
    """A `BusDevice` forwarding register accesses to a device process over the shared rings."""

    def __init__(self, name: str, ring: RingEndpoint | None, *, queue_max_sizes: Sequence[int] = (),
                 timeout: float = DEFAULT_TIMEOUT, spin_us: int = 0,
                 on_failure: Callable[[str], None] | None = None,
                 watch_fds: Sequence[int] = (), device_id: int | None = None,
                 page: RegisterPage | None = None) -> None:
        self.name = name
        self.device_id = device_id  # the kind's virtio id: DeviceID is answered here
        self.timeout = timeout
        self.spin_us = spin_us
        self.on_failure = on_failure
        self.shadow = TransportShadow(queue_max_sizes)
        self.counters = {"reads": 0, "writes": 0, "dropped_reads": 0, "dropped_writes": 0,
                         "local_reads": 0, "local_writes": 0, "invalid_reads": 0}
        self._lock = threading.Lock()
        self._seq = 0
        self._last_write_seq = 0
        self._attach_locked(ring, watch_fds, page)

    # -- backend -------------------------------------------------------------------------------
    def _attach_locked(self, ring: RingEndpoint | None, watch_fds: Sequence[int],
                       page: RegisterPage | None = None) -> None:
        """`ring` None: no process yet (the proxy is failed until one is attached)."""
        self._ring = ring  # type: ignore[assignment]
        self._page = page
        self._last_write_seq = 0  # a fresh process: its applied_seq starts at 0 too
        self._watch_fds = tuple(watch_fds)
        self._gone_poller = select.poll()  # a local answer is only given for a live process
        for fd in self._watch_fds:
            self._gone_poller.register(fd, select.POLLIN)
        self._matcher = ResponseMatcher()
        self.failure_reason: str | None = None if ring is not None else "not started"

    def attach(self, ring: RingEndpoint, watch_fds: Sequence[int] = (),
               page: RegisterPage | None = None) -> None:
        """Switch to a new child's rings (after a restart) and clear the failed state."""
        with self._lock:
            self._attach_locked(ring, watch_fds, page)

    @property
    def failed(self) -> bool:
        return self.failure_reason is not None

    def mark_failed(self, reason: str, *, notify: bool = True) -> None:
        """Fail the device from outside (e.g. the supervisor stopped the process); `notify`:
        also call `on_failure` (not when the supervisor itself is the one who knows)."""
        with self._lock:
            first = self._fail_locked(reason, quiet=not notify)
        if first and notify:
            self._notify_failure(reason)

    def _fail_locked(self, reason: str, quiet: bool = False) -> bool:
        if self.failure_reason is not None:
            return False
        self.failure_reason = reason
        if not quiet:
            log.error("device %s failed: %s; its reads now return all-ones and writes are "
                      "dropped", self.name, reason)
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
                    local = self._local_read(offset, len(data))
                    if local is not None:
                        data[:] = local
                        self.counters["local_reads"] += 1
                        return
                    request = Slot.read(self._next_seq(), offset, len(data))
                    answer = self._request_locked(request)
                    data[:] = answer.data
                    self.shadow.observe_read(offset, answer.data)
                    return
                except (ProtocolError, OSError) as err:
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
                if self._local_write(offset, bytes(data)):
                    self.counters["local_writes"] += 1
                    return
                try:
                    self._last_write_seq = self._next_seq()
                    self._push_locked(Slot.write(self._last_write_seq, offset, bytes(data)))
                    return
                except (ProtocolError, OSError) as err:
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
            except (ProtocolError, OSError) as err:
                failure = self._describe(err, "sync")
                if not self._fail_locked(failure):
                    failure = None
        if failure:
            self._notify_failure(failure)
        return False

    def check_page(self) -> None:
        """Fail the device if its register page is corrupt (the supervisor asks every heartbeat:
        a guest that reads nothing would not find out)."""
        failure = None
        with self._lock:
            page = self._page
            corrupt = page.corruption() if page is not None and self.failure_reason is None \
                else None
            if corrupt is not None:
                failure = f"invalid answer in the register page: {corrupt}"
                if not self._fail_locked(failure):
                    failure = None
        if failure:
            self._notify_failure(failure)

    # -- answered here, from the register page and the shadow (lock held) -----------------------
    def _page_current(self) -> bool:
        """The page reflects every write we posted (the device publishes as it applies them)."""
        # (Only called from _local_read, which has checked the page is valid and intact.)
        return self._page is not None and self._page.applied_seq() >= self._last_write_seq

    def _local_read(self, offset: int, size: int) -> bytes | None:
        """The answer without asking the device, or None (then the ring: correct, slower).

        Every value read from the page is the device's and is only ever handed to its own
        guest: masks and bounds are checked in `RegisterPage`."""
        page = self._page
        if page is None or (self._watch_fds and self._gone_poller.poll(0)):
            return None  # (a process that exited: the ring path reports it)
        if not page.intact():
            raise RemoteProtocolError(f"register page: {page.corruption() or 'changed'}")
        if not page.valid:
            return None
        if offset >= regs.CONFIG:
            if not self._page_current() or offset + size > regs.SLOT_SIZE:
                return None
            return page.read_config(offset - regs.CONFIG, size)
        if size != 4 or offset % 4:
            return None  # the device counts odd accesses: let it
        value = _CONSTANT_REGISTERS.get(offset)
        if offset == regs.DEVICE_ID and self.device_id is not None:
            value = self.device_id
        elif offset == regs.INTERRUPT_STATUS:
            value = page.interrupt_status()
        elif offset == regs.CONFIG_GENERATION:
            value = page.config_generation() if self._page_current() else None
        elif offset == regs.STATUS:
            # A write the device has not applied yet may set DEVICE_NEEDS_RESET: ask it.
            if not self._page_current():
                return None
            value = self.shadow.status
            if page.needs_reset():
                value |= regs.DEVICE_NEEDS_RESET
        elif offset in (regs.DEVICE_FEATURES, regs.QUEUE_NUM_MAX, regs.QUEUE_READY):
            value = self.shadow.transport.read_register(offset)
        elif offset not in _ANSWERED_BY_DEVICE:
            value = 0
            self.counters["invalid_reads"] += 1
        if value is None:
            return None
        return (value & 0xFFFFFFFF).to_bytes(4, "little")

    def _local_write(self, offset: int, data: bytes) -> bool:
        """InterruptACK never reaches the device: the core clears the page's bits itself."""
        page = self._page
        if page is None or not page.valid or len(data) != 4:
            return False
        if offset == regs.INTERRUPT_ACK:
            page.ack(int.from_bytes(data, "little"))
            return True
        if offset == regs.STATUS and data == bytes(4):
            page.clear_interrupts()  # a reset: InterruptStatus is 0 now, for us and the device
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
    def _describe(err: Exception, what: str) -> str:
        if isinstance(err, TransportTimeout):
            return f"no answer to {what}: {err}"
        if isinstance(err, PeerGone):
            return f"process exited during {what}"
        if isinstance(err, RemoteProtocolError):
            return f"invalid answer to {what}: {err}"
        if isinstance(err, OSError):  # the transport itself (a doorbell, the ring mapping)
            return f"transport error during {what}: {err.strerror or err}"
        return f"{what}: {err}"

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters, shadow_writes=self.shadow.write_count,
                        failed=int(self.failed))
