"""The VM's cgroup holds the core and every device process, carries the limits, and goes away."""

import os
import signal
import time

import pytest

from vmm_core.testing import TEST_GUEST, BackgroundVm, device_pids, run_bulkhead

pytestmark = [pytest.mark.kvm, pytest.mark.root]


def cgroup_paths(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in (ctrls.split(",") if ctrls else [""]):
                out[c] = path
    return out


def wait_done(vm: BackgroundVm, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(l.startswith("GK done") for l in vm.stdout):
        assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
        time.sleep(0.05)


def test_core_and_devices_share_the_vm_cgroup_with_its_limits(tmp_path):
    name = f"cg{os.getpid()}"
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--rng", "--console", str(tmp_path / "c.txt"),
                      "--hold", "--name", name, "--cgroup-pids-max", "300",
                      "--cgroup-memory-mib", "4096", "--cmdline", "gk.tests=virtio-rng")
    try:
        wait_done(vm)
        core = cgroup_paths(vm.pid)
        assert core["pids"].endswith(f"/bulkhead/{name}"), core
        devices = device_pids(vm.pid)
        assert set(devices) == {"rng0", "console0"}
        for dev, pid in devices.items():
            # Each device in its own cgroup below the VM's: the VM's limits cover it too.
            assert cgroup_paths(pid)["pids"] == f"{core['pids']}/{dev}"
            assert cgroup_paths(pid)["memory"] == f"{core['memory']}/{dev}"
            dev_mem = f"/sys/fs/cgroup/memory{core['memory']}/{dev}/memory.limit_in_bytes"
            assert int(open(dev_mem).read()) == 256 << 20  # the default device memory limit
            dev_cpu = f"/sys/fs/cgroup/cpu{cgroup_paths(pid)['cpu']}/cpu.cfs_quota_us"
            assert int(open(dev_cpu).read()) == 100_000  # one CPU (period 100 ms)
        pids_dir = f"/sys/fs/cgroup/pids{core['pids']}"
        mem_dir = f"/sys/fs/cgroup/memory{core['memory']}"
        assert open(f"{pids_dir}/pids.max").read().strip() == "300"
        assert int(open(f"{mem_dir}/memory.limit_in_bytes").read()) == 4096 << 20
        vm.proc.send_signal(signal.SIGTERM)
        assert vm.wait(30) == 143, vm.explain()
    finally:
        vm.kill()
    assert not os.path.exists(pids_dir) and not os.path.exists(mem_dir)


def test_no_cgroup_with_limits_is_a_usage_error():
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--no-cgroup", "--cgroup-pids-max", "10")
    assert run.returncode == 2 and "--no-cgroup cannot be combined" in run.stderr


def test_sighup_tears_the_vm_down_like_sigterm(tmp_path):
    """A closed terminal or ssh session (issue 9.9): nothing of the VM is left behind."""
    from vmm_core import registry
    name = f"hup{os.getpid()}"
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--rng", "--console", str(tmp_path / "c.txt"),
                      "--hold", "--name", name, "--cmdline", "gk.tests=virtio-rng")
    try:
        wait_done(vm)
        core = cgroup_paths(vm.pid)
        devices = device_pids(vm.pid)
        entry = registry.lookup(name)
        assert entry is not None and os.path.isdir(entry.runtime_dir)
        vm.proc.send_signal(signal.SIGHUP)
        assert vm.wait(30) == 129, vm.explain()
    finally:
        vm.kill()
    assert "SIGHUP" in "".join(vm.stderr)
    for pid in devices.values():
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    assert not os.path.exists(f"/sys/fs/cgroup/pids{core['pids']}")
    assert registry.lookup(name) is None and not os.path.exists(entry.runtime_dir)


