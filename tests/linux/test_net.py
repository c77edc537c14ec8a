"""Linux's own virtio_net driver against `bulkhead device net`: a jailed backend on a tap inside a
network namespace this test made, the peer a program in that namespace.

Link and address with `ip`, 20 pings without loss, TCP streams both ways with their SHA-256
compared on both ends, and the device process killed in the middle of a stream: the launcher
resumes the session in a fresh jailed process on the same connection (virtio_uml never
reconnects), TCP retransmits what the restart dropped, and the checksums still match.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from vmm_core.testing.netns import Namespaces, sh
from vmm_core.testing.uml import BulkheadBackend, UmlBed, UmlTimeout

pytestmark = [pytest.mark.linux, pytest.mark.root]

MIB = 1 << 20
HOST_IP, GUEST_IP, PORT = "10.77.0.1", "10.77.0.2", 5201
TAP = "bhuml0"

# The peer, run inside the namespace: `recv` counts and hashes what one connection sends,
# `send N SEED` sends N MiB of the pattern and its hash; one line of result on stdout.
PEER = r"""
import hashlib, socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(1); print("listening", flush=True)
c, _ = srv.accept(); h = hashlib.sha256(); n = 0
if mode == "recv":
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b); n += len(b)
else:
    mib, seed = int(sys.argv[4]), int(sys.argv[5])
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)
    for i in range(mib):
        b = (i & 0xFF).to_bytes(1, "little") + block[1:]
        c.sendall(b); h.update(b); n += len(b)
    c.shutdown(socket.SHUT_WR); c.recv(1)
print(f"bytes={n} sha={h.hexdigest()}", flush=True)
"""

# The guest's side (python3 from the host's root, through hostfs).
GUEST = r"""
import hashlib, os, socket, subprocess, time
def sh(c): subprocess.run(c, shell=True, check=True)
dev = os.environ["UML_DEV_eth"]
sh(f"ip link set lo up; ip link set {dev} up; ip addr add {os.environ['GUEST_IP']}/24 dev {dev}")
print("UML-RESULT mac=" + open(f"/sys/class/net/{dev}/address").read().strip())
host, port = os.environ["HOST_IP"], int(os.environ["PORT"])
mode, mib = os.environ["MODE"], int(os.environ["MIB"])
if mode == "ping":
    p = subprocess.run(f"ping -c 20 -i 0.05 -W 2 {host}", shell=True, capture_output=True, text=True)
    m = __import__("re").search(r"(\d+)% packet loss", p.stdout)
    print("UML-RESULT loss=" + (m.group(1) if m else "none"))
    print("UML-RESULT operstate=" + open(f"/sys/class/net/{dev}/operstate").read().strip())
    raise SystemExit(0)
for _ in range(100):  # the peer may still be starting
    try:
        s = socket.create_connection((host, port), timeout=30); break
    except OSError:
        time.sleep(0.1)
h = hashlib.sha256(); n = 0; t = time.time()
print("UML-RESULT stream=started", flush=True)
if mode == "send":
    block = hashlib.sha256(b"guest").digest() * (1 << 15)
    for i in range(mib):
        b = (i & 0xFF).to_bytes(1, "little") + block[1:]
        s.sendall(b); h.update(b); n += len(b)
    s.shutdown(socket.SHUT_WR); s.recv(1)
else:
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        h.update(b); n += len(b)
    s.close()
