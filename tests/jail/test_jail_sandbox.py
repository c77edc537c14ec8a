"""Jailed device processes, for real: namespaces, credentials, filesystem, seccomp violations.

Needs root with user namespaces.  The child is `jail.probe`: it imports zmq and
msgpack, opens a disk image / console file / eventfds and a ZeroMQ connection (I/O thread running),
enters the jail, then serves JSON commands over a pipe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from jail.cgroup import VmCgroup
from jail.sandbox import Bind, JailExit, JailSpec, JailedProcess, Rlimits, spawn

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

JAIL_UID = 100000


class Child:
    """A probe under a jail plus its command pipe."""

    def __init__(self, proc: JailedProcess, cmd_w: int, reply_r: int) -> None:
        self.proc = proc
        self.cmd_w = cmd_w
        self.replies = os.fdopen(reply_r, "rb")
        ready = self.replies.readline()
        assert ready, f"probe died before it was ready: {proc.wait(5)}"

    def ask(self, **cmd: Any) -> dict[str, Any] | None:
        """The reply, or None when the child died instead of answering."""
        try:
            os.write(self.cmd_w, json.dumps(cmd).encode() + b"\n")
        except BrokenPipeError:
            return None
        line = self.replies.readline()
        return json.loads(line) if line else None

    def status(self, tid: int | None = None) -> dict[str, str]:
        path = f"/proc/{self.proc.pid}/status" if tid is None else \
            f"/proc/{self.proc.pid}/task/{tid}/status"
        with open(path) as f:
            return dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)

    def close(self) -> JailExit:
        try:
            os.write(self.cmd_w, b'{"op": "exit"}\n')
        except BrokenPipeError:
            pass
        os.close(self.cmd_w)
        self.replies.close()
        return self.proc.wait(20)


@pytest.fixture
def jailed(tmp_path: Path) -> Iterator[Any]:
    children: list[Child] = []

    def start(device: str = "blk", mode: str = "kill", *extra: str, **spec_kw: Any) -> Child:
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        console = tmp_path / "console.log"
        console.touch()
        cmd_r, cmd_w = os.pipe()
        reply_r, reply_w = os.pipe()
        argv = [sys.executable, "-m", "jail.probe", "--cmd-fd", str(cmd_r),
                "--reply-fd", str(reply_w), "--parent-pid", str(os.getpid()), *extra]
        argv += {"blk": ["--image", str(image)], "console": ["--console", str(console)],
                 "rng": ["--rng"]}[device]
        spec = JailSpec(device=f"{device}0", policy=device, seccomp_mode=mode, uid=JAIL_UID,
                        gid=JAIL_UID, keep_fds=[cmd_r, reply_w], **spec_kw)
        try:
            proc = spawn(spec, argv)
        finally:
            os.close(cmd_r)
            os.close(reply_w)
        child = Child(proc, cmd_w, reply_r)
        children.append(child)
        return child

    yield start
    for c in children:
        if c.proc.launcher.poll() is None:
            c.proc.kill()
        c.proc.wait(20)


def caps_zero(st: dict[str, str]) -> bool:
    return all(int(st[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))


@pytest.mark.parametrize("device", ["blk", "rng", "console"])
def test_device_workload_runs_under_its_policy(jailed: Any, device: str) -> None:
    child = jailed(device, "kill")
    for _ in range(3):
        reply = child.ask(op="work")
        assert reply is not None and all(reply.values()), reply
    assert child.close() == JailExit(code=0)


def test_credentials_seccomp_and_capabilities(jailed: Any) -> None:
    child = jailed("blk", "kill")
    st = child.status()
    assert st["Seccomp"].strip() == "2"
    assert st["NoNewPrivs"].strip() == "1"
    assert caps_zero(st), st
    assert st["Uid"].split() == [str(JAIL_UID)] * 4
    assert st["Gid"].split() == [str(JAIL_UID)] * 4
    assert st["Groups"].strip() == ""
    assert st["NSpid"].split()[-1] == "2"  # pid 2 of its own PID namespace (1 is the launcher's init)
    tids = os.listdir(f"/proc/{child.proc.pid}/task")
    assert len(tids) > 1, "zmq's I/O threads should be running"
    for tid in tids:  # TSYNC: every thread is filtered and switched to the jail uid
        t = child.status(int(tid))
        assert t["Seccomp"].strip() == "2" and t["NoNewPrivs"].strip() == "1"
        assert t["Uid"].split() == [str(JAIL_UID)] * 4
        assert caps_zero(t), (t["Name"], t["CapInh"], t["CapPrm"], t["CapEff"])  # libzmq's threads too: the switch to a non-root id cleared them
    with open(f"/proc/{child.proc.pid}/uid_map") as f:
        assert f.read().split() == ["0", str(JAIL_UID + 1), "1", "1", str(JAIL_UID), "1"]
    assert child.close().code == 0


def test_two_phase_entry_leaves_no_capability_in_any_thread(jailed: Any) -> None:
    child = jailed("blk", "kill", "--two-phase")
    assert child.ask(op="work") is not None
    tids = os.listdir(f"/proc/{child.proc.pid}/task")
    assert len(tids) > 1
    for tid in tids:
        assert caps_zero(child.status(int(tid))), tid
    assert child.close().code == 0


def test_namespaces_differ_from_ours(jailed: Any) -> None:
    child = jailed("rng", "kill")
    for ns in ("user", "mnt", "pid", "net", "ipc", "uts"):
        assert os.readlink(f"/proc/{child.proc.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert child.close().code == 0


def test_host_filesystem_is_invisible(jailed: Any, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("hi")
    child = jailed("rng", "kill", binds=[Bind(str(shared), "/data")])
    root = Path(f"/proc/{child.proc.pid}/root")
    assert sorted(os.listdir(root)) == ["data", "dev"]
    assert os.listdir(root / "dev") == ["null"]
    assert (root / "data" / "hello").read_text() == "hi"
    assert not (root / "proc").exists() and not (root / "etc").exists()
    assert child.close().code == 0


def test_rlimits_and_dumpable(jailed: Any) -> None:
    child = jailed("blk", "kill", rlimits=Rlimits(nofile=100, fsize=1 << 20))
    with open(f"/proc/{child.proc.pid}/limits") as f:
        limits = f.read()
    assert [ln.split()[3:5] for ln in limits.splitlines() if ln.startswith("Max open files")] == \
        [["100", "100"]]
    assert [ln.split()[2:4] for ln in limits.splitlines() if ln.startswith("Max processes")] == \
        [["0", "0"]]
    assert [ln.split()[4:6] for ln in limits.splitlines() if ln.startswith("Max core file size")] == \
        [["0", "0"]]
    assert [ln.split()[3:5] for ln in limits.splitlines() if ln.startswith("Max file size")] == \
        [[str(1 << 20)] * 2]
    assert child.close().code == 0


def test_not_dumpable_and_dies_with_its_launcher(jailed: Any) -> None:
    child = jailed("rng", "off")  # prctl(PR_GET_*) is not in the policy: ask without a filter
    assert child.ask(op="prctl") == {"ok": True, "dumpable": 0, "pdeathsig": signal.SIGKILL}
    os.kill(child.proc.launcher.pid, signal.SIGKILL)
    child.proc.launcher.wait(5)
    for _ in range(100):  # PR_SET_PDEATHSIG: the device follows its launcher
        if not os.path.exists(f"/proc/{child.proc.pid}"):
            break
        import time
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child.proc.pid}")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)


def test_the_pid_namespace_init_is_unprivileged_small_and_dies_with_its_launcher(jailed: Any) -> None:
    child = jailed("rng", "kill")
    launcher = child.proc.launcher.pid
    (init,) = [c for c in _children(launcher) if c != child.proc.pid]
    st = _status_of(init)
    assert st["NSpid"].split()[-1] == "1"  # the namespace's init: the device is its pid 2
    assert os.readlink(f"/proc/{init}/ns/pid") == os.readlink(f"/proc/{child.proc.pid}/ns/pid")
    assert st["Uid"].split() == [str(JAIL_UID)] * 4 and st["Gid"].split() == [str(JAIL_UID)] * 4
    assert st["Groups"].strip() == "" and st["NoNewPrivs"].strip() == "1"
    assert all(int(st[k], 16) == 0 for k in ("CapPrm", "CapEff", "CapAmb", "CapInh")), st
    with open(f"/proc/{init}/cmdline") as f:
        assert f.read().rstrip("\0") == "bulkhead-jail-init:rng0"  # its title, not its numbers
    assert len(os.listdir(f"/proc/{init}/fd")) == 1  # the pipe whose EOF says the launcher is gone
    # Forked in C, it never ran Python: it dirtied a few pages, not an interpreter's worth.
    with open(f"/proc/{init}/smaps_rollup") as f:
        rollup = {ln.split(":")[0]: ln.split()[1] for ln in f if ln[0].isupper() and ":" in ln}
    assert int(rollup["Private_Dirty"]) < 512, rollup  # KiB
    os.kill(launcher, signal.SIGKILL)
    child.proc.launcher.wait(5)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{init}") and _status_of(init)["State"][0] != "Z":
        assert time.monotonic() < deadline, "the init outlived its launcher"
        time.sleep(0.05)


VIOLATIONS = {
    "open_passwd": "openat", "socket": "socket", "execve": "execve", "ptrace": "ptrace",
    "mount": "mount", "kill_parent": "kill", "mmap_exec": "mmap", "mprotect_exec": "mprotect",
    "ioctl_kvm": "ioctl", "unshare": "unshare",
}


@pytest.mark.parametrize("what", sorted(VIOLATIONS))
def test_violation_in_trap_mode_is_named(jailed: Any, what: str) -> None:
    child = jailed("blk", "trap")
    assert child.ask(op="violate", what=what) is None, "the violation must not return"
    end = child.close()
    assert end.violation is not None and end.violation.name == VIOLATIONS[what], end
    assert str(end) == f"seccomp violation: {VIOLATIONS[what]}(2)"
    assert end.signal == signal.SIGSYS  # the reporter re-raises SIGSYS: the kernel vouches


@pytest.mark.parametrize("what", ["socket", "kill_parent", "mmap_exec", "ioctl_kvm", "thread"])
def test_violation_in_kill_mode_kills_only_the_child(jailed: Any, what: str) -> None:
    child = jailed("rng", "kill")
    assert child.ask(op="violate", what=what) is None
    end = child.close()
    assert end.signal == signal.SIGSYS and end.violation is None, end
    assert "SIGSYS" in str(end)
    # we are alive (kill_parent failed); a sibling jailed device is unaffected
    other = jailed("rng", "kill")
    assert other.ask(op="ping") == {"ok": True, "pid": 2}  # pid 1 is the namespace's init
    assert other.close().code == 0


def test_log_mode_lets_a_violation_through(jailed: Any) -> None:
    child = jailed("rng", "log")
    reply = child.ask(op="violate", what="open_passwd")
    assert reply is not None and reply["ok"] is False and reply["errno"] == "ENOENT"  # no /etc
    assert child.close().code == 0


def test_cgroup_limits_and_membership(jailed: Any) -> None:
    cg = VmCgroup.create(f"jailtest-{os.getpid()}", memory_max=512 << 20, pids_max=16,
                         cpu_quota=1.0)
    try:
        limits = cg.limits()
        assert limits["memory"] == str(512 << 20) and limits["pids"] == "16"
        child = jailed("rng", "kill", cgroup_procs=cg.procs_files())
        assert child.proc.pid in cg.pids() and child.proc.launcher.pid in cg.pids()
        assert child.close().code == 0
    finally:
        cg.remove()
    assert not any(d.exists() for d in cg.dirs.values())


def test_cgroup_remove_kills_leftovers() -> None:
    import subprocess

    with VmCgroup.create(f"jailtest-left-{os.getpid()}", pids_max=4) as cg:
        p = subprocess.Popen(["sleep", "60"])
        cg.add(p.pid)
        assert cg.pids() == {p.pid}
    assert p.wait(5) == -signal.SIGKILL
