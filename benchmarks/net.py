"""TCP between a user-mode Linux guest and a peer in a network namespace: Bulkhead's vhost-user net
backend (`bulkhead device net`, jailed, Python) against UML's own tap transport
(`vec0:transport=tap`, C inside the kernel), in the same run, boots alternating.

Each boot: the guest (Linux's virtio_net, or UML's vector driver) streams `--mib` MiB to a
sink in the namespace (throughput: guest-side time from connect to the peer's acknowledgement
of the last byte), then does `--rr` one-byte request/response round trips with TCP_NODELAY.
Printed: the median over `--rounds` of each, and Bulkhead's ratio to the built-in transport.

Then (`--pings N`, 0 to skip) guest_kit's virtio-net driver under `bulkhead run` (real KVM
exits, ioeventfd/irqfd), the device jailed and in-process, alternating: ICMP echo round trips to
the tap's address in a namespace, timed as (run with N pings - run with none) / N.

    .venv/bin/python benchmarks/net.py [--mib 256] [--rr 2000] [--rounds 3] [--pings 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmm_core.testing.netns import Namespaces, sh  # noqa: E402
from vmm_core.testing import TEST_GUEST, run_bulkhead  # noqa: E402
from vmm_core.testing.uml import BulkheadBackend, UmlBed  # noqa: E402

HOST_IP, GUEST_IP, PORT = "10.78.0.1", "10.78.0.2", 5301

PEER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(2); print("listening", flush=True)
c, _ = srv.accept(); n = 0
while b := c.recv(1 << 20):
    n += len(b)
c.sendall(b"%d" % n); c.close()
c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while b := c.recv(1):
    c.sendall(b)
"""

GUEST = r"""
import os, socket, subprocess, time
dev = os.environ.get("IFACE") or os.environ["UML_DEV_eth"]
subprocess.run(f"ip link set lo up; ip link set {dev} up; ip addr add {os.environ['GUEST_IP']}/24 dev {dev}",
               shell=True, check=True)
host, port, mib, rr = os.environ["HOST_IP"], int(os.environ["PORT"]), int(os.environ["MIB"]), int(os.environ["RR"])
for _ in range(100):
    try:
        s = socket.create_connection((host, port), timeout=30); break
    except OSError:
        time.sleep(0.1)
block = bytes(range(256)) * 4096
t = time.perf_counter()
for _ in range(mib):
    s.sendall(block)
s.shutdown(socket.SHUT_WR)
ack = int(s.recv(64)); secs = time.perf_counter() - t
assert ack == mib << 20, ack
s.close()
s = socket.create_connection((host, port), timeout=30); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t = time.perf_counter()
for _ in range(rr):
    s.sendall(b"x")
    assert s.recv(1) == b"x"
rr_secs = time.perf_counter() - t
print(f"UML-RESULT mbps={mib * 8 * 1.048576 / secs:.1f} rr={rr / rr_secs:.0f}")
"""


def start_peer(ns: str) -> subprocess.Popen:
    """PEER in `ns`, once HOST_IP exists there (it binds it)."""
    peer = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER, HOST_IP, str(PORT)],
                            stdout=subprocess.PIPE, text=True)
    assert peer.stdout is not None and peer.stdout.readline().strip() == "listening"
    return peer


def one_boot(transport: str, ns: str, mib: int, rr: int) -> tuple[float, float]:
    env = {"HOST_IP": HOST_IP, "GUEST_IP": GUEST_IP, "PORT": str(PORT), "MIB": str(mib), "RR": str(rr)}
    peer: subprocess.Popen | None = None
    try:
        if transport == "bulkhead":
            with UmlBed() as bed:
                bed.add_backend("eth", "net", BulkheadBackend("net", "--tap", "bhbench0", "--netns", ns))
                sh(ns, f"ip addr add {HOST_IP}/24 dev bhbench0")
                peer = start_peer(ns)
                run = bed.run(GUEST, python=True, env=env, timeout=600).check()
        else:
            sh(ns, "ip tuntap add dev bhvec0 mode tap vnet_hdr")
            sh(ns, f"ip addr add {HOST_IP}/24 dev bhvec0")
            sh(ns, "ip link set bhvec0 up")
            try:
                peer = start_peer(ns)
                args = ("quiet", "vec0:transport=tap,ifname=bhvec0,depth=128,gro=1")
                with UmlBed(netns=ns, kernel_args=args) as bed:
                    run = bed.run(GUEST, python=True, env={**env, "IFACE": "vec0"}, timeout=600).check()
            finally:
                sh(ns, "ip link del bhvec0")
        peer.wait(30)
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()  # our own child
            peer.wait()
    return float(run.results["mbps"]), float(run.results["rr"])


