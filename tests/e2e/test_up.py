"""Many VMs of two tenants from config files (issue 15): `bulkhead up examples/`, allocated
identities, per-tenant cgroups, the API by curl, `bulkhead logs`, `bulkhead down --all`.

The test runs the CLI with its own XDG_RUNTIME_DIR, so `--all` means this test's VMs only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from jail.cgroup import read_mounts
from jail.pidfd import ProcessRef
from vmm_core.testing import ROOT, bulkhead_argv

pytestmark = pytest.mark.kvm

EXAMPLES = os.path.join(ROOT, "examples")
TENANTS = {"acme-web": ("acme", 0x78100000, 0x7810FFFF), "acme-db": ("acme", 0x78100000, 0x7810FFFF),
           "globex-api": ("globex", 0x78200000, 0x7820FFFF)}


@pytest.fixture
def runtime(tmp_path):
    """A short private XDG_RUNTIME_DIR (socket paths must fit sun_path's 108 bytes)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="bh-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(bulkhead_argv(*args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ids(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def _cgroup(pid: int, controller: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.strip().split(":", 2)
            if controller in ctrls.split(","):
                return path
    return ""


def test_up_starts_two_tenants_vms_and_down_all_stops_them(runtime):
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    run = _cli(env, "up", EXAMPLES)
    try:
        assert run.returncode == 0, run.stderr
        assert sorted(l.split()[2] for l in run.stdout.splitlines()) == sorted(TENANTS)
        ps = json.loads(_cli(env, "ps", "--json").stdout)
        vms = {v["name"]: v for v in ps}
        assert set(vms) == set(TENANTS)
        uids = {}
        for name, (tenant, lo, hi) in TENANTS.items():
            vm = vms[name]
            dev = vm["devices"][0]["pid"]
            uid, gid = _ids(dev)
            assert lo <= uid <= hi and uid == gid, (name, hex(uid))
            uids[name] = uid
            assert _cgroup(vm["pid"], "pids") == f"/bulkhead/tenant-{tenant}/{name}"
            assert _cgroup(dev, "pids").startswith(f"/bulkhead/tenant-{tenant}/{name}/")
        assert len(set(uids.values())) == 3  # every VM its own pair, never shared
        cpu = next((m.path for m in read_mounts() if m.fstype == "cgroup" and "cpu" in m.options), None)
        if cpu is not None:  # v1 here; the limits from the files
            with open(cpu / "bulkhead/tenant-globex/globex-api/cpu.cfs_quota_us") as f:
                assert int(f.read()) == 50_000
        # One tenant's device uid cannot signal the other tenant's device process.
        acme_dev = vms["acme-web"]["devices"][0]["pid"]
        globex_dev = vms["globex-api"]["devices"][0]["pid"]
        probe = subprocess.run(
            ["setpriv", f"--reuid={uids['acme-web']}", f"--regid={uids['acme-web']}",
             "--clear-groups", "/usr/bin/python3", "-c",
             f"import os\ntry:\n os.kill({globex_dev}, 0)\nexcept PermissionError:\n print('EPERM')"],
            capture_output=True, text=True, timeout=30)
        assert probe.stdout.strip() == "EPERM", probe
        # ... nor look into it: its fds and environment are the other uid's (ptrace checks).
        peek = subprocess.run(
            ["setpriv", f"--reuid={uids['acme-web']}", f"--regid={uids['acme-web']}",
             "--clear-groups", "/usr/bin/python3", "-c",
             "import os\nfor p in ('fd', 'environ', 'mem'):\n try:\n"
             f"  os.listdir('/proc/{globex_dev}/fd') if p == 'fd' else open('/proc/{globex_dev}/' + p, 'rb').read(1)\n"
             "  print(p, 'readable')\n except PermissionError:\n  print(p, 'EACCES')"],
            capture_output=True, text=True, timeout=30)
        assert peek.stdout.split() == ["fd", "EACCES", "environ", "EACCES", "mem", "EACCES"], peek
        # And from inside, each device has a PID namespace of its own: it sees no other process.
        assert os.readlink(f"/proc/{acme_dev}/ns/pid") != os.readlink(f"/proc/{globex_dev}/ns/pid")
        with open(f"/proc/{acme_dev}/status") as f:
            nspid = next(l for l in f if l.startswith("NSpid:")).split()[1:]
        assert len(nspid) >= 2 and nspid[-1] == "2", nspid  # pid 2 below its init
        assert acme_dev != globex_dev
        # The API of one of them, by curl.
        with open(os.path.join(runtime, "bulkhead", "vms", "acme-db.json")) as f:
            entry = json.load(f)
        out = subprocess.run(["curl", "-s", "--unix-socket", os.path.join(entry["runtime_dir"], "api.sock"),
                              "http://localhost/api/v1/vm.info"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        assert json.loads(out)["name"] == "acme-db"
        logs = _cli(env, "logs", "acme-web")
        assert "GK virtio-rng ok" in logs.stdout, logs
        # A second `up` of the same files refuses before starting anything.
        again = _cli(env, "up", EXAMPLES)
        assert again.returncode == 2 and "is running already" in again.stderr
    finally:
        down = _cli(env, "down", "--all", "--grace", "20")
    assert down.returncode == 0, down.stderr
    assert sorted(l.split()[1] for l in down.stdout.splitlines()) == sorted(TENANTS)
    assert json.loads(_cli(env, "ps", "--json").stdout) == []
    for tenant in ("acme", "globex"):
        for m in read_mounts():
            if m.fstype == "cgroup" and "pids" in m.options:
                assert not (m.path / f"bulkhead/tenant-{tenant}").exists()


def test_down_kills_a_vm_that_does_not_shut_down_in_time(tmp_path, runtime):
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    cfg = tmp_path / "stuck.toml"
    cfg.write_text(f'kernel = "{ROOT}/guest_kit/build/testguest.elf"\nhold = true\nmem = 64\n'
                   'cmdline = "gk.tests=pio"\n')
    assert _cli(env, "up", str(cfg)).returncode == 0
    vm = json.loads(_cli(env, "ps", "--json").stdout)[0]
    core = ProcessRef(vm["pid"])  # the VM our `up` started: it cannot answer or shut down now
    core.send(signal.SIGSTOP)
    try:
        down = _cli(env, "down", "stuck", "--grace", "2")
    finally:
        core.send(signal.SIGCONT)  # (False once it is gone)
        core.close()
    assert down.returncode == 1 and "killed (no answer within 2 + 10 s)" in down.stdout, \
        (down.stdout, down.stderr)
    assert json.loads(_cli(env, "ps", "--json").stdout) == []


def test_up_refuses_bad_files_before_starting_anything(tmp_path, runtime):
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    (tmp_path / "good.toml").write_text(f'kernel = "{ROOT}/guest_kit/build/testguest.elf"\n')
    (tmp_path / "bad.toml").write_text('kernel = "k"\nvcpus = "many"\n')
    run = _cli(env, "up", str(tmp_path))
    assert run.returncode == 2 and "bad.toml:2: vcpus" in run.stderr, run.stderr
    assert json.loads(_cli(env, "ps", "--json").stdout) == []
    run = _cli(env, "up", str(tmp_path / "missing"))
    assert run.returncode == 2 and "no such file or directory" in run.stderr


def test_down_presses_the_power_button_and_a_guest_that_handles_it_powers_off(runtime, tmp_path,
                                                                              monkeypatch):
    """The ACPI power button through the Generic Event Device: guest_kit waits for its line and
    then powers off through SLEEP_CONTROL_REG, as an OS would; a guest that ignores the button
    is stopped by the VMM once the grace is over."""
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    (tmp_path / "polite.toml").write_text(
        f'kernel = "{ROOT}/guest_kit/build/testguest.elf"\nmem = 64\n'
        'cmdline = "gk.tests=pio,power-button"\n')
    (tmp_path / "deaf.toml").write_text(
        f'kernel = "{ROOT}/guest_kit/build/testguest.elf"\nmem = 64\nhold = true\n'
        'cmdline = "gk.tests=pio"\n')
    assert _cli(env, "up", "--parallel", "1", str(tmp_path)).returncode == 0
    logs = os.path.join(runtime, "bulkhead", "logs")
    # --parallel 1: "polite" (second in name order) started only once "deaf" answered on its API.
    from vmm_core import registry
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    api = registry.lookup("deaf").api_socket
    assert os.stat(os.path.join(logs, "polite.pid")).st_mtime_ns >= os.stat(api).st_mtime_ns
    deadline = time.monotonic() + 60
    while "waiting for the power button" not in open(os.path.join(logs, "polite.log")).read():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    down = _cli(env, "down", "--all", "--grace", "3")
    assert down.returncode == 0, down.stderr
    lines = {l.split()[1]: l for l in down.stdout.splitlines()}
    assert "powered off by its guest" in lines["polite"], down.stdout
    assert "stopped by the VMM after the 3 s grace" in lines["deaf"], down.stdout
    assert "GK power-button ok" in open(os.path.join(logs, "polite.log")).read()
    assert json.loads(_cli(env, "ps", "--json").stdout) == []
