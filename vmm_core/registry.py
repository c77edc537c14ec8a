"""Which VMs are running, by name: one small JSON file per VM in a private registry directory.

`$XDG_RUNTIME_DIR/bulkhead/vms/<name>.json` (without XDG_RUNTIME_DIR: `/run/bulkhead/vms/` for
root, where no other user can plant the directory first; `/tmp/bulkhead-<uid>/vms/` for others,
checked to be theirs and private) holds the VM's core pid, that process's start time and its runtime directory.
The core writes its entry when it starts and removes it when it exits; a core killed by SIGKILL
leaves a stale entry behind, which every reader recognises (the pid is gone, or it is another
process: the start time differs) and removes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

ENTRY_SUFFIX = ".json"
API_SOCKET = "api.sock"


@dataclass(frozen=True)
class VmEntry:
    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a live VM from a reused pid
    runtime_dir: str

    @property
    def api_socket(self) -> str:
        """The VM's HTTP API (`vmm_core.control`)."""
        return os.path.join(self.runtime_dir, API_SOCKET)


def valid_name(name: str) -> bool:
    """1-32 ASCII letters, digits, '-' or '_' (it names sockets, cgroups and files)."""
    return 0 < len(name) <= 32 and name.isascii() and \
        name.replace("-", "").replace("_", "").isalnum()


def process_start_ticks(pid: int) -> int | None:
    """The start time of a live `pid`; None if there is none (a zombie has exited: None)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


ROOT_RUN_DIR = Path("/run")


def registry_base() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "bulkhead"
    if os.getuid() == 0 and ROOT_RUN_DIR.is_dir():
        return ROOT_RUN_DIR / "bulkhead"
    return Path(tempfile.gettempdir()) / f"bulkhead-{os.getuid()}"


def registry_dir() -> Path:
    """The per-user registry directory, created 0700 and checked to be ours."""
    base = registry_base()
    path = base / "vms"
    for p in (base, path):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(p)
        # A directory someone else planted (in /tmp) could redirect our clients: refuse it.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"{p} is not a private directory of this user: remove it and retry")
    return path


def _read(path: Path) -> VmEntry | None:
    try:
        data = json.loads(path.read_text())
        entry = VmEntry(str(data["name"]), int(data["pid"]), int(data["start_ticks"]),
                        str(data["runtime_dir"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry if valid_name(entry.name) else None


def is_alive(entry: VmEntry) -> bool:
    return process_start_ticks(entry.pid) == entry.start_ticks


def lookup(name: str) -> VmEntry | None:
    """The running VM called `name`, or None (a stale entry is removed on the way)."""
    if not valid_name(name):
        return None
    path = registry_dir() / f"{name}{ENTRY_SUFFIX}"
    entry = _read(path)
    if entry is None:
        return None
    if not is_alive(entry):
        _forget_dead(path, entry)
        return None
    return entry


def running() -> list[VmEntry]:
    out = []
    for path in sorted(registry_dir().glob(f"*{ENTRY_SUFFIX}")):
        entry = _read(path)
        if entry is not None and is_alive(entry):
            out.append(entry)
        elif entry is not None:
            _forget_dead(path, entry)
    return out


def register(name: str, runtime_dir: Path) -> VmEntry:
    """Claim `name` for this process; ConfigError if a live VM already has it."""
    if not valid_name(name):
        raise ConfigError(f"--name {name!r}: use 1-32 letters, digits, '-' or '_'")
    existing = lookup(name)
    if existing is not None and existing.pid != os.getpid():
        raise ConfigError(f"--name {name}: a VM of that name is running (pid {existing.pid}); "
                          "pick another name or `bulkhead stop` it")
    ticks = process_start_ticks(os.getpid())
    entry = VmEntry(name, os.getpid(), ticks if ticks is not None else 0, str(runtime_dir))
    path = registry_dir() / f"{name}{ENTRY_SUFFIX}"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(entry)))
    os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
    return entry


def unregister(entry: VmEntry) -> None:
    _remove_if(registry_dir() / f"{entry.name}{ENTRY_SUFFIX}", entry)


def _forget_dead(path: Path, entry: VmEntry) -> None:
    """A core killed without cleaning up: drop its entry and its runtime directory (its device
    processes died with it, PR_SET_PDEATHSIG)."""
    _remove_if(path, entry)
    rdir = Path(entry.runtime_dir)
    try:
        st = os.lstat(rdir)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and rdir.name.startswith(f"bulkhead-{entry.name}-"):
        shutil.rmtree(rdir, ignore_errors=True)


def _remove_if(path: Path, entry: VmEntry) -> None:
    """Remove `path` only if it still describes `entry` (a new VM may have taken the name)."""
    if _read(path) == entry:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
