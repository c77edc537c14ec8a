"""What every virtio device is to the transport: `VirtioDevice`, and the `Interrupt` it signals.

The transport (`mmio.MmioDevice`) decodes registers, negotiates features and builds the queues;
a device only sees feature bits, its config space and parsed descriptor chains (kvmtool's split).

Besides kicks, a device may be driven by its host loop through two hooks, both optional:
- host fds: `poll_fds()` lists `(fd, select.POLLIN|POLLOUT)` the loop should wait on *now* (the
  set changes: a net device stops asking for its tap while the guest has posted no receive
  buffers), and `on_ready(fd, events)` is called when one is ready;
- a timer: `next_deadline_ns()` is the `time.monotonic_ns()` instant at which `on_timer(now_ns)`
  should run (a rate-limited queue waiting for tokens), or None.
The loop asks again after every dispatch; both are cheap.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Protocol

from ipc_protocol.guest_memory import GuestMemoryError
from ipc_protocol.guest_memory import GuestMemory

from . import fastpath
from .errors import QueueError
from .queue import DescriptorChain, Queue

log = logging.getLogger(__name__)

# Device IDs (§5).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# Reserved feature bits (§6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
# What every device here offers: modern only, split rings with indirect tables and event idx.
COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX


class Interrupt(Protocol):
    """How a device reaches the driver; the transport implements it (`MmioDevice`, and
    `VhostUserBackend` for vhost-user)."""

    def signal_used(self, queue_index: int | None = None) -> None:
        """Used buffers were added to queue `queue_index`: notify the driver.  virtio-mmio has
        one interrupt for all queues (InterruptStatus bit 0) and ignores the index; vhost-user
        has a call fd per queue.  None: every queue (a transport that cannot tell)."""

    def signal_config(self) -> None:
        """The config space changed: bump ConfigGeneration, set bit 1 and notify."""

    def signal_needs_reset(self, reason: str) -> None:
        """The driver broke the device (§2.1.2): set DEVICE_NEEDS_RESET, stop processing."""


class VirtioDevice(abc.ABC):
    """Base of blk, rng and console.

    Subclasses set `device_type`, `queue_max_sizes`, `device_features` and implement
    `handle_chain`; the default `process_queue` pops every available chain, hands it over and
    returns it to the driver with the byte count `handle_chain` reports.
    """

    device_type: int
    queue_max_sizes: list[int]
    device_features: int = COMMON_FEATURES

    def __init__(self) -> None:
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.queues: list[Queue] = []
        self.interrupt: Interrupt | None = None
        # Set by a guest error; input paths that bypass the transport (console feed) check it.
        self.broken = False
        self.counters: dict[str, int] = {"chains": 0, "interrupts": 0, "queue_errors": 0}
        # A chain popped but refused by `admit` (rate limited), per queue: it is the next one
        # handled.  Holding a popped chain is safe across a restart: a resumed queue starts at
        # the used index, so the chain is popped again (see `Queue`).
        self.held: dict[int, DescriptorChain] = {}
        # Devices with a C loop (`fastpath`: net, blk) use it where it is built; tests turn it
        # off to run the Python reference.
        self.native = fastpath.available()
        self._rings: dict[int, fastpath.FastRing] = {}

    def fast_ring(self, index: int, queue: Queue) -> fastpath.FastRing | None:
        """The C view of `queue`, or None (not built, turned off, or not usable now)."""
        return fastpath.ring_for(self._rings, index, queue) if self.native else None

    @classmethod
    def from_spec(cls, spec: dict[str, Any], fds: dict[str, int]) -> "VirtioDevice":
        """Build from a checked spec and the host fds by role (see `create_device`)."""
        return cls()

    # -- contract with the transport ----------------------------------------------------------
    @property
    def features(self) -> int:
        return self.device_features

    @property
    def active(self) -> bool:
        return self.interrupt is not None

    def has_feature(self, bit_mask: int) -> bool:
        return bool(self.acked_features & bit_mask)

    def ack_features(self, value: int) -> None:
        """The driver's accepted subset; the transport has already checked it (§2.2.1)."""
        self.acked_features = value

    def config_bytes(self) -> bytes:
        """The device-specific config space (§4.2.2 offset 0x100 on); empty by default."""
        return b""

    def read_config(self, offset: int, data: bytearray) -> None:
        config = self.config_bytes()
        chunk = config[offset:offset + len(data)] if offset >= 0 else b""
        data[:] = chunk + bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: bytes) -> None:
        """Config writes are ignored unless a device has writable fields."""

    def activate(self, memory: GuestMemory, queues: list[Queue | None], interrupt: Interrupt) -> None:
        """DRIVER_OK: `queues[i]` is None for a queue the driver did not enable."""
        self.memory = memory
        self.queues = queues  # type: ignore[assignment]
        self.interrupt = interrupt
        self.held = {}
        self._rings = {}

    def reset(self) -> None:
        """Status 0 (§2.4): forget the driver, its features and its queues."""
        self.acked_features = 0
        self.memory = None
        self.queues = []
        self.interrupt = None
        self.broken = False
        self.held = {}
        self._rings = {}

    # -- host loop hooks (see the module doc) ---------------------------------------------------
    def poll_fds(self) -> list[tuple[int, int]]:
        """Host fds to wait on now, as (fd, select.POLLIN | select.POLLOUT); none by default."""
        return []

    def on_ready(self, fd: int, events: int) -> bool:
        """`fd` from `poll_fds()` is ready with `events`; True if buffers were used."""
        return False

    def next_deadline_ns(self) -> int | None:
        """When (`time.monotonic_ns()`) `on_timer` should run, or None."""
        return None

    def on_timer(self, now_ns: int) -> bool:
        """The deadline passed; True if buffers were used."""
        return False

    def on_resumed(self) -> None:
        """This device replaces one that died, with the driver's rings as they were: state the
        predecessor held outside guest memory is gone (vsock's connections: it tells the
        driver).  Called once, after the rings were processed again."""

    def process_queue(self, index: int) -> bool:
        """Handle what the driver made available on queue `index`; True if buffers were used.

        Never raises for guest mistakes: a `QueueError` (or a guest address that is not RAM)
        becomes DEVICE_NEEDS_RESET through the interrupt object.
        """
        queue = self.queues[index] if self.active and 0 <= index < len(self.queues) else None
        if queue is None or self.broken:
            return False
        try:
            used = self.drain_queue(index, queue)
            if used and queue.needs_notification():
                self.signal_used(index)
            return used
        except (QueueError, GuestMemoryError) as e:
            self.counters["queue_errors"] += 1
            self.broken = True
            log.warning("%s queue %d: %s", type(self).__name__, index, e)
            assert self.interrupt is not None
            self.interrupt.signal_needs_reset(f"queue {index}: {e}")
            return False

    def drain_queue(self, index: int, queue: Queue) -> bool:
        """Pop, handle and complete chains until the ring stays empty (or `admit` says wait)."""
        used = False
        while True:
            chain = self.held.pop(index, None) or queue.pop()
            while chain is not None:
                if not self.admit(index, chain):
                    # Stop taking chains from this queue; `next_deadline_ns` says when to retry.
                    self.held[index] = chain
                    return used
                self.counters["chains"] += 1
                queue.add_used(chain.head, self.handle_chain(index, chain))
                used = True
                chain = queue.pop()
            if not queue.enable_notification():
                return used

    def admit(self, queue_index: int, chain: DescriptorChain) -> bool:
        """Whether `chain` may be handled now; False holds it (a rate limiter out of tokens)."""
        return True

    def signal_used(self, queue_index: int | None = None) -> None:
        if self.interrupt is not None:
            self.counters["interrupts"] += 1
            self.interrupt.signal_used(queue_index)

    @abc.abstractmethod
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Execute one parsed chain; return how many bytes were written to its writable part."""

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    def close(self) -> None:
        """Release host resources (files); the device is unusable afterwards."""
