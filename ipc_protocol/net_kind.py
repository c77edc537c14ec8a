"""The virtio-net device kind, declared for `ipc_protocol.kinds` (issue 12).

Kept apart until the lead wires it (`KINDS["net"] = NET`, and a "tap" opener in
`vmm_core.devices.resources`: `vmm_core.devices.tap.open_tap_resource`); the pre-wiring test
`tests/e2e/test_net_guest.py` registers it exactly that way.  Like `kinds`, a leaf shared by the
core and the device processes (it imports neither).
"""

from __future__ import annotations

from .kinds import DeviceKind, HostResource, SpecField

_LIMIT = "SIZE/REFILL_MS[/BURST] token bucket"

NET = DeviceKind(
    name="net", virtio_id=1, queue_max_sizes=(256, 256, 64),  # receiveq, transmitq, controlq
    implementation="device_procs.virtio.net:NetDevice",
    flag="net", name_prefix="net",
    help="a virtio-net NIC on a tap the core opens in a network namespace (repeatable)",
    fields=(
        SpecField("tap", str, "tap interface: created, or a persistent tap attached "
                              "('%d': the kernel numbers it)", default="bhtap%d"),
        SpecField("netns", str, "the tap's network namespace: new (this VM's own), an "
                                "`ip netns` name, or a path; default: the core's"),
        SpecField("mac", str, "the guest's MAC (default: stable per VM name and NIC index)"),
        SpecField("mtu", int, "MTU of the tap and of the device (68..65535)", default=1500),
        SpecField("tx_bandwidth", str, f"transmit bytes limit, {_LIMIT}"),
        SpecField("tx_ops", str, f"transmit frames limit, {_LIMIT}"),
        SpecField("rx_bandwidth", str, f"receive bytes limit, {_LIMIT}"),
        SpecField("rx_ops", str, f"receive frames limit, {_LIMIT}"),
    ),
    shorthand="tap",
    resources=(HostResource("tap", "tap", "tap"),),
    policy="net",
)
