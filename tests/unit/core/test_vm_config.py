"""VM config files (`vmm_core.vm_config`): a file is the run flags as TOML keys and the device
flags as tables; every error names the file, the line and the key."""

from __future__ import annotations

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
