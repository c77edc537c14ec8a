"""A virtio-mmio device whose virtqueues an external vhost-user backend serves.

The core keeps the register file (`TransportState`, the same rules as every device here) in
process -- the backend is the isolated party -- and hands the backend guest RAM (SET_MEM_TABLE
with the memfd) and each ring with the slot's KVM ioeventfd eventfd as kick fd and its irqfd
eventfd as call fd: the data path never touches the core.

Register accesses never wait on the backend: the config space is a copy (read from the backend
with GET_CONFIG at connect and on its CONFIG_CHANGE_MSG; virtio-fs's is built here), and all
socket I/O happens on one monitor thread, which reconciles what the guest programmed with what
the backend was told: DRIVER_OK starts the rings, a reset stops them (GET_VRING_BASE).
InterruptStatus reads USED_BUFFER while the driver is live (the backend signals KVM directly, so
the core cannot know the exact bit; Linux's and guest_kit's handlers just look at their rings)
plus CONFIG_CHANGE when the core raised one.

When the backend's socket closes (or it breaks the protocol), the rings stay as they are, kicks
pile up in the eventfds, and the monitor dials again with back-off (10 ms doubling to 100 ms),
without limit unless `reconnect_timeout` is given -- then the device fails like a failed device
process: DEVICE_NEEDS_RESET and a config-change interrupt.  The new backend gets the guest's
negotiated features (it must offer them) and the rings at the guest's used index, and:

- with INFLIGHT_SHMFD (Bulkhead's own backends), the inflight buffer the core kept (GET_INFLIGHT_FD
  at DRIVER_OK, SET_INFLIGHT_FD on every connection): the backend resubmits what it had taken;
- without (qemu-storage-daemon 7.2, which completes out of order), the `RingWatch` kept of every
  queue (counted by a native thread, `native_watch.py`, else by the monitor): the outstanding
  heads are written into the avail slots between the used and avail indices, so the new backend
  runs exactly those once (see `ring_watch.py`); a watch that lost track fails the device.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ipc_protocol import vhost_user as vu
from ipc_protocol import virtio_mmio as regs
from ipc_protocol.errors import ProtocolError
from ipc_protocol.guest_memory import GuestMemory, GuestMemoryError

from .connection import BackendConnection, BackendRefused, Ring, dial
from . import native_watch
from .native_watch import NativeRingWatch
from .ring_watch import RingWatch

log = logging.getLogger(__name__)

# Transport feature bits passed through from the backend: the device-specific ones (0-23),
# INDIRECT_DESC, EVENT_IDX, VERSION_1.  Not packed rings (the watch reads split rings), not
# NOTIFICATION_DATA (the ioeventfds match the queue index), not ACCESS_PLATFORM (no IOMMU).
PASSED_FEATURES = (1 << 24) - 1 | 1 << 28 | 1 << 29 | regs.VIRTIO_F_VERSION_1
VIRTIO_BLK_F_MQ = 1 << 12
CONFIG_SIZES = {1: 12, 2: 60, 3: 12, 19: 8, 26: 40}  # bytes of each kind's config we read
QUEUE_SIZE = 256
DIAL_BACKOFF = (0.01, 0.1)  # s: dialing a Unix socket costs next to nothing
WATCH_INTERVAL = 0.001
GIL_SWITCH_INTERVAL = 0.0005
CONFIG_CHANGES_PER_S = 50  # a backend sending more is flooding us
START_WAIT = 10.0


@dataclass(frozen=True)
class FrontendSpec:
    name: str
    socket: str
    virtio_id: int
    queues: int
    reconnect: bool = True
    reconnect_timeout: float | None = None
    local_config: bytes | None = None  # virtio-fs: built here (virtiofsd has no CONFIG)

    @property
    def config_size(self) -> int:
        if self.local_config is not None:
            return len(self.local_config)
        return CONFIG_SIZES.get(self.virtio_id, 0)


class VhostUserFrontend:
    """The Bus's view of one vhost-user device (a `BusDevice`) and its monitor thread."""

    def __init__(self, spec: FrontendSpec, memory: GuestMemory, irqfd: int, kick_fds: list[int]) -> None:
        self.spec = spec
        self.name = spec.name
        self.memory = memory
        self.irqfd = irqfd
        self.kick_fds = kick_fds
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        self._thread: threading.Thread | None = None
        self.conn: BackendConnection | None = None
        self.config = bytearray(spec.local_config or b"")
        self.config_generation = 0
        self.config_irq = False
        self._config_writes: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=64)
        # Guest side, under _lock: the transport state and its epoch (one per DRIVER_OK).
        self.state: regs.TransportState | None = None
        self.epoch = 0
        self.rings: list[Ring] = []
        # Backend side, monitor thread only.
        self.running_epoch = 0        # the epoch whose rings the current connection runs (0: none)
        self.programmed_epoch = 0     # the epoch some connection has started (resume vs fresh)
        self.running_rings: list[int] = []
        self.inflight: tuple[int, vu.Inflight] | None = None
        self.watches: dict[int, RingWatch] = {}
        self.native: dict[int, NativeRingWatch] = {}  # sampling the watches, when built
        self.lost_at: float | None = None
        self._next_dial = 0.0
        self._backoff = DIAL_BACKOFF[0]
        self._config_changes: collections.deque[float] = collections.deque()
        self.counters = collections.Counter[str]()
        self.last_error = ""

    # -- start -------------------------------------------------------------------------------------
    def start_backend(self, wait: float = START_WAIT) -> None:
        """The first connection, before the guest runs (its features and config decide what the
        guest sees).  Raises `BackendRefused`/`OSError` with one line for the user."""
        deadline = time.monotonic() + wait
        while True:
            try:
                sock = dial(self.spec.socket)
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if time.monotonic() > deadline:
                    raise BackendRefused(f"no vhost-user backend listens on {self.spec.socket} "
                                         f"({err.strerror}): start it first") from None
                time.sleep(0.05)
        conn = BackendConnection(sock)
        try:
            self._handshake(conn)
        except BaseException:
            conn.close()
            raise
        offered = conn.features & PASSED_FEATURES
        if self.spec.virtio_id == 2 and self.spec.queues == 1:
            offered &= ~VIRTIO_BLK_F_MQ
        if not offered & regs.VIRTIO_F_VERSION_1:
            conn.close()
            raise BackendRefused(f"the backend on {self.spec.socket} does not offer VIRTIO_F_VERSION_1")
        self.state = regs.TransportState([QUEUE_SIZE] * self.spec.queues, offered)
        self.conn = conn

    def start(self) -> None:
        if self.conn is not None and not self.conn.has_inflight and not native_watch.available():
            # The ring watch must look at least once per ring's worth of completions; a vCPU
            # thread holds the GIL for up to the switch interval (5 ms by default) at a time.
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._monitor, name=f"vhost-{self.name}", daemon=True)
        self._thread.start()

    # -- the register file (vCPU threads) ----------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        with self._lock:
            value = self._read_locked(offset, len(data))
        if isinstance(value, bytes):
            data[:] = value
        else:
            data[:] = (value & (1 << 8 * len(data)) - 1).to_bytes(len(data), "little")

    def _read_locked(self, offset: int, size: int) -> int | bytes:
        st = self.state
        assert st is not None
        if offset >= regs.CONFIG:
            start = offset - regs.CONFIG
            chunk = bytes(self.config[start:start + size])
            return chunk + bytes(size - len(chunk))
        if size != 4 or offset % 4:
            self.counters["invalid_accesses"] += 1
            return 0
        fixed = regs.FIXED_REGISTERS.get(offset)
        if fixed is not None:
            return fixed
        if offset == regs.DEVICE_ID:
            return self.spec.virtio_id
        if offset == regs.INTERRUPT_STATUS:
            live = st.status & regs.DRIVER_OK and not st.needs_reset
            return (regs.INT_USED_BUFFER if live else 0) | (regs.INT_CONFIG_CHANGE if self.config_irq else 0)
        if offset == regs.CONFIG_GENERATION:
            return self.config_generation
        value = st.read_register(offset)  # features, QueueNumMax, QueueReady, Status
        return 0 if value is None else value  # write-only registers and holes read as 0

    def write(self, offset: int, data: bytes) -> None:
        wake = False
        with self._lock:
            st = self.state
            assert st is not None
            w = st.apply_write(offset, data)
            if w.effect in (regs.Effect.INVALID, regs.Effect.IGNORED):
                self.counters[f"{w.effect.value}_writes"] += 1
            elif w.effect is regs.Effect.RESET:
                self.config_irq = False
                self.rings = []
                wake = True
            elif w.effect is regs.Effect.DRIVER_OK:
                self._driver_ok_locked(st)
                wake = True
            elif w.effect is regs.Effect.INTERRUPT_ACK:
                if w.value & regs.INT_CONFIG_CHANGE:
                    self.config_irq = False
            elif w.effect is regs.Effect.CONFIG_WRITE:
                if self.spec.local_config is None and w.offset + len(w.data) <= len(self.config):
                    self.config[w.offset:w.offset + len(w.data)] = w.data
                    self._config_writes.append((w.offset, w.data))
                    wake = True
        if wake:
            self._wake()

    def _driver_ok_locked(self, st: regs.TransportState) -> None:
        """Check the rings the driver set up (sizes, addresses inside RAM) before any backend
        sees them; a bad one fails the device as a device process would."""
        rings = []
        for i, q in enumerate(st.queues):
            if not q.ready:
                continue
            if q.size == 0 or q.size > q.max_size or q.size & (q.size - 1):
                return self._fail_locked(f"queue {i} size {q.size} is not a power of two <= {q.max_size}")
            spans = ((q.desc, 16 * q.size), (q.driver, 6 + 2 * q.size), (q.device, 6 + 8 * q.size))
            if not all(self.memory.check(a, n) for a, n in spans):
                return self._fail_locked(f"queue {i} rings lie outside guest RAM")
            rings.append(Ring(i, q.size, q.desc, q.driver, q.device))
        self.epoch += 1
        self.rings = rings

    def _fail_locked(self, why: str) -> None:
        st = self.state
        assert st is not None
        if not st.needs_reset:
            log.warning("device %s failed: %s; the guest must reset it", self.name, why)
            self.counters["failures"] += 1
            self.last_error = why
        st.status |= regs.DEVICE_NEEDS_RESET
        self.rings = []
        self.config_irq = True
        os.eventfd_write(self.irqfd, 1)

    def _guest_wants(self) -> tuple[int, list[Ring]]:
        with self._lock:
            st = self.state
            assert st is not None
            if st.status & regs.DRIVER_OK and not st.needs_reset and self.rings:
                return self.epoch, list(self.rings)
            return 0, []

    # -- the monitor thread ------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _monitor(self) -> None:
        while not self._closing:
            try:
                self._step()
            except Exception as err:  # noqa: BLE001 - a backend must never take the core down
                log.exception("vhost-user device %s", self.name)
                self._lost(f"internal error: {err}")
                time.sleep(0.05)

    def _step(self) -> None:
        if self.conn is None:
            self._dial()
        if self.conn is not None:
            self._reconcile()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        conn = self.conn
        if conn is not None:
            poller.register(conn.fileno(), select.POLLIN)
            if conn.channel is not None:
                poller.register(conn.channel.fileno(), select.POLLIN)
        watching = bool(self.watches) and self.running_epoch and not self.native
        if watching:
            timeout = WATCH_INTERVAL
        elif conn is None:
            timeout = max(0.0, self._next_dial - time.monotonic())
        else:
            timeout = 1.0
        for fd, _ in poller.poll(int(timeout * 1000) + (0 if watching else 1)):
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            elif conn is not None and fd == conn.fileno():
                # Requests are only ever sent from this thread, which is not waiting for a
                # reply now: whatever is readable is EOF or something nobody asked for.
                self._lost("the backend closed its socket" if not _peek(conn)
                           else "the backend sent a message nobody asked for")
                return
            elif conn is not None and conn.channel is not None and fd == conn.channel.fileno():
                self._serve_channel(conn)
        if self.conn is not None and self.watches and self.running_epoch:
            for ring in self._ring_list():
                self._sample(ring)

    def _ring_list(self) -> list[Ring]:
        with self._lock:
            return list(self.rings)

    def _dial(self) -> None:
        now = time.monotonic()
        if self.lost_at is not None and self.spec.reconnect_timeout is not None \
                and now - self.lost_at > self.spec.reconnect_timeout:
            with self._lock:
                if self.rings:
                    self._fail_locked(f"its vhost-user backend was gone for more than "
                                      f"{self.spec.reconnect_timeout:g} s")
        if now < self._next_dial:
            return
        try:
            sock = dial(self.spec.socket)
        except OSError:
            self._next_dial = now + self._backoff
            self._backoff = min(self._backoff * 2, DIAL_BACKOFF[1])
            return
        conn = BackendConnection(sock)
        try:
            self._handshake(conn)
            epoch, _ = self._guest_wants()
            negotiated = self._negotiated()
            if epoch and negotiated & ~conn.features:
                raise BackendRefused(f"the backend offers features {conn.features:#x}, the guest "
                                     f"negotiated {negotiated:#x}")
        except (ProtocolError, OSError) as err:
            conn.close()
            self._note_error(f"reconnect refused: {err}")
            self._next_dial = now + self._backoff
            self._backoff = min(self._backoff * 2, DIAL_BACKOFF[1])
            return
        self.conn = conn
        self._backoff = DIAL_BACKOFF[0]
        if self.lost_at is not None:
            self.counters["reconnects"] += 1
            log.warning("device %s: vhost-user backend back after %.1f ms", self.name,
                        (time.monotonic() - self.lost_at) * 1000)
        self.lost_at = None

    def _handshake(self, conn: BackendConnection) -> None:
        conn.handshake(self.spec.queues, need_config=self.spec.local_config is None
                       and self.spec.config_size > 0)
        if self.spec.local_config is None and self.spec.config_size:
            fresh = conn.get_config(self.spec.config_size)
            with self._lock:
                if self.state is not None and bytes(self.config) != fresh:
                    self._config_changed_locked()
                self.config[:] = fresh

    def _config_changed_locked(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self.config_irq = True
        os.eventfd_write(self.irqfd, 1)

    def _negotiated(self) -> int:
        with self._lock:
            assert self.state is not None
            return self.state.driver_features

    def _lost(self, why: str) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            self.counters["disconnects"] += 1
            log.warning("device %s: vhost-user backend lost: %s", self.name, why)
        self.last_error = why
        self.running_epoch = 0
        self.running_rings = []
        if self.lost_at is None:
            self.lost_at = time.monotonic()
        self._next_dial = time.monotonic() + DIAL_BACKOFF[0]
        if not self.spec.reconnect:
            with self._lock:
                if self.rings:
                    self._fail_locked(f"its vhost-user backend was lost ({why}) and reconnect is off")

    def _note_error(self, why: str) -> None:
        if why != self.last_error:  # a backend failing the same way again is not news
            log.warning("device %s: %s", self.name, why)
        self.last_error = why

    def _reconcile(self) -> None:
        """Make the backend run what the guest programmed, and nothing else."""
        conn = self.conn
        assert conn is not None
        try:
            while self._config_writes and self.running_epoch:
                offset, data = self._config_writes.popleft()
                conn.set_config(offset, data)
            epoch, rings = self._guest_wants()
            if self.running_epoch and self.running_epoch != epoch:
                self._stop_rings(conn)
            if epoch and self.running_epoch != epoch:
                self._start_rings(conn, epoch, rings)
        except (ProtocolError, OSError) as err:
            self._lost(str(err))

    def _stop_rings(self, conn: BackendConnection) -> None:
        """The guest reset the device: the backend stops its rings (and keeps the connection)."""
        for index in self.running_rings:
            conn.stop_ring(index)
        self.running_epoch = 0
        self.running_rings = []

    def _start_rings(self, conn: BackendConnection, epoch: int, rings: list[Ring]) -> None:
        resume = self.programmed_epoch == epoch
        if not resume:
            self._drop_inflight()
            self._drop_watches()
        elif not (conn.has_inflight and self.inflight is not None):
            why = self._watches_lost_track(rings)
            if why is not None:
                self._drop_watches()
                with self._lock:
                    self._fail_locked(why)
                return
        conn.set_features(self._negotiated())
        if conn.has_inflight:
            if self.inflight is None:
                self.inflight = conn.get_inflight(self.spec.queues, QUEUE_SIZE)
            conn.set_inflight(*self.inflight)
        conn.set_mem_table([(s.guest_phys_addr, s.size, s.file_offset) for s in self.memory.specs],
                           self.memory.fd)
        for ring in rings:
            base = self._resume_base(conn, ring) if resume else 0
            if not resume and not conn.has_inflight:
                self._watch(ring)
            native = self.native.get(ring.index)
            if native is not None and resume:
                # Paused by _watches_lost_track: on with the resumed state before the backend
                # can complete anything.
                native.import_from(self.watches[ring.index])
                native.resume()
            conn.start_ring(ring, base, self.kick_fds[ring.index], self.irqfd)
        self.running_epoch = self.programmed_epoch = epoch
        self.running_rings = [r.index for r in rings]
        for ring in rings:  # requests made while no backend ran (QEMU kicks once, too)
            os.eventfd_write(self.kick_fds[ring.index], 1)

    def _resume_base(self, conn: BackendConnection, ring: Ring) -> int:
        used_idx = self.memory.read_u16(ring.used + 2)
        watch = self.watches.get(ring.index)
        if conn.has_inflight and self.inflight is not None:
            return used_idx  # the backend resubmits what the inflight buffer lists
        if watch is None:
            self.counters["resumed_blind"] += 1
            log.warning("device %s ring %d: no record of what the lost backend held; resuming "
                        "at the used index", self.name, ring.index)
            return used_idx
        writes = watch.resubmit_layout(used_idx)
        for slot, head in writes:
            self.memory.write_u16(ring.avail + 4 + 2 * slot, head)
        self.counters["resubmitted"] += len(writes)
        if writes:
            log.warning("device %s ring %d: resubmitting %d request(s) the lost backend held",
                        self.name, ring.index, len(writes))
        return used_idx

    def _watch(self, ring: Ring) -> None:
        """Start watching a fresh ring: the counting in a native thread when built, else from
        this thread (`_step`, every WATCH_INTERVAL)."""
        self.watches[ring.index] = RingWatch(ring.size)
        if native_watch.available():
            try:
                self.native[ring.index] = NativeRingWatch(self.memory, ring.avail, ring.used, ring.size)
            except (OSError, ValueError) as err:
                log.warning("device %s ring %d: no native ring watcher (%s); sampling from Python",
                            self.name, ring.index, err)

    def _drop_watches(self) -> None:
        for native in self.native.values():
            native.close()
        self.native = {}
        self.watches = {}

    def _watches_lost_track(self, rings: list[Ring]) -> str | None:
        """After a last look: why the watch of some ring cannot say what the lost backend held
        (then the device fails: guessing could run a completed request again), or None.  A
        native watcher is left paused, with its counts in the ring's `RingWatch`."""
        for ring in rings:
            watch = self.watches.get(ring.index)
            if watch is None:
                continue
            native = self.native.get(ring.index)
            if native is not None:
                native.pause()
                native.export_to(watch)
            self._sample(ring, python=True)
            used_idx = self.memory.read_u16(ring.used + 2)
            avail_idx = self.memory.read_u16(ring.avail + 2)
            if not watch.consistent(avail_idx, used_idx):
                self.counters["watch_lost_track"] += 1
                why = "it fell more than a ring behind" if not watch.exact else \
                    f"{len(watch.outstanding)} outstanding seen, {watch.pending(avail_idx, used_idx)} pending"
                return (f"ring {ring.index}: the core lost track of the requests the backend held "
                        f"({why}); failing the device rather than risk running one twice")
        return None

    def _sample(self, ring: Ring, python: bool = False) -> None:
        watch = self.watches.get(ring.index)
        if watch is None or (ring.index in self.native and not python):
            return  # (the native thread looks)
        mem, size = self.memory, ring.size
        try:
            watch.sample(lambda: mem.read_u16(ring.used + 2), lambda: mem.read_u16(ring.avail + 2),
                         lambda slot: mem.read_u16(ring.avail + 4 + 2 * slot),
                         lambda slot: mem.read_u32(ring.used + 4 + 8 * slot))
        except GuestMemoryError:
            pass  # checked at DRIVER_OK; only a reset in between moves them

    def _drop_inflight(self) -> None:
        if self.inflight is not None:
            os.close(self.inflight[0])
            self.inflight = None

    def _serve_channel(self, conn: BackendConnection) -> None:
        """One request on the backend channel: only CONFIG_CHANGE_MSG is ours to receive."""
        assert conn.channel is not None
        try:
            msg = conn.channel.recv(0.0)
        except ProtocolError as err:
            self._lost(f"backend channel: {err}")
            return
        if msg.request != vu.BackendRequest.CONFIG_CHANGE_MSG or isinstance(msg.payload, vu.Raw):
            self._lost(f"backend channel: {msg.name} was not negotiated")
            return
        now = time.monotonic()
        self._config_changes.append(now)
        while self._config_changes and self._config_changes[0] < now - 1.0:
            self._config_changes.popleft()
        if len(self._config_changes) > CONFIG_CHANGES_PER_S:
            self._lost(f"backend channel: more than {CONFIG_CHANGES_PER_S} config changes a second")
            return
        try:
            if msg.need_reply:
                conn.channel.send(vu.ack(msg))
            if self.spec.local_config is None:
                fresh = conn.get_config(self.spec.config_size)
                with self._lock:
                    self.config[:] = fresh
                    self._config_changed_locked()
            self.counters["config_changes"] += 1
        except (ProtocolError, OSError) as err:
            self._lost(str(err))

    # -- what the core asks ------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.conn is not None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            failed = self.state is not None and self.state.needs_reset
        state = "failed" if failed else "running" if self.conn is not None else "reconnecting"
        return {"name": self.name, "type": f"vhost-user:{self.spec.virtio_id}", "mode": "vhost-user",
                "pid": "-", "state": state, "restarts": self.counters["reconnects"],
                "policy": "reconnect" if self.spec.reconnect else "fail", "socket": self.spec.socket}

    def stats(self) -> dict[str, Any]:
        # Requests and bytes are the backend's to count: the data path bypasses the core.
        return {**self.describe(), **dict(self.counters), "failures": self.counters["failures"],
                "last_error": self.last_error,
                "inflight_tracking": "backend" if self.inflight is not None
                else "ring-watch (native)" if self.native else "ring-watch" if self.watches
                else "none",
                "watch_samples": sum(n.samples for n in self.native.values())}

    def close(self) -> None:
        self._closing = True
        self._wake()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(REPLY_JOIN)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._drop_inflight()
        self._drop_watches()
        os.close(self._wake_r)
        os.close(self._wake_w)


REPLY_JOIN = 6.0  # a reply may take the connection's REPLY_TIMEOUT


def _peek(conn: BackendConnection) -> bool:
    """Whether the connection has bytes to read (False: EOF or an error)."""
    try:
        return bool(conn.conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
