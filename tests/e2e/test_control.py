"""The VM control endpoint through the real CLI: `bulkhead ps|stats|stop` against a running VM."""

import json
import os
import shutil
import tempfile
import time

import pytest

from vmm_core import control_protocol as cp
from vmm_core import registry
from vmm_core.cli_control import wait_for_vm
from vmm_core.control import request
from vmm_core.testing import TEST_GUEST, BackgroundVm, device_pids, run_bulkhead

pytestmark = pytest.mark.kvm

VIRTIO_TESTS = "virtio-blk,virtio-rng,virtio-console"


def wait_for_line(vm: BackgroundVm, prefix: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in vm.stdout):
        assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
        time.sleep(0.02)


def start_held_vm(tmp_path, name: str, *extra: str, disk_keys: str = "") -> BackgroundVm:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", f"path={disk}{disk_keys}", "--rng",
                      "--console", str(tmp_path / "console.txt"), "--hold", "--name", name,
                      *extra, "--cmdline", f"gk.tests={VIRTIO_TESTS}")
    wait_for_line(vm, "GK done")
    wait_for_vm(name)
    return vm


def test_ps_stats_stop_against_a_running_vm(tmp_path, private_registry):
    vm = start_held_vm(tmp_path, "ctl1")
    try:
        ps = run_bulkhead("ps", "--json")
        assert ps.returncode == 0, ps.explain()
        [row] = json.loads(ps.stdout)
        assert row["name"] == "ctl1" and row["pid"] == vm.pid
        devices = {d["name"]: d for d in row["devices"]}
        assert set(devices) == {"blk0", "rng0", "console0"}
        assert {n: d["pid"] for n, d in devices.items()} == device_pids(vm.pid)
        for d in devices.values():
            assert d["state"] == "running" and d["restarts"] == 0 and d["policy"] == "restart"
        table = run_bulkhead("ps")
        assert table.returncode == 0 and "ctl1" in table.stdout and "console0" in table.stdout

        stats = run_bulkhead("stats", "ctl1", "--json")
        assert stats.returncode == 0, stats.explain()
        body = json.loads(stats.stdout)
        per = {d["name"]: d for d in body["devices"]}
        for name in ("blk0", "rng0", "console0"):
            d = per[name]
            for key in ("requests", "bytes", "errors", "restarts", "failures", "recovery_ms",
                        "mmio_read_us"):
                assert key in d, (name, key, d)
            assert d["requests"] >= 1 and d["bytes"] >= 1, d
            assert d["mmio_read_us"]["count"] > 0 and d["mmio_read_us"]["p50"] > 0
        assert per["rng0"]["bytes"] >= 1 and per["console0"]["bytes"] == 29
        assert run_bulkhead("stats", "ctl1").returncode == 0

        t0 = time.monotonic()
        stop = run_bulkhead("stop", "ctl1")
        assert stop.returncode == 0, stop.explain()
        assert vm.wait(10) == 0, vm.explain()  # `bulkhead stop` is a clean power-off
        print(f"stop took {time.monotonic() - t0:.2f} s")
    finally:
        vm.kill()
    assert registry.lookup("ctl1") is None
    assert not [p for p in os.listdir(private_registry) if p.startswith("bulkhead-ctl1-")]


def test_a_rate_limited_disk_holds_the_guest_back_and_stats_count_it(tmp_path, private_registry):
    """Token bucket of 4 requests per 100 ms on the jailed blk device: the guest's checks still
    pass (throttling delays, never fails, a request) and `bulkhead stats` counts the held-back
    requests in JSON and in its table."""
    t0 = time.monotonic()
    vm = start_held_vm(tmp_path, "rate1", disk_keys=",ops=4/100")
    try:
        assert any(line.startswith("GK virtio-blk ok") for line in vm.stdout), vm.explain()
        stats = run_bulkhead("stats", "rate1", "--json")
        assert stats.returncode == 0, stats.explain()
        blk = {d["name"]: d for d in json.loads(stats.stdout)["devices"]}["blk0"]
        assert blk["failures"] == 0 and blk["restarts"] == 0, blk  # held back, never failed
        assert blk["throttled"] == blk["device"]["throttled"] > 0, blk
        # 4 ops at once, then 4 per 100 ms: the requests past the burst took their time.
        assert time.monotonic() - t0 >= (blk["requests"] - 4) / 40 * 0.9, blk
        table = run_bulkhead("stats", "rate1")
        assert table.returncode == 0, table.explain()
        header, row = table.stdout.splitlines()[1], next(
            line for line in table.stdout.splitlines() if line.startswith("blk0"))
        assert row.split()[header.split().index("THROTTLED")] == str(blk["throttled"])
    finally:
        vm.kill()


def test_bad_input_is_one_line_and_status_2(tmp_path, private_registry):
    for argv in (("stats", "nosuchvm"), ("stop", "nosuchvm"), ("fault", "nosuchvm", "blk0", "kill"),
                 ("fault", "x", "blk0", "explode")):
        run = run_bulkhead(*argv)
        assert run.returncode == 2, (argv, run.explain())
        assert len(run.stderr.strip().splitlines()) == 1, (argv, run.stderr)
    vm = start_held_vm(tmp_path, "ctl2")
    try:
        clash = run_bulkhead("run", "--kernel", TEST_GUEST, "--name", "ctl2", timeout=30)
        assert clash.returncode == 2 and "ctl2" in clash.stderr, clash.explain()
        run = run_bulkhead("fault", "ctl2", "disk9", "kill")
        assert run.returncode == 2 and "no device disk9" in run.stderr, run.explain()
        assert request("ctl2", cp.Stop()) == {"stopping": "ctl2"}
        assert vm.wait(10) == 0
    finally:
        vm.kill()


def test_stale_registry_entry_of_a_dead_vm_is_ignored(tmp_path, private_registry):
    vm = start_held_vm(tmp_path, "ctl3")
    vm.kill()  # SIGKILL: no chance to clean up
    vm.wait(10)
    cgroup = "/sys/fs/cgroup/pids/bulkhead/ctl3"
    if os.path.isdir(cgroup):  # the dead core's cgroup: reaped by the next VM (once old enough)
        old = time.time() - 120
        os.utime(cgroup, (old, old))
    run = run_bulkhead("ps")
    assert run.returncode == 0 and "ctl3" not in run.stdout, run.explain()
    assert registry.lookup("ctl3") is None
    # The name is free again.
    vm2 = start_held_vm(tmp_path, "ctl4")  # starting a VM reaps what ctl3 left behind
    vm2.kill()
    vm2.wait(10)
    assert not os.path.exists(cgroup)
    vm2 = start_held_vm(tmp_path, "ctl3")
    try:
        assert request("ctl3", cp.Ps())["pid"] == vm2.pid
        request("ctl3", cp.Stop())
        assert vm2.wait(10) == 0
    finally:
        vm2.kill()
