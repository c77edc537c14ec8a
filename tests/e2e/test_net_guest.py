"""The test guest's virtio-net driver (guest_kit/vnet.c) through the real CLI: real KVM exits,
ioeventfds and irqfds, the device jailed in its own process (and, for comparison, in-process),
a real tap in a network namespace the test made.

The tap is a persistent one the test makes in its own namespace at 10.0.2.2/24; the VM attaches
to it by name and namespace (`--net tap=bhtap0,netns=NS`); the guest is 10.0.2.15.  The guest
ARPs for the tap, pings it and checks the echo reply.
"""

from __future__ import annotations

import pytest

from vmm_core.testing import TEST_GUEST, run_bulkhead
from vmm_core.testing.netns import sh

GUEST_NET = "10.0.2.15/24,10.0.2.2"
GUEST_MAC = "52:54:00:12:34:56"

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(180)]


@pytest.mark.parametrize("mode", ["sandboxed", "in-process"])
def test_guest_kit_virtio_net_pings_the_tap(netns, mode: str) -> None:
    ns_name = netns()
    sh(ns_name, "ip tuntap add dev bhtap0 mode tap vnet_hdr")
    sh(ns_name, "ip addr add 10.0.2.2/24 dev bhtap0")
    extra = ["--no-sandbox"] if mode == "in-process" else []
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                       "--net", f"tap=bhtap0,netns={ns_name},mac={GUEST_MAC}", *extra,
                       "--cmdline", f"gk.tests=virtio-net gk.net={GUEST_NET}", timeout=150)
    ok, detail = run.results.get("virtio-net", (False, "no result"))
    assert ok and run.done == (1, 1) and run.returncode == 0, run.explain()
    # The guest read its MAC from the config space and learnt the tap's from the ARP reply.
    tap_mac = sh(ns_name, "ip -br link show bhtap0").split()[2]
    assert f"mac={GUEST_MAC} peer-mac={tap_mac}" in detail, detail
    # The VM attached to the persistent tap and left it (a created one goes with the VM).
    assert "bhtap0" in sh(ns_name, "ip link show bhtap0")


def test_netns_new_gives_the_vm_its_own_stack(tmp_path) -> None:
    """`netns=new`: the tap lives in a namespace of the VM's own, gone when the VM is."""
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                       "--net", "tap=bh0,netns=new", "--cmdline", "gk.tests=pio", timeout=120)
    assert run.returncode == 0, run.explain()


def test_killing_the_net_device_mid_ping_keeps_the_tap_and_the_guest_going(netns) -> None:
    """Crash restart under `bulkhead run`: the net device is SIGKILLed three times while the
    guest ping-pongs with the tap's address.  The core owns the tap (created by it, so it would
    vanish with its last fd): the same interface serves every incarnation, and the guest's
    echoes all come back (one lost in a restart is re-sent after 500 ms)."""
    import json
    import time

    from vmm_core.testing import BackgroundVm, kill_device, wait_for_device

    ns = netns()
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--mem", "64", "--hold",
                      "--net", f"tap=bhk0,netns={ns}",
                      "--cmdline", "gk.tests=virtio-net gk.net=10.0.2.15/24,10.0.2.2 "
                                   "gk.net_pings=30000 gk.net_wait_ms=30000")

    def ifindex() -> int:
        return json.loads(sh(ns, "ip -j link show bhk0"))[0]["ifindex"]

    def done() -> bool:
        return any(line.startswith("GK done") for line in vm.stdout)

    try:
        wait_for_device(vm.pid, "net0", timeout=30)
        deadline = time.monotonic() + 30
        while "bhk0" not in sh(ns, "ip -o link"):  # the core made the tap: give it the address
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
            time.sleep(0.05)
        sh(ns, "ip addr add 10.0.2.2/24 dev bhk0")
        index = ifindex()
        kills, killed = 0, None
        while kills < 3:
            time.sleep(0.5)
            assert not done() and vm.proc.poll() is None, \
                f"the guest finished before kill {kills + 1}: give it more pings\n{vm.explain()}"
            killed = kill_device(vm.pid, "net0", not_pid=killed)
            kills += 1
            wait_for_device(vm.pid, "net0", not_pid=killed)  # restarted
            assert ifindex() == index
        while not done():
            assert vm.proc.poll() is None and time.monotonic() < deadline + 120, vm.explain()
            time.sleep(0.1)
        results, _ = vm.results()
        ok, detail = results["virtio-net"]
        assert ok, vm.explain()
        assert ifindex() == index
        assert "".join(vm.stderr).count("device net0 restarted") >= 3, vm.explain()
    finally:
        vm.kill()
