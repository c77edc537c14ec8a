"""Density and start-up (issue 15): N VMs with blk + rng + console from config files, started
with `bulkhead up` (each returns once its API answers, which the core opens after every device
process serves), then measured and stopped with `bulkhead down --all`.

Reported per N: VMs per second to "all devices ready", PSS of every process per VM (core,
zygote, launchers, inits, devices: everything in the VM's cgroup, from /proc/PID/smaps_rollup),
PSS per device all-in (launcher + init + device: the device's own cgroup), and the same VMs with
`--no-sandbox` as the baseline.  Runs in a private XDG_RUNTIME_DIR.  Goals (the issue's): <= 4 MiB
PSS per added device, 20 VMs ready <= 10 s on 2 cores.

    .venv/bin/python benchmarks/density.py [--counts 10,20,40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jail.cgroup import read_mounts  # noqa: E402
from vmm_core.testing import ROOT, TEST_GUEST, bulkhead_argv  # noqa: E402

DEVICES = ("blk0", "rng0", "console0")


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cgroup_pids(path: Path) -> list[int]:
    pids: list[int] = []
    for d, _, files in os.walk(path):
        if "cgroup.procs" in files:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
    return pids


def write_configs(tmp: Path, n: int, sandbox: bool) -> Path:
    cfgs = tmp / f"cfg-{n}-{int(sandbox)}"
    cfgs.mkdir()
    for i in range(n):
        disk = tmp / f"disk{i}.img"
        if not disk.exists():
            disk.write_bytes(bytes(1 << 20))
        (cfgs / f"d{i:02d}.toml").write_text(
            f'name = "dens{i:02d}"\nkernel = "{TEST_GUEST}"\nmem = 32\nhold = true\n'
            f'cmdline = "gk.tests=pio"\nno-sandbox = {str(not sandbox).lower()}\n'
            f'rng = true\n[[disk]]\npath = "{disk}"\n[console]\npath = "{tmp}/console{i}.txt"\n')
    return cfgs


def run(n: int, sandbox: bool, env: dict, tmp: Path) -> dict:
    cfgs = write_configs(tmp, n, sandbox)
    t0 = time.monotonic()
    up = subprocess.run(bulkhead_argv("up", str(cfgs), "--wait", "300"), cwd=ROOT, env=env,
                        capture_output=True, text=True)
    ready = time.monotonic() - t0
    try:
        if up.returncode != 0:
            raise SystemExit(f"bulkhead up failed: {up.stderr.strip()[-2000:]}")
        time.sleep(1.0)  # let lazily touched pages settle
        pids_root = next(m.path for m in read_mounts() if m.fstype == "cgroup" and "pids" in m.options)
        per_vm, per_dev = [], []
        for i in range(n):
            vm_cg = pids_root / "bulkhead" / f"dens{i:02d}"
            per_vm.append(sum(pss_kib(p) for p in cgroup_pids(vm_cg)))
            if sandbox:
                for dev in DEVICES:
                    per_dev.append(sum(pss_kib(p) for p in cgroup_pids(vm_cg / dev)))
    finally:
        subprocess.run(bulkhead_argv("down", "--all", "--grace", "30"), cwd=ROOT, env=env,
                       capture_output=True, text=True)
    return {"ready_s": ready, "vm_mib": statistics.mean(per_vm) / 1024,
            "dev_mib": statistics.mean(per_dev) / 1024 if per_dev else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10,20,40")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    runtime = tempfile.mkdtemp(prefix="bhd-", dir="/tmp")
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    try:
        with tempfile.TemporaryDirectory(prefix="bhdens-") as t:
            tmp = Path(t)
            print(f"density: N VMs with {', '.join(DEVICES)} from config files via `bulkhead up` "
                  f"({os.cpu_count()} CPUs)")
            for n in counts:
                jailed = run(n, True, env, tmp)
                base = run(n, False, env, tmp)
                added = (jailed["vm_mib"] - base["vm_mib"]) / len(DEVICES)
                print(f" {n:3d} VMs: ready in {jailed['ready_s']:5.1f} s ({n / jailed['ready_s']:4.1f} VMs/s; "
                      f"--no-sandbox {base['ready_s']:4.1f} s); PSS per VM {jailed['vm_mib']:6.1f} MiB "
                      f"(--no-sandbox {base['vm_mib']:5.1f}); per device all-in {jailed['dev_mib']:4.1f} MiB "
                      f"(own cgroup), {added:4.1f} MiB over --no-sandbox")
                if n == 20:
                    print(f"   goal 20 VMs ready <= 10 s: {'met' if jailed['ready_s'] <= 10 else 'NOT met'}")
            print(f"   goal <= 4 MiB PSS per added device: "
                  f"{'met' if added <= 4 else 'NOT met'} (last run: {added:.1f} MiB)")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
