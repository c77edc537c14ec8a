"""The virtio-mmio register file (VIRTIO 1.2 §4.2.2) and the one transport state both sides keep.

`TransportState` is what the guest driver has programmed — features, status, queue selection and
each queue's size, readiness and ring addresses — *as the device accepted it*.  Its single
`apply_write()` decides, for every register write, whether the write takes effect and what the
device must then do (an `Effect`).  Three parties use it:

- the device process's `MmioDevice`, which carries out the effects (activate queues, reset, ...);
- the core's shadow in the proxy, fed by every register write the guest makes, so the core knows
  the transport state without trusting the device's answers;
- the `Activate` message that hands the shadow to a restarted device (`to_wire`/`from_wire`).

Because the rules are one piece of code, the core's shadow cannot record what the device ignored
(a queue written after QueueReady, features after FEATURES_OK) and a restart replays exactly the
state the live device had.  Memory is bounded by the device's real queue count.

This module is a leaf shared by the core and the device processes (it imports neither).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

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
SLOT_SIZE = 0x1000  # one device's register window; config space is CONFIG..SLOT_SIZE

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

# Reserved feature bits every device here negotiates on (§6).
VIRTIO_F_VERSION_1 = 1 << 32

# Registers whose value never changes here (§4.2.2): no shared memory region (length and base
# read as all ones), no queue reset (VIRTIO_F_RING_RESET is not offered).
FIXED_REGISTERS = {MAGIC_VALUE: MAGIC, VERSION: MMIO_VERSION, VENDOR_ID: VENDOR_BKHD,
                   SHM_LEN_LOW: 0xFFFFFFFF, SHM_LEN_HIGH: 0xFFFFFFFF,
                   SHM_BASE_LOW: 0xFFFFFFFF, SHM_BASE_HIGH: 0xFFFFFFFF,
                   QUEUE_RESET: 0}

MAX_QUEUES = 64  # far above any device here; bounds Activate and a hostile QueueSel
MAX_CONFIG_SIZE = SLOT_SIZE - CONFIG

_QUEUE_ADDRESS = {
    QUEUE_DESC_LOW: ("desc", False), QUEUE_DESC_HIGH: ("desc", True),
    QUEUE_DRIVER_LOW: ("driver", False), QUEUE_DRIVER_HIGH: ("driver", True),
    QUEUE_DEVICE_LOW: ("device", False), QUEUE_DEVICE_HIGH: ("device", True),
}


class Effect(enum.Enum):
    """What the device must do after `apply_write` (the core's shadow only records)."""

    NONE = "none"                # state changed (or not); nothing else to do
    INVALID = "invalid"          # not a writable register, or a wrong access size: counted
    IGNORED = "ignored"          # a write the rules refuse (§2.1.2, §3.1.1, §4.2.3.2): counted
    RESET = "reset"              # Status = 0 (§2.4): forget the driver
    FEATURES_OK = "features-ok"  # the driver's features were accepted: ack them to the device
    DRIVER_OK = "driver-ok"      # build the queues and start (§3.1.1 step 8)
    NOTIFY = "notify"            # QueueNotify: `value` is the queue index
    INTERRUPT_ACK = "ack"        # InterruptACK: `value` is the mask to clear
    CONFIG_WRITE = "config"      # a write to config space: `offset` (from CONFIG) and `data`


@dataclass(frozen=True)
class Write:
    """One decoded register write and what it asks of the device."""

    effect: Effect
    value: int = 0
    offset: int = 0
    data: bytes = b""


@dataclass
class QueueState:
    """What the driver programmed for one queue (§4.2.2 Queue* registers)."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def __post_init__(self) -> None:
        if not self.size:
            self.size = self.max_size  # QueueNum reads as QueueNumMax until written

    def clear(self) -> None:
        self.size, self.ready = self.max_size, False
        self.desc = self.driver = self.device = 0


def _set_half(value: int, data: int, high: bool) -> int:
    return (value & 0xFFFFFFFF) | (data << 32) if high else (value & ~0xFFFFFFFF) | data


@dataclass
class TransportState:
    """One virtio-mmio register file's driver-programmed state; see the module docstring.

    `device_features` are what the device offers (the device process reports them; the core
    checks them against the device kind); `queue_max_sizes` its queues' QueueNumMax."""

    queue_max_sizes: Sequence[int]
    device_features: int
    status: int = 0
    driver_features: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    queue_sel: int = 0
    shm_sel: int = 0
    queues: list[QueueState] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.queue_max_sizes) > MAX_QUEUES:
            raise ValueError(f"{len(self.queue_max_sizes)} queues: at most {MAX_QUEUES}")
        if not self.queues:
            self.queues = [QueueState(n) for n in self.queue_max_sizes]

    # -- the rules ------------------------------------------------------------------------------
    def selected(self) -> QueueState | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & DEVICE_NEEDS_RESET)

    def reset(self) -> None:
        """§2.4: back to the state right after power-on (device features stay)."""
        self.status = self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = self.shm_sel = 0
        for q in self.queues:
            q.clear()

    def features_acceptable(self) -> bool:
        """§2.2.2: only offered bits, and VERSION_1 (no legacy drivers here)."""
        feats = self.driver_features
        return not feats & ~self.device_features and bool(feats & VIRTIO_F_VERSION_1)

    def apply_write(self, offset: int, data: bytes) -> Write:
        """Apply one register write as the device does; config-space writes pass through."""
        if offset >= CONFIG:
            if offset + len(data) > SLOT_SIZE:
                return Write(Effect.INVALID)
            return Write(Effect.CONFIG_WRITE, offset=offset - CONFIG, data=bytes(data))
        if len(data) != 4 or offset % 4:
            return Write(Effect.INVALID)  # §4.2.2: registers are aligned 32-bit accesses
        value = int.from_bytes(data, "little")
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            # §3.1.1: features are written before FEATURES_OK; afterwards they are fixed.
            if self.status & FEATURES_OK or self.driver_features_sel >= 2:
                return Write(Effect.IGNORED)
            self.driver_features = _set_half(self.driver_features, value,
                                             self.driver_features_sel == 1)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in _QUEUE_ADDRESS or offset in (QUEUE_NUM, QUEUE_READY):
            return self._write_queue(offset, value)
        elif offset == QUEUE_NOTIFY:
            # Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index (§4.2.2).
            return Write(Effect.NOTIFY, value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            return Write(Effect.INTERRUPT_ACK, value)
        elif offset == STATUS:
            return self._write_status(value & 0xFF)
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset == QUEUE_RESET:
            return Write(Effect.IGNORED)  # VIRTIO_F_RING_RESET is not offered
        else:
            return Write(Effect.INVALID)
        return Write(Effect.NONE)

    def _write_queue(self, offset: int, value: int) -> Write:
        q = self.selected()
        # §4.2.3.2: queues are set up before DRIVER_OK, on a queue that is not ready; writes to a
        # ready queue or a live device would change rings under the device: ignored.
        if q is None or self.status & (DRIVER_OK | FAILED) or self.needs_reset:
            return Write(Effect.IGNORED)
        if offset == QUEUE_READY:
            q.ready = bool(value & 1)
        elif q.ready:
            return Write(Effect.IGNORED)
        elif offset == QUEUE_NUM:
            q.size = value  # checked at DRIVER_OK: a power of two, at most QueueNumMax
        else:
            name, high = _QUEUE_ADDRESS[offset]
            setattr(q, name, _set_half(getattr(q, name), value, high))
        return Write(Effect.NONE)

    def _write_status(self, value: int) -> Write:
        """The device-status state machine (§2.1, §3.1.1)."""
        if value == 0:
            self.reset()
            return Write(Effect.RESET)
        old = self.status
        # §2.1.2: the driver MUST NOT clear a status bit; DEVICE_NEEDS_RESET is the device's.
        if old & ~value & ~DEVICE_NEEDS_RESET:
            return Write(Effect.IGNORED)
        new = (value & ~DEVICE_NEEDS_RESET) | (old & DEVICE_NEEDS_RESET)
        added = new & ~old
        effect = Effect.NONE
        if added & FEATURES_OK:
            if self.features_acceptable():
                effect = Effect.FEATURES_OK
            else:
                # §2.2.2 / §3.1.1 step 6: FEATURES_OK stays clear; the driver reads it back.
                new &= ~FEATURES_OK
                added &= ~FEATURES_OK
        if added & DRIVER_OK and not new & FEATURES_OK:
            new &= ~DRIVER_OK  # §3.1.1: DRIVER_OK only after FEATURES_OK
            self.status = new
            return Write(Effect.IGNORED)
        self.status = new
        if added & DRIVER_OK and not new & FAILED and not self.needs_reset:
            # FEATURES_OK and DRIVER_OK in one write: the device acks features when activating.
            return Write(Effect.DRIVER_OK)
        return Write(effect)

    def mark_needs_reset(self) -> None:
        """The device set DEVICE_NEEDS_RESET (§2.1.2)."""
        self.status |= DEVICE_NEEDS_RESET

    # -- reads the state answers ---------------------------------------------------------------
    def read_register(self, offset: int) -> int | None:
        """The value of a register this state determines (None: ask the device)."""
        q = self.selected()
        if offset == DEVICE_FEATURES:
            return (self.device_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q else 0  # §4.2.2: 0 for a queue that is not available
        if offset == QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == STATUS:
            return self.status
        return None

    # -- the wire form (the body of `messages.Activate`) -----------------------------------------
    def to_wire(self) -> dict[str, Any]:
        return {"status": self.status, "driver_features": self.driver_features,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel, "queue_sel": self.queue_sel,
                "queues": tuple((i, q.size, int(q.ready), q.desc, q.driver, q.device)
                                for i, q in enumerate(self.queues))}

    def load_wire(self, wire: dict[str, Any]) -> None:
        """Take over a state sent by the core; rows for queues this device lacks are refused."""
        rows = wire["queues"]
        if len(rows) != len(self.queues) or [r[0] for r in rows] != list(range(len(self.queues))):
            raise ValueError(f"transport state has queues {[r[0] for r in rows]}, "
                             f"the device {len(self.queues)}")
        self.status = wire["status"]
        self.driver_features = wire["driver_features"]
        self.device_features_sel = wire["device_features_sel"]
        self.driver_features_sel = wire["driver_features_sel"]
        self.queue_sel = wire["queue_sel"]
        for q, (_, size, ready, desc, driver, device) in zip(self.queues, rows):
            q.size, q.ready, q.desc, q.driver, q.device = size, bool(ready), desc, driver, device
