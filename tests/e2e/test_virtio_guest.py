"""The test guest drives virtio-blk, virtio-rng and virtio-console through real KVM exits,
ioeventfds and irqfds, with each device in its own process (and, for comparison, in-process)."""

import os
import signal
import subprocess
import time

import pytest

from vmm_core.testing import (ROOT, TEST_GUEST, blk_pattern, bulkhead_argv, device_pids,
                              parse_results, run_test_guest)

pytestmark = pytest.mark.kvm

VIRTIO_TESTS = "virtio-blk,virtio-rng,virtio-console"


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xee" * (1 << 20))
    return path


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "in-process"])
def test_virtio_devices_pass_guest_checks(tmp_path, disk, sandbox):
    console = tmp_path / "console.txt"
    args = ["--disk", str(disk), "--rng", "--console", str(console)]
    if not sandbox:
        args.append("--no-sandbox")
    run = run_test_guest(VIRTIO_TESTS, *args)
    for name in VIRTIO_TESTS.split(","):
        assert run.ok(name), f"{name}: {run.results.get(name)}\n{run.explain()}"
    assert run.returncode == 0, run.explain()
    # The host checks the guest's writes byte for byte; the rest of the image is untouched.
    data = disk.read_bytes()
    assert data[:64 * 512] == blk_pattern(64, 1)
    assert data[64 * 512:] == b"\xee" * ((1 << 20) - 64 * 512)
    assert console.read_text() == "hello from guest_kit console\n"


def test_readonly_disk_rejects_writes(disk):
    before = disk.read_bytes()
    run = run_test_guest("virtio-blk-ro", "--disk", f"{disk},readonly", cmdline="gk.blk_ro=1")
    assert run.ok("virtio-blk-ro"), run.explain()
    assert disk.read_bytes() == before


def test_each_device_runs_in_its_own_titled_process(tmp_path, disk):
    console = tmp_path / "console.txt"
    core = subprocess.Popen(bulkhead_argv("run", "--kernel", TEST_GUEST, "--disk", str(disk), "--rng",
                                          "--console", str(console), "--hold", "--cmdline",
                                          f"gk.tests={VIRTIO_TESTS}"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in core.stdout:
            lines.append(line)
            if line.startswith("GK done"):
                break
        results, done = parse_results("".join(lines))
        assert done == (3, 3), "".join(lines)
        pids = device_pids(core.pid)
        assert set(pids) == {"blk0", "rng0", "console0"}, pids
        assert len(set(pids.values())) == 3
        for pid in pids.values():
            with open(f"/proc/{pid}/comm") as f:
                assert f.read().startswith("bhdev:")
        core.send_signal(signal.SIGTERM)
        assert core.wait(30) == 143
        time.sleep(0.2)
        for pid in pids.values():
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if core.poll() is None:
            core.kill()
            core.wait()


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "in-process"])
def test_console_to_the_terminal(sandbox):
    run = run_test_guest("virtio-console", "--console", "stdout", *([] if sandbox else ["--no-sandbox"]))
    assert run.ok("virtio-console") and run.returncode == 0, run.explain()
    assert "hello from guest_kit console\n" in run.stdout
