"""Every bad input gets one clear line on stderr and exit status 2, and leaves nothing behind."""

import glob
import os
import subprocess
import tempfile

import pytest

from vmm_core.testing import ROOT, TEST_GUEST, GuestRun, bulkhead_argv, run_bulkhead


def one_line_error(run, *needles):
    assert run.returncode == 2, run.explain()
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("bulkhead: ")
    for n in needles:
        assert n in lines[0], lines[0]


def leftover_scratch():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "bulkhead-*")))


@pytest.mark.parametrize("args,needles", [
    (["run", "--kernel", "/nonexistent/vmlinux"], ["/nonexistent/vmlinux", "no such file"]),
    (["run", "--kernel", "/etc"], ["not a regular file"]),
    (["run", "--kernel", "/etc/hostname"], ["neither a bzImage nor an ELF"]),
    (["run", "--kernel", TEST_GUEST, "--mem", "0"], ["--mem", "at least 1"]),
    (["run", "--kernel", TEST_GUEST, "--mem", "1"], ["--mem 1", "between"]),
    (["run", "--kernel", TEST_GUEST, "--mem", "lots"], ["--mem", "whole number"]),
    (["run", "--kernel", TEST_GUEST, "--vcpus", "999"], ["--vcpus 999"]),
    (["run", "--kernel", TEST_GUEST, "--tenant-pids-max", "10"], ["need --tenant NAME"]),
    (["run", "--kernel", TEST_GUEST, "--tenant", "t", "--tenant-cpu-quota", "1",
      "--cgroup-cpu-quota", "2"], ["--cgroup-cpu-quota 2 is more than", "--tenant-cpu-quota 1"]),
    (["run", "--kernel", TEST_GUEST, "--tenant", "t", "--tenant-cpu-quota", "0"],
     ["--tenant-cpu-quota 0", "0.01 to 1024"]),
    (["run", "--kernel", TEST_GUEST, "--no-cgroup", "--cgroup-io-read-bps", "10"],
     ["--no-cgroup cannot be combined"]),
    (["up", "--parallel", "0", "examples"], ["--parallel", "give 1 to 10000"]),
    (["run", "--kernel", TEST_GUEST, "--device-start-timeout", "0"],
     ["--device-start-timeout", "above 0"]),
    (["run", "--kernel", TEST_GUEST, "--device-start-timeout", "nan"],
     ["--device-start-timeout", "above 0"]),
    (["run", "--kernel", TEST_GUEST, "--disk", "/nonexistent.img"], ["--disk", "no such file"]),
    (["run", "--kernel", TEST_GUEST, "--console", "/nonexistent/dir/out.txt"], ["--console", "does not exist"]),
    (["run", "--kernel", TEST_GUEST, "--serial", "/nonexistent/dir/serial.txt"], ["--serial", "cannot open"]),
    (["run"], ["--kernel"]),
    (["frobnicate"], ["invalid choice"]),
    (["run", "--kernel", TEST_GUEST, "--bogus-flag"], ["unrecognized arguments"]),
])
def test_bad_input_one_line_exit_2(args, needles):
    before = leftover_scratch()
    one_line_error(run_bulkhead(*args, timeout=60), *needles)
    # Nothing of ours left behind (a dir of an earlier test's VM may vanish meanwhile: not ours).
    assert not leftover_scratch() - before


def test_disk_option_typo(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    one_line_error(run_bulkhead("run", "--kernel", TEST_GUEST, "--disk", f"{img},readnoly"),
                   "unknown option 'readnoly'")


def test_missing_kvm_device_is_explained():
    run = run_bulkhead("run", "--kernel", TEST_GUEST, env={"BULKHEAD_KVM_DEVICE": "/nonexistent/kvm"})
    one_line_error(run, "/nonexistent/kvm does not exist")


def test_kvm_permission_denied_is_explained():
    # An unprivileged user (nobody) cannot open the root-only /dev/kvm.
    if not os.path.exists("/dev/kvm") or os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is missing or world-accessible here")
    assert os.geteuid() == 0, "this check drops from root to nobody with setpriv"
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           *bulkhead_argv("run", "--kernel", TEST_GUEST)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    one_line_error(GuestRun(proc.returncode, proc.stdout, proc.stderr), "no permission to open /dev/kvm")


def test_help_has_examples():
    run = run_bulkhead("run", "--help")
    assert run.returncode == 0
    assert "examples:" in run.stdout and "--kernel" in run.stdout


@pytest.mark.parametrize("argv, started", [
    (["run", "--kernel", "k", "--disk", "d.img"], True),
    (["run", "--kernel", "k", "--rng"], True),
    (["run", "--kernel", "k", "--net=tap=t0"], True),
    (["demo"], True),
    (["run", "--kernel", "k"], False),                                   # no device
    (["run", "--kernel", "k", "--rng", "--no-sandbox"], False),
    (["run", "--kernel", "k", "--rng", "--no-jail"], False),
    (["run", "--kernel", "k", "--rng", "--spawn-method", "exec"], False),
    (["run", "--kernel", "k", "--rng", "--spawn-method=exec"], False),
    (["run", "--rng", "--help"], False),
    (["ps"], False),
])
def test_the_zygote_is_prestarted_only_for_a_run_with_jailed_devices(monkeypatch, argv, started):
    from vmm_core import cli
    from vmm_core.devices import zygote

    calls = []
    monkeypatch.setattr(zygote, "prestart", lambda: calls.append(1))
    cli._prestart_from_argv(argv)
    assert bool(calls) is started


@pytest.mark.parametrize("text, started", [
    ('kernel = "k"\nrng = true\n', True),
    ('kernel = "k"\n[[disk]]\npath = "d.img"\n', True),
    ('kernel = "k"\nno-sandbox = true\n[[disk]]\npath = "d.img"\n', False),
    ('kernel = "k"\nno_jail = true\nrng = true\n', False),
    ('kernel = "k"\nspawn-method = "exec"\nrng = true\n', False),
    ('kernel = "k"\n', False),
    ('not toml [', False),
])
def test_a_config_file_decides_the_zygote_prestart_too(monkeypatch, tmp_path, text, started):
    from vmm_core import cli
    from vmm_core.devices import zygote

    calls = []
    monkeypatch.setattr(zygote, "prestart", lambda: calls.append(1))
    (tmp_path / "vm.toml").write_text(text)
    cli._prestart_from_argv(["run", "--config", str(tmp_path / "vm.toml")])
    cli._prestart_from_argv(["run", f"--config={tmp_path / 'vm.toml'}"])
    assert calls == ([1, 1] if started else [])
    # A flag beside the file still turns it off.
    calls.clear()
    cli._prestart_from_argv(["run", "--config", str(tmp_path / "vm.toml"), "--no-sandbox"])
    assert not calls