def test_io_limits_throttle_the_disk_images_block_device_for_core_and_devices(tmp_path):
    """--cgroup-io-*: the VM's blkio cgroup throttles the whole disk under the image; the blk
    device process stays in it (its own cgroups carry memory, pids and cpu only), and its disk
    I/O is accounted there."""
    from vmm_core.cgroups import block_device_of
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    disk = block_device_of(str(image))
    fd = os.open(image, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # so the guest's reads reach the disk
    os.close(fd)
    name = f"io{os.getpid()}"
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", str(image), "--hold",
                      "--name", name, "--cgroup-io-read-bps", "52428800",
                      "--cgroup-io-write-iops", "5000", "--cmdline", "gk.tests=virtio-blk")
    try:
        wait_done(vm)
        core = cgroup_paths(vm.pid)
        assert core["blkio"].endswith(f"/bulkhead/{name}"), core
        blkio = f"/sys/fs/cgroup/blkio{core['blkio']}"
        assert open(f"{blkio}/blkio.throttle.read_bps_device").read().split() == [disk, "52428800"]
        assert open(f"{blkio}/blkio.throttle.write_iops_device").read().split() == [disk, "5000"]
        blk = device_pids(vm.pid)["blk0"]
        assert cgroup_paths(blk)["blkio"] == core["blkio"]          # throttled with the VM
        assert cgroup_paths(blk)["pids"] == f"{core['pids']}/blk0"  # its own for the rest
        served = open(f"{blkio}/blkio.throttle.io_service_bytes_recursive").read()
        assert any(line.split()[:2] == [disk, "Total"] and int(line.split()[2]) > 0
                   for line in served.splitlines()), served
        vm.proc.send_signal(signal.SIGTERM)
        assert vm.wait(30) == 143, vm.explain()
    finally:
        vm.kill()
    assert not os.path.exists(blkio)


def test_io_limits_on_an_image_without_a_block_device_is_one_clear_error():
    path = f"/dev/shm/bulkhead-io-test-{os.getpid()}.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    try:
        run = run_bulkhead("run", "--kernel", TEST_GUEST, "--disk", path,
                           "--cgroup-io-read-bps", "1000000")
    finally:
        os.unlink(path)
    assert run.returncode == 2, run.explain()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "without a block device" in lines[0] and path in lines[0], run.stderr


def test_tenant_limits_bound_all_its_vms_and_a_vm_cannot_change_them(tmp_path):
    """--tenant-*: the first VM of a tenant sets bulkhead/tenant-T's limits, a second one runs
    under them, one asking for other limits is refused with one line while they run."""
    tenant = f"t{os.getpid()}"
    common = ("run", "--kernel", TEST_GUEST, "--rng", "--hold", "--tenant", tenant,
              "--cmdline", "gk.tests=virtio-rng")
    first = BackgroundVm(*common, "--name", f"{tenant}a", "--tenant-pids-max", "900",
                         "--tenant-memory-mib", "8192")
    second = None
    try:
        wait_done(first)
        core = cgroup_paths(first.pid)
        tenant_pids = f"/sys/fs/cgroup/pids{core['pids'].rsplit('/', 1)[0]}"
        assert tenant_pids.endswith(f"/bulkhead/tenant-{tenant}")
        assert open(f"{tenant_pids}/pids.max").read().strip() == "900"
        tenant_mem = f"/sys/fs/cgroup/memory{core['memory'].rsplit('/', 1)[0]}"
        assert int(open(f"{tenant_mem}/memory.limit_in_bytes").read()) == 8192 << 20
        second = BackgroundVm(*common, "--name", f"{tenant}b")  # no tenant limits: joins
        wait_done(second)
        assert cgroup_paths(second.pid)["pids"].startswith(core["pids"].rsplit("/", 1)[0] + "/")
        refused = run_bulkhead(*common, "--name", f"{tenant}c", "--tenant-pids-max", "800",
                               timeout=60)
        assert refused.returncode == 2, refused.explain()
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "under other limits" in lines[0] and "pids 900" in lines[0], \
            refused.stderr
        assert "writable cgroups" not in lines[0]  # the host is fine: the request is not
        assert open(f"{tenant_pids}/pids.max").read().strip() == "900"
        for vm in (first, second):
            vm.proc.send_signal(signal.SIGTERM)
            assert vm.wait(30) == 143, vm.explain()
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert not os.path.exists(tenant_pids)  # the last VM of the tenant took its directory along
