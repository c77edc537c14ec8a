"""The device zygote: devices forked from it are jailed exactly like exec'd ones, restarts go
through it, its death is survived, and it never outlives its core.

Timings are printed (`-s`), never asserted: the figures belong to `benchmarks/recovery.py`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmm_core.testing.process import DeviceLab

from ipc_protocol import messages as m
from vmm_core.devices.spawn import DeviceProcess
from vmm_core.devices.zygote import Zygote
from vmm_core.testing import ROOT, TEST_GUEST, BackgroundVm, device_pids

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts")


def proc_status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)


def ppid(pid: int) -> int:
    return int(proc_status(pid)["PPid"])


def title(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].strip()


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent counts as gone)."""
    try:
        return proc_status(pid)["State"].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it vanished while being read
        return True


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def zygotes_of(core_pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if title(int(entry)) == b"bulkhead-zygote" and ppid(int(entry)) == core_pid:
                    out.append(int(entry))
            except (OSError, KeyError, ValueError):
                continue
    return out


def assert_jailed_like_exec(pid: int) -> None:
    """What `test_jail_devices.assert_jailed` checks of an exec'd device, for a forked one."""
    st = proc_status(pid)
    assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1", st
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[cap], 16) == 0, (cap, st[cap])
    for tid in os.listdir(f"/proc/{pid}/task"):  # libzmq's threads too
        tst = proc_status(f"{pid}/task/{tid}")
        assert tst["Seccomp"].strip() == "2" and int(tst["CapBnd"], 16) == 0, tid
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert st["NSpid"].split()[-1] == "2", st["NSpid"]  # pid 2 under a capability-less init
    assert os.listdir(f"/proc/{pid}/root") == ["dev"]


class Devices(DeviceLab):
    """Starts generations of an rng device sharing one irqfd and kick eventfd."""

    def __init__(self) -> None:
        super().__init__(tag="zyg")
        self.irqfd, kicks = self.eventfds("rng")
        self.kick = kicks[0]
        self.generation = 0

    def start(self, **kwargs: Any) -> DeviceProcess:  # type: ignore[override]
        self.generation += 1
        return super().start("rng0", {"type": "rng"}, irqfd=self.irqfd, kicks=[self.kick],
                             generation=self.generation, allow_faults=True, **kwargs)

    def alive(self, proc: DeviceProcess, seq: int = 1) -> bool:
        return self.request(proc, m.Heartbeat(seq)) == m.HeartbeatAck(seq)


@pytest.fixture
def devices() -> Iterator[Devices]:
    d = Devices()
    yield d
    d.close()


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


def test_forked_device_is_jailed_exactly_like_an_execd_one(devices: Devices, zygote: Zygote) -> None:
    proc = devices.start(zygote=zygote)
    assert proc.spawn_method == "zygote" and proc.jailed
    assert title(proc.pid) == b"bulkhead-dev:rng0"
    assert_jailed_like_exec(proc.pid)
    # core -> zygote -> launcher (bulkhead-jail:rng0) -> device
    launcher = ppid(proc.pid)
    assert launcher == proc.popen.pid and title(launcher) == b"bulkhead-jail:rng0"
    assert ppid(launcher) == zygote.pid and ppid(zygote.pid) == os.getpid()
    assert title(zygote.pid) == b"bulkhead-zygote"
    assert os.listdir(f"/proc/{zygote.pid}/task") == [str(zygote.pid)]  # single-threaded
    assert devices.alive(proc)
    execd = devices.start(spawn_method="exec")
    assert execd.spawn_method == "exec" and ppid(ppid(execd.pid)) == os.getpid()
    assert_jailed_like_exec(execd.pid)
    assert proc_status(proc.pid)["Uid"] == proc_status(execd.pid)["Uid"]  # the VM's one uid
    assert devices.stop(proc) == 0 and devices.stop(execd) == 0


