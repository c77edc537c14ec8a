"""Per-device crash isolation through the real multi-process path and the test guest."""

import os
import signal
import time

import pytest

from vmm_core.testing import (BackgroundVm, TEST_GUEST, blk_pattern, kill_device, parse_results,
                              wait_for_device)

pytestmark = pytest.mark.kvm


def GuestProcess(*args: str) -> BackgroundVm:
    return BackgroundVm("run", "--kernel", TEST_GUEST, *args)


def test_kill_blk_20_times_during_workload_loses_nothing(tmp_path):
    sectors, rounds, seed = 128, 400, 3
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    guest = GuestProcess("--disk", str(disk), "--cmdline",
                         f"gk.tests=blk-workload gk.blk_sectors={sectors} gk.blk_rounds={rounds} "
                         f"gk.blk_seed={seed}")
    try:
        pid = wait_for_device(guest.proc.pid, "blk0")
        kills = 0
        while kills < 20 and guest.proc.poll() is None:
            time.sleep(0.1)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it was already being replaced: find the new one
                pid = wait_for_device(guest.proc.pid, "blk0", not_pid=pid)
                continue
            kills += 1
            pid = wait_for_device(guest.proc.pid, "blk0", not_pid=pid)
        assert kills == 20, "the workload ended before 20 kills: make it longer\n" + guest.explain()
        assert guest.wait(240) == 0, guest.explain()
    finally:
        guest.kill()
    results, done = parse_results("".join(guest.stdout))
    assert results["blk-workload"][0], guest.explain()
    assert "errors=0" in results["blk-workload"][1]
    stderr = "".join(guest.stderr)
    assert stderr.count("device blk0 stopped") >= 20, guest.explain()
    # The image holds exactly the last round's pattern: nothing lost, nothing torn.
    data = disk.read_bytes()
    assert data[:sectors * 512] == blk_pattern(sectors, seed + rounds - 1)
    assert data[sectors * 512:] == bytes((1 << 20) - sectors * 512)


def _kill_blk_once_during_workload(*args: str, rounds: int = 300):
    disk_args = list(args)
    guest = GuestProcess(*disk_args, "--cmdline",
                         f"gk.tests=blk-workload gk.blk_sectors=128 gk.blk_rounds={rounds} gk.io_timeout_ms=3000")
    try:
        wait_for_device(guest.proc.pid, "blk0")
        time.sleep(0.3)  # the guest has probed the device and is in its workload
        kill_device(guest.proc.pid, "blk0")
        code = guest.wait(120)
    finally:
        guest.kill()
    return code, guest


def test_stop_vm_policy_stops_with_distinct_status_naming_device(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    code, guest = _kill_blk_once_during_workload("--disk", str(disk), "--on-device-crash", "stop-vm")
    assert code == 67, guest.explain()
    last = [l for l in guest.stderr if l.startswith("bulkhead: ")][-1]
    assert "device blk0 failed" in last and "SIGKILL" in last, guest.explain()


def test_fail_policy_reports_needs_reset_to_the_guest(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    code, guest = _kill_blk_once_during_workload("--disk", f"{disk},on-crash=fail")
    results, _ = parse_results("".join(guest.stdout))
    assert code == 1, guest.explain()
    ok, detail = results["blk-workload"]
    assert not ok and "needs-reset" in detail, guest.explain()


def test_restart_budget_gives_up_into_fail(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    guest = GuestProcess("--disk", str(disk), "--max-restarts", "2", "--cmdline",
                         "gk.tests=blk-workload gk.blk_sectors=128 gk.blk_rounds=1000 gk.io_timeout_ms=3000")
    try:
        pid = wait_for_device(guest.proc.pid, "blk0")
        pid = None
        for _ in range(3):
            time.sleep(0.3)
            pid = kill_device(guest.proc.pid, "blk0", not_pid=pid)
        code = guest.wait(120)
    finally:
        guest.kill()
    stderr = "".join(guest.stderr)
    assert code == 1, guest.explain()
    assert "giving up restarts" in stderr, guest.explain()
    assert "needs-reset" in parse_results("".join(guest.stdout))[0]["blk-workload"][1]


def test_crash_loop_backs_off_but_a_serving_device_restarts_at_once(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    guest = GuestProcess("--disk", str(disk), "--cmdline",
                         "gk.tests=blk-workload gk.blk_sectors=128 gk.blk_rounds=600")
    try:
        pid = wait_for_device(guest.proc.pid, "blk0")
        time.sleep(0.3)
        pid = kill_device(guest.proc.pid, "blk0", not_pid=None)  # after serving: no back-off
        for _ in range(4):  # each new process dies at once: a crash loop
            pid = kill_device(guest.proc.pid, "blk0", not_pid=pid)
        assert guest.wait(120) == 0, guest.explain()
    finally:
        guest.kill()
    stderr = "".join(guest.stderr)
    assert "crash-looping" in stderr, guest.explain()
    assert "errors=0" in parse_results("".join(guest.stdout))[0]["blk-workload"][1]
