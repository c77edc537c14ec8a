"""Linux's own vsock drivers (vmw_vsock_virtio_transport) against `bulkhead device vsock`: the
jailed device moves bytes and credits, the launcher brokers every host connection (Firecracker's
protocol: host programs connect to the socket and send `CONNECT <port>\\n`; a guest connection to
host port P goes to `<socket>_P`).

Both directions with 64 MiB checksummed, a refused port (ECONNRESET), 1,000 short connections
that leave no fd behind in the launcher or the device, and the device killed with a connection
open: that connection resets, new ones work in the resumed process.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from vmm_core.testing.uml import BulkheadBackend, UmlBed

pytestmark = [pytest.mark.linux, pytest.mark.root]

MIB = 1 << 20
CID = 7

GUEST = r"""
import hashlib, os, socket, time
MIB = 1 << 20
mode = os.environ["MODE"]
def pattern(seed):
    return hashlib.sha256(seed).digest() * (MIB // 32)
def connect(port):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); s.connect((2, port)); return s
if mode == "both":
    s = connect(5000); h = hashlib.sha256(); block = pattern(b"guest")
    for i in range(64):
        s.sendall(block); h.update(block)
    s.shutdown(socket.SHUT_WR)
    print("UML-RESULT up_ack=" + s.recv(100).decode(), flush=True)
    print("UML-RESULT up_sha=" + h.hexdigest(), flush=True)
    srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); srv.bind((socket.VMADDR_CID_ANY, 6000)); srv.listen(1)
    print("UML-RESULT listening=6000", flush=True)
    c, peer = srv.accept(); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(MIB)
        if not b:
            break
        h.update(b); n += len(b)
    print(f"UML-RESULT down_bytes={n} down_sha={h.hexdigest()} peer_cid={peer[0]}", flush=True)
    try:
        connect(5999)
        print("UML-RESULT refused=no")
    except OSError as e:
        print("UML-RESULT refused=" + type(e).__name__)
elif mode == "short":
    connect(5001).close(); time.sleep(1.0)  # its teardown settles before the first count
    print("UML-RESULT warm=1", flush=True); time.sleep(0.5)
    bad = 0
    for i in range(1000):
        s = connect(5001); s.sendall(b"%d" % i)
        if s.recv(16) != b"%d" % i:
            bad += 1
        s.close()
    print(f"UML-RESULT short_bad={bad}", flush=True); time.sleep(0.5)
    print("UML-RESULT short=done", flush=True); time.sleep(5)
elif mode == "kill":
    s = connect(5002); s.sendall(b"x"); s.recv(1)
    print("UML-RESULT open=1", flush=True)
    s.settimeout(30)
    try:
        got = s.recv(1)
        print("UML-RESULT old=" + ("eof" if got == b"" else "data"), flush=True)
    except OSError as e:
        print("UML-RESULT old=" + __import__("errno").errorcode.get(e.errno, str(e.errno)), flush=True)
    ok = 0
    for i in range(20):
        try:
            t = connect(5002); t.sendall(b"y"); ok += t.recv(1) == b"y"; t.close()
        except OSError:
            time.sleep(0.1)
    print(f"UML-RESULT new_ok={ok}", flush=True)
