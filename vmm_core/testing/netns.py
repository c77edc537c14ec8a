"""Network namespaces made by a test, and removed after it (root tests of virtio-net).

Every address a network test uses lives in a namespace named `bh-test-<pid>-<n>` that the test
made itself; `Namespaces.cleanup()` deletes them whether the test passed or failed, and
`remove_stale()` deletes those of earlier test processes that were killed before they could.
"""

from __future__ import annotations

import os
import re
import subprocess

PREFIX = "bh-test-"


def sh(ns: str, command: str) -> str:
    """Run `command` (split on blanks) inside namespace `ns`; its stdout, or AssertionError."""
    done = subprocess.run(["ip", "netns", "exec", ns, *command.split()], capture_output=True, text=True)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 to a positive pid: an existence check, nothing is sent
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def remove_stale() -> None:
    """Delete test namespaces whose creating process is gone (it was killed mid-test)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name, pid in re.findall(rf"^({PREFIX}(\d+)-\d+)", listing, re.M):
        if int(pid) > 1 and not _pid_alive(int(pid)):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Namespaces:
    """`make()` returns the name of a fresh namespace (loopback up, IPv6 off: no router
    solicitations or MLD in what a guest receives); `cleanup()` deletes them all."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def make(self) -> str:
        name = f"{PREFIX}{os.getpid()}-{len(self.made)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.made.append(name)
        sh(name, "ip link set lo up")
        sh(name, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        return name

    def cleanup(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made = []


def held_netns(pid: int) -> list[str]:
    """Paths (`/proc/PID/fd/N`) of the network namespaces other than ours that process `pid`
    holds open: how a test reaches the namespace a VM's core made for `netns=new`."""
    ours = os.readlink("/proc/self/ns/net")
    held: dict[str, str] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("net:[") and link != ours:
            held.setdefault(link, f"/proc/{pid}/fd/{fd}")
    return list(held.values())