def test_popen_contract_and_trap_report_through_the_zygote(devices: Devices, zygote: Zygote) -> None:
    proc = devices.start(zygote=zygote, jail={"seccomp": "trap"})
    assert proc.popen.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.popen.wait(0.05)
    devices.control.send(proc.identity, m.Fault("syscall", {"name": "socket"}))
    assert proc.popen.wait(10) == -signal.SIGSYS, proc.popen.describe()
    assert proc.seccomp_report == "socket(2)"
    killed = devices.start(zygote=zygote)
    killed.kill()
    assert killed.popen.wait(10) == -signal.SIGKILL and killed.popen.poll() == -signal.SIGKILL
    crashed = devices.start(zygote=zygote)
    devices.control.send(crashed.identity, m.Fault("exit", {"code": 7}))
    assert crashed.popen.wait(10) == 7


def test_restart_cycle_through_the_zygote(devices: Devices, zygote: Zygote) -> None:
    """Kill and start again, the supervisor's way; timings printed for the curious."""
    times = {"zygote": [], "exec": []}
    for method in ("zygote", "exec") * 3:
        t0 = time.perf_counter()
        proc = devices.start(zygote=zygote, spawn_method=method)
        times[method].append((time.perf_counter() - t0) * 1000)
        assert proc.spawn_method == method and devices.alive(proc)
        proc.kill()
        assert proc.popen.wait(10) == -signal.SIGKILL
        devices.control.forget(proc.identity)
        proc.close()
        devices.procs.remove(proc)
    print({k: [round(v) for v in vs] for k, vs in times.items()})
    assert zygote.starts == 1 and zygote.alive()


def test_zygote_death_is_survived(devices: Devices, zygote: Zygote,
                                  caplog: pytest.LogCaptureFixture) -> None:
    running = devices.start(zygote=zygote)
    first = zygote.pid
    os.kill(first, signal.SIGKILL)
    assert wait_gone(first)
    # The running device lives on: its launcher follows the core, not the zygote.
    assert devices.alive(running, 2) and running.popen.poll() is None
    with caplog.at_level(logging.WARNING, logger="vmm_core.devices.zygote"):
        again = devices.start(zygote=zygote)
    assert again.spawn_method == "zygote" and zygote.pid != first and zygote.starts == 2
    assert "is gone" in caplog.text, caplog.text
    assert devices.alive(again) and devices.alive(running, 3)


