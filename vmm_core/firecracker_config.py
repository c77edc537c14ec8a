"""Firecracker's JSON config (`firecracker --config-file`) as `bulkhead run` arguments.

`bulkhead run --firecracker-config vm.json`: what Bulkhead supports is mapped onto its own flags
(the same path as a TOML config file, `vmm_core.vm_config`); anything else is refused by name,
so a config never half-works silently.

    boot-source        kernel_image_path -> --kernel, boot_args -> --cmdline, initrd_path -> --initrd
    machine-config     vcpu_count -> --vcpus, mem_size_mib -> --mem (smt: false only,
                       track_dirty_pages: false only)
    drives[]           path_on_host -> --disk path=, is_read_only -> readonly, drive_id -> id,
                       rate_limiter -> bandwidth/ops (is_root_device is accepted: Bulkhead has
                       no root-device notion; cache_type "Unsafe" and io_engine "Sync" only);
                       socket (a vhost-user drive) -> --disk vhost-user=
    network-interfaces[] host_dev_name -> --net tap=, guest_mac -> mac, iface_id -> id,
                       rx_/tx_rate_limiter -> rx_/tx_bandwidth, rx_/tx_ops
    vsock              guest_cid -> --vsock cid=, uds_path -> socket (vsock_id is accepted)

A rate limiter `{"bandwidth": {"size": S, "refill_time": MS, "one_time_burst": B}, "ops": ...}`
becomes Bulkhead's `S/MS[/B]` token bucket.  Refused: `logger`, `metrics`, `balloon`, `mmds-config`,
`entropy` (use --rng), `cpu-config`, and any unknown section or key.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import ConfigError

_SECTIONS = {"boot-source", "machine-config", "drives", "network-interfaces", "vsock"}
_REFUSED = {"logger": "Bulkhead logs to stderr (-v)", "metrics": "see `bulkhead stats`",
            "balloon": "no virtio-balloon", "mmds-config": "no MMDS",
            "entropy": "use --rng", "cpu-config": "no CPU templates"}
_ID = re.compile(r"[^a-z0-9_-]")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: an object, not {value!r}")
    return value


def _keys(obj: dict[str, Any], known: set[str], where: str) -> None:
    for k in obj:
        if k not in known:
            raise ConfigError(f"{where}: {k!r} is not supported (Bulkhead maps: "
                              f"{', '.join(sorted(known))})")


def _bucket(value: Any, where: str) -> str:
    b = _obj(value, where)
    _keys(b, {"size", "refill_time", "one_time_burst"}, where)
    try:
        size, refill = int(b["size"]), int(b["refill_time"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: size and refill_time are required whole numbers") from None
    burst = b.get("one_time_burst")
    return f"{size}/{refill}" + (f"/{int(burst)}" if burst else "")


def _limiter(value: Any, where: str, prefix: str) -> list[str]:
    if value is None:
        return []
    r = _obj(value, where)
    _keys(r, {"bandwidth", "ops"}, where)
    out = []
    if r.get("bandwidth") is not None:
        out.append(f"{prefix}bandwidth={_bucket(r['bandwidth'], where + '.bandwidth')}")
    if r.get("ops") is not None:
        out.append(f"{prefix}ops={_bucket(r['ops'], where + '.ops')}")
    return out


def _device_id(text: Any, prefix: str) -> str:
    """Firecracker ids are free-form; Bulkhead names are short lower-case identifiers."""
    name = _ID.sub("-", str(text).lower())[:16]
    return name if name[:1].isalpha() else f"{prefix}-{name}"[:16]


def _comma(text: Any) -> str:
    return str(text).replace(",", ",,")


def load(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as e:
        raise ConfigError(f"--firecracker-config {path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    top = _obj(data, path)
    argv: list[str] = []
    for section in top:
        if section in _REFUSED:
            raise ConfigError(f"{path}: {section!r} is not supported ({_REFUSED[section]})")
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r} (Bulkhead maps: "
                              f"{', '.join(sorted(_SECTIONS))})")
    if "boot-source" in top:
        where = f"{path}: boot-source"
        b = _obj(top["boot-source"], where)
        _keys(b, {"kernel_image_path", "boot_args", "initrd_path"}, where)
        if "kernel_image_path" not in b:
            raise ConfigError(f"{where}: kernel_image_path is required")
        argv += ["--kernel", str(b["kernel_image_path"])]
        if b.get("boot_args") is not None:
            argv += ["--cmdline", str(b["boot_args"])]
        if b.get("initrd_path") is not None:
            argv += ["--initrd", str(b["initrd_path"])]
    if "machine-config" in top:
        where = f"{path}: machine-config"
        m = _obj(top["machine-config"], where)
        _keys(m, {"vcpu_count", "mem_size_mib", "smt", "track_dirty_pages"}, where)
        for key in ("smt", "track_dirty_pages"):
            if m.get(key):
                raise ConfigError(f"{where}: {key}=true is not supported")
        if "vcpu_count" in m:
            argv += ["--vcpus", str(m["vcpu_count"])]
        if "mem_size_mib" in m:
            argv += ["--mem", str(m["mem_size_mib"])]
    for i, drive in enumerate(top.get("drives") or []):
        where = f"{path}: drives[{i}]"
        d = _obj(drive, where)
        _keys(d, {"drive_id", "path_on_host", "is_root_device", "is_read_only", "rate_limiter",
                  "cache_type", "io_engine", "partuuid", "socket"}, where)
        if "socket" in d:  # Firecracker's vhost-user-blk drive: the core is the frontend
            extra = sorted(set(d) - {"drive_id", "socket", "is_root_device"})
            if extra or "path_on_host" in d:
                raise ConfigError(f"{where}: a vhost-user drive (socket) takes only drive_id and "
                                  f"is_root_device, not {', '.join(extra or ['path_on_host'])}")
            items = [f"vhost-user={_comma(d['socket'])}"]
            if d.get("drive_id") is not None:
                items.append(f"id={_device_id(d['drive_id'], 'disk')}")
            argv += ["--disk", ",".join(items)]
            continue
        if d.get("cache_type", "Unsafe") != "Unsafe" or d.get("io_engine", "Sync") != "Sync":
            raise ConfigError(f"{where}: only cache_type Unsafe and io_engine Sync are supported")
        if d.get("partuuid"):
            raise ConfigError(f"{where}: partuuid is not supported")
        if "path_on_host" not in d:
            raise ConfigError(f"{where}: path_on_host is required")
        items = [f"path={_comma(d['path_on_host'])}"]
        if d.get("is_read_only"):
            items.append("readonly=on")
        if d.get("drive_id") is not None:
            items.append(f"id={_device_id(d['drive_id'], 'disk')}")
        items += _limiter(d.get("rate_limiter"), where + ".rate_limiter", "")
        argv += ["--disk", ",".join(items)]
    for i, nic in enumerate(top.get("network-interfaces") or []):
        where = f"{path}: network-interfaces[{i}]"
        n = _obj(nic, where)
        _keys(n, {"iface_id", "host_dev_name", "guest_mac", "rx_rate_limiter", "tx_rate_limiter"},
              where)
        if "host_dev_name" not in n:
            raise ConfigError(f"{where}: host_dev_name is required")
        items = [f"tap={_comma(n['host_dev_name'])}"]
        if n.get("guest_mac"):
            items.append(f"mac={n['guest_mac']}")
        if n.get("iface_id") is not None:
            items.append(f"id={_device_id(n['iface_id'], 'net')}")
        items += _limiter(n.get("rx_rate_limiter"), where + ".rx_rate_limiter", "rx_")
        items += _limiter(n.get("tx_rate_limiter"), where + ".tx_rate_limiter", "tx_")
        argv += ["--net", ",".join(items)]
    if top.get("vsock") is not None:
        where = f"{path}: vsock"
        v = _obj(top["vsock"], where)
        _keys(v, {"guest_cid", "uds_path", "vsock_id"}, where)
        if "guest_cid" not in v:
            raise ConfigError(f"{where}: guest_cid is required")
        items = [f"cid={v['guest_cid']}"]
        if v.get("uds_path"):
            items.append(f"socket={_comma(v['uds_path'])}")
        argv += ["--vsock", ",".join(items)]
    return argv
