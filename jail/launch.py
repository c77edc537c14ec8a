"""The jail launcher: `python -m jail.launch --spec JSON -- ARGV...`.

Run by `sandbox.spawn` (a plain fork+exec of a fresh interpreter: the threaded core never forks
Python code).  The launcher is single-threaded, so forking *it* is safe.  Its steps:

  L (launcher, host root, host namespaces)
    1. PR_SET_PDEATHSIG(SIGKILL): dies with the core; joins the VM's cgroups (so D is born in them);
    2. unshare(CLONE_NEWPID) -- it only applies to children -- and forks I, pid 1 there, then D
       (pid 2): the device must not be its namespace's init, whose signals to itself the kernel
       drops (abort() would end in SIGSEGV, SIGTERM would be ignored);
    4. writes D's uid_map/gid_map (`0 <uid+1> 1`, `1 <uid> 1`: root in the namespace while the jail
       is built, then the VM's unprivileged host
       uid; written from the parent, which holds CAP_SETUID/CAP_SETGID in the initial namespace);
    5. reports `pid <host pid of D>` on the status fd, then waits for D, forwards SIGTERM/SIGINT
       as SIGKILL, and reports `exit <code>` or `signal <n>` before exiting the same way.
  I (pid 1 of the new PID namespace, the small C program `bulkhead-jail-init`): closes every fd
    but its pipe from L, becomes the VM's uid with no capability, ignores SIGCHLD (reaping any
    orphan), sleeps until the pipe reads EOF.  Its death kills everything in the namespace; the
    launcher SIGKILLs it once D ended.
  D (the device, pid 2 of the new PID namespace)
    3. unshare(NEWUSER|NEWNS|NEWNET|NEWIPC|NEWUTS) -- one call, so the user namespace owns the
       others --, opens every bind source O_PATH (still host uid 0: 0700 directories are no
       obstacle) and waits for its maps; makes every mount private, sets the hostname, setsid();
    6. keeps only CAP_SYS_ADMIN/SETUID/SETGID/SETPCAP (ambient, so they survive exec; bounding set
       cut to those four) for `enter_jail`'s mounts and uid switch; PR_SET_NO_NEW_PRIVS;
       RLIMIT_CORE 0; PR_SET_PDEATHSIG(SIGKILL) and a check that L still lives;
    7. closes every fd not on the keep-list and execs ARGV with `BULKHEAD_JAIL` (the JailConfig).

D execs with its host uid still 0 but unmapped (it is `nobody` inside, with no capability outside):
the interpreter may live where the VM's uid cannot reach (here /root is 0700).  `enter_jail` moves
it to root-in-namespace = the VM's uid before it touches guest data.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from jail._seccomp_cffi import ffi, lib

if TYPE_CHECKING:
    from jail.relay import Relay

NS_FLAGS = lib.CLONE_NEWUSER | lib.CLONE_NEWNS | lib.CLONE_NEWNET | lib.CLONE_NEWIPC | lib.CLONE_NEWUTS
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 38, 24
PR_CAP_AMBIENT_RAISE = 2
ENV_VAR = "BULKHEAD_JAIL"  # the JailConfig the device reads (sandbox.ENV_VAR is this name)
# What `enter_jail` still needs after exec: mounts + pivot_root, the uid/gid switch, dropping the rest.
KEEP_CAPS = (21, 7, 6, 8)  # CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID, CAP_SETPCAP
_CAPSET_V3 = 0x20080522
INIT_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bulkhead-jail-init")


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


def _status(fd: int, line: str) -> None:
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    except OSError:
        pass


def _fail(fd: int, what: str, err: BaseException) -> NoReturn:
    _status(fd, f"error {what}: {err}".replace("\n", " "))
    os._exit(1)


def _set_caps(effective: int, permitted: int, inheritable: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = (ctypes.c_uint32 * 2)(_CAPSET_V3, 0)
    data = (ctypes.c_uint32 * 6)(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF,
                                 inheritable & 0xFFFFFFFF, effective >> 32, permitted >> 32,
                                 inheritable >> 32)
    if libc.capset(hdr, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


# What a forked (zygote) device runs instead of exec: returns the device's exit status.
DeviceMain = Callable[[], int]


def _child(spec: dict[str, Any], argv: list[str], to_parent: int, from_parent: int,
           status_fd: int, then: DeviceMain | None = None) -> NoReturn:
    """D: runs between fork and exec; any failure is reported as an `error` line.

    With `then` (a zygote's child, whose interpreter already has the device host imported) the
    same preparation ends in a call instead of execve: the environment and the fds are exactly
    those the exec'd host would see, and the capabilities are the four the ambient set would have
    carried across exec.
    """
    try:
        binds = []
        if spec["namespaces"]:
            _check(lib.bh_unshare(NS_FLAGS), "unshare")
            # Bind sources are opened now: in our new mount namespace (a bind needs a mount of
            # this namespace) and still as host uid 0 (a 0700 parent directory is no obstacle).
            for b in spec["binds"]:
                fd = os.open(b["source"], os.O_PATH)
                binds.append({"fd": fd, "target": b["target"], "writable": b["writable"],
                              "dir": os.path.isdir(b["source"])})
            os.write(to_parent, b"u")
            if os.read(from_parent, 1) != b"m":
                raise OSError("the launcher did not write the uid/gid maps")
            _check(lib.bh_mount(ffi.NULL, b"/", ffi.NULL, lib.MS_REC | lib.MS_PRIVATE, ffi.NULL),
                   "making mounts private")
            _check(lib.bh_sethostname(spec["hostname"].encode()), "sethostname")
            mask = sum(1 << c for c in KEEP_CAPS)
            _set_caps(mask, mask, mask)
            for cap in KEEP_CAPS:
                _check(lib.bh_prctl(lib.PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "ambient")
            for cap in range(_last_cap() + 1):
                if cap not in KEEP_CAPS:
                    _check(lib.bh_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "dropping the bounding set")
        os.setsid()
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _check(lib.bh_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(lib.bh_prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        r, _, _ = select.select([from_parent], [], [], 0)
        if r and os.read(from_parent, 1) == b"":
            raise OSError("the launcher died before PDEATHSIG was armed")
        config = dict(spec["config"], binds=binds, status_fd=status_fd, alive_fd=from_parent)
        env = dict(os.environ, **{ENV_VAR: json.dumps(config)})
        # 0, 1, 2 become /dev/null: a device must neither read the operator's terminal nor
        # write (or punch holes) into the core's log file; it speaks through its channel.
        null = os.open("/dev/null", os.O_RDWR)
        log_fd = spec.get("log_fd")
        for std in (0, 1, 2):
            os.dup2(log_fd if std and isinstance(log_fd, int) and log_fd >= 0 else null, std)
        os.close(null)
        keep = sorted({0, 1, 2, status_fd, from_parent, *spec["keep_fds"], *(b["fd"] for b in binds)})
        lo = 0
        for fd in keep:
            if fd > lo:
                os.closerange(lo, fd)
            lo = fd + 1
        os.closerange(lo, 1 << 20)
        for fd in keep:
            if fd > 2:
                os.set_inheritable(fd, True)
        if then is None:
            os.execve(argv[0], argv, env)
        os.environ[ENV_VAR] = env[ENV_VAR]
    except BaseException as err:  # noqa: BLE001 - everything must end in a report and _exit
        _fail(status_fd, "jail setup failed", err)
    _run_in_place(then)


def _run_in_place(then: DeviceMain) -> NoReturn:
    """The forked device's whole life; never returns into the zygote's frames below us."""
    code = 1
    try:
        code = then()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - the exec'd host would have printed it and exited 1
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
    # os._exit, not sys.exit: the zygote's atexit handlers and finalisers are not ours to run.
    os._exit(code & 0xFF)


def _write_maps(pid: int, uid: int, gid: int) -> None:
    """Namespace id 0 (root while the jail is built) -> uid + 1 on the host; namespace id 1 (what
    the device runs as once jailed) -> uid.  Two ids so that the final switch is root -> non-root,
    which makes the kernel clear every capability in every thread (sandbox._drop_capabilities)."""
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"0 {uid + 1} 1\n1 {uid} 1\n")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"0 {gid + 1} 1\n1 {gid} 1\n")


def _set_title(title: str) -> None:
    """`bulkhead-jail:blk0` in ps instead of the launcher's JSON argv (cosmetic)."""
    try:
        import prctl

        prctl.set_name(title.replace("bulkhead-", "bh")[:15])
        prctl.set_proctitle(title)
    except Exception:  # noqa: BLE001 - never a reason not to launch
        pass


def _start_pid_init(uid: int, gid: int, device: str) -> tuple[int, int]:
    """Start I, pid 1 of the namespace just unshared; (its pid, the fd that keeps it alive).

    I is `bulkhead-jail-init` (jail/pid_init.c), spawned (vfork+exec: nothing of ours is
    copied) rather than a forked copy of this interpreter, to which every page we write from
    now on would be charged: ~0.1 MiB instead of ~1.5 MiB per device."""
    if not os.access(INIT_PROGRAM, os.X_OK):
        raise OSError(f"{INIT_PROGRAM} is missing: run ./dev.sh setup (or setup.py build_ext)")
    alive_r, alive_w = os.pipe()
    os.set_inheritable(alive_r, True)
    defaults = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    try:
        pid = os.posix_spawn(INIT_PROGRAM, [f"bulkhead-jail-init:{device}", str(alive_r), str(uid),
                                            str(gid)], {}, setsigdef=defaults, setsigmask=())
    finally:
        os.close(alive_r)
    return pid, alive_w


def run(spec: dict[str, Any], argv: list[str], then: DeviceMain | None = None) -> NoReturn:
    """L's whole life.  `then`: see `_child` (the zygote path, `device_procs.zygote`).

    `spec["watch_fd"]` (the zygote path): a pidfd of the core.  L then lives as long as the core
    rather than as long as its parent: a zygote that dies must not take running devices with it,
    so L arms no PDEATHSIG and instead kills D when that pidfd turns readable.
    """
    status_fd = int(spec["status_fd"])
    watch_fd = int(spec.get("watch_fd", -1))
    _set_title(f"bulkhead-jail:{spec['config']['device']}")
    try:
        if watch_fd >= 0:
            if select.select([watch_fd], [], [], 0)[0]:
                os._exit(1)  # the core is already gone
        else:
            _check(lib.bh_prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            if os.getppid() != int(spec["parent_pid"]):
                os._exit(1)
        for procs in spec["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        init_pid = init_alive = -1
        own_pid_ns = -1
        if spec["namespaces"]:
            # Once our children get a new PID namespace we cannot start threads (clone(2):
            # CLONE_THREAD with a different pid_ns_for_children is EINVAL); the relay needs
            # libzmq's, so we go back to our own after forking I and D.
            own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            _check(lib.bh_unshare(lib.CLONE_NEWPID), "unshare(CLONE_NEWPID)")
            init_pid, init_alive = _start_pid_init(int(spec["uid"]), int(spec["gid"]),
                                                   str(spec["config"]["device"]))
        to_parent_r, to_parent_w = os.pipe()
        from_parent_r, from_parent_w = os.pipe()
    except BaseException as err:  # noqa: BLE001
        _fail(status_fd, "launcher setup failed", err)

    spec = dict(spec, keep_fds=[*spec["keep_fds"], from_parent_r])
    pid = os.fork()
    if pid == 0:
        os.close(to_parent_r)
        os.close(from_parent_w)
        if init_alive >= 0:
            os.close(init_alive)
        if watch_fd >= 0:
            os.close(watch_fd)
        _child(spec, argv, to_parent_w, from_parent_r, status_fd, then)
    os.close(to_parent_w)
    os.close(from_parent_r)
    if own_pid_ns >= 0:
        try:
            _check(lib.bh_setns(own_pid_ns, lib.CLONE_NEWPID), "setns(our own PID namespace)")
        except BaseException as err:  # noqa: BLE001
            os.kill(pid, signal.SIGKILL)
            _fail(status_fd, "launcher setup failed", err)
        os.close(own_pid_ns)

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        if spec["namespaces"]:
            if os.read(to_parent_r, 1) != b"u":
                raise OSError("the device process died before its namespaces were ready")
            _write_maps(pid, int(spec["uid"]), int(spec["gid"]))
            os.write(from_parent_w, b"m")
    except BaseException as err:  # noqa: BLE001
        forward(0, None)
        _fail(status_fd, "launcher could not map the device's uid/gid", err)
    relay = None
    if spec.get("relay"):
        # Bound before the device can learn where to connect (the core sends its fds only
        # after our `pid` line): see jail/relay.py.
        try:
            from jail.relay import Relay

            r = spec["relay"]
            relay = Relay(r["downstream"], r["upstream"], r["identity"].encode())
        except BaseException as err:  # noqa: BLE001
            forward(0, None)
            _fail(status_fd, "launcher could not set up the control relay", err)
    _status(status_fd, f"pid {pid}")
    # from_parent_w stays open while we live: D polls it to learn that we died.
    if relay is not None:
        _relay_until_device_ends(relay, pid, watch_fd, status_fd)
    elif watch_fd >= 0:
        _await_device_or_core(pid, watch_fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if init_pid > 0:  # the namespace's init has nothing left to do
        os.kill(init_pid, signal.SIGKILL)
        os.waitpid(init_pid, 0)
    if os.WIFSIGNALED(status):
        _status(status_fd, f"signal {os.WTERMSIG(status)}")
        os._exit(128 + os.WTERMSIG(status))
    code = os.WEXITSTATUS(status)
    _status(status_fd, f"exit {code}")
    os._exit(code)


def _relay_until_device_ends(relay: "Relay", pid: int, watch_fd: int, status_fd: int) -> None:
    """Forward the device's control channel until it ends; if the core ends first (`watch_fd`,
    the zygote path), SIGKILL the device."""
    device_fd = os.pidfd_open(pid)

    def on_watch(fd: int) -> bool:
        if fd == watch_fd:
            signal.pidfd_send_signal(device_fd, signal.SIGKILL)
        return True  # the device ended, or we just ended it

    def kill_device(why: str) -> None:
        _status(status_fd, f"error control channel: the device {why}")
        signal.pidfd_send_signal(device_fd, signal.SIGKILL)

    try:
        relay.run([device_fd, *([watch_fd] if watch_fd >= 0 else [])], on_watch, kill_device)
    finally:
        os.close(device_fd)


def _await_device_or_core(pid: int, watch_fd: int) -> None:
    """Block until D ends; if the core ends first, SIGKILL D (what PDEATHSIG would have done)."""
    device_fd = os.pidfd_open(pid)
    try:
        while True:
            ready = select.select([device_fd, watch_fd], [], [])[0]
            if device_fd in ready:
                return
            if watch_fd in ready:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
    finally:
        os.close(device_fd)


def main(argv: list[str]) -> NoReturn:
    if len(argv) < 4 or argv[0] != "--spec" or argv[2] != "--":
        print("usage: python -m jail.launch --spec JSON -- ARGV...", file=sys.stderr)
        os._exit(2)
    run(json.loads(argv[1]), argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
