"""Policy loading, layering and validation (pure: no process is jailed here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jail.errors import PolicyError
from jail.policy import CONFIG_DIR, FORBIDDEN, constants, load_policy, syscall_name

ALL_POLICIES = sorted(CONFIG_DIR.glob("*.toml"))
DEVICES = ("blk", "rng", "console")


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def expect_error(path: Path, needle: str, line: int | None, *words: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    where = f"{path}:{line}:" if line is not None else str(path)
    assert msg.startswith(where) or where in msg, msg
    for w in (needle, *words):
        assert w in msg, msg


@pytest.mark.parametrize("path", ALL_POLICIES, ids=lambda p: p.name)
def test_every_shipped_policy_loads(path: Path) -> None:
    policy = load_policy(path)
    assert policy.default_action == "kill_process"
    assert policy.rules, "a policy with no rules"
    for rule in policy.rules.values():
        assert rule.why, rule.name
        assert rule.name not in FORBIDDEN
        assert rule.source.startswith(str(CONFIG_DIR))


@pytest.mark.parametrize("device", DEVICES)
def test_device_policies_layer_common(device: str) -> None:
    common = load_policy(CONFIG_DIR / "common_device.toml")
    policy = load_policy(device)
    assert [f.name for f in policy.files] == ["common_device.toml", f"{device}.toml"]
    assert set(common.rules) <= set(policy.rules)
    for name in ("socket", "execve", "openat", "ptrace", "mount", "bpf", "kexec_load", "clone",
                 "perf_event_open", "userfaultfd", "ioctl", "kill"):
        assert not policy.allows(name), name


def test_device_specific_syscalls_stay_with_their_device() -> None:
    blk, rng, console = (load_policy(d) for d in DEVICES)
    for name in ("preadv", "pwritev", "fsync", "fallocate"):
        assert blk.allows(name) and not rng.allows(name) and not console.allows(name)
    assert rng.allows("getrandom") and not blk.allows("getrandom")
    assert console.allows("write")


def test_memory_is_never_executable() -> None:
    exec_bit = constants()["PROT_EXEC"]
    policy = load_policy("blk")
    for name in ("mmap", "mprotect"):
        (alt,) = policy.rules[name].when
        (cmp,) = alt
        assert (cmp.arg, cmp.op, cmp.mask, cmp.value) == (2, "masked_eq", exec_bit, 0)


def test_names_resolve_through_libseccomp_and_headers() -> None:
    assert syscall_name(41) == "socket"
    c = constants()
    assert c["PROT_EXEC"] == 4 and c["FIONBIO"] == 0x5421
    assert load_policy("blk").rules["preadv"].nr == 295


def test_unknown_syscall_names_file_and_line(tmp_path: Path) -> None:
    text = '[policy]\ndefault_action = "kill_process"\n\n[syscalls.read]\nwhy = "x"\n\n[syscalls.reed]\nwhy = "typo"\n'
    p = write(tmp_path, "bad.toml", text)
    expect_error(p, "'reed'", line_of(text, "[syscalls.reed]"), "unknown syscall")


def test_bad_argument_index_and_constant(tmp_path: Path) -> None:
    text = ('[policy]\ndefault_action = "kill_process"\n[syscalls.read]\nwhy = "x"\n\n'
            '[syscalls.ioctl]\nwhy = "y"\nwhen = [ { arg7 = "FIONBIO" } ]\n')
    p = write(tmp_path, "argidx.toml", text)
    expect_error(p, "arg7", line_of(text, "when ="))
    text2 = text.replace('arg7 = "FIONBIO"', 'arg1 = "FIONBIOX"')
    p2 = write(tmp_path, "const.toml", text2)
    expect_error(p2, "FIONBIOX", line_of(text2, "when ="), "unknown constant")
    text3 = text.replace('arg7 = "FIONBIO"', 'arg2 = { mask = 1, eq = 2 }')
    p3 = write(tmp_path, "mask.toml", text3)
    expect_error(p3, "outside mask", line_of(text3, "when ="))
    text4 = text.replace('arg7 = "FIONBIO"', 'arg2 = { between = 1 }')
    expect_error(write(tmp_path, "op.toml", text4), "bad comparison", line_of(text4, "when ="))


def test_unknown_actions(tmp_path: Path) -> None:
    text = '[policy]\ndefault_action = "explode"\n[syscalls.read]\nwhy = "x"\n'
    expect_error(write(tmp_path, "a.toml", text), "explode", 2, "unknown action")
    text = '[policy]\ndefault_action = "allow"\n[syscalls.read]\nwhy = "x"\n'
    expect_error(write(tmp_path, "b.toml", text), "no-op", 2)
    text = '[policy]\ndefault_action = "trap"\n\n[syscalls.read]\nwhy = "x"\naction = "maybe"\n'
    expect_error(write(tmp_path, "c.toml", text), "maybe", 6)
    ok = write(tmp_path, "d.toml", '[policy]\ndefault_action = "errno:EPERM"\n'
                                   '[syscalls.read]\nwhy = "x"\naction = "errno:ENOSYS"\n')
    assert load_policy(ok).rules["read"].action == "errno:ENOSYS"


def test_include_cycle_is_reported_with_the_chain(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", 'include = ["b.toml"]\n[policy]\ndefault_action = "kill_process"\n')
    write(tmp_path, "b.toml", '# b\ninclude = ["c.toml"]\n')
    c = write(tmp_path, "c.toml", '\n\ninclude = ["a.toml"]\n')
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "a.toml")
    assert f"{c}:3:" in str(info.value) and "a.toml -> b.toml -> c.toml -> a.toml" in str(info.value)
    self_inc = write(tmp_path, "self.toml", 'include = ["self.toml"]\n')
    expect_error(self_inc, "include cycle", 1)
    missing = write(tmp_path, "m.toml", '\ninclude = ["nope.toml"]\n')
    expect_error(missing, "nope.toml", 2, "not found")


def test_why_is_required(tmp_path: Path) -> None:
    text = '[policy]\ndefault_action = "kill_process"\n\n[syscalls.read]\nwhy = ""\n'
    expect_error(write(tmp_path, "w.toml", text), "'read'", 5, "why")
    text = '[policy]\ndefault_action = "kill_process"\n\n[syscalls.read]\nwhen = [ { arg0 = 3 } ]\n'
    expect_error(write(tmp_path, "w2.toml", text), "'read'", 4, "why")


def test_forbidden_syscalls_are_rejected_anywhere(tmp_path: Path) -> None:
    text = '[policy]\ndefault_action = "kill_process"\n[syscalls.read]\nwhy = "x"\n[syscalls.execve]\nwhy = "no"\n'
    expect_error(write(tmp_path, "f.toml", text), "'execve'", 5, "never")


def test_layering_duplicates_and_extend(tmp_path: Path) -> None:
    write(tmp_path, "base.toml", '[policy]\ndefault_action = "kill_process"\n'
                                 '[syscalls.read]\nwhy = "base"\n'
                                 '[syscalls.fcntl]\nwhy = "base"\nwhen = [ { arg1 = "F_GETFL" } ]\n')
    dup_text = 'include = ["base.toml"]\n\n[syscalls.read]\nwhy = "again"\n'
    dup = write(tmp_path, "dup.toml", dup_text)
    expect_error(dup, "already allowed", 3, "base.toml:3")
    ext = write(tmp_path, "ext.toml", 'include = ["base.toml"]\n[policy]\ndefault_action = "trap"\n'
                                      '[syscalls.fcntl]\nwhy = "more"\nextend = true\n'
                                      'when = [ { arg1 = "F_SETFL" } ]\n')
    policy = load_policy(ext)
    assert policy.default_action == "trap"  # the including file wins
    assert [alt[0].value for alt in policy.rules["fcntl"].when] == [3, 4]
    assert policy.rules["read"].why == "base"


def test_toml_syntax_and_unknown_keys(tmp_path: Path) -> None:
    expect_error(write(tmp_path, "s.toml", '[policy]\ndefault_action = "kill_process"\n[syscalls.read\n'),
                 "not valid TOML", 3)
    text = '[policy]\ndefault_action = "kill_process"\n[syscalls.read]\nwhy = "x"\nwhi = "typo"\n'
    expect_error(write(tmp_path, "k.toml", text), "'whi'", 5, "unknown key")
    expect_error(write(tmp_path, "t.toml", 'sycalls = 1\n'), "'sycalls'", 1, "unknown key")
    expect_error(write(tmp_path, "n.toml", '[syscalls.read]\nwhy = "x"\n'), "default_action", 1)


def test_learn_fragment_pins_arguments_by_name(tmp_path: Path) -> None:
    from vmm_core.testing.jail_learn import to_toml

    c = constants()
    observed = {
        "ioctl": {(5, c["FIONBIO"], 0, 0, 0, 0), (5, 0xAE00, 0, 0, 0, 0)},
        "mmap": {(0, 4096, c["PROT_READ"], 0, 0, 0)},
        "read": {(3, 0, 8, 0, 0, 0)},
    }
    text = to_toml(observed, skip={"read"})
    assert "[syscalls.read]" not in text
    assert '{ arg1 = "FIONBIO" }' in text and "{ arg1 = 44544 }" in text
    assert 'when = [ { arg2 = { without = "PROT_EXEC" } } ]' in text
    p = write(tmp_path, "learned.toml", '[policy]\ndefault_action = "kill_process"\n' + text)
    expect_error(p, "'ioctl'", None, "why")  # a person must say why before it loads
