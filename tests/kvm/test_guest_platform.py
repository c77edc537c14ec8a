"""The test guest drives the core through real KVM exits: PIO and MMIO dispatch, interrupts from
the in-kernel irqchip (KVM_IRQ_LINE and KVM_IRQFD), HLT wake-up and two vCPUs."""

import pytest

from vmm_core.testing import run_bulkhead, run_test_guest

pytestmark = pytest.mark.kvm


def test_platform_checks_pass_on_two_vcpus():
    run = run_test_guest("pio,mmio,irq,irqfd,hlt,smp", vcpus=2)
    for name in ("pio", "mmio", "irq", "irqfd", "hlt", "smp"):
        assert run.ok(name), f"{name}: {run.results.get(name)}\n{run.explain()}"
    assert run.done == (6, 6), run.explain()
    assert run.returncode == 0, run.explain()


def test_guest_exit_code_is_the_process_exit_status():
    # An unknown test fails inside the guest, which then exits with 1 through the testdev.
    run = run_test_guest("no-such-test")
    assert run.results["no-such-test"] == (False, "unknown-test"), run.explain()
    assert run.returncode == 1


def test_smp_needs_two_vcpus_and_says_so():
    run = run_test_guest("smp", vcpus=1)
    assert not run.ok("smp")
    assert run.returncode == 1


def test_demo_runs_platform_checks():
    run = run_bulkhead("demo", "--no-sandbox", timeout=180)
    for name in ("pio", "mmio", "irq", "irqfd", "hlt", "smp"):
        assert run.ok(name), run.explain()


def test_serial_to_file(tmp_path):
    out = tmp_path / "serial.txt"
    run = run_test_guest("mmio", "--serial", str(out))
    assert run.returncode == 0, run.explain()
    assert run.stdout == ""
    assert "GK mmio ok" in out.read_text()
