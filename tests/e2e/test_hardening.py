"""Regression tests for the adversarial review (issue 9): each attack as the reviewer made it,
through the real processes — the CLI, the core, jailed device processes, the guest's workload.
(Finding 1, the jail start failure that signalled pid -1, is `tests/jail/test_jail_start_failure.py`.)
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from vmm_core import control_protocol as cp
from vmm_core.control import request

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(180)]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def assert_workload_clean(results) -> None:
    ok, detail = results["blk-workload"]
    assert ok and "errors=0" in detail, detail


def test_full_request_doorbell_does_not_kill_the_vcpu(faulty_vm) -> None:
    """Finding 2: the device raised its request-doorbell eventfd to the maximum and stopped
    reading it; the core's next doorbell write raised BlockingIOError in a vCPU (exit 66)."""
    vm = faulty_vm("h-doorbell", "--allow-faults", rounds=60)
    vm.fault("blk0", "fill-doorbell")
    results = vm.finish()  # the VM exits 0: no vCPU died
    assert_workload_clean(results)


def test_control_frame_flood_leaves_the_core_flat(faulty_vm) -> None:
    """Finding 3: raw ZMTP frames all marked "more" made the core buffer 530 MB per device.
    Now the device's launcher relays its channel and dies of the flood instead."""
    vm = faulty_vm("h-frames", "--allow-faults")
    core = vm.vm.pid
    before = rss_mib(core)
    vm.fault("blk0", "flood-frames")  # 512 MiB of never-ending frames
    vm.wait_restarts("blk0", 1, timeout=60)
    grown = rss_mib(core) - before
    assert grown < 40, f"the core grew by {grown:.0f} MiB under the flood"
    results = vm.finish()
    assert_workload_clean(results)


def test_valid_message_flood_fails_the_device_not_the_supervisor(faulty_vm) -> None:
    """Finding 7: ~50 k valid HeartbeatAcks a second pinned the supervisor, so a SIGKILLed
    device stayed "running" for the whole flood."""
    vm = faulty_vm("h-acks", "--allow-faults")
    t0 = time.monotonic()
    vm.fault("blk0", "flood-acks")
    vm.wait_restarts("blk0", 1, timeout=10)
    took = time.monotonic() - t0
    causes = vm.stats()["blk0"]["last_causes"]
    assert any("control message flood" in c for c in causes), causes
    vm.fault("rng0", "kill")  # the supervisor still sees other devices' deaths at once
    vm.wait_restarts("rng0", 1, timeout=5)
    assert took < 8, took
    assert_workload_clean(vm.finish())


def test_restart_uses_the_image_opened_at_start_not_the_path(faulty_vm, tmp_path) -> None:
    """Finding 4: a restart reopened the disk by path, as root, following a symlink a tenant
    could swap in; now the core keeps the fd it opened (O_NOFOLLOW) for every restart."""
    vm = faulty_vm("h-swap", "--allow-faults")
    secret = tmp_path / "root-only.txt"
    secret.write_bytes(b"S" * 4096)
    os.chmod(secret, 0o600)
    original = tmp_path / "original.img"
    os.rename(vm.disk, original)       # the tenant moves the image away ...
    os.symlink(secret, vm.disk)        # ... and puts a symlink to a root-only file in its place
    vm.fault("blk0", "kill")
    vm.wait_restarts("blk0", 1)
    assert_workload_clean(vm.finish())
    assert secret.read_bytes() == b"S" * 4096  # untouched
    assert original.read_bytes() != bytes(1 << 20)  # the workload wrote the real image


def test_devices_get_dev_null_for_stdio(faulty_vm) -> None:
    """Finding 5: devices inherited the core's terminal and log file."""
    vm = faulty_vm("h-stdio", "--allow-faults")
    null = os.stat("/dev/null").st_rdev
    for d in request(vm.name, cp.Ps())["devices"]:
        for std in (0, 1, 2):  # the jail's /dev/null (a bind of the host's: same device number)
            st = os.stat(f"/proc/{d['pid']}/fd/{std}")
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == null, (d["name"], std)
    assert_workload_clean(vm.finish())


def test_user_owned_0644_image_works(tmp_path) -> None:
    """Finding 4: the device reopened a user's 0644 image as host uid 0 without override rights."""
    from vmm_core.testing import TEST_GUEST, run_bulkhead
    img = tmp_path / "user.img"
    img.write_bytes(bytes(1 << 20))
    os.chown(img, 65534, 65534)
    os.chmod(img, 0o644)
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--disk", str(img),
                       "--cmdline", "gk.tests=virtio-blk")
    assert run.returncode == 0 and run.results["virtio-blk"][0], run.explain()
    assert stat.S_IMODE(os.stat(img).st_mode) == 0o644


def test_device_over_its_memory_limit_is_restarted_with_that_cause(faulty_vm) -> None:
    """Finding 6: a device grew to 4.2 GB resident and kept answering heartbeats."""
    # A long heartbeat timeout: on a loaded host the growth itself can outlast 500 ms of
    # silence before the limit is reached, and this test is about the limit.
    vm = faulty_vm("h-mem", "--allow-faults", "--device-memory-mib", "96",
                   "--heartbeat-timeout-ms", "5000")
    assert vm.stats()["blk0"]["limits"]["memory"] == str(96 << 20)
    vm.fault("blk0", "grow-memory")
    vm.wait_restarts("blk0", 1, timeout=30)
    causes = vm.stats()["blk0"]["last_causes"]
    assert any(c.startswith("memory limit (96 MiB)") for c in causes), causes
    assert_workload_clean(vm.finish())


def test_spinning_device_is_held_to_its_cpu_quota(faulty_vm) -> None:
    """Finding 6: a device spun at 99.8 % CPU; with a quota the kernel throttles it, counted."""
    vm = faulty_vm("h-cpu", "--allow-faults", "--device-cpu-quota", "0.2")
    vm.fault("rng0", "spin", "1500")
    deadline = time.monotonic() + 10
    while vm.stats()["rng0"]["cpu_throttled"] == 0:
        assert time.monotonic() < deadline, vm.stats()["rng0"]
        time.sleep(0.2)
    assert_workload_clean(vm.finish())
