"""Virtio devices for device processes: the virtio-mmio transport, split queues, blk/rng/console.

Public surface:
    create_device(spec) -> VirtioDevice       build a device from its spec (opens files now)
    MmioDevice(device, memory, notify)        the register file; a BusDevice
    VirtioDevice, Interrupt, Queue, DescriptorChain, QueueError, DeviceSpecError

For a process host:
- call `create_device(spec)` before entering the jail (it opens the image / console files);
- build `MmioDevice(device, GuestMemory.from_fd(...), notify)` where `notify()` writes 1 to the
  irqfd eventfd; forward register reads/writes to `read`/`write`; on a kick eventfd for queue i
  call `queue_notify(i)` (it never raises for guest errors);
- console input: poll `device.input_fd` (if not None) and call `device.on_input_ready()`, or
  push bytes with `device.feed(data)`; do it on the same thread as register accesses;
- restart after a crash: `MmioDevice(...).restore(state)` with the `state()` dict the core kept,
  then `kick_all()` once the notifier works; chains taken but not completed are re-executed;
- blk needs fallocate(2) (PUNCH_HOLE/ZERO_RANGE; it falls back to pwrite of zeroes on EPERM,
  ENOSYS or EOPNOTSUPP), preadv/pwritev/pwrite, fdatasync; rng needs getrandom(2).
"""

from __future__ import annotations

from typing import Any

from .blk import BlkDevice
from .console import ConsoleDevice
from .device import Interrupt, VirtioDevice
from .errors import DeviceSpecError, QueueError, VirtioError
from .mmio import MmioDevice
from .queue import DescriptorChain, Queue
from .rng import RngDevice

__all__ = ["create_device", "MmioDevice", "VirtioDevice", "Interrupt", "Queue", "DescriptorChain",
           "QueueError", "DeviceSpecError", "VirtioError", "BlkDevice", "RngDevice", "ConsoleDevice"]

# Allowed keys per device type: name -> (type, required).
_SPEC_FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "blk": {"path": (str, True), "readonly": (bool, False), "serial": (str, False)},
    "rng": {},
    "console": {"path": (str, False), "fd": (int, False), "input_path": (str, False),
                "input_fd": (int, False)},
}


def _check_spec(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise DeviceSpecError(f"device spec must be a dict, not {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in _SPEC_FIELDS:
        raise DeviceSpecError(f"device spec field 'type' is {kind!r}: expected one of "
                              f"{', '.join(sorted(_SPEC_FIELDS))}")
    fields = _SPEC_FIELDS[kind]
    for key, value in spec.items():
        if key == "type":
            continue
        if key not in fields:
            raise DeviceSpecError(f"{kind} spec has unknown field {key!r}; known: "
                                  f"{', '.join(sorted(fields)) or 'none'}")
        want = fields[key][0]
        # bool is an int subclass; an fd given as True is still a mistake.
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise DeviceSpecError(f"{kind} spec field {key!r} must be {want.__name__}, "  # type: ignore[union-attr]
                                  f"not {type(value).__name__}")
    for key, (_, required) in fields.items():
        if required and key not in spec:
            raise DeviceSpecError(f"{kind} spec is missing required field {key!r}")
    return spec


def create_device(spec: dict[str, Any]) -> VirtioDevice:
    """Build a device from `spec`, opening its files now (before the process enters its jail).

    {"type": "blk", "path": str, "readonly": bool = False, "serial": str = ""}
    {"type": "rng"}
    {"type": "console", "path": str | "fd": int, "input_path": str | "input_fd": int (optional)}
    """
    spec = _check_spec(spec)
    kind = spec["type"]
    if kind == "blk":
        if not spec["path"]:
            raise DeviceSpecError("blk spec field 'path' is empty")
        return BlkDevice(spec["path"], readonly=spec.get("readonly", False), serial=spec.get("serial", ""))
    if kind == "rng":
        return RngDevice()
    if ("path" in spec) == ("fd" in spec):
        raise DeviceSpecError("console spec needs exactly one of 'path' and 'fd' for its output")
    if "input_path" in spec and "input_fd" in spec:
        raise DeviceSpecError("console spec has both 'input_path' and 'input_fd'; give one")
    if "fd" in spec:
        if spec["fd"] < 0 or spec.get("input_fd", 0) < 0:
            raise DeviceSpecError("console spec field 'fd'/'input_fd' must be a non-negative fd")
        return ConsoleDevice(spec["fd"], spec.get("input_fd"), owns_fds=False)
    device = ConsoleDevice.open(spec["path"], spec.get("input_path"))
    if "input_fd" in spec:
        device.input_fd = spec["input_fd"]
    return device