def guest_kit_run(ns: str, pings: int, sandboxed: bool) -> float:
    """Seconds of one `bulkhead run` of guest_kit's virtio-net test with `pings` extra echoes."""
    extra = [] if sandboxed else ["--no-sandbox"]
    t = time.perf_counter()
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                       "--net", f"tap=bhgk0,netns={ns},mac=52:54:00:12:34:56", *extra, "--cmdline",
                       f"gk.tests=virtio-net gk.net=10.0.2.15/24,10.0.2.2 gk.net_pings={pings}",
                       timeout=600)
    secs = time.perf_counter() - t
    ok, detail = run.results.get("virtio-net", (False, "no result"))
    if not ok or run.returncode != 0:
        raise SystemExit(f"guest_kit run failed: {run.explain()}")
    return secs


def icmp_rounds(ns: str, pings: int, rounds: int) -> dict[str, float]:
    sh(ns, "ip tuntap add dev bhgk0 mode tap vnet_hdr")
    sh(ns, "ip addr add 10.0.2.2/24 dev bhgk0")
    per_rtt: dict[str, list[float]] = {"sandboxed": [], "in-process": []}
    try:
        for r in range(rounds):
            for mode in (per_rtt if r % 2 == 0 else reversed(list(per_rtt))):
                sandboxed = mode == "sandboxed"
                base = guest_kit_run(ns, 0, sandboxed)
                full = guest_kit_run(ns, pings, sandboxed)
                per_rtt[mode].append((full - base) / pings * 1e6)
                print(f"round {r + 1} guest_kit icmp {mode:10s} {per_rtt[mode][-1]:8.1f} us/round trip",
                      flush=True)
    finally:
        sh(ns, "ip link del bhgk0")
    return {m: statistics.median(v) for m, v in per_rtt.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rr", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pings", type=int, default=2000)
    args = ap.parse_args()
    spaces = Namespaces()
    results: dict[str, list[tuple[float, float]]] = {"bulkhead": [], "uml-vec0-tap": []}
    try:
        ns = spaces.make()
        for r in range(args.rounds):
            order = list(results) if r % 2 == 0 else list(reversed(results))
            for transport in order:
                mbps, rr = one_boot(transport, ns, args.mib, args.rr)
                results[transport].append((mbps, rr))
                print(f"round {r + 1} {transport:14s} {mbps:8.1f} Mbit/s {rr:8.0f} req/s", flush=True)
        icmp = icmp_rounds(ns, args.pings, args.rounds) if args.pings > 0 else None
    finally:
        spaces.cleanup()
    med = {t: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for t, v in results.items()}
    print(f"\nmedian of {args.rounds} rounds, {args.mib} MiB stream, {args.rr} 1-byte round trips")
    for t, (mbps, rr) in med.items():
        print(f"  {t:14s} {mbps:8.1f} Mbit/s {rr:8.0f} req/s")
    b, v = med["bulkhead"], med["uml-vec0-tap"]
    print(f"  bulkhead / uml-vec0-tap: throughput {b[0] / v[0]:.2f}x, request/response {b[1] / v[1]:.2f}x")
    if icmp is not None:
        print(f"\nguest_kit ICMP echo through bulkhead run, {args.pings} round trips, median of "
              f"{args.rounds}: sandboxed {icmp['sandboxed']:.1f} us, in-process "
              f"{icmp['in-process']:.1f} us ({icmp['sandboxed'] / icmp['in-process']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
