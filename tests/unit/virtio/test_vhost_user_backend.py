"""The vhost-user backend (device_procs/vhost_user): the state machine driven message by message.

Most tests call `VhostUserBackend.handle` directly with fake kick/call/err fd numbers (a
recording `BackendIo`) and real memfds for guest memory, and play the driver with the same
`DriverQueue` the MMIO tests use.  The last ones run the real serve loop over a socketpair,
driven by the frontend double.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Iterator

import pytest

from device_procs.testing.driver import DriverQueue, VirtioDriver
from device_procs.testing.vhost_frontend import VhostUserFrontend
from device_procs.vhost_user import InflightStore, OsIo, VhostUserBackend
from device_procs.vhost_user.inflight import InflightRegion, region_size
from device_procs.vhost_user.serve import EXIT_DISCONNECTED, EXIT_PROTOCOL, Server
from device_procs.virtio import BlkDevice, ConsoleDevice, RngDevice
from device_procs.virtio.blk import VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK
from device_procs.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import RemoteProtocolError
from ipc_protocol.guest_memory import GuestMemory, RegionSpec

R, P = vu.Request, vu.ProtocolFeature
MEM = 4 << 20
FAKE = 10_000  # fake fd numbers start here: never real, never closed for real
USER = 0x7F00_0000_0000  # QEMU-style: ring addresses are the frontend's virtual addresses
PF = vu.VHOST_USER_F_PROTOCOL_FEATURES


class RecordingIo(OsIo):
    """Real mapping; notify/close of fake fds only recorded."""

    def __init__(self) -> None:
        self.notified: list[int] = []
        self.closed: list[int] = []

    def notify(self, fd: int) -> None:
        self.notified.append(fd)

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        if fd < FAKE:
            os.close(fd)


class Bench:
    """A backend, the guest memory file behind it, and a host-side driver for its rings."""

    def __init__(self, device, *, inflight: bool = True, memfd: int | None = None) -> None:
        self.device = device
        self.io = RecordingIo()
        self.store = InflightStore.create(device) if inflight else None
        self.backend = VhostUserBackend(device, io=self.io, inflight_store=self.store)
        self.inflight: tuple[int, vu.Inflight] | None = None
        if memfd is None:  # else: a second backend on the same guest memory file
            memfd = os.memfd_create("test-guest")
            os.ftruncate(memfd, MEM)
        else:
            memfd = os.dup(memfd)
        self.memfd = memfd
        self.memory = GuestMemory([(RegionSpec(0, MEM, 0), self.memfd)])
        self.driver = VirtioDriver(_none, _none, self.memory, ram_base=0x10000, ram_size=MEM - 0x20000,
                                   kick=self.kick)
        self.next_fake = FAKE
        self.replies: list[vu.Message] = []

    def fake_fd(self) -> int:
        self.next_fake += 1
        return self.next_fake

    def send(self, req: int, payload: vu.Payload | None = None, fds=(), *, need_reply: bool = False):
        reply = self.backend.handle(vu.request(req, payload, need_reply=need_reply, fds=fds))
        self.backend.run_pending()  # what the serve loop does once the reply is out
        if reply is not None:
            self.replies.append(reply)
        return reply

    def value(self, req: int, payload: vu.Payload | None = None):
        return self.send(req, payload).payload

    def handshake(self, protocol: int | None = None) -> None:
        self.value(R.GET_FEATURES)
        offered = self.value(R.GET_PROTOCOL_FEATURES).value
        self.send(R.SET_PROTOCOL_FEATURES, vu.U64Value(int(offered if protocol is None else protocol)))
        self.send(R.SET_OWNER)

    def features(self, extra: int = 0) -> int:
        return VIRTIO_F_VERSION_1 | PF | extra

    def mem_table(self, user_offset: int = USER, parts: int = 1) -> None:
        part = MEM // parts
        regions = tuple(vu.MemoryRegion(i * part, part, i * part + user_offset, i * part)
                        for i in range(parts))
        self.user_offset = user_offset
        self.send(R.SET_MEM_TABLE, vu.MemoryTable(regions), fds=[os.dup(self.memfd) for _ in regions])

    def ring(self, index: int, size: int = 256, **program_kw) -> DriverQueue:
        d, a, u = self.driver.alloc_rings(size)
        q = DriverQueue(self.driver, index, size, d, a, u)
        self.driver.queues[index] = q
        self.program(q, **program_kw)
        return q

    def program(self, q: DriverQueue, *, base: int = 0, enable: bool = True) -> None:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK (+ ENABLE 1) for a ring laid out in guest memory."""
        i, off = q.index, self.user_offset
        self.send(R.SET_VRING_NUM, vu.VringState(i, q.size))
        self.send(R.SET_VRING_BASE, vu.VringState(i, base))
        self.send(R.SET_VRING_ADDR, vu.VringAddr(i, 0, q.desc + off, q.used + off, q.avail + off, 0))
        self.send(R.SET_VRING_CALL, vu.VringFd(i, False), fds=[self.fake_fd()])
        self.send(R.SET_VRING_KICK, vu.VringFd(i, False), fds=[self.fake_fd()])
        if enable:
            self.send(R.SET_VRING_ENABLE, vu.VringState(i, 1))

    def setup_inflight(self, inflight_fd: int | None = None) -> None:
        """QEMU's GET_INFLIGHT_FD (first connection only) + SET_INFLIGHT_FD."""
        if inflight_fd is None:
            reply = self.send(R.GET_INFLIGHT_FD, vu.Inflight(0, 0, self.backend.nqueues, 256))
            self.inflight = (os.dup(reply.fds[0]), reply.payload)
        else:
            self.inflight = (inflight_fd, vu.Inflight(region_size(256) * self.backend.nqueues, 0,
                                                      self.backend.nqueues, 256))
        fd, desc = self.inflight
        self.send(R.SET_INFLIGHT_FD, desc, fds=[os.dup(fd)])

    def up(self, queues: int = 1, *, features: int = 0, **ring_kw) -> list[DriverQueue]:
        self.handshake()
        self.send(R.SET_FEATURES, vu.U64Value(self.features(features)))
        self.driver.negotiated = self.features(features) & ~PF
        if self.store is not None:
            self.setup_inflight()
        self.mem_table()
        return [self.ring(i, **ring_kw) for i in range(queues)]

    def kick(self, index: int) -> None:
        self.backend.kick(index)

    def close(self) -> None:
        self.backend.close()
        self.memory.close()
        os.close(self.memfd)
        if self.inflight is not None:
            os.close(self.inflight[0])


