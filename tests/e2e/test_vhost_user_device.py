"""`bulkhead device blk|console|rng` for real: the launcher, a fresh jailed process per frontend,
driven by the vhost-user frontend double (and the double checked against qemu-storage-daemon).
"""

from __future__ import annotations

import array
import mmap
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from device_procs.testing.vhost_frontend import VhostUserFrontend, dial
from device_procs.vhost_user.inflight import DESC_STATE, REGION_HEADER
from device_procs.virtio.blk import VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK
from device_procs.virtio.device import VIRTIO_F_VERSION_1
from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import PeerGone
from jail.pidfd import ProcessRef
from vmm_core.testing import ROOT, bulkhead_argv

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts")
IMAGE_BYTES = 4 << 20


class DeviceCli:
    """`bulkhead device KIND --socket S ...` in the background, its stderr collected by line."""

    def __init__(self, tmp_path: Path, kind: str, *args: str) -> None:
        self.kind = kind
        self.socket = str(tmp_path / f"{kind}.sock")
        self.proc = subprocess.Popen(bulkhead_argv("device", kind, "--socket", self.socket, *args),
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.ref = ProcessRef(self.proc.pid)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_line(r"listening on")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))

    def device_pid(self, frontend: int) -> int:
        return int(self.wait_line(rf"frontend {frontend} connected, served by jailed pid (\d+)").group(1))

    def frontend(self, queues: int = 1, **kw) -> VhostUserFrontend:
        return VhostUserFrontend(dial(self.socket), queues=queues, **kw)

    def session(self, queues: int = 1, **kw) -> VhostUserFrontend:
        """A frontend with the handshake and the driver's initialisation done."""
        fe = self.frontend(queues, **kw)
        fe.handshake()
        fe.driver.init()
        return fe

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.ref.send(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            self.ref.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_BYTES))
    return path


@pytest.fixture
def blk_cli(tmp_path: Path, image: Path) -> Iterator[DeviceCli]:
    cli = DeviceCli(tmp_path, "blk", "--disk", str(image), "-v")
    yield cli
    assert cli.stop() == 143, "\n".join(cli.lines)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)


def assert_jailed(pid: int) -> None:
    st = proc_status(pid)
    assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1", st
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[cap], 16) == 0, (cap, st[cap])
    assert len(os.listdir(f"/proc/{pid}/task")) == 1  # no thread, so nothing escaped TSYNC
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.listdir(f"/proc/{pid}/root") == ["dev"]  # no image path, no /proc, no socket path


def random_io(frontend: VhostUserFrontend, image: bytearray, rounds: int, seed: int) -> None:
    """Random writes of 1..64 sectors, each followed by a read-back, mirrored in `image`."""
    rng = random.Random(seed)
    sectors = len(image) // 512
    for _ in range(rounds):
        n = rng.randint(1, 64)
        sector = rng.randrange(0, sectors - n)
        data = rng.randbytes(n * 512)
        assert frontend.driver.blk_write(sector, data) == VIRTIO_BLK_S_OK
        image[sector * 512:(sector + n) * 512] = data
        check = rng.randrange(0, sectors - 64)
        got = frontend.driver.blk_read(check, 64 * 512)
        assert got.status == VIRTIO_BLK_S_OK and got.data == image[check * 512:(check + 64) * 512]


