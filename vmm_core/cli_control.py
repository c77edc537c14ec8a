"""`bulkhead ps | stats | stop | pause | resume | fault`: the verbs that talk to running VMs (`vmm_core.control`).

Bad input (unknown VM or device, a refused fault) is one line on stderr and exit status 2, like
every other verb; the output for people is a table, `--json` gives the raw reply for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

from . import control_protocol as cp
from . import registry
from .control import ControlError, request, request_entry


def add_parsers(sub: Any, positive_int: Callable[[str], int]) -> None:
    ps = sub.add_parser("ps", help="list running VMs and their device processes")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    stats = sub.add_parser("stats", help="per-device counters, restarts, recovery and latency of a VM")
    stats.add_argument("vm", metavar="VM", help="the VM's name (see `bulkhead ps`)")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stop = sub.add_parser("stop", help="stop a running VM (it exits with status 0)")
    stop.add_argument("vm", metavar="VM")
    stop.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                      help="how long to wait for the VM to exit (default 10)")
    for verb, what in (("pause", "stop a VM's vCPUs (its devices keep their state)"),
                       ("resume", "run a paused VM's vCPUs again")):
        sub.add_parser(verb, help=what).add_argument("vm", metavar="VM")
    fault = sub.add_parser(
        "fault", help="testing: make a device misbehave (the VM must run with --allow-faults)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="actions:\n"
               "  kill              the core SIGKILLs the device process\n"
               "  hang              the device stops serving (caught by heartbeat / timeout)\n"
               "  slow MS           the device stalls for MS milliseconds once\n"
               "  bad-reply         the device's next register answer is garbage\n"
               "  crash-in-request  the device aborts inside its next request (done, not yet returned)\n"
               "  seccomp           the device makes a forbidden syscall (needs the jail)\n"
               "  flood-acks        the device sends 50000 valid heartbeat answers at once\n"
               "  flood-frames      the device writes 512 MiB of never-ending ZMTP frames\n"
               "  fill-doorbell     the device fills its request doorbell and stops reading it\n"
               "  grow-memory       the device allocates memory until its limit stops it\n"
               "  spin [MS]         the device burns CPU for MS milliseconds (default 1000)\n"
               "example:\n  bulkhead fault myvm blk0 slow 2000\n")
    fault.add_argument("vm", metavar="VM")
    fault.add_argument("device", metavar="DEVICE", help="e.g. blk0, rng0, console0")
    fault.add_argument("action", choices=cp.FAULT_ACTIONS, metavar="ACTION",
                       help=", ".join(cp.FAULT_ACTIONS))
    fault.add_argument("ms", nargs="?", type=positive_int, metavar="MS", help="for slow")


def run_verb(args: argparse.Namespace) -> int:
    """Raises `ControlError` (a `BulkheadError`: exit 2 in `cli.main`) on bad input."""
    try:
        return _run_verb(args)
    except BrokenPipeError:  # `bulkhead stats VM --json | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run_verb(args: argparse.Namespace) -> int:
    if args.verb == "ps":
        return cmd_ps(args.json)
    if args.verb == "stats":
        return cmd_stats(args.vm, args.json)
    if args.verb == "stop":
        return cmd_stop(args.vm, args.wait)
    if args.verb in ("pause", "resume"):
        body = request(args.vm, cp.Pause() if args.verb == "pause" else cp.Resume())
        print(f"VM {args.vm}: {body.get('state', '?')}")
        return 0
    return cmd_fault(args.vm, args.device, args.action, args.ms)


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def cmd_ps(as_json: bool, out=sys.stdout) -> int:
    vms = []
    for entry in registry.running():
        try:
            vms.append(request_entry(entry, cp.Ps(), timeout=2.0))
        except ControlError as err:  # listed but not answering: still show it
            vms.append({"name": entry.name, "pid": entry.pid, "devices": [], "error": str(err)})
    if as_json:
        json.dump(vms, out, indent=2)
        print(file=out)
        return 0
    row = "{:<16} {:>8}  {:<10} {:<8} {:>8}  {:<12} {:>8}  {:<8}"
    print(row.format("VM", "PID", "DEVICE", "TYPE", "PID", "STATE", "RESTARTS", "POLICY").rstrip(),
          file=out)
    for vm in vms:
        devices = vm.get("devices") or [{}]
        for i, d in enumerate(devices):
            head = (vm.get("name", "?"), vm.get("pid", "?")) if i == 0 else ("", "")
            print(row.format(*map(_fmt, head), _fmt(d.get("name")), _fmt(d.get("type")),
                             _fmt(d.get("pid")), _fmt(d.get("state")), _fmt(d.get("restarts")),
                             _fmt(d.get("policy"))).rstrip(), file=out)
        if vm.get("error"):
            print(f"  ({vm['error']})", file=out)
    return 0


def cmd_stats(vm: str, as_json: bool, out=sys.stdout) -> int:
    body = request(vm, cp.GetStats())
    if as_json:
        json.dump(body, out, indent=2)
        print(file=out)
        return 0
    print(f"VM {body.get('name')} (pid {body.get('pid')})", file=out)
    row = "{:<10} {:>9} {:>12} {:>6} {:>9} {:>8} {:>8}  {:<17} {:<22}"
    print(row.format("DEVICE", "REQUESTS", "BYTES", "ERRORS", "THROTTLED", "FAILURES", "RESTARTS",
                     "RECOVERY p50/p99", "MMIO READ p50/p99/max").rstrip(), file=out)
    for d in body.get("devices", []):
        rec = d.get("recovery_ms") or {}
        lat = d.get("mmio_read_us") or {}
        recovery = f"{_fmt(rec.get('p50'))}/{_fmt(rec.get('p99'))} ms" if rec.get("count") else "-"
        latency = (f"{_fmt(lat.get('p50'))}/{_fmt(lat.get('p99'))}/{_fmt(lat.get('max'))} us"
                   if lat.get("count") else "-")
        print(row.format(_fmt(d.get("name")), _fmt(d.get("requests")), _fmt(d.get("bytes")),
                         _fmt(d.get("errors")), _fmt(d.get("throttled")), _fmt(d.get("failures")), _fmt(d.get("restarts")),
                         recovery, latency).rstrip(), file=out)
        for cause in d.get("last_causes") or []:
            print(f"    failure: {cause}", file=out)
    return 0


def cmd_stop(vm: str, wait: float, out=sys.stdout) -> int:
    entry = registry.lookup(vm)
    if entry is None:
        request(vm, cp.Ps())  # raises the "no running VM" error with the list of names
        return 2
    request_entry(entry, cp.Stop())
    deadline = time.monotonic() + wait
    while registry.is_alive(entry):
        if time.monotonic() > deadline:
            print(f"bulkhead: VM {vm} (pid {entry.pid}) is still stopping after {wait:.0f} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.02)
    print(f"stopped VM {vm} (pid {entry.pid})", file=out)
    return 0


def cmd_fault(vm: str, device: str, action: str, ms: int | None, out=sys.stdout) -> int:
    if action == "slow" and ms is None:
        raise ControlError("fault slow needs a duration: bulkhead fault VM DEVICE slow MS")
    if action not in ("slow", "spin") and ms is not None:
        raise ControlError(f"fault {action} takes no duration (only slow and spin do)")
    if not registry.valid_name(device):
        raise ControlError(f"{device!r} is not a device name (e.g. blk0, rng0, console0)")
    body = request(vm, cp.InjectFault(device, action, ms or 0))
    print(body.get("done", "done"), file=out)
    return 0


def wait_for_vm(name: str, timeout: float = 30.0) -> registry.VmEntry:
    """For tests and tools: the registry entry of `name` once its endpoint answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = registry.lookup(name)
        if entry is not None and os.path.exists(entry.api_socket):
            return entry
        time.sleep(0.02)
    raise ControlError(f"VM {name} did not come up within {timeout:.0f} s")
