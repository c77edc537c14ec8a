"""A user-mode Linux test bed: a real Linux kernel, as an ordinary process, driving vhost-user devices.

User-mode Linux (Debian's `user-mode-linux`: `linux.uml` plus its modules) is a frontend for
vhost-user through `virtio_uml`, so Linux's own `virtio_blk`, `virtio_net`, ... drivers can be run
against a vhost-user backend without KVM.  One boot::

    with UmlBed() as bed:
        bed.add_blk("disk", QsdBlkBackend(), "/path/disk.img")     # started now, stopped on exit
        run = bed.run('echo "UML-RESULT size=$(blockdev --getsize64 $UML_DEV_disk)"', timeout=60)
        run.check()                                                # guest script exited 0
        run.results["size"]

What the guest sees (facts in /work/shared/VHOST_USER.md):

- the host's root through hostfs, read-only; `/dev` is the guest's devtmpfs; proc and sysfs are
  mounted by the generated init script, which then loads each device's modules (from
  `/usr/lib/uml/modules/<version>/kernel`, the version asked from `linux.uml` at run time, the
  order from `modules.dep`), waits for each device and exports `UML_DEV_<name>` (`/dev/vda` for a
  blk device, the interface name for net, the virtio sysfs directory otherwise);
- `$UML_OUT`: a host directory mounted read-write (hostfs) at the same path, for files the host
  reads afterwards (`UmlRun.out_dir`); `$TMPDIR`/`$HOME`: a guest tmpfs;
- the guest script (shell, or `python3` from the host's root) runs with `$UML_OUT` as its working
  directory; its stdout is the console, where lines `UML-RESULT key=value [key=value...]` (values
  without blanks) are collected into `UmlRun.results`.  Its exit status comes back as
  `UmlRun.guest_status` and the guest powers off (sysrq `o`).

Processes: UML forks helper processes of its own (I/O helpers, one host process per guest address
space) that survive a SIGKILL of its main process.  So the bed starts
`setpriv --pdeathsig KILL unshare --pid --fork --kill-child=SIGKILL linux.uml ...`: UML's main
process is the init of a PID namespace the bed created, and when it dies the kernel kills every
other process in it.  On timeout or kernel panic the bed signals only processes it started,
through pidfds (UML's main process, then the `unshare` launcher), and before returning it checks,
holding the namespace open, that nothing is left in it.  The parent-death signal covers a test
runner that dies itself; it follows the thread that spawned the process, so use the bed from a
thread that outlives it.  UML's own ~/.uml/<umid> directory goes into the run's directory
(`uml_dir=`).  Root is needed: in a user namespace host root's files stat as nobody, and the
guest's setuid mount(8) would refuse to mount proc.

Traps: a backend that does not accept a second connection cannot serve a second `run` of the
same bed (UML never reconnects either: a backend restart means a new boot); `mem=` is also a
tmpfs file in a private directory under /dev/shm, so `mem_mib` costs host RAM while it runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from jail.pidfd import ProcessRef, open_ref
from vmm_core.errors import BulkheadError
from vmm_core.testing import uml_xstate

UML_BINARY = "linux.uml"
UML_MODULES = "/usr/lib/uml/modules"
QSD_BINARY = "qemu-storage-daemon"
SHM = "/dev/shm"

_RESULT = re.compile(r"^UML-RESULT (.*)$")
_EXIT = re.compile(r"^UML-EXIT status=(\d+)\s*$")
_BED_ERROR = re.compile(r"^UML-BED-ERROR (.*)$")
_PANIC = "Kernel panic - not syncing"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UmlError(BulkheadError):
    """The test bed could not do what was asked; the first line says what and what to do, the
    rest (if any) is the guest's console for a post-mortem."""


class UmlTimeout(UmlError):
    """The guest did not power off within the time limit; `run` holds what it printed."""

    def __init__(self, message: str, run: "UmlRun") -> None:
        super().__init__(message)
        self.run = run


# --- device kinds --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceKind:
    """What the bed knows about one kind of virtio device: its virtio device id (the second field
    of `virtio_uml.device=`), the module whose driver binds it (dependencies come from
    modules.dep) and how the guest names a probed device (`UML_DEV_<name>`)."""

    name: str
    virtio_id: int
    module: str            # relative to the modules' kernel/ directory
    child: str | None      # sysfs child of the virtio device holding the guest-visible name
    node: str              # format of UML_DEV_<name>: {child} = that child's name, {sys} = sysfs dir


