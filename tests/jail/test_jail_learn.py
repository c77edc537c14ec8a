"""Learn mode: the probe's workload under a SECCOMP_RET_USER_NOTIF supervisor."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm_core.testing.jail_learn import learn, to_toml
from jail.policy import load_policy

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.mark.parametrize("device", ["rng", "blk"])
def test_learned_syscalls_are_within_the_shipped_policy(device: str, tmp_path: Path) -> None:
    observed = learn(device, rounds=2)
    expected = {"rng": {"getrandom", "epoll_wait", "sendto"}, "blk": {"pwritev2", "fsync"}}[device]
    assert expected <= set(observed), sorted(observed)
    policy = load_policy(device)
    assert set(observed) <= set(policy.rules), sorted(set(observed) - set(policy.rules))
    fragment = to_toml(observed)
    assert 'why = ""' in fragment
    filled = tmp_path / "learned.toml"
    filled.write_text('[policy]\ndefault_action = "kill_process"\n'
                      + fragment.replace('why = ""', 'why = "learned"'))
    assert set(load_policy(filled).rules) == set(observed)
