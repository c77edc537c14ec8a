"""The contract systemd units and Nomad's raw_exec rely on (issue 15, docs/deploy.md): a
foreground `bulkhead run --config` that SIGTERM stops cleanly within a bound, distinct exit
codes, and a metrics file with a last record at exit."""

from __future__ import annotations

import json
import signal
import time

import pytest

from vmm_core import registry
from vmm_core.cli_control import wait_for_vm
from vmm_core.testing import TEST_GUEST, BackgroundVm, run_bulkhead

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]


def test_sigterm_is_a_bounded_clean_shutdown_with_status_143(tmp_path):
    cfg = tmp_path / "vm.toml"
    metrics = tmp_path / "metrics.jsonl"
    cfg.write_text(f'kernel = "{TEST_GUEST}"\nmem = 64\nhold = true\nrng = true\n'
                   f'cmdline = "gk.tests=virtio-rng"\nmetrics = "{metrics}"\nmetrics-interval = 0.5\n'
                   f'name = "term{id(cfg) % 100000}"\n')
    name = f"term{id(cfg) % 100000}"
    vm = BackgroundVm("run", "--config", str(cfg))
    try:
        entry = wait_for_vm(name)
        while not any(line.startswith("GK done") for line in vm.stdout):
            assert vm.proc.poll() is None, vm.explain()
            time.sleep(0.05)
        start = time.monotonic()
        vm.proc.send_signal(signal.SIGTERM)
        status = vm.wait(15)
        took = time.monotonic() - start
    finally:
        vm.kill()
    assert status == 143, vm.explain()
    assert took < 10, took  # the documented bound
    assert registry.lookup(name) is None and not registry.is_alive(entry)
    assert not any("Traceback" in line for line in vm.stderr), vm.explain()
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["vm"] == name and {d["name"] for d in last["devices"]} == {"rng0"}


@pytest.mark.parametrize("args, status", [
    (["--cmdline", "gk.tests=pio"], 0),                      # the guest's checks passed: it exits 0
    (["--cmdline", "gk.tests=virtio-blk"], 1),                # a failing check: the guest's code
    (["--cmdline", "gk.tests=pio", "--vcpus", "nope"], 2),    # bad input
])
def test_exit_codes_tell_the_guest_from_the_vmm_from_bad_input(args, status):
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64", *args, timeout=60)
    assert run.returncode == status, run.explain()


@pytest.mark.parametrize("tests, status", [("pio,power-button", 0), ("pio", 143)])
def test_sigterm_with_a_shutdown_grace_presses_the_power_button_first(tests, status):
    """--shutdown-grace: SIGTERM presses the ACPI power button; a guest that powers off in
    time ends the VM with 0, one that does not is stopped after the grace (143)."""
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--mem", "64", "--hold",
                      "--shutdown-grace", "1.5", "--cmdline", f"gk.tests={tests}")
    try:
        want = "waiting for the power button" if "power-button" in tests else "GK done"
        deadline = time.monotonic() + 60
        while not any(want in line for line in vm.stdout):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
            time.sleep(0.05)
        start = time.monotonic()
        vm.proc.send_signal(signal.SIGTERM)
        assert vm.wait(20) == status, vm.explain()
        took = time.monotonic() - start
    finally:
        vm.kill()
    if status == 143:
        assert 1.4 < took < 10, took
        assert any("did not power off within 1.5 s" in line for line in vm.stderr), vm.explain()
    else:
        assert any("GK power-button ok" in line for line in vm.stdout), vm.explain()
