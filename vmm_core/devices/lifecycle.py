"""A sandboxed device's lifecycle as a sans-I/O state machine (h11's `_state.py` style).

Events come in (`Started`, `StartFailed`, `Died`, `GuestReset`, `Tick`, `Close`), each stamped
with the process generation it is about, and actions come out (`Spawn`, `Kill`, `FailDevice`,
`StopVm`, `Log`).  The supervisor thread turns what it sees (pidfds, control messages, the
proxy's failures, the clock) into events and carries out the actions; it never blocks on a
spawn, which completes as an event.  The restart budget and the crash-loop back-off live here,
so they are unit-tested with a fake clock (`tests/unit/devices/test_lifecycle.py`).

States::

    starting --Started--> running --Died--> restarting --Started--> running
        |                    |                  |  (quick failures: backoff --Tick--> restarting)
        +--StartFailed-------+--(budget spent or policy fail)--> needs-reset --GuestReset--> starting
                             +--(policy stop-vm)--> stopped          any --Close--> closing

An event about an older generation (the pidfd of a process already replaced) is stale and
ignored.  A failed restart counts against the restart budget like any other failure, so a
device that cannot start again ends in `needs-reset` instead of spawning forever.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Union

from .options import SupervisionPolicy

CRASH_LOOP_UPTIME = 0.1   # s: dying sooner after a (re)start than this counts as a crash loop
BACKOFF_FIRST = 0.01      # s after the second quick failure, doubling, at most BACKOFF_MAX
BACKOFF_MAX = 0.5
CAUSES_KEPT = 20


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    BACKOFF = "backoff"
    NEEDS_RESET = "needs-reset"
    STOPPED = "stopped"
    CLOSING = "closing"


# -- events -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Started:
    """The process of `generation` finished its handshake (and took the shadow, on a restart)."""
    generation: int
    now: float


@dataclass(frozen=True)
class StartFailed:
    generation: int
    now: float
    error: str


@dataclass(frozen=True)
class Died:
    """The process of `generation` is gone or unusable: exited, hung, answered garbage, ..."""
    generation: int
    now: float
    cause: str


@dataclass(frozen=True)
class GuestReset:
    """The guest wrote Status = 0 to a device in needs-reset: it wants a fresh one."""
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class Close:
    pass


Event = Union[Started, StartFailed, Died, GuestReset, Tick, Close]


# -- actions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    """Start process `generation`; `activate`: hand it the core's transport shadow."""
    generation: int
    activate: bool


@dataclass(frozen=True)
class Kill:
    """SIGKILL the process of `generation` (if it still runs) and release it."""
    generation: int


@dataclass(frozen=True)
class FailDevice:
    """Report DEVICE_NEEDS_RESET to the guest with a configuration-change interrupt."""
    reason: str


@dataclass(frozen=True)
class StopVm:
    message: str


@dataclass(frozen=True)
class Log:
    level: str  # "error" | "warning" | "info"
    text: str


@dataclass(frozen=True)
class Restarted:
    """A restart is complete: `ms` from the failure to serving again (the supervisor logs it
    with the new pid)."""
    ms: float
    count: int


Action = Union[Spawn, Kill, FailDevice, StopVm, Log, Restarted]


