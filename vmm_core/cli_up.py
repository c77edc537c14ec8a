"""`bulkhead up | logs | down`: many VMs from config files, detached.

    bulkhead up vm.toml fc.json examples/        # each file (a directory: its *.toml and *.json)
    bulkhead logs NAME [-f]
    bulkhead down NAME... | --all [--grace S]

`up` starts `bulkhead run --config FILE` (or `--firecracker-config` for .json) for each file as a
detached process in its own session (so a terminal's signals do not reach it), its output in
`<host runtime dir>/logs/<name>.log` (0600) and its pid in `<name>.pid` beside it; it returns
once every VM answers on its API, or says which did not (their log's last lines) and exits 1.
At most `--parallel` VMs (default 2 per CPU) are coming up at once; the next starts as soon as
one is up, so a directory of many VMs does not stretch every start past its timeouts.
A VM's name is the file's `name` key, else the file name without its extension; the VM runs in
the file's directory, so relative paths in it are relative to the file.  Every file is checked
before anything starts: a bad one is one line and exit 2, and nothing runs.

`down` presses each VM's ACPI power button (`PUT /api/v1/vm.power-button`: a guest OS that
handles it shuts down and powers off), gives the guests `--grace` seconds, then asks the VMs
that are still running to shut down (`PUT /api/v1/vm.shutdown`: the core stops its vCPUs and
devices and exits 0), and past another 10 s SIGKILLs the core through a pidfd taken while the
registry still named that very process (pid and start time); its device processes die with it
and the next VM start reclaims what it left.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from jail.pidfd import ProcessRef, open_ref

from . import control_protocol as cp
from . import registry
from .control import ControlError, request_entry
from .errors import BulkheadError, ConfigError

UP_WAIT = 60.0


def add_parsers(sub: Any) -> None:
    up = sub.add_parser("up", help="start VMs from config files (TOML, or Firecracker JSON), detached")
    up.add_argument("paths", nargs="+", metavar="FILE|DIR")
    up.add_argument("--wait", type=float, default=UP_WAIT, metavar="SECONDS",
                    help=f"how long to wait for each VM's API (default {UP_WAIT:.0f})")
    up.add_argument("--parallel", type=_parallel, default=default_parallel(), metavar="N",
                    help="start at most N VMs at a time: the next starts when one is up "
                         f"(default {default_parallel()}, 2 per CPU)")
    logs = sub.add_parser("logs", help="print a VM's output (started by `bulkhead up`)")
    logs.add_argument("vm", metavar="VM")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the VM exits")
    down = sub.add_parser("down", help="shut VMs down: the ACPI power button, the VMM's stop after "
                                       "--grace, SIGKILL as the last resort")
    down.add_argument("vms", nargs="*", metavar="VM")
    down.add_argument("--all", action="store_true", help="every running VM")
    down.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                      help="how long a guest may take to power off after the power button "
                           "before the VMM stops it (default 10)")
    for p in (up, logs, down):
        p.add_argument("-v", "--verbose", action="count", default=0)


def default_parallel() -> int:
    # Every VM start is CPU-bound (a core, a zygote, its devices' handshakes): far more starting
    # at once than there are CPUs only stretches each start towards its device-start timeout.
    # Measured on 2 CPUs (benchmarks/density.py's VMs): 2 per CPU brought 40 VMs up in 19.6 s;
    # 4 per CPU took 21-23 s.
    return 2 * (len(os.sched_getaffinity(0)) or 1)


def _parallel(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{value}: give 1 to 10000")
    return value


def logs_dir() -> Path:
    d = registry.registry_dir().parent / "logs"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def config_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".toml", ".json") and f.is_file())
            if not found:
                raise ConfigError(f"{p}: no *.toml or *.json config files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file or directory")
    return out


def vm_name(path: Path) -> str:
    """The config's `name` key, else the file name without its extension."""
    name = None
    if path.suffix == ".toml":
        try:
            name = tomllib.loads(path.read_text()).get("name")
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            name = None  # `config check` reports it
    name = name or path.stem
    if not isinstance(name, str) or not registry.valid_name(name):
        raise ConfigError(f"{path}: VM name {name!r}: use 1-32 letters, digits, '-' or '_' "
                          "(set `name` in the file)")
    return name


def _run_argv(path: Path, name: str) -> list[str]:
    flag = "--firecracker-config" if path.suffix == ".json" else "--config"
    return [sys.executable, "-m", "vmm_core.cli", "run", flag, str(path.resolve()), "--name", name]


