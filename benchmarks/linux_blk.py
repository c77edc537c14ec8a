"""fio inside user-mode Linux against vhost-user-blk backends, side by side in one boot.

Every backend of `vmm_core.testing.uml.BLK_BACKENDS` (qemu-storage-daemon aio=threads, and
aio=io_uring with an iothread; Bulkhead's backend is one more entry there) serves the same image
file to one UML guest (/dev/vda, /dev/vdb, ...; `locking=off`, as the daemons share it).  The
guest runs each job on each backend in turn, round after round, the backend order rotated every
round; a job is `direct=1`, time-based.  Printed per job and backend: the median over rounds of
IOPS (with +-% = half the range over rounds, relative to the median), bandwidth and the backend's
CPU time per request (utime+stime of its processes from /proc/<pid>/stat, sampled when the guest
prints the job's begin and end markers), then the first backend's ratios to each other one and to the best
of them (Bulkhead's backend is first by default: the goal is >= 1.0x the best peer).  UML is one vCPU
whose own overhead dominates small requests (it caps QD32 near QD1 here): compare backends at QD1
and 1 MiB first, and by CPU per request.

    .venv/bin/python benchmarks/linux_blk.py [--runtime 5] [--rounds 3] [--backends qsd-threads,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmm_core.testing.uml import BLK_BACKENDS, UmlBed, cpu_seconds, kernel_version  # noqa: E402

MIB = 1 << 20


@dataclass(frozen=True)
class Job:
    label: str
    rw: str
    bs: str
    engine: str
    depth: int

    def fio_args(self, runtime: float, span_mib: int) -> list[str]:
        return ["fio", "--eta=never", f"--name={self.rw}", "--direct=1",
                f"--rw={self.rw}", f"--bs={self.bs}", f"--ioengine={self.engine}",
                f"--iodepth={self.depth}", f"--size={span_mib}m", "--time_based",
                f"--runtime={runtime}", "--randrepeat=0", "--norandommap", "--output-format=json"]


JOBS = [
    Job("4 KiB rand read  QD1  psync", "randread", "4k", "psync", 1),
    Job("4 KiB rand read  QD32 libaio", "randread", "4k", "libaio", 32),
    Job("4 KiB rand write QD32 libaio", "randwrite", "4k", "libaio", 32),
    Job("1 MiB seq read   QD4  libaio", "read", "1m", "libaio", 4),
    Job("1 MiB seq write  QD4  libaio", "write", "1m", "libaio", 4),
]

_MARK = re.compile(r"^UML-MARK (begin|end) (\d+)")


def fill_image(path: str, size_mib: int) -> None:
    """Real data everywhere: reads of holes would not reach the backend's I/O path."""
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per job, backend and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    ap.add_argument("--image-mib", type=int, default=256, help="image size (the jobs' span)")
    ap.add_argument("--backends", default=",".join(BLK_BACKENDS),
                    help=f"comma-separated, the first is the baseline (of {', '.join(BLK_BACKENDS)})")
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--json", help="also write every measurement here")
    args = ap.parse_args()
    names = args.backends.split(",")
    unknown = [n for n in names if n not in BLK_BACKENDS]
    if unknown:
        ap.error(f"unknown backends {unknown}; known: {', '.join(BLK_BACKENDS)}")

    # The schedule: (round, job, backend index); backends rotate by one every round.
    steps = [(r, j, (r + k) % len(names)) for r in range(args.rounds)
             for j in range(len(JOBS)) for k in range(len(names))]
    marks: dict[tuple[str, int], tuple[float, float]] = {}   # (begin|end, step) -> (time, cpu)
    lock = threading.Lock()

    with tempfile.TemporaryDirectory(prefix="bulkhead-linux-blk-") as tmp, \
            UmlBed(mem_mib=args.mem_mib) as bed:
        image = os.path.join(tmp, "disk.img")
        fill_image(image, args.image_mib)
        backends = []
        for i, name in enumerate(names):
            backend = BLK_BACKENDS[name](locking=False)
            bed.add_blk(f"b{i}", backend, image)
            backends.append(backend)

        def on_line(line: str) -> None:
            m = _MARK.match(line)
            if m:
                step = int(m.group(2))
                cpu = sum(cpu_seconds(p) for p in backends[steps[step][2]].pids())
                with lock:
                    marks[(m.group(1), step)] = (time.monotonic(), cpu)

        script = ["set -e"]
        for s, (_, j, b) in enumerate(steps):
            fio = shlex.join(JOBS[j].fio_args(args.runtime, args.image_mib))
            script += [f"echo 'UML-MARK begin {s}'",
                       f'{fio} --filename="$UML_DEV_b{b}" --output="$UML_OUT/step{s}.json"',
                       f"echo 'UML-MARK end {s}'"]
        timeout = len(steps) * (args.runtime + 10) + 60
        print(f"fio in user-mode Linux {kernel_version()} (1 vCPU, mem {args.mem_mib}M), direct=1, "
              f"{args.image_mib} MiB image page-cached on the host, "
              f"{args.rounds} alternating rounds x {args.runtime:g} s per job and backend",
              flush=True)
        bed.run("\n".join(script) + "\n", timeout=timeout, on_line=on_line).check()

        # per (job, backend): lists over rounds of (iops, bytes/s, cpu s per request)
        table: dict[tuple[int, int], list[tuple[float, float, float | None]]] = {}
        for s, (_, j, b) in enumerate(steps):
            with open(os.path.join(bed.out_dir, f"step{s}.json")) as f:
                job = json.load(f)["jobs"][0]
            if job["error"]:
                raise SystemExit(f"fio failed on {names[b]} ({JOBS[j].label}): error {job['error']}")
            ios = job["read"]["total_ios"] + job["write"]["total_ios"]
            iops = job["read"]["iops"] + job["write"]["iops"]
            bw = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
            cpu = None
            if ("begin", s) in marks and ("end", s) in marks and ios:
                cpu = (marks[("end", s)][1] - marks[("begin", s)][1]) / ios
            table.setdefault((j, b), []).append((iops, bw, cpu))

    report([b.name for b in backends], table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backends": names, "jobs": [job.label for job in JOBS],
                       "runs": {f"{JOBS[j].label} | {names[b]}": v for (j, b), v in table.items()}},
                      f, indent=1)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(names: list[str], table) -> None:
    width = max(len(n) for n in names) + 2
    print(f"\n{'job':<30}" + "".join(f"{n:>{width + 24}}" for n in names))
    print(f"{'':<30}" + "".join(f"{'IOPS':>{width - 4}}{'+-%':>6}{'MiB/s':>10}{'CPU us/req':>12}"
                                 for _ in names))
    medians = {}
    for j, job in enumerate(JOBS):
        row = f"{job.label:<30}"
        for b in range(len(names)):
            runs = table[(j, b)]
            iops, bw, cpu = (_median([r[k] for r in runs]) for k in range(3))
            spread = (max(r[0] for r in runs) - min(r[0] for r in runs)) / 2 / iops * 100
            medians[(j, b)] = (iops, cpu)
            cpu_text = f"{cpu * 1e6:12.1f}" if cpu is not None else f"{'n/a':>12}"
            row += f"{iops:>{width - 4}.0f}{spread:>6.0f}{bw / MIB:>10.1f}{cpu_text}"
        print(row)
    for b in range(1, len(names)):
        print(f"\n{names[0]} / {names[b]}:   (>1 throughput = {names[0]} faster; "
              f"<1 CPU = {names[0]} cheaper)")
        for j, job in enumerate(JOBS):
            (i0, c0), (i1, c1) = medians[(j, 0)], medians[(j, b)]
            cpu_ratio = f"{c0 / c1:5.2f}x" if c1 and c0 is not None else "  n/a"
            print(f"  {job.label:<30} throughput {i0 / i1:5.2f}x   CPU per request {cpu_ratio}")
    if len(names) > 2:
        print(f"\n{names[0]} / the best of the others (goal >= 1.0x at every job):")
        for j, job in enumerate(JOBS):
            best = max(range(1, len(names)), key=lambda b: medians[(j, b)][0])
            ratio = medians[(j, 0)][0] / medians[(j, best)][0]
            print(f"  {job.label:<30} {ratio:5.2f}x of {names[best]}  "
                  f"{'met' if ratio >= 1.0 else 'NOT met'}")

if __name__ == "__main__":
    main()
