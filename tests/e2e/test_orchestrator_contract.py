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
