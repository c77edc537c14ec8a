"""Spawn a device process in its jail (`spawn`) and, inside it, enter the jail (`enter_jail`).

Spawn side (the core)::

    spec = JailSpec(device="blk0", policy="blk", seccomp_mode="trap", uid=200000, gid=200000,
                    keep_fds=[bootstrap_fd])
    proc = spawn(spec, [sys.executable, "-m", "device_procs.host", ...], pass_fds=[bootstrap_fd])
    proc.pid            # host pid of the device process (pid 2 of its own PID namespace)
    proc.status_fd      # readable when the device reports something; see JailedProcess.poll()
    proc.wait()         # -> JailExit; str(exit) == "seccomp violation: socket(2)" etc.

Device side, after importing everything and opening every fd, before any guest data::

    from jail.sandbox import enter_jail
    enter_jail()        # reads its JailConfig from $BULKHEAD_JAIL (set by the launcher)

`enter_jail` order: build the seccomp filter (reads the policy file) -> uid/gid = root-in-namespace
(the jail's set-up id), groups dropped -> tmpfs root with the binds, pivot_root, old root
detached -> securebits locked (no root magic, setuid fix-up on, no ambient raise), ambient and
bounding sets emptied -> uid/gid switched to the jailed id (namespace id 1 = the VM's host id):
a root -> non-root switch, which the kernel answers by clearing the permitted and effective sets;
glibc broadcasts set*id calls, so every thread (libzmq's too) ends with no capability ->
inheritable emptied -> no_new_privs, dumpable 0, pdeathsig -> rlimits -> seccomp (TSYNC).

The device host learns its device (and opens the image via /proc/self/fd and the console by
path) only from the `Configure` that arrives over ZeroMQ, so libzmq's threads exist before the
jail.  It starts them through `start_library_threads`: born with only CAP_SETUID and CAP_SETGID
(which they need to follow glibc's set*id broadcast), an empty bounding set and nothing
inheritable; the final switch to the jailed id then clears those too.  `enter_jail(seccomp=False)`
+ `seal_jail()` remain for a device that can enter the jail before starting any thread.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

from jail._seccomp_cffi import ffi, lib
from jail.errors import JailError
from jail.launch import ENV_VAR, _last_cap, _set_caps
from jail.pidfd import NotOurProcess, check_pid, open_ref
from jail.policy import load_policy, policy_for_device
from jail.seccomp import (MODES, Filter, Violation, build_filter, install_learn,
                                      parse_report_line)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
PR_CAPBSET_DROP, PR_SET_SECUREBITS = 24, 28
# NOROOT(+LOCKED), NO_SETUID_FIXUP *off* and locked (so the switch to a non-root uid clears
# capabilities), KEEP_CAPS off and locked, NO_CAP_AMBIENT_RAISE(+LOCKED)
SECUREBITS_LOCKED = 0b1110_1011
JAILED_ID = 1  # the namespace uid/gid a jailed device runs as (mapped to the VM's host id)
# What threads started before enter_jail keep: glibc applies enter_jail's setgroups/setresgid/
# setresuid to every thread and aborts the process if one thread's call fails.
THREAD_KEEP_CAPS = (6, 7)  # CAP_SETGID, CAP_SETUID
_T = TypeVar("_T")


@dataclass(frozen=True)
class Bind:
    """A host path made visible in the jail root at `target` (read-only unless `writable`)."""

    source: str
    target: str
    writable: bool = False


@dataclass(frozen=True)
class Rlimits:
    """Resource limits applied by `enter_jail` (None = leave as inherited)."""

    nofile: int | None = 128
    nproc: int | None = 0  # no new threads or processes once jailed
    core: int | None = 0
    fsize: int | None = None  # set >= the disk image size for blk (writes past it get SIGXFSZ)
    address_space: int | None = None  # must cover guest RAM (mapped shared) plus ~1 GiB


@dataclass
class JailSpec:
    """Everything the core decides about one device's jail."""

    device: str  # "blk0": used in messages and the hostname
    policy: str | Path  # a device type ("blk") or a policy file path
    seccomp_mode: str = "kill"  # kill | trap | log | off
    uid: int = 100000  # host uid that root-in-namespace maps to (per VM)
    gid: int = 100000
    binds: list[Bind] = field(default_factory=list)
    keep_fds: list[int] = field(default_factory=list)  # fds the device keeps, besides 0, 1, 2
    rlimits: Rlimits = field(default_factory=Rlimits)
    cgroup_procs: list[str] = field(default_factory=list)  # from VmCgroup.procs_files()
    namespaces: bool = True  # False: only rlimits, prctl and seccomp (no root needed)
    tmpfs_size: str = "1m"

    def policy_path(self) -> Path:
        p = Path(self.policy)
        if p.suffix == ".toml" or p.is_absolute():
            return p.resolve()
        return policy_for_device(str(self.policy))


