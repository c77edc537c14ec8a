"""How the devices of one VM run: frozen option sets built once (from the CLI or a config file).

One default per setting, here, and it is the README's.  Everything below the CLI receives these
objects and reads attributes; nothing reads an option dict with `.get()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from jail.options import JailOptions

from ..errors import ConfigError

POLICIES = ("restart", "fail", "stop-vm")
SPAWN_METHODS = ("zygote", "exec")

DEFAULT_DEVICE_TIMEOUT = 0.5     # s a vCPU waits for a register read before the device fails
DEFAULT_HEARTBEAT_INTERVAL = 0.25
DEFAULT_HEARTBEAT_TIMEOUT = 0.5
DEFAULT_START_TIMEOUT = 10.0    # s from spawn to Ready (many VMs starting at once on few CPUs need more)
DEFAULT_MAX_RESTARTS = 100
DEFAULT_RESTART_WINDOW = 30.0
DEFAULT_RING_SPIN_US = 100
MAX_RING_SPIN_US = 10_000        # a spin longer than this only burns the CPU the peer needs
MAX_TIMEOUT = 3600.0             # s: longer "timeouts" are typos
DEFAULT_DEVICE_MEMORY = 256 << 20  # a device process needs ~40 MiB; page cache is reclaimable
DEFAULT_DEVICE_CPU_QUOTA = 1.0   # CPUs: one device can never take the whole host


def check_seconds(value: float, what: str, *, low: float = 0.0, high: float = MAX_TIMEOUT) -> float:
    """`value` if it is a finite number of seconds in (low, high]; else a one-line ConfigError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low < value <= high:
        raise ConfigError(f"{what} {value!r}: give a number of seconds above {low:g} and at most "
                          f"{high:g}")
    return float(value)


@dataclass(frozen=True)
class SupervisionPolicy:
    """What a device failure does, and how a failure is noticed."""

    on_crash: str = "restart"
    max_restarts: int = DEFAULT_MAX_RESTARTS
    restart_window: float = DEFAULT_RESTART_WINDOW
    device_timeout: float = DEFAULT_DEVICE_TIMEOUT
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    start_timeout: float = DEFAULT_START_TIMEOUT

    def __post_init__(self) -> None:
        if self.on_crash not in POLICIES:
            raise ConfigError(f"on-crash {self.on_crash!r}: choose one of {', '.join(POLICIES)}")
        if type(self.max_restarts) is not int or not 1 <= self.max_restarts <= 1_000_000:
            raise ConfigError(f"max-restarts {self.max_restarts!r}: give 1 to 1000000")
        check_seconds(self.restart_window, "restart-window")
        check_seconds(self.device_timeout, "device timeout", high=60.0)
        check_seconds(self.heartbeat_interval, "heartbeat interval", high=60.0)
        check_seconds(self.heartbeat_timeout, "heartbeat timeout", high=60.0)
        check_seconds(self.start_timeout, "device start timeout")

    def with_on_crash(self, on_crash: str | None) -> "SupervisionPolicy":
        return self if on_crash is None else replace(self, on_crash=on_crash)


@dataclass(frozen=True)
class DeviceOptions:
    """Where and how the VM's devices run."""

    sandbox: bool = True                     # False: --no-sandbox, devices inside the core
    jail: JailOptions | None = field(default_factory=JailOptions)  # None: --no-jail
    spawn_method: str = "zygote"
    ring_spin_us: int = DEFAULT_RING_SPIN_US
    allow_faults: bool = False
    supervision: SupervisionPolicy = field(default_factory=SupervisionPolicy)
    # Each device's own cgroup (below the VM's): memory limit in bytes and CPU quota in CPUs;
    # None = unlimited.  A device over its memory is killed by the kernel and restarted with
    # cause "memory limit"; quota periods it was throttled in are counted in its stats.
    device_memory_max: int | None = DEFAULT_DEVICE_MEMORY
    device_cpu_quota: float | None = DEFAULT_DEVICE_CPU_QUOTA

    def __post_init__(self) -> None:
        if self.spawn_method not in SPAWN_METHODS:
            raise ConfigError(f"spawn method {self.spawn_method!r}: choose one of "
                              f"{', '.join(SPAWN_METHODS)}")
        if type(self.ring_spin_us) is not int or not 0 <= self.ring_spin_us <= MAX_RING_SPIN_US:
            raise ConfigError(f"ring-spin-us {self.ring_spin_us!r}: give 0 to {MAX_RING_SPIN_US}")
        if self.device_memory_max is not None and self.device_memory_max < 64 << 20:
            raise ConfigError(f"device memory {max(0, self.device_memory_max) >> 20} MiB: a "
                              "device process needs at least 64 MiB (0 = no limit)")
        if self.device_cpu_quota is not None and not 0.01 <= self.device_cpu_quota <= 1024:
            raise ConfigError(f"device CPU quota {self.device_cpu_quota}: give 0.01 to 1024 CPUs")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "DeviceOptions":
        """The old option-dict spelling (tests, tools): `{"on_device_crash": ..., "spawn_options":
        {"jail": ..., "spawn_method": ...}, ...}`; unknown keys are refused."""
        values = dict(values)
        spawn = dict(values.pop("spawn_options", {}))
        sup_keys = {"on_device_crash": "on_crash", "max_restarts": "max_restarts",
                    "restart_window": "restart_window", "device_timeout": "device_timeout",
                    "heartbeat_interval": "heartbeat_interval",
                    "heartbeat_timeout": "heartbeat_timeout"}
        sup = {sup_keys[k]: values.pop(k) for k in list(values) if k in sup_keys}
        kwargs: dict[str, Any] = {}
        for k in ("sandbox", "ring_spin_us", "allow_faults"):
            if k in values:
                kwargs[k] = values.pop(k)
        if "jail" in spawn:
            kwargs["jail"] = JailOptions.coerce(spawn.pop("jail"))
        if "spawn_method" in spawn:
            kwargs["spawn_method"] = spawn.pop("spawn_method")
        if values or spawn:
            raise ConfigError(f"unknown device options {sorted({*values, *spawn})}")
        return cls(supervision=SupervisionPolicy(**sup), **kwargs)
