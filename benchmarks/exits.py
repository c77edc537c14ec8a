"""PIO and MMIO exit round trip of the Python run loop (µs per exit).

A hand-assembled guest loops N accesses (benchmarks/loopguest.py); each run is timed end to end
through `bulkhead run`, and a run with N = 0 measured in the same session is subtracted, so the
figure is the cost of one exit: KVM exit + decode + Bus lookup + device + re-entry.  On kvm_pvm
the loop's own three instructions are emulated too (CPL0), which the figure includes.

    .venv/bin/python benchmarks/exits.py [--n 20000] [--runs 5]
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

from benchmarks.loopguest import loop_guest  # noqa: E402
from vmm_core.testing import ROOT, bulkhead_argv  # noqa: E402


def time_run(elf_path: str, extra: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(bulkhead_argv("run", "--kernel", elf_path, "--mem", "64", *extra),
                          cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark guest failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return elapsed


def measure(kind: str, n: int, runs: int, tmp: str, extra: list[str] | None = None,
            mmio_addr: int | None = None) -> list[float]:
    """µs per exit for each of `runs` paired (N, 0) runs, interleaved to share the machine's noise."""
    kw = {} if mmio_addr is None else {"mmio_addr": mmio_addr}
    paths = {}
    for count in (n, 0):
        path = os.path.join(tmp, f"{kind}-{count}.elf")
        with open(path, "wb") as f:
            f.write(loop_guest(kind, count, **kw))
        paths[count] = path
    out = []
    for _ in range(runs):
        full = time_run(paths[n], extra or [])
        empty = time_run(paths[0], extra or [])
        out.append((full - empty) / n * 1e6)
    return out


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values):7.2f} µs  min {min(values):7.2f}  "
            f"max {max(values):7.2f}  (runs {len(values)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="accesses per run")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"exit round trip, N = {args.n} accesses per run, CPL0 guest loop")
        results = {kind: measure(kind, args.n, args.runs, tmp)
                   for kind in ("pio-out", "mmio-write", "mmio-read")}
        for kind, values in results.items():
            print(f"  {kind:<11} {summary(values)}")
        base = statistics.median(results["pio-out"])
        for kind in ("mmio-write", "mmio-read"):
            print(f"  ratio {kind} / pio-out: {statistics.median(results[kind]) / base:.2f}x")


if __name__ == "__main__":
    main()