@dataclass(frozen=True)
class JailConfig:
    """What the device process receives in $BULKHEAD_JAIL (JSON), written by the launcher."""

    device: str
    policy: str
    mode: str
    namespaces: bool
    status_fd: int
    alive_fd: int = -1
    binds: tuple[dict[str, Any], ...] = ()  # {"fd", "target", "writable", "dir"}
    rlimits: Rlimits = Rlimits()
    tmpfs_size: str = "1m"

    @classmethod
    def from_env(cls) -> JailConfig:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            raise JailError(f"${ENV_VAR} is not set: start the device through sandbox.spawn")
        d = json.loads(raw)
        return cls(d["device"], d["policy"], d["mode"], bool(d["namespaces"]), int(d["status_fd"]),
                   int(d.get("alive_fd", -1)), tuple(d.get("binds", ())), Rlimits(**d["rlimits"]),
                   d.get("tmpfs_size", "1m"))


def launch_spec(spec: JailSpec, status_fd: int, pass_fds: Sequence[int] = ()) -> dict[str, Any]:
    """What the launcher (`launch.run`) is told, whether exec'd (`launcher_argv`) or forked by
    the zygote (`device_procs.zygote`, which substitutes its own fd numbers)."""
    if spec.seccomp_mode not in (*MODES, "learn"):
        raise JailError(f"unknown seccomp mode {spec.seccomp_mode!r} (expected {', '.join(MODES)})")
    policy = spec.policy_path()
    load_policy(policy)  # fail in the core, with file and line, rather than in the child
    config = {"device": spec.device, "policy": str(policy), "mode": spec.seccomp_mode,
              "namespaces": spec.namespaces, "rlimits": asdict(spec.rlimits),
              "tmpfs_size": spec.tmpfs_size}
    return {"status_fd": status_fd, "parent_pid": os.getpid(), "namespaces": spec.namespaces,
            "uid": spec.uid, "gid": spec.gid, "hostname": f"bulkhead-{spec.device}"[:64],
            "binds": [asdict(b) for b in spec.binds], "cgroup_procs": list(spec.cgroup_procs),
            "keep_fds": sorted({*spec.keep_fds, *pass_fds}), "config": config}


def launcher_argv(spec: JailSpec, argv: Sequence[str], status_fd: int,
                  pass_fds: Sequence[int] = ()) -> list[str]:
    """The command that runs `argv` jailed; run it with `pass_fds=[status_fd, *pass_fds]`."""
    launch = launch_spec(spec, status_fd, pass_fds)
    exe = argv[0] if os.path.isabs(argv[0]) else (_which(argv[0]) or argv[0])
    return [sys.executable, "-m", "jail.launch", "--spec", json.dumps(launch), "--",
            exe, *argv[1:]]


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


@dataclass(frozen=True)
class JailExit:
    """How a jailed device ended: exit code or signal, and the trap-mode violation if any."""

    code: int | None = None
    signal: int | None = None
    violation: Violation | None = None
    error: str | None = None

    def __str__(self) -> str:
        if self.violation is not None:
            return str(self.violation)
        if self.error is not None:
            return self.error
        if self.signal == signal.SIGSYS:
            return "seccomp violation (killed by SIGSYS; use seccomp mode 'trap' to name the syscall)"
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with status {self.code}"


class LauncherHandle(Protocol):
    """The launcher as `JailedProcess` uses it: a `subprocess.Popen`, or the zygote path's
    pidfd-backed stand-in (`vmm_core.devices.zygote.PidfdPopen`)."""

    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...


# Starts the launcher for `spawn`: (launch_spec(...), status write end) -> the launcher.
LauncherStart = Callable[[dict[str, Any], int], LauncherHandle]