@dataclass
class Lifecycle:
    """One device's supervision state; `handle(event)` -> the actions to carry out."""

    name: str
    policy: SupervisionPolicy
    state: State = State.STARTING
    generation: int = 0
    restarts: int = 0
    failure_count: int = 0
    initial_error: str | None = None   # the first start failed: the VM does not start
    failures: collections.deque = field(default_factory=collections.deque)
    causes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=CAUSES_KEPT))
    recovery_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    serving_since: float = 0.0
    failed_at: float | None = None
    backoff_until: float | None = None
    quick_failures: int = 0
    _activate_next: bool = False
    _first_start: bool = True

    # -- entry points ---------------------------------------------------------------------------
    def start(self) -> list[Action]:
        """The first process of this device."""
        return [self._spawn(activate=False)]

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, Close):
            was = self.state
            self.state = State.CLOSING
            return [] if was is State.CLOSING else [Kill(self.generation)]
        if self.state in (State.CLOSING, State.STOPPED):
            return []
        if isinstance(event, Tick):
            return self._tick(event.now)
        if isinstance(event, GuestReset):
            if self.state is not State.NEEDS_RESET:
                return []
            old = self.generation
            self.state = State.STARTING
            # The shadow is replayed even so: the guest may program the device again before
            # the fresh process serves, and those writes are only in the shadow.
            return [Kill(old), Log("warning", f"device {self.name}: a fresh process after the "
                                               "guest's reset"), self._spawn(activate=True)]
        if event.generation != self.generation:
            return []  # about a process already replaced
        if isinstance(event, Started):
            return self._started(event.now)
        if isinstance(event, StartFailed):
            if self._first_start:
                self.initial_error = event.error
                self.state = State.STOPPED
                return [Kill(self.generation)]
            return self._failed(event.now, f"restart failed: {event.error}", start_failed=True)
        return self._failed(event.now, event.cause, start_failed=False)

    # -- transitions ----------------------------------------------------------------------------
    def _spawn(self, activate: bool) -> Spawn:
        self.generation += 1
        return Spawn(self.generation, activate)

    def _started(self, now: float) -> list[Action]:
        if self.state not in (State.STARTING, State.RESTARTING):
            return []
        actions: list[Action] = []
        if self.state is State.RESTARTING and self.failed_at is not None:
            self.restarts += 1
            self.recovery_ms.append((now - self.failed_at) * 1000)
            actions.append(Restarted(self.recovery_ms[-1], self.restarts))
        self.state = State.RUNNING
        self.serving_since = now
        self.failed_at = None
        self._first_start = False
        return actions

    def _failed(self, now: float, cause: str, *, start_failed: bool) -> list[Action]:
        if self.state not in (State.STARTING, State.RUNNING, State.RESTARTING):
            return []
        actions: list[Action] = [Kill(self.generation)]
        self.causes.append(cause)
        self.failure_count += 1
        actions.append(Log("error", f"device {self.name} stopped: {cause}"))
        if self.failed_at is None:
            self.failed_at = now  # recovery is timed from the first failure of a streak
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.policy.restart_window:
            self.failures.popleft()
        policy = self.policy.on_crash
        if policy == "restart" and len(self.failures) > self.policy.max_restarts:
            actions.append(Log("error", f"device {self.name} failed {len(self.failures)} times in "
                                        f"{self.policy.restart_window:.0f} s: giving up restarts, "
                                        "the device now reports DEVICE_NEEDS_RESET"))
            policy = "fail"
        if policy == "stop-vm":
            self.state = State.STOPPED
            actions.append(StopVm(f"device {self.name} failed: {cause}"))
            return actions
        if policy == "fail":
            self.state = State.NEEDS_RESET
            self.failed_at = None
            actions.append(FailDevice(cause))
            return actions
        # Back off only in a crash loop: a process that could not start, or died within
        # CRASH_LOOP_UPTIME of serving.  A device that was serving restarts at once however
        # often it is killed.
        quick = start_failed or self.state is not State.RUNNING \
            or now - self.serving_since < CRASH_LOOP_UPTIME
        self.quick_failures = self.quick_failures + 1 if quick else 0
        if self.quick_failures >= 2:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.quick_failures - 2))
            self.state = State.BACKOFF
            self.backoff_until = now + delay
            actions.append(Log("warning", f"device {self.name} is crash-looping "
                                          f"({self.quick_failures} quick failures): backing off "
                                          f"{delay * 1000:.0f} ms"))
            return actions
        self.state = State.RESTARTING
        actions.append(self._spawn(activate=True))
        return actions

    def _tick(self, now: float) -> list[Action]:
        if self.state is State.BACKOFF and self.backoff_until is not None \
                and now >= self.backoff_until:
            self.state = State.RESTARTING
            self.backoff_until = None
            return [self._spawn(activate=True)]
        return []

    # -- what others read -----------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self.state is State.RUNNING

    @property
    def display_state(self) -> str:
        """`bulkhead ps`'s word for the state (a back-off is part of restarting)."""
        return "restarting" if self.state is State.BACKOFF else self.state.value

    def next_deadline(self) -> float | None:
        return self.backoff_until if self.state is State.BACKOFF else None
