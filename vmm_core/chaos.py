"""`bulkhead chaos`: run the test guest's block workload while killing a device process, then
check every write on the host.

The guest writes checksummed sectors round after round and reads each round back; the tool
has the core SIGKILL the chosen device process every `interval` (`bulkhead fault VM DEV kill`, or another fault / a seeded mix with `--fault`
through the VM's control endpoint: the core knows its device processes, wherever their PID
namespace puts them; the supervisor restarts them), and after the VM exits compares the image
with the last round's pattern.  Exit status 0 only if the guest saw
no error and no sector was lost or corrupted.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import sys
import tempfile
import time

from . import control_protocol as cp
from .cli_control import wait_for_vm
from .control import ControlError, request
from .testing import SECTOR, TEST_GUEST, BackgroundVm, blk_pattern_sector

_ROUND_OK = re.compile(r"blk-workload round (\d+)/\d+ ok")
_RESTARTED = re.compile(r"device (\S+) restarted as pid \d+ in ([0-9.]+) ms")


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# Faults `--fault mix` draws from (with --seed): each ends in a restart of the device.
MIX = ("kill", "hang", "bad-reply", "crash-in-request")
FAULTS = MIX + ("slow", "mix")
SLOW_MS = 300  # longer than the device timeout would restart; shorter only delays


_BACK = re.compile(r"device (\S+): vhost-user backend back after ([0-9.]+) ms")
_RESUBMITTED = re.compile(r"device (\S+) ring \d+: resubmitting (\d+) request")
EXTERNAL_IO_TIMEOUT_MS = 60_000  # a guest request may wait this long for a backend to return


def run_chaos(count: int = 50, interval_ms: int = 200, device: str = "blk0", seed: int = 1,
              sectors: int = 128, jitter: bool = False, fault: str = "kill", out=sys.stdout,
              backend: str = "device", qd: int = 1) -> int:
    if fault not in FAULTS:
        print(f"chaos: --fault {fault}: choose one of {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    if backend != "device":
        if fault != "kill":
            print(f"chaos: --backend {backend} takes --fault kill only (the backend is not ours "
                  "to inject faults into)", file=sys.stderr)
            return 2
        return _run_external(backend, count, interval_ms, device, seed, sectors, jitter, out, qd)
    rng = random.Random(seed)
    kinds: dict[str, int] = {}
    rounds = max(200, count * interval_ms // 8)
    with tempfile.TemporaryDirectory(prefix="bulkhead-chaos-") as tmp:
        disk = _scratch_disk(tmp, sectors)
        name = f"chaos{os.getpid()}"
        vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", disk, "--rng", "--name", name,
                          "--allow-faults", "--cmdline", _workload(sectors, rounds, seed, qd))
        injected = 0
        try:
            if not _started_with(name, device):
                return 2
            while injected < count and vm.proc.poll() is None:
                delay = interval_ms / 1000 * (rng.uniform(0.5, 1.5) if jitter else 1.0)
                time.sleep(delay)
                kind = rng.choice(MIX) if fault == "mix" else fault
                try:
                    request(name, cp.InjectFault(device, kind, SLOW_MS if kind == "slow" else 0))
                    injected += 1
                    kinds[kind] = kinds.get(kind, 0) + 1
                except ControlError:
                    continue  # being restarted right now, or the VM has just finished
            status = vm.wait(600)
        finally:
            _stop(vm, name)
        ok, detail, bad = _verdict(vm, disk, sectors, seed, rounds)
        recoveries = [float(m.group(2)) for line in vm.stderr
                      if (m := _RESTARTED.search(line)) and m.group(1) == device]
    mix = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    print(f"chaos: {injected} faults injected into {device} ({mix}), {interval_ms} ms apart "
          f"(seed {seed})", file=out)
    print(f"  restarts:            {len(recoveries)}", file=out)
    return _report(ok, detail, bad, sectors, recoveries, "recovery time:      ", "", status, out)


def _report(ok: bool, detail: str, bad: list[int], sectors: int, recoveries: list[float],
            label: str, suffix: str, status: int, out) -> int:
    """The verdict lines both modes print; the exit status of `bulkhead chaos`."""
    print(f"  guest workload:      {'ok' if ok else 'FAILED'} ({detail})", file=out)
    print(f"  sectors lost/corrupt: {len(bad)} of {sectors} (checked on the host after exit"
          f"{'' if ok else ', against the last verified round and the next'})", file=out)
    if recoveries:
        print(f"  {label} p50 {statistics.median(recoveries):.1f} ms, "
              f"p99 {_percentile(recoveries, 0.99):.1f} ms{suffix}", file=out)
    print(f"  VM exit status:      {status}", file=out)
    return 0 if ok and not bad and status == 0 else 1


def _scratch_disk(tmp: str, sectors: int) -> str:
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(max(1 << 20, sectors * SECTOR))
    return disk


def _workload(sectors: int, rounds: int, seed: int, qd: int) -> str:
    """The test guest's write/verify workload, whose image `_verdict` checks."""
    return (f"gk.tests=blk-workload gk.blk_sectors={sectors} gk.blk_rounds={rounds} "
            f"gk.blk_seed={seed} gk.blk_qd={qd}")