def test_blk_data_integrity_in_a_jailed_process(blk_cli: DeviceCli, image: Path) -> None:
    expected = bytearray(image.read_bytes())
    with blk_cli.session() as fe:
        pid = blk_cli.device_pid(1)
        assert_jailed(pid)
        random_io(fe, expected, rounds=150, seed=1)
        assert fe.driver.blk_flush() == VIRTIO_BLK_S_OK
        assert fe.get_config(0, 8, from_zero=True) == (IMAGE_BYTES // 512).to_bytes(8, "little")
        assert fe.wait_call(0)
    blk_cli.wait_line(r"frontend 1 done: device process exited with status 0")
    assert image.read_bytes() == expected


def test_readonly_image_refuses_writes(tmp_path: Path, image: Path) -> None:
    before = image.read_bytes()
    cli = DeviceCli(tmp_path, "blk", "--disk", f"{image},readonly", "--once")
    with cli.frontend() as fe:
        fe.handshake()
        assert fe.features & VIRTIO_BLK_F_RO
        fe.driver.init()
        assert fe.driver.blk_write(0, b"\xff" * 4096) == VIRTIO_BLK_S_IOERR
        assert fe.driver.blk_read(0, 4096).data == before[:4096]
    assert cli.proc.wait(10) == 0
    assert image.read_bytes() == before


def test_a_returning_frontend_gets_a_fresh_jailed_process(blk_cli: DeviceCli, image: Path) -> None:
    expected = bytearray(image.read_bytes())
    with blk_cli.session() as fe:
        random_io(fe, expected, rounds=20, seed=2)
        first = blk_cli.device_pid(1)
        bases = fe.stop()  # clean stop: GET_VRING_BASE
        assert bases == {0: fe.driver.queue(0).used_idx()}
        fe.reconnect(dial(blk_cli.socket))
        second = blk_cli.device_pid(2)
        assert second != first and not os.path.exists(f"/proc/{first}")
        assert_jailed(second)
        random_io(fe, expected, rounds=20, seed=3)  # the rings continue where they were
        assert fe.driver.queue(0).used_idx() == 80
    assert image.read_bytes() == expected


def test_killed_backend_resumes_the_session_on_the_same_connection(blk_cli: DeviceCli,
                                                                   image: Path) -> None:
    """The frontend never notices: a fresh jailed process replays the session's journal and
    continues the ring at the used index; every write lands once, in order."""
    expected = bytearray(image.read_bytes())
    with blk_cli.session() as fe:
        random_io(fe, expected, rounds=10, seed=4)
        victim_pid = blk_cli.device_pid(1)
        for n in range(3):
            victim = ProcessRef(victim_pid)
            assert victim.send(signal.SIGKILL)
            victim.close()
            pattern = r"frontend 1 resumed \((\d+) requests replayed\), served by jailed pid (\d+)"
            blk_cli.wait_line(pattern)
            resumed = [m for line in blk_cli.lines if (m := re.search(pattern, line))]
            deadline = time.monotonic() + 20
            while len(resumed) < n + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
                resumed = [m for line in blk_cli.lines if (m := re.search(pattern, line))]
            assert len(resumed) == n + 1, blk_cli.lines
            replayed, new_pid = int(resumed[-1].group(1)), int(resumed[-1].group(2))
            assert new_pid != victim_pid and replayed >= 8  # owner, features, table, ring setup
            random_io(fe, expected, rounds=10, seed=10 + n)  # same connection, no reconnect
            assert_jailed(new_pid)
            victim_pid = new_pid
        assert fe.driver.queue(0).used_idx() == 80  # 40 writes and 40 reads, each once
    assert image.read_bytes() == expected
    assert not any("frontend 2" in line for line in blk_cli.lines), blk_cli.lines


def test_killed_backend_without_resume_the_launcher_serves_the_next_frontend(
        tmp_path: Path, image: Path) -> None:
    blk_cli = DeviceCli(tmp_path, "blk", "--disk", str(image), "--no-resume")
    expected = bytearray(image.read_bytes())
    with blk_cli.session() as fe:
        random_io(fe, expected, rounds=10, seed=4)
        victim = ProcessRef(blk_cli.device_pid(1))
        assert victim.send(signal.SIGKILL)
        victim.close()
        blk_cli.wait_line(r"frontend 1 done: device process killed by SIGKILL")
        assert blk_cli.proc.poll() is None
        fe.reconnect(dial(blk_cli.socket))  # no clean stop: rings resume at the used index
        blk_cli.device_pid(2)
        random_io(fe, expected, rounds=10, seed=5)
    assert image.read_bytes() == expected
    blk_cli.wait_line(r"not resuming the session: --no-resume")
    blk_cli.stop()


def test_inflight_request_is_resubmitted_after_a_backend_crash(tmp_path: Path) -> None:
    """A console write blocks in the jailed process (its output, the launcher's stdout, is a pipe
    nobody reads): the chain is in flight, recorded in the inflight buffer the frontend holds.
    The process is killed; the next one, given the buffer back, writes it again and completes it."""
    cli = DeviceCli(tmp_path, "console", "-v", "--no-resume")  # output: stdout, a pipe to this test
    assert cli.proc.stdout is not None
    reader = cli.proc.stdout.fileno()
    os.set_blocking(reader, False)  # our own end of our own pipe
    try:
        with cli.session(queues=2) as fe:
            data = os.urandom(512 << 10)  # far more than a pipe holds
            tx = fe.driver.queue(1)
            head = tx.add([data], [])
            tx.kick()
            inflight_fd, desc = fe.inflight
            buf = mmap.mmap(inflight_fd, desc.mmap_size)
            entry = len(buf) // 2 + REGION_HEADER.size + DESC_STATE.size * head  # queue 1's region
            deadline = time.monotonic() + 10
            while buf[entry] != 1:  # the backend took the chain
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert tx.used_idx() == 0
            victim = ProcessRef(cli.device_pid(1))
            victim.send(signal.SIGKILL)
            victim.close()
            cli.wait_line(r"frontend 1 done: device process killed by SIGKILL")
            drain(reader)  # what the dead process managed to write: not part of the check
            got = bytearray()
            stop = threading.Event()

            def keep_draining() -> None:
                while not stop.is_set():
                    got.extend(drain(reader))
                    time.sleep(0.005)

            t = threading.Thread(target=keep_draining)
            t.start()
            try:
                # Tell the new backend the chain was already taken (base = avail idx): only the
                # inflight record can bring it back (a ring resumed at the used idx would redo
                # it anyway, in order).
                fe.bases[1] = tx.avail_idx
                fe.reconnect(dial(cli.socket))
                done = tx.wait_used(1, timeout=20)
            finally:
                stop.set()
                t.join()
            got.extend(drain(reader))  # the tail may still sit in the pipe when the chain completes
            assert [c.head for c in done] == [head]
            assert bytes(got[-len(data):]) == data
            cli.wait_line(r"resubmitting 1 chains in flight")
            buf.close()
    finally:
        assert cli.stop() == 143, "\n".join(cli.lines)


def drain(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


HOSTILE = {
    "bad-version": lambda fe: fe.conn.sock.send(vu.HEADER.pack(vu.Request.SET_OWNER, 2, 0)),
    "huge-payload": lambda fe: fe.conn.sock.send(vu.HEADER.pack(vu.Request.SET_OWNER, 1, 1 << 24)),
    "fd-flood": lambda fe: fe.conn.sock.sendmsg(
        [vu.encode(vu.request(vu.Request.SET_OWNER))[0]],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0] * 40).tobytes())]),
    "unknown-request": lambda fe: fe.conn.sock.send(vu.HEADER.pack(99, 1, 0)),
    "ring-outside-memory": lambda fe: (fe.call(vu.Request.SET_FEATURES, vu.U64Value(
        vu.VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1)), fe.set_mem_table(),
        fe.conn.send(vu.request(vu.Request.SET_VRING_ADDR, vu.VringAddr(0, 0, 1 << 50, 0, 0, 0)))),
}


