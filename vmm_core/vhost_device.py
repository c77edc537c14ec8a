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
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

from jail.errors import JailError
from jail.options import JailOptions
from jail.sandbox import JailedProcess, spawn

from ipc_protocol import kinds

from .devices.resources import open_image, open_output
from .devices.untrusted import escape
from .errors import BulkheadError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DEVICE_FAILED = 0, 1
BUSY_GRACE = 2.0  # seconds a frontend may wait for the one being served to leave


@dataclass(frozen=True)
class DeviceArgs:
    """What `bulkhead device` was asked to serve (built once from argv)."""

    kind: str
    socket_path: str
    disk: str | None = None
    readonly: bool = False
    lock: bool = True
    output: str | None = None
    once: bool = False
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
        level = ("WARNING", "INFO", "DEBUG")[min(args.verbose, 2)]
        return cls(args.device_kind, args.socket, disk, readonly, lock,
                   getattr(args, "output", None), args.once, args.seccomp, level)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `device` verb and its three kinds (called by `vmm_core.cli.build_parser`)."""
    device = sub.add_parser(
        "device", help="serve a virtio device to vhost-user frontends (UML, QEMU), one jailed "
        "process per connection", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  bulkhead device blk --socket /tmp/vda.sock --disk disk.img\n"
               "  linux.uml ... virtio_uml.device=/tmp/vda.sock:2\n"
               "  bulkhead device console --socket /tmp/hvc.sock --output console.txt\n"
               "  bulkhead device rng --socket /tmp/rng.sock --once\n")
    verbs = device.add_subparsers(dest="device_kind", required=True, parser_class=type(device))
    for kind, text in (("blk", "virtio-blk on a raw image"),
                       ("console", "virtio-console port 0, output to a file or stdout"),
                       ("rng", "virtio-rng from the host CSPRNG")):
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
        p.add_argument("--once", action="store_true",
                       help="exit when the first frontend leaves instead of waiting for the next")
        p.add_argument("--seccomp", choices=("kill", "trap", "log", "off"), default="kill",
                       help="action on a syscall outside the device's policy (default kill)")
        p.add_argument("-v", "--verbose", action="count", default=0)


# -- host resources, opened once outside the jail -------------------------------------------------
# The image and the console output are opened as for `bulkhead run` (vmm_core.devices.resources:
# O_NOFOLLOW, fstat checks with one-line errors, an OFD lock on the image).

def listen(path: str) -> socket.socket:
    """Listen on `path`; a stale socket (nobody listening) is replaced, anything else refused."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BulkheadError(f"--socket {path} exists and is not a socket: remove it or choose "
                                "another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # a leftover of a backend that is gone
        except OSError as err:
            raise BulkheadError(f"--socket {path}: cannot check the existing socket: {err.strerror}") from None
        else:
            raise BulkheadError(f"--socket {path}: another backend is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise BulkheadError(f"--socket {path}: cannot listen there: {err.strerror}") from None
    return sock


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
        self.listener = listen(cfg.socket_path)
        what = ""
        if cfg.kind == "blk":
            size = os.fstat(self.resources["disk"]).st_size
            what = f" (image {cfg.disk}, {size} bytes{', read-only' if cfg.readonly else ''})"
        self.say(f"listening on {cfg.socket_path}{what}")

    def _argv(self, conn_fd: int) -> list[str]:
        cfg = self.cfg
        argv = [sys.executable, "-m", "device_procs.vhost_user.main", "--type", cfg.kind,
                "--socket-fd", str(conn_fd), "--log-level", cfg.log_level]
        if "disk" in self.resources:
            argv += ["--disk-fd", str(self.resources["disk"])] + (["--readonly"] if cfg.readonly else [])
        if "output" in self.resources:
            argv += ["--output-fd", str(self.resources["output"])]
        return argv

    def start_device(self, conn: socket.socket) -> JailedProcess:
        fds = [conn.fileno(), *self.resources.values()]
        kind = kinds.kind(self.cfg.kind)
        sizes = {role: os.fstat(fd).st_size for role, fd in self.resources.items()}
        spec = JailOptions(seccomp=self.cfg.seccomp).spec_for(
            self.name, f"vhost_user_{kind.policy_name}", keep_fds=fds, fsize=kind.fsize_limit(sizes))
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        spec.log_fd = log_w
        spec.keep_fds.append(log_w)
        try:
            proc = spawn(spec, self._argv(conn.fileno()), pass_fds=[*fds, log_w],
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
                proc = self.start_device(conn)
            finally:
                conn.close()  # the device process has its own copy
            self.say(f"frontend {self.frontends} connected, served by jailed pid {proc.pid}")
            code, waiting = self._supervise(proc)
            if self.cfg.once or self.stopping is not None:
                if waiting is not None:
                    waiting.close()
                return code
        return EXIT_OK

    def _supervise(self, proc: JailedProcess) -> tuple[int, socket.socket | None]:
        """Wait for the device process to end.  A frontend that connects meanwhile waits up to
        BUSY_GRACE seconds (a frontend reconnecting just after leaving is served next); longer,
        or a third one, is turned away: closed, so it sees EOF rather than a hang."""
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
                ready = select.select(watched, [], [], timeout)[0]
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
        finally:
            os.close(launcher_fd)
            proc.release()
            if proc.status_fd >= 0:
                os.close(proc.status_fd)
                proc.status_fd = -1
        ok = how.code == 0 and how.violation is None
        self.say(f"frontend {self.frontends} done: device process {how}")
        return (EXIT_OK if ok else EXIT_DEVICE_FAILED), waiting

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.cfg.socket_path)
            except OSError:
                pass
            self.listener = None
        for fd in self.resources.values():
            os.close(fd)
        self.resources.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)


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