def _none(*_: object) -> None:
    raise AssertionError("no registers over vhost-user")


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, recognisable
    return str(path)


@pytest.fixture
def blk(image) -> Iterator[Bench]:
    bench = Bench(BlkDevice(image))
    yield bench
    bench.close()
    bench.device.close()


def blk_header(type_: int, sector: int) -> bytes:
    return struct.pack("<IIQ", type_, 0, sector)  # struct virtio_blk_outhdr (§5.2.6)


def refused(bench: Bench, req: int, payload: vu.Payload | None = None, fds=()) -> None:
    """Refused with REPLY_ACK: a non-zero status (without it the connection would be closed)."""
    reply = bench.send(req, payload, fds, need_reply=True)
    assert reply is not None and reply.payload == vu.U64Value(1), reply


# -- negotiation ------------------------------------------------------------------------------------

def test_features_and_protocol_features_offered(blk: Bench, tmp_path) -> None:
    features = blk.value(R.GET_FEATURES).value
    assert features & PF and features & VIRTIO_F_VERSION_1 and features & VIRTIO_F_EVENT_IDX
    protocol = blk.value(R.GET_PROTOCOL_FEATURES).value
    assert protocol == P.CONFIG | P.REPLY_ACK | P.SLAVE_REQ | P.INFLIGHT_SHMFD  # no MQ for one queue
    console = VhostUserBackend(ConsoleDevice(os.open(os.devnull, os.O_WRONLY)))
    assert console.offered_protocol & P.MQ and not console.offered_protocol & P.INFLIGHT_SHMFD
    assert console.handle(vu.request(R.GET_QUEUE_NUM)).payload.value == 2
    console.device.close()
    refused(blk, R.SET_PROTOCOL_FEATURES, vu.U64Value(int(P.INBAND_NOTIFICATIONS)))
    refused(blk, R.SET_FEATURES, vu.U64Value(1 << 60 | VIRTIO_F_VERSION_1))
    refused(blk, R.SET_FEATURES, vu.U64Value(PF))  # legacy (no VERSION_1)
    with pytest.raises(RemoteProtocolError, match="asked for no status"):
        blk.send(R.SET_FEATURES, vu.U64Value(1 << 60))


