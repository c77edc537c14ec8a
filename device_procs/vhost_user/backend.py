"""The vhost-user transport: a second adapter (beside `virtio.mmio.MmioDevice`) over a VirtioDevice.

`VhostUserBackend.handle(message)` applies one frontend request and returns the reply to send
(or None); what it does to fds goes through a small `BackendIo` port (write 8 bytes to a call
fd, close, map memory), so the state machine runs in tests with fake fd numbers.  The serve loop
(`serve.py`) owns the sockets: it sends the reply *first* and only then calls `run_pending()`,
which processes the rings a request started (a frontend that waits for our ack while we wait
for it would deadlock otherwise).

Rings ("Ring states"): each starts stopped; SET_VRING_KICK starts it, GET_VRING_BASE stops it and
returns the next available index; SET_VRING_ENABLE enables or disables a started ring (a ring
without VHOST_USER_F_PROTOCOL_FEATURES is enabled from the start).  A ring is served -- a `Queue`
exists -- when it is started and enabled; disabling it, or a new memory table, keeps its position
(next_avail, used idx).  Ring addresses are frontend user addresses, translated through the
memory table's user_addr column (QEMU sends its virtual addresses; for UML user = guest address).

Driver resets are inferred: UML never sends RESET_OWNER/RESET_DEVICE/GET_VRING_BASE and re-probes
with SET_FEATURES ... SET_VRING_BASE 0 ... ENABLE, so a SET_FEATURES that arrives after rings were
served and while none is served any longer resets the device (features, queues, inflight records).

Refusals (`VhostUserError`): with NEED_REPLY (REPLY_ACK) the status is non-zero; a request with
a reply of its own that has a failure form gets it (GET_CONFIG: empty payload; GET_INFLIGHT_FD:
mmap_size 0; SET_LOG_BASE: u64 1); anything else closes the connection (`RemoteProtocolError`),
since the frontend would otherwise carry on as if the request had worked.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from device_procs.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                        VIRTIO_F_VERSION_1, VirtioDevice)
from device_procs.virtio.errors import QueueError
from device_procs.virtio.queue import DESC_SIZE, USED_ELEM_SIZE, Queue
from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import RemoteProtocolError
from ipc_protocol.guest_memory import GuestMemory, GuestMemoryError, RegionSpec

from .errors import VhostUserError
from .inflight import InflightQueue, InflightRegion, buffer_size, region_size

log = logging.getLogger(__name__)

R = vu.Request
P = vu.ProtocolFeature
CALL_VALUE = (1).to_bytes(8, "little")  # what an eventfd write adds; UML's socketpair reads 8 bytes
# Failure replies of the requests that have their own reply and a failure form for it.
_FAILURE_REPLY: dict[int, vu.Payload] = {
    R.GET_CONFIG: vu.Empty(),
    R.GET_INFLIGHT_FD: vu.Inflight(0, 0, 0, 0),
    R.SET_LOG_BASE: vu.U64Value(1),
}


class BackendIo(Protocol):
    """Every effect the backend has on an fd; `OsIo` in production, a recorder in tests."""

    def notify(self, fd: int) -> None:
        """Signal a call or err fd (eventfd or, for UML, a socketpair end)."""

    def close(self, fd: int) -> None: ...

    def map_memory(self, regions: Sequence[tuple[RegionSpec, int]]) -> GuestMemory:
        """Map the table's regions; on success the memory owns (and closes) their fds."""

    def map_shared(self, fd: int, offset: int, size: int) -> "SharedMap": ...


