"""The virtio-mmio transport, modern (Version 2) register file (VIRTIO 1.2 §4.2.2).

`MmioDevice` is a `BusDevice`: it decodes register accesses once for every device, runs the
device-status state machine (§2.1, §3.1), negotiates features and builds the queues at
DRIVER_OK.  It also implements the `Interrupt` a device signals.  `state()`/`restore()` carry
everything the driver programmed, so a crashed device process can be replaced unnoticed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from ipc_protocol.guest_memory import GuestMemory

from .device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtioDevice
from .errors import QueueError
from .queue import Queue

log = logging.getLogger(__name__)

# Register offsets (§4.2.2, table "MMIO Device Register Layout").
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR_BKHD = 0x44484B42  # "BKHD" little-endian

# Device status bits (§2.1).
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# InterruptStatus bits (§4.2.2).
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

STATE_VERSION = 1


class QueueConfig:
    """What the driver programmed for one queue (§4.2.2 Queue* registers)."""

    __slots__ = ("max_size", "size", "ready", "desc", "driver", "device")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = max_size  # QueueNum until written (Linux always writes it)
        self.ready = False
        self.desc = self.driver = self.device = 0

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "ready": self.ready, "desc": self.desc,
                "driver": self.driver, "device": self.device}


def _set_half(value: int, data: int, high: bool) -> int:
    return (value & 0xFFFFFFFF) | (data << 32) if high else (value & ~0xFFFFFFFF) | data


class MmioDevice:
    """A virtio device behind the virtio-mmio register file.

    `notify()` tells the guest an interrupt is pending (an irqfd write); InterruptStatus says why.
    Register accesses must be aligned 32-bit, config space accesses any size; anything else reads
    as zero, is dropped and counted in `stats()["invalid_accesses"]`.
    """

    def __init__(self, device: VirtioDevice, memory: GuestMemory, notify: Callable[[], None]) -> None:
        self.device = device
        self.memory = memory
        self.notify = notify
        # In-process mode may see register writes (vCPU thread) and ioeventfd kicks (another
        # thread) at once; the device process is single-threaded and pays little for it.
        self._lock = threading.RLock()
        self.invalid_accesses = 0
        self.ignored_writes = 0
        self.needs_reset_reason: str | None = None
        self._reset_transport()

    def _reset_transport(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.shm_sel = 0
        self.queues = [QueueConfig(n) for n in self.device.queue_max_sizes]
        self.needs_reset_reason = None

    # -- BusDevice ----------------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        with self._lock:
            if offset >= CONFIG:
                self.device.read_config(offset - CONFIG, data)
                return
            value = self._read_register(offset) if len(data) == 4 and offset % 4 == 0 else None
            if value is None:
                self.invalid_accesses += 1
                value = 0
            data[:] = (value & 0xFFFFFFFF).to_bytes(4, "little")[:len(data)].ljust(len(data), b"\0")

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if offset >= CONFIG:
                self.device.write_config(offset - CONFIG, bytes(data))
                return
            if len(data) != 4 or offset % 4 or not self._write_register(
                    offset, int.from_bytes(data, "little")):
                self.invalid_accesses += 1

    def _selected(self) -> QueueConfig | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int | None:
        q = self._selected()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_type
        if offset == VENDOR_ID:
            return VENDOR_BKHD
        if offset == DEVICE_FEATURES:
            return (self.device.features >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            # §4.2.2: 0 for a queue that is not available.
            return q.max_size if q else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # §4.2.2: no shared memory region → length and base all ones
        if offset == QUEUE_RESET:
            return 0  # VIRTIO_F_RING_RESET is not offered
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return None  # write-only or unknown

    def _write_register(self, offset: int, value: int) -> bool:
        """Apply a register write; False if the offset is not a writable register."""
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            # §3.1.1: features are written before FEATURES_OK; afterwards they are fixed.
            if self.status & FEATURES_OK or self.driver_features_sel >= 2:
                self.ignored_writes += 1
            else:
                self.driver_features = _set_half(self.driver_features, value,
                                                 self.driver_features_sel == 1)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                        QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            self._write_queue_register(offset, value)
        elif offset == QUEUE_NOTIFY:
            # Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index (§4.2.2).
            self._notify_locked(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset == QUEUE_RESET:
            self.ignored_writes += 1
        else:
            return False
        return True

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected()
        # §4.2.3.2: queue setup happens before DRIVER_OK on a queue that is not ready; writes
        # to a ready queue or a live device would change rings under the device: ignore them.
        if q is None or self.status & (DRIVER_OK | FAILED) or self.needs_reset:
            self.ignored_writes += 1
            return
        if offset == QUEUE_READY:
            q.ready = bool(value & 1)
            return
        if q.ready:
            self.ignored_writes += 1
            return
        if offset == QUEUE_NUM:
            q.size = value  # checked at DRIVER_OK: power of two, at most QueueNumMax
        elif offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH):
            q.desc = _set_half(q.desc, value, offset == QUEUE_DESC_HIGH)
        elif offset in (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH):
            q.driver = _set_half(q.driver, value, offset == QUEUE_DRIVER_HIGH)
        else:
            q.device = _set_half(q.device, value, offset == QUEUE_DEVICE_HIGH)

    # -- status state machine (§2.1, §3.1.1) ----------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        # §2.1.2: the driver MUST NOT clear a status bit; DEVICE_NEEDS_RESET belongs to the device.
        if old & ~value & ~DEVICE_NEEDS_RESET:
            self.ignored_writes += 1
            return
        new = (value & ~DEVICE_NEEDS_RESET) | (old & DEVICE_NEEDS_RESET)
        added = new & ~old
        if added & FEATURES_OK and not self._features_acceptable():
            # §2.2.2 / §3.1.1 step 6: leave FEATURES_OK clear; the driver reads it back and fails.
            new &= ~FEATURES_OK
            added &= ~FEATURES_OK
        if added & FEATURES_OK:
            self.device.ack_features(self.driver_features)
        if added & DRIVER_OK and not new & FEATURES_OK:
            # §3.1.1: DRIVER_OK only after FEATURES_OK.
            new &= ~DRIVER_OK
            added &= ~DRIVER_OK
            self.ignored_writes += 1
        self.status = new
        if added & DRIVER_OK and not new & FAILED and not self.needs_reset:
            self._activate(resume=False)

    def _features_acceptable(self) -> bool:
        feats = self.driver_features
        if feats & ~self.device.features:
            log.info("driver acked features %#x the device does not offer", feats & ~self.device.features)
            return False
        if not feats & VIRTIO_F_VERSION_1:
            log.info("driver did not ack VIRTIO_F_VERSION_1; legacy drivers are not supported")
            return False
        problem = self.device.check_features(feats)
        if problem:
            log.info("device refused features %#x: %s", feats, problem)
            return False
        return True

    def _activate(self, *, resume: bool) -> None:
        try:
            queues = [self._build_queue(c, resume) if c.ready else None for c in self.queues]
        except QueueError as e:
            self.signal_needs_reset(str(e))
            return
        self.device.activate(self.memory, queues, self)

    def _build_queue(self, c: QueueConfig, resume: bool) -> Queue:
        feats = self.driver_features
        return Queue(self.memory, c.size, c.desc, c.driver, c.device, max_size=c.max_size,
                     event_idx=bool(feats & VIRTIO_F_EVENT_IDX),
                     indirect=bool(feats & VIRTIO_F_INDIRECT_DESC), resume=resume)

    def reset(self) -> None:
        """Device reset (§2.4): back to the state right after power-on."""
        with self._lock:
            self.device.reset()
            self._reset_transport()

    # -- kicks and interrupts ------------------------------------------------------------------
    def queue_notify(self, index: int) -> bool:
        """A kick for queue `index` (QueueNotify write or ioeventfd); never raises for guest errors."""
        with self._lock:
            return self._notify_locked(index)

    def _notify_locked(self, index: int) -> bool:
        if not self.status & DRIVER_OK or self.status & FAILED or self.needs_reset:
            return False
        return self.device.process_queue(index)

    def kick_all(self) -> None:
        """Process every enabled queue and raise one used interrupt (after `restore`).

        Kicks sent while no process was listening are lost; the interrupt covers a crash between
        writing a used idx and signalling it.  A spurious interrupt is harmless (§2.7.7).
        """
        with self._lock:
            if not self.status & DRIVER_OK or self.needs_reset:
                return
            for i, c in enumerate(self.queues):
                if c.ready:
                    self._notify_locked(i)
            self.signal_used()

    # -- host loop hooks (`VirtioDevice.poll_fds` and friends), under the register lock --------
    def poll_fds(self) -> list[tuple[int, int]]:
        """Host fds the device wants polled now: (fd, select.POLLIN | select.POLLOUT)."""
        with self._lock:
            return [] if self.status & FAILED else self.device.poll_fds()

    def on_ready(self, fd: int, events: int) -> bool:
        """A host fd from `poll_fds()` is ready; never raises for guest errors."""
        with self._lock:
            return self.device.on_ready(fd, events)

    def next_deadline_ns(self) -> int | None:
        """When (`time.monotonic_ns()`) the host loop should call `on_timer`, or None."""
        with self._lock:
            if not self.status & DRIVER_OK or self.needs_reset:
                return None
            return self.device.next_deadline_ns()

    def on_timer(self, now_ns: int) -> bool:
        with self._lock:
            if not self.status & DRIVER_OK or self.status & FAILED or self.needs_reset:
                return False
            return self.device.on_timer(now_ns)

    def signal_used(self) -> None:
        self.interrupt_status |= INT_USED_BUFFER
        self.notify()

    def signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self.interrupt_status |= INT_CONFIG_CHANGE
        self.notify()

    def signal_needs_reset(self, reason: str) -> None:
        """§2.1.2: set DEVICE_NEEDS_RESET; if DRIVER_OK, send a config change notification."""
        if self.needs_reset:
            return
        log.warning("virtio device %d needs reset: %s", self.device.device_type, reason)
        self.needs_reset_reason = reason
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self.interrupt_status |= INT_CONFIG_CHANGE
            self.notify()

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & DEVICE_NEEDS_RESET)

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything the driver programmed, as plain ints/bools/lists (msgpack-able)."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "device_type": self.device.device_type,
                "status": self.status,
                "driver_features": self.driver_features,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "queues": [c.to_dict() for c in self.queues],
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild the transport in a fresh device from `state()` of an earlier one.

        If the driver had reached DRIVER_OK, the device is activated with queues that resume at
        the used idx found in guest memory (see `Queue`), so chains the old process had taken
        but not completed are processed again.  Call `kick_all()` once the notifier works.
        """
        with self._lock:
            if state.get("version") != STATE_VERSION or state.get("device_type") != self.device.device_type:
                raise ValueError("transport state is from another version or device type")
            queues = state["queues"]
            if len(queues) != len(self.queues):
                raise ValueError(f"transport state has {len(queues)} queues, the device {len(self.queues)}")
            self.device.reset()
            self._reset_transport()
            self.driver_features = int(state["driver_features"])
            self.device_features_sel = int(state["device_features_sel"])
            self.driver_features_sel = int(state["driver_features_sel"])
            self.queue_sel = int(state["queue_sel"])
            self.interrupt_status = int(state["interrupt_status"])
            self.config_generation = int(state["config_generation"])
            for c, saved in zip(self.queues, queues):
                c.size, c.ready = int(saved["size"]), bool(saved["ready"])
                c.desc, c.driver, c.device = int(saved["desc"]), int(saved["driver"]), int(saved["device"])
            self.status = int(state["status"])
            if self.status & FEATURES_OK:
                self.device.ack_features(self.driver_features)
            if self.status & DRIVER_OK and not self.status & (FAILED | DEVICE_NEEDS_RESET):
                self._activate(resume=True)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self.device.stats())
            out.update(invalid_accesses=self.invalid_accesses, ignored_writes=self.ignored_writes,
                       status=self.status, needs_reset=self.needs_reset)
            return out
