"""A jail that fails to start must hurt nobody (issue 9, finding 1).

Before the fix, a launcher that failed before reporting its device's pid left `pid = -1`, and
the clean-up sent SIGKILL to -1: as root, every process on the host.  Each case here runs the
real CLI (or `sandbox.spawn`) inside a fresh PID namespace (`unshare --pid --fork
--mount-proc`) beside a canary process; a kill(-1) there would take the canary with it.  The
run must end with exit status 2 and one line, and the canary must be alive afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.kvm, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "guest_kit" / "build" / "testguest.elf"

# Runs "$@" beside a canary, then reports whether the canary survived.  bash is the namespace's
# pid 1, which kill(-1) spares, so only the canary can show the damage.
CANARY = r'''
sleep 1000 & canary=$!
"$@" 2>"$ERR_FILE"; rc=$?
if kill -0 "$canary" 2>/dev/null; then echo CANARY-ALIVE; else echo CANARY-DEAD; fi
kill "$canary" 2>/dev/null
exit $rc
'''


def _in_pid_namespace(tmp_path: Path, argv: list[str], *, user_ns: bool = False,
                      setup: str = "") -> tuple[int, str, list[str]]:
    err = tmp_path / "stderr.txt"
    script = tmp_path / "canary.sh"
    script.write_text(setup + CANARY)
    outer = ["unshare", "--pid", "--fork", "--mount-proc"]
    if user_ns:
        outer[1:1] = ["--user", "--map-root-user"]
    env = dict(os.environ, ERR_FILE=str(err))
    done = subprocess.run([*outer, "bash", str(script), *argv], capture_output=True, text=True,
                          env=env, timeout=90, cwd=ROOT)
    lines = err.read_text().splitlines() if err.exists() else []
    return done.returncode, done.stdout, lines


def _bulkhead(*flags: str) -> list[str]:
    return [sys.executable, "-m", "vmm_core.cli", "run", "--kernel", str(GUEST), "--rng",
            "--cmdline", "gk.tests=virtio-rng", "--timeout", "20", *flags]


@pytest.mark.parametrize("flags, expected", [
    (["--jail-uid", "4294967294"], "--jail-uid"),           # uid + 1 is not a valid id
    (["--cgroup-pids-max", "5"], "--cgroup-pids-max too low"),  # a thread or fork: EAGAIN
    (["--cgroup-pids-max", "6"], "--cgroup-pids-max too low"),
])
def test_failing_jail_start_signals_nobody(tmp_path: Path, flags: list[str], expected: str) -> None:
    rc, out, err = _in_pid_namespace(tmp_path, _bulkhead(*flags))
    assert "CANARY-ALIVE" in out, f"a failing jail start killed a bystander: {out!r} {err!r}"
    assert rc == 2, (rc, err)
    assert len(err) == 1 and err[0].startswith("bulkhead: "), err
    assert expected in err[0], err


def test_no_user_namespaces_signals_nobody(tmp_path: Path) -> None:
    """user.max_user_namespaces = 0 in a user namespace of our own: the jail cannot unshare."""
    rc, out, err = _in_pid_namespace(
        tmp_path, _bulkhead(), user_ns=True,
        setup="echo 0 > /proc/sys/user/max_user_namespaces || exit 99\n")
    assert "CANARY-ALIVE" in out, (out, err)
    assert rc == 2, (rc, err)
    assert len(err) == 1 and "could not be jailed" in err[0], err


SPAWN_TIMEOUT = r'''
import subprocess, sys
from jail.errors import JailError
from jail.sandbox import JailSpec, spawn

def never_reports(launch, status_fd):
    # A "launcher" that never writes `pid N`: spawn must give up after its timeout.
    return subprocess.Popen(["sleep", "30"])

try:
    spawn(JailSpec(device="t0", policy="rng"), ["true"], timeout=0.5, start=never_reports)
except JailError as err:
    print("JailError:", err)
    sys.exit(2)
sys.exit(0)
'''


def test_start_timeout_signals_nobody(tmp_path: Path) -> None:
    rc, out, err = _in_pid_namespace(tmp_path, [sys.executable, "-c", SPAWN_TIMEOUT])
    assert "CANARY-ALIVE" in out, (out, err)
    assert rc == 2, (rc, out, err)
    assert "JailError: device t0 could not be jailed" in out
