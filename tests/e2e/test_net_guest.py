"""The test guest's virtio-net driver (guest_kit/vnet.c) against NetDevice and a real tap, through
real KVM exits, ioeventfds and irqfds — before `--net` is wired into the CLI.

Until the lead wires the device kind, this test reaches the device in through the seams a
wiring adds (the queue count of the kind and `create_device`), patched in a child process that
runs the VM in-process (`--no-sandbox` mode) and serves the tap with `HostFds` beside the kick
thread.  The tap sits in a namespace the test makes, at 10.0.2.2/24; the guest is 10.0.2.15.
Run as a script, this file is that child.
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
    from vmm_core.devices.tap import NetNamespace, open_tap
    from vmm_core.testing import TEST_GUEST, parse_results
    ns_name = netns()
    ns = NetNamespace.open(ns_name)
    tap = open_tap("bhtap0", ns)
    try:
        subprocess.run(["ip", "-n", ns_name, "addr", "add", "10.0.2.2/24", "dev", "bhtap0"], check=True)
        serial = tmp_path / "serial.txt"
        child = subprocess.run([sys.executable, __file__, str(tap.fd), str(tap.mtu), TEST_GUEST, str(serial)],
                               cwd=ROOT, pass_fds=[tap.fd], capture_output=True, text=True, timeout=150)
        out = serial.read_text() if serial.exists() else ""
        results, done = parse_results(out)
        ok, detail = results.get("virtio-net", (False, "no result"))
        assert ok, f"{out}\n{child.stderr[-3000:]}"
        assert done == (1, 1) and child.returncode == 0, f"{out}\n{child.stderr[-3000:]}"
        # The guest read its MAC from the config space and learnt the tap's from the ARP reply.
        tap_mac = subprocess.run(["ip", "-n", ns_name, "-br", "link", "show", "bhtap0"],
                                 capture_output=True, text=True, check=True).stdout.split()[2]
        assert f"mac={GUEST_MAC} peer-mac={tap_mac}" in detail, detail
        # The kernel in the namespace learnt the guest from its ARP request.
        neigh = subprocess.run(["ip", "-n", ns_name, "neigh", "show", "10.0.2.15"], capture_output=True,
                               text=True, check=True).stdout
        assert GUEST_MAC in neigh
    finally:
        tap.close()
        ns.close()


def _child(tap_fd: int, mtu: int, kernel: str, serial: str) -> int:
    """Run the test guest with one net device on `tap_fd`, in-process, until it exits."""
    import select
    import threading

    sys.path.insert(0, ROOT)
    import device_procs.virtio as virtio
    from device_procs.virtio.hostfds import HostFds
    from device_procs.virtio.net import NetDevice
    from vmm_core.devices import manager
    from vmm_core.devices.manager import DeviceSpec
    from vmm_core.vm import Machine, VmConfig

    # The two seams the CLI wiring fills: the kind's queue count and its device factory.
    manager.QUEUE_COUNTS["net"] = 2
    real_create = virtio.create_device
    virtio.create_device = lambda spec: (NetDevice.from_spec(spec) if spec.get("type") == "net"
                                         else real_create(spec))

    spec = DeviceSpec("net", "net0", {"tap_fd": os.dup(tap_fd), "mac": GUEST_MAC, "mtu": mtu})
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
    sys.exit(_child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
