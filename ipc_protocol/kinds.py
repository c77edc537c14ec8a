"""Device kinds: what the core and a device process agree each kind of virtio device is.

One `DeviceKind` per kind, declared here and read by everything else (kvmtool's ops table,
crosvm's device module list): its virtio id and queues, the fields of its spec (which also make
its `--disk path=…,readonly=on` flag and its `[[disk]]` config-file table), the host resources
the core opens for it *before* any device process exists and hands over by fd, its seccomp
policy, and where its implementation lives.  The implementation is named, not imported: the
core never imports device code (see `docs/architecture.md`, "Trust boundary"), while the device
process resolves `implementation` to a class with `from_spec(spec, fds)`.

Adding a device kind: a declaration here, its module in `device_procs/virtio/`, its policy in
`jail_configs/`, a guest_kit driver, tests.

This module is a leaf shared by the core and the device processes (it imports neither).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SpecField:
    """One key of a device's spec: `--disk path=IMG,readonly=on` / `[[disk]] readonly = true`."""

    name: str
    type: type  # bool, int or str
    help: str
    required: bool = False
    default: Any = None  # None: absent unless given
    choices: tuple[str, ...] = ()
    derive: str | None = None  # absent: the core derives it ("vm-mac": stable per VM and index)
    pattern: str | None = None  # a str field must match this (re.fullmatch) ...
    pattern_help: str = ""      # ... or the error says this
    frontend: bool = False      # only for a vhost-user frontend device (never sent to a device process)


@dataclass(frozen=True)
class HostResource:
    """A host resource the core opens once per VM and passes to every incarnation by fd.

    `opener` says how (see `vmm_core.devices.resources`): "image" (a regular file, read-write
    unless the spec says readonly), "output" (a file the device appends to, or the terminal),
    "input" (a file or fifo read without blocking), "tap" (a tap interface).  The device
    receives the fd under `role` and never the path."""

    role: str
    field: str
    opener: str
    required: bool = True


@dataclass(frozen=True)
class DeviceKind:
    name: str                          # "blk": the Configure spec's type, policy file, stats
    virtio_id: int                     # VIRTIO 1.2 §5
    queue_max_sizes: tuple[int, ...]   # QueueNumMax of each queue, in queue order
    implementation: str                # "module:Class" built by the device process
    flag: str                          # CLI flag / config-file table: --disk, [[disk]]
    name_prefix: str                   # device names: blk0, blk1, ...
    help: str
    fields: tuple[SpecField, ...] = ()
    shorthand: str | None = None       # the field a bare value sets: --disk IMG
    resources: tuple[HostResource, ...] = ()
    policy: str = ""                   # jail_configs/<policy>.toml (default: the kind's name)
    # RLIMIT_FSIZE: the size of this resource plus `fsize_growth` (blk: the image exactly; the
    # console may append this much); without one, 0 (the device writes no regular file).
    fsize_limit_from: str | None = None
    fsize_growth: int = 0
    max_instances: int = 8
    workload: str | None = None        # "module:function" that `bulkhead jail learn` drives it with
    # The field naming a vhost-user backend's socket: given, the core is that backend's frontend
    # (`vmm_core/vhost_frontend/`) and no device process of ours runs (a kind without an
    # implementation is always one).
    frontend_field: str | None = None

    @property
    def queue_count(self) -> int:
        return len(self.queue_max_sizes)

    @property
    def policy_name(self) -> str:
        return self.policy or self.name

    def fsize_limit(self, resource_sizes: dict[str, int]) -> int:
        """RLIMIT_FSIZE for a device of this kind, given its resources' sizes by role."""
        if self.fsize_limit_from is None or self.fsize_limit_from not in resource_sizes:
            return 0
        return max(1, resource_sizes[self.fsize_limit_from] + self.fsize_growth)

    @property
    def frontend_only(self) -> bool:
        return not self.implementation

    def field_named(self, name: str) -> SpecField | None:
        return next((f for f in self.fields if f.name == name), None)


