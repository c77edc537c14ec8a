"""Start-up cost of device processes: `bulkhead run` to the guest's first result, per device.

The test guest runs one quick check and exits; the same run is timed with no device, with each
device alone, with three and with four (blk, rng, console, vsock), alternating so all share the
machine's noise.  The difference to the no-device run is what spawning, handshaking and
configuring the devices costs.  Also printed, for the multi-device runs: "ready after the core
is up", the core's own log line (`devices ready: N in X ms`) from the moment it starts wiring
its devices (KVM, memory and the zygote already there) to every device serving, which is issue
15's "a VM with 4 jailed devices ready <= 100 ms after the core is up".  The devices start
together, forked from the VM's zygote, which `bulkhead run` starts before its own imports.

    .venv/bin/python benchmarks/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmm_core.testing import ROOT, TEST_GUEST, bulkhead_argv  # noqa: E402


READY = re.compile(r"devices ready: (\d+) in ([0-9.]+) ms")


def timed(args: list[str]) -> tuple[float, float | None]:
    """Seconds of one run, and the core's devices-ready milliseconds (None: no device)."""
    t0 = time.perf_counter()
    proc = subprocess.run(bulkhead_argv("run", "-v", "--kernel", TEST_GUEST, "--mem", "64",
                                        "--cmdline", "gk.tests=mmio", *args),
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {proc.stderr.strip()}")
    elapsed = time.perf_counter() - t0
    m = READY.search(proc.stderr)
    return elapsed, float(m[2]) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(8 << 20)
        configs = {
            "no device": [],
            "blk": ["--disk", disk],
            "rng": ["--rng"],
            "console": ["--console", os.path.join(tmp, "console.txt")],
            "blk+rng+console": ["--disk", disk, "--rng", "--console", os.path.join(tmp, "c2.txt")],
            "blk+rng+console in-process": ["--disk", disk, "--rng", "--console",
                                           os.path.join(tmp, "c3.txt"), "--no-sandbox"],
            "4 devices (+vsock)": ["--disk", disk, "--rng", "--console", os.path.join(tmp, "c4.txt"),
                                   "--vsock", f"cid=4000,socket={tmp}/v4.sock"],
            "4 devices in-process": ["--disk", disk, "--rng", "--console", os.path.join(tmp, "c5.txt"),
                                     "--vsock", f"cid=4001,socket={tmp}/v5.sock", "--no-sandbox"],
        }
        times: dict[str, list[float]] = {name: [] for name in configs}
        ready: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.runs):
            for name, extra in configs.items():
                elapsed, ready_ms = timed(extra)
                times[name].append(elapsed)
                if ready_ms is not None:
                    ready[name].append(ready_ms)
    base = statistics.median(times["no device"])
    print(f"bulkhead run to guest exit (one quick check), median of {args.runs} alternating runs")
    for name, values in times.items():
        med = statistics.median(values)
        extra = "" if name == "no device" else f"   +{(med - base) * 1000:6.0f} ms over no device"
        print(f"  {name:<28} {med * 1000:7.0f} ms  (ratio {med / base:4.2f}x){extra}")
    print("devices ready after the core is up (the core's clock; median, min-max)")
    for name, values in ready.items():
        if values:
            print(f"  {name:<28} {statistics.median(values):7.1f} ms  ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