def test_readonly_image_offers_ro(image) -> None:
    bench = Bench(BlkDevice(image, readonly=True))
    try:
        (q,) = bench.up()
        assert bench.value(R.GET_FEATURES).value & VIRTIO_BLK_F_RO
        assert bench.driver.blk_write(0, b"z" * 512) == VIRTIO_BLK_S_IOERR
    finally:
        bench.close()
        bench.device.close()
    assert open(image, "rb").read(512) == bytes(range(256)) * 2


# -- rings and data ---------------------------------------------------------------------------------

def test_blk_requests_through_translated_rings(blk: Bench, image) -> None:
    (q,) = blk.up()
    assert blk.driver.blk_write(16, b"\xab" * 4096) == VIRTIO_BLK_S_OK
    result = blk.driver.blk_read(16, 4096)
    assert result.status == VIRTIO_BLK_S_OK and result.data == b"\xab" * 4096
    with open(image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == b"\xab" * 4096
    call = blk.backend.rings[0].call_fd
    assert blk.io.notified.count(call) == 2  # one call per completed request, on that ring's fd


def test_uml_style_session_without_reply_ack(blk: Bench) -> None:
    """UML: user address = guest address, no REPLY_ACK, probe, rmmod (ENABLE 0, GET_FEATURES), re-probe."""
    blk.handshake(protocol=P.CONFIG | P.SLAVE_REQ)
    assert blk.send(R.SET_SLAVE_REQ_FD, fds=[blk.fake_fd()]) is None  # no ack asked, none sent
    for probe in range(3):
        blk.send(R.SET_FEATURES, vu.U64Value(blk.features(VIRTIO_F_EVENT_IDX)))
        blk.driver.negotiated = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
        blk.driver.arena.floor = blk.driver.arena.pos = 0  # the re-probed driver lays out anew
        blk.mem_table(user_offset=0)
        blk.ring(0)
        assert blk.driver.blk_write(probe, bytes([probe]) * 512) == VIRTIO_BLK_S_OK
        assert blk.driver.blk_read(probe, 512).data == bytes([probe]) * 512
        blk.send(R.SET_VRING_ENABLE, vu.VringState(0, 0))
        blk.value(R.GET_FEATURES)
    assert blk.backend.counters["resets"] == 2  # each re-probe's SET_FEATURES was a reset
    # Without REPLY_ACK nothing but the GET_* requests is answered.
    assert {r.request for r in blk.replies} == {R.GET_FEATURES, R.GET_PROTOCOL_FEATURES}


def test_two_regions_and_a_ring_in_the_second(blk: Bench) -> None:
    blk.handshake()
    blk.send(R.SET_FEATURES, vu.U64Value(blk.features()))
    blk.driver.negotiated = VIRTIO_F_VERSION_1
    blk.mem_table(parts=2)
    blk.driver.arena.pos = MEM // 2  # rings and buffers in region 2 (guest 2 MiB and up)
    blk.ring(0)
    assert blk.driver.queues[0].desc >= MEM // 2
    assert blk.driver.blk_read(0, 512).status == VIRTIO_BLK_S_OK


def test_disable_keeps_the_position_and_enable_processes_what_arrived(blk: Bench) -> None:
    (q,) = blk.up()
    blk.driver.blk_write(0, b"a" * 512)
    blk.send(R.SET_VRING_ENABLE, vu.VringState(0, 0))
    head = q.add([blk_header(0, 0)], [512, 1])  # a read, while disabled
    blk.kick(0)
    assert q.used_idx() == 1  # not processed
    blk.send(R.SET_VRING_ENABLE, vu.VringState(0, 1))  # processed after the ack
    assert q.used_idx() == 2 and q.get_used()[-1].head == head
    state = blk.value(R.GET_VRING_BASE, vu.VringState(0, 0))
    assert state == vu.VringState(0, 2)


def test_new_memory_table_while_running_keeps_positions_and_closes_the_old(blk: Bench) -> None:
    (q,) = blk.up()
    blk.driver.blk_write(0, b"b" * 512)
    old = blk.backend.memory
    old_fds = [r.fd for r in old.regions]
    blk.mem_table(parts=2)  # QEMU re-sends the table while running: same addresses, new layout
    assert blk.backend.memory is not old and old.regions == []
    assert not any(_fd_open(fd) for fd in old_fds)
    assert len(blk.backend.memory.regions) == 2
    assert blk.backend.rings[0].queue.next_avail == 1
    assert blk.driver.blk_read(0, 512).data == b"b" * 512
    assert blk.backend.rings[0].queue.next_avail == 2 and q.used_idx() == 2


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_get_vring_base_stops_the_ring(blk: Bench) -> None:
    (q,) = blk.up()
    blk.driver.blk_write(0, b"c" * 512)
    kick = blk.backend.rings[0].kick_fd
    assert blk.value(R.GET_VRING_BASE, vu.VringState(0, 0)) == vu.VringState(0, 1)
    assert kick in blk.io.closed and blk.backend.kick_fds() == {}
    q.add([bytes(16)], [1])
    blk.kick(0)
    assert q.used_idx() == 1  # stopped: nothing processed
    # Restart with the base it returned (QEMU's resume after a stop).
    blk.send(R.SET_VRING_BASE, vu.VringState(0, 1))
    blk.send(R.SET_VRING_KICK, vu.VringFd(0, False), fds=[blk.fake_fd()])
    assert q.used_idx() == 2


def test_replaced_fds_are_closed_and_everything_is_closed_at_the_end(blk: Bench) -> None:
    blk.up(features=VIRTIO_F_EVENT_IDX)
    ring = blk.backend.rings[0]
    first_call, first_kick = ring.call_fd, ring.kick_fd
    blk.send(R.SET_VRING_CALL, vu.VringFd(0, False), fds=[blk.fake_fd()])
    blk.send(R.SET_VRING_KICK, vu.VringFd(0, False), fds=[blk.fake_fd()])
    blk.send(R.SET_VRING_ERR, vu.VringFd(0, False), fds=[blk.fake_fd()])
    blk.send(R.SET_VRING_ERR, vu.VringFd(0, True))
    blk.send(R.SET_SLAVE_REQ_FD, fds=[blk.fake_fd()])
    blk.send(R.SET_SLAVE_REQ_FD, fds=[blk.fake_fd()])
    assert first_call in blk.io.closed and first_kick in blk.io.closed
    blk.backend.close()
    given = set(range(FAKE + 1, blk.next_fake + 1))
    closed = [fd for fd in blk.io.closed if fd >= FAKE]
    assert sorted(closed) == sorted(given)  # each fake fd closed exactly once


# -- config space and the backend channel -----------------------------------------------------------

def test_get_config_the_uml_way_and_the_qemu_way(blk: Bench) -> None:
    blk.handshake()
    config = blk.device.config_bytes()
    uml = blk.value(R.GET_CONFIG, vu.Config(0, 24, 0, bytes(24)))  # blk_size at 20..24, from 0
    assert (uml.offset, uml.size, uml.data) == (0, 24, config[:24])
    qemu = blk.value(R.GET_CONFIG, vu.Config(20, 4, 0, bytes(4)))
    assert (qemu.offset, qemu.size, qemu.data) == (20, 4, (512).to_bytes(4, "little"))
    beyond = blk.send(R.GET_CONFIG, vu.Config(0, len(config) + 1, 0, bytes(len(config) + 1)))
    assert isinstance(beyond.payload, vu.Empty)  # the error form: empty payload
    refused(blk, R.SET_CONFIG, vu.Config(0, 1, vu.Config.FLAG_MIGRATION, b"\0"))
    refused(blk, R.SET_CONFIG, vu.Config(len(config), 1, 0, b"\0"))


def test_config_requests_need_the_config_protocol_feature(blk: Bench) -> None:
    blk.handshake(protocol=P.REPLY_ACK)
    assert isinstance(blk.send(R.GET_CONFIG, vu.Config(0, 8, 0, bytes(8))).payload, vu.Empty)
    refused(blk, R.SET_SLAVE_REQ_FD, fds=[blk.fake_fd()])
    assert blk.next_fake in blk.io.closed  # the refused fd is not kept


def test_console_emergency_write_through_set_config(tmp_path) -> None:
    out = tmp_path / "out"
    bench = Bench(ConsoleDevice.open(str(out)))
    try:
        bench.up(queues=2, features=1 << 2)  # VIRTIO_CONSOLE_F_EMERG_WRITE
        bench.send(R.SET_CONFIG, vu.Config(8, 4, 0, b"!\0\0\0"))
        bench.driver.console_write(b"hello")
        assert out.read_bytes() == b"!hello"
        assert bench.backend.rings[1].call_fd in bench.io.notified  # transmitq's own call fd
    finally:
        bench.close()
        bench.device.close()


def test_config_change_goes_to_the_backend_channel(blk: Bench) -> None:
    blk.handshake()
    blk.device.interrupt.signal_config()  # nobody to tell yet
    assert blk.backend.outbox == []
    blk.send(R.SET_SLAVE_REQ_FD, fds=[blk.fake_fd()])
    blk.device.interrupt.signal_config()
    (msg,) = blk.backend.outbox
    assert msg.request == vu.BackendRequest.CONFIG_CHANGE_MSG and msg.need_reply
    blk.backend.on_backend_reply(vu.ack(msg))
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        blk.backend.on_backend_reply(vu.ack(msg))


# -- inferred resets ----------------------------------------------------------------------------------

def test_set_features_while_serving_is_refused_unless_unchanged(blk: Bench) -> None:
    blk.up()
    assert blk.send(R.SET_FEATURES, vu.U64Value(blk.features()), need_reply=True).payload.value == 0
    refused(blk, R.SET_FEATURES, vu.U64Value(blk.features(VIRTIO_F_EVENT_IDX)))
    assert blk.backend.counters["resets"] == 0


def test_reset_forgets_rings_and_inflight_records(blk: Bench) -> None:
    (q,) = blk.up()
    blk.driver.blk_write(0, b"d" * 512)
    blk.send(R.SET_VRING_ENABLE, vu.VringState(0, 0))
    blk.send(R.SET_FEATURES, vu.U64Value(blk.features()))
    ring = blk.backend.rings[0]
    assert blk.backend.counters["resets"] == 1
    assert (ring.size, ring.addr, ring.started, ring.saved) == (None, None, False, None)
    assert ring.inflight is not None and ring.inflight.version == 0  # nothing to resubmit later
    assert ring.call_fd is not None  # call fds survive (QEMU may send them before SET_FEATURES)


# -- hostile frontends ---------------------------------------------------------------------------------

def test_hostile_ring_programming_is_refused(blk: Bench) -> None:
    blk.handshake()
    blk.send(R.SET_FEATURES, vu.U64Value(blk.features()))
    refused(blk, R.SET_VRING_ADDR, vu.VringAddr(0, 0, USER, USER + 0x1000, USER + 0x2000, 0))  # no table
    blk.mem_table()
    refused(blk, R.SET_VRING_NUM, vu.VringState(1, 256))      # no such ring
    refused(blk, R.SET_VRING_NUM, vu.VringState(0, 100))      # not a power of two
    refused(blk, R.SET_VRING_NUM, vu.VringState(0, 512))      # above the maximum
    refused(blk, R.SET_VRING_BASE, vu.VringState(0, 1 << 16))
    refused(blk, R.SET_VRING_ENABLE, vu.VringState(0, 2))
    blk.send(R.SET_VRING_NUM, vu.VringState(0, 256))
    for desc, used, avail, flags in ((0x1000, 0x3000, 0x2000, 0),          # guest, not user addresses
                                     (USER + MEM - 16, USER + 0x3000, USER + 0x2000, 0),  # runs out
                                     (USER, USER + 0x3000, USER + MEM, 0),  # avail past the end
                                     (USER, USER + 0x3000, USER + 0x2000, vu.VHOST_VRING_F_LOG),
                                     (USER, USER + 0x3000, USER + 0x2000, 2)):
        refused(blk, R.SET_VRING_ADDR, vu.VringAddr(0, flags, desc, used, avail, 0))
    # A misaligned ring passes translation but not the queue's checks: refused when it starts.
    blk.send(R.SET_VRING_ADDR, vu.VringAddr(0, 0, USER + 8, USER + 0x3000, USER + 0x2000, 0))
    blk.send(R.SET_VRING_KICK, vu.VringFd(0, False), fds=[blk.fake_fd()])
    refused(blk, R.SET_VRING_ENABLE, vu.VringState(0, 1))
    assert blk.backend.rings[0].queue is None


def test_a_ring_programmed_before_its_size_must_still_fit(blk: Bench) -> None:
    blk.handshake()
    blk.mem_table()
    near_end = USER + MEM - 16 * 16  # a 16-entry descriptor table fits, a 256-entry one does not
    refused(blk, R.SET_VRING_ADDR, vu.VringAddr(0, 0, 1 << 50, USER + 0x3000, USER + 0x2000, 0))
    blk.send(R.SET_VRING_ADDR, vu.VringAddr(0, 0, near_end, USER + 0x3000, USER + 0x2000, 0))
    refused(blk, R.SET_VRING_NUM, vu.VringState(0, 256))
    blk.send(R.SET_VRING_NUM, vu.VringState(0, 16), need_reply=True)
    assert blk.replies[-1].payload.value == 0


def test_hostile_memory_tables_are_refused_and_their_fds_closed(blk: Bench) -> None:
    blk.handshake()
    small = os.memfd_create("small")
    os.ftruncate(small, 4096)
    try:
        for region in (vu.MemoryRegion(0, MEM, USER, 0),            # bigger than its file
                       vu.MemoryRegion(0, 4096, USER, 2048),        # offset not page-aligned
                       vu.MemoryRegion(0, 4096, USER, 4096)):       # starts at the file's end
            fd = os.dup(small)
            refused(blk, R.SET_MEM_TABLE, vu.MemoryTable((region,)), fds=[fd])
            assert fd in blk.io.closed and not _fd_open(fd)
        refused(blk, R.SET_MEM_TABLE, vu.MemoryTable(()))
    finally:
        os.close(small)
    # A table that would leave a programmed ring outside guest memory is refused whole.
    (q,) = blk.up()
    before = blk.backend.memory
    fd = os.dup(blk.memfd)
    upper = vu.MemoryRegion(MEM // 2, MEM // 2, USER + MEM // 2, MEM // 2)  # the rings are below
    refused(blk, R.SET_MEM_TABLE, vu.MemoryTable((upper,)), fds=[fd])
    assert blk.backend.memory is before and not _fd_open(fd)
    assert blk.driver.blk_read(0, 512).status == VIRTIO_BLK_S_OK


def test_unknown_and_unsupported_requests(blk: Bench) -> None:
    blk.handshake()
    for code in (R.IOTLB_MSG, R.RESET_DEVICE, R.VRING_KICK, R.SET_STATUS, 77):
        payload = vu.Raw(b"\0" * 8) if code in (R.IOTLB_MSG, 77) else None
        if code == R.VRING_KICK:
            payload = vu.VringState(0, 0)
        if code == R.SET_STATUS:
            payload = vu.U64Value(15)
        refused(blk, code, payload)
        with pytest.raises(RemoteProtocolError):
            blk.send(code, payload)
    log_fd = blk.fake_fd()
    reply = blk.send(R.SET_LOG_BASE, vu.Log(4096, 0), fds=[log_fd])
    assert reply.payload == vu.U64Value(1) and log_fd in blk.io.closed  # refused cleanly
    with pytest.raises(RemoteProtocolError):  # no failure form for a queue count of its own
        blk.send(R.GET_MAX_MEM_SLOTS)


def test_rings_before_their_prerequisites(blk: Bench) -> None:
    blk.handshake()
    blk.mem_table()
    blk.send(R.SET_VRING_NUM, vu.VringState(0, 256))
    blk.send(R.SET_VRING_ADDR, vu.VringAddr(0, 0, USER, USER + 0x3000, USER + 0x2000, 0))
    refused(blk, R.SET_VRING_KICK, vu.VringFd(0, False), fds=[blk.fake_fd()])  # no SET_FEATURES


def test_a_broken_chain_signals_the_err_fd(blk: Bench) -> None:
    (q,) = blk.up()
    err = blk.fake_fd()
    blk.send(R.SET_VRING_ERR, vu.VringFd(0, False), fds=[err])
    q.write_desc(0, 0x1000, 16, 1, 0)  # NEXT to itself: a loop
    q.publish(0)
    blk.kick(0)
    assert err in blk.io.notified and blk.backend.counters["needs_reset"] == 1
    assert blk.device.broken


def test_inflight_requests_are_checked(blk: Bench) -> None:
    blk.handshake()
    # GET_INFLIGHT_FD's failure form is mmap_size 0 (and no fd).
    assert blk.value(R.GET_INFLIGHT_FD, vu.Inflight(0, 0, 2, 256)).mmap_size == 0   # 2 queues
    assert blk.value(R.GET_INFLIGHT_FD, vu.Inflight(0, 0, 1, 1024)).mmap_size == 0  # too big
    fd = os.dup(blk.memfd)
    refused(blk, R.SET_INFLIGHT_FD, vu.Inflight(100, 0, 1, 256), fds=[fd])  # too small for it
    assert not _fd_open(fd)


# -- inflight resubmission ----------------------------------------------------------------------------

class Crash(BaseException):
    """Stands for the process dying inside a request (after the write reached the image)."""


def test_a_fresh_backend_resubmits_what_a_crashed_one_left_in_flight(image) -> None:
    first = Bench(BlkDevice(image, native=False))  # the crash is injected into handle_chain
    second = None
    try:
        (q,) = first.up()
        assert first.driver.blk_write(1, b"1" * 512) == VIRTIO_BLK_S_OK
        execute = first.device.handle_chain

        def execute_then_crash(index, chain):
            execute(index, chain)
            raise Crash()

        first.device.handle_chain = execute_then_crash  # type: ignore[method-assign]
        head = q.add([blk_header(1, 2), b"2" * 512], [1])
        with pytest.raises(Crash):
            first.kick(0)
        assert q.used_idx() == 1  # the write is on disk; the driver has not seen it complete

        # A fresh backend (a new process in production) on the same guest memory, given the
        # inflight buffer back; the ring resumes at the used idx (what QEMU sends after a crash).
        second = Bench(BlkDevice(image), memfd=first.memfd)
        second.handshake()
        second.send(R.SET_FEATURES, vu.U64Value(second.features()))
        second.setup_inflight(os.dup(first.inflight[0]))
        second.mem_table()
        second.program(q, base=q.used_idx())
        assert second.backend.counters["resubmitted"] == 1
        (done,) = q.get_used()
        assert done.head == head and first.memory.read(done.buffers[-1].gpa, 1) == b"\0"  # S_OK
        assert second.backend.rings[0].queue.next_avail == 2
        first.driver.kick = second.kick  # the guest now kicks the fresh backend
        assert first.driver.blk_read(2, 512).data == b"2" * 512
        assert second.backend.rings[0].queue.next_avail == 3
    finally:
        first.backend.rings[0].queue = None
        first.close()
        first.device.close()
        if second is not None:
            second.close()
            second.device.close()


def test_split_batch_is_repaired_on_recovery() -> None:
    buf = bytearray(region_size(8))
    region = InflightRegion(memoryview(buf), 8)
    region.initialise(8, 0)
    region.taken(3, 0)
    region.taken(5, 1)
    region.before_used(3)  # crash between writing the used idx (1) and clearing entry 3
    recovery = region.recover(1, 8)
    assert recovery.resubmit == [5] and recovery.next_counter == 2
    buf[16] = 7  # entry 0's inflight byte: not 0 or 1
    with pytest.raises(Exception, match="not 0 or 1"):
        region.recover(1, 8)


def test_driver_rechecks_the_used_index_after_publishing_used_event(blk: Bench) -> None:
    """A backend completing concurrently (qemu-storage-daemon) may add a used element after the
    driver read the used idx but before it could see the new used_event -- and then not
    interrupt for it: `get_used` must look again after publishing (virtqueue_enable_cb)."""
    (q,) = blk.up(features=VIRTIO_F_EVENT_IDX)
    first = q.add([blk_header(0, 0)], [512, 1])
    second = q.add([blk_header(0, 1)], [512, 1])
    blk.kick(0)  # both complete; now pretend the second completed "late":
    assert q.used_idx() == 2
    blk.memory.write_u16(q.used + 2, 1)
    publish = q.set_used_event

    def publish_then_device_completes(value: int) -> None:
        publish(value)
        blk.memory.write_u16(q.used + 2, 2)  # the device's idx store races the driver

    q.set_used_event = publish_then_device_completes  # type: ignore[method-assign]
    assert [c.head for c in q.get_used()] == [first, second]


# -- the real serve loop over a socketpair, driven by the frontend double ----------------------------

@pytest.fixture
def served(image) -> Iterator[tuple[VhostUserFrontend, dict]]:
    device = BlkDevice(image)
    backend = VhostUserBackend(device, inflight_store=InflightStore.create(device))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(code=Server(backend, theirs).run()))
    thread.start()
    frontend = VhostUserFrontend(ours, queues=1)
    result["backend"] = backend
    yield frontend, result
    frontend.close()
    thread.join(5)
    backend.close()
    device.close()
    theirs.close()


def test_frontend_double_over_the_serve_loop(served) -> None:
    frontend, result = served
    frontend.handshake()
    frontend.driver.init()
    data = os.urandom(64 << 10)
    assert frontend.driver.blk_write(8, data) == VIRTIO_BLK_S_OK
    assert frontend.driver.blk_read(8, len(data)).data == data
    assert frontend.wait_call(0)
    assert frontend.get_config(20, 4, from_zero=True) == (512).to_bytes(4, "little")
    result["backend"].device.interrupt.signal_config()  # e.g. a resized image
    frontend.kick(0)  # wakes the loop, which flushes its outbox to the backend channel
    got = frontend.poll_backend_channel(2.0)
    assert [m.request for m in got] == [vu.BackendRequest.CONFIG_CHANGE_MSG]
    frontend.conn.close()
    for _ in range(50):
        if "code" in result:
            break
        threading.Event().wait(0.05)
    assert result["code"] == EXIT_DISCONNECTED


def test_garbage_from_the_frontend_ends_the_session(served) -> None:
    frontend, result = served
    frontend.conn.sock.send(vu.HEADER.pack(R.SET_OWNER, 0x41, 0))  # version 1 + a bad bit
    for _ in range(50):
        if "code" in result:
            break
        threading.Event().wait(0.05)
    assert result["code"] == EXIT_PROTOCOL


def test_rng_over_the_serve_loop() -> None:
    device = RngDevice()
    backend = VhostUserBackend(device)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=lambda: Server(backend, theirs).run())
    thread.start()
    try:
        with VhostUserFrontend(ours, queues=1, user_offset=0) as frontend:
            frontend.handshake()
            frontend.driver.init()
            chunks = {frontend.driver.rng_read(64) for _ in range(4)}
            assert len(chunks) == 4 and all(len(c) == 64 for c in chunks)
    finally:
        thread.join(5)
        backend.close()
        theirs.close()
