"""How the core jails a device process: `JailOptions` (the knobs) and `LauncherPopen`.

`vmm_core.devices.spawn.spawn_device(..., jail=...)` takes `True` (defaults), `False` (no jail)
or a `JailOptions` / a dict of its fields; the CLI's flags map onto the fields one to one:

    --seccomp kill|trap|log|off   -> seccomp
    --jail-uid N / --jail-gid N   -> uid / gid  (default: one pair per VM, `default_vm_ids()`)
    --no-jail                     -> jail=False

`LauncherPopen` lets the rest of the core keep treating a jailed device like a `Popen`: its
`pid` is the launcher's (whose pidfd tells when the device has ended *and* been reported), and
`poll()`/`wait()` return the **device's** status the Popen way (-signal or exit code), decoded
from the launcher's status pipe; `seccomp_report()` names a syscall trapped in `trap` mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence, Union

from jail.errors import JailError
from jail.policy import CONFIG_DIR
from jail.sandbox import (JailedProcess, JailExit, JailSpec, LauncherStart, Rlimits,
                                      spawn)
from jail.seccomp import MODES

# Two host ids per VM: this base plus twice the core's pid is what the device finally runs as; the
# next id is the jail's set-up identity (root-in-namespace while it mounts, see sandbox.py).
# Distinct for VMs alive at the same time (pids are unique, pid_max <= 2**22), never a login
# account, and outside the ranges that /etc/subuid (100000 + 65536 n) and systemd-nspawn
# (0x80000..0x6FFFFFFF) hand out.
VM_ID_BASE = 0x7000_0000


# A jail uses two ids, N and N + 1 (launch._write_maps); both must be valid unprivileged ids:
# 4294967295 is (uid_t)-1 and 65534 is `nobody`.
MAX_JAIL_ID = 0xFFFF_FFFD


def valid_jail_id(value: object) -> bool:
    return type(value) is int and 0 < value <= MAX_JAIL_ID and value not in (65533, 65534)


def default_vm_ids(core_pid: int | None = None) -> tuple[int, int]:
    """The (uid, gid) every device process of this VM runs as on the host; the ids one above
    are the jail's set-up identity (launch._write_maps)."""
    ident = VM_ID_BASE + 2 * (os.getpid() if core_pid is None else core_pid)
    return ident, ident


