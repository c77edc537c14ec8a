"""The test bed itself: UML boots, runs shell and Python guest scripts, reports, and leaves nothing.

Every test boots a real user-mode Linux (about 2-3 s each here).
"""

from __future__ import annotations

import hashlib
import os
import random
import select

import pytest

from vmm_core.testing.uml import UmlBed, UmlError, UmlTimeout, kernel_version

pytestmark = [pytest.mark.linux, pytest.mark.root]  # root: UML runs in a PID namespace


def _uml_processes_of_ours() -> list[int]:
    """linux.uml processes descending from this test process."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "linux.uml":
                    continue
            pid = int(entry)
            for _ in range(8):
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    found.append(int(entry))
                    break
                if pid <= 1:
                    break
        except (OSError, ValueError):
            continue
    return found


class UmlWatch:
    """At a console marker, pidfds on every UML process of ours (main, helpers, guest address
    spaces); afterwards, which of them are still running."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.fds: list[int] = []

    def __call__(self, line: str) -> None:
        if line.startswith(self.marker) and not self.fds:
            for pid in _uml_processes_of_ours():
                try:
                    self.fds.append(os.pidfd_open(pid))
                except ProcessLookupError:
                    pass

    def running(self) -> int:
        """How many watched processes have not exited (a pidfd turns readable when it has)."""
        try:
            return sum(1 for fd in self.fds if not select.select([fd], [], [], 0)[0])
        finally:
            for fd in self.fds:
                os.close(fd)


def test_shell_script_runs_on_the_read_only_host_root(uml_host, tmp_path):
    a, b = random.randrange(1000), random.randrange(1000)
    token = os.urandom(8).hex()
    with UmlBed() as bed:
        run = bed.run(f"""
            echo "UML-RESULT sum=$((A + B)) kernel=$(uname -r) pid1=$(cat /proc/1/comm)"
            grep -q '^root / hostfs ro' /proc/mounts && echo "UML-RESULT root=ro"
            touch /etc/bulkhead-uml-probe 2>/dev/null || echo "UML-RESULT etc_write=refused"
            printf %s "$TOKEN" > "$UML_OUT/token"
            echo scratch > "$TMPDIR/f" && echo "UML-RESULT scratch=$(cat "$TMPDIR/f")"
            echo "UML-RESULT cwd=$(pwd)"
            """, env={"A": str(a), "B": str(b), "TOKEN": token}, timeout=60)
        run.check()
        with open(os.path.join(bed.out_dir, "token")) as f:
            assert f.read() == token  # written by the guest through the read-write hostfs mount
        assert run.results["cwd"] == bed.out_dir
    assert run.results["sum"] == str(a + b)
    assert run.results["kernel"] == kernel_version()
    assert run.results["pid1"] == "init.sh"
    assert run.results["root"] == "ro"
    assert run.results["etc_write"] == "refused"
    assert run.results["scratch"] == "scratch"
    assert not os.path.exists("/etc/bulkhead-uml-probe")
    assert not os.path.exists(bed.dir)
    assert _uml_processes_of_ours() == []


def test_python_guest_script_and_a_failing_status(uml_host):
    data = os.urandom(4096)
    with UmlBed() as bed:
        with open(os.path.join(bed.out_dir, "in.bin"), "wb") as f:
            f.write(data)
        run = bed.run("""
import hashlib, os, sys
with open(os.path.join(os.environ["UML_OUT"], "in.bin"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
mem_kib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
print(f"UML-RESULT sha256={digest} mem_kib={mem_kib}")
sys.exit(int(os.environ["STATUS"]))
""", python=True, env={"STATUS": "3"}, timeout=60)
    assert run.guest_status == 3, run.explain()
    with pytest.raises(UmlError, match="guest run failed"):
        run.check()
    assert run.results["sha256"] == hashlib.sha256(data).hexdigest()
    # mem=256M: the guest sees a little less (the kernel's own image and reservations).
    assert 200 * 1024 < int(run.results["mem_kib"]) <= 256 * 1024


def test_time_limit_kills_uml_and_all_its_helpers(uml_host):
    before = {e for e in os.listdir("/dev/shm") if e.startswith("bulkhead-uml-mem-")}
    watch = UmlWatch("UML-RESULT started=1")
    with UmlBed() as bed:
        with pytest.raises(UmlTimeout) as caught:
            bed.run("sleep 1000 & sleep 1000 & echo UML-RESULT started=1; sleep 1000", timeout=8,
                    on_line=watch)
    run = caught.value.run
    assert run.timed_out and run.results == {"started": "1"}, run.explain()
    # main, its I/O helpers, and one host process per guest address space (init, 3 x sleep)
    assert len(watch.fds) >= 5
    assert watch.running() == 0
    assert _uml_processes_of_ours() == []
    # the memory file's private directory is gone
    assert {e for e in os.listdir("/dev/shm") if e.startswith("bulkhead-uml-mem-")} <= before


def test_kernel_panic_ends_the_boot_at_once(uml_host):
    watch = UmlWatch("UML-RESULT before=1")
    with UmlBed() as bed:
        run = bed.run("echo UML-RESULT before=1; echo c > /proc/sysrq-trigger; sleep 1000",
                      timeout=60, on_line=watch)
    assert run.panic is not None and "sysrq triggered crash" in run.panic, run.explain()
    assert run.results == {"before": "1"} and run.guest_status is None
    assert run.duration < 30
    with pytest.raises(UmlError, match="guest run failed"):
        run.check()
    assert watch.fds and watch.running() == 0


def test_a_failing_line_callback_fails_the_run_without_stalling_the_console(uml_host):
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line.startswith("UML-RESULT n=1"):
            raise RuntimeError("measurement broke")

    with UmlBed() as bed:
        with pytest.raises(UmlError, match="measurement broke"):
            # more than a pipe's worth after the failure: the console must still be drained, or
            # UML blocks writing it and the run ends in a timeout instead
            bed.run("echo UML-RESULT n=1; seq 1 30000; echo UML-RESULT n=2", timeout=60,
                    on_line=on_line)
    assert seen[-1] == "UML-RESULT n=1"  # not called again after it failed
    assert _uml_processes_of_ours() == []
