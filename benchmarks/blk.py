"""virtio-blk: our device process (MMIO ring, and as a vhost-user backend) beside
qemu-storage-daemon and raw `preadv`/`pwritev` on the same file, same run.

The host-side driver (device_procs.testing) plays the guest: it writes descriptors into the
shared guest memory, kicks the queue's eventfd (what a KVM ioeventfd would do) and sleeps on the
irqfd / call eventfd until the device signals.  Backends, alternating round by round:

- `mmio`: a Bulkhead device process behind the register ring (what a VM's blk0 is);
- `bulkhead-vu`: `bulkhead device blk` (jailed) driven by the vhost-user frontend double;
- `qsd-threads`, `qsd-io_uring`: qemu-storage-daemon's vhost-user-blk export (aio=threads; aio=
  io_uring with an iothread) driven by the same frontend;
- `raw`: the same I/O with os.preadv/pwritev in this process, on the same (page-cached) image.

Printed: req/s per backend, each one's ratio to raw and Bulkhead's (mmio, vhost-user) to the best
qemu-storage-daemon (goal >= 1.0x; >= 0.8x raw at 1 MiB).

`--through-core ROUNDS` adds rows through the Bulkhead core (issue 14): guest_kit's blk workload
(4 KiB requests, QD1, write then verify-read) in a VM whose blk0 is, alternating VM by VM,
Bulkhead's own device process (`--disk IMG`), `bulkhead device blk` behind the core's vhost-user
frontend, and qemu-storage-daemon behind the same frontend.  The rate counts the requests
between two round lines of the guest's output, timestamped as they arrive.

    .venv/bin/python benchmarks/blk.py [--seconds 2] [--rounds 3] [--backends mmio,...]
                                       [--through-core 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import select
import statistics
import struct
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_procs.testing.driver import Buffer  # noqa: E402
from device_procs.testing.vhost_frontend import VhostUserFrontend  # noqa: E402
from vmm_core.testing.process import ProcessHarness  # noqa: E402
from vmm_core.testing.uml import BulkheadBlkBackend, QsdBlkBackend, cpu_seconds  # noqa: E402

IMAGE_BYTES = 64 << 20
SECTOR = 512
T_IN, T_OUT = 0, 1
_HEADER = struct.Struct("<IIQ")


def device_workload(driver, wait_interrupt: Callable[[float], bool], op: int, size: int,
                    depth: int, offsets: list[int], seconds: float) -> tuple[int, float]:
    """(requests, seconds): batches of `depth` requests, one kick, wait for the interrupt."""
    q = driver.queue(0)
    arena, memory = driver.arena, driver.memory
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
            got += len(q.get_used())
            if got < depth and not wait_interrupt(5.0):
                raise SystemExit("no interrupt within 5 s: the backend stalled")
        done += depth
    return done, time.perf_counter() - start


def wait_eventfd(fd: int) -> Callable[[float], bool]:
    def wait(timeout: float) -> bool:
        if select.select([fd], [], [], timeout)[0]:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            return True
        return False
    return wait


class VhostBackend:
    """A vhost-user-blk backend (`vmm_core.testing.uml` kinds) and a frontend connected to it."""

    def __init__(self, backend, path: str) -> None:
        self.backend = backend
        sock = backend.start(path)
        self.frontend = VhostUserFrontend.connect(sock, queues=1, ram_mib=128)
        self.frontend.handshake()
        self.frontend.driver.init()
        self.driver = self.frontend.driver
        self.wait = wait_eventfd(self.frontend.calls[0])
        self.pids = backend.pids

    def close(self) -> None:
        self.frontend.close()
        self.backend.stop()


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


BACKENDS = ("mmio", "bulkhead-vu", "qsd-threads", "qsd-io_uring")


def open_backend(name: str, path: str, stack: contextlib.ExitStack):
    """(driver, wait_interrupt, pids) of one backend, closed with `stack`; `pids()` are the
    processes whose CPU time serves it (the device; for a vhost-user backend also its launcher
    or daemon threads' process)."""
    if name == "mmio":
        h = stack.enter_context(ProcessHarness({"type": "blk", "path": path}, ram_mib=128,
                                               timeout=5.0))
        h.driver.init()
        return h.driver, h.wait_interrupt, lambda: [h.proc.pid]
    backend = {"bulkhead-vu": lambda: BulkheadBlkBackend(locking=False),
               "qsd-threads": lambda: QsdBlkBackend(aio="threads", locking=False),
               "qsd-io_uring": lambda: QsdBlkBackend(aio="io_uring", iothread=True,
                                                     locking=False)}[name]()
    vb = VhostBackend(backend, path)
    stack.callback(vb.close)
    return vb.driver, vb.wait, vb.pids


def backend_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # gone
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per case and side")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma-separated, of {', '.join(BACKENDS)} (raw always runs)")
    ap.add_argument("--through-core", type=int, default=0, metavar="ROUNDS",
                    help="also time guest_kit through the core: ROUNDS VMs per way of serving blk0")
    ap.add_argument("--only-through-core", action="store_true", help="skip the host-side rows")
    args = ap.parse_args()
    if args.through_core:
        through_core(args.through_core)
        if args.only_through_core:
            return
    names = [n for n in args.backends.split(",") if n]
    if unknown := [n for n in names if n not in BACKENDS]:
        ap.error(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    rng = random.Random(1)
    rand = [rng.randrange(IMAGE_BYTES >> 12) << 12 for _ in range(4096)]
    seq = [i << 20 for i in range(IMAGE_BYTES >> 20)]
    cases = [
        ("1 MiB seq read  QD1", T_IN, 1 << 20, 1, seq),
        ("1 MiB seq write QD1", T_OUT, 1 << 20, 1, seq),
        ("4 KiB rand read QD1", T_IN, 4096, 1, rand),
        ("4 KiB rand read QD32", T_IN, 4096, 32, rand),
        ("4 KiB rand write QD32", T_OUT, 4096, 32, rand),
    ]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            for _ in range(IMAGE_BYTES >> 20):
                f.write(os.urandom(1 << 20))
        fd = os.open(path, os.O_RDWR)
        stack.callback(os.close, fd)
        opened = {n: open_backend(n, path, stack) for n in names}
        print(f"virtio-blk from the host-side driver, {', '.join(names)} and raw preadv/pwritev "
              f"on one page-cached {IMAGE_BYTES >> 20} MiB file ({args.rounds} alternating "
              f"rounds x {args.seconds} s, order rotated each round)")
        for label, op, size, depth, offsets in cases:
            runs: dict[str, list[float]] = {n: [] for n in [*names, "raw"]}
            cpu: dict[str, list[float]] = {n: [] for n in names}  # backend CPU µs per request
            order = [*names, "raw"]
            for r in range(args.rounds):
                for n in order[r % len(order):] + order[:r % len(order)]:
                    if n == "raw":
                        runs[n].append(raw_workload(fd, op, size, offsets, args.seconds))
                    else:
                        driver, wait, pids = opened[n]
                        before = backend_cpu(pids())
                        done, secs = device_workload(driver, wait, op, size, depth, offsets,
                                                     args.seconds)
                        runs[n].append(done / secs)
                        cpu[n].append((backend_cpu(pids()) - before) / done * 1e6)
            med = {n: statistics.median(v) for n, v in runs.items()}
            mib = size / (1 << 20)
            print(f"{label}:")
            for n in order:
                per_req = f"  backend CPU {statistics.median(cpu[n]):6.1f} us/req" if n in cpu else ""
                print(f"  {n:<14} {med[n]:9.0f} req/s ({med[n] * mib:7.1f} MiB/s)  "
                      f"{med[n] / med['raw']:5.2f}x raw{per_req}")
            peers = [n for n in names if n.startswith("qsd")]
            if peers:
                best = max(peers, key=med.get)
                for ours in (n for n in names if not n.startswith("qsd")):
                    ratio = med[ours] / med[best]
                    left = "" if ratio >= 1.0 else (
                        f"; left: {(1 / med[ours] - 1 / med[best]) * 1e6:.1f} us per request")
                    print(f"  {ours} / best peer ({best}) {ratio:5.2f}x  "
                          f"goal >= 1.0x: {'met' if ratio >= 1.0 else 'NOT met'}{left}")
                if size >= 1 << 20:
                    for ours in (n for n in names if not n.startswith("qsd")):
                        raw_ratio = med[ours] / med["raw"]
                        print(f"  {ours} / raw {raw_ratio:5.2f}x  goal >= 0.8x: "
                              f"{'met' if raw_ratio >= 0.8 else 'NOT met'}")

GUEST_SECTORS, GUEST_ROUNDS, CHUNK_SECTORS = 512, 60, 8  # guest_kit: 8 sectors per request


def _guest_rate(disk_arg: str) -> float:
    """Requests per second of one VM's blk workload, from its round lines' arrival times."""
    import subprocess
    from vmm_core.testing import TEST_GUEST, bulkhead_argv
    cmdline = (f"gk.tests=blk-workload gk.blk_sectors={GUEST_SECTORS} "
               f"gk.blk_rounds={GUEST_ROUNDS}")
    proc = subprocess.Popen(bulkhead_argv("run", "--kernel", TEST_GUEST, "--disk", disk_arg,
                                          "--cmdline", cmdline),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stamps: dict[int, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if "blk-workload round" in line:
            stamps[int(line.split("round ")[1].split("/")[0])] = time.monotonic()
    if proc.wait() != 0 or len(stamps) < GUEST_ROUNDS:
        raise SystemExit(f"the VM with --disk {disk_arg} failed")
    first, last = 5, GUEST_ROUNDS  # rounds 1-4 warm up
    requests = (last - first) * 2 * GUEST_SECTORS // CHUNK_SECTORS
    return requests / (stamps[last] - stamps[first])


def through_core(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(GUEST_SECTORS * SECTOR)
        sock = os.path.join(tmp, "vu.sock")
        ways = {
            "device process (--disk IMG)": (None, image),
            "bulkhead device blk via frontend": (lambda: BulkheadBlkBackend(socket_path=sock),
                                                 f"vhost-user={sock}"),
            "qsd-threads via frontend": (lambda: QsdBlkBackend(socket_path=sock),
                                         f"vhost-user={sock}"),
        }
        rates: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(rounds):
            order = list(ways)
            for way in order[r % 3:] + order[:r % 3]:
                make, disk = ways[way]
                server = make() if make else None
                if server is not None:
                    server.start(image)
                try:
                    rates[way].append(_guest_rate(disk))
                finally:
                    if server is not None:
                        server.stop()
    med = {w: statistics.median(v) for w, v in rates.items()}
    peer = med["qsd-threads via frontend"]
    print(f"guest_kit virtio-blk through the core (4 KiB QD1 write+verify, {rounds} VMs per way, "
          "alternating; kvm_pvm: every request is a few emulated exits)")
    for w, v in med.items():
        print(f"  {w:<36} {v:8.0f} req/s  {v / peer:5.2f}x qsd via the frontend")


if __name__ == "__main__":
    main()
