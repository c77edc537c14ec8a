"""Device recovery: from `bulkhead fault VM DEV kill` to the device serving again, next to the
spawn time of a fresh device process measured in the same run.

A held test-guest VM (the device probed by the guest, so a restart replays a live transport
state) is asked through its control endpoint to SIGKILL the device N times; after each kill the
benchmark polls `ps` until a new pid runs (the restart is complete only after the fresh process
has acknowledged `Activate`, so "running" means serving).  Reported: that end-to-end time, the
core's own measure (failure noticed -> Activate acknowledged), and, alternating with the kills,
the time to spawn + handshake a fresh device process from this process (the floor a restart
pays today: a new interpreter importing zmq/msgpack).

    .venv/bin/python benchmarks/recovery.py [--kills 30] [--device rng0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ipc_protocol.transport.shm_ring import make_eventfd  # noqa: E402
from ipc_protocol.transport.zmq_channel import ControlServer, make_runtime_dir  # noqa: E402
from vmm_core import control_protocol as cp  # noqa: E402
from vmm_core.cli_control import wait_for_vm  # noqa: E402
from vmm_core.control import ControlError, request  # noqa: E402
from vmm_core.devices.spawn import DeviceFds, start_device  # noqa: E402
from vmm_core.memory import GuestMemory  # noqa: E402
from vmm_core.testing import TEST_GUEST, BackgroundVm  # noqa: E402

GUEST_TEST = {"rng0": "virtio-rng", "blk0": "virtio-blk", "console0": "virtio-console"}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class SpawnProbe:
    """Spawns rng device processes the way the core does (no VM around them)."""

    def __init__(self) -> None:
        self.rundir = make_runtime_dir("bench")
        self.control = ControlServer(self.rundir)
        self.memory = GuestMemory.create(16 << 20)
        self.irqfd, self.kick = make_eventfd(), make_eventfd()
        self.generation = 0

    def spawn_ms(self) -> float:
        self.generation += 1
        t0 = time.perf_counter()
        proc = start_device(self.control, "rng0", {"type": "rng"}, self.memory,
                            DeviceFds(self.memory.fd, self.irqfd, [self.kick]),
                            generation=self.generation)
        took = (time.perf_counter() - t0) * 1000
        proc.shutdown(self.control, timeout=2.0)
        self.control.forget(proc.identity)
        proc.close()
        return took

    def close(self) -> None:
        self.control.close()
        self.memory.close()
        for fd in (self.irqfd, self.kick):
            os.close(fd)
        for p in self.rundir.iterdir():
            p.unlink()
        self.rundir.rmdir()


def kill_and_wait(name: str, device: str, timeout: float = 10.0) -> float:
    """ms from asking the core to SIGKILL `device` until a new process of it runs."""
    old = {d["name"]: d for d in request(name, cp.Ps())["devices"]}[device]
    t0 = time.perf_counter()
    request(name, cp.InjectFault(device, "kill"))
    while True:
        d = {d["name"]: d for d in request(name, cp.Ps())["devices"]}[device]
        if d["pid"] != old["pid"] and d["state"] == "running":
            return (time.perf_counter() - t0) * 1000
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"{device} did not come back within {timeout} s: {d}")
        time.sleep(0.001)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--device", default="rng0", choices=sorted(GUEST_TEST))
    ap.add_argument("--interval-ms", type=int, default=100, help="pause between kills")
    args = ap.parse_args()
    name = f"bench{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="bhbench-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", disk, "--rng",
                          "--console", os.path.join(tmp, "console.txt"), "--hold",
                          "--allow-faults", "--name", name,
                          # Each kill is a first failure: no crash-loop back-off in the figures.
                          "--restart-window", "0.05",
                          "--cmdline", f"gk.tests={GUEST_TEST[args.device]}")
        probe = SpawnProbe()
        recover, spawn = [], []
        try:
            wait_for_vm(name)
            while not any(l.startswith("GK done") for l in vm.stdout):
                time.sleep(0.02)
            for _ in range(args.kills):
                time.sleep(args.interval_ms / 1000)
                spawn.append(probe.spawn_ms())
                time.sleep(args.interval_ms / 1000)
                try:
                    recover.append(kill_and_wait(name, args.device))
                except ControlError as err:  # e.g. still restarting: not a sample
                    print(f"skipped: {err}", file=sys.stderr)
            core = {d["name"]: d for d in request(name, cp.GetStats())["devices"]}[args.device]
            request(name, cp.Stop())
            vm.wait(15)
        finally:
            vm.kill()
            probe.close()
    rec = core["recovery_ms"]
    print(f"recovery of {args.device}: {len(recover)} kills through the control endpoint")
    print(f"  kill -> serving again (client view): p50 {statistics.median(recover):6.1f} ms   "
          f"p99 {pct(recover, 0.99):6.1f} ms")
    print(f"  failure noticed -> Activate acked (core): p50 {rec['p50']:6.1f} ms   p99 {rec['p99']:6.1f} ms")
    print(f"  fresh device process spawn+handshake:  p50 {statistics.median(spawn):6.1f} ms   "
          f"p99 {pct(spawn, 0.99):6.1f} ms")
    print(f"  ratio recovery/spawn (p50): {statistics.median(recover) / statistics.median(spawn):.2f}x"
          f"   (goal: recovery p50 <= 50 ms)")


if __name__ == "__main__":
    main()
