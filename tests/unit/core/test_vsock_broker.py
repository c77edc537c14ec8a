"""The vsock broker (vmm_core/vsock_broker.py) against real AF_UNIX sockets, without a VM: the
test plays both the host program and the jailed device (the broker's SEQPACKET peer), including a
hostile device."""

from __future__ import annotations

import array
import os
import select
import socket

import msgpack
import pytest

from vmm_core import vsock_broker as vb
from vmm_core.errors import BulkheadError
from ipc_protocol.transport.fds import fds_from_ancdata


@pytest.fixture
def broker(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    b = vb.VsockBroker(str(tmp_path / "v.sock"), cid=3)
    b.open()
    yield b
    b.close()


def device_recv(b: vb.VsockBroker, timeout: float = 5.0) -> tuple[dict, list[int]]:
    dev = b.device_end
    assert select.select([dev], [], [], timeout)[0], "the broker sent the device nothing"
    data, anc, _, _ = dev.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
    fds, _ = fds_from_ancdata(anc)
    return msgpack.unpackb(data), fds


def device_send(b: vb.VsockBroker, msg, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    data = msg if isinstance(msg, bytes) else msgpack.packb(msg)
    b.device_end.sendmsg([data], anc)


def test_a_host_connect_line_hands_the_connection_to_the_device(broker):
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(broker.socket_path)
    host.sendall(b"CONNECT 52\nfirst bytes for the guest")
    msg, [fd] = device_recv(broker)
    assert msg == {"op": "host_connect", "port": 52, "host_port": vb.FIRST_HOST_PORT}
    with socket.socket(fileno=fd) as conn:
        assert conn.recv(100) == b"first bytes for the guest"  # the line was consumed, not more
        conn.sendall(b"OK 1073741824\n")
        assert host.recv(100) == b"OK 1073741824\n"
    host.close()
    host2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host2.connect(broker.socket_path)
    host2.sendall(b"CONNECT 52\n")
    msg, fds = device_recv(broker)
    assert msg["host_port"] == vb.FIRST_HOST_PORT + 1
    for fd in fds:
        os.close(fd)
    host2.close()
    assert broker.counters["host_connects"] == 2


@pytest.mark.parametrize("line", [b"CONNECT x\n", b"connect 5\n", b"CONNECT 99999999999\n",
                                  b"C" * vb.MAX_LINE])
def test_a_bad_connect_line_is_answered_and_closed(broker, line):
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(broker.socket_path)
    host.sendall(line)
    host.settimeout(5)
    assert host.recv(100) == b"ERROR bad CONNECT line\n"
    try:  # closed with the bad line unread: a reset, or EOF
        assert host.recv(100) == b""
    except ConnectionResetError:
        pass
    assert not select.select([broker.device_end], [], [], 0.1)[0]  # nothing reached the device
    assert broker.counters["host_refused"] == 1


def test_a_silent_host_program_is_closed_after_the_timeout(broker, monkeypatch):
    monkeypatch.setattr(vb, "CONNECT_TIMEOUT", 0.2)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(broker.socket_path)
    host.settimeout(5)
    assert host.recv(100) == b""
    assert broker.counters["host_refused"] == 1


def test_guest_connects_reach_a_listener_or_are_refused(broker):
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{broker.socket_path}_7000")
    lst.listen(1)
    device_send(broker, {"op": "guest_connect", "id": 1, "port": 7000})
    msg, [fd] = device_recv(broker)
    assert msg == {"op": "connected", "id": 1}
    peer, _ = lst.accept()
    with socket.socket(fileno=fd) as conn:
        conn.sendall(b"from the guest")
        assert peer.recv(100) == b"from the guest"
    peer.close()
    lst.close()
    device_send(broker, {"op": "guest_connect", "id": 2, "port": 7001})
    assert device_recv(broker) == ({"op": "refused", "id": 2}, [])
    assert broker.counters["guest_connects"] == 2 and broker.counters["guest_refused"] == 1


def test_a_hostile_device_is_counted_and_ignored_and_the_broker_goes_on(broker):
    r, w = os.pipe()
    hostile = [
        b"\xc1 not msgpack",
        msgpack.packb({"op": "guest_connect", "id": "1", "port": 7000}),
        msgpack.packb({"op": "guest_connect", "id": 1, "port": 1 << 32}),
        msgpack.packb({"op": "guest_connect", "id": -1, "port": 1}),
        msgpack.packb({"op": "host_connect", "port": 1, "host_port": 1}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"op": "guest_connect", "id": 1, "port": 1, "pad": "x" * 600}),  # > MAX_MESSAGE
    ]
    for data in hostile:
        device_send(broker, data)
    device_send(broker, {"op": "guest_connect", "id": 9, "port": 7002}, fds=[w])  # with an fd
    assert device_recv(broker) == ({"op": "refused", "id": 9}, [])  # still served, in order
    os.close(w)
    assert os.read(r, 1) == b""  # the fd the device sent was closed by the broker
    os.close(r)
    assert broker.counters["device_errors"] == len(hostile) + 1
    assert not select.select([broker.device_end], [], [], 0.1)[0]  # nothing answered the junk


def test_close_removes_the_socket_and_releases_the_cid(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    first = vb.VsockBroker(str(tmp_path / "a.sock"), cid=5)
    first.open()
    with pytest.raises(BulkheadError, match="cid=5: another running VM has this CID"):
        vb.VsockBroker(str(tmp_path / "b.sock"), cid=5).open()
    assert not os.path.exists(tmp_path / "b.sock")
    first.close()
    assert not os.path.exists(tmp_path / "a.sock")
    second = vb.VsockBroker(str(tmp_path / "b.sock"), cid=5)
    second.open()
    second.close()
    with pytest.raises(BulkheadError, match="path too long"):
        vb.VsockBroker(str(tmp_path / ("x" * 100)), cid=6).open()
