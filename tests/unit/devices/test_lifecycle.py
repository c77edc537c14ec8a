"""The device lifecycle state machine, driven with a fake clock (no processes)."""

from __future__ import annotations

import pytest

from vmm_core.devices import lifecycle as lc
from vmm_core.devices.options import SupervisionPolicy


def machine(**policy) -> lc.Lifecycle:
    return lc.Lifecycle("blk0", SupervisionPolicy(**policy))


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def start(m: lc.Lifecycle, now: float = 0.0) -> None:
    assert m.start() == [lc.Spawn(1, activate=False)]
    assert m.handle(lc.Started(1, now)) == []
    assert m.state is lc.State.RUNNING and m.serving


def test_first_start_failure_is_the_vm_s_error_and_spawns_nothing() -> None:
    m = machine()
    m.start()
    assert m.handle(lc.StartFailed(1, 0.0, "no such image")) == [lc.Kill(1)]
    assert m.state is lc.State.STOPPED and m.initial_error == "no such image"


def test_a_serving_device_that_dies_is_restarted_at_once_with_the_shadow() -> None:
    m = machine()
    start(m)
    actions = m.handle(lc.Died(1, 5.0, "process 7 killed by signal SIGKILL"))
    assert actions[0] == lc.Kill(1) and actions[-1] == lc.Spawn(2, activate=True)
    assert m.state is lc.State.RESTARTING and m.display_state == "restarting"
    assert kinds(m.handle(lc.Started(2, 5.03))) == ["Restarted"]
    assert m.restarts == 1 and m.recovery_ms[-1] == pytest.approx(30.0)
    assert m.state is lc.State.RUNNING


def test_stale_events_about_a_replaced_process_are_ignored() -> None:
    m = machine()
    start(m)
    m.handle(lc.Died(1, 1.0, "x"))
    assert m.handle(lc.Died(1, 1.01, "the same death, seen twice")) == []
    assert m.handle(lc.Started(1, 1.02)) == []
    assert m.generation == 2 and m.failure_count == 1


def test_crash_loop_backs_off_and_the_tick_resumes_it() -> None:
    m = machine()
    start(m)
    m.handle(lc.Died(1, 1.0, "boom"))                  # was serving: at once
    m.handle(lc.Started(2, 1.01))
    actions = m.handle(lc.Died(2, 1.02, "boom"))       # died 10 ms after serving: quick
    assert lc.Spawn(3, activate=True) in actions       # the first quick failure still restarts
    actions = m.handle(lc.StartFailed(3, 1.03, "cannot start"))
    assert not any(isinstance(a, lc.Spawn) for a in actions)
    assert m.state is lc.State.BACKOFF and m.display_state == "restarting"
    assert m.next_deadline() == pytest.approx(1.04)
    assert m.handle(lc.Tick(1.035)) == []
    assert m.handle(lc.Tick(1.05)) == [lc.Spawn(4, activate=True)]


def test_failed_restarts_count_against_the_budget() -> None:
    """Issue 9, finding 8: a device that can never start again must not spawn forever."""
    m = machine(max_restarts=3, restart_window=30.0)
    start(m)
    now = 1.0
    m.handle(lc.Died(1, now, "killed"))
    spawned = 1
    while m.state in (lc.State.RESTARTING, lc.State.BACKOFF):
        now += 0.6
        for a in m.handle(lc.Tick(now)):
            assert isinstance(a, lc.Spawn)
        if m.state is lc.State.RESTARTING:
            spawned += 1
            m.handle(lc.StartFailed(m.generation, now, "restart failed"))
        assert spawned < 10, "the budget never ran out"
    assert m.state is lc.State.NEEDS_RESET
    assert m.failure_count == 4  # the kill and three failed restarts: more than max_restarts


def test_policy_fail_waits_for_the_guest_reset() -> None:
    m = machine(on_crash="fail")
    start(m)
    actions = m.handle(lc.Died(1, 2.0, "bad reply"))
    assert kinds(actions) == ["Kill", "Log", "FailDevice"] and m.state is lc.State.NEEDS_RESET
    actions = m.handle(lc.GuestReset(3.0))
    assert actions[0] == lc.Kill(1) and actions[-1] == lc.Spawn(2, activate=True)
    assert m.state is lc.State.STARTING
    m.handle(lc.Started(2, 3.1))
    assert m.state is lc.State.RUNNING and m.restarts == 0


def test_policy_stop_vm() -> None:
    m = machine(on_crash="stop-vm")
    start(m)
    actions = m.handle(lc.Died(1, 2.0, "seccomp violation: socket(2)"))
    assert actions[-1] == lc.StopVm("device blk0 failed: seccomp violation: socket(2)")
    assert m.state is lc.State.STOPPED
    assert m.handle(lc.GuestReset(3.0)) == [] and m.handle(lc.Tick(9.0)) == []


def test_budget_window_forgets_old_failures() -> None:
    m = machine(max_restarts=2, restart_window=10.0)
    start(m)
    for i, t in enumerate((1.0, 20.0, 40.0, 60.0)):  # far apart: never more than 1 in a window
        m.handle(lc.Died(m.generation, t, "killed"))
        m.handle(lc.Started(m.generation, t + 1.0))
    assert m.state is lc.State.RUNNING and m.restarts == 4


def test_close_kills_once_and_ends_everything() -> None:
    m = machine()
    start(m)
    assert m.handle(lc.Close()) == [lc.Kill(1)]
    assert m.handle(lc.Close()) == []
    assert m.handle(lc.Died(1, 1.0, "x")) == []
