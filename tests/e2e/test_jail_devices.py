"""The real device processes, jailed by default: what the host sees of them, and what they cannot do.

Two levels: the real `bulkhead run` with blk, rng and console (every device process inspected
through /proc while the guest holds), and single device processes started with the core's own
`start_device` (no VM) that are told to attempt a forbidden call through the `syscall` fault.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmm_core.testing.process import DeviceLab

from vmm_core.testing.jail_learn import SeccompAudit, learn_device, merge, to_toml
from jail.options import VM_ID_BASE, JailOptions
from vmm_core.testing.workload import device_harness, run_workload
from ipc_protocol import messages as m
from ipc_protocol.transport.shm_ring import make_eventfd
from vmm_core.devices.spawn import DeviceFds, DeviceProcess, DeviceStartError, start_device
from vmm_core.testing import TEST_GUEST, BackgroundVm, device_pids

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

VIRTIO_TESTS = "virtio-blk,virtio-rng,virtio-console"
# Fault name -> the syscall a trap-mode report must name.
FORBIDDEN = {"open_passwd": "openat", "socket": "socket", "execve": "execve", "ptrace": "ptrace",
             "mount": "mount", "kill_core": "kill", "mmap_exec": "mmap", "ioctl_kvm": "ioctl"}
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts")


def proc_status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)


def assert_jailed(pid: int, core_pid: int) -> None:
    """Seccomp filter, no_new_privs, no capability in any thread, own namespaces, empty root."""
    tids = os.listdir(f"/proc/{pid}/task")
    assert len(tids) > 1, "libzmq's threads should be running"
    for tid in tids:
        st = proc_status(f"{pid}/task/{tid}")
        assert st["Seccomp"].strip() == "2", (tid, st["Seccomp"])
        assert st["NoNewPrivs"].strip() == "1", tid
        # libzmq's threads too: the jail's final switch to a non-root id cleared every set.
        for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
            assert int(st[cap], 16) == 0, (tid, cap, st[cap])
    st = proc_status(pid)
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[cap], 16) == 0, (cap, st[cap])  # the main thread serves guest data
    uids = {int(u) for u in st["Uid"].split()}
    assert len(uids) == 1 and uids.pop() >= VM_ID_BASE, st["Uid"]
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/{core_pid}/ns/{ns}"), ns
    root = os.listdir(f"/proc/{pid}/root")
    assert root == ["dev"], root  # a tmpfs with /dev/null: no /etc, /proc, /home, no images
    assert os.listdir(f"/proc/{pid}/root/dev") == ["null"]


@pytest.mark.kvm
def test_bulkhead_run_jails_every_device_and_the_guest_passes(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    console = tmp_path / "console.txt"
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", str(disk), "--rng", "--console",
                      str(console), "--hold", "--cmdline", f"gk.tests={VIRTIO_TESTS}")
    try:
        deadline = time.monotonic() + 120
        while not any(ln.startswith("GK done") for ln in vm.stdout):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
            time.sleep(0.1)
        results, done = vm.results()
        assert done == (3, 3), vm.explain()
        pids = device_pids(vm.pid)
        assert set(pids) == {"blk0", "rng0", "console0"}, pids
        for name, pid in pids.items():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f.read().startswith(f"bulkhead-dev:{name}".encode())
            assert_jailed(pid, vm.pid)
        uids = {proc_status(pid)["Uid"].split()[0] for pid in pids.values()}
        assert len(uids) == 1, uids  # one uid per VM
        assert console.read_text() == "hello from guest_kit console\n"
        vm.proc.send_signal(signal.SIGTERM)
        assert vm.wait(30) == 143, vm.explain()
    finally:
        vm.kill()


class Devices(DeviceLab):
    """Starts real, jailed device processes with their image or output file under `tmp_path`."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tag="jail")
        self.tmp_path = tmp_path

    def start(self, name: str = "blk0", mode: str = "kill", **jail: Any) -> DeviceProcess:  # type: ignore[override]
        kind = name.rstrip("0123456789")
        spec: dict[str, Any] = {"type": kind}
        if kind == "blk":
            image = self.tmp_path / f"{name}.img"
            image.write_bytes(b"\0" * 65536)
            spec["path"] = str(image)
        elif kind == "console":
            spec["path"] = str(self.tmp_path / f"{name}.txt")
        return super().start(name, spec, allow_faults=True, jail={"seccomp": mode, **jail})

    def ask(self, proc: DeviceProcess, message: m.Message, timeout: float = 2.0) -> m.Message | None:
        return self.request(proc, message, timeout)


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Devices]:
    d = Devices(tmp_path)
    yield d
    d.close()


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_forbidden_call_kills_only_that_device(devices: Devices, what: str) -> None:
    victim = devices.start("blk0")
    bystander = devices.start("rng0")
    assert_jailed(victim.pid, os.getpid())
    devices.control.send(victim.identity, m.Fault("syscall", {"name": what}))
    assert victim.popen.wait(10) == -signal.SIGSYS, victim.popen.describe()
    assert "SIGSYS" in (victim.seccomp_report or "")
    assert devices.ask(bystander, m.Heartbeat(5)) == m.HeartbeatAck(5)  # the other device lives


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_trap_mode_names_the_forbidden_syscall(devices: Devices, what: str) -> None:
    proc = devices.start("blk0", mode="trap")
    devices.control.send(proc.identity, m.Fault("syscall", {"name": what}))
    assert proc.popen.wait(10) == -signal.SIGSYS, proc.popen.describe()
    # What the supervisor logs: "device blk0 stopped: seccomp violation: socket(2)".
    assert proc.seccomp_report == f"{FORBIDDEN[what]}(2)"