@dataclass(frozen=True)
class JailOptions:
    """Per-VM jail settings; every field has a safe default."""

    seccomp: str = "kill"          # kill | trap | log | off  ("learn": learn.learn_device only)
    uid: int | None = None         # host uid of the jailed device (uid+1 while it is set up)
    gid: int | None = None
    policy: str | None = None      # a policy file, or None: the device type's (blk/rng/console)
    cgroup_procs: tuple[str, ...] = ()  # `VmCgroup.procs_files()`: devices are born in them
    nofile: int = 128              # RLIMIT_NOFILE: a device keeps ~15 fds
    address_space: int | None = None  # RLIMIT_AS (must cover guest RAM + ~1 GiB); None: none
    namespaces: bool = True        # False: only rlimits/prctl/seccomp (works without root)

    def __post_init__(self) -> None:
        # "learn" is internal: `learn.learn_device` supervises the device's every syscall.
        if self.seccomp not in (*MODES, "learn"):
            raise JailError(f"seccomp mode {self.seccomp!r}: choose one of {', '.join(MODES)}")
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if value is not None and not valid_jail_id(value):
                raise JailError(
                    f"jail {name} {value}: choose an unprivileged id from 1 to {MAX_JAIL_ID} "
                    f"whose next id is free too (the jail's set-up identity), not 65533 or 65534")

    @classmethod
    def coerce(cls, jail: JailOrOptions) -> JailOptions | None:
        """`True` -> defaults, `False`/None -> no jail, a dict -> its fields (unknown keys refused)."""
        if jail is True:
            return cls()
        if jail is False or jail is None:
            return None
        if isinstance(jail, JailOptions):
            return jail
        if isinstance(jail, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(jail) - known
            if unknown:
                raise JailError(f"unknown jail option(s) {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(sorted(known))})")
            data = dict(jail)
            if "cgroup_procs" in data:
                data["cgroup_procs"] = tuple(data["cgroup_procs"])
            return cls(**data)
        raise JailError(f"jail must be True, False, a dict or JailOptions, not {type(jail).__name__}")

    def spec_for(self, name: str, device_type: str, keep_fds: Sequence[int] = (),
                 fsize: int | None = None) -> JailSpec:
        """The `JailSpec` of device `name` (the policy follows the device type; `fsize`: the
        RLIMIT_FSIZE its kind asks for, e.g. the image size for blk, so writes past the image's
        end fail instead of growing the host file)."""
        uid, gid = default_vm_ids()
        policy = self.policy or (device_type if (CONFIG_DIR / f"{device_type}.toml").exists()
                                 else "common_device")  # test devices: the common rules only
        return JailSpec(device=name, policy=policy, seccomp_mode=self.seccomp,
                        uid=self.uid if self.uid is not None else uid,
                        gid=self.gid if self.gid is not None else gid,
                        keep_fds=list(keep_fds), cgroup_procs=list(self.cgroup_procs),
                        namespaces=self.namespaces,
                        rlimits=Rlimits(nofile=self.nofile, fsize=fsize,
                                        address_space=self.address_space))

    def with_mode(self, seccomp: str) -> JailOptions:
        return replace(self, seccomp=seccomp)


JailOrOptions = Union[bool, None, JailOptions, Mapping[str, Any]]


class LauncherPopen:
    """A jailed device seen as a `subprocess.Popen` (see the module docstring)."""

    def __init__(self, proc: JailedProcess, mode: str = "kill") -> None:
        self.jailed = proc
        self.mode = mode
        self.pid = proc.launcher.pid
        self.device_pid = proc.pid
        self.returncode: int | None = None
        self.exit: JailExit | None = None

    def _finish(self, result: JailExit) -> int:
        self.exit = result
        if result.violation is not None:  # the trap handler _exits; say what really ended it
            self.returncode = -signal.SIGSYS
        elif result.signal is not None:
            self.returncode = -result.signal
        elif result.code is not None:
            self.returncode = result.code
        else:
            self.returncode = 1
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and self.jailed.launcher.poll() is not None:
            return self._finish(self.jailed.wait())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            return self._finish(self.jailed.wait(timeout))  # raises subprocess.TimeoutExpired
        return self.returncode

    def kill(self) -> None:
        if self.jailed.launcher.poll() is None:
            self.jailed.kill()

    def seccomp_report(self) -> str | None:
        """`socket(2)` after a trap-mode violation; a hint after a kill-mode SIGSYS; else None."""
        if self.exit is None:
            return None
        if self.exit.violation is not None:
            return f"{self.exit.violation.name}(2)"
        if self.exit.signal == signal.SIGSYS:
            if self.mode == "trap":
                # The kernel resets a blocked SIGSYS to the default action: libzmq's threads block
                # every signal, so their violations kill without the handler's report.
                return ("killed by SIGSYS in a thread that blocks signals (libzmq's); the kernel "
                        "audit log (dmesg, type=1326) has the syscall number")
            return "killed by SIGSYS (run with seccomp mode 'trap' to name the syscall)"
        return None

    def describe(self) -> str:
        """The launcher's account of the exit (`jail setup failed: ...`, `killed by SIGKILL`)."""
        return str(self.exit) if self.exit is not None else "still running"

    def close(self) -> None:
        """Release the status pipe (after the device is gone)."""
        if self.jailed.status_fd >= 0 and self.jailed.launcher.poll() is not None:
            self.jailed.wait()
        if self.jailed.status_fd >= 0:
            os.close(self.jailed.status_fd)
            self.jailed.status_fd = -1
        self.jailed.release()


def jailed_popen(options: JailOptions, name: str, device_type: str, argv: Sequence[str],
                 bootstrap_fd: int, *, fsize: int | None = None, env: dict[str, str] | None = None,
                 cwd: str | None = None, start: LauncherStart | None = None) -> LauncherPopen:
    """Start `argv` (the device host) through the jail launcher, keeping only `bootstrap_fd`;
    `start`: fork the launcher from the zygote instead (see `sandbox.spawn`)."""
    spec = options.spec_for(name, device_type, keep_fds=[bootstrap_fd], fsize=fsize)
    proc = spawn(spec, argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, start=start)
    return LauncherPopen(proc, options.seccomp)
