"""What the user asked for, per device: `DeviceSpec`, and the one parser flags and files share.

A device flag is the kind's key=value list (cloud-hypervisor / QEMU style), checked against the
kind's declared fields (`ipc_protocol.kinds`):

    --disk path=disk.img,readonly=on,id=data,on-crash=fail
    --disk disk.img,readonly          (shorthand: a bare value sets the kind's main field,
                                       a bare key sets a boolean)
    --disk path=a,,b.img              (a doubled comma is a comma in the value)
    --disk disk.img,bw=1048576/100,ops=1000/1000
                                      (aliases: ro, bw, tx_bw, rx_bw)

Keys every kind has: `id` (the device's name, default <prefix><index>) and `on-crash`
(restart | fail | stop-vm, default the VM's).  A config file's `[[disk]]` table gives the same
keys as a TOML table (`device_from_table`).
"""

from __future__ import annotations

import os

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ipc_protocol.kinds import KINDS, DeviceKind, device_spec_fields

from ..errors import ConfigError
from .options import POLICIES

COMMON_KEYS = ("id", "on-crash")
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
_TRUE = ("on", "true", "yes", "1")
_FALSE = ("off", "false", "no", "0")
# Short spellings: `ro`, and `bw` as in the rate-limiter keys of issue 12 (`bw=…,ops=…`).
_ALIASES = {"ro": "readonly", "bw": "bandwidth", "tx_bw": "tx_bandwidth", "rx_bw": "rx_bandwidth"}


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the VM: its kind, name and spec fields (paths included: the core opens
    them), plus core-side settings (`on_crash`)."""

    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    on_crash: str | None = None

    @property
    def device_kind(self) -> DeviceKind:
        return KINDS[self.kind]

    def full_spec(self) -> dict[str, Any]:
        """Type plus every field, paths included (for an in-process device, which gets fds too)."""
        return {"type": self.kind, **self.params}

    @property
    def frontend_socket(self) -> str | None:
        """The vhost-user backend's socket if the core is this device's frontend, else None."""
        k = self.device_kind
        return self.params.get(k.frontend_field) if k.frontend_field else None

    @property
    def queue_count(self) -> int:
        """Virtqueues: the kind's, or for a vhost-user device what its spec says (virtio-fs:
        the hiprio queue plus the request queues)."""
        if self.frontend_socket is None:
            return self.device_kind.queue_count
        queues = int(self.params.get("queues") or 1)
        return queues + 1 if self.kind == "fs" else queues

    def device_spec(self) -> dict[str, Any]:
        """What a device process is told (`Configure.spec`): no resource paths, only fds."""
        return device_spec_fields(self.full_spec())


def split_items(text: str) -> list[str]:
    """`a=1,b=x,,y` -> ["a=1", "b=x,y"]: commas separate, a doubled comma is a literal one."""
    items, current, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    items.append("".join(current))
    return [it for it in items if it != ""]


def _convert(kind: DeviceKind, key: str, value: Any, where: str) -> Any:
    f = kind.field_named(key)
    assert f is not None
    if f.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: {key} is on or off, not {value!r}")
    if f.type is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} is a whole number, not {value!r}")
        try:
            return int(value, 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} is a whole number, not {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} is text, not {value!r}")
    if f.choices and value not in f.choices:
        raise ConfigError(f"{where}: {key} is one of {', '.join(f.choices)}, not {value!r}")
    if f.pattern and not re.fullmatch(f.pattern, value):
        raise ConfigError(f"{where}: {key}={value!r}: give {f.pattern_help or f.pattern}")
    return value


def build_spec(kind: DeviceKind, values: Mapping[str, Any], index: int, where: str) -> DeviceSpec:
    """A checked `DeviceSpec` from key -> value (strings from a flag, typed values from TOML)."""
    params: dict[str, Any] = {}
    name = f"{kind.name_prefix}{index}"
    on_crash = None
    known = [f.name for f in kind.fields] + list(COMMON_KEYS)
    for raw_key, value in values.items():
        key = _ALIASES.get(raw_key, raw_key)
        if key == "on_crash":  # the TOML spelling
            key = "on-crash"
        if key == "id":
            if not isinstance(value, str) or not NAME_RE.match(value):
                raise ConfigError(f"{where}: id {value!r} must be 1-16 lower-case letters, digits, "
                                  "'-' or '_', starting with a letter")
            name = value
        elif key == "on-crash":
            if value not in POLICIES:
                raise ConfigError(f"{where}: on-crash must be {', '.join(POLICIES)}, not {value!r}")
            on_crash = value
        else:
            fname = key.replace("-", "_")
            fname = _ALIASES.get(fname, fname)
            if kind.field_named(fname) is None:
                raise ConfigError(f"{where}: unknown key {raw_key!r} (known: "
                                  f"{', '.join(known) or 'none'})")
            if fname in params:
                raise ConfigError(f"{where}: {fname} is given twice")
            params[fname] = _convert(kind, fname, value, where)
    frontend = kind.frontend_only or (kind.frontend_field is not None
                                      and kind.frontend_field in params)
    for f in kind.fields:
        if f.name in params and f.frontend != frontend:
            if frontend:
                raise ConfigError(f"{where}: {f.name} is not for a vhost-user device (the "
                                  "backend decides it: set it there)")
            raise ConfigError(f"{where}: {f.name} is only for a vhost-user device (give "
                              f"{kind.frontend_field.replace('_', '-')}=SOCKET)")
        if f.frontend != frontend:
            continue  # required/defaults of the other way of providing the device
        if f.required and f.name not in params:
            hint = f" (e.g. --{kind.flag} {f.name}=...)" if kind.shorthand != f.name else \
                f" (e.g. --{kind.flag} PATH)"
            raise ConfigError(f"{where}: {f.name} is required{hint}")
        if f.required and params.get(f.name) == "":
            raise ConfigError(f"{where}: {f.name} is empty")
        if f.name not in params and f.default is not None:
            params[f.name] = f.default
    return DeviceSpec(kind.name, name, params, on_crash)


def parse_device_arg(kind: DeviceKind, text: str, index: int) -> DeviceSpec:
    """One `--<flag> TEXT` (see the module docstring)."""
    where = f"--{kind.flag} {text}" if text else f"--{kind.flag}"
    values: dict[str, Any] = {}
    for n, item in enumerate(split_items(text)):
        key, eq, value = item.partition("=")
        if not eq:
            field_ = kind.field_named(_ALIASES.get(item, item))
            if field_ is not None and field_.type is bool:
                key, value = field_.name, "on"
            elif n == 0 and kind.shorthand is not None:
                key, value = kind.shorthand, item
            else:
                raise ConfigError(f"{where}: unknown option {item!r} (give key=value; known keys: "
                                  f"{', '.join([f.name for f in kind.fields] + list(COMMON_KEYS))})")
        if key in values:
            raise ConfigError(f"{where}: {key} is given twice")
        values[key] = value
    return build_spec(kind, values, index, where)


def device_from_table(kind: DeviceKind, table: Mapping[str, Any], index: int,
                      where: str) -> DeviceSpec:
    """One `[[<flag>]]` table of a config file (keys as in the flag; TOML types)."""
    return build_spec(kind, table, index, where)


def check_unique(specs: list[DeviceSpec]) -> None:
    """Names are unique and no kind has more devices than it allows."""
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"two devices are named {s.name}: give one another id=")
        seen.add(s.name)
    for k in KINDS.values():
        n = sum(1 for s in specs if s.kind == k.name)
        if n > k.max_instances:
            raise ConfigError(f"--{k.flag}: at most {k.max_instances} per VM, {n} given")


def derive_defaults(spec: DeviceSpec, vm_name: str, index: int) -> DeviceSpec:
    """Fill the fields the core derives when absent (a net device's MAC: stable per VM name
    and device index, so a restarted or re-created VM keeps it)."""
    from ..registry import registry_dir
    from .tap import default_mac
    from ..identities import allocate_cid
    derivers = {"vm-mac": lambda: default_mac(vm_name, index),
                "vm-cid": lambda: allocate_cid(vm_name),
                "vm-vsock-socket": lambda: os.path.join(registry_dir().parent, f"{vm_name}.vsock")}
    missing = {f.name: derivers[f.derive]() for f in spec.device_kind.fields
               if f.derive is not None and f.name not in spec.params}
    if not missing:
        return spec
    return DeviceSpec(spec.kind, spec.name, {**spec.params, **missing}, spec.on_crash)
