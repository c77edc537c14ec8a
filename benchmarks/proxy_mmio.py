"""MMIO register read round trip from a guest: device process behind the proxy vs `--no-sandbox`.

The loop guest (benchmarks/loopguest.py) reads virtio-mmio MagicValue of an rng device N times;
each run is timed end to end, a run with N = 0 under the same mode is subtracted, and the modes
alternate run by run so both see the same machine noise.  Also prints the CPU time the core and
the device process burn per read (the ring's spin/sleep policy shows there).

    .venv/bin/python benchmarks/proxy_mmio.py [--n 5000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loopguest import loop_guest  # noqa: E402
from vmm_core import layout  # noqa: E402
from vmm_core.testing import ROOT, bulkhead_argv  # noqa: E402


MODES = {
    "device process, sleep": ["--ring-spin-us", "0"],
    "device process, spin 100 us": ["--ring-spin-us", "100"],
    "in-process (--no-sandbox)": ["--no-sandbox"],
}


def timed(elf: str, mode: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the run and its children)."""
    args = ["run", "--kernel", elf, "--mem", "64", "--rng", *mode]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(bulkhead_argv(*args), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"guest failed: {proc.stderr.strip()}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    magic = layout.VIRTIO_MMIO_BASE  # slot 0: the rng device, MagicValue at offset 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for n in (args.n, 0):
            paths[n] = os.path.join(tmp, f"read-{n}.elf")
            with open(paths[n], "wb") as f:
                f.write(loop_guest("mmio-read", n, mmio_addr=magic))
        per_read: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.runs):
            for name, mode in MODES.items():
                wall_n, cpu_n = timed(paths[args.n], mode)
                wall_0, cpu_0 = timed(paths[0], mode)
                per_read[name].append((wall_n - wall_0) / args.n * 1e6)
                cpu[name].append((cpu_n - cpu_0) / args.n * 1e6)
    print(f"virtio-mmio register read from the guest, N = {args.n} reads per run, {args.runs} runs")
    base = statistics.median(per_read["in-process (--no-sandbox)"])
    for name in MODES:
        v = per_read[name]
        print(f"  {name:<28} median {statistics.median(v):7.2f} µs/read  min {min(v):7.2f}  "
              f"max {max(v):7.2f}  CPU {statistics.median(cpu[name]):7.2f} µs/read  "
              f"ratio {statistics.median(v) / base:5.2f}x (goal <= 1.3x)")


if __name__ == "__main__":
    main()
