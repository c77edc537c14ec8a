"""`bulkhead device blk|console|rng --socket PATH`: one of our virtio devices as a vhost-user backend.

The launcher (this process, unjailed) opens the host resources once, as `bulkhead run` does
(`vmm_core.devices.resources`: the image O_NOFOLLOW, a regular file of whole 512-byte sectors,
OFD-locked; the console output a regular file or stdout), and listens on the socket.  For each frontend that connects (UML's virtio_uml, QEMU's vhost-user-*-pci, the
test double) it accepts the connection and hands the connected fd, with the resources, to a
**fresh jailed device process** (`device_procs.vhost_user.main` through `jail.sandbox.spawn`:
namespaces, the `vhost_user_<device>` seccomp policy, no capabilities).  One frontend at a time:
one that connects while another is served waits up to `BUSY_GRACE` seconds for it to leave (a
frontend that reconnects at once is served next), then is closed (it sees EOF, not a hang).
When the device process
ends -- the frontend left, broke the protocol, or the process was killed -- the launcher reports
how and waits for the next frontend (`--once`: exits instead).

The launcher signals only the processes it started, through pidfds (`JailedProcess.kill`).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from jail.errors import JailError
from jail.options import JailOptions
from jail.sandbox import JailExit, JailedProcess, spawn

from ipc_protocol import kinds
from ipc_protocol.transport.fds import socketpair as journal_pair
from ipc_protocol.vhost_user_journal import SessionJournal

from .devices.resources import open_image, open_output
from .unix_socket import listen
from .vsock_broker import VsockBroker
from .devices.tap import NetNamespace, Tap, TapError, check_mac, default_mac, open_tap_resource
from .devices.untrusted import escape
from .errors import BulkheadError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DEVICE_FAILED = 0, 1
BUSY_GRACE = 2.0  # seconds a frontend may wait for the one being served to leave
# A session is resumed at most this many times within RESUME_WINDOW seconds (a device that dies
# on every replay, e.g. on a request of a hostile frontend, is not restarted forever).
RESUME_BUDGET, RESUME_WINDOW = 5, 10.0
JOURNAL_SEND_TIMEOUT = 10.0


@dataclass(frozen=True)
class DeviceArgs:
    """What `bulkhead device` was asked to serve (built once from argv)."""

    kind: str
    socket_path: str
    disk: str | None = None
    readonly: bool = False
    lock: bool = True
    output: str | None = None
    tap: str | None = None
    netns: str | None = None
    mac: str | None = None
    mtu: int | None = None
    cid: int | None = None
    uds: str | None = None
    max_connections: int = 256
    once: bool = False
    resume: bool = True
    seccomp: str = "kill"
    log_level: str = "WARNING"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DeviceArgs":
        disk, readonly, lock = None, False, True
        if args.device_kind == "blk":
            disk, _, options = args.disk.partition(",")
            for opt in filter(None, options.split(",")):
                if opt in ("readonly", "ro"):
                    readonly = True
                elif opt == "nolock":
                    lock = False
                else:
                    raise BulkheadError(f"--disk {args.disk}: unknown option {opt!r} "
                                        "(known: readonly, nolock)")
        mac = getattr(args, "mac", None)
        if mac is not None:
            try:
                mac = check_mac(mac)
            except TapError as err:
                raise BulkheadError(f"--mac {mac}: {err}") from None
        mtu = getattr(args, "mtu", None)
        if mtu is not None and not 68 <= mtu <= 65535:
            raise BulkheadError(f"--mtu {mtu}: must be 68..65535")
        cid = getattr(args, "cid", None)
        if cid is not None and not 3 <= cid <= 0xFFFFFFFE:
            raise BulkheadError(f"--cid {cid}: a guest's CID is 3..4294967294 (0-2 are reserved)")
        max_connections = getattr(args, "max_connections", 256)
        if not 1 <= max_connections <= 4096:
            raise BulkheadError(f"--max-connections {max_connections}: must be 1..4096")
        level = ("WARNING", "INFO", "DEBUG")[min(args.verbose, 2)]
        return cls(args.device_kind, args.socket, disk, readonly, lock,
                   getattr(args, "output", None), getattr(args, "tap", None),
                   getattr(args, "netns", None), mac, mtu, cid, getattr(args, "uds", None),
                   max_connections, args.once, not args.no_resume, args.seccomp, level)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `device` verb and its three kinds (called by `vmm_core.cli.build_parser`)."""
    device = sub.add_parser(
        "device", help="serve a virtio device to vhost-user frontends (UML, QEMU), one jailed "
        "process per connection", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  bulkhead device blk --socket /tmp/vda.sock --disk disk.img\n"
               "  linux.uml ... virtio_uml.device=/tmp/vda.sock:2\n"
               "  bulkhead device console --socket /tmp/hvc.sock --output console.txt\n"
               "  bulkhead device rng --socket /tmp/rng.sock --once\n"
               "  bulkhead device net --socket /tmp/eth.sock --tap bhtap0 --netns tenant1\n"
               "  linux.uml ... virtio_uml.device=/tmp/eth.sock:1\n"
               "  bulkhead device vsock --socket /tmp/vsock-dev.sock --cid 3 --uds /tmp/v.sock\n")
    verbs = device.add_subparsers(dest="device_kind", required=True, parser_class=type(device))
    for kind, text in (("blk", "virtio-blk on a raw image"),
                       ("console", "virtio-console port 0, output to a file or stdout"),
                       ("rng", "virtio-rng from the host CSPRNG"),
                       ("net", "virtio-net on a tap the launcher opens (in --netns)"),
                       ("vsock", "virtio-vsock to host Unix sockets, brokered by the launcher")):
        p = verbs.add_parser(kind, help=text)
        p.add_argument("--socket", required=True, metavar="PATH",
                       help="the vhost-user socket to listen on (created; a stale one is replaced)")
        if kind == "blk":
            p.add_argument("--disk", required=True, metavar="IMG[,readonly][,nolock]",
                           help="raw image: a regular file, size a multiple of 512 bytes; "
                                "nolock: skip the image lock (backends sharing one image)")
        if kind == "console":
            p.add_argument("--output", metavar="FILE",
                           help="where the guest's console output goes (default: stdout)")
        if kind == "net":
            p.add_argument("--tap", required=True, metavar="NAME",
                           help="tap interface: created, or a persistent tap attached "
                                "('%%d': the kernel numbers it)")
            p.add_argument("--netns", metavar="NAME|PATH|new",
                           help="the tap's network namespace: an `ip netns` name, a path to a "
                                "namespace file, or new (kept while the launcher runs); "
                                "default: the launcher's")
            p.add_argument("--mac", help="the guest's MAC (default: stable per tap name)")
            p.add_argument("--mtu", type=int, help="MTU of the tap and the device (68..65535; "
                                                   "default: the tap's)")
        if kind == "vsock":
            p.add_argument("--cid", type=int, required=True, help="the guest's CID (3..)")
            p.add_argument("--uds", required=True, metavar="PATH",
                           help="host programs connect here and send 'CONNECT <port>\\n'; "
                                "guest connections to host port P go to PATH_P")
            p.add_argument("--max-connections", type=int, default=256,
                           help="connections open at once (more get RST; default 256)")
        p.add_argument("--once", action="store_true",
                       help="exit when the first frontend leaves instead of waiting for the next")
        p.add_argument("--no-resume", action="store_true",
                       help="when the device process dies, close the frontend's connection "
                            "instead of resuming its session in a fresh process")
        p.add_argument("--seccomp", choices=("kill", "trap", "log", "off"), default="kill",
                       help="action on a syscall outside the device's policy (default kill)")
        p.add_argument("-v", "--verbose", action="count", default=0)


