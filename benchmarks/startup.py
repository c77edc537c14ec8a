"""Start-up cost of device processes: `bulkhead run` to the guest's first result, per device.

The test guest runs one quick check and exits; the same run is timed with no device, with each
device alone and with all three, alternating so all share the machine's noise.  The difference to
the no-device run is what spawning, handshaking and configuring that device costs (a fresh
interpreter per device; devices start one after another before the vCPUs run).

    .venv/bin/python benchmarks/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmm_core.testing import ROOT, TEST_GUEST, bulkhead_argv  # noqa: E402


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(bulkhead_argv("run", "--kernel", TEST_GUEST, "--mem", "64", "--cmdline",
                                        "gk.tests=mmio", *args), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {proc.stderr.strip()}")
    return time.perf_counter() - t0


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
        }
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.runs):
            for name, extra in configs.items():
                times[name].append(timed(extra))
    base = statistics.median(times["no device"])
    print(f"bulkhead run to guest exit (one quick check), median of {args.runs} alternating runs")
    for name, values in times.items():
        med = statistics.median(values)
        extra = "" if name == "no device" else f"   +{(med - base) * 1000:6.0f} ms over no device"
        print(f"  {name:<28} {med * 1000:7.0f} ms  (ratio {med / base:4.2f}x){extra}")


if __name__ == "__main__":
    main()