def test_a_hostile_frontend_ends_only_its_own_process(blk_cli: DeviceCli) -> None:
    """Each hostile session ends its jailed process with status 1 (a protocol error, reported
    without a syscall the jail forbids: not SIGSYS); the launcher then serves a good frontend."""
    for n, (name, attack) in enumerate(HOSTILE.items(), start=1):
        with blk_cli.frontend(protocol=0) as fe:  # no REPLY_ACK: refusals end the session
            fe.handshake()
            attack(fe)
            blk_cli.wait_line(rf"frontend {n} done: device process exited with status 1")
    with blk_cli.session() as fe:
        assert fe.driver.blk_read(0, 512).status == VIRTIO_BLK_S_OK


def test_console_and_rng_devices(tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    console = DeviceCli(tmp_path, "console", "--output", str(out), "--once")
    with console.session(queues=2, user_offset=0) as fe:  # UML-style addresses
        fe.driver.console_write(b"hello from a jailed console\n")
    assert console.proc.wait(10) == 0
    assert out.read_bytes() == b"hello from a jailed console\n"
    rng = DeviceCli(tmp_path, "rng", "--once")
    with rng.session() as fe:
        assert_jailed(rng.device_pid(1))
        chunks = [fe.driver.rng_read(4096) for _ in range(8)]
        assert all(len(c) == 4096 for c in chunks) and len(set(chunks)) == 8
    assert rng.proc.wait(10) == 0


def test_one_frontend_at_a_time(blk_cli: DeviceCli) -> None:
    with blk_cli.frontend() as fe:
        fe.handshake()
        with blk_cli.frontend() as second:
            with pytest.raises(PeerGone):
                second.handshake()
        blk_cli.wait_line(r"turned away a frontend")
        fe.driver.init()
        assert fe.driver.blk_read(0, 512).status == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("args, needle", [
    (["blk", "--disk", "{tmp}/missing.img"], "no such file"),
    (["blk", "--disk", "{tmp}"], "is a directory"),
    (["blk", "--disk", "{tmp}/odd.img"], "512-byte sectors"),
    (["blk", "--disk", "{tmp}/empty.img"], "smaller than one 512-byte sector"),
    (["blk", "--disk", "{tmp}/link.img"], "symbolic link"),
    (["blk", "--disk", "{tmp}/odd.img,sparse"], "unknown option"),
    (["blk", "--disk", "{tmp}/good.img", "--socket-is-file"], "is not a socket"),
    (["console", "--output", "{tmp}"], "is a directory"),
    (["fs"], "invalid choice"),
    (["vsock", "--cid", "2", "--uds", "{tmp}/v.sock"], "--cid 2"),
    (["vsock", "--cid", "3", "--uds", "{tmp}"], "is not a socket"),
    (["net"], "required: --tap"),
    (["net", "--tap", "bad/name"], "tap"),
    (["net", "--tap", "bhx0", "--mac", "01:00:00:00:00:01"], "--mac"),
    (["net", "--tap", "bhx0", "--mtu", "20"], "--mtu 20"),
    (["net", "--tap", "bhx0", "--netns", "bh-no-such-namespace"], "ip netns add"),
], ids=["missing", "directory", "odd-size", "empty", "symlink", "bad-option", "not-a-socket",
        "output-directory", "unknown-device", "net-no-tap", "net-bad-tap", "net-multicast-mac",
        "net-mtu", "net-missing-netns", "vsock-reserved-cid", "vsock-uds-directory"])
def test_bad_input_is_one_line_and_status_2(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "good.img").write_bytes(bytes(4096))
    os.symlink(tmp_path / "good.img", tmp_path / "link.img")
    sock = tmp_path / "dev.sock"
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--socket-is-file" in argv:
        argv.remove("--socket-is-file")
        sock.write_text("not a socket")
    kind, rest = argv[0], argv[1:]
    proc = subprocess.run(bulkhead_argv("device", kind, "--socket", str(sock), *rest), cwd=ROOT,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bulkhead: ") and needle in lines[0], proc.stderr


def test_a_stale_socket_is_replaced(tmp_path: Path, image: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "blk.sock"))
    stale.close()  # the file stays, nobody listens
    cli = DeviceCli(tmp_path, "blk", "--disk", str(image), "--once")
    with cli.frontend() as fe:
        fe.handshake()
    assert cli.proc.wait(10) == 0


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon missing")
def test_the_frontend_double_against_qemu_storage_daemon(tmp_path: Path, image: Path) -> None:
    """The double is a real frontend: qemu-storage-daemon serves it (and completes out of order,
    which the driver's used-ring handling and the used_event re-check must survive)."""
    sock = tmp_path / "qsd.sock"
    qsd = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f'{{"driver":"file","node-name":"file0","filename":"{image}","aio":"threads"}}',
         "--blockdev", "driver=raw,node-name=disk0,file=file0",
         "--export", f"type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,"
                     f"addr.path={sock},writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ref = ProcessRef(qsd.pid)
    try:
        expected = bytearray(image.read_bytes())
        with VhostUserFrontend(dial(str(sock), timeout=10), queues=1) as fe:
            fe.handshake()
            fe.driver.init()
            random_io(fe, expected, rounds=40, seed=6)
            # Several requests in flight at once, completed in any order.
            q = fe.driver.queue(0)
            heads = {}
            for i in range(16):
                data = bytes([i]) * 4096
                heads[q.add([struct.pack("<IIQ", 1, 0, i * 8), data], [1])] = data
                expected[i * 4096:(i + 1) * 4096] = data
            q.kick()
            done = q.wait_used(16, timeout=10)
            assert sorted(c.head for c in done) == sorted(heads)
            got = fe.driver.blk_read(0, 16 * 4096)
            assert got.data == expected[:16 * 4096]
        assert fe.features  # negotiated with a backend we did not write
    finally:
        ref.send(signal.SIGTERM)
        qsd.wait(10)
        ref.close()
    assert image.read_bytes() == expected