DEVICE_KINDS = {k.name: k for k in (
    DeviceKind("blk", 2, "drivers/block/virtio_blk.ko", "block", "/dev/{child}"),
    DeviceKind("console", 3, "drivers/char/virtio_console.ko", None, "{sys}"),
    DeviceKind("net", 1, "drivers/net/virtio_net.ko", "net", "{child}"),
    DeviceKind("vsock", 19, "net/vmw_vsock/vmw_vsock_virtio_transport.ko", None, "{sys}"),
    DeviceKind("fs", 26, "fs/fuse/virtiofs.ko", None, "{sys}"),
)}


@dataclass(frozen=True)
class Device:
    """One `virtio_uml.device=socket:virtio_id:platform_id`; `name` becomes `UML_DEV_<name>`."""

    name: str
    kind: DeviceKind
    socket: str


# --- host facts ----------------------------------------------------------------------------------

def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@functools.cache
def kernel_version() -> str:
    """The UML kernel's release (`linux.uml --version`), which names its modules directory."""
    binary = _which(UML_BINARY)
    if binary is None:
        raise UmlError(f"{UML_BINARY} not found: install Debian's user-mode-linux (./dev.sh setup)")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    version = out.stdout.strip()
    if out.returncode != 0 or not version or "/" in version:
        raise UmlError(f"{binary} --version failed ({out.returncode}): {out.stderr.strip()}")
    return version