print(f"UML-RESULT bytes={n} sha={h.hexdigest()} secs={time.time() - t:.2f}")
"""


@pytest.fixture(autouse=True)
def _needs_uml(uml_host):
    pass


@pytest.fixture
def netns():
    spaces = Namespaces()
    try:
        yield spaces.make()
    finally:
        spaces.cleanup()


class Peer:
    """`PEER` running inside `ns`, started by this test and stopped through its pidfd."""

    def __init__(self, ns: str, *args: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pidfd = os.pidfd_open(self.proc.pid)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "listening", self.proc.stderr.read()

    def result(self, timeout: float = 30) -> dict[str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        m = re.search(r"bytes=(\d+) sha=(\w+)", out)
        assert m, err
        return {"bytes": m.group(1), "sha": m.group(2)}

    def close(self) -> None:
        if self.proc.poll() is None:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            self.proc.wait(5)
        os.close(self.pidfd)


def boot(bed: UmlBed, backend: BulkheadBackend, ns: str, mode: str, mib: int = 0, **kw):
    bed.add_backend("eth", "net", backend)
    sh(ns, f"ip addr add {HOST_IP}/24 dev {TAP}")
    env = {"MODE": mode, "MIB": str(mib), "HOST_IP": HOST_IP, "GUEST_IP": GUEST_IP,
           "PORT": str(PORT)}
    return bed.run(GUEST, python=True, env=env, **kw)


def test_link_address_and_ping(netns):
    backend = BulkheadBackend("net", "--tap", TAP, "--netns", netns, "--mac", "52:54:00:12:34:56")
    with UmlBed() as bed:
        run = boot(bed, backend, netns, "ping", timeout=60).check()
    assert run.results["mac"] == "52:54:00:12:34:56", run.explain()
    assert run.results["loss"] == "0", run.explain()
    assert run.results["operstate"] == "up", run.explain()
    assert "frontend 1 connected, served by jailed pid" in backend.log


@pytest.mark.parametrize("mode, mib", [("send", 256), ("recv", 64)], ids=["guest-to-host", "host-to-guest"])
def test_tcp_stream_checksums_match_on_both_ends(netns, mode, mib):
    backend = BulkheadBackend("net", "--tap", TAP, "--netns", netns)
    peer_mode = ("recv",) if mode == "send" else ("send", str(mib), "7")
    with UmlBed() as bed:
        bed.add_backend("eth", "net", backend)
        sh(netns, f"ip addr add {HOST_IP}/24 dev {TAP}")
        peer = Peer(netns, peer_mode[0], HOST_IP, str(PORT), *peer_mode[1:])
        try:
            env = {"MODE": mode, "MIB": str(mib), "HOST_IP": HOST_IP, "GUEST_IP": GUEST_IP,
                   "PORT": str(PORT)}
            try:
                run = bed.run(GUEST, python=True, env=env, timeout=240).check()
            except UmlTimeout as stalled:
                raise AssertionError(f"{stalled}\n--- backend\n{backend.log}") from None
            theirs = peer.result()
        finally:
            peer.close()
    assert run.results["bytes"] == str(mib * MIB) == theirs["bytes"], run.explain()
    assert run.results["sha"] == theirs["sha"], run.explain()


def test_killing_the_device_mid_stream_loses_nothing(netns):
    """SIGKILL to the jailed net device while the guest streams 256 MiB: the launcher resumes
    the session (same connection, same tap: the core side owns both), TCP retransmits, and
    both ends hash the same bytes."""
    backend = BulkheadBackend("net", "--tap", TAP, "--netns", netns)
    killed: list[int] = []

    def kill_mid_stream(line: str) -> None:
        if "UML-RESULT stream=started" in line and not killed:
            time.sleep(0.3)
            killed.append(backend.kill_device())

    with UmlBed() as bed:
        bed.add_backend("eth", "net", backend)
        sh(netns, f"ip addr add {HOST_IP}/24 dev {TAP}")
        peer = Peer(netns, "recv", HOST_IP, str(PORT))
        try:
            env = {"MODE": "send", "MIB": "256", "HOST_IP": HOST_IP, "GUEST_IP": GUEST_IP,
                   "PORT": str(PORT)}
            run = bed.run(GUEST, python=True, env=env, timeout=240,
                          on_line=kill_mid_stream).check()
            theirs = peer.result()
        finally:
            peer.close()
    assert killed, run.explain()
    assert run.results["bytes"] == str(256 * MIB) == theirs["bytes"], run.explain()
    assert run.results["sha"] == theirs["sha"], run.explain()
    resumed = re.search(r"frontend 1 resumed \((\d+) requests replayed\), served by jailed pid (\d+)",
                        backend.log)
    assert resumed and int(resumed.group(2)) != killed[0], backend.log
    assert "killed by SIGKILL" in backend.log