_LIMIT = "SIZE/REFILL_MS[/BURST] token bucket"

# Keys of every vhost-user frontend device (`--disk vhost-user=S,...`, `--vhost-user`, `--fs`).
FRONTEND_FIELDS = (
    SpecField("reconnect", bool, "when the backend's socket closes, wait for it to come back "
                                 "(on, the default) or fail the device at once (off)",
              frontend=True),
    SpecField("reconnect_timeout", int, "seconds a lost backend may stay away before the device "
                                        "fails (DEVICE_NEEDS_RESET); default: no limit",
              frontend=True),
)
_BUCKET = {"pattern": r"[1-9][0-9]*/[1-9][0-9]*(/[0-9]+)?",
           "pattern_help": "SIZE/REFILL_MS[/BURST] in tokens and milliseconds, e.g. 1048576/100"}

BLK = DeviceKind(
    name="blk", virtio_id=2, queue_max_sizes=(256,),
    implementation="device_procs.virtio.blk:BlkDevice",
    flag="disk", name_prefix="blk", help="a raw disk image as virtio-blk (repeatable)",
    fields=(SpecField("path", str, "the raw image file", required=True),
            SpecField("readonly", bool, "refuse writes (VIRTIO_BLK_F_RO)", default=False),
            SpecField("serial", str, "the id the guest reads (at most 20 bytes)"),
            SpecField("bandwidth", str, f"bytes limit, {_LIMIT}", **_BUCKET),
            SpecField("ops", str, f"requests limit, {_LIMIT}", **_BUCKET),
            SpecField("vhost_user", str, "a vhost-user-blk backend's socket (qemu-storage-daemon, "
                                         "`bulkhead device blk`): the core is its frontend; no path",
                      frontend=True),
            SpecField("queues", int, "request queues (vhost-user only; default 1)", frontend=True),
            *FRONTEND_FIELDS),
    shorthand="path", frontend_field="vhost_user",
    resources=(HostResource("disk", "path", "image"),),
    fsize_limit_from="disk",
    workload="vmm_core.testing.workload:blk_workload",
)

RNG = DeviceKind(
    name="rng", virtio_id=4, queue_max_sizes=(256,),
    implementation="device_procs.virtio.rng:RngDevice",
    flag="rng", name_prefix="rng", help="a virtio-rng device fed by the host CSPRNG",
    max_instances=1,
    workload="vmm_core.testing.workload:rng_workload",
)

CONSOLE = DeviceKind(
    name="console", virtio_id=3, queue_max_sizes=(256, 256),
    implementation="device_procs.virtio.console:ConsoleDevice",
    flag="console", name_prefix="console",
    help="a virtio-console whose port 0 writes to PATH, or to the terminal (stdout)",
    fields=(SpecField("path", str, "output file (created; appended to), or 'stdout'",
                      required=True),
            SpecField("input_path", str, "a file or fifo whose bytes the guest receives")),
    shorthand="path",
    resources=(HostResource("output", "path", "output"),
               HostResource("input", "input_path", "input", required=False)),
    fsize_limit_from="output", fsize_growth=1 << 30,
    max_instances=1,
    workload="vmm_core.testing.workload:console_workload",
)

NET = DeviceKind(
    name="net", virtio_id=1, queue_max_sizes=(256, 256, 256),  # receiveq, transmitq, controlq
    implementation="device_procs.virtio.net:NetDevice",
    flag="net", name_prefix="net",
    help="a virtio-net NIC on a tap the core opens in a network namespace (repeatable)",
    fields=(
        SpecField("tap", str, "tap interface: created, or a persistent tap attached "
                              "('%d': the kernel numbers it)", default="bhtap%d"),
        SpecField("netns", str, "the tap's network namespace: new (this VM's own), an "
                                "`ip netns` name, or a path; default: the core's"),
        SpecField("mac", str, "the guest's MAC (default: stable per VM name and NIC index)",
                  derive="vm-mac"),
        SpecField("mtu", int, "MTU of the tap and of the device (68..65535)", default=1500),
        SpecField("tx_bandwidth", str, f"transmit bytes limit, {_LIMIT}", **_BUCKET),
        SpecField("tx_ops", str, f"transmit frames limit, {_LIMIT}", **_BUCKET),
        SpecField("rx_bandwidth", str, f"receive bytes limit, {_LIMIT}", **_BUCKET),
        SpecField("rx_ops", str, f"receive frames limit, {_LIMIT}", **_BUCKET),
    ),
    shorthand="tap",
    resources=(HostResource("tap", "tap", "tap"),),
    policy="net",
)