def test_closed_zygote_falls_back_to_a_fresh_interpreter(devices: Devices,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    zygote = Zygote()
    zygote.close()
    with caplog.at_level(logging.WARNING, logger="vmm_core.devices.spawn"):
        proc = devices.start(zygote=zygote)
    assert proc.spawn_method == "exec" and devices.alive(proc)
    assert "fresh interpreter" in caplog.text, caplog.text


PARENT_SCRIPT = """
import os, sys, time
from vmm_core.memory import GuestMemory, create_guest_memory
from vmm_core.devices.spawn import DeviceFds, spawn_device
from vmm_core.devices.zygote import default_zygote
from ipc_protocol.transport.shm_ring import make_eventfd
mem = create_guest_memory(1 << 20)
proc = spawn_device("rng9", "rng", control_endpoint=sys.argv[1], spawn_method="zygote",
                    fds=DeviceFds(mem.fd, make_eventfd(), [make_eventfd()]))
print(proc.pid, proc.popen.pid, default_zygote().pid, flush=True)
time.sleep(60)
"""


def test_nothing_outlives_the_core(devices: Devices) -> None:
    core = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, devices.control.endpoint],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    pids = [int(p) for p in core.stdout.readline().split()]
    devices.control.recv(10.0, peer=b"rng9.1")  # its Hello: the device is up and armed
    core.kill()
    core.wait()
    core.stdout.close()
    left = [pid for pid in pids if not wait_gone(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"outlived their core: {left}"


@pytest.mark.kvm
def test_vm_restarts_through_its_zygote_and_survives_its_death(tmp_path: Path) -> None:
    from vmm_core import control_protocol as cp
    from vmm_core.cli_control import wait_for_vm
    from vmm_core.control import request

    name = f"zyg{os.getpid()}"
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--rng", "--hold", "--allow-faults",
                      "--name", name, "--cmdline", "gk.tests=virtio-rng")

    def restart_rng() -> tuple[int, float]:
        old = {d["name"]: d for d in request(name, cp.Ps())["devices"]}["rng0"]["pid"]
        t0 = time.perf_counter()
        request(name, cp.InjectFault("rng0", "kill"))
        while True:
            d = {d["name"]: d for d in request(name, cp.Ps())["devices"]}["rng0"]
            if d["pid"] != old and d["state"] == "running":
                return d["pid"], (time.perf_counter() - t0) * 1000
            assert time.perf_counter() - t0 < 20, vm.explain()
            time.sleep(0.005)

    zygotes: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not any(ln.startswith("GK done") for ln in vm.stdout):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
            time.sleep(0.05)
        wait_for_vm(name)
        zygotes = zygotes_of(vm.pid)
        assert len(zygotes) == 1, zygotes
        assert device_pids(vm.pid)["rng0"] == request(name, cp.Ps())["devices"][0]["pid"]
        pid, took = restart_rng()
        assert device_pids(vm.pid) == {"rng0": pid}
        assert ppid(ppid(pid)) == zygotes[0]  # restarted through the zygote
        assert_jailed_like_exec(pid)
        print(f"restart through the zygote: {took:.1f} ms")

        os.kill(zygotes[0], signal.SIGKILL)
        assert wait_gone(zygotes[0])
        assert device_pids(vm.pid) == {}  # its launcher was re-parented; the device still runs
        assert request(name, cp.Ps())["devices"][0]["state"] == "running"
        pid, took = restart_rng()  # the core notices the dead zygote and starts a new one
        zygotes += [z for z in zygotes_of(vm.pid) if z not in zygotes]
        assert len(zygotes) == 2 and ppid(ppid(pid)) == zygotes[1], zygotes
        print(f"restart with a new zygote: {took:.1f} ms")
        request(name, cp.Stop())
        assert vm.wait(30) == 0, vm.explain()
    finally:
        vm.kill()
    assert "device zygote" in "".join(vm.stderr) and "is gone" in "".join(vm.stderr), vm.explain()
    assert all(wait_gone(z) for z in zygotes), "a zygote outlived its VM"
    assert device_pids(vm.pid) == {}


@pytest.mark.kvm
def test_the_prestarted_zygote_serves_the_vm_from_its_cgroup_and_devices_start_together(
        tmp_path: Path) -> None:
    """`bulkhead run` starts the zygote before its own imports; the supervisor takes that one
    (one zygote, the core's child) and moves it into the VM's cgroup beside the core; the four
    devices start at once and the core logs when all serve."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vm = BackgroundVm("run", "-v", "--kernel", TEST_GUEST, "--hold", "--disk", str(disk), "--rng",
                      "--console", str(tmp_path / "c.txt"), "--vsock", f"cid=4100,socket={tmp_path}/v.sock",
                      "--cmdline", "gk.tests=virtio-rng,virtio-blk")
    try:
        deadline = time.monotonic() + 60
        while not any(ln.startswith("GK done") for ln in vm.stdout):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
            time.sleep(0.05)
        assert any(ln.startswith("GK done 2/2") for ln in vm.stdout), vm.explain()
        assert any("devices ready: 4 in " in ln for ln in vm.stderr), vm.explain()
        [zygote] = zygotes_of(vm.pid)
        with open(f"/proc/{vm.pid}/cgroup") as f:
            core_cgroups = f.read()
        with open(f"/proc/{zygote}/cgroup") as f:
            assert f.read() == core_cgroups
        assert "/bulkhead/" in core_cgroups, core_cgroups  # the VM's, not the one it started in
        assert sorted(device_pids(vm.pid)) == ["blk0", "console0", "rng0", "vsock0"]
    finally:
        vm.kill()


@pytest.mark.kvm
def test_a_usage_error_after_the_prestart_leaves_no_zygote(tmp_path: Path) -> None:
    """argv looked like a VM with devices, so the zygote was started before parsing; the parser
    then refuses a flag (exit 2, one line) and the zygote goes with the process."""
    proc = subprocess.run([sys.executable, "-m", "vmm_core.cli", "run", "--kernel", TEST_GUEST,
                           "--rng", "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--bogus" in proc.stderr, proc.stderr
    still = [p for p in os.listdir("/proc") if p.isdigit() and _is_orphan_zygote(int(p))]
    assert not still, still


def _is_orphan_zygote(pid: int) -> bool:
    try:
        return title(pid) == b"bulkhead-zygote" and ppid(pid) == 1 and not gone(pid)
    except (OSError, KeyError, ValueError):
        return False
