"""`bulkhead chaos`: run the test guest's block workload while killing a device process, then
check every write on the host.

The guest writes checksummed sectors round after round and reads each round back; the tool
SIGKILLs the chosen device process every `interval` (the supervisor restarts it), and after the
VM exits compares the image with the last round's pattern.  Exit status 0 only if the guest saw
no error and no sector was lost or corrupted.
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time

from .testing import SECTOR, TEST_GUEST, BackgroundVm, blk_pattern_sector, device_pids

_RESTARTED = re.compile(r"device (\S+) restarted as pid \d+ in ([0-9.]+) ms")


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_chaos(count: int = 50, interval_ms: int = 200, device: str = "blk0", seed: int = 1,
              sectors: int = 128, jitter: bool = False, out=sys.stdout) -> int:
    rng = random.Random(seed)
    rounds = max(200, count * interval_ms // 8)
    with tempfile.TemporaryDirectory(prefix="bulkhead-chaos-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(max(1 << 20, sectors * SECTOR))
        vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", disk, "--rng", "--cmdline",
                          f"gk.tests=blk-workload gk.blk_sectors={sectors} gk.blk_rounds={rounds} "
                          f"gk.blk_seed={seed}")
        injected = 0
        try:
            deadline = time.monotonic() + 30
            while device not in device_pids(vm.pid):
                if vm.proc.poll() is not None or time.monotonic() > deadline:
                    print(f"chaos: device {device} never started", file=sys.stderr)
                    return 2
                time.sleep(0.01)
            while injected < count and vm.proc.poll() is None:
                delay = interval_ms / 1000 * (rng.uniform(0.5, 1.5) if jitter else 1.0)
                time.sleep(delay)
                pid = device_pids(vm.pid).get(device)
                if pid is None:
                    continue  # being restarted right now
                try:
                    os.kill(pid, signal.SIGKILL)
                    injected += 1
                except ProcessLookupError:
                    continue
            status = vm.wait(600)
        finally:
            vm.kill()
        results, _ = vm.results()
        ok, detail = results.get("blk-workload", (False, "no result"))
        with open(disk, "rb") as f:
            image = f.read()
        last_seed = seed + rounds - 1
        bad = [s for s in range(sectors)
               if image[s * SECTOR:(s + 1) * SECTOR] != blk_pattern_sector(s, last_seed)]
        recoveries = [float(m.group(2)) for line in vm.stderr
                      if (m := _RESTARTED.search(line)) and m.group(1) == device]
    print(f"chaos: {injected} kills of {device}, {interval_ms} ms apart (seed {seed})", file=out)
    print(f"  restarts:            {len(recoveries)}", file=out)
    print(f"  guest workload:      {'ok' if ok else 'FAILED'} ({detail})", file=out)
    print(f"  sectors lost/corrupt: {len(bad)} of {sectors} (checked on the host after exit)", file=out)
    if recoveries:
        print(f"  recovery time:       p50 {statistics.median(recoveries):.1f} ms, "
              f"p99 {_percentile(recoveries, 0.99):.1f} ms", file=out)
    print(f"  VM exit status:      {status}", file=out)
    return 0 if ok and not bad and status == 0 else 1
