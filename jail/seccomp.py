"""Turn a `Policy` into a libseccomp filter and load it on every thread of the calling process.

Modes (the `--seccomp` knob of a VM):

* `kill`  the policy's default action (`kill_process` in production): the kernel kills the whole
          device process; the core sees SIGSYS and cannot tell which syscall it was.
* `trap`  SECCOMP_RET_TRAP: a SIGSYS handler written in C (`bh_install_sigsys_reporter`) writes
          `sigsys <nr> <arch>` to a pre-opened fd (the jail status pipe to the core) and `_exit`s,
          so the core can log `seccomp violation: socket(2)`.
* `log`   SECCOMP_RET_LOG: everything is allowed, violations go to the kernel audit log.
* `off`   no filter (development only).

The filter is loaded with SCMP_FLTATR_CTL_TSYNC, so ZeroMQ's I/O threads, which already run when
the jail is entered, get it too.  Learn mode (`learn.py`) uses `install_learn` below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from jail._seccomp_cffi import ffi, lib
from jail.errors import JailError
from jail.policy import ArgCmp, Policy, parse_errno_action, resolve_syscall, syscall_name

MODES = ("kill", "trap", "log", "off")

_OPS = {
    "eq": lib.SCMP_CMP_EQ, "ne": lib.SCMP_CMP_NE, "lt": lib.SCMP_CMP_LT, "le": lib.SCMP_CMP_LE,
    "gt": lib.SCMP_CMP_GT, "ge": lib.SCMP_CMP_GE, "masked_eq": lib.SCMP_CMP_MASKED_EQ,
}


def action_value(action: str) -> int:
    """The libseccomp action constant for a policy action name."""
    fixed = {
        "kill_process": lib.SCMP_ACT_KILL_PROCESS, "kill_thread": lib.SCMP_ACT_KILL_THREAD,
        "trap": lib.SCMP_ACT_TRAP, "log": lib.SCMP_ACT_LOG, "allow": lib.SCMP_ACT_ALLOW,
        "notify": lib.SCMP_ACT_NOTIFY,
    }
    if action in fixed:
        return int(fixed[action])
    code = parse_errno_action(action)
    if code is None:
        raise JailError(f"unknown seccomp action {action!r}")
    return int(lib.bh_act_errno(code))


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise JailError(f"seccomp: {what} failed: {os.strerror(-rc)}")
    return rc


class Filter:
    """A libseccomp filter context under construction; `load()` applies it to all threads."""

    def __init__(self, default_action: str) -> None:
        self._ctx = lib.seccomp_init(action_value(default_action))
        if self._ctx == ffi.NULL:
            raise JailError("seccomp: seccomp_init failed (out of memory or bad default action)")
        self.default_action = default_action
        _check(lib.seccomp_attr_set(self._ctx, lib.SCMP_FLTATR_CTL_TSYNC, 1), "setting TSYNC")
        # Log every action other than allow to the kernel audit log (dmesg: type=1326 ... syscall=N),
        # so a kill-mode death still leaves the syscall number on the host.
        _check(lib.seccomp_attr_set(self._ctx, lib.SCMP_FLTATR_CTL_LOG, 1), "setting CTL_LOG")
        _check(lib.seccomp_attr_set(self._ctx, lib.SCMP_FLTATR_ACT_BADARCH,
                                    lib.SCMP_ACT_KILL_PROCESS), "setting the bad-arch action")

    def add(self, nr: int, action: str, conditions: tuple[ArgCmp, ...] = ()) -> None:
        """Add one rule: `action` for syscall `nr` when all `conditions` hold."""
        arr = ffi.new("struct scmp_arg_cmp[]", max(1, len(conditions)))
        for i, c in enumerate(conditions):
            arr[i].arg = c.arg
            arr[i].op = _OPS[c.op]
            if c.op == "masked_eq":
                arr[i].datum_a, arr[i].datum_b = c.mask, c.value
            else:
                arr[i].datum_a, arr[i].datum_b = c.value, 0
        rc = lib.seccomp_rule_add_array(self._ctx, action_value(action), nr, len(conditions), arr)
        if rc == -17:  # EEXIST: the same rule is already there (e.g. the trap reporter's write)
            return
        _check(rc, f"adding a rule for {syscall_name(nr)}")

    def add_policy(self, policy: Policy) -> None:
        for rule in policy.rules.values():
            if not rule.when:
                self.add(rule.nr, rule.action)
            for alternative in rule.when:
                self.add(rule.nr, rule.action, alternative)

    def export_pfc(self) -> str:
        """The filter as libseccomp's pseudo-C text (for debugging and `bulkhead jail show`)."""
        r, w = os.pipe()
        try:
            _check(lib.seccomp_export_pfc(self._ctx, w), "exporting the filter")
            os.close(w)
            w = -1
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
            return b"".join(chunks).decode()
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def load(self) -> None:
        rc = lib.seccomp_load(self._ctx)
        if rc > 0:  # TSYNC failure: the id of the thread that could not be synchronised
            raise JailError(f"seccomp: thread {rc} could not be synchronised to the filter")
        _check(rc, "loading the filter")

    def close(self) -> None:
        if self._ctx != ffi.NULL:
            lib.seccomp_release(self._ctx)
            self._ctx = ffi.NULL

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_filter(policy: Policy, mode: str, report_fd: int | None = None) -> Filter:
    """The filter for `policy` in `mode` (not `off`); with `trap`, `report_fd` receives violations."""
    if mode not in MODES or mode == "off":
        raise JailError(f"seccomp mode {mode!r} builds no filter (expected kill, trap or log)")
    default = {"kill": policy.default_action, "trap": "trap", "log": "log"}[mode]
    flt = Filter(default)
    try:
        flt.add_policy(policy)
        if mode == "trap":
            if report_fd is None:
                raise JailError("seccomp mode 'trap' needs a report fd for the SIGSYS handler")
            # The SIGSYS handler's own syscalls: one write to the report fd, then exit_group.
            flt.add(resolve_syscall("write"), "allow", (ArgCmp(0, "eq", report_fd),))
            flt.add(resolve_syscall("exit_group"), "allow")
    except BaseException:
        flt.close()
        raise
    return flt


