"""The test guest's virtio-net driver (guest_kit/vnet.c) against NetDevice and a real tap, through
real KVM exits, ioeventfds and irqfds — before `--net` is wired into the CLI.

Until the lead wires the device kind, this test registers it the way the wiring will, in a
child process: `KINDS["net"] = NET` (ipc_protocol/net_kind.py) and a "tap" resource opener
(`open_tap_resource`), then runs the VM in-process (`--no-sandbox` mode: the device-process
serve loop does not poll device fds yet) and serves the tap with `HostFds` beside the kick
thread.  The tap is a persistent one the test makes in its own namespace, at 10.0.2.2/24 (the
child attaches to it by name and namespace, as `--net tap=bhtap0,netns=NS` would); the guest is
10.0.2.15.  Run as a script, this file is that child.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GUEST_NET = "10.0.2.15/24,10.0.2.2"
GUEST_MAC = "52:54:00:12:34:56"

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(180)]


def test_guest_kit_virtio_net_pings_the_tap(netns, tmp_path):
    from vmm_core.testing import TEST_GUEST, parse_results
    from vmm_core.testing.netns import sh
    ns_name = netns()
    sh(ns_name, "ip tuntap add dev bhtap0 mode tap vnet_hdr")
    sh(ns_name, "ip addr add 10.0.2.2/24 dev bhtap0")
    serial = tmp_path / "serial.txt"
    child = subprocess.run([sys.executable, __file__, ns_name, TEST_GUEST, str(serial)],
                           cwd=ROOT, capture_output=True, text=True, timeout=150)
    out = serial.read_text() if serial.exists() else ""
    results, done = parse_results(out)
    ok, detail = results.get("virtio-net", (False, "no result"))
    assert ok, f"{out}\n{child.stderr[-3000:]}"
    assert done == (1, 1) and child.returncode == 0, f"{out}\n{child.stderr[-3000:]}"
    # The guest read its MAC from the config space and learnt the tap's from the ARP reply.
    tap_mac = sh(ns_name, "ip -br link show bhtap0").split()[2]
    assert f"mac={GUEST_MAC} peer-mac={tap_mac}" in detail, detail
    # The child attached to the persistent tap and left it (a created one goes with the VM).
    assert "bhtap0" in sh(ns_name, "ip link show bhtap0")


def _child(netns: str, kernel: str, serial: str) -> int:
    """Run the test guest with one net device, in-process, until it exits."""
    import select
    import threading

    sys.path.insert(0, ROOT)
    from device_procs.virtio.hostfds import HostFds
    from ipc_protocol import kinds
    from ipc_protocol.net_kind import NET
    from vmm_core.devices import resources
    from vmm_core.devices.spec import DeviceSpec
    from vmm_core.devices.tap import open_tap_resource
    from vmm_core.vm import Machine, VmConfig

    # What the lead's wiring adds: the kind, and an opener for its "tap" resource.
    kinds.KINDS["net"] = NET
    resources.OPENERS["tap"] = lambda spec, r, where: open_tap_resource(
        spec.params["tap"], spec.params.get("netns"), spec.params.get("mtu"), where)[0].fd

    spec = DeviceSpec("net", "net0", {"tap": "bhtap0", "netns": netns, "mac": GUEST_MAC, "mtu": 1500})
    config = VmConfig(kernel=kernel, cmdline=f"gk.tests=virtio-net gk.net={GUEST_NET}", mem_mib=64,
                      serial=serial, devices=[spec], sandbox=False, cgroup=None)
    machine = Machine(config)
    mmio = machine.devices.slots[0].backend.mmio  # type: ignore[union-attr]
    stop = threading.Event()

    def serve_tap() -> None:  # what the device host's serve loop does once wired
        fds = HostFds(select.poll())
        while not stop.is_set():
            fds.sync(mmio.poll_fds())
            for fd, events in fds.poller.poll(fds.timeout_ms(mmio.next_deadline_ns(), 50)):
                mmio.on_ready(fd, fds.to_select(events))
            fds.fire_timer(mmio)

    threading.Thread(target=serve_tap, name="tap", daemon=True).start()
    try:
        request = machine.run(timeout=120)
    finally:
        stop.set()
        machine.close()
    print(f"stopped: {request}", file=sys.stderr)
    return request.exit_status


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], sys.argv[3]))