def _started_with(name: str, device: str) -> bool:
    """The VM answers on its control socket and has `device` (else one line on stderr)."""
    try:
        wait_for_vm(name)
        devices = [d["name"] for d in request(name, cp.Ps())["devices"]]
    except ControlError as err:
        print(f"chaos: the VM did not start: {err}", file=sys.stderr)
        return False
    if device not in devices:
        print(f"chaos: no device {device} (devices: {', '.join(devices)})", file=sys.stderr)
        return False
    return True


def _verdict(vm: BackgroundVm, disk: str, sectors: int, seed: int,
             rounds: int) -> tuple[bool, str, list[int]]:
    """The guest's verdict and the sectors of the image that hold what no acknowledged write
    put there: the last round's pattern when the workload finished; when it stopped early (a
    device the core failed), each sector must hold the last verified round's pattern or the
    next round's (its write may have been acknowledged before the stop)."""
    results, _ = vm.results()
    ok, detail = results.get("blk-workload", (False, "no result"))
    with open(disk, "rb") as f:
        image = f.read()
    if ok:
        seeds = [seed + rounds - 1]
    else:  # round r (from 0) writes seed + r; "round N/M ok" follows round N - 1
        done = max((int(m.group(1)) for line in vm.stdout if (m := _ROUND_OK.search(line))),
                   default=0)
        seeds = [seed + done - 1, seed + done] if done else [seed]
    bad = [s for s in range(sectors)
           if all(image[s * SECTOR:(s + 1) * SECTOR] != blk_pattern_sector(s, k) for k in seeds)]
    return ok, detail, bad


def _stop(vm: BackgroundVm, name: str) -> None:
    """Stop the VM the way a user would (it cleans up its cgroup, runtime directory and registry
    entry); SIGKILL only a VM that does not stop."""
    if vm.proc.poll() is None:
        try:
            request(name, cp.Stop())
            vm.wait(15)
        except Exception:  # noqa: BLE001 - then the hard way
            pass
    vm.kill()


def _run_external(backend: str, count: int, interval_ms: int, device: str, seed: int,
                  sectors: int, jitter: bool, out, qd: int = 1) -> int:
    """The same workload against `--disk vhost-user=`: chaos starts the backend on the image,
    SIGKILLs it `count` times (through its pidfd) and starts it again on the same socket; the
    core reconnects and resumes the rings."""
    from .testing.uml import BulkheadBlkBackend, QsdBlkBackend, UmlError
    rng = random.Random(seed)
    # A round takes ~4 ms of guest time when no kill stalls it, and the kills come every
    # interval plus a reconnect: twice that keeps the workload running past the last kill even
    # on a fast host (at exactly 4 ms the workload ended after 14 of 20 kills).
    rounds = max(200, count * interval_ms // 2)
    with tempfile.TemporaryDirectory(prefix="bulkhead-chaos-") as tmp:
        disk = _scratch_disk(tmp, sectors)
        sock = os.path.join(tmp, "backend.sock")
        server = QsdBlkBackend(socket_path=sock, name="qemu-storage-daemon") if backend == "qsd" \
            else BulkheadBlkBackend(socket_path=sock, name="bulkhead device blk")
        try:
            server.start(disk)
        except UmlError as err:
            print(f"chaos: {err}", file=sys.stderr)
            return 2
        name = f"chaos{os.getpid()}"
        vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", f"vhost-user={sock}", "--name",
                          name, "--cmdline", _workload(sectors, rounds, seed, qd)
                          + f" gk.io_timeout_ms={EXTERNAL_IO_TIMEOUT_MS}")
        killed = 0
        try:
            if not _started_with(name, device):
                return 2
            while killed < count and vm.proc.poll() is None:
                time.sleep(interval_ms / 1000 * (rng.uniform(0.5, 1.5) if jitter else 1.0))
                server.kill()
                killed += 1
                try:
                    server.start(disk)
                except UmlError as err:
                    print(f"chaos: the backend did not come back: {err}", file=sys.stderr)
                    break
                _await_reconnect(name, device, vm)
            status = vm.wait(900)
        finally:
            _stop(vm, name)
            server.stop()
        ok, detail, bad = _verdict(vm, disk, sectors, seed, rounds)
    recoveries = [float(m.group(2)) for line in vm.stderr
                  if (m := _BACK.search(line)) and m.group(1) == device]
    resubmitted = sum(int(m.group(2)) for line in vm.stderr
                      if (m := _RESUBMITTED.search(line)) and m.group(1) == device)
    print(f"chaos: {killed} kills of the {server.name} backend of {device}, {interval_ms} ms "
          f"apart, queue depth {qd} (seed {seed})", file=out)
    print(f"  reconnects:          {len(recoveries)}", file=out)
    print(f"  resubmitted by core: {resubmitted} request(s)", file=out)
    return _report(ok, detail, bad, sectors, recoveries, "lost -> reconnected:",
                   " (backend restart included)", status, out)


def _await_reconnect(name: str, device: str, vm: BackgroundVm, timeout: float = 30.0) -> None:
    """Until the core serves `device` from the new backend again (so that every kill hits a
    connected backend), or the VM ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and vm.proc.poll() is None:
        try:
            devs = {d["name"]: d for d in request(name, cp.Ps())["devices"]}
        except ControlError:
            return
        if devs.get(device, {}).get("state") == "running":
            return
        time.sleep(0.02)
