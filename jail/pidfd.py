"""Signalling processes we started, and nothing else: every signal goes through a pidfd.

`kill(2)` with a pid of 0 or below means a process group or *every process we may signal*
(-1): as root, the whole host.  A pid read from a pipe or a file is also open to reuse once
the process is reaped.  A pidfd names one process for as long as we hold it, so a signal sent
through it reaches that process or nobody.  Every place that signals a device, a launcher or a
zygote holds a `ProcessRef`.
"""

from __future__ import annotations

import os
import signal


class NotOurProcess(ValueError):
    """A pid that cannot name a single process of ours (0, negative, 1, or not an int)."""


def check_pid(pid: object) -> int:
    """`pid` if it can name one process we started; `NotOurProcess` otherwise.

    0 and negative values address process groups or every process (kill(2)); 1 is an init,
    never ours to signal."""
    if type(pid) is not int or pid <= 1:
        raise NotOurProcess(f"refusing to signal pid {pid!r}: not a single process of ours")
    return pid


class ProcessRef:
    """A pidfd for one process; `send(sig)` reaches it or, once it is gone, nobody."""

    def __init__(self, pid: int) -> None:
        self.pid = check_pid(pid)
        self.fd = os.pidfd_open(self.pid)

    def send(self, signum: int = signal.SIGKILL) -> bool:
        """Signal the process; False if it has already exited (or this ref is closed)."""
        if self.fd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.fd, signum)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a forgotten ref must not leak an fd per restart
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def open_ref(pid: int) -> ProcessRef | None:
    """A `ProcessRef`, or None if the process is already gone (pidfd_open: ESRCH)."""
    try:
        return ProcessRef(pid)
    except ProcessLookupError:
        return None
