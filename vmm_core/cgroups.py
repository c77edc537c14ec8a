"""The VM's cgroup: the core joins it before any device process exists, so every launcher and
device it spawns is born inside it (cgroup membership is inherited at fork) and the VM's memory
and pids limits cover all of them.  On exit the core moves back to where it came from and the
cgroup is removed (anything left in it is killed first)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from jail.cgroup import VmCgroup
from jail.errors import CgroupError

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PIDS_MAX = 512  # tasks, threads included: vCPUs, libzmq and supervisor threads, devices


@dataclass(frozen=True)
class CgroupLimits:
    memory_max: int | None = None  # bytes
    pids_max: int | None = DEFAULT_PIDS_MAX
    required: bool = False  # the user asked for limits: failing to set them is an error


class VmCgroupMembership:
    def __init__(self, name: str, limits: CgroupLimits) -> None:
        try:
            self.cgroup = VmCgroup.create(name, memory_max=limits.memory_max, pids_max=limits.pids_max)
        except CgroupError as e:
            if limits.required:
                raise ConfigError(f"{e}; run without --cgroup-memory-mib/--cgroup-pids-max or "
                                  "on a host with writable cgroups") from None
            raise
        self._pid = os.getpid()
        try:
            self.cgroup.add(self._pid)
        except CgroupError:
            self.cgroup.remove()
            raise

    def leave(self) -> None:
        """Move the core back to its original cgroups, then remove the VM's."""
        for d in self.cgroup.dirs.values():
            try:
                (d.parent.parent / "cgroup.procs").write_text(str(self._pid))
            except OSError as e:
                log.warning("cgroup: could not move the core out of %s: %s", d, e.strerror)
        try:
            self.cgroup.remove()
        except CgroupError as e:
            log.warning("%s", e)


def join_vm_cgroup(name: str, limits: CgroupLimits | None) -> VmCgroupMembership | None:
    """The VM's cgroup membership, or None when disabled or (limits not required) unavailable."""
    if limits is None:
        return None
    try:
        return VmCgroupMembership(name, limits)
    except CgroupError as e:
        log.warning("running without a VM cgroup: %s", e)
        return None
