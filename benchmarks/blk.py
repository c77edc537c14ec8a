"""virtio-blk through a real device process vs raw `preadv`/`pwritev` on the same file, same run.

The host-side driver (device_procs.testing) plays the guest: it writes descriptors into the
shared guest memory, kicks the queue's eventfd (what a KVM ioeventfd would do) and sleeps on the
irqfd eventfd until the device signals.  The raw peer does the same I/O with os.preadv/pwritev on
the same (page-cached) image.  Ratios > 1 mean the device path is faster; the goal for 1 MiB
sequential reads is >= 0.8x.

    .venv/bin/python benchmarks/blk.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_procs.testing.driver import Buffer  # noqa: E402
from vmm_core.testing.process import ProcessHarness  # noqa: E402

IMAGE_BYTES = 64 << 20
SECTOR = 512
T_IN, T_OUT = 0, 1
_HEADER = struct.Struct("<IIQ")


def device_workload(h: ProcessHarness, op: int, size: int, depth: int, offsets: list[int],
                    seconds: float) -> float:
    """Requests per second: batches of `depth` requests, one kick, wait on the irqfd."""
    q = h.driver.queue(0)
    arena, memory = h.driver.arena, h.memory
    # A request pool placed once, as a real driver keeps one: header, data, status per slot.
    pool = []
    for _ in range(depth):
        header = Buffer(arena.alloc(_HEADER.size), _HEADER.size, False)
        data = Buffer(arena.alloc(size, 4096), size, op == T_IN)
        memory.write(data.gpa, os.urandom(size))
        status = Buffer(arena.alloc(1), 1, True)
        pool.append((header, data, status))
    done = 0
    i = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for header, data, status in pool:
            memory.write(header.gpa, _HEADER.pack(op, 0, offsets[i % len(offsets)] // SECTOR))
            i += 1
            q.add_buffers([header, data, status])
        q.kick()
        got = 0
        while got < depth:
            h.wait_interrupt(5.0)
            got += len(q.get_used())
        done += depth
    return done / (time.perf_counter() - start)


def raw_workload(fd: int, op: int, size: int, offsets: list[int], seconds: float) -> float:
    buf = bytearray(size)
    payload = os.urandom(size)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        off = offsets[done % len(offsets)]
        if op == T_IN:
            os.preadv(fd, [buf], off)
        else:
            os.pwritev(fd, [payload], off)
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per case and side")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    args = ap.parse_args()
    rng = random.Random(1)
    cases = [
        ("1 MiB seq read  QD1", T_IN, 1 << 20, 1, [i << 20 for i in range(IMAGE_BYTES >> 20)]),
        ("1 MiB seq write QD1", T_OUT, 1 << 20, 1, [i << 20 for i in range(IMAGE_BYTES >> 20)]),
        ("4 KiB rand read QD1", T_IN, 4096, 1, [rng.randrange(IMAGE_BYTES >> 12) << 12 for _ in range(4096)]),
        ("4 KiB rand read QD32", T_IN, 4096, 32, [rng.randrange(IMAGE_BYTES >> 12) << 12 for _ in range(4096)]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            for _ in range(IMAGE_BYTES >> 20):
                f.write(os.urandom(1 << 20))
        fd = os.open(path, os.O_RDWR)
        with ProcessHarness({"type": "blk", "path": path}, ram_mib=128, timeout=5.0) as h:
            h.driver.init()
            print(f"virtio-blk, device process vs raw preadv/pwritev on the same page-cached file "
                  f"({args.rounds} alternating rounds x {args.seconds} s)")
            for name, op, size, depth, offsets in cases:
                dev, raw = [], []
                for _ in range(args.rounds):
                    dev.append(device_workload(h, op, size, depth, offsets, args.seconds))
                    raw.append(raw_workload(fd, op, size, offsets, args.seconds))
                d, r = statistics.median(dev), statistics.median(raw)
                mib = size / (1 << 20)
                print(f"  {name:<22} device {d:9.0f} req/s ({d * mib:7.1f} MiB/s)   "
                      f"raw {r:9.0f} req/s ({r * mib:7.1f} MiB/s)   ratio {d / r:5.2f}x")
        os.close(fd)


if __name__ == "__main__":
    main()