class JailedProcess:
    """A device process started by `spawn`: its host pid, its launcher and its status pipe.

    Both processes are held by pidfd (`ProcessRef`): `pid` stays None until the launcher has
    reported a valid device pid, and nothing is ever signalled by number."""

    def __init__(self, launcher: LauncherHandle, pid: int | None, status_fd: int,
                 pending: list[str]) -> None:
        self.launcher = launcher
        self.pid = pid
        self.status_fd = status_fd
        self._lines = pending
        self._buf = b""
        self._exit: JailExit | None = None
        # The launcher is our child (or the zygote's, already held by pidfd): not yet reaped,
        # so its pid cannot have been reused.
        self._launcher_ref = open_ref(launcher.pid)
        self._device_ref = open_ref(pid) if pid is not None else None

    def _take_device_pid(self, line: str) -> bool:
        """A `pid N` line from the launcher; False if it is not one (or names no process)."""
        kind, _, rest = line.partition(" ")
        if kind != "pid":
            return False
        try:
            pid = check_pid(int(rest))
        except (ValueError, NotOurProcess):
            return False
        self.pid = pid
        self._device_ref = open_ref(pid)
        return True

    def _read_status(self, block: bool) -> None:
        while self.status_fd >= 0:
            if not block and not select.select([self.status_fd], [], [], 0)[0]:
                return
            chunk = os.read(self.status_fd, 4096)
            if not chunk:
                os.close(self.status_fd)
                self.status_fd = -1
                break
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            self._lines += [ln.decode(errors="replace") for ln in lines]

    def poll(self) -> JailExit | None:
        """The exit if the device has ended (non-blocking), else None."""
        if self._exit is None and self.launcher.poll() is not None:
            return self.wait()
        return self._exit

    def wait(self, timeout: float | None = None) -> JailExit:
        if self._exit is not None:
            return self._exit
        rc = self.launcher.wait(timeout)
        self._read_status(block=True)
        result = JailExit(code=rc if rc < 128 else None, signal=rc - 128 if rc >= 128 else None)
        for line in self._lines:
            kind, _, rest = line.partition(" ")
            v = parse_report_line(line)
            if v is not None:
                result = JailExit(result.code, result.signal, v, result.error)
            elif kind == "exit" and rest.isdigit():
                result = JailExit(int(rest), None, result.violation, result.error)
            elif kind == "signal" and rest.isdigit():
                result = JailExit(None, int(rest), result.violation, result.error)
            elif kind == "error" and result.error is None:  # the first error is the cause
                result = JailExit(result.code, result.signal, result.violation, rest)
        if result.violation is not None and result.signal != signal.SIGSYS:
            # A report the kernel does not back (the device did not die by SIGSYS): a
            # compromised device may write anything on its status pipe.
            result = JailExit(result.code, result.signal, None, result.error)
        self._exit = result
        return result

    def kill(self) -> None:
        """SIGKILL the device (its launcher then exits and reports it), and end the launcher
        (SIGTERM: it kills the device if it has one).  Only through pidfds: a launcher that
        failed before reporting a device pid has no device to signal."""
        if self._device_ref is not None:
            self._device_ref.send(signal.SIGKILL)
        if self._launcher_ref is not None:
            self._launcher_ref.send(signal.SIGTERM)

    def release(self) -> None:
        """Close the pidfds (the processes are gone or no longer ours to signal)."""
        for ref in (self._device_ref, self._launcher_ref):
            if ref is not None:
                ref.close()

    def __enter__(self) -> JailedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.launcher.poll() is None:
            self.kill()
        self.wait()


