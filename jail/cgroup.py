"""A cgroup per VM: memory and pids limits (and optionally a CPU quota) for its device processes.

cgroup v2 is used when a writable cgroup2 mount offers the memory, pids and cpu controllers;
otherwise cgroup v1, one directory per controller (`memory`, `pids`, `cpu`).  On hosts like ours
the v1 controllers are mounted and the v2 `unified` mount only has `hugetlb`, so v1 is chosen.

    cg = VmCgroup.create("vm-1234", memory_max=512 << 20, pids_max=64)
    spec = JailSpec(..., cgroup_procs=cg.procs_files())   # the launcher joins before forking
    ...
    cg.remove()                                             # kills leftovers, then rmdir

New cgroups go below the caller's own cgroup of each hierarchy (from /proc/self/cgroup), in a
`bulkhead/` directory, so a containerised core stays inside what it was given.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from jail.errors import CgroupConflict, CgroupError

CONTROLLERS = ("memory", "pids", "cpu")
IO_CONTROLLER = "blkio"  # v1; only when the VM has io limits (cgroup v2: "io")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CPU_PERIOD_US = 100_000  # the period every CPU quota is written with
STALE_AGE = 60.0  # s: an empty VM cgroup younger than this may belong to a VM being built


@dataclass(frozen=True)
class Mount:
    path: Path
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]
    writable: bool


def read_mounts(text: str | None = None) -> list[Mount]:
    """The cgroup mounts in /proc/mounts (or in `text`, for tests)."""
    if text is None:
        with open("/proc/mounts") as f:
            text = f.read()
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            opts = frozenset(parts[3].split(","))
            out.append(Mount(Path(parts[1]), parts[2], opts, "rw" in opts))
    return out


def own_cgroups(text: str | None = None) -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    if text is None:
        with open("/proc/self/cgroup") as f:
            text = f.read()
    out: dict[str, str] = {}
    for line in text.splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise CgroupError(f"cgroup: cannot write {value!r} to {path}: {err.strerror}") from None


TENANT_PREFIX = "tenant-"  # bulkhead/tenant-<name>/<vm>: a tenant's VMs, never a VM itself


@dataclass(frozen=True)
class IoLimit:
    """Throttles on one block device ("MAJ:MIN" of a whole disk) for a VM's cgroup: v1
    blkio.throttle.*_device, v2 io.max.  None leaves a direction unlimited."""

    device: str
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None


@dataclass(frozen=True)
class TenantLimits:
    """What all of one tenant's VMs may use together (None: no limit of the tenant's own)."""

    memory_max: int | None = None
    pids_max: int | None = None
    cpu_quota: float | None = None

    @property
    def empty(self) -> bool:
        return self.memory_max is None and self.pids_max is None and self.cpu_quota is None

    def as_reported(self, version: int) -> dict[str, str]:
        """The given limits as `VmCgroup.limits()` reads them back."""
        out: dict[str, str] = {}
        if self.memory_max is not None:
            out["memory"] = str(self.memory_max // 4096 * 4096)
        if self.pids_max is not None:
            out["pids"] = str(self.pids_max)
        if self.cpu_quota is not None:
            q = int(self.cpu_quota * CPU_PERIOD_US)
            out["cpu"] = f"{q} {CPU_PERIOD_US}" if version == 2 else str(q)
        return out


@dataclass
class VmCgroup:
    """One VM's cgroup directories (one for v2, one per controller for v1)."""

    name: str
    version: int
    dirs: dict[str, Path] = field(default_factory=dict)  # controller -> directory ("" for v2)

    @classmethod
    def create(cls, name: str, *, memory_max: int | None = None, pids_max: int | None = None,
               cpu_quota: float | None = None, version: int | None = None,
               tenant: str | None = None, io: tuple[IoLimit, ...] = (),
               tenant_limits: TenantLimits | None = None) -> VmCgroup:
        """Create (or reuse, if empty) the VM's cgroup and set its limits: `bulkhead/<name>`,
        or `bulkhead/tenant-<tenant>/<name>` for a tenant's VM.

        `cpu_quota` is in CPUs (1.5 = one and a half CPUs).  `version` forces 1 or 2.  `io`
        throttles block devices (v1 throttles direct and read-from-disk I/O only: buffered
        writes are written back outside the cgroup).  `tenant_limits` bound all of the tenant's
        VMs together, on `bulkhead/tenant-<tenant>` (set before the VM's own, which v1 wants
        no larger than its parent's).
        """
        if not _NAME.fullmatch(name):
            raise CgroupError(f"cgroup: bad name {name!r} (letters, digits, . _ - only)")
        if tenant is not None and not _NAME.fullmatch(tenant):
            raise CgroupError(f"cgroup: bad tenant {tenant!r} (letters, digits, . _ - only)")
        rel = Path(TENANT_PREFIX + tenant) / name if tenant else Path(name)
        mounts, own = read_mounts(), own_cgroups()
        if version in (None, 2):
            v2 = _pick_v2(mounts, own)
            if v2 is not None:
                cg = cls(name, 2, {"": v2 / "bulkhead" / rel})
                with cg._parent_locked():
                    cg._make(enable_in=v2, io=bool(io))
                    cg._limit(memory_max, pids_max, cpu_quota, io, tenant_limits)
                return cg
            if version == 2:
                raise CgroupError("cgroup: no writable cgroup2 mount with memory, pids and cpu")
        dirs: dict[str, Path] = {}
        for ctrl in CONTROLLERS + ((IO_CONTROLLER,) if io else ()):
            m = next((m for m in mounts if m.fstype == "cgroup" and ctrl in m.options), None)
            if m is None or not m.writable:
                raise CgroupError(f"cgroup: no writable v1 hierarchy has the {ctrl!r} controller")
            dirs[ctrl] = m.path / own.get(ctrl, "/").lstrip("/") / "bulkhead" / rel
        cg = cls(name, 1, dirs)
        with cg._parent_locked():
            cg._make()
            cg._limit(memory_max, pids_max, cpu_quota, io, tenant_limits)
        return cg

    @contextlib.contextmanager
    def _parent_locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the directory above the VM's (its tenant's) while the VM's
        directory is made and the tenant's limits checked and set: two VMs of one tenant started
        at once must not both find no running sibling, nor one count the other before it has
        passed the check."""
        key = min(c for c in self.dirs if c != IO_CONTROLLER)  # the same for VMs with io limits
        parent = self.dirs[key].parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise CgroupError(f"cgroup: cannot create {parent}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the lock

    def _limit(self, memory_max: int | None, pids_max: int | None, cpu_quota: float | None,
               io: tuple[IoLimit, ...], tenant_limits: TenantLimits | None) -> None:
        """All the limits of a new VM cgroup; on failure it is removed again (nothing joined)."""
        try:
            self._set_tenant_limits(tenant_limits)
            self.set_limits(memory_max, pids_max, cpu_quota)
            self.set_io(io)
        except CgroupError:
            try:
                self.remove()
            except CgroupError:
                pass
            raise

    def _set_tenant_limits(self, limits: TenantLimits | None) -> None:
        """The tenant directory's limits.  While another VM of the tenant runs, its limits stand:
        different ones are refused (a VM may not loosen, or tighten under, its neighbours)."""
        if limits is None or limits.empty:
            return
        tenant = VmCgroup(self.name + "/..", self.version,
                          {c: d.parent for c, d in self.dirs.items() if c != IO_CONTROLLER})
        siblings = {p.name for d in tenant.dirs.values() for p in d.iterdir()
                    if p.is_dir() and p.name != self.name}
        if siblings:
            now, wanted = tenant.limits(), limits.as_reported(self.version)
            differ = {k: now[k] for k, v in wanted.items() if now[k] != v}
            if differ:
                raise CgroupConflict(
                    f"cgroup: tenant {next(iter(tenant.dirs.values())).name} already runs VMs "
                    f"({', '.join(sorted(siblings))}) under other limits ("
                    + ", ".join(f"{k} {v}" for k, v in sorted(differ.items()))
                    + "): give the same tenant limits or none")
            return
        tenant.set_limits(limits.memory_max, limits.pids_max, limits.cpu_quota)

    def set_io(self, limits: tuple[IoLimit, ...]) -> None:
        """Write the block-device throttles (a failure, e.g. a device the kernel does not
        throttle, is a CgroupError: limits asked for must be in force)."""
        for lim in limits:
            values = {"read_bps": lim.read_bps, "write_bps": lim.write_bps,
                      "read_iops": lim.read_iops, "write_iops": lim.write_iops}
            try:
                if self.version == 2:
                    v2 = {"read_bps": "rbps", "write_bps": "wbps", "read_iops": "riops",
                          "write_iops": "wiops"}
                    _write(self.dirs[""] / "io.max", lim.device + "".join(
                        f" {v2[k]}={v}" for k, v in values.items() if v is not None))
                else:
                    for key, value in values.items():
                        if value is not None:
                            _write(self.dirs[IO_CONTROLLER] / f"blkio.throttle.{key}_device",
                                   f"{lim.device} {value}")
            except CgroupError as e:
                raise CgroupError(f"{e} (io limit on block device {lim.device})") from None

    def _make(self, enable_in: Path | None = None, io: bool = False) -> None:
        for d in self.dirs.values():
            try:
                if enable_in is not None:  # v2: controllers must be enabled down the path
                    chain = [enable_in]
                    for p in reversed(d.relative_to(enable_in).parents[:-1]):
                        chain.append(enable_in / p)
                    for p in chain:
                        p.mkdir(exist_ok=True)
                        _write(p / "cgroup.subtree_control",
                               "+memory +pids +cpu" + (" +io" if io else ""))
                d.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CgroupError(f"cgroup: cannot create {d}: {err.strerror}") from None
            if self._procs(d):
                raise CgroupError(f"cgroup: {d} already holds processes (another VM named "
                                  f"{self.name!r}?)")

    def set_limits(self, memory_max: int | None = None, pids_max: int | None = None,
                   cpu_quota: float | None = None) -> None:
        """Set whichever limits are given; None leaves a limit as it is."""
        period = CPU_PERIOD_US
        if self.version == 2:
            d = self.dirs[""]
            if memory_max is not None:
                _write(d / "memory.max", str(memory_max))
            if pids_max is not None:
                _write(d / "pids.max", str(pids_max))
            if cpu_quota is not None:
                _write(d / "cpu.max", f"{int(cpu_quota * period)} {period}")
            return
        if memory_max is not None:
            _write(self.dirs["memory"] / "memory.limit_in_bytes", str(memory_max))
        if pids_max is not None:
            _write(self.dirs["pids"] / "pids.max", str(pids_max))
        if cpu_quota is not None:
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(period))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(int(cpu_quota * period)))

    def child(self, name: str, *, memory_max: int | None = None, pids_max: int | None = None,
              cpu_quota: float | None = None) -> "VmCgroup":
        """A cgroup below this one (a device's, below its VM's), with its own limits.

        cgroup v2 allows processes only in leaves once controllers are enabled below: the
        caller keeps its own processes in a leaf child too (`VmCgroupMembership` puts the core
        in `core/`)."""
        if not _NAME.fullmatch(name):
            raise CgroupError(f"cgroup: bad name {name!r} (letters, digits, . _ - only)")
        # Not below the VM's blkio cgroup: its processes stay in the VM's, whose throttles are
        # then certainly theirs (v1 throttling is not hierarchical everywhere).
        cg = VmCgroup(f"{self.name}/{name}", self.version,
                      {c: d / name for c, d in self.dirs.items() if c != IO_CONTROLLER})
        if self.version == 2:
            _write(self.dirs[""] / "cgroup.subtree_control", "+memory +pids +cpu")
        for d in cg.dirs.values():
            try:
                d.mkdir(exist_ok=True)
            except OSError as err:
                raise CgroupError(f"cgroup: cannot create {d}: {err.strerror}") from None
        cg.set_limits(memory_max, pids_max, cpu_quota)
        return cg

    def oom_kills(self) -> int:
        """How many processes the kernel has killed here for going over the memory limit."""
        path = self.dirs[""] / "memory.events" if self.version == 2 else \
            self.dirs["memory"] / "memory.oom_control"
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def memory_limit_hits(self) -> int:
        """How many times an allocation here met the memory limit (v1 memory.failcnt, v2 the
        `max` count of memory.events): a process silent while this grows is stalled in reclaim
        at its limit, whether or not the OOM killer has got to it yet."""
        try:
            if self.version == 2:
                for line in (self.dirs[""] / "memory.events").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value)
                return 0
            return int((self.dirs["memory"] / "memory.failcnt").read_text())
        except (OSError, ValueError, KeyError):
            return 0

    def cpu_throttled(self) -> int:
        """How many CPU-quota periods the cgroup was throttled in (cpu.stat)."""
        d = self.dirs[""] if self.version == 2 else self.dirs["cpu"]
        try:
            for line in (d / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "nr_throttled":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def limits(self) -> dict[str, str]:
        """The limits as the kernel reports them (for `bulkhead ps` and tests)."""
        if self.version == 2:
            d = self.dirs[""]
            files = {"memory": d / "memory.max", "pids": d / "pids.max", "cpu": d / "cpu.max"}
        else:
            files = {"memory": self.dirs["memory"] / "memory.limit_in_bytes",
                     "pids": self.dirs["pids"] / "pids.max",
                     "cpu": self.dirs["cpu"] / "cpu.cfs_quota_us"}
        return {k: p.read_text().strip() for k, p in files.items()}

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes its pid to (JailSpec.cgroup_procs)."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def add(self, pid: int) -> None:
        for f in self.procs_files():
            _write(Path(f), str(pid))

    @staticmethod
    def _procs(d: Path) -> set[int]:
        try:
            return {int(x) for x in (d / "cgroup.procs").read_text().split()}
        except OSError:
            return set()

    def pids(self) -> set[int]:
        """Every process in this cgroup and the cgroups below it."""
        out: set[int] = set()
        for d in self.dirs.values():
            for sub, _, _ in os.walk(d):
                out |= self._procs(Path(sub))
        return out

    def remove(self, timeout: float = 5.0) -> None:
        """SIGKILL whatever is left in the cgroup, wait for it to empty, remove the directories."""
        deadline = time.monotonic() + timeout
        me = os.getpid()
        while pids := self.pids() - {me}:  # never ourselves: the caller may still be inside
            for pid in pids:
                try:  # a pidfd: the pid read from the cgroup may have gone and been reused
                    fd = os.pidfd_open(pid)
                except (ProcessLookupError, OSError):
                    continue
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                finally:
                    os.close(fd)
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup: processes {sorted(pids)} did not leave {self.name}")
            time.sleep(0.02)
        for d in self.dirs.values():
            for child in sorted((c for c in d.iterdir() if c.is_dir()), reverse=True) \
                    if d.is_dir() else []:
                try:
                    child.rmdir()  # a device's cgroup, empty now that its processes are gone
                except OSError:
                    pass
            for path in _up_to_bulkhead(d):  # the VM's directory, its tenant's, bulkhead/ if empty
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as err:
                    if path == d:
                        raise CgroupError(f"cgroup: cannot remove {d}: {err.strerror}") from None

    def __enter__(self) -> VmCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _up_to_bulkhead(d: Path) -> list[Path]:
    """`d`, its tenant directory if any, then the `bulkhead` directory above them."""
    out, p = [d], d.parent
    while p.name.startswith(TENANT_PREFIX):
        out.append(p)
        p = p.parent
    return out + [p]


def outside(d: Path) -> Path:
    """The cgroup the `bulkhead` tree of `d` hangs below (where the core came from)."""
    return _up_to_bulkhead(d)[-1].parent


def _pick_v2(mounts: list[Mount], own: dict[str, str]) -> Path | None:
    for m in mounts:
        if m.fstype != "cgroup2" or not m.writable:
            continue
        base = m.path / own.get("", "/").lstrip("/")
        try:
            available = set((base / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        if set(CONTROLLERS) <= available and os.access(base, os.W_OK):
            return base
    return None


def reap_stale(live_names: set[str]) -> list[str]:
    """Remove the cgroups of VMs that are gone (a core killed by SIGKILL or the OOM killer
    could not remove its own): every `bulkhead/<name>` below our own cgroups whose name is not
    a live VM and which holds no process.  Returns the names removed."""
    removed = []
    mounts, own = read_mounts(), own_cgroups()
    bases = []
    for m in mounts:
        if not m.writable:
            continue
        if m.fstype == "cgroup2":
            bases.append(m.path / own.get("", "/").lstrip("/") / "bulkhead")
        else:
            for ctrl in CONTROLLERS + (IO_CONTROLLER,):
                if ctrl in m.options:
                    bases.append(m.path / own.get(ctrl, "/").lstrip("/") / "bulkhead")
    for base in bases:
        try:
            entries = [e for e in base.iterdir() if e.is_dir()]
            tenants = [e for e in entries if e.name.startswith(TENANT_PREFIX)]
            entries = [e for e in entries if e not in tenants] + \
                [v for t in tenants for v in t.iterdir() if v.is_dir()]
        except OSError:
            continue
        for d in entries:
            if d.name in live_names or not _NAME.fullmatch(d.name):
                continue
            try:  # a VM starting right now has an empty cgroup for a moment: leave young ones
                if time.time() - d.stat().st_mtime < STALE_AGE:
                    continue
            except OSError:
                continue
            cg = VmCgroup(d.name, 1, {"": d})
            if cg.pids():
                continue
            for sub, _, _ in sorted(os.walk(d), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(sub)
                except OSError:
                    break
            else:
                removed.append(d.name)
        for t in tenants:
            try:
                t.rmdir()  # only once its last VM is gone
            except OSError:
                pass
    return sorted(set(removed))
