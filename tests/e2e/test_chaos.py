"""`bulkhead chaos` end to end: faults into the blk process during the guest's workload, then a
report checked against the image on the host."""

import os
import re

import pytest

from vmm_core.testing import run_bulkhead

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("fault", ["kill", "mix"])
def test_chaos_reports_no_loss(fault):
    run = run_bulkhead("chaos", "--count", "6", "--interval-ms", "200", "--fault", fault,
                       "--seed", "5", timeout=300)
    assert run.returncode == 0, run.explain()
    assert re.search(r"chaos: 6 faults injected into blk0", run.stdout), run.stdout
    assert "sectors lost/corrupt: 0 of 128" in run.stdout
    assert "guest workload:      ok" in run.stdout
    restarts = int(re.search(r"restarts:\s+(\d+)", run.stdout).group(1))
    assert restarts >= 1


def test_chaos_unknown_device_is_a_usage_error():
    def chaos_cgroups() -> set[str]:
        base = "/sys/fs/cgroup/pids/bulkhead"
        return {d for d in os.listdir(base) if d.startswith("chaos")} if os.path.isdir(base) else set()

    before = chaos_cgroups()
    run = run_bulkhead("chaos", "--count", "1", "--device", "nope0", timeout=120)
    assert run.returncode == 2 and "no device nope0" in run.stderr
    # The VM it started was stopped, not SIGKILLed: its cgroup went with it (issue 9, finding 9).
    assert chaos_cgroups() - before == set()