def module_dir() -> str:
    """`/usr/lib/uml/modules/<version>` of the installed `linux.uml`."""
    path = os.path.join(UML_MODULES, kernel_version())
    if not os.path.isfile(os.path.join(path, "modules.dep")):
        have = sorted(os.listdir(UML_MODULES)) if os.path.isdir(UML_MODULES) else []
        raise UmlError(f"no UML modules for {kernel_version()} in {UML_MODULES} (found {have}): "
                       "reinstall user-mode-linux")
    return path


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: `kernel/a.ko: kernel/b.ko kernel/c.ko` -> {'kernel/a.ko': [b, c]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" in line:
            mod, rest = line.split(":", 1)
            deps[mod.strip()] = rest.split()
    return deps


def load_order(modules: list[str], deps: dict[str, list[str]]) -> list[str]:
    """Modules (paths relative to the modules directory) to insmod, dependencies first, each
    once.  modules.dep lists every (indirect) dependency, the one to load first last, which is how
    modprobe reads it."""
    order: list[str] = []
    for mod in modules:
        if mod not in deps:
            raise UmlError(f"{mod} is not in this UML kernel's modules.dep")
        for m in [*reversed(deps[mod]), mod]:
            if m not in order:
                order.append(m)
    return order


@functools.cache
def _pid_namespace_flags() -> tuple[str, ...]:
    """The `unshare` flags that give UML a PID namespace of its own (root only, see below)."""
    if os.geteuid() != 0:
        # In a user namespace host root's files stat as nobody, so the guest's setuid mount(8)
        # runs with euid 65534 and refuses to mount proc: the bed needs real root.
        raise UmlError("the UML bed needs root: it gives UML a PID namespace without a user "
                       "namespace (which would break setuid tools on the hostfs root)")
    flags = ("--pid", "--fork")
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        raise UmlError(f"cannot create a PID namespace (unshare {' '.join(flags)}: "
                       f"{probe.stderr.strip()}); the bed needs one to reap UML's helper processes")
    return flags


def _uml_command() -> list[str]:
    """linux.uml, through `env LD_PRELOAD=` of the xstate shim on x86-64 (see uml_xstate.c: this
    UML cannot switch FPU state on hosts with a large XSAVE area; the shim is a no-op elsewhere)."""
    binary = _which(UML_BINARY) or UML_BINARY
    if platform.machine() != "x86_64":
        return [binary]
    return ["env", f"LD_PRELOAD={uml_xstate.shim_path()}", binary]


def uml_unavailable() -> str | None:
    """Why the bed cannot boot UML on this machine, or None if it can."""
    try:
        module_dir()
        _pid_namespace_flags()
        _uml_command()
    except (BulkheadError, OSError, subprocess.SubprocessError) as e:
        return str(e)
    if not os.path.isdir(SHM):
        return f"{SHM} is missing: UML's memory file needs a tmpfs"
    return None


# --- results -------------------------------------------------------------------------------------

def parse_results(text: str) -> dict[str, str]:
    """`UML-RESULT key=value [key=value...]` lines of console output -> {key: value} (last wins)."""
    results: dict[str, str] = {}
    for line in text.splitlines():
        m = _RESULT.match(line.rstrip("\r"))
        if not m:
            continue
        for token in m.group(1).split():
            key, sep, value = token.partition("=")
            if sep and key:
                results[key] = value
    return results


@dataclass
class UmlRun:
    """One boot: what the console showed and what the guest reported."""

    returncode: int | None          # of the launcher (UML's own exit status), None on timeout
    output: str                     # the console (kernel messages and the guest script's output)
    stderr: str                     # UML's host-side stderr (its boot checks)
    out_dir: str                    # $UML_OUT on the host
    duration: float
    uml_pid: int | None = None      # UML's main process on the host (gone now)
    pid_namespace: str | None = None
    timed_out: bool = False
    panic: str | None = None          # the kernel's panic line (UML hangs after one: killed)
    results: dict[str, str] = field(default_factory=dict)
    guest_status: int | None = None  # exit status of the guest script; None if it never finished
    bed_error: str | None = None     # the init script's own failure (mount, insmod, device)

    @property
    def dmesg(self) -> str:
        """The guest's kernel log, saved by the init script after the guest script (if it got there)."""
        try:
            with open(os.path.join(self.out_dir, "dmesg.txt"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def explain(self) -> str:
        return (f"UML exit {self.returncode}, guest status {self.guest_status}, "
                f"bed error {self.bed_error}, panic {self.panic}, {self.duration:.1f} s\n"
                f"--- console\n{self.output[-8000:]}"
                f"\n--- stderr\n{self.stderr[-2000:]}")

    def check(self) -> "UmlRun":
        """self if the guest script ran and exited 0; `UmlError` with the console otherwise."""
        if self.bed_error or self.panic or self.guest_status != 0:
            raise UmlError(f"guest run failed\n{self.explain()}")
        return self


def _init_script(devices: list[Device], modules: list[str], script: str, python: bool,
                 env: dict[str, str], out_dir: str, scratch: str) -> str:
    """PID 1 of the guest (dash on the host's read-only root)."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# Generated by vmm_core.testing.uml: PID 1 of a user-mode Linux test guest.",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; export PATH",
        "halt_now() { sync; echo o > /proc/sysrq-trigger; sleep 2; poweroff -f; sleep 30; }",
        'fail() { echo "UML-BED-ERROR $*"; halt_now; }',
        "mount -t proc proc /proc || fail mount-proc",
        "mount -t sysfs sysfs /sys || fail mount-sysfs",
        f"mount -t hostfs -o {q(out_dir)} none {q(out_dir)} || fail mount-out",
        f"mount -t tmpfs -o mode=1777 tmpfs {q(scratch)} || fail mount-scratch",
    ]
    lines += [f"insmod {q(m)} || fail insmod-{os.path.basename(m)}" for m in modules]
    lines += [
        # wait_dev PLATFORM_ID VAR CHILD FORMAT: the virtio device under virtio-uml.PLATFORM_ID,
        # bound to its driver (and its CHILD entry present, with a /dev node for blk).
        "wait_dev() {",
        "    i=0",
        "    while [ $i -lt 200 ]; do",
        "        for d in /sys/devices/virtio-uml-cmdline/virtio-uml.$1/virtio*; do",
        '            [ -e "$d/driver" ] || continue',
        '            if [ -z "$3" ]; then eval "$2=\\$d"; export $2; return 0; fi',
        '            for c in "$d/$3"/*; do',
        '                [ -e "$c" ] || continue',
        '                c=${c##*/}',
        '                [ "$3" = block ] && ! [ -b "/dev/$c" ] && continue',
        '                eval "$2=$(printf "$4" "$c")"; export $2; return 0',
        "            done",
        "        done",
        "        sleep 0.05; i=$((i + 1))",
        "    done",
        '    fail "no-device-$2"',
        "}",
    ]
    for pid, dev in enumerate(devices):
        fmt = dev.kind.node.replace("{child}", "%s").replace("{sys}", "%s")
        lines.append(f"wait_dev {pid} UML_DEV_{dev.name} {q(dev.kind.child or '')} {q(fmt)}")
    exports = {"UML_OUT": out_dir, "TMPDIR": scratch, "HOME": scratch, **env}
    lines += [f"{k}={q(v)}; export {k}" for k, v in exports.items()]
    interpreter = "python3 -u" if python else "sh"
    lines += [
        f"cd {q(out_dir)} || fail cd-out",
        "echo UML-BED-READY",
        f"{interpreter} {q(script)}",
        'echo "UML-EXIT status=$?"',
        f"dmesg > {q(os.path.join(out_dir, 'dmesg.txt'))} 2>/dev/null",
        "halt_now",
    ]
    return "\n".join(lines) + "\n"


# --- processes -----------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _processes_in(ns: tuple[int, int]) -> list[int]:
    """Pids of live processes in the PID namespace `ns` ((st_dev, st_ino) of its nsfs file).

    Only meaningful while the caller holds that namespace open: a namespace's inode number is
    reused once it is gone (by anyone's next namespace)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/pid")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == ns:
                found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Launched:
    """`unshare` and the UML main process it forked (the init of the PID namespace)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.launcher = ProcessRef(proc.pid)
        self.uml: ProcessRef | None = None
        self.ns: str | None = None        # "pid:[inode]", for reports
        self._ns_fd = -1                  # holds the namespace (and so its inode number) alive

    def find_uml(self, timeout: float) -> None:
        """Hold UML's main process by pidfd and its PID namespace by an nsfs fd."""
        ours = os.stat("/proc/self/ns/pid").st_ino
        deadline = time.monotonic() + timeout
        while self.uml is None and self.proc.poll() is None and time.monotonic() < deadline:
            for pid in _children(self.proc.pid):
                ref = open_ref(pid)
                if ref is None:
                    continue
                try:
                    ns_fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    ref.close()
                    continue
                # Both opened after reading the pid, and it is still the launcher's child: the
                # pidfd and the namespace are that child's.
                if _ppid(pid) == self.proc.pid and os.fstat(ns_fd).st_ino != ours:
                    self.uml, self._ns_fd = ref, ns_fd
                    self.ns = f"pid:[{os.fstat(ns_fd).st_ino}]"
                    return
                os.close(ns_fd)
                ref.close()
            time.sleep(0.005)

    def stop(self) -> list[int]:
        """Kill what is still running and reap the launcher; pids found left in the namespace."""
        if self.proc.poll() is None and self.uml is not None:
            self.uml.send(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.proc.poll() is None:
            self.launcher.send(signal.SIGKILL)   # --kill-child then takes UML down
            self.proc.wait()
        left: list[int] = []
        if self._ns_fd >= 0:
            st = os.fstat(self._ns_fd)
            deadline = time.monotonic() + 5
            while (left := _processes_in((st.st_dev, st.st_ino))) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in left:  # ours: they live in the namespace we created (and still hold)
                ref = open_ref(pid)
                if ref is not None:
                    ref.send(signal.SIGKILL)
                    ref.close()
            os.close(self._ns_fd)
            self._ns_fd = -1
        for ref in (self.uml, self.launcher):
            if ref is not None:
                ref.close()
        return left


# --- the bed -------------------------------------------------------------------------------------

class UmlBed:
    """A private directory, the vhost-user devices of the next boots, and the backends it started.

    Use as a context manager: leaving it stops every backend it started (in reverse order) and
    removes its directory (`keep=True` leaves the directory for a post-mortem)."""

    def __init__(self, *, mem_mib: int = 256, parent_dir: str | None = None, keep: bool = False,
                 kernel_args: tuple[str, ...] = ("quiet",), netns: str | None = None) -> None:
        self.mem_mib = mem_mib
        self.kernel_args = kernel_args
        # UML itself runs in this `ip netns` namespace (its built-in transports, e.g.
        # vec0:transport=tap in kernel_args, open their taps there).
        self.netns = netns
        self.keep = keep
        self.dir = tempfile.mkdtemp(prefix="bulkhead-uml-", dir=parent_dir)
        os.chmod(self.dir, 0o755)
        self.out_dir = os.path.join(self.dir, "out")
        self.devices: list[Device] = []
        self._stack = contextlib.ExitStack()
        self._runs = 0
        os.makedirs(self.out_dir)

    def __enter__(self) -> "UmlBed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _check_name(self, name: str) -> None:
        if not _NAME.match(name) or any(d.name == name for d in self.devices):
            raise UmlError(f"device name {name!r} must be unique and a shell identifier")

    def add_device(self, name: str, kind: str, socket_path: str) -> Device:
        """A vhost-user device served by someone else's backend listening on `socket_path`."""
        self._check_name(name)
        if kind not in DEVICE_KINDS:
            raise UmlError(f"unknown device kind {kind!r}; one of {sorted(DEVICE_KINDS)}")
        dev = Device(name, DEVICE_KINDS[kind], socket_path)
        self.devices.append(dev)
        return dev

    def add_blk(self, name: str, backend: "BlkBackend", image: str) -> Device:
        """Start `backend` on `image` now (stopped when the bed closes) and attach it as blk."""
        self._check_name(name)   # before anything is started
        socket_path = backend.start(image)
        self._stack.callback(backend.stop)
        return self.add_device(name, "blk", socket_path)

    def add_backend(self, name: str, kind: str, backend: "BulkheadBackend", *args: str) -> Device:
        """Start a `bulkhead device` backend with `args` now (stopped when the bed closes)."""
        self._check_name(name)
        socket_path = backend.start_with(*args)
        self._stack.callback(backend.stop)
        return self.add_device(name, kind, socket_path)

    def run(self, script: str, *, python: bool = False, env: dict[str, str] | None = None,
            timeout: float = 60.0, on_line: Callable[[str], None] | None = None) -> UmlRun:
        """Boot, run `script` (shell, or Python with `python=True`) in the guest, power off.

        `env` reaches the guest script as environment variables.  `on_line` is called, from a
        reader thread, with every console line as it arrives (for measurements timed by guest
        markers).  Raises `UmlTimeout` if the guest is still running after `timeout` seconds
        (everything is reaped first), `UmlError` if something was left behind or UML did not
        start.  A kernel panic ends the boot at once (`UmlRun.panic`; `check()` fails)."""
        for key in env or {}:
            if not _NAME.match(key):
                raise UmlError(f"environment name {key!r} is not a shell identifier")
        self._runs += 1
        run_dir = os.path.join(self.dir, f"run{self._runs}")
        scratch = os.path.join(run_dir, "scratch")
        os.makedirs(scratch)
        guest_script = os.path.join(run_dir, "guest.py" if python else "guest.sh")
        with open(guest_script, "w") as f:
            f.write(script)
        base = module_dir()
        with open(os.path.join(base, "modules.dep")) as f:
            deps = parse_modules_dep(f.read())
        kinds = list(dict.fromkeys(d.kind.module for d in self.devices))
        modules = [os.path.join(base, m) for m in load_order([f"kernel/{k}" for k in kinds], deps)]
        init = os.path.join(run_dir, "init.sh")
        with open(init, "w") as f:
            f.write(_init_script(self.devices, modules, guest_script, python, dict(env or {}),
                                 self.out_dir, scratch))
        os.chmod(init, 0o755)

        # uml_dir: UML's per-instance directory (mconsole socket, pid file) goes into the run's
        # directory instead of ~/.uml, where it would outlive a killed UML.
        cmdline = [f"mem={self.mem_mib}M", "root=/dev/root", "rootfstype=hostfs", "rootflags=/",
                   "ro", f"init={init}", "con=null", "con0=fd:0,fd:1", f"uml_dir={run_dir}",
                   *self.kernel_args]
        cmdline += [f"virtio_uml.device={d.socket}:{d.kind.virtio_id}:{i}"
                    for i, d in enumerate(self.devices)]
        argv = ["setpriv", "--pdeathsig", "KILL", "unshare", *_pid_namespace_flags(),
                "--kill-child=SIGKILL", *_uml_command(), *cmdline]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        memdir = tempfile.mkdtemp(prefix="bulkhead-uml-mem-", dir=SHM)
        try:
            boot = _boot(argv, run_dir, {**os.environ, "TMPDIR": memdir, "HOME": run_dir},
                         timeout, on_line)
        finally:
            shutil.rmtree(memdir, ignore_errors=True)
        output = "".join(boot.lines)
        run = UmlRun(returncode=boot.returncode, output=output, stderr=boot.stderr,
                     out_dir=self.out_dir, duration=boot.duration, uml_pid=boot.uml_pid,
                     pid_namespace=boot.ns, timed_out=boot.timed_out, panic=boot.panic,
                     results=parse_results(output))
        for line in output.splitlines():
            if m := _EXIT.match(line.rstrip("\r")):
                run.guest_status = int(m.group(1))
            elif m := _BED_ERROR.match(line.rstrip("\r")):
                run.bed_error = m.group(1).strip()
        if boot.left:
            raise UmlError(f"processes {boot.left} were left in UML's PID namespace (killed now)\n"
                           f"{run.explain()}")
        if boot.timed_out:
            raise UmlTimeout(f"guest still running after {timeout:.0f} s (killed)\n{run.explain()}", run)
        if boot.callback_error is not None:
            raise UmlError(f"the on_line callback failed: {boot.callback_error!r}") from boot.callback_error
        if boot.ns is None and boot.returncode != 0:
            raise UmlError(f"UML did not start (exit {boot.returncode}): {boot.stderr.strip()[-2000:]}")
        return run


@dataclass
class _Boot:
    lines: list[str]
    returncode: int | None = None
    stderr: str = ""
    duration: float = 0.0
    uml_pid: int | None = None
    ns: str | None = None
    timed_out: bool = False
    panic: str | None = None
    left: list[int] = field(default_factory=list)
    callback_error: Exception | None = None


def _boot(argv: list[str], cwd: str, env: dict[str, str], timeout: float,
          on_line: Callable[[str], None] | None) -> _Boot:
    """Run the launcher until UML exits, panics (UML then hangs: killed) or `timeout` passes;
    reap everything.  Every console line goes to `on_line` as it arrives."""
    boot = _Boot(lines=[])
    panicked = threading.Event()

    def read(stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace")
            boot.lines.append(line)
            if _PANIC in line and boot.panic is None:
                boot.panic = line.strip()
                panicked.set()
            if on_line is not None and boot.callback_error is None:
                try:
                    on_line(line.rstrip("\r\n"))
                except Exception as e:  # noqa: BLE001 - re-raised by run(); keep draining UML
                    boot.callback_error = e

    start = time.monotonic()
    with open(os.path.join(cwd, "stderr.txt"), "w+") as err:
        # stdin is a pipe kept open (UML polls its console's input; /dev/null cannot be polled).
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, process_group=0)
        launched = _Launched(proc)
        reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            launched.find_uml(min(timeout, 10.0))
            deadline = start + timeout
            while proc.poll() is None:
                if panicked.is_set():
                    time.sleep(0.5)          # the rest of the panic message
                    break
                if time.monotonic() >= deadline:
                    boot.timed_out = True
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        finally:
            boot.left = launched.stop()
            reader.join(10)
            proc.stdin.close()
            proc.stdout.close()
        err.seek(0)
        boot.stderr = err.read()
    killed = boot.timed_out or boot.panic is not None
    boot.returncode = None if killed else proc.returncode
    boot.duration = time.monotonic() - start
    boot.uml_pid = launched.uml.pid if launched.uml else None
    boot.ns = launched.ns
    return boot


# --- block backends ------------------------------------------------------------------------------

def _kill(proc: subprocess.Popen | None, ref: ProcessRef | None) -> None:
    """SIGKILL (through its pidfd) a backend this module started, and reap it."""
    if proc is not None and ref is not None and proc.poll() is None:
        ref.send(signal.SIGKILL)
        proc.wait()


def _terminate(proc: subprocess.Popen, ref: ProcessRef) -> None:
    """SIGTERM (through its pidfd) a backend this module started; SIGKILL after 10 s."""
    if proc.poll() is None:
        ref.send(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            ref.send(signal.SIGKILL)
            proc.wait()


class BlkBackend(Protocol):
    """A vhost-user-blk backend the bed can start on an image and stop again.

    `start` returns the path of a listening AF_UNIX socket (connections may queue before the
    backend accepts them); `pids` names the processes whose CPU time serves the device (for
    benchmarks); `stop` ends them and removes what `start` created.  `name` labels reports."""

    name: str

    def start(self, image: str) -> str: ...

    def stop(self) -> None: ...

    def pids(self) -> list[int]: ...


class QsdBlkBackend:
    """qemu-storage-daemon exporting `image` as vhost-user-blk (file + raw block nodes).

    `aio`: 'threads' (a thread pool does the preadv/pwritev) or 'io_uring'; `iothread` runs the
    export in an iothread instead of the main loop.  `cache_direct` opens the image O_DIRECT.
    `locking=False` lets several daemons open one image (benchmarks alternating on one file).
    The listening socket is made here and handed over as `addr.type=fd`, so it is ready before
    the daemon runs; the daemon's `--pidfile` says its start-up finished."""

    def __init__(self, *, aio: str = "threads", iothread: bool = False, cache_direct: bool = False,
                 locking: bool = True, name: str | None = None, start_timeout: float = 10.0,
                 socket_path: str | None = None) -> None:
        if aio not in ("threads", "io_uring", "native"):
            raise UmlError(f"aio={aio!r}: threads, io_uring or native")
        self.aio, self.iothread, self.cache_direct, self.locking = aio, iothread, cache_direct, locking
        self.name = name or f"qsd-{aio}" + ("+iothread" if iothread else "")
        self.start_timeout = start_timeout
        self.socket_path = socket_path  # fixed: every start listens there (a frontend redials it)
        self.log = ""
        self._proc: subprocess.Popen | None = None
        self._ref: ProcessRef | None = None
        self._dir: str | None = None

    def argv(self, image: str, listen_fd: int, pidfile: str) -> list[str]:
        blockdev = {"driver": "file", "node-name": "file0", "filename": image, "aio": self.aio,
                    "cache": {"direct": self.cache_direct}, "locking": "on" if self.locking else "off"}
        export = ["type=vhost-user-blk", "id=export0", "node-name=disk0", "addr.type=fd",
                  f"addr.str={listen_fd}", "writable=on"]
        argv = [_which(QSD_BINARY) or QSD_BINARY, "--pidfile", pidfile]
        if self.iothread:
            argv += ["--object", "iothread,id=iothread0"]
            export.append("iothread=iothread0")
        argv += ["--blockdev", json.dumps(blockdev),
                 "--blockdev", "driver=raw,node-name=disk0,file=file0",
                 "--export", ",".join(export)]
        return argv

    def start(self, image: str) -> str:
        if self._proc is not None:
            raise UmlError(f"{self.name} already started")
        if _which(QSD_BINARY) is None:
            raise UmlError(f"{QSD_BINARY} not found: install qemu-system-common (./dev.sh setup)")
        self._dir = tempfile.mkdtemp(prefix="bulkhead-qsd-")
        path = self.socket_path or os.path.join(self._dir, "vhost-user-blk.sock")
        if self.socket_path is not None and os.path.lexists(path):
            os.unlink(path)  # our own previous start's socket
        pidfile = os.path.join(self._dir, "qsd.pid")
        log = os.path.join(self._dir, "qsd.log")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, open(log, "w") as logf:
            listener.bind(path)
            listener.listen(8)
            self._proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", *self.argv(os.path.abspath(image),
                                                              listener.fileno(), pidfile)],
                pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                process_group=0)
        self._ref = ProcessRef(self._proc.pid)
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(pidfile):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UmlError(f"{self.name} did not start on {image}: {self.log.strip()[-2000:]}")
            time.sleep(0.005)
        return path

    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc is not None and self._proc.poll() is None else []

    def kill(self) -> None:
        """SIGKILL the daemon (through its pidfd) and clean up; `start` may follow."""
        _kill(self._proc, self._ref)
        self.stop()

    def stop(self) -> None:
        if self._proc is not None:
            _terminate(self._proc, self._ref)
            self._ref.close()
            self._proc = self._ref = None
        if self._dir is not None:
            with contextlib.suppress(OSError), open(os.path.join(self._dir, "qsd.log")) as f:
                self.log = f.read()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class BulkheadBackend:
    """`bulkhead device KIND --socket S ARGS...` in the background: one of our devices as a
    vhost-user backend, each frontend served by a fresh jailed device process.

    stderr is collected line by line (`lines`): the launcher says when it listens and which
    jailed pid serves each frontend (`device_pids`), which is how tests inspect the jail and
    kill the device; `pids` is the launcher plus its live device processes (for CPU figures).
    Only processes this object started are signalled, through pidfds."""

    def __init__(self, kind: str, *args: str, name: str | None = None,
                 start_timeout: float = 20.0, socket_path: str | None = None) -> None:
        self.kind, self.args = kind, args
        self.name = name or f"bulkhead-{kind}"
        self.start_timeout = start_timeout
        self.lines: list[str] = []
        self.fixed_socket = socket_path  # every start listens there (a frontend redials it)
        self.socket_path: str | None = None
        self._proc: subprocess.Popen | None = None
        self._ref: ProcessRef | None = None
        self._dir: str | None = None
        self._reader: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def start_with(self, *extra: str) -> str:
        """Start with `extra` arguments after ARGS; the socket path once it listens."""
        from vmm_core.testing import ROOT, bulkhead_argv  # (the package imports nothing of ours)
        if self._proc is not None:
            raise UmlError(f"{self.name} already started")
        self._dir = tempfile.mkdtemp(prefix=f"bulkhead-{self.kind}-")
        self.socket_path = self.fixed_socket or os.path.join(self._dir, f"{self.kind}.sock")
        argv = ["setpriv", "--pdeathsig", "KILL",
                *bulkhead_argv("device", self.kind, "--socket", self.socket_path, *self.args,
                               *extra, "-v")]
        self._proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._ref = ProcessRef(self._proc.pid)
        mark = len(self.lines)
        self._reader = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._reader.start()
        try:
            self.wait_line(r"listening on", self.start_timeout, since=mark)
        except UmlError:
            self.stop()
            raise UmlError(f"{self.name} did not start: {self.log.strip()[-2000:]}") from None
        return self.socket_path

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines)[since:]:
                m = re.search(pattern, line)
                if m:
                    return m
            done = self._proc is None or (self._proc.poll() is not None and
                                          not (self._reader and self._reader.is_alive()))
            if done or time.monotonic() > deadline:
                raise UmlError(f"{self.name}: no line matching {pattern!r}:\n{self.log}")
            time.sleep(0.02)

    def device_pids(self) -> list[int]:
        """Every jailed device process the launcher reported, in order (live or not)."""
        return [int(m.group(1)) for line in list(self.lines)
                if (m := re.search(r"served by jailed pid (\d+)", line))]

    def kill_device(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the device process serving now (a descendant of the launcher this
        object started), through a pidfd; its pid."""
        pid = self.device_pids()[-1]
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, sig)
        finally:
            os.close(fd)
        return pid

    def pids(self) -> list[int]:
        if self._proc is None or self._proc.poll() is not None:
            return []
        return [self._proc.pid] + [p for p in self.device_pids() if os.path.exists(f"/proc/{p}")]

    def kill(self) -> None:
        """SIGKILL the launcher (through its pidfd; its jailed device goes with it) and clean
        up; `start` may follow."""
        _kill(self._proc, self._ref)
        self.stop()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def stop(self) -> None:
        if self._proc is not None:
            _terminate(self._proc, self._ref)
            if self._reader is not None:
                self._reader.join(5)
            self._ref.close()
            self._proc = self._ref = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class BulkheadBlkBackend(BulkheadBackend):
    """`bulkhead device blk`: a `BlkBackend` like the qemu-storage-daemon ones."""

    def __init__(self, *, locking: bool = True, readonly: bool = False,
                 name: str = "bulkhead", socket_path: str | None = None) -> None:
        super().__init__("blk", name=name, socket_path=socket_path)
        self.options = ("" if locking else ",nolock") + (",readonly" if readonly else "")

    def start(self, image: str) -> str:
        return self.start_with("--disk", os.path.abspath(image) + self.options)


# The vhost-user-blk backends the Linux tests and benchmarks/linux_blk.py run against: one entry
# per backend, a factory taking `locking` (False when several backends share one image).
BLK_BACKENDS: dict[str, Callable[..., BlkBackend]] = {
    "bulkhead": lambda locking=True: BulkheadBlkBackend(locking=locking),
    "qsd-threads": lambda locking=True: QsdBlkBackend(aio="threads", locking=locking),
    "qsd-io_uring": lambda locking=True: QsdBlkBackend(aio="io_uring", iothread=True,
                                                       locking=locking,
                                                       name="qsd-io_uring+iothread"),
}
