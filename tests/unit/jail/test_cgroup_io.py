"""io limits: the files each cgroup version gets, and which block device an image is on."""

from __future__ import annotations

import os

import pytest

from jail.cgroup import IO_CONTROLLER, IoLimit, VmCgroup
from vmm_core.cgroups import block_device_of, io_limits
from vmm_core.errors import ConfigError


def test_v1_writes_one_throttle_file_per_direction(tmp_path):
    cg = VmCgroup("vm", 1, {IO_CONTROLLER: tmp_path})
    cg.set_io((IoLimit("253:0", read_bps=1000, write_iops=7),))
    assert (tmp_path / "blkio.throttle.read_bps_device").read_text() == "253:0 1000"
    assert (tmp_path / "blkio.throttle.write_iops_device").read_text() == "253:0 7"
    assert not (tmp_path / "blkio.throttle.write_bps_device").exists()


def test_v2_writes_one_io_max_line(tmp_path):
    cg = VmCgroup("vm", 2, {"": tmp_path})
    cg.set_io((IoLimit("8:0", read_bps=5, write_bps=6, read_iops=7, write_iops=8),))
    assert (tmp_path / "io.max").read_text() == "8:0 rbps=5 wbps=6 riops=7 wiops=8"


def test_device_cgroups_stay_in_the_vms_blkio_cgroup(tmp_path):
    for c in ("memory", IO_CONTROLLER):
        (tmp_path / c).mkdir()
    cg = VmCgroup("vm", 1, {"memory": tmp_path / "memory", IO_CONTROLLER: tmp_path / IO_CONTROLLER})
    child = cg.child("blk0")
    assert set(child.dirs) == {"memory"}


def test_an_image_on_a_disk_names_its_whole_disk(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    dev = os.stat(image).st_dev
    if os.major(dev) == 0:
        pytest.skip("the test directory is not on a block device here")
    major, minor = block_device_of(str(image)).split(":")
    sys_dir = os.path.realpath(f"/sys/dev/block/{major}:{minor}")
    assert not os.path.exists(os.path.join(sys_dir, "partition"))  # a disk, not a partition
    assert io_limits([str(image), str(image)], 1, None, None, None) == (
        IoLimit(f"{major}:{minor}", read_bps=1),)  # one per device


def test_no_limits_need_no_block_device():
    assert io_limits(["/dev/shm/whatever"], None, None, None, None) == ()


def test_an_image_on_tmpfs_is_refused_with_what_to_do():
    path = f"/dev/shm/bulkhead-unit-{os.getpid()}.img"
    open(path, "wb").close()
    try:
        with pytest.raises(ConfigError, match="without a block device"):
            block_device_of(path)
    finally:
        os.unlink(path)


# -- tenant limits ---------------------------------------------------------------------------------
from jail.cgroup import TenantLimits  # noqa: E402
from jail.errors import CgroupConflict  # noqa: E402


def _v1_tenant(tmp_path, vms):
    """A v1 layout bulkhead/tenant-t/<vm> per controller, files as the kernel would show them."""
    dirs = {}
    for c in ("memory", "pids", "cpu"):
        t = tmp_path / c / "bulkhead" / "tenant-t"
        for vm in vms:
            (t / vm).mkdir(parents=True, exist_ok=True)
        dirs[c] = t
    (dirs["memory"] / "memory.limit_in_bytes").write_text("9223372036854771712")
    (dirs["pids"] / "pids.max").write_text("max")
    (dirs["cpu"] / "cpu.cfs_quota_us").write_text("-1")
    return dirs


def test_the_first_vm_of_a_tenant_sets_the_tenants_limits(tmp_path):
    dirs = _v1_tenant(tmp_path, ["a"])
    cg = VmCgroup("a", 1, {c: d / "a" for c, d in dirs.items()})
    cg._set_tenant_limits(TenantLimits(memory_max=1 << 30, pids_max=900, cpu_quota=1.5))
    assert (dirs["memory"] / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (dirs["pids"] / "pids.max").read_text() == "900"
    assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "150000"


def test_a_later_vm_must_bring_the_same_tenant_limits_or_none(tmp_path):
    dirs = _v1_tenant(tmp_path, ["a", "b"])
    (dirs["pids"] / "pids.max").write_text("900")  # set by running VM a
    b = VmCgroup("b", 1, {c: d / "b" for c, d in dirs.items()})
    b._set_tenant_limits(TenantLimits(pids_max=900))  # the same: fine
    b._set_tenant_limits(None)                        # none: fine
    with pytest.raises(CgroupConflict, match=r"tenant-t already runs VMs \(a\).*pids 900"):
        b._set_tenant_limits(TenantLimits(pids_max=800))
    assert (dirs["pids"] / "pids.max").read_text() == "900"


def test_a_vm_is_made_and_checked_under_its_tenants_lock(tmp_path, monkeypatch):
    """Two VMs of one tenant started at once: the second makes its directory and checks the
    tenant's limits only once the first is through, so neither misses nor miscounts the other."""
    import fcntl
    import threading

    import jail.cgroup as cgroup
    dirs = _v1_tenant(tmp_path, ["a"])
    (dirs["pids"] / "pids.max").write_text("900")
    monkeypatch.setattr(cgroup, "read_mounts", lambda: [
        cgroup.Mount(tmp_path / c, "cgroup", frozenset({c, "rw"}), True) for c in dirs])
    monkeypatch.setattr(cgroup, "own_cgroups", lambda: {})
    lock = os.open(dirs["cpu"], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a VM being created in another process would
    made: list[VmCgroup] = []
    t = threading.Thread(target=lambda: made.append(VmCgroup.create(
        "b", version=1, tenant="t", tenant_limits=TenantLimits(pids_max=900))))
    t.start()
    t.join(0.5)
    assert t.is_alive() and not (dirs["pids"] / "b").exists()
    os.close(lock)
    t.join(10)
    assert made and made[0].dirs["pids"] == dirs["pids"] / "b"
    assert (dirs["pids"] / "b").is_dir()


def test_memory_limit_hits_are_read_from_each_versions_counter(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "memory.failcnt").write_text("17\n")
    assert VmCgroup("vm", 1, {"memory": tmp_path / "v1"}).memory_limit_hits() == 17
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n")
    assert VmCgroup("vm", 2, {"": tmp_path / "v2"}).memory_limit_hits() == 5
    assert VmCgroup("vm", 1, {}).memory_limit_hits() == 0  # no memory controller: none counted