@pytest.mark.parametrize("what, denied", [("open_passwd", "No such file"),  # no host filesystem
                                          ("kill_core", "No such process"),  # core not in our pid ns
                                          ("mount", "Operation not permitted"),  # no capability
                                          ("execve", "No such file")])  # nothing to execute
def test_log_mode_the_other_walls_still_stand(devices: Devices, what: str, denied: str) -> None:
    proc = devices.start("rng0", mode="log")
    reply = devices.ask(proc, m.Fault("syscall", {"name": what}))
    assert isinstance(reply, m.ErrorReport) and "survived" in reply.text, reply
    assert denied in reply.text or what == "mount" and "-1" in reply.text, reply.text
    assert devices.ask(proc, m.Heartbeat(1)) == m.HeartbeatAck(1)


def test_jail_error_is_a_one_line_start_error(devices: Devices) -> None:
    # Raising RLIMIT_NOFILE above the hard limit needs a capability the device no longer has.
    with pytest.raises(DeviceStartError) as info:
        devices.start("rng0", nofile=1 << 30)
    text = str(info.value)
    assert "jail-error" in text and "setrlimit" in text and "\n" not in text, text


def test_bad_jail_option_is_a_start_error(devices: Devices) -> None:
    with pytest.raises(DeviceStartError, match="seccomp mode 'strict'"):
        devices.start("rng0", mode="strict")
    with pytest.raises(DeviceStartError, match="unknown jail option"):
        devices.start("rng0", colour="red")


def test_unjailed_path_stays_available(devices: Devices) -> None:
    proc = start_device(devices.control, "rng0", {"type": "rng"}, devices.memory,
                        DeviceFds(devices.memory.fd, make_eventfd(), [make_eventfd()]), jail=False)
    devices.procs.append(proc)
    assert not proc.jailed and proc.popen.pid == proc.pid
    assert proc_status(proc.pid)["Seccomp"].strip() == "0"


def test_blk_file_size_limit_is_the_image_size(devices: Devices) -> None:
    proc = devices.start("blk0")
    with open(f"/proc/{proc.pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max file size"))
    assert line.split()[3] == "65536", line
    assert JailOptions().spec_for("rng0", "rng").rlimits.fsize is None


@pytest.mark.parametrize("device", ["blk", "rng", "console"])
def test_real_workload_passes_jailed_in_kill_mode(device: str) -> None:
    with device_harness(device, jail=True) as h:
        assert h.proc.jailed
        checks = run_workload(h)
        assert all(checks.values()), checks
    assert h.proc.popen.returncode == 0, h.proc.popen.describe()


@pytest.mark.parametrize("device", ["blk", "rng"])
def test_learned_policy_lets_the_device_pass_the_workload(device: str, tmp_path: Path) -> None:
    """A policy learned from the device's own runs (three, merged: one run can miss a syscall
    that only timing brings, such as a malloc trim's madvise) lets it pass the workload under
    kill_process; if not, the kernel's audit log names what was refused."""
    observed = merge(*(learn_device(device, rounds=2) for _ in range(3)))
    assert {"sendto", "recvfrom"} <= set(observed), sorted(observed)
    # blk writes through the C loop (pwritev) or os.pwritev (pwritev2)
    assert {"blk": {"pwritev", "pwritev2"}, "rng": {"getrandom"}}[device] & set(observed)
    learned = tmp_path / f"{device}-learned.toml"
    learned.write_text('[policy]\ndefault_action = "kill_process"\n'
                       + to_toml(observed).replace('why = ""', 'why = "learned"'))
    audit = SeccompAudit()
    try:
        with device_harness(device, jail={"policy": str(learned)}) as h:
            checks = run_workload(h)
            assert all(checks.values()), (checks, h.proc.popen.poll(), h.proc.seccomp_report)
    except Exception as err:
        raise AssertionError(f"under the learned policy: {err!r}; seccomp kills: {audit.kills()}") from err