class SharedMap:
    """A shared mapping of [offset, offset+size) of a file (the inflight buffer)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise VhostUserError(f"inflight mmap offset {offset:#x} is not page-aligned")
        file_size = os.fstat(fd).st_size
        if offset + size > file_size:
            raise VhostUserError(f"inflight buffer needs {offset + size} bytes of a {file_size}-byte file")
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a region view still held: the mapping goes with the process
            pass


class OsIo:
    """The real effects."""

    def notify(self, fd: int) -> None:
        try:
            os.write(fd, CALL_VALUE)
        except BlockingIOError:
            pass  # an eventfd counter at its maximum: a notification is pending anyway
        except OSError as err:  # the frontend closed its end: it no longer listens
            log.debug("notifying fd %d failed: %s", fd, err)

    def close(self, fd: int) -> None:
        os.close(fd)

    def map_memory(self, regions: Sequence[tuple[RegionSpec, int]]) -> GuestMemory:
        return GuestMemory(regions, owned_fds=[fd for _, fd in regions])

    def map_shared(self, fd: int, offset: int, size: int) -> SharedMap:
        return SharedMap(fd, offset, size)


@dataclass
class InflightStore:
    """The backend's own inflight memfd, made (and sealed, and mapped) before the jail: its
    size covers every queue at its maximum size, so GET_INFLIGHT_FD needs no new syscall."""

    fd: int
    view: memoryview
    capacity: int

    @classmethod
    def create(cls, device: VirtioDevice) -> "InflightStore":
        capacity = buffer_size(len(device.queue_max_sizes), max(device.queue_max_sizes))
        fd = os.memfd_create("bulkhead-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, capacity)
            # The frontend gets this fd: it must not be able to shrink it under our mapping.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, memoryview(mapping), capacity)


@dataclass
class Ring:
    """What the frontend programmed for one vring, and its queue while it is served."""

    index: int
    max_size: int
    size: int | None = None
    addr: vu.VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    polling: bool = False          # SET_VRING_KICK with NOFD: poll the ring instead of waiting
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    queue: Queue | None = None
    saved: tuple[int, int, int] | None = None  # (next_avail, used_idx, signalled_used)
    inflight: InflightRegion | None = None
    recover: bool = False          # check `inflight` for chains to resubmit at the next start

    def fds(self) -> list[int]:
        return [fd for fd in (self.kick_fd, self.call_fd, self.err_fd) if fd is not None]


class VhostUserBackend:
    """One frontend's session with `device` (the device stays; a reset clears the session's
    driver state, a disconnect ends the process)."""

    def __init__(self, device: VirtioDevice, *, io: BackendIo | None = None,
                 inflight_store: InflightStore | None = None) -> None:
        self.device = device
        self.io = io or OsIo()
        self.store = inflight_store
        self.nqueues = len(device.queue_max_sizes)
        self.offered_features = device.features | vu.VHOST_USER_F_PROTOCOL_FEATURES
        offered = P.CONFIG | P.REPLY_ACK | P.SLAVE_REQ
        if inflight_store is not None:
            offered |= P.INFLIGHT_SHMFD
        if self.nqueues > 1:
            offered |= P.MQ
        self.offered_protocol = int(offered)
        self.features: int | None = None   # what SET_FEATURES acked (with bit 30)
        self.protocol = 0
        self.owner = False
        self.table: tuple[vu.MemoryRegion, ...] = ()
        self.memory: GuestMemory | None = None
        self.rings = [Ring(i, n) for i, n in enumerate(device.queue_max_sizes)]
        self.channel_fd: int | None = None   # SET_SLAVE_REQ_FD
        self.outbox: list[vu.Message] = []   # backend-channel requests for the serve loop
        self.awaiting_acks = 0
        self.inflight_map: SharedMap | None = None
        self.inflight_fd: int | None = None
        self.pending: set[int] = set()       # rings to process once the reply is out
        self.generation = 0                  # bumped whenever the fds to watch change
        self.served_since_reset = False
        self.counters = {"messages": 0, "refused": 0, "resets": 0, "kicks": 0, "calls": 0,
                         "config_changes": 0, "needs_reset": 0, "resubmitted": 0}
        device.activate(None, [None] * self.nqueues, self)  # type: ignore[arg-type]

    # -- the dispatcher -----------------------------------------------------------------------
    def handle(self, msg: vu.Message) -> vu.Message | None:
        """Apply one request; the reply to send, or None.  `RemoteProtocolError`: close."""
        self.counters["messages"] += 1
        fds = list(msg.fds)
        handler = self._HANDLERS.get(msg.request) if not isinstance(msg.payload, vu.Raw) else None
        try:
            if handler is None:
                raise VhostUserError(f"{msg.name} is not supported by this backend")
            result = handler(self, msg, fds)
        except VhostUserError as err:
            self.counters["refused"] += 1
            log.warning("refusing %s: %s", msg.name, err)
            return self._refuse(msg, str(err))
        finally:
            for fd in fds:  # whatever a handler did not adopt
                self.io.close(fd)
        if isinstance(result, vu.Message):
            return result
        if vu.has_own_reply(msg.request):
            assert isinstance(result, vu.Payload), msg.name
            return vu.reply_to(msg, result)
        return vu.ack(msg) if msg.need_reply else None

    def _refuse(self, msg: vu.Message, reason: str) -> vu.Message:
        if vu.has_own_reply(msg.request):
            failure = _FAILURE_REPLY.get(msg.request)
            if failure is not None:
                return vu.reply_to(msg, failure)
        elif msg.need_reply:
            return vu.ack(msg, ok=False)
        raise RemoteProtocolError(f"{msg.name} refused and the frontend asked for no status: {reason}")

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < self.nqueues:
            raise VhostUserError(f"ring {index} does not exist (the device has {self.nqueues})")
        return self.rings[index]

    def _need_protocol(self, feature: vu.ProtocolFeature, what: str) -> None:
        if not self.protocol & feature:
            raise VhostUserError(f"{what} needs protocol feature {feature.name}, not negotiated")

    # -- features and session ---------------------------------------------------------------------
    def _get_features(self, msg: vu.Message, fds: list[int]) -> vu.Payload:
        return vu.U64Value(self.offered_features)

    def _set_features(self, msg: vu.Message, fds: list[int]) -> None:
        value = msg.payload.value  # type: ignore[attr-defined]
        if value & ~self.offered_features:
            raise VhostUserError(f"features {value & ~self.offered_features:#x} were not offered")
        if not value & VIRTIO_F_VERSION_1:
            raise VhostUserError("VIRTIO_F_VERSION_1 not acked: legacy drivers are not supported")
        if any(r.queue is not None for r in self.rings):
            if value != self.features:
                raise VhostUserError("features cannot change while rings are served")
            return
        if self.served_since_reset:
            self.reset("SET_FEATURES after every ring stopped: the driver was reset")
        self.features = value
        self.device.ack_features(value & ~vu.VHOST_USER_F_PROTOCOL_FEATURES)

    def _get_protocol_features(self, msg: vu.Message, fds: list[int]) -> vu.Payload:
        return vu.U64Value(self.offered_protocol)

    def _set_protocol_features(self, msg: vu.Message, fds: list[int]) -> None:
        value = msg.payload.value  # type: ignore[attr-defined]
        if value & ~self.offered_protocol:
            raise VhostUserError(f"protocol features {value & ~self.offered_protocol:#x} were not offered")
        self.protocol = value

    def _set_owner(self, msg: vu.Message, fds: list[int]) -> None:
        self.owner = True

    def _reset_owner(self, msg: vu.Message, fds: list[int]) -> None:
        # Deprecated; the spec recommends ignoring it or disabling every ring: a reset does both.
        self.reset("RESET_OWNER")

    def _get_queue_num(self, msg: vu.Message, fds: list[int]) -> vu.Payload:
        return vu.U64Value(self.nqueues)

    def reset(self, why: str) -> None:
        """Forget the driver (as a status write of 0 does on virtio-mmio, §2.4): features, ring
        configurations and positions, inflight records.  The memory table and the call/err fds
        stay (a frontend may send them before the SET_FEATURES that reveals the reset)."""
        log.info("device reset: %s", why)
        self.counters["resets"] += 1
        for ring in self.rings:
            self._drop_queue(ring, keep_position=False)
            if ring.kick_fd is not None:
                self.io.close(ring.kick_fd)
            ring.kick_fd, ring.polling, ring.started, ring.enabled = None, False, False, False
            ring.size, ring.addr, ring.base, ring.saved, ring.recover = None, None, 0, None, False
            if ring.inflight is not None:
                ring.inflight.clear()
        self.features = None
        self.served_since_reset = False
        self.pending.clear()
        self.device.reset()
        self._activate()
        self.generation += 1

    def _activate(self) -> None:
        self.device.activate(self.memory, [r.queue for r in self.rings], self)  # type: ignore[arg-type]

    # -- memory ---------------------------------------------------------------------------------------
    def _set_mem_table(self, msg: vu.Message, fds: list[int]) -> None:
        table: vu.MemoryTable = msg.payload  # type: ignore[assignment]
        if not table.regions:
            raise VhostUserError("memory table has no region")
        specs = [(RegionSpec(r.guest_phys_addr, r.size, r.mmap_offset), fd)
                 for r, fd in zip(table.regions, fds)]
        try:
            memory = self.io.map_memory(specs)
        except (GuestMemoryError, OSError, ValueError) as err:
            raise VhostUserError(f"cannot map the memory table: {err}") from None
        fds.clear()  # the memory owns them now
        served = [r for r in self.rings if r.queue is not None]
        try:
            for ring in self.rings:  # every programmed ring must still be inside the table
                if ring.addr is not None:
                    self._translate(ring, table.regions)
        except VhostUserError:
            memory.close()
            raise
        old = self.memory
        for ring in served:
            self._drop_queue(ring, keep_position=True)
        self.table, self.memory = table.regions, memory
        for ring in served:
            self._start(ring)  # checked above; positions carried over
        self._activate()
        if old is not None:
            old.close()

    def _translate(self, ring: Ring, regions: Sequence[vu.MemoryRegion]) -> tuple[int, int, int]:
        """Guest addresses of the ring's descriptor table, available and used rings (for a ring
        whose size is not known yet, at least their one-entry forms must be in the table)."""
        assert ring.addr is not None
        n = ring.size or 1
        out = []
        for name, addr, length in (("descriptor table", ring.addr.desc, DESC_SIZE * n),
                                   ("available ring", ring.addr.avail, 6 + 2 * n),
                                   ("used ring", ring.addr.used, 6 + USED_ELEM_SIZE * n)):
            gpa = next((g for g in (r.translate_user(addr, length) for r in regions)
                        if g is not None), None)
            if gpa is None:
                raise VhostUserError(f"ring {ring.index} {name} at user address {addr:#x}+{length} "
                                     "is not inside one memory region")
            out.append(gpa)
        return out[0], out[1], out[2]

    def _set_log_base(self, msg: vu.Message, fds: list[int]) -> None:
        raise VhostUserError("dirty logging (LOG_SHMFD, VHOST_F_LOG_ALL) is not offered")

    # -- rings ----------------------------------------------------------------------------------------
    def _check_stopped(self, ring: Ring, what: str) -> None:
        if ring.queue is not None:
            raise VhostUserError(f"{what} on ring {ring.index} while it is served; disable or stop it first")

    def _set_vring_num(self, msg: vu.Message, fds: list[int]) -> None:
        state: vu.VringState = msg.payload  # type: ignore[assignment]
        ring = self._ring(state.index)
        self._check_stopped(ring, "SET_VRING_NUM")
        n = state.num
        # §2.7: a split queue's size is a power of two; it may not exceed the device's maximum.
        if n == 0 or n & (n - 1) or n > ring.max_size:
            raise VhostUserError(f"ring {ring.index} size {n} is not a power of two up to {ring.max_size}")
        self._reprogram(ring, size=n)

    def _set_vring_addr(self, msg: vu.Message, fds: list[int]) -> None:
        addr: vu.VringAddr = msg.payload  # type: ignore[assignment]
        ring = self._ring(addr.index)
        self._check_stopped(ring, "SET_VRING_ADDR")
        if addr.flags & vu.VHOST_VRING_F_LOG:
            raise VhostUserError("used-ring logging was asked for, but VHOST_F_LOG_ALL is not offered")
        if addr.flags & ~vu.VHOST_VRING_F_LOG:
            raise VhostUserError(f"unknown vring address flags {addr.flags:#x}")
        if not self.table:
            raise VhostUserError("SET_VRING_ADDR before SET_MEM_TABLE: nothing to translate it with")
        self._reprogram(ring, addr=addr)

    def _reprogram(self, ring: Ring, **changes: object) -> None:
        """Apply new ring size or addresses, unless the ring would then leave the memory table
        (whichever of SET_VRING_NUM and SET_VRING_ADDR comes first); a new ring starts at its base."""
        previous = {name: getattr(ring, name) for name in changes}
        for name, value in changes.items():
            setattr(ring, name, value)
        if ring.addr is not None:
            try:
                self._translate(ring, self.table)
            except VhostUserError:
                for name, value in previous.items():
                    setattr(ring, name, value)
                raise
        ring.saved = None

    def _set_vring_base(self, msg: vu.Message, fds: list[int]) -> None:
        state: vu.VringState = msg.payload  # type: ignore[assignment]
        ring = self._ring(state.index)
        self._check_stopped(ring, "SET_VRING_BASE")
        if state.num > 0xFFFF:
            raise VhostUserError(f"ring {ring.index} base {state.num} is not a 16-bit ring index")
        ring.base, ring.saved = state.num, None

    def _get_vring_base(self, msg: vu.Message, fds: list[int]) -> vu.Payload:
        state: vu.VringState = msg.payload  # type: ignore[assignment]
        ring = self._ring(state.index)
        if ring.queue is not None:
            position = ring.queue.next_avail
        elif ring.saved is not None:
            position = ring.saved[0]
        else:
            position = ring.base
        # "stop ring upon receiving VHOST_USER_GET_VRING_BASE": it needs a new kick to restart.
        self._drop_queue(ring, keep_position=False)
        ring.started, ring.base = False, position
        if ring.kick_fd is not None:
            self.io.close(ring.kick_fd)
            ring.kick_fd = None
        self.generation += 1
        return vu.VringState(ring.index, position)

    def _adopt_ring_fd(self, msg: vu.Message, fds: list[int], slot: str) -> Ring:
        which: vu.VringFd = msg.payload  # type: ignore[assignment]
        ring = self._ring(which.index)
        old = getattr(ring, slot)
        new = None if which.nofd else fds.pop(0)
        setattr(ring, slot, new)
        if old is not None:
            self.io.close(old)
        self.generation += 1
        return ring

    def _set_vring_kick(self, msg: vu.Message, fds: list[int]) -> None:
        ring = self._adopt_ring_fd(msg, fds, "kick_fd")
        ring.polling = ring.kick_fd is None
        ring.started = True
        if not self.features or not self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            ring.enabled = True  # "the ring starts directly in the enabled state"
        self._maybe_start(ring)

    def _set_vring_call(self, msg: vu.Message, fds: list[int]) -> None:
        self._adopt_ring_fd(msg, fds, "call_fd")

    def _set_vring_err(self, msg: vu.Message, fds: list[int]) -> None:
        self._adopt_ring_fd(msg, fds, "err_fd")

    def _set_vring_enable(self, msg: vu.Message, fds: list[int]) -> None:
        state: vu.VringState = msg.payload  # type: ignore[assignment]
        ring = self._ring(state.index)
        if state.num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE value {state.num} is neither 0 nor 1")
        ring.enabled = bool(state.num)
        if ring.enabled:
            self._maybe_start(ring)
        else:
            self._drop_queue(ring, keep_position=True)
            self._activate()

    def _maybe_start(self, ring: Ring) -> None:
        if ring.started and ring.enabled and ring.queue is None:
            self._start(ring)
            self._activate()

    def _start(self, ring: Ring) -> None:
        """Build the ring's `Queue`; its first processing waits for `run_pending`."""
        if self.memory is None:
            raise VhostUserError(f"ring {ring.index} started before SET_MEM_TABLE")
        if ring.size is None or ring.addr is None:
            raise VhostUserError(f"ring {ring.index} started before SET_VRING_NUM and SET_VRING_ADDR")
        if self.features is None:
            raise VhostUserError(f"ring {ring.index} started before SET_FEATURES")
        desc, avail, used = self._translate(ring, self.table)
        kwargs = dict(max_size=ring.max_size, event_idx=bool(self.features & VIRTIO_F_EVENT_IDX),
                      indirect=bool(self.features & VIRTIO_F_INDIRECT_DESC), resume=True)
        try:
            if ring.inflight is not None:
                queue: Queue = self._inflight_queue(ring, desc, avail, used, kwargs)
            else:
                queue = Queue(self.memory, ring.size, desc, avail, used, **kwargs)  # type: ignore[arg-type]
                self._place(ring, queue)
        except QueueError as err:
            raise VhostUserError(f"ring {ring.index}: {err}") from None
        ring.queue = queue
        self.served_since_reset = True
        self.pending.add(ring.index)
        self.generation += 1

    def _place(self, ring: Ring, queue: Queue) -> None:
        """Where a (re)built queue continues: its saved position, else SET_VRING_BASE for the
        available ring and the used idx found in guest memory (§2.7: the used ring is the
        device's; `resume=True` read it)."""
        if ring.saved is not None:
            queue.next_avail, queue.used_idx, queue.signalled_used = ring.saved
        else:
            queue.next_avail = ring.base

    def _inflight_queue(self, ring: Ring, desc: int, avail: int, used: int,
                        kwargs: dict) -> Queue:
        """A queue that records chains in flight; on its first start after SET_INFLIGHT_FD it
        either initialises the region or resubmits what a crashed predecessor left in flight."""
        assert ring.inflight is not None and self.memory is not None and ring.size is not None
        queue = InflightQueue(self.memory, ring.size, desc, avail, used, region=ring.inflight,
                              **kwargs)
        if not ring.recover:
            self._place(ring, queue)
        elif ring.inflight.version == 0:
            ring.inflight.initialise(ring.size, queue.used_idx)
            self._place(ring, queue)
        else:
            recovery = ring.inflight.recover(queue.used_idx, ring.size)
            queue.resume_from(recovery)
            if recovery.inflight:
                log.info("ring %d: resubmitting %d chains in flight before the restart",
                         ring.index, recovery.inflight)
                self.counters["resubmitted"] += recovery.inflight
        ring.recover = False
        return queue

    def _drop_queue(self, ring: Ring, *, keep_position: bool) -> None:
        if ring.queue is not None:
            q = ring.queue
            ring.saved = (q.next_avail, q.used_idx, q.signalled_used) if keep_position else None
            ring.queue = None
            self.pending.discard(ring.index)
            self.generation += 1

    # -- device config space ---------------------------------------------------------------------
    def _get_config(self, msg: vu.Message, fds: list[int]) -> vu.Payload:
        self._need_protocol(P.CONFIG, "GET_CONFIG")
        req: vu.Config = msg.payload  # type: ignore[assignment]
        config = self.device.config_bytes()
        # UML asks from offset 0 with size = offset + length; QEMU with the real offset.  Either
        # way the reply echoes offset and size exactly, and the read must lie in the config space.
        if req.offset + req.size > len(config):
            raise VhostUserError(f"config read {req.offset}+{req.size} is outside the device's "
                                 f"{len(config)}-byte config space")
        return vu.Config(req.offset, req.size, req.flags, config[req.offset:req.offset + req.size])

    def _set_config(self, msg: vu.Message, fds: list[int]) -> None:
        self._need_protocol(P.CONFIG, "SET_CONFIG")
        req: vu.Config = msg.payload  # type: ignore[assignment]
        if req.flags != vu.Config.FLAG_WRITABLE:
            raise VhostUserError(f"SET_CONFIG flags {req.flags} (live migration) are not supported")
        if req.offset + req.size > len(self.device.config_bytes()):
            raise VhostUserError(f"config write {req.offset}+{req.size} is outside the config space")
        self.device.write_config(req.offset, req.data)

    # -- backend channel ---------------------------------------------------------------------------
    def _set_slave_req_fd(self, msg: vu.Message, fds: list[int]) -> None:
        self._need_protocol(P.SLAVE_REQ, "SET_SLAVE_REQ_FD")
        if self.channel_fd is not None:
            self.io.close(self.channel_fd)
        self.channel_fd = fds.pop(0)
        self.awaiting_acks = 0
        self.generation += 1

    def on_backend_reply(self, msg: vu.Message) -> None:
        """A frontend reply on the backend channel (a REPLY_ACK status)."""
        if self.awaiting_acks <= 0:
            raise RemoteProtocolError(f"unsolicited reply to {msg.name} on the backend channel")
        self.awaiting_acks -= 1
        status = msg.payload.value if isinstance(msg.payload, vu.U64Value) else 1
        if status:
            log.warning("frontend reports failure %d for %s", status, msg.name)

    def backend_channel_closed(self) -> None:
        """The frontend closed the backend channel: stop using it (the connection may go on)."""
        if self.channel_fd is not None:
            self.channel_fd = None  # the serve loop's socket object owned and closed the fd
            self.awaiting_acks = 0
            self.outbox.clear()
            self.generation += 1

    # -- inflight -----------------------------------------------------------------------------------
    def _check_inflight(self, req: vu.Inflight) -> int:
        if not 1 <= req.num_queues <= self.nqueues:
            raise VhostUserError(f"inflight buffer for {req.num_queues} queues; the device has {self.nqueues}")
        largest = max(self.device.queue_max_sizes)
        if not 1 <= req.queue_size <= largest:
            raise VhostUserError(f"inflight queue size {req.queue_size} is outside 1..{largest}")
        return buffer_size(req.num_queues, req.queue_size)

    def _get_inflight_fd(self, msg: vu.Message, fds: list[int]) -> vu.Message:
        self._need_protocol(P.INFLIGHT_SHMFD, "GET_INFLIGHT_FD")
        req: vu.Inflight = msg.payload  # type: ignore[assignment]
        size = self._check_inflight(req)
        assert self.store is not None and size <= self.store.capacity
        self.store.view[:size] = bytes(size)  # "a new one" (QEMU asks again after a VM reset)
        return vu.reply_to(msg, vu.Inflight(size, 0, req.num_queues, req.queue_size),
                           fds=[self.store.fd])

    def _set_inflight_fd(self, msg: vu.Message, fds: list[int]) -> None:
        self._need_protocol(P.INFLIGHT_SHMFD, "SET_INFLIGHT_FD")
        req: vu.Inflight = msg.payload  # type: ignore[assignment]
        size = self._check_inflight(req)
        if req.mmap_size < size:
            raise VhostUserError(f"inflight buffer of {req.mmap_size} bytes is smaller than the "
                                 f"{size} its description needs")
        if any(r.queue is not None for r in self.rings):
            raise VhostUserError("SET_INFLIGHT_FD while rings are served")
        try:
            mapping = self.io.map_shared(fds[0], req.mmap_offset, size)
        except (OSError, ValueError) as err:
            raise VhostUserError(f"cannot map the inflight buffer: {err}") from None
        self._close_inflight()
        self.inflight_map, self.inflight_fd = mapping, fds.pop(0)
        stride = region_size(req.queue_size)
        for ring in self.rings:
            if ring.index < req.num_queues:
                view = mapping.view[ring.index * stride:(ring.index + 1) * stride]
                ring.inflight, ring.recover = InflightRegion(view, req.queue_size), True
            else:
                ring.inflight, ring.recover = None, False

    def _close_inflight(self) -> None:
        for ring in self.rings:
            if ring.inflight is not None:
                ring.inflight.view.release()
                ring.inflight = None
        if self.inflight_map is not None:
            self.inflight_map.close()
            self.inflight_map = None
        if self.inflight_fd is not None:
            self.io.close(self.inflight_fd)
            self.inflight_fd = None

    _HANDLERS: dict[int, Callable[["VhostUserBackend", vu.Message, list[int]], object]] = {
        R.GET_FEATURES: _get_features,
        R.SET_FEATURES: _set_features,
        R.GET_PROTOCOL_FEATURES: _get_protocol_features,
        R.SET_PROTOCOL_FEATURES: _set_protocol_features,
        R.SET_OWNER: _set_owner,
        R.RESET_OWNER: _reset_owner,
        R.GET_QUEUE_NUM: _get_queue_num,
        R.SET_MEM_TABLE: _set_mem_table,
        R.SET_LOG_BASE: _set_log_base,
        R.SET_VRING_NUM: _set_vring_num,
        R.SET_VRING_ADDR: _set_vring_addr,
        R.SET_VRING_BASE: _set_vring_base,
        R.GET_VRING_BASE: _get_vring_base,
        R.SET_VRING_KICK: _set_vring_kick,
        R.SET_VRING_CALL: _set_vring_call,
        R.SET_VRING_ERR: _set_vring_err,
        R.SET_VRING_ENABLE: _set_vring_enable,
        R.GET_CONFIG: _get_config,
        R.SET_CONFIG: _set_config,
        R.SET_SLAVE_REQ_FD: _set_slave_req_fd,
        R.GET_INFLIGHT_FD: _get_inflight_fd,
        R.SET_INFLIGHT_FD: _set_inflight_fd,
    }

    # -- serving ------------------------------------------------------------------------------------
    def run_pending(self) -> None:
        """Process the rings started by the last request (after its reply went out)."""
        while self.pending:
            index = min(self.pending)
            self.pending.discard(index)
            self.device.process_queue(index)

    def resume_rings(self) -> None:
        """After a journal replay in a fresh process: what the predecessor had done to the rings
        is only in guest memory.  A ring with inflight records was placed from them; every other
        served ring continues at the used index (chains taken but not completed are taken
        again: the driver cannot have reused them).  Backend-channel requests of the replay
        were sent by the predecessor already; every ring is processed and signalled once (a
        completion whose call was lost to the crash must not stall the driver)."""
        self.outbox.clear()
        self.awaiting_acks = 0
        for ring in self.rings:
            q = ring.queue
            if q is None:
                continue
            if ring.inflight is None:
                q.next_avail = q.signalled_used = q.used_idx
            self.pending.add(ring.index)
        self.run_pending()
        if any(r.queue is not None for r in self.rings):
            self.device.on_resumed()
        self.signal_used()

    def kick(self, index: int) -> None:
        """The ring's kick fd was readable (and drained)."""
        self.counters["kicks"] += 1
        if self.rings[index].queue is not None:
            self.device.process_queue(index)

    def poll_rings(self) -> None:
        """Process the served rings whose frontend asked for polling (SET_VRING_KICK with NOFD)."""
        for ring in self.rings:
            if ring.polling and ring.queue is not None:
                self.device.process_queue(ring.index)

    def kick_fds(self) -> dict[int, int]:
        """fd -> ring index, for the served rings that have a kick fd."""
        return {r.kick_fd: r.index for r in self.rings if r.queue is not None and r.kick_fd is not None}

    @property
    def polling(self) -> bool:
        return any(r.polling and r.queue is not None for r in self.rings)

    # -- Interrupt (what the device signals) -----------------------------------------------------------
    def signal_used(self, queue_index: int | None = None) -> None:
        rings = self.rings if queue_index is None else [self.rings[queue_index]]
        for ring in rings:
            if ring.call_fd is not None:
                self.counters["calls"] += 1
                self.io.notify(ring.call_fd)

    def signal_config(self) -> None:
        """The config space changed: VHOST_USER_SLAVE_CONFIG_CHANGE_MSG, if the frontend can hear it."""
        self.counters["config_changes"] += 1
        if self.channel_fd is None or not self.protocol & P.CONFIG:
            log.info("config changed, but the frontend has no backend channel to hear it")
            return
        need_reply = bool(self.protocol & P.REPLY_ACK)
        self.outbox.append(vu.request(vu.BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply,
                                      channel=vu.Channel.BACKEND))
        self.awaiting_acks += int(need_reply)

    def signal_needs_reset(self, reason: str) -> None:
        """The driver broke a ring (the device stopped processing): tell the frontend on the
        err fds, the vhost-user counterpart of DEVICE_NEEDS_RESET."""
        self.counters["needs_reset"] += 1
        log.warning("device needs reset: %s", reason)
        for ring in self.rings:
            if ring.err_fd is not None:
                self.io.notify(ring.err_fd)

    # -- teardown ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything the frontend gave us (the device itself is the caller's)."""
        for ring in self.rings:
            self._drop_queue(ring, keep_position=False)
            for fd in ring.fds():
                self.io.close(fd)
            ring.kick_fd = ring.call_fd = ring.err_fd = None
        self._close_inflight()
        self.device.reset()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.channel_fd is not None:
            self.io.close(self.channel_fd)
            self.channel_fd = None

    def stats(self) -> dict[str, int]:
        return dict(self.counters)