"""


@pytest.fixture(autouse=True)
def _needs_uml(uml_host):
    pass


class HostSide:
    """Host programs of the test: listeners on `<uds>_P`, run on threads, closed at the end."""

    def __init__(self, directory: str) -> None:
        self.uds = os.path.join(directory, "v.sock")
        self.listeners: list[socket.socket] = []
        self.results: dict[str, object] = {}

    def listen(self, port: int, handler) -> None:
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(f"{self.uds}_{port}")
        lst.listen(64)
        self.listeners.append(lst)

        def loop() -> None:
            while True:
                try:
                    conn, _ = lst.accept()
                except OSError:
                    return
                threading.Thread(target=handler, args=(conn,), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()

    def close(self) -> None:
        for lst in self.listeners:
            lst.close()


def echo(conn: socket.socket) -> None:
    with conn:
        while b := conn.recv(64):
            conn.sendall(b)


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start(bed: UmlBed, host: HostSide, *args: str) -> BulkheadBackend:
    backend = BulkheadBackend("vsock", "--cid", str(CID), "--uds", host.uds, *args)
    bed.add_backend("vs", "vsock", backend)
    return backend


def test_streams_both_ways_and_a_refused_port(tmp_path):
    host = HostSide(str(tmp_path))

    def sink(conn: socket.socket) -> None:
        h, n = hashlib.sha256(), 0
        while b := conn.recv(MIB):
            h.update(b)
            n += len(b)
        host.results.update(up_bytes=n, up_sha=h.hexdigest())
        conn.sendall(b"%d" % n)
        conn.close()

    host.listen(5000, sink)
    sent: dict[str, object] = {}

    def push(line: str) -> None:  # host -> guest, once the guest listens
        if "UML-RESULT listening=6000" not in line:
            return
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(host.uds)
        c.sendall(b"CONNECT 6000\n")
        ok = b""
        while not ok.endswith(b"\n"):
            ok += c.recv(1)
        sent["ok"] = ok.decode()
        h = hashlib.sha256()
        block = hashlib.sha256(b"host").digest() * (MIB // 32)
        for _ in range(64):
            c.sendall(block)
            h.update(block)
        sent["sha"] = h.hexdigest()
        c.close()

    try:
        with UmlBed() as bed:
            start(bed, host)
            run = bed.run(GUEST, python=True, env={"MODE": "both"}, timeout=120,
                          on_line=push).check()
    finally:
        host.close()
    r = run.results
    assert host.results["up_bytes"] == 64 * MIB and r["up_ack"] == str(64 * MIB), run.explain()
    assert r["up_sha"] == host.results["up_sha"], run.explain()
    assert sent["ok"].startswith("OK "), sent
    assert r["down_bytes"] == str(64 * MIB) and r["down_sha"] == sent["sha"], run.explain()
    assert r["peer_cid"] == "2", run.explain()
    assert r["refused"] == "ConnectionResetError", run.explain()


def test_a_thousand_short_connections_leave_no_fd_behind(tmp_path):
    host = HostSide(str(tmp_path))

    host.listen(5001, echo)
    counts: dict[str, tuple[int, int]] = {}
    backend_box: list[BulkheadBackend] = []

    def count(line: str) -> None:
        backend = backend_box[0]
        pids = (backend.pids()[0], backend.device_pids()[-1])
        if "UML-RESULT warm=1" in line:
            counts["before"] = tuple(fds_of(p) for p in pids)
        elif "UML-RESULT short=done" in line:
            # The last connections' teardown (guest RST, host EOF) may still be in flight:
            # give it the guest's pause to settle, then compare.
            deadline = time.monotonic() + 4.0
            while True:
                counts["after"] = tuple(fds_of(p) for p in pids)
                if counts["after"] == counts.get("before") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)

    try:
        with UmlBed() as bed:
            backend_box.append(start(bed, host))
            run = bed.run(GUEST, python=True, env={"MODE": "short"}, timeout=180,
                          on_line=count).check()
    finally:
        host.close()
    assert run.results["short_bad"] == "0", run.explain()
    assert counts["after"] == counts["before"], counts


def test_killing_the_device_resets_open_connections_and_new_ones_work(tmp_path):
    host = HostSide(str(tmp_path))

    host.listen(5002, echo)
    killed: list[int] = []
    backend_box: list[BulkheadBackend] = []

    def kill(line: str) -> None:
        if "UML-RESULT open=1" in line and not killed:
            time.sleep(0.5)
            killed.append(backend_box[0].kill_device())

    try:
        with UmlBed() as bed:
            backend_box.append(start(bed, host))
            run = bed.run(GUEST, python=True, env={"MODE": "kill"}, timeout=120,
                          on_line=kill).check()
    finally:
        host.close()
    assert killed, run.explain()
    # The resumed device sends TRANSPORT_RESET: Linux disconnects every socket (ENOTCONN on
    # the next recv; ECONNRESET or EOF if the reset raced with a packet).  Not a 30 s timeout.
    assert run.results["old"] in ("eof", "ECONNRESET", "ENOTCONN"), run.explain()
    assert run.results["new_ok"] == "20", run.explain()
    assert "resumed" in backend_box[0].log, backend_box[0].log