def cmd_up(args: argparse.Namespace, run_parser: argparse.ArgumentParser, out=sys.stdout) -> int:
    from .vm_config import expand
    files = [f.resolve() for f in config_files(args.paths)]
    plan: list[tuple[Path, str]] = []
    for f in files:
        name = vm_name(f)
        if any(name == n for _, n in plan):
            raise ConfigError(f"{f}: another file also names its VM {name}")
        if registry.lookup(name) is not None:
            raise ConfigError(f"{f}: a VM named {name} is running already")
        flag = "--firecracker-config" if f.suffix == ".json" else "--config"
        here = os.getcwd()
        os.chdir(f.resolve().parent)  # its relative paths, as the VM will see them
        try:
            run_parser.parse_args(expand([flag, str(f.resolve()), "--name", name], run_parser))
        finally:
            os.chdir(here)
        plan.append((f, name))
    root = Path(__file__).resolve().parent.parent
    starting: list[tuple[str, subprocess.Popen, Path, float]] = []
    failed = 0

    def settle(at_most: int) -> None:
        """Wait until no more than `at_most` VMs are still coming up, reporting each."""
        nonlocal failed
        while len(starting) > at_most:
            for item in list(starting):
                name, proc, log, deadline = item
                state = _state(name, proc, deadline)
                if state is None:
                    continue
                starting.remove(item)
                if state:
                    print(f"started VM {name} (pid {proc.pid}, log {log})", file=out)
                else:
                    failed += 1
                    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                    print(f"bulkhead: VM {name} did not come up: "
                          + (" | ".join(tail) or "no output"), file=sys.stderr)
            if len(starting) > at_most:
                time.sleep(0.02)

    for f, name in plan:
        settle(args.parallel - 1)
        log = logs_dir() / f"{name}.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # Relative paths in a config file are relative to the file.
            env = {**os.environ, "PYTHONPATH": str(root)}
            proc = subprocess.Popen(_run_argv(f, name), cwd=f.resolve().parent, env=env,
                                    stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                    start_new_session=True)
        finally:
            os.close(fd)
        (logs_dir() / f"{name}.pid").write_text(f"{proc.pid}\n")
        starting.append((name, proc, log, time.monotonic() + args.wait))
    settle(0)
    return 1 if failed else 0


def _state(name: str, proc: subprocess.Popen, deadline: float) -> bool | None:
    """True once the VM answers on its API, False if it exited or ran out of time, else None."""
    if proc.poll() is not None:
        return False
    entry = registry.lookup(name)
    if entry is not None and entry.pid == proc.pid and os.path.exists(entry.api_socket):
        return True
    return False if time.monotonic() >= deadline else None


def cmd_logs(args: argparse.Namespace, out=sys.stdout) -> int:
    log = logs_dir() / f"{args.vm}.log"
    if not log.exists():
        raise BulkheadError(f"no log of a VM named {args.vm!r} (only VMs started by "
                            "`bulkhead up` have one)")
    with open(log, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk.decode(errors="replace"))
                out.flush()
                continue
            if not args.follow or registry.lookup(args.vm) is None:
                return 0
            time.sleep(0.2)


STOP_WAIT = 10.0  # s a VM may take to stop once asked through its API
REQUEST_TIMEOUT = 2.0


def cmd_down(args: argparse.Namespace, out=sys.stdout) -> int:
    """The power button, `--grace` seconds for the guest to power off, then the API's
    shutdown (the VMM stops the guest), then SIGKILL of the core after STOP_WAIT."""
    if args.all == bool(args.vms):
        raise BulkheadError("bulkhead down: name the VMs or give --all (not both)")
    entries = registry.running() if args.all else []
    for name in args.vms:
        entry = registry.lookup(name)
        if entry is None:
            known = ", ".join(e.name for e in registry.running()) or "none"
            raise BulkheadError(f"no running VM named {name!r} (running: {known})")
        entries.append(entry)
    refs = {e.name: _ref_of(e) for e in entries}
    how = {e.name: "powered off by its guest (ACPI power button)" for e in entries}
    for entry in entries:
        _ask(entry, cp.PowerButton())
    _wait_gone(entries, args.grace)
    status = 0
    late = [e for e in entries if registry.is_alive(e)]
    for entry in late:
        how[entry.name] = f"stopped by the VMM after the {args.grace:g} s grace"
        _ask(entry, cp.Stop())
    _wait_gone(late, STOP_WAIT)
    for entry in late:
        ref = refs[entry.name]
        if registry.is_alive(entry) and ref is not None and ref.send(signal.SIGKILL):
            how[entry.name] = f"killed (no answer within {args.grace:g} + {STOP_WAIT:g} s)"
            status = 1
            while registry.is_alive(entry):
                time.sleep(0.02)
    for entry in entries:
        if refs[entry.name] is not None:
            refs[entry.name].close()
        print(f"VM {entry.name} (pid {entry.pid}): {how[entry.name]}", file=out)
    return status


def _ask(entry: registry.VmEntry, req: cp.Request) -> None:
    try:
        request_entry(entry, req, REQUEST_TIMEOUT)
    except ControlError as err:
        print(f"bulkhead: VM {entry.name}: {err}", file=sys.stderr)


def _wait_gone(entries: list[registry.VmEntry], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(registry.is_alive(e) for e in entries) and time.monotonic() < deadline:
        time.sleep(0.05)


def _ref_of(entry: registry.VmEntry) -> ProcessRef | None:
    """A pidfd of the entry's core, taken only if pid and start time still match (None: gone)."""
    ref = open_ref(entry.pid)
    if ref is not None and registry.process_start_ticks(entry.pid) != entry.start_ticks:
        ref.close()  # the pid now belongs to another process
        return None
    return ref