VSOCK = DeviceKind(
    name="vsock", virtio_id=19, queue_max_sizes=(256, 256, 256),  # rx, tx, event (§5.10.2)
    implementation="device_procs.virtio.vsock:VsockDevice",
    flag="vsock", name_prefix="vsock",
    help="virtio-vsock: guest AF_VSOCK <-> host Unix sockets, brokered by the core "
         "(Firecracker's protocol on SOCKET)",
    fields=(
        SpecField("cid", int, "the guest's context id (3..4294967294), unique among running "
                              "VMs (default: the lowest free one, allocated)", derive="vm-cid"),
        SpecField("socket", str, "the VM's vsock socket: host programs connect here and send "
                                 "'CONNECT <port>\\n'; guest connections to port P go to "
                                 "SOCKET_P", derive="vm-vsock-socket"),
        SpecField("max_connections", int, "connections open at once (more get RST)", default=256),
    ),
    shorthand="cid",
    resources=(HostResource("broker", "socket", "vsock-broker"),),
    max_instances=1,
)

VHOST_USER = DeviceKind(
    name="vhost-user", virtio_id=0, queue_max_sizes=(),  # both from the spec: type=, queues=
    implementation="", flag="vhost-user", name_prefix="vu",
    help="any virtio device served by an external vhost-user backend, behind the core's "
         "virtio-mmio (repeatable)",
    fields=(SpecField("type", int, "the virtio device id (VIRTIO 1.2 §5: 2 block, 26 fs, ...)",
                      required=True, frontend=True),
            SpecField("socket", str, "the backend's listening socket", required=True, frontend=True),
            SpecField("queues", int, "virtqueues", default=1, frontend=True),
            *FRONTEND_FIELDS),
    frontend_field="socket",
)

FS = DeviceKind(
    name="fs", virtio_id=26, queue_max_sizes=(),  # hiprio + `queues` request queues
    implementation="", flag="fs", name_prefix="fs",
    help="virtio-fs served by virtiofsd over vhost-user; the core builds the config (tag, "
         "request queues)",
    fields=(SpecField("socket", str, "virtiofsd's --socket-path", required=True, frontend=True),
            SpecField("tag", str, "the mount tag the guest names (at most 36 bytes)", required=True,
                      pattern=r"[^\x00]{1,36}", pattern_help="1 to 36 characters", frontend=True),
            SpecField("queues", int, "request queues", default=1, frontend=True),
            *FRONTEND_FIELDS),
    frontend_field="socket",
)

KINDS: dict[str, DeviceKind] = {k.name: k for k in (BLK, RNG, CONSOLE, NET, VSOCK, VHOST_USER, FS)}

# A kind only tests use: a device process built by a factory the test names (no virtio device).
TEST_KIND_NAME = "test"


def kind(name: str) -> DeviceKind:
    """The kind called `name`; `KeyError` names the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown device kind {name!r} (known: {', '.join(sorted(KINDS))})") from None


def by_flag(flag: str) -> DeviceKind | None:
    return next((k for k in KINDS.values() if k.flag == flag), None)


def device_spec_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a spec the device process gets: its kind's fields, never a resource's path
    (the device receives the resource's fd instead)."""
    k = kind(spec["type"])
    hidden = {r.field for r in k.resources} | {f.name for f in k.fields if f.frontend}
    return {"type": k.name, **{f.name: spec[f.name] for f in k.fields
                               if f.name in spec and f.name not in hidden}}
