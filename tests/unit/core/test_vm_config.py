"""VM config files (`vmm_core.vm_config`): a file is the run flags as TOML keys and the device
flags as tables; every error names the file, the line and the key."""

from __future__ import annotations

import re

import pytest

from vmm_core.cli import _subparser, build_parser, main
from vmm_core.errors import ConfigError
from vmm_core.vm_config import expand, load


@pytest.fixture
def run_parser():
    return _subparser(build_parser(), "run")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "vm.toml"
    path.write_text(text)
    return str(path)


def test_keys_become_the_flags_they_name(tmp_path, run_parser):
    path = write(tmp_path, '''
kernel = "k.elf"
mem = 128
device_timeout_ms = 800
no-cgroup = true
no-jail = false
on-device-crash = "fail"

[[disk]]
path = "a,b.img"
readonly = true
on-crash = "stop-vm"

[[disk]]
path = "c.img"

[vsock]
cid = 5
''')
    argv = load(path, run_parser)
    assert argv == ["--kernel", "k.elf", "--mem", "128", "--device-timeout-ms", "800", "--no-cgroup",
                    "--on-device-crash", "fail",
                    "--disk", "path=a,,b.img,readonly=on,on-crash=stop-vm", "--disk", "path=c.img",
                    "--vsock", "cid=5"]
    args = run_parser.parse_args(argv)
    assert args.mem == 128 and args.no_cgroup and not args.no_jail
    assert args.disk == ["path=a,,b.img,readonly=on,on-crash=stop-vm", "path=c.img"]


def test_command_line_flags_override_the_file(tmp_path, run_parser):
    path = write(tmp_path, 'kernel = "k.elf"\nmem = 128\n')
    args = run_parser.parse_args(expand(["--config", path, "--mem", "64"], run_parser))
    assert args.mem == 64 and args.kernel == "k.elf"


@pytest.mark.parametrize("text, needle", [
    ('kernel = "k"\nmemory = 5\n', "vm.toml:2: memory: unknown key"),
    ('kernel = "k"\n\nmem = "lots"\n', "vm.toml:3: mem:"),
    ('mem = 0\n', "vm.toml:1: mem:"),
    ('on-device-crash = "explode"\n', "vm.toml:1: on-device-crash: one of restart, fail, stop-vm"),
    ('no-cgroup = "yes"\n', "no-cgroup: true or false"),
    ('kernel = "k"\n[[disk]]\npath = "d.img"\nsparse = true\n', "vm.toml:2: disk[0]: unknown key 'sparse'"),
    ('[[disk]]\nreadonly = true\n', "disk[0]: path is required"),
    ('[vsock]\ncid = "three"\n', "cid is a whole number"),
    ('[[net]]\ntap = "x"\nmtu = true\n', "mtu is a whole number"),
    ('disk = "d.img"\n', "a table of disk keys"),
    ('kernel = \n', "not valid TOML"),
], ids=["unknown", "bad-int", "not-positive", "bad-choice", "bad-bool", "device-key",
        "device-required", "vsock-type", "net-type", "device-not-table", "syntax"])
def test_errors_name_file_line_and_key(tmp_path, run_parser, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, run_parser)
    assert needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_config_check_verb(tmp_path, capsys):
    good = write(tmp_path, 'kernel = "k.elf"\n[rng]\n')
    assert main(["config", "check", good]) == 0
    assert "vm.toml: ok" in capsys.readouterr().out
    (tmp_path / "bad.toml").write_text("mem = 64\n")
    assert main(["config", "check", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kernel is required" in err[0], err
    assert main(["config", "check", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_run_with_a_bad_config_is_one_line_and_status_2(tmp_path, capsys):
    path = write(tmp_path, 'kernel = "k"\nvcpus = -1\n')
    assert main(["run", "--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vm.toml:2: vcpus:" in err[0], err


# -- Firecracker's JSON config ------------------------------------------------------------------

FIRECRACKER = {
    "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0",
                    "initrd_path": "initrd.img"},
    "drives": [{"drive_id": "rootfs", "path_on_host": "root,fs.ext4", "is_root_device": True,
                "is_read_only": True,
                "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100,
                                               "one_time_burst": 4096},
                                 "ops": {"size": 100, "refill_time": 1000}}}],
    "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "smt": False},
    "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02",
                            "tx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 10}}}],
    "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"},
}


def test_firecracker_config_maps_onto_our_flags(tmp_path, run_parser):
    import json

    from vmm_core import firecracker_config
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(FIRECRACKER))
    argv = firecracker_config.load(str(path))
    assert argv == ["--kernel", "vmlinux", "--cmdline", "console=ttyS0", "--initrd", "initrd.img",
                    "--vcpus", "2", "--mem", "512",
                    "--disk", "path=root,,fs.ext4,readonly=on,id=rootfs,bandwidth=1048576/100/4096,"
                              "ops=100/1000",
                    "--net", "tap=tap0,mac=06:00:AC:10:00:02,id=eth0,tx_bandwidth=1000/10",
                    "--vsock", "cid=3,socket=/tmp/v.sock"]
    args = run_parser.parse_args(expand(["--firecracker-config", str(path), "--mem", "64"], run_parser))
    assert args.mem == 64 and args.vcpus == 2  # the command line still wins
    from vmm_core.devices.spec import parse_device_arg
    from ipc_protocol.kinds import KINDS
    disk = parse_device_arg(KINDS["blk"], args.disk[0], 0)
    assert disk.name == "rootfs" and disk.params["path"] == "root,fs.ext4" and disk.params["readonly"]
    nic = parse_device_arg(KINDS["net"], args.net[0], 0)
    assert nic.params["tap"] == "tap0" and nic.params["tx_bandwidth"] == "1000/10"


def test_firecracker_vhost_user_drive_becomes_a_frontend_disk(tmp_path):
    import json

    from vmm_core import firecracker_config
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({"boot-source": {"kernel_image_path": "k"},
                                "drives": [{"drive_id": "data", "socket": "/run/qsd.sock",
                                            "is_root_device": False}]}))
    assert firecracker_config.load(str(path))[-2:] == ["--disk", "vhost-user=/run/qsd.sock,id=data"]


@pytest.mark.parametrize("patch, needle", [
    ({"logger": {"log_path": "/tmp/fc.log"}}, "'logger' is not supported"),
    ({"balloon": {}}, "'balloon' is not supported"),
    ({"surprise": {}}, "unknown section 'surprise'"),
    ({"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": True}}, "smt=true"),
    ({"drives": [{"path_on_host": "x", "io_engine": "Async"}]}, "io_engine Sync"),
    ({"drives": [{"path_on_host": "x", "socket": "/tmp/s"}]}, "takes only drive_id and is_root_device"),
    ({"network-interfaces": [{"iface_id": "eth0"}]}, "host_dev_name is required"),
    ({"boot-source": {"boot_args": "x"}}, "kernel_image_path is required"),
], ids=["logger", "balloon", "unknown", "smt", "io-engine", "vhost-user-drive", "no-tap", "no-kernel"])
def test_firecracker_config_refuses_what_it_cannot_honour_by_name(tmp_path, patch, needle):
    import json

    from vmm_core import firecracker_config
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({"boot-source": {"kernel_image_path": "k"}, **patch}))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        firecracker_config.load(str(path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        firecracker_config.load(str(path))
