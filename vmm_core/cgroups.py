"""The VM's cgroup: the core joins it before any device process exists, so every launcher and
device it spawns is born inside it (cgroup membership is inherited at fork) and the VM's memory
and pids limits cover all of them.  On exit the core moves back to where it came from and the
cgroup is removed (anything left in it is killed first)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from jail.cgroup import IoLimit, TenantLimits, VmCgroup, outside, reap_stale
from jail.errors import CgroupConflict, CgroupError

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PIDS_MAX = 512  # tasks, threads included: vCPUs, libzmq and supervisor threads, devices
MIN_MEMORY_MARGIN = 128 << 20  # what the core needs beyond guest RAM (its own heap, libraries)


@dataclass(frozen=True)
class CgroupLimits:
    memory_max: int | None = None  # bytes
    pids_max: int | None = DEFAULT_PIDS_MAX
    required: bool = False  # the user asked for limits: failing to set them is an error
    cpu_quota: float | None = None  # CPUs, for the core and all its devices together
    tenant: str | None = None       # bulkhead/tenant-<tenant>/<vm>
    io: tuple[IoLimit, ...] = ()    # throttles on the block devices holding the disk images
    tenant_limits: TenantLimits | None = None  # on bulkhead/tenant-<tenant>, for all its VMs


class VmCgroupMembership:
    def __init__(self, name: str, limits: CgroupLimits) -> None:
        try:
            self.cgroup = VmCgroup.create(name, memory_max=limits.memory_max,
                                          pids_max=limits.pids_max, cpu_quota=limits.cpu_quota,
                                          tenant=limits.tenant, io=limits.io,
                                          tenant_limits=limits.tenant_limits)
        except CgroupConflict as e:
            raise ConfigError(str(e)) from None  # the request, not the host, is at fault
        except CgroupError as e:
            if limits.required:
                raise ConfigError(f"{e}; run without --cgroup-memory-mib/--cgroup-pids-max or "
                                  "on a host with writable cgroups") from None
            raise
        self._pid = os.getpid()
        self.cpu_quota = limits.cpu_quota
        try:
            if self.cgroup.version == 2:
                # v2: processes only in leaves once the devices' cgroups exist below the VM's.
                self.cgroup.child("core").add(self._pid)
            else:
                self.cgroup.add(self._pid)
        except CgroupError:
            self.cgroup.remove()
            raise

    def adopt(self, pid: int) -> None:
        """Move `pid` (a helper the core started before the VM's cgroup existed: the prestarted
        device zygote) in beside the core, so the VM's limits count it too."""
        target = self.cgroup.child("core") if self.cgroup.version == 2 else self.cgroup
        try:
            target.add(pid)
        except CgroupError as e:
            log.warning("cgroup: could not move pid %d into the VM's cgroup: %s", pid, e)

    def device_cgroup(self, name: str, memory_max: int | None,
                      cpu_quota: float | None) -> VmCgroup:
        """A device's own cgroup below the VM's: its launcher, init and device are born there,
        so its memory limit and CPU quota bound the device alone."""
        if self.cpu_quota is not None:  # cgroup v1 refuses a child quota above its parent's
            cpu_quota = self.cpu_quota if cpu_quota is None else min(cpu_quota, self.cpu_quota)
        try:
            return self.cgroup.child(name, memory_max=memory_max, cpu_quota=cpu_quota)
        except CgroupError as e:
            raise ConfigError(f"device {name}: {e}") from None

    def leave(self) -> None:
        """Move the core back to its original cgroups, then remove the VM's."""
        for d in self.cgroup.dirs.values():
            try:
                (outside(d) / "cgroup.procs").write_text(str(self._pid))
            except OSError as e:
                log.warning("cgroup: could not move the core out of %s: %s", d, e.strerror)
        try:
            self.cgroup.remove()
        except CgroupError as e:
            log.warning("%s", e)


def block_device_of(path: str) -> str:
    """"MAJ:MIN" of the whole disk holding file `path` (what blkio/io throttles take; a
    partition's is its disk's), or ConfigError naming the file and what to do."""
    try:
        dev = os.stat(path).st_dev
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    sys_dir = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) == 0 or not os.path.isdir(sys_dir):
        raise ConfigError(f"{path} is on a filesystem without a block device (tmpfs, overlay, "
                          "NFS?): io limits throttle block devices; put the image on a disk's "
                          "filesystem or drop the --cgroup-io-* limits")
    if os.path.exists(os.path.join(sys_dir, "partition")):
        sys_dir = os.path.join(os.path.realpath(sys_dir), "..")
    with open(os.path.join(sys_dir, "dev")) as f:
        return f.read().strip()


def io_limits(paths: list[str], read_bps: int | None, write_bps: int | None,
              read_iops: int | None, write_iops: int | None) -> tuple[IoLimit, ...]:
    """One IoLimit per block device under the images at `paths` (none if no limit is given)."""
    if all(v is None for v in (read_bps, write_bps, read_iops, write_iops)):
        return ()
    devices = list(dict.fromkeys(block_device_of(p) for p in paths))
    return tuple(IoLimit(d, read_bps, write_bps, read_iops, write_iops) for d in devices)


def join_vm_cgroup(name: str, limits: CgroupLimits | None) -> VmCgroupMembership | None:
    """The VM's cgroup membership, or None when disabled (`--no-cgroup`).  A cgroup that cannot
    be made is an error: a VM silently running without its limits is worse than one that does
    not start."""
    if limits is None:
        return None
    try:
        return VmCgroupMembership(name, limits)
    except CgroupError as e:
        raise ConfigError(f"{e}; give --no-cgroup to run without the VM's cgroup (and its "
                          "memory, pids and per-device limits)") from None


def reap_stale_vms() -> None:
    """Registry entries, runtime directories and cgroups of VMs whose core is gone."""
    from . import registry
    try:
        live = {e.name for e in registry.running()}  # reads reap dead entries and their dirs
        for name in reap_stale(live):
            log.info("removed the cgroup of VM %s, which ended without cleaning up", name)
    except (OSError, ConfigError) as e:
        log.warning("could not reap stale VMs: %s", e)