def test_devices_are_born_in_the_vms_cgroup(devices: Devices) -> None:
    from jail.cgroup import VmCgroup

    with VmCgroup.create(f"jaildev-{os.getpid()}", memory_max=256 << 20, pids_max=32) as cg:
        proc = devices.start("rng0", cgroup_procs=list(cg.procs_files()))
        assert {proc.pid, proc.popen.pid} <= cg.pids()
        assert devices.ask(proc, m.Heartbeat(3)) == m.HeartbeatAck(3)
        assert proc.shutdown(devices.control) == 0


@pytest.mark.kvm
def test_supervisor_names_the_syscall_in_trap_mode(tmp_path: Path, caplog: Any) -> None:
    """The whole path in one VM: trap mode through `spawn_options`, the device's violation, the
    supervisor's log line and the stop-vm message.  (The CLI flag is the lead's to wire.)"""
    import threading

    from vmm_core.devices.manager import parse_disk
    from vmm_core.vm import Machine, VmConfig

    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    config = VmConfig(kernel=TEST_GUEST, cmdline="gk.tests=virtio-blk gk.hold=1",
                      serial=str(tmp_path / "serial.txt"), devices=[parse_disk(str(disk), 0)],
                      device_options={"on_device_crash": "stop-vm", "allow_faults": True,
                                      "spawn_options": {"jail": {"seccomp": "trap"}}})
    machine = Machine(config)

    def violate() -> None:
        deadline = time.monotonic() + 60
        while "GK done" not in (tmp_path / "serial.txt").read_text(errors="replace"):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        backend = machine.devices.find("blk0").backend
        machine.devices.supervisor.control.send(backend.proc.identity,
                                                m.Fault("syscall", {"name": "socket"}))

    threading.Thread(target=violate, daemon=True).start()
    try:
        with caplog.at_level("ERROR"):
            stop = machine.run(timeout=90)
    finally:
        machine.close()
    assert "device blk0 stopped: seccomp violation: socket(2)" in caplog.text, caplog.text
    assert stop.exit_status == 67 and "seccomp violation: socket(2)" in (stop.message or ""), stop


@pytest.mark.kvm
def test_a_device_not_ready_within_the_start_timeout_fails_with_the_flag_named() -> None:
    """--device-start-timeout bounds spawn -> Ready; missing it is one line naming the flag."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "vmm_core.cli", "run", "--kernel", str(TEST_GUEST),
                           "--rng", "--cmdline", "gk.tests=virtio-rng", "--timeout", "20",
                           "--device-start-timeout", "0.001"],
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "rng0 sent no Hello within 0.001 s" in lines[0] and "--device-start-timeout" in lines[0]


@pytest.mark.kvm
def test_a_hello_that_arrives_before_its_spawn_comes_back_is_kept(tmp_path: Path, monkeypatch: Any) -> None:
    """The spawner thread posts a spawn's result; the device's Hello can reach the supervisor
    first.  It used to be dropped as a stale incarnation's (no Hello within 10 s, ~1 VM in 20
    under `bulkhead up`); here every spawn result comes back 0.5 s late, so every Hello is early."""
    from vmm_core.devices import supervisor as sup
    from vmm_core.devices.manager import parse_disk
    from vmm_core.testing import parse_results
    from vmm_core.vm import Machine, VmConfig

    post = sup.Supervisor.post

    def late_post(self: Any, fn: Any) -> None:
        if "_spawn.<locals>.job" in getattr(fn, "__qualname__", ""):
            time.sleep(0.5)
        post(self, fn)

    monkeypatch.setattr(sup.Supervisor, "post", late_post)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    config = VmConfig(kernel=TEST_GUEST, cmdline="gk.tests=virtio-blk",
                      serial=str(tmp_path / "serial.txt"), devices=[parse_disk(str(disk), 0)])
    machine = Machine(config)
    try:
        stop = machine.run(timeout=60)
    finally:
        machine.close()
    serial = (tmp_path / "serial.txt").read_text(errors="replace")
    results, done = parse_results(serial)
    assert stop.exit_status == 0 and done and results["virtio-blk"][0], (stop, serial[-2000:])
