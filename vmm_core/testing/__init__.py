"""Helpers for tests and benchmarks: run `bulkhead` on the test guest and parse its results.

The guest reports `GK <test> ok|fail <detail>` lines and `GK done <passed>/<total>` on COM1
(docs/guest_abi.md).  `run_bulkhead` runs the real CLI in a child process, as a user would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_GUEST = os.path.join(ROOT, "guest_kit", "build", "testguest.elf")

_GK_LINE = re.compile(r"^GK (\S+) (ok|fail)(?: (.*))?$")
_GK_DONE = re.compile(r"^GK done (\d+)/(\d+)")


@dataclass
class GuestRun:
    returncode: int
    stdout: str
    stderr: str
    results: dict[str, tuple[bool, str]] = field(default_factory=dict)
    done: tuple[int, int] | None = None

    def ok(self, test: str) -> bool:
        return self.results.get(test, (False, ""))[0]

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-4000:]}"


def parse_results(text: str) -> tuple[dict[str, tuple[bool, str]], tuple[int, int] | None]:
    results: dict[str, tuple[bool, str]] = {}
    done = None
    for line in text.splitlines():
        m = _GK_DONE.match(line)
        if m:
            done = (int(m.group(1)), int(m.group(2)))
            continue
        m = _GK_LINE.match(line)
        if m:
            results[m.group(1)] = (m.group(2) == "ok", m.group(3) or "")
    return results, done


def bulkhead_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmm_core.cli", *args]


def run_bulkhead(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> GuestRun:
    proc = subprocess.run(bulkhead_argv(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    results, done = parse_results(proc.stdout)
    return GuestRun(proc.returncode, proc.stdout, proc.stderr, results, done)


def run_test_guest(tests: str, *args: str, vcpus: int = 1, timeout: float = 120,
                   cmdline: str = "") -> GuestRun:
    return run_bulkhead("run", "--kernel", TEST_GUEST, "--vcpus", str(vcpus),
                        "--cmdline", f"gk.tests={tests} {cmdline}".strip(), *args, timeout=timeout)


SECTOR = 512


def blk_pattern_sector(sector: int, seed: int) -> bytes:
    """The test guest's disk pattern (docs/guest_abi.md): 32-bit word w of sector s is
    (s * 0x9E3779B1 + w * 0x85EBCA77 + seed) mod 2**32, little-endian."""
    base = (sector * 0x9E3779B1 + seed) & 0xFFFFFFFF
    return b"".join(((base + w * 0x85EBCA77) & 0xFFFFFFFF).to_bytes(4, "little")
                    for w in range(SECTOR // 4))


def blk_pattern(sectors: int, seed: int) -> bytes:
    return b"".join(blk_pattern_sector(s, seed) for s in range(sectors))


def _ppid(pid: int | str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def device_pids(core_pid: int) -> dict[str, int]:
    """{device name: pid} of the device processes of the core `core_pid`.

    The core is found among the device's nearest ancestors: its parent (unjailed), the jail
    launcher's parent (exec'd launcher), or the zygote that forked the launcher (zygote path:
    core -> zygote -> launcher -> device).  A launcher whose zygote died is re-parented away from
    the core; its device is not listed here (`bulkhead ps` still lists it).
    """
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if not (argv and argv[0].startswith(b"bulkhead-dev:")):
                continue
            ancestor = int(entry)
            for _ in range(3):
                ancestor = _ppid(ancestor)
                if ancestor in (core_pid, 0, 1):
                    break
            if ancestor != core_pid:
                continue
        except (OSError, ValueError, IndexError):
            continue
        # The title may be padded with spaces (prctl's set_proctitle overwrites argv in place).
        out[argv[0].split(b":", 1)[1].decode().strip()] = int(entry)
    return out


def wait_for_device(core_pid: int, name: str, not_pid: int | None = None,
                    timeout: float = 10.0) -> int:
    """The pid of device `name` of core `core_pid` once it runs (one other than `not_pid`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = device_pids(core_pid).get(name)
        if pid is not None and pid != not_pid:
            return pid
        time.sleep(0.01)
    raise AssertionError(f"device {name} did not (re)appear within {timeout} s")


def kill_device(core_pid: int, name: str, not_pid: int | None = None) -> int:
    """SIGKILL the device's current process (a positive pid this test's VM started, found
    afresh if it is just being replaced); its pid."""
    for _ in range(20):
        pid = wait_for_device(core_pid, name, not_pid=not_pid)
        try:
            os.kill(pid, signal.SIGKILL)
            return pid
        except ProcessLookupError:
            not_pid = pid
    raise AssertionError(f"could not kill device {name}")


class BackgroundVm:
    """`bulkhead` running in the background with its stdout/stderr collected on threads, so a test
    or `bulkhead chaos` can act on the VM (kill its devices) while it runs."""

    def __init__(self, *args: str) -> None:
        # A TMPDIR of its own: a VM killed by `kill()` cannot remove its scratch directory.
        self._tmp = tempfile.mkdtemp(prefix="bh-bgvm-")
        self.proc = subprocess.Popen(bulkhead_argv(*args), cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "TMPDIR": self._tmp})
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._pumps = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
                       threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True)]
        for t in self._pumps:
            t.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for t in self._pumps:
            t.join(5)
        shutil.rmtree(self._tmp, ignore_errors=True)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def results(self) -> tuple[dict[str, tuple[bool, str]], tuple[int, int] | None]:
        return parse_results("".join(self.stdout))

    def explain(self) -> str:
        return "--- stdout\n" + "".join(self.stdout) + "\n--- stderr\n" + "".join(self.stderr)[-6000:]
