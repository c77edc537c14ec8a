"""Learn mode: run a device under a filter that reports every syscall, print a policy fragment.

The device is spawned jailed exactly as in production, with seccomp mode `learn`: at the point
where the real filter would be loaded, `seccomp.install_learn` loads one whose default action is
SECCOMP_RET_USER_NOTIF (TSYNC, so ZeroMQ's threads are watched too) after announcing the
listener's fd number on the status pipe.  The `Learner` here takes that listener out of the child
with pidfd_getfd(2) -- no cooperation needed from a process that can no longer make a syscall
unobserved -- records `(syscall, args)` for every notification and lets the call proceed
(SECCOMP_USER_NOTIF_FLAG_CONTINUE).  The result is printed as TOML with `why = ""` left for a person
to fill in (the loader refuses empty reasons, so nothing learned is trusted unread).

    python -m vmm_core.testing.jail_learn --device blk          # the real blk device, real workload
    python -m vmm_core.testing.jail_learn --device blk --probe  # the probe's stand-in workload
    python -m vmm_core.testing.jail_learn --device rng --only-new -- python -m some.command ...

By default the device is the real one (`device_procs.host`, started by the core's own
`spawn_device`) and the workload is the host-side `VirtioDriver` playing the guest through every
request type (`workload.run_workload`).  `bulkhead jail learn --device blk` calls
`learn_main(["--device", "blk", ...])`.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import threading
import time
from collections import defaultdict
from typing import Sequence

from jail._seccomp_cffi import ffi, lib
from jail.errors import JailError
from jail.policy import constants, load_policy, syscall_name
from jail.sandbox import JailedProcess, JailSpec, spawn

# Arguments worth pinning in the fragment: syscall -> (argument index, constant-name prefixes).
PINNED: dict[str, tuple[int, tuple[str, ...]]] = {
    "ioctl": (1, ("FIO", "TC", "TIO")), "fcntl": (1, ("F_",)), "madvise": (2, ("MADV_",)),
    "prctl": (0, ("PR_",)), "epoll_ctl": (1, ("EPOLL_CTL_",)), "fallocate": (1, ("FALLOC_FL_",)),
    "getrandom": (2, ("GRND_",)), "tgkill": (2, ("SIG",)),
}
NO_EXEC = ("mmap", "mprotect")  # arg 2 is a protection: say `without = "PROT_EXEC"` when true

Observed = dict[str, set[tuple[int, ...]]]


class Learner:
    """Supervises one learn-mode device: `start()` after spawn, `stop()` for what it saw."""

    def __init__(self, proc: JailedProcess) -> None:
        self.proc = proc
        self.observed: Observed = defaultdict(set)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jail-learner", daemon=True)
        self.error: str | None = None

    def start(self, timeout: float = 15.0) -> None:
        fd = self._take_listener(timeout)
        self._fd = fd
        self._thread.start()

    def _take_listener(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        target = None
        while target is None:
            for line in self.proc._lines:
                if line.startswith("learnfd "):
                    target = int(line.split()[1])
            if target is not None:
                break
            if time.monotonic() > deadline or self.proc.status_fd < 0:
                raise JailError("learn: the device never loaded its learn filter")
            if select.select([self.proc.status_fd], [], [], 0.1)[0]:
                self.proc._read_status(block=False)
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            while True:
                fd = lib.bh_pidfd_getfd(pidfd, target)
                if fd >= 0:
                    if "seccomp" in os.readlink(f"/proc/self/fd/{fd}"):
                        return fd
                    os.close(fd)
                if time.monotonic() > deadline:
                    raise JailError(f"learn: no seccomp listener at fd {target} of {self.proc.pid}")
                time.sleep(0.001)
        finally:
            os.close(pidfd)

    def _run(self) -> None:
        req = ffi.new("struct seccomp_notif **")
        resp = ffi.new("struct seccomp_notif_resp **")
        if lib.seccomp_notify_alloc(req, resp) != 0:
            self.error = "seccomp_notify_alloc failed"
            return
        zero = bytes(ffi.sizeof("struct seccomp_notif"))
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                events = poller.poll(100)
                if not events:
                    continue
                if not events[0][1] & select.POLLIN:
                    break  # POLLHUP: no task uses the filter any more
                ffi.memmove(req[0], zero, len(zero))  # the kernel wants a zeroed buffer (EINVAL)
                if lib.seccomp_notify_receive(self._fd, req[0]) != 0:
                    continue  # the task died between poll and receive
                data = req[0].data
                self.observed[syscall_name(data.nr)].add(tuple(int(a) for a in data.args))
                resp[0].id = req[0].id
                resp[0].val = 0
                resp[0].error = 0
                resp[0].flags = lib.SECCOMP_USER_NOTIF_FLAG_CONTINUE
                lib.seccomp_notify_respond(self._fd, resp[0])
        finally:
            lib.seccomp_notify_free(req[0], resp[0])
            os.close(self._fd)

    def stop(self, timeout: float = 10.0) -> Observed:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(1.0)
        return dict(self.observed)


def _name_of(value: int, prefixes: tuple[str, ...]) -> str | int:
    for name, v in constants().items():
        if v == value and name.startswith(prefixes):
            return name
    return value


def to_toml(observed: Observed, *, skip: set[str] | frozenset[str] = frozenset()) -> str:
    """A policy fragment for the observed syscalls not in `skip`, with empty `why`s."""
    exec_bit = constants()["PROT_EXEC"]
    out = []
    for name in sorted(set(observed) - set(skip)):
        calls = observed[name]
        out.append(f"[syscalls.{name}]\nwhy = \"\"  # seen {len(calls)} distinct argument sets")
        if name in PINNED:
            arg, prefixes = PINNED[name]
            values = sorted({c[arg] for c in calls})
            alts = ", ".join(f"{{ arg{arg} = {json.dumps(_name_of(v, prefixes))} }}" for v in values)
            out.append(f"when = [ {alts} ]")
        elif name in NO_EXEC and not any(c[2] & exec_bit for c in calls):
            out.append('when = [ { arg2 = { without = "PROT_EXEC" } } ]')
        out.append("")
    return "\n".join(out)


def merge(*runs: Observed) -> Observed:
    """The union of learn runs: what one run missed by timing (a malloc trim, a retried wait)
    another may have seen, as an operator learning a policy would run the workload more than once."""
    out: dict[str, set[tuple[int, ...]]] = defaultdict(set)
    for run in runs:
        for name, calls in run.items():
            out[name] |= calls
    return dict(out)


class SeccompAudit:
    """Seccomp kills logged by the kernel (audit type=1326, "syscall=N") since this was made:
    the one way to name the syscall that a kill-mode filter refused, in any thread."""

    def __init__(self) -> None:
        self._skip = len(self._lines())

    @staticmethod
    def _lines() -> list[str]:
        import subprocess

        done = subprocess.run(["dmesg"], capture_output=True, text=True)
        return [line for line in done.stdout.splitlines() if "type=1326" in line]

    def kills(self) -> list[str]:
        """'pid=P syscall=NAME' for each SIGSYS kill (sig=31) logged since construction."""
        import re

        out = []
        for line in self._lines()[self._skip:]:
            m = re.search(r"pid=(\d+) .* sig=31 .*syscall=(\d+)", line)
            if m:
                out.append(f"pid={m[1]} syscall={syscall_name(int(m[2]))}")
        return out


def learn(device: str, argv: Sequence[str] | None = None, *, rounds: int = 3,
          timeout: float = 60.0, uid: int = 100000, gid: int = 100000) -> Observed:
    """Run `argv` (default: the probe's workload for `device`) jailed in learn mode."""
    cmd_r = cmd_w = reply_r = reply_w = -1
    keep: list[int] = []
    if argv is None:
        cmd_r, cmd_w = os.pipe()
        reply_r, reply_w = os.pipe()
        keep = [cmd_r, reply_w]
        argv = [sys.executable, "-m", "jail.probe", "--cmd-fd", str(cmd_r),
                "--reply-fd", str(reply_w)]
        image = f"/tmp/bulkhead-learn-{os.getpid()}.img"
        if device == "blk":
            with open(image, "wb") as f:
                f.truncate(1 << 20)
            argv += ["--image", image]
        elif device == "console":
            argv += ["--console", "/dev/null"]
        elif device == "rng":
            argv += ["--rng"]
    spec = JailSpec(device=f"{device}-learn", policy=device, seccomp_mode="learn", uid=uid, gid=gid,
                    keep_fds=keep)
    proc = spawn(spec, argv)
    for fd in keep:
        os.close(fd)
    learner = Learner(proc)
    try:
        learner.start()
        if cmd_w >= 0:
            replies = os.fdopen(reply_r, "rb")
            replies.readline()  # ready
            for _ in range(rounds):
                os.write(cmd_w, b'{"op": "work"}\n')
                replies.readline()
            os.write(cmd_w, b'{"op": "exit"}\n')
            os.close(cmd_w)
            replies.close()
        proc.wait(timeout)
    finally:
        if proc.launcher.poll() is None:
            proc.kill()
            proc.wait(5)
        if argv and device == "blk" and cmd_w >= 0:
            try:
                os.unlink(f"/tmp/bulkhead-learn-{os.getpid()}.img")
            except OSError:
                pass
    return learner.stop()


def learn_device(device: str, *, rounds: int = 3, timeout: float = 30.0,
                 policy: str | None = None) -> Observed:
    """The real `device` process, jailed in learn mode, under `workload.run_workload`.

    The learner must be attached while the handshake runs: the device's first syscall after
    `enter_jail` (sending its Ack) waits for a supervisor to answer it.
    """
    from vmm_core.testing.workload import device_harness, run_workload

    learners: list[Learner] = []
    errors: list[BaseException] = []

    def attach(proc: object) -> None:
        learner = Learner(proc.popen.jailed)  # type: ignore[attr-defined]
        learners.append(learner)

        def start() -> None:
            try:
                learner.start(timeout)
            except BaseException as err:  # noqa: BLE001 - reported by the caller's thread
                errors.append(err)
        threading.Thread(target=start, name="jail-learn-attach", daemon=True).start()

    jail = {"seccomp": "learn", **({"policy": policy} if policy else {})}
    try:
        with device_harness(device, jail=jail, on_spawn=attach) as harness:
            checks = run_workload(harness, rounds)
            if not all(checks.values()):
                raise JailError(f"learn: the {device} workload failed under learn mode: {checks}")
    except JailError:
        raise
    except Exception as err:  # a start error of the device: name the learner's problem if any
        if errors:
            raise JailError(f"learn: {errors[0]}") from None
        raise JailError(f"learn: the {device} device did not run: {err}") from None
    if errors:
        raise JailError(f"learn: {errors[0]}")
    return learners[-1].stop(timeout) if learners else {}


def learn_main(argv: Sequence[str] | None = None) -> int:
    """`bulkhead jail learn --device blk [--only-new] [-- COMMAND...]`: print a TOML fragment."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = None
    if "--" in args:
        i = args.index("--")
        args, command = args[:i], args[i + 1:]
    ap = argparse.ArgumentParser(prog="bulkhead jail learn")
    ap.add_argument("--device", required=True, help="blk | rng | console (its policy file)")
    ap.add_argument("--only-new", action="store_true", help="omit what the policy already allows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probe", action="store_true",
                    help="learn the stand-in probe's workload instead of the real device's")
    ns = ap.parse_args(args)
    try:
        if command or ns.probe:
            observed = learn(ns.device, command, rounds=ns.rounds)
        else:
            observed = learn_device(ns.device, rounds=ns.rounds)
    except JailError as err:
        print(f"bulkhead jail learn: {err}", file=sys.stderr)
        return 2
    skip = set(load_policy(ns.device).rules) if ns.only_new else set()
    source = "the probe" if (command or ns.probe) else "the real device under the driver workload"
    print(f"# learned for device {ns.device!r} from {source}: fill in every `why` before using it")
    print(to_toml(observed, skip=skip))
    return 0


if __name__ == "__main__":
    sys.exit(learn_main())
