"""ipc_protocol.transport with real memfds, eventfds, Unix sockets and ZeroMQ (no KVM)."""

from __future__ import annotations

import os
import stat
import struct
import threading
import time

import pytest
import zmq

from ipc_protocol import messages as m
from ipc_protocol.errors import PeerGone, RemoteProtocolError, TransportTimeout
from ipc_protocol.ring import PRODUCER_INDEX_OFFSET, SLOTS_OFFSET, Op, Slot
from ipc_protocol.transport import fds as fdpass
from ipc_protocol.transport.shm_ring import ShmRings, make_eventfd
from ipc_protocol.transport.zmq_channel import (ControlClient, ControlServer, PeerProtocolError,
                                                make_runtime_dir)


@pytest.fixture
def rings():
    core = ShmRings.create(8)
    # The device maps the same memfd through its own fds, as a child process would.
    device = ShmRings.attach(os.dup(core.memfd), os.dup(core.request_doorbell),
                             os.dup(core.response_doorbell), 8)
    yield core, device
    device.close()
    core.close()


def test_slots_cross_the_shared_mapping_and_ring_the_doorbell(rings) -> None:
    core, device = rings
    c, d = core.core_endpoint(), device.device_endpoint()
    assert c.send(Slot.write(1, 0x70, b"\x0f\0\0\0"))
    assert d.drain_doorbell() == 1
    assert d.try_recv() == Slot.write(1, 0x70, b"\x0f\0\0\0")
    req = Slot.read(2, 0x70, 4)
    c.send(req)
    assert d.recv(timeout=0.5) == req
    d.send(req.answer(b"\x0f\0\0\0"))
    assert c.recv(timeout=0.5).data == b"\x0f\0\0\0"


def test_recv_times_out_and_spins_first(rings) -> None:
    core, _ = rings
    c = core.core_endpoint()
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        c.recv(timeout=0.05, spin_us=20_000)
    assert 0.045 < time.monotonic() - start < 0.5


def test_sleeping_receiver_is_woken_by_a_push_from_another_thread(rings) -> None:
    core, device = rings
    c, d = core.core_endpoint(), device.device_endpoint()
    timer = threading.Timer(0.05, lambda: d.send(Slot(Op.SYNC_DONE, 3)))
    timer.start()
    assert c.recv(timeout=2.0).seq == 3
    timer.join()


def test_watched_fd_ends_the_wait_as_peer_gone(rings) -> None:
    core, _ = rings
    gone = make_eventfd()
    try:
        os.eventfd_write(gone, 1)
        with pytest.raises(PeerGone):
            core.core_endpoint().recv(timeout=1.0, watch_fds=[gone])
    finally:
        os.close(gone)


def test_garbage_written_by_the_device_is_a_remote_error(rings) -> None:
    core, device = rings
    # The device scribbles a slot by hand, bypassing the ring API, then publishes it.
    buf = device.response_buffer
    buf[SLOTS_OFFSET:SLOTS_OFFSET + 24] = b"\xee" * 24
    struct.pack_into("<Q", buf, PRODUCER_INDEX_OFFSET, 1)
    with pytest.raises(RemoteProtocolError):
        core.core_endpoint().try_recv()


def test_ring_memfd_is_sealed_against_shrinking(rings) -> None:
    core, _ = rings
    with pytest.raises(PermissionError):
        os.ftruncate(core.memfd, 0)


# -- fd passing --------------------------------------------------------------------------------

def test_fd_bundle_round_trip() -> None:
    a, b = fdpass.socketpair()
    r, w = os.pipe()
    try:
        fdpass.send_bundle(a, {"pipe_w": w, "pipe_r": r})
        got = fdpass.recv_bundle(b, timeout=1.0)
        assert set(got) == {"pipe_w", "pipe_r"}
        os.write(got["pipe_w"], b"hi")
        assert os.read(got["pipe_r"], 2) == b"hi"
        assert not os.get_inheritable(got["pipe_r"])  # MSG_CMSG_CLOEXEC took effect
        for fd in got.values():
            os.close(fd)
    finally:
        for x in (a, b):
            x.close()
        os.close(r)
        os.close(w)


def test_fd_bundle_with_mismatched_names_is_refused_and_fds_closed() -> None:
    a, b = fdpass.socketpair()
    r, w = os.pipe()
    try:
        fdpass.send_fds(a, b"\x91\xa1x", [r, w])  # msgpack ["x"]: one name for two fds
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(RemoteProtocolError):
            fdpass.recv_bundle(b, timeout=1.0)
        assert len(os.listdir("/proc/self/fd")) == before  # nothing leaked
    finally:
        a.close(), b.close(), os.close(r), os.close(w)


def test_fd_recv_timeout_and_peer_close() -> None:
    a, b = fdpass.socketpair()
    with pytest.raises(TransportTimeout):
        fdpass.recv_fds(b, timeout=0.02)
    a.close()
    with pytest.raises(PeerGone):
        fdpass.recv_fds(b, timeout=1.0)
    b.close()


# -- ZeroMQ ------------------------------------------------------------------------------------

@pytest.fixture
def channel(tmp_path):
    rundir = make_runtime_dir("test", base=tmp_path)
    server = ControlServer(rundir)
    client = ControlClient(server.endpoint, b"rng0.1")
    yield rundir, server, client
    client.close(0)
    server.close()


def test_runtime_dir_and_socket_are_private(channel) -> None:
    rundir, server, _ = channel
    assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.endpoint[len("ipc://"):]).st_mode) == 0o600


def test_request_reply_and_selective_receive(channel, tmp_path) -> None:
    _, server, client = channel
    other = ControlClient(server.endpoint, b"blk0.1")
    try:
        other.send(m.HeartbeatAck(9))
        client.send(m.Hello(m.PROTOCOL_MAJOR, 0, "rng0", "rng", os.getpid()))
        peer, msg = server.recv(timeout=2.0, peer=b"rng0.1")
        assert peer == b"rng0.1" and isinstance(msg, m.Hello)
        assert server.recv(timeout=2.0) == (b"blk0.1", m.HeartbeatAck(9))  # kept, not lost
        server.send(peer, m.Heartbeat(1))
        assert client.recv(timeout=2.0) == m.Heartbeat(1)
    finally:
        other.close(0)


def test_malformed_message_is_a_peer_protocol_error(channel) -> None:
    _, server, client = channel
    client.socket.send(b"\x81\xa4type\xa4Nope")
    with pytest.raises(PeerProtocolError) as info:
        server.recv(timeout=2.0)
    assert info.value.peer == b"rng0.1"
    client.socket.send_multipart([b"a", b"b"])
    with pytest.raises(PeerProtocolError, match="frames"):
        server.recv(timeout=2.0)


def test_receive_timeouts(channel) -> None:
    _, server, client = channel
    with pytest.raises(TransportTimeout):
        server.recv(timeout=0.02)
    with pytest.raises(TransportTimeout):
        client.recv(timeout=0.02)


def test_send_to_unknown_peer_fails_fast(channel) -> None:
    _, server, _ = channel
    with pytest.raises(TransportTimeout):
        server.send(b"ghost.1", m.Heartbeat(1))


def test_oversized_message_drops_the_sender(channel) -> None:
    _, server, client = channel
    client.socket.send(b"x" * (m.MAX_MESSAGE_BYTES + 4096))
    with pytest.raises(TransportTimeout):
        server.recv(timeout=0.2)  # libzmq (MAXMSGSIZE) dropped it before it reached us
    assert zmq.MAXMSGSIZE
