"""The virtio-mmio transport, modern (Version 2) register file (VIRTIO 1.2 §4.2.2).

`MmioDevice` is a `BusDevice`: it decodes register accesses once for every device and carries
out what the shared `TransportState` rules decide (`ipc_protocol.virtio_mmio`): negotiating
features, building the queues at DRIVER_OK, resetting.  It also implements the `Interrupt` a
device signals.  `state()`/`restore()` carry everything the driver programmed, so a crashed
device process can be replaced unnoticed; `restore_wire()` takes the core's copy (`Activate`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from ipc_protocol.guest_memory import GuestMemory
from ipc_protocol.register_page import RegisterPage
# The register map lives in the shared leaf; the names are re-exported for device code and tests.
from ipc_protocol.virtio_mmio import (ACKNOWLEDGE, CONFIG, CONFIG_GENERATION, DEVICE_FEATURES,  # noqa: F401
                                      DEVICE_FEATURES_SEL, DEVICE_ID, DEVICE_NEEDS_RESET, DRIVER,
                                      DRIVER_FEATURES, DRIVER_FEATURES_SEL, DRIVER_OK, FAILED,
                                      FEATURES_OK, INT_CONFIG_CHANGE, INT_USED_BUFFER,
                                      INTERRUPT_ACK, INTERRUPT_STATUS, MAGIC, MAGIC_VALUE,
                                      MMIO_VERSION, QUEUE_DESC_HIGH, QUEUE_DESC_LOW,
                                      QUEUE_DEVICE_HIGH, QUEUE_DEVICE_LOW, QUEUE_DRIVER_HIGH,
                                      QUEUE_DRIVER_LOW, QUEUE_NOTIFY, QUEUE_NUM, QUEUE_NUM_MAX,
                                      QUEUE_READY, QUEUE_RESET, QUEUE_SEL, SHM_BASE_HIGH,
                                      SHM_BASE_LOW, SHM_LEN_HIGH, SHM_LEN_LOW, SHM_SEL, STATUS,
                                      VENDOR_BKHD, VENDOR_ID, VERSION, FIXED_REGISTERS, Effect,
                                      QueueState, TransportState)

from .device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VirtioDevice
from .errors import QueueError
from .queue import Queue

log = logging.getLogger(__name__)

STATE_VERSION = 1

_FIXED_REGISTERS = FIXED_REGISTERS


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
        self.transport = TransportState(list(device.queue_max_sizes), device.features)
        self._interrupt_status = 0
        self.config_generation = 0
        self.page: RegisterPage | None = None

    # -- the register page (a device process: the core answers most reads from it) -------------
    def attach_page(self, page: RegisterPage) -> None:
        """Publish InterruptStatus, DEVICE_NEEDS_RESET, ConfigGeneration and the config space
        in `page` from now on (see `ipc_protocol.register_page`)."""
        with self._lock:
            if self._interrupt_status:
                page.raise_interrupt(self._interrupt_status)
            self.page = page
            self.publish()

    def publish(self) -> None:
        """Refresh what the page says of config space, generation and DEVICE_NEEDS_RESET."""
        if self.page is not None:
            self.page.publish(self.device.config_bytes(), self.config_generation, self.needs_reset)

    @property
    def interrupt_status(self) -> int:
        return self.page.interrupt_status() if self.page is not None else self._interrupt_status

    @interrupt_status.setter
    def interrupt_status(self, value: int) -> None:
        if self.page is not None:
            self.page.clear_interrupts()
            self.page.raise_interrupt(value)
        else:
            self._interrupt_status = value

    def _raise_interrupt(self, bits: int) -> None:
        # Set before the irqfd is signalled: the core reads the page when the guest asks.
        if self.page is not None:
            self.page.raise_interrupt(bits)
        else:
            self._interrupt_status |= bits

    # -- the transport state, by name (tests and the device host read these) -------------------
    @property
    def status(self) -> int:
        return self.transport.status

    @property
    def driver_features(self) -> int:
        return self.transport.driver_features

    @property
    def queues(self) -> list[QueueState]:
        return self.transport.queues

    @property
    def needs_reset(self) -> bool:
        return self.transport.needs_reset

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

    def _read_register(self, offset: int) -> int | None:
        if offset in _FIXED_REGISTERS:
            return _FIXED_REGISTERS[offset]
        if offset == DEVICE_ID:
            return self.device.device_type
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return self.transport.read_register(offset)  # None: write-only or unknown

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._carry_out(self.transport.apply_write(offset, bytes(data)))

    def _carry_out(self, w: Any) -> None:
        effect = w.effect
        if effect is Effect.INVALID:
            self.invalid_accesses += 1
        elif effect is Effect.IGNORED:
            self.ignored_writes += 1
        elif effect is Effect.CONFIG_WRITE:
            self.device.write_config(w.offset, w.data)
            self.publish()
        elif effect is Effect.NOTIFY:
            self._notify_locked(w.value)
        elif effect is Effect.INTERRUPT_ACK:
            if self.page is not None:
                self.page.ack(w.value)
            else:
                self._interrupt_status &= ~w.value
        elif effect is Effect.RESET:
            self._reset_locked()
        elif effect is Effect.FEATURES_OK:
            self.device.ack_features(self.transport.driver_features)
        elif effect is Effect.DRIVER_OK:
            self.device.ack_features(self.transport.driver_features)
            self._activate(resume=False)

    def _activate(self, *, resume: bool) -> None:
        try:
            queues = [self._build_queue(c, resume) if c.ready else None for c in self.queues]
        except QueueError as e:
            self.signal_needs_reset(str(e))
            return
        self.device.activate(self.memory, queues, self)

    def _build_queue(self, c: QueueState, resume: bool) -> Queue:
        feats = self.transport.driver_features
        return Queue(self.memory, c.size, c.desc, c.driver, c.device, max_size=c.max_size,
                     event_idx=bool(feats & VIRTIO_F_EVENT_IDX),
                     indirect=bool(feats & VIRTIO_F_INDIRECT_DESC), resume=resume)

    def reset(self) -> None:
        """Device reset (§2.4): back to the state right after power-on."""
        with self._lock:
            self.transport.reset()
            self._reset_locked()

    def _reset_locked(self) -> None:
        self.device.reset()
        self.interrupt_status = 0
        self.config_generation = 0
        self.needs_reset_reason = None
        self.publish()

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
            self.device.on_resumed()
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

    def signal_used(self, queue_index: int | None = None) -> None:
        """Used buffers were added (one interrupt line for every queue of an mmio device)."""
        self._raise_interrupt(INT_USED_BUFFER)
        self.notify()

    def signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self.publish()
        self._raise_interrupt(INT_CONFIG_CHANGE)
        self.notify()

    def signal_needs_reset(self, reason: str) -> None:
        """§2.1.2: set DEVICE_NEEDS_RESET; if DRIVER_OK, send a config change notification."""
        if self.needs_reset:
            return
        log.warning("virtio device %d needs reset: %s", self.device.device_type, reason)
        self.needs_reset_reason = reason
        self.transport.mark_needs_reset()
        self.publish()
        if self.status & DRIVER_OK:
            self._raise_interrupt(INT_CONFIG_CHANGE)
            self.notify()

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything the driver programmed, as plain ints/bools/lists (msgpack-able)."""
        with self._lock:
            t = self.transport
            return {
                "version": STATE_VERSION,
                "device_type": self.device.device_type,
                "status": t.status,
                "driver_features": t.driver_features,
                "device_features_sel": t.device_features_sel,
                "driver_features_sel": t.driver_features_sel,
                "queue_sel": t.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "queues": [{"size": q.size, "ready": q.ready, "desc": q.desc, "driver": q.driver,
                            "device": q.device} for q in t.queues],
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild the transport in a fresh device from `state()` of an earlier one.

        If the driver had reached DRIVER_OK, the device is activated with queues that resume at
        the used idx found in guest memory (see `Queue`), so chains the old process had taken
        but not completed are processed again.  Call `kick_all()` once the notifier works.
        """
        if state.get("version") != STATE_VERSION or state.get("device_type") != self.device.device_type:
            raise ValueError("transport state is from another version or device type")
        queues = state["queues"]
        wire = {k: int(state[k]) for k in ("status", "driver_features", "device_features_sel",
                                            "driver_features_sel", "queue_sel")}
        wire["queues"] = tuple((i, int(q["size"]), int(bool(q["ready"])), int(q["desc"]),
                                int(q["driver"]), int(q["device"])) for i, q in enumerate(queues))
        self.restore_wire(wire, interrupt_status=int(state["interrupt_status"]),
                          config_generation=int(state["config_generation"]))

    def restore_wire(self, wire: dict[str, Any], *, interrupt_status: int = 0,
                     config_generation: int = 0) -> None:
        """Take over `TransportState.to_wire()` (the core's shadow, from `Activate`)."""
        with self._lock:
            self._reset_locked()
            self.transport.reset()
            self.transport.load_wire(wire)
            self.interrupt_status = interrupt_status
            self.config_generation = config_generation
            self.publish()
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
