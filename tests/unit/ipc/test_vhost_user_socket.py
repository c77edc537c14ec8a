"""The vhost-user socket transport: exact reads, fds with their message, nothing leaked."""

from __future__ import annotations

import array
import os
import socket
import threading
from typing import Iterator

import pytest

from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import PeerGone, RemoteProtocolError, TransportTimeout
from ipc_protocol.transport import vhost_user_socket as transport
from ipc_protocol.transport.vhost_user_socket import VhostUserSocket

R = vu.Request


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, VhostUserSocket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, VhostUserSocket(b)
    a.close()
    b.close()


def send_raw(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def test_messages_and_their_fds_arrive_one_at_a_time(pair) -> None:
    raw, backend = pair
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        frontend = VhostUserSocket(raw, incoming="replies")
        # Two fd-carrying messages back to back: each fd stays with its own message.
        frontend.send(vu.request(R.SET_VRING_CALL, vu.VringFd(0, False), fds=[w1]))
        frontend.send(vu.request(R.SET_VRING_KICK, vu.VringFd(1, False), fds=[r2]))
        frontend.send(vu.request(R.GET_FEATURES))
        call = backend.recv(1)
        kick = backend.recv(1)
        assert call.request == R.SET_VRING_CALL and len(call.fds) == 1
        assert kick.request == R.SET_VRING_KICK and kick.payload.index == 1 and len(kick.fds) == 1
        os.write(call.fds[0], b"x")
        assert os.read(r1, 1) == b"x"  # the received fd is the pipe's write end
        assert backend.recv(1).request == R.GET_FEATURES
        for fd in (*call.fds, *kick.fds):
            assert os.get_inheritable(fd) is False  # MSG_CMSG_CLOEXEC
            os.close(fd)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_message_split_across_writes_is_reassembled(pair) -> None:
    raw, backend = pair
    data, _ = vu.encode(vu.request(R.SET_VRING_ADDR, vu.VringAddr(0, 0, 1, 2, 3, 4)))
    got: list[vu.Message] = []
    t = threading.Thread(target=lambda: got.append(backend.recv(2)))
    t.start()
    for i in range(0, len(data), 5):
        raw.send(data[i:i + 5])
    t.join(3)
    assert got and got[0].payload == vu.VringAddr(0, 0, 1, 2, 3, 4)


def test_wrong_fd_count_and_truncated_control_data_close_every_fd(pair) -> None:
    raw, backend = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        # GET_FEATURES carries no fd: the decoder refuses it, the transport closes what came.
        send_raw(raw, vu.encode(vu.request(R.GET_FEATURES))[0], [r, w, r])
        with pytest.raises(RemoteProtocolError, match="0 fds"):
            backend.recv(1)
        assert open_fds() == before
        # More fds than the ancillary buffer holds: MSG_CTRUNC, refused, nothing kept.
        send_raw(raw, vu.encode(vu.request(R.SET_OWNER))[0], [r] * 30)
        with pytest.raises(RemoteProtocolError, match="more fds"):
            backend.recv(1)
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_bounds_are_checked_before_reading(pair) -> None:
    raw, backend = pair
    raw.send(vu.HEADER.pack(R.SET_OWNER, 1, 1 << 20))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        backend.recv(1)


def test_eof_stall_and_timeout(pair, monkeypatch) -> None:
    raw, backend = pair
    with pytest.raises(TransportTimeout):
        backend.recv(0.05)  # nothing sent
    monkeypatch.setattr(transport, "MESSAGE_TIMEOUT", 0.1)
    raw.send(vu.HEADER.pack(R.SET_FEATURES, 1, 8) + b"\0\0")  # header, then a stall
    with pytest.raises(TransportTimeout, match="middle"):
        backend.recv(1)
    raw.close()
    with pytest.raises(PeerGone):
        backend.recv(1)


def test_non_blocking_descriptions_are_served_without_changing_them(pair) -> None:
    raw, backend = pair
    backend.sock.setblocking(False)  # as the frontend may have made the shared description
    got: list[vu.Message] = []
    t = threading.Thread(target=lambda: got.append(backend.recv(2)))
    t.start()
    data, _ = vu.encode(vu.request(R.SET_FEATURES, vu.U64Value(7)))
    raw.send(data[:3])
    threading.Event().wait(0.05)
    raw.send(data[3:])
    t.join(3)
    assert got[0].payload == vu.U64Value(7)
    assert backend.sock.getblocking() is False


def test_request_waits_for_the_matching_reply(pair) -> None:
    raw, backend_end = pair
    frontend = VhostUserSocket(raw, incoming="replies")

    def answer() -> None:
        msg = backend_end.recv(2)
        backend_end.send(vu.reply_to(msg, vu.U64Value(0x1_0000_0000)))

    t = threading.Thread(target=answer)
    t.start()
    reply = frontend.request(vu.request(R.GET_FEATURES))
    t.join(2)
    assert reply is not None and reply.payload.value == 1 << 32
    assert frontend.request(vu.request(R.SET_OWNER)) is None  # no reply expected, none awaited
    assert backend_end.recv(1).request == R.SET_OWNER
