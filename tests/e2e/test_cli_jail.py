"""The jail flags of `bulkhead run`, end to end: --seccomp trap names the syscall, --no-jail opts
out (debugging), default is jailed."""

import os
import time

import pytest

from vmm_core.testing import TEST_GUEST, BackgroundVm, device_pids, run_bulkhead

pytestmark = [pytest.mark.kvm, pytest.mark.root]


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def held_vm(*args: str) -> BackgroundVm:
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--rng", "--hold", "--cmdline", "gk.tests=virtio-rng", *args)
    deadline = time.monotonic() + 60
    while not any(l.startswith("GK done") for l in vm.stdout):
        assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
        time.sleep(0.05)
    return vm


def test_trap_mode_names_the_syscall_and_the_device_restarts():
    name = f"trap{os.getpid()}"
    vm = held_vm("--name", name, "--seccomp", "trap", "--allow-faults")
    try:
        before = device_pids(vm.pid)["rng0"]
        assert status(before)["Seccomp"].strip() == "2"
        fault = run_bulkhead("fault", name, "rng0", "seccomp")
        assert fault.returncode == 0, fault.explain()
        deadline = time.monotonic() + 10
        while device_pids(vm.pid).get("rng0") in (None, before):
            assert time.monotonic() < deadline, vm.explain()
            time.sleep(0.05)
        stop = run_bulkhead("stop", name)
        assert stop.returncode == 0, stop.explain()
        assert vm.wait(30) == 0
    finally:
        vm.kill()
    assert "device rng0 stopped: seccomp violation: socket(2)" in "".join(vm.stderr), vm.explain()


def test_no_jail_runs_devices_unconfined():
    vm = held_vm("--no-jail")
    try:
        pid = device_pids(vm.pid)["rng0"]
        assert status(pid)["Seccomp"].strip() == "0"
        assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{vm.pid}/ns/mnt")
    finally:
        vm.kill()


@pytest.mark.parametrize("method", ["zygote", "exec"])
def test_both_spawn_methods_give_jailed_working_devices(method):
    vm = held_vm("--spawn-method", method)
    try:
        pid = device_pids(vm.pid)["rng0"]
        assert status(pid)["Seccomp"].strip() == "2"
        assert status(pid)["CapEff"].strip() == "0000000000000000"
    finally:
        vm.kill()
    assert vm.results()[0]["virtio-rng"][0], vm.explain()