# -- host resources, opened once outside the jail -------------------------------------------------
# The image and the console output are opened as for `bulkhead run` (vmm_core.devices.resources:
# O_NOFOLLOW, fstat checks with one-line errors, an OFD lock on the image).

# -- the launcher ----------------------------------------------------------------------------------

class Launcher:
    """Accepts frontends one at a time and serves each from a fresh jailed device process."""

    def __init__(self, cfg: DeviceArgs) -> None:
        self.cfg = cfg
        self.name = f"vhost-{cfg.kind}"
        self.resources: dict[str, int] = {}
        self.listener: socket.socket | None = None
        self.frontends = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.stopping: int | None = None  # the signal that asked us to stop
        self._device_log = -1  # read end of the serving device's stderr
        self._log_buf = b""
        self.tap: Tap | None = None
        self.netns: NetNamespace | None = None  # --netns new: ours, closed at exit
        self.broker: VsockBroker | None = None

    def say(self, text: str) -> None:
        print(f"bulkhead device {self.cfg.kind}: {text}", file=sys.stderr, flush=True)

    def open(self) -> None:
        cfg = self.cfg
        if cfg.kind == "blk":
            assert cfg.disk is not None
            self.resources["disk"] = open_image(cfg.disk, cfg.readonly, f"--disk {cfg.disk}",
                                               lock=cfg.lock)
        elif cfg.kind == "console":
            output = cfg.output or "stdout"
            self.resources["output"] = open_output(output, f"--output {output}")
        elif cfg.kind == "net":
            assert cfg.tap is not None
            # The tap outlives every device process: a frontend that reconnects finds it as it was.
            self.tap, self.netns = open_tap_resource(cfg.tap, cfg.netns, cfg.mtu, f"--tap {cfg.tap}")
            self.resources["tap"] = self.tap.fd
        elif cfg.kind == "vsock":
            assert cfg.uds is not None
            # Connections are the broker's (this process) to make; the device moves bytes.
            assert cfg.cid is not None
            self.broker = VsockBroker(cfg.uds, cfg.cid, what="--uds", cid_what="--cid ")
            self.resources["broker"] = self.broker.open()
        self.listener = listen(cfg.socket_path)
        what = ""
        if cfg.kind == "blk":
            size = os.fstat(self.resources["disk"]).st_size
            what = f" (image {cfg.disk}, {size} bytes{', read-only' if cfg.readonly else ''})"
        elif self.tap is not None:
            where = f", netns {self.netns.path}" if self.netns is not None else \
                (f", netns {cfg.netns}" if cfg.netns else "")
            what = f" (tap {self.tap.name}, mtu {self.tap.mtu}, mac {self.mac}{where})"
        elif self.broker is not None:
            what = f" (cid {cfg.cid}, host sockets {cfg.uds})"
        self.say(f"listening on {cfg.socket_path}{what}")

    @property
    def mac(self) -> str:
        assert self.tap is not None
        return self.cfg.mac or default_mac(f"vhost-user:{self.tap.name}", 0)

    def _argv(self, conn_fd: int, journal_fd: int | None, resume: bool) -> list[str]:
        cfg = self.cfg
        argv = [sys.executable, "-m", "device_procs.vhost_user.main", "--type", cfg.kind,
                "--socket-fd", str(conn_fd), "--log-level", cfg.log_level]
        if journal_fd is not None:
            argv += ["--journal-fd", str(journal_fd)] + (["--resume"] if resume else [])
        if "disk" in self.resources:
            argv += ["--disk-fd", str(self.resources["disk"])] + (["--readonly"] if cfg.readonly else [])
        if "output" in self.resources:
            argv += ["--output-fd", str(self.resources["output"])]
        if self.tap is not None:
            argv += ["--tap-fd", str(self.tap.fd), "--mac", self.mac, "--mtu", str(self.tap.mtu)]
        if self.broker is not None:
            argv += ["--broker-fd", str(self.resources["broker"]), "--cid", str(cfg.cid),
                     "--max-connections", str(cfg.max_connections)]
        return argv

    def start_device(self, conn: socket.socket,
                     replay: SessionJournal | None = None) -> tuple[JailedProcess, socket.socket | None]:
        """A jailed device process for `conn`; with `replay`, it resumes that session.  Returns
        it and the launcher's end of its journal (None with --no-resume)."""
        journal, device_end = journal_pair() if self.cfg.resume else (None, None)
        try:
            proc = self._spawn(conn, device_end, replay is not None)
        except BaseException:
            if journal is not None:
                journal.close()
            raise
        finally:
            if device_end is not None:
                device_end.close()
        if replay is not None and journal is not None:
            journal.settimeout(JOURNAL_SEND_TIMEOUT)
            try:
                replay.play(journal)
            except OSError as err:  # the new process died at once: _supervise sees how
                self.say(f"could not replay the session: {err}")
            journal.setblocking(False)
        return proc, journal

    def _spawn(self, conn: socket.socket, journal: socket.socket | None, resume: bool) -> JailedProcess:
        fds = [conn.fileno(), *self.resources.values()]
        if journal is not None:
            fds.append(journal.fileno())
        kind = kinds.kind(self.cfg.kind)
        sizes = {role: os.fstat(fd).st_size for role, fd in self.resources.items()}
        spec = JailOptions(seccomp=self.cfg.seccomp).spec_for(
            self.name, f"vhost_user_{kind.policy_name}", keep_fds=fds, fsize=kind.fsize_limit(sizes))
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        spec.log_fd = log_w
        spec.keep_fds.append(log_w)
        try:
            argv = self._argv(conn.fileno(), journal.fileno() if journal is not None else None, resume)
            proc = spawn(spec, argv, pass_fds=[*fds, log_w],
                         stdin=subprocess.DEVNULL)
        except JailError as err:
            os.close(log_r)
            raise BulkheadError(f"cannot start the jailed device process: {err}") from None
        finally:
            os.close(log_w)
        self._device_log = log_r
        self._log_buf = b""
        return proc

    def _relay_log(self, final: bool = False) -> None:
        """The device's stderr, one escaped line at a time (it may write anything)."""
        if self._device_log < 0:
            return
        while select.select([self._device_log], [], [], 0)[0]:
            chunk = os.read(self._device_log, 4096)
            if not chunk:
                final = True
                break
            self._log_buf = (self._log_buf + chunk)[-65536:]
            *lines, self._log_buf = self._log_buf.split(b"\n")
            for line in lines[-20:]:  # a flood keeps only its last lines
                self.say("device: " + escape(line.decode(errors="replace")))
        if final:
            os.close(self._device_log)
            self._device_log = -1

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = signum
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve(self) -> int:
        assert self.listener is not None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        waiting: socket.socket | None = None  # a frontend that came while another was served
        while self.stopping is None:
            if waiting is None:
                ready = select.select([self.listener, self._wake_r], [], [])[0]
                if self.listener not in ready:
                    continue
                conn, _ = self.listener.accept()
            else:
                conn, waiting = waiting, None
            self.frontends += 1
            try:
                code, waiting = self._serve_frontend(conn)
            finally:
                conn.close()  # the frontend sees EOF only now: every device process is gone
            if self.cfg.once or self.stopping is not None:
                if waiting is not None:
                    waiting.close()
                return code
        return EXIT_OK

    def _serve_frontend(self, conn: socket.socket) -> tuple[int, socket.socket | None]:
        """Serve one frontend's session; a device process that dies while the frontend is still
        connected is replaced by one that replays the session's journal (see
        `ipc_protocol.vhost_user_journal`), within RESUME_BUDGET."""
        session = SessionJournal()
        resumes: list[float] = []
        replay: SessionJournal | None = None
        try:
            while True:
                proc, journal = self.start_device(conn, replay)
                if replay is None:
                    self.say(f"frontend {self.frontends} connected, served by jailed pid {proc.pid}")
                else:
                    self.say(f"frontend {self.frontends} resumed ({len(session.records)} requests "
                             f"replayed), served by jailed pid {proc.pid}")
                try:
                    code, waiting, how = self._supervise(proc, journal, session)
                finally:
                    if journal is not None:
                        journal.close()
                why_not = self._why_not_resume(how, conn, session, resumes, waiting)
                if why_not is not None:
                    if how.signal is not None or how.violation is not None:
                        self.say(f"frontend {self.frontends}: not resuming the session: {why_not}")
                    return code, waiting
                resumes.append(time.monotonic())
                replay = session
        finally:
            session.clear()

    def _why_not_resume(self, how: JailExit, conn: socket.socket, session: SessionJournal,
                        resumes: list[float], waiting: socket.socket | None) -> str | None:
        """None if the session is to be resumed in a fresh device process, else why not."""
        if how.code is not None:
            return "the device process exited"  # 0: the frontend left; 1: it broke the protocol
        if not self.cfg.resume:
            return "--no-resume"
        if self.stopping is not None:
            return "stopping"
        if waiting is not None:
            return "another frontend is waiting"
        if session.overflow is not None:
            return session.overflow
        if not _still_connected(conn):
            return "the frontend has left"
        now = time.monotonic()
        recent = [t for t in resumes if now - t < RESUME_WINDOW]
        if len(recent) >= RESUME_BUDGET:
            return f"{len(recent)} resumes within {RESUME_WINDOW:.0f} s"
        return None

    def _supervise(self, proc: JailedProcess, journal: socket.socket | None,
                   session: SessionJournal) -> tuple[int, socket.socket | None, JailExit]:
        """Wait for the device process to end, keeping its journal.  A frontend that connects
        meanwhile waits up to BUSY_GRACE seconds (a frontend reconnecting just after leaving is
        served next); longer, or a third one, is turned away: closed, so it sees EOF rather
        than a hang."""
        assert self.listener is not None
        launcher_fd = os.pidfd_open(proc.launcher.pid)  # our child, not yet reaped
        waiting: socket.socket | None = None
        waiting_since = 0.0
        try:
            while True:
                timeout = None if waiting is None else \
                    max(0.0, waiting_since + BUSY_GRACE - time.monotonic())
                watched = [launcher_fd, self.listener, self._wake_r]
                if self._device_log >= 0:
                    watched.append(self._device_log)
                if journal is not None:
                    watched.append(journal)
                ready = select.select(watched, [], [], timeout)[0]
                if journal in ready and not session.take(journal):
                    journal = None  # the device's end is closed: it is exiting
                if self._device_log in ready:
                    self._relay_log()
                if self.listener in ready:
                    conn, _ = self.listener.accept()
                    if waiting is None:
                        waiting, waiting_since = conn, time.monotonic()
                    else:
                        conn.close()
                        self.say("turned away a frontend: one frontend at a time")
                if self._wake_r in ready and self.stopping is not None:
                    proc.kill()  # through its pidfds: the device, then its jail launcher
                if launcher_fd in ready:
                    break
                if waiting is not None and time.monotonic() >= waiting_since + BUSY_GRACE:
                    waiting.close()
                    waiting = None
                    self.say("turned away a frontend: one frontend at a time")
            how = proc.wait()
            self._relay_log(final=True)
            # The records the device wrote just before it ended.
            while journal is not None and select.select([journal], [], [], 0)[0] \
                    and session.take(journal):
                pass
        finally:
            os.close(launcher_fd)
            proc.release()
            if proc.status_fd >= 0:
                os.close(proc.status_fd)
                proc.status_fd = -1
        ok = how.code == 0 and how.violation is None
        self.say(f"frontend {self.frontends} done: device process {how}")
        return (EXIT_OK if ok else EXIT_DEVICE_FAILED), waiting, how

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.cfg.socket_path)
            except OSError:
                pass
            self.listener = None
        for role, fd in self.resources.items():
            if role not in ("tap", "broker"):  # those two are closed by their owners below
                os.close(fd)
        self.resources.clear()
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        if self.netns is not None:
            self.netns.close()
            self.netns = None
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        os.close(self._wake_r)
        os.close(self._wake_w)


def _still_connected(conn: socket.socket) -> bool:
    """True while the frontend has not closed its end (what it sent meanwhile stays queued)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def run_device(args: argparse.Namespace) -> int:
    """The `device` verb: bad input raises BulkheadError (one line, exit 2 in cli.main)."""
    cfg = DeviceArgs.from_args(args)
    launcher = Launcher(cfg)
    try:
        launcher.open()
        code = launcher.serve()
    finally:
        launcher.close()
    if launcher.stopping is not None:
        return 128 + launcher.stopping
    return code
