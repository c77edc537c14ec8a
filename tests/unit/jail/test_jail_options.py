"""JailOptions: what `spawn_device(jail=...)` accepts and the JailSpec it makes (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jail.errors import JailError
from ipc_protocol.kinds import BLK, CONSOLE, RNG
from jail.options import VM_ID_BASE, JailOptions, default_vm_ids
from jail.policy import CONFIG_DIR


def test_coerce_true_false_dict_and_options() -> None:
    assert JailOptions.coerce(True) == JailOptions()
    assert JailOptions.coerce(False) is None and JailOptions.coerce(None) is None
    opts = JailOptions(seccomp="trap", uid=300000, gid=300001)
    assert JailOptions.coerce(opts) is opts
    assert JailOptions.coerce({"seccomp": "trap", "uid": 300000, "gid": 300001}) == opts
    assert JailOptions.coerce({"cgroup_procs": ["/a/cgroup.procs"]}).cgroup_procs == ("/a/cgroup.procs",)


@pytest.mark.parametrize("bad, words", [
    ({"seccomp": "strict"}, ["strict", "kill, trap, log, off"]),
    ({"uid": 0}, ["uid 0", "unprivileged"]),
    ({"gid": 65534}, ["gid 65534"]),
    ({"colour": "red"}, ["unknown jail option", "colour"]),
])
def test_bad_options_name_the_problem(bad: dict, words: list[str]) -> None:
    with pytest.raises(JailError) as info:
        JailOptions.coerce(bad)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_default_ids_are_one_unprivileged_pair_per_vm() -> None:
    assert default_vm_ids(1234) == (VM_ID_BASE + 2468, VM_ID_BASE + 2468)  # +1 is the set-up id
    assert default_vm_ids() == default_vm_ids(os.getpid())
    spec = JailOptions().spec_for("rng0", "rng")
    assert (spec.uid, spec.gid) == default_vm_ids()
    assert JailOptions(uid=5000, gid=6000).spec_for("rng0", "rng").uid == 5000


def test_spec_follows_the_device_type(tmp_path: Path) -> None:
    spec = JailOptions(seccomp="log").spec_for("blk0", "blk", keep_fds=[7])
    assert spec.policy_path() == CONFIG_DIR / "blk.toml"
    assert spec.seccomp_mode == "log" and spec.keep_fds == [7] and spec.namespaces
    assert JailOptions().spec_for("t0", "test").policy_path() == CONFIG_DIR / "common_device.toml"
    custom = tmp_path / "mine.toml"
    assert JailOptions(policy=str(custom)).spec_for("rng0", "rng").policy_path() == custom


def test_blk_may_not_grow_its_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    fd = os.open(image, os.O_RDONLY)
    try:
        fsize = BLK.fsize_limit({"disk": os.fstat(fd).st_size})
        assert JailOptions().spec_for("blk0", "blk", fsize=fsize).rlimits.fsize == 4096
    finally:
        os.close(fd)
    assert JailOptions().spec_for("console0", "console").rlimits.fsize is None
    # Kinds without a file to append to may write none; the console may grow its output by 1 GiB.
    assert RNG.fsize_limit({}) == 0
    assert CONSOLE.fsize_limit({"output": 10}) == 10 + (1 << 30)
