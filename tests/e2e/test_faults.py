"""`bulkhead fault` through the real CLI, the core's control endpoint and the device processes,
while the test guest runs its block write/verify workload."""

import shutil
import tempfile
import time

import pytest

from vmm_core import control_protocol as cp
from vmm_core.cli_control import wait_for_vm
from vmm_core.control import request
from vmm_core.testing import TEST_GUEST, BackgroundVm, parse_results, run_bulkhead

pytestmark = pytest.mark.kvm

from vmm_core.testing.held import DEVICE_TIMEOUT_MS, HEARTBEAT_TIMEOUT_MS  # noqa: E402


def assert_workload_clean(results) -> None:
    ok, detail = results["blk-workload"]
    assert ok and "errors=0" in detail, detail


def test_kill_rng_and_console_leaves_blk_alone(faulty_vm):
    vm = faulty_vm("f-kill", "--allow-faults")
    blk_pid = vm.devices()["blk0"]["pid"]
    for device in ("rng0", "console0"):
        old = vm.devices()[device]["pid"]
        vm.fault(device, "kill")
        took = vm.wait_restarts(device, 1)
        assert vm.devices()[device]["pid"] != old
        print(f"{device}: serving again {took * 1000:.0f} ms after `fault kill` returned")
    assert not any(line.startswith("GK blk-workload") for line in vm.vm.stdout), \
        "the workload ended before the kills: make it longer"
    stats = vm.stats()
    results = vm.finish()
    assert_workload_clean(results)
    assert results["virtio-rng"][0] and results["virtio-console"][0], results
    assert stats["blk0"]["pid"] == blk_pid and stats["blk0"]["restarts"] == 0
    assert stats["blk0"]["failures"] == 0
    for device in ("rng0", "console0"):
        assert stats[device]["restarts"] == 1 and stats[device]["recovery_ms"]["count"] == 1
        assert "SIGKILL" in stats[device]["last_causes"][-1]


@pytest.mark.parametrize("action, restarts", [(("hang",), 1), (("slow", "2000"), 1),
                                              (("slow", "200"), 0)],
                         ids=["hang", "slow-2000", "slow-200"])
def test_hang_and_slow_blk_release_the_vcpu_and_recover(faulty_vm, action, restarts):
    vm = faulty_vm(f"f-{action[0]}", "--allow-faults")
    vm.fault("blk0", *action)
    if restarts:
        detected = vm.wait_restarts("blk0", 1)  # from the moment the CLI has sent the fault
        # Caught by whichever comes first: a vCPU read timing out, or the heartbeat (checked
        # every 250 ms); then a fresh interpreter starts.
        print(f"blk0 {' '.join(action)}: serving again {detected * 1000:.0f} ms after the fault")
        assert detected < (HEARTBEAT_TIMEOUT_MS + 250) / 1000 + 2.0
    else:
        time.sleep(0.6)
    stats = vm.stats()["blk0"]
    results = vm.finish()
    assert_workload_clean(results)
    assert stats["restarts"] == restarts, stats
    if restarts:
        assert any(c.startswith(("heartbeat timeout", "no answer")) for c in stats["last_causes"]), stats
    # A vCPU is never held longer than the device timeout, plus at most one device timeout
    # waiting for the restarted process to answer instead of returning all-ones.
    worst_ms = stats["mmio_read_us"]["max"] / 1000
    print(f"blk0 {' '.join(action)}: longest vCPU register read {worst_ms:.0f} ms")
    assert worst_ms < 2 * DEVICE_TIMEOUT_MS + 300, stats["mmio_read_us"]


def test_bad_reply_is_rejected_and_the_device_restarted(faulty_vm):
    vm = faulty_vm("f-bad", "--allow-faults")
    vm.fault("blk0", "bad-reply")
    vm.wait_restarts("blk0", 1)
    stats = vm.stats()["blk0"]
    assert "invalid answer" in stats["last_causes"][-1], stats
    assert_workload_clean(vm.finish())
    assert "Traceback" not in "".join(vm.vm.stderr)


def test_crash_in_request_restarts_and_the_request_runs_again(faulty_vm):
    vm = faulty_vm("f-crash", "--allow-faults")
    vm.fault("blk0", "crash-in-request")
    vm.wait_restarts("blk0", 1)
    # The device executed the request, then aborted before returning it on the used ring.
    assert "SIGABRT" in vm.stats()["blk0"]["last_causes"][-1]
    assert_workload_clean(vm.finish())


def test_faults_are_refused_without_allow_faults(faulty_vm):
    vm = faulty_vm("f-off", rounds=200)
    before = vm.devices()
    for action in (("kill",), ("hang",), ("slow", "100")):
        run = run_bulkhead("fault", "f-off", "blk0", *action, timeout=30)
        assert run.returncode == 2 and "--allow-faults" in run.stderr, run.explain()
        assert len(run.stderr.strip().splitlines()) == 1
    assert vm.devices() == before
    assert_workload_clean(vm.finish())
