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

import importlib
from typing import Any, Mapping

from ipc_protocol.kinds import KINDS, DeviceKind

from .blk import BlkDevice
from .console import ConsoleDevice
from .device import Interrupt, VirtioDevice
from .errors import DeviceSpecError, QueueError, VirtioError
from .mmio import MmioDevice
from .queue import DescriptorChain, Queue
from .rng import RngDevice

__all__ = ["create_device", "MmioDevice", "VirtioDevice", "Interrupt", "Queue", "DescriptorChain",
           "QueueError", "DeviceSpecError", "VirtioError", "BlkDevice", "RngDevice", "ConsoleDevice"]

def _check_spec(spec: Any, fds: Mapping[str, int]) -> DeviceKind:
    """The spec's kind, once every key is known and of its declared type (`ipc_protocol.kinds`).

    A resource's field (blk `path`) may be absent when its fd is passed instead; the legacy
    console keys `fd`/`input_fd` name fds the caller keeps."""
    if not isinstance(spec, dict):
        raise DeviceSpecError(f"device spec must be a dict, not {type(spec).__name__}")
    name = spec.get("type")
    if name not in KINDS:
        raise DeviceSpecError(f"device spec field 'type' is {name!r}: expected one of "
                              f"{', '.join(sorted(KINDS))}")
    k = KINDS[name]
    fd_keys = _LEGACY_FD_KEYS.get(name, {})
    for key, value in spec.items():
        if key == "type":
            continue
        if key in fd_keys:
            if type(value) is not int or value < 0:
                raise DeviceSpecError(f"{name} spec field {key!r} must be a non-negative fd")
            continue
        f = k.field_named(key)
        if f is None:
            known = [f.name for f in k.fields] + list(fd_keys)
            raise DeviceSpecError(f"{name} spec has unknown field {key!r}; known: "
                                  f"{', '.join(sorted(known)) or 'none'}")
        # bool is an int subclass; an fd given as True is still a mistake.
        if type(value) is not f.type:
            raise DeviceSpecError(f"{name} spec field {key!r} must be {f.type.__name__}, "
                                  f"not {type(value).__name__}")
    given = set(fds) | {role for key, role in fd_keys.items() if key in spec}
    for r in k.resources:
        if r.required and r.role not in given and not spec.get(r.field):
            raise DeviceSpecError(f"{name} spec is missing required field {r.field!r}")
    for f in k.fields:
        if f.required and f.name not in spec and not any(r.field == f.name and r.role in given
                                                         for r in k.resources):
            raise DeviceSpecError(f"{name} spec is missing required field {f.name!r}")
    return k


_LEGACY_FD_KEYS = {"console": {"fd": "output", "input_fd": "input"}}


def implementation(k: DeviceKind) -> type[VirtioDevice]:
    """The class a kind names (`module:Class`)."""
    module_name, _, attr = k.implementation.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create_device(spec: dict[str, Any], fds: Mapping[str, int] | None = None) -> VirtioDevice:
    """Build a device from `spec`, before the process enters its jail.

    `fds` maps a kind's resource roles (blk "disk", console "output"/"input") to fds the core
    opened; the device works on duplicates and the caller keeps its own.  A resource without an
    fd is opened from its spec field (tests and tools only: the core always passes fds).

    {"type": "blk", "path": str, "readonly": bool = False, "serial": str = ""}
    {"type": "rng"}
    {"type": "console", "path": str, "input_path": str (optional)}
    """
    fds = dict(fds or {})
    k = _check_spec(spec, fds)
    for key, role in _LEGACY_FD_KEYS.get(k.name, {}).items():
        if key in spec:
            fds[role] = spec[key]
    return implementation(k).from_spec(spec, fds)