def spawn(spec: JailSpec, argv: Sequence[str], *, pass_fds: Sequence[int] = (),
          env: dict[str, str] | None = None, timeout: float = 10.0, cwd: str | None = None,
          stdin: int | None = None, start: LauncherStart | None = None) -> JailedProcess:
    """Start `argv` jailed per `spec`; returns once the device process exists (before its exec).

    Safe from a multi-threaded core (plain fork+exec of the launcher, no preexec_fn).  The launcher's
    PR_SET_PDEATHSIG follows the *calling thread*: spawn from a thread that lives as long as the VM.
    `start`: the zygote path -- the launcher is forked by the zygote, which runs the device host
    in place of `argv` (the zygote is told the host's arguments itself).
    """
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        if start is not None:
            launcher: LauncherHandle = start(launch_spec(spec, status_w, pass_fds), status_w)
        else:
            cmd = launcher_argv(spec, argv, status_w, pass_fds)
            env = dict(os.environ if env is None else env)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
            launcher = subprocess.Popen(cmd, pass_fds=(status_w, *spec.keep_fds, *pass_fds),
                                        env=env, cwd=cwd, stdin=stdin)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    proc = JailedProcess(launcher, None, status_r, [])
    deadline = time.monotonic() + timeout
    while True:
        for line in proc._lines:
            if proc._take_device_pid(line):
                proc._lines.remove(line)
                return proc
        if proc.status_fd < 0 or time.monotonic() > deadline:
            proc.kill()
            try:
                how = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                how = JailExit(error=f"no device pid within {timeout:.0f} s")
            proc.release()
            raise JailError(f"device {spec.device} could not be jailed: {how}")
        if select.select([proc.status_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            proc._read_status(block=False)


# ---- inside the device process ----------------------------------------------------------------

_pending: tuple[Filter | None, JailConfig] | None = None


def start_library_threads(start: Callable[[], _T], config: JailConfig | None = None) -> _T:
    """Run `start` (e.g. creating the first ZeroMQ socket, which starts libzmq's I/O and reaper
    threads) on a short-lived thread that first gives up every capability but THREAD_KEEP_CAPS
    and its whole bounding set: capabilities are per thread and inherited at thread creation,
    so the library's threads are born with only those two.  Call before `enter_jail`."""
    cfg = config or JailConfig.from_env()
    if not cfg.namespaces:  # no capabilities to give up
        return start()
    result: list[_T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            for cap in range(_last_cap() + 1):
                _ok(lib.bh_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "dropping a thread's bounding set")
            _ok(lib.bh_prctl(lib.PR_CAP_AMBIENT, lib.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
                "clearing a thread's ambient set")
            keep = sum(1 << c for c in THREAD_KEEP_CAPS)
            _set_caps(keep, keep, 0)
            result.append(start())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=body, name="jail-lib-threads")
    thread.start()
    thread.join()
    if failure:
        if isinstance(failure[0], OSError):
            raise JailError(f"jail: {failure[0]}") from None
        raise failure[0]
    return result[0]


def enter_jail(config: JailConfig | None = None, *, seccomp: bool = True) -> None:
    """Enter the jail the launcher prepared (see the module docstring for the order).

    With `seccomp=False`, stop before the rlimits and the filter: call `seal_jail()` later, before
    any guest data (lets a device start its ZeroMQ threads with no capabilities left to inherit).
    Raises `JailError`; the caller must then exit without serving the guest.
    """
    global _pending
    cfg = config or JailConfig.from_env()
    last_cap = _last_cap()  # /proc disappears with the host's root
    policy = load_policy(cfg.policy)
    flt = build_filter(policy, cfg.mode, cfg.status_fd) if cfg.mode not in ("off", "learn") else None
    try:
        if cfg.namespaces:
            _become_namespace_root()  # first: files in the tmpfs need a mapped owner
            _enter_filesystem(cfg)
            _drop_capabilities(last_cap)
        for option, value in ((PR_SET_NO_NEW_PRIVS, 1), (PR_SET_DUMPABLE, 0),
                              (PR_SET_PDEATHSIG, signal.SIGKILL)):
            _ok(lib.bh_prctl(option, value, 0, 0, 0), f"prctl({option})")
        if cfg.alive_fd >= 0:  # pdeathsig was reset by the uid switch: is the launcher still there?
            if select.select([cfg.alive_fd], [], [], 0)[0]:
                os._exit(1)
            os.close(cfg.alive_fd)
    except BaseException:
        if flt is not None:
            flt.close()
        raise
    _pending = (flt, cfg)
    if seccomp:
        seal_jail()


def seal_jail() -> None:
    """Apply the rlimits (RLIMIT_NPROC 0: no new threads) and load the seccomp filter on every
    thread.  `enter_jail()` calls it; call it yourself after `enter_jail(seccomp=False)`."""
    global _pending
    if _pending is None:
        raise JailError("seal_jail() before enter_jail()")
    flt, cfg = _pending
    _pending = None
    try:
        _apply_rlimits(cfg.rlimits)
        if cfg.mode == "learn":  # every later syscall goes to the supervisor (learn.Learner)
            install_learn(cfg.status_fd)
            return
        if flt is None:
            return
        if cfg.mode == "trap":
            _ok(lib.bh_install_sigsys_reporter(cfg.status_fd), "installing the SIGSYS reporter")
        flt.load()
    finally:
        if flt is not None:
            flt.close()


def _ok(rc: int, what: str) -> int:
    if rc < 0:
        raise JailError(f"jail: {what} failed: {os.strerror(-rc)}")
    return rc


def _enter_filesystem(cfg: JailConfig) -> None:
    """An empty tmpfs becomes `/`: only /dev/null and the binds; no /proc; the host is detached."""
    root = b"/tmp"  # any directory: the tmpfs covers it only inside our mount namespace
    nosuid = lib.MS_NOSUID | lib.MS_NODEV | lib.MS_NOEXEC
    _ok(lib.bh_mount(b"tmpfs", root, b"tmpfs", nosuid,
                     f"size={cfg.tmpfs_size},mode=0755".encode()), "mounting the tmpfs root")
    os.mkdir(b"/tmp/dev", 0o755)
    binds = [{"fd": None, "source": "/dev/null", "target": "/dev/null", "writable": True,
              "dir": False}, *cfg.binds]
    for b in binds:
        target = os.path.normpath("/tmp/" + b["target"].lstrip("/"))
        if not target.startswith("/tmp/") or b["target"] in ("", "/"):
            raise JailError(f"jail: bind target {b['target']!r} must be a path below /")
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if b["dir"]:
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        source = b["source"] if b["fd"] is None else f"/proc/self/fd/{b['fd']}"
        _ok(lib.bh_mount(source.encode(), target.encode(), ffi.NULL, lib.MS_BIND | lib.MS_REC,
                         ffi.NULL), f"bind-mounting {b['target']}")
        if not b["writable"]:
            locked = os.statvfs(target).f_flag & (lib.MS_NOSUID | lib.MS_NODEV | lib.MS_NOEXEC
                                                  | 1024 | 2048 | 4096)  # and the atime flags
            _ok(lib.bh_mount(ffi.NULL, target.encode(), ffi.NULL,
                             lib.MS_REMOUNT | lib.MS_BIND | lib.MS_RDONLY | locked, ffi.NULL),
                f"making {b['target']} read-only")
        if b["fd"] is not None:
            os.close(b["fd"])
    os.chdir(root)
    _ok(lib.bh_pivot_root(b".", b"."), "pivot_root")
    _ok(lib.bh_umount2(b".", lib.MNT_DETACH), "detaching the host's root")
    os.chdir("/")
    _ok(lib.bh_mount(ffi.NULL, b"/", ffi.NULL, lib.MS_REMOUNT | lib.MS_BIND | lib.MS_RDONLY | nosuid,
                     ffi.NULL), "making the jail root read-only")


def _become_namespace_root() -> None:
    """Become root-in-namespace (the jail's set-up id, host uid + 1) with no supplementary groups.

    glibc applies set*id calls to every thread, so ZeroMQ's threads switch too.  Entering root
    keeps the launcher's four capabilities (effective = permitted) for the mounts that follow.
    """
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _drop_capabilities(last_cap: int) -> None:
    """Lock securebits (no root magic, no ambient raise), empty the bounding set, then leave root.

    The last step is a set*id switch from namespace root to a non-root id: glibc applies it to
    every thread (libzmq's too), and the kernel clears the permitted and effective sets of each
    (capabilities(7), "Effect of user ID changes"), so no thread keeps any capability.
    """
    _ok(lib.bh_prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED, 0, 0, 0), "locking securebits")
    _ok(lib.bh_prctl(lib.PR_CAP_AMBIENT, lib.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient")
    for cap in range(last_cap + 1):
        _ok(lib.bh_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "dropping the bounding set")
    os.setresgid(JAILED_ID, JAILED_ID, JAILED_ID)
    os.setresuid(JAILED_ID, JAILED_ID, JAILED_ID)
    _set_caps(0, 0, 0)


def _apply_rlimits(limits: Rlimits) -> None:
    table = ((resource.RLIMIT_NOFILE, limits.nofile), (resource.RLIMIT_NPROC, limits.nproc),
             (resource.RLIMIT_CORE, limits.core), (resource.RLIMIT_FSIZE, limits.fsize),
             (resource.RLIMIT_AS, limits.address_space))
    for which, value in table:
        if value is not None:
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError) as err:
                raise JailError(f"jail: setrlimit({which}, {value}) failed: {err}") from None