def install(policy: Policy, mode: str, report_fd: int | None = None) -> None:
    """Load `policy` in `mode` on every thread of this process (nothing for mode `off`).

    Call it last when entering the jail: after it, only the policy's syscalls work.
    """
    if mode == "off":
        return
    flt = build_filter(policy, mode, report_fd)
    try:
        if mode == "trap":
            assert report_fd is not None
            _check(lib.bh_install_sigsys_reporter(report_fd), "installing the SIGSYS handler")
        flt.load()
    finally:
        flt.close()


def install_learn(report_fd: int) -> None:
    """Learn mode, in the process being learned: every syscall from now on is sent to a supervisor.

    Announces `learnfd <fd>` on `report_fd` first; the supervisor (`learn.learn`) takes the listener
    with pidfd_getfd(2) and answers each notification with SECCOMP_USER_NOTIF_FLAG_CONTINUE.
    """
    predicted = os.dup(0)
    os.close(predicted)  # the listener will get the lowest free fd number, this one
    os.write(report_fd, f"learnfd {predicted}\n".encode())
    flt = Filter("notify")
    flt.load()  # the context is kept: the listener fd it holds must stay open for the supervisor


@dataclass(frozen=True)
class Violation:
    """A syscall refused in trap mode, as reported by the SIGSYS handler."""

    nr: int
    arch: int

    @property
    def name(self) -> str:
        return syscall_name(self.nr, self.arch)

    def __str__(self) -> str:
        return f"seccomp violation: {self.name}(2)"


def parse_report_line(line: str) -> Violation | None:
    """A `Violation` from a `sigsys <nr> <arch>` status line, else None."""
    parts = line.split()
    if len(parts) == 3 and parts[0] == "sigsys" and parts[1].isdigit() and parts[2].isdigit():
        return Violation(int(parts[1]), int(parts[2]))
    return None
