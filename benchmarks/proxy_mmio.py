"""virtio-mmio register accesses from a guest: device process behind the proxy vs `--no-sandbox`.

The loop guest (benchmarks/loopguest.py) makes N accesses to an rng device; each run is timed end
to end, a run with N = 0 under the same mode is subtracted, and the modes alternate run by run so
all see the same machine noise.  Rows, one per access the core answers differently:

- MagicValue read: a constant, answered by the core.
- the interrupt path: an InterruptStatus read and an InterruptACK write (what Linux's virtio-mmio
  interrupt handler does), both served from the register page.
- config space read (4 bytes): from the register page's published config.
- QueueDescLow read: a write-only register; the device reads it as 0 (and counts it invalid),
  and so does the core now, without asking it (before: a ring round trip, the cost every read
  had before the register page).  What still crosses the ring is a read right after a posted
  write the device has not applied yet.

Also prints the CPU time all processes burn per access, and every mode again with the whole VM
pinned to one CPU (`taskset -c 0`: the core's vCPU and the device share it).

    .venv/bin/python benchmarks/proxy_mmio.py [--n 100000] [--runs 3] [--only NAME]
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
BASELINE = "in-process (--no-sandbox)"
ONE_CPU = ["taskset", "-c", "0"]

# (row, loop kind, offset from the device's base, goal as a ratio to in-process)
ACCESSES = [
    ("MagicValue read", "mmio-read", 0x000, 1.3),
    ("interrupt path (read+ACK)", "mmio-irq", 0x000, 1.1),
    ("config read", "mmio-read", 0x100, 1.3),
    ("QueueDescLow read (write-only)", "mmio-read", 0x080, 1.3),
]


def timed(elf: str, mode: list[str], pin: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the run and its children)."""
    args = ["run", "--kernel", elf, "--mem", "64", "--rng", *mode]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    argv = (ONE_CPU if pin else []) + bulkhead_argv(*args)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"guest failed: {proc.stderr.strip()}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000,
                    help="accesses per run (large: a VM start varies by tens of ms)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", help="run only the rows whose name contains this")
    args = ap.parse_args()
    base_addr = layout.VIRTIO_MMIO_BASE  # slot 0: the rng device
    rows = [a for a in ACCESSES if not args.only or args.only in a[0]]
    print(f"virtio-mmio register accesses from the guest, N = {args.n} per run, {args.runs} runs; "
          "ratios to in-process in the same run")
    with tempfile.TemporaryDirectory() as tmp:
        for row, kind, offset, goal in rows:
            paths = {}
            for n in (args.n, 0):
                paths[n] = os.path.join(tmp, f"{kind}-{offset}-{n}.elf")
                with open(paths[n], "wb") as f:
                    f.write(loop_guest(kind, n, mmio_addr=base_addr + offset))
            for pin in (False, True):
                per: dict[str, list[float]] = {m: [] for m in MODES}
                cpu: dict[str, list[float]] = {m: [] for m in MODES}
                for _ in range(args.runs):
                    for name, mode in MODES.items():
                        wall_n, cpu_n = timed(paths[args.n], mode, pin)
                        wall_0, cpu_0 = timed(paths[0], mode, pin)
                        per[name].append((wall_n - wall_0) / args.n * 1e6)
                        cpu[name].append((cpu_n - cpu_0) / args.n * 1e6)
                base = statistics.median(per[BASELINE])
                base_cpu = max(statistics.median(cpu[BASELINE]), 1e-9)
                print(f"{row}{', one CPU' if pin else ', free CPUs'}:")
                for name in MODES:
                    v, c = statistics.median(per[name]), statistics.median(cpu[name])
                    verdict = ""
                    if name != BASELINE:
                        met = v / base <= goal and c / base_cpu <= 1.5
                        verdict = f"  goal <= {goal}x, CPU <= 1.5x: {'met' if met else 'NOT met'}"
                    print(f"  {name:<28} {v:7.2f} µs  (min {min(v_ for v_ in per[name]):6.2f})  "
                          f"CPU {c:7.2f} µs  ratio {v / base:5.2f}x  CPU {c / base_cpu:5.2f}x"
                          f"{verdict}")


if __name__ == "__main__":
    main()
