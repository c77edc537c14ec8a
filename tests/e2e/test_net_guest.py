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
