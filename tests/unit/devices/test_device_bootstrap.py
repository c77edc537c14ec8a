"""A device process waits for its fds as long as the core's start timeout says, then gives up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from device_procs.host import EXIT_BOOTSTRAP
from vmm_core.testing import ROOT


def test_a_device_given_no_fds_gives_up_after_its_bootstrap_timeout() -> None:
    core_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with core_end, device_end:
        t0 = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "device_procs.host", "--name", "rng0", "--type", "rng",
             "--identity", "rng0.1", "--control", "ipc:///nonexistent", "--parent-pid", str(os.getpid()),
             "--bootstrap-fd", str(device_end.fileno()), "--bootstrap-timeout", "0.3"],
            cwd=ROOT, pass_fds=(device_end.fileno(),), capture_output=True, text=True, timeout=30)
        waited = time.monotonic() - t0
    assert run.returncode == EXIT_BOOTSTRAP, run.stderr
    assert "no fds from the core" in run.stderr
    assert waited < 8, waited  # not the 10 s default: the flag was used (generous: slow CI)
