"""Connect a VM's network namespace to the host: a veth pair, addresses and routes, with `ip`.

The VM's tap lives in its own network namespace (`vmm_core.devices.tap`).  This module plans
and runs the `ip` commands that give that namespace a way out, as a list of argv lists the user
can read (`--dry-run`) or run.  The recipe, for a namespace NS holding tap TAP, with the guest
at 10.0.2.15/24 and its peer (the tap's address, the guest's gateway) at 10.0.2.2/24:

    ip link add bh-NAME-h type veth peer name bh-NAME-n   # in the host namespace
    ip link set bh-NAME-n netns NS                         # NS: a name or a path, e.g.
                                                           #   /proc/PID/fd/N for netns=new
    ip addr add 10.200.0.1/30 dev bh-NAME-h; ip link set bh-NAME-h up
    nsenter --net=NS ip addr add 10.200.0.2/30 dev bh-NAME-n
    nsenter --net=NS ip link set bh-NAME-n up
    nsenter --net=NS ip addr add 10.0.2.2/24 dev TAP; nsenter --net=NS ip link set TAP up
    nsenter --net=NS ip route add default via 10.200.0.1
    nsenter --net=NS sysctl -qw net.ipv4.ip_forward=1      # the namespace routes for the guest
    ip route add 10.0.2.0/24 via 10.200.0.2                # the host reaches the guest

For the guest to reach beyond the host, the host also forwards and masquerades (host policy,
not done here): `sysctl -w net.ipv4.ip_forward=1` and
`iptables -t nat -A POSTROUTING -s 10.0.2.0/24 ! -o bh-NAME-h -j MASQUERADE`.
Teardown: `ip link del bh-NAME-h` (the peer and the routes go with it); a `netns=new` namespace
disappears by itself when the VM exits.

`bulkhead net setup --netns NS --tap TAP [--name NAME] [--dry-run]`, `bulkhead net down ...`
(or `python -m vmm_core.netsetup ... [--down]`).
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
from dataclasses import dataclass

from .devices.tap import TapError, check_ifname


@dataclass(frozen=True)
class NetPlan:
    """Where the pieces go.  `host_netns` None means the real host namespace (tests put the
    "host" side in a namespace of their own)."""

    netns: str
    tap: str
    name: str = "vm0"
    tap_addr: str = "10.0.2.2/24"
    link_host: str = "10.200.0.1/30"
    link_ns: str = "10.200.0.2/30"
    host_netns: str | None = None

    def __post_init__(self) -> None:
        check_ifname(self.tap)
        for iface in (self.veth_host, self.veth_ns):
            check_ifname(iface)
        try:
            tap_if = ipaddress.ip_interface(self.tap_addr)
            host_if, ns_if = ipaddress.ip_interface(self.link_host), ipaddress.ip_interface(self.link_ns)
        except ValueError as e:
            raise TapError(f"net setup: {e}") from None
        if host_if.network != ns_if.network:
            raise TapError(f"net setup: {self.link_host} and {self.link_ns} are not in one subnet")
        if tap_if.network.overlaps(host_if.network):
            raise TapError(f"net setup: the guest subnet {tap_if.network} overlaps the link "
                           f"{host_if.network}")

    @property
    def veth_host(self) -> str:
        return f"bh-{self.name}-h"

    @property
    def veth_ns(self) -> str:
        return f"bh-{self.name}-n"

    @property
    def guest_subnet(self) -> str:
        return str(ipaddress.ip_interface(self.tap_addr).network)

    def _in(self, netns: str | None, *argv: str) -> list[str]:
        return [*(["nsenter", f"--net={_ns_path(netns)}"] if netns else []), *argv]

    def up(self) -> list[list[str]]:
        """The commands that connect the namespace, in order."""
        host, ns = self.host_netns, self.netns
        link_host_ip = str(ipaddress.ip_interface(self.link_host).ip)
        link_ns_ip = str(ipaddress.ip_interface(self.link_ns).ip)
        return [
            self._in(host, "ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns),
            self._in(host, "ip", "link", "set", self.veth_ns, "netns", _ns_path(ns)),
            self._in(host, "ip", "addr", "add", self.link_host, "dev", self.veth_host),
            self._in(host, "ip", "link", "set", self.veth_host, "up"),
            self._in(ns, "ip", "addr", "add", self.link_ns, "dev", self.veth_ns),
            self._in(ns, "ip", "link", "set", self.veth_ns, "up"),
            self._in(ns, "ip", "addr", "add", self.tap_addr, "dev", self.tap),
            self._in(ns, "ip", "link", "set", self.tap, "up"),
            self._in(ns, "ip", "route", "add", "default", "via", link_host_ip),
            self._in(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"),
            self._in(host, "ip", "route", "add", self.guest_subnet, "via", link_ns_ip),
        ]

    def down(self) -> list[list[str]]:
        """Undo `up` (deleting one veth end deletes the pair and its routes)."""
        return [self._in(self.host_netns, "ip", "link", "del", self.veth_host)]


def _ns_path(netns: str) -> str:
    """A namespace name of `ip netns`, or already a path."""
    return netns if "/" in netns else f"/run/netns/{netns}"


def run(commands: list[list[str]], *, check: bool = True) -> None:
    """Run each command; the first failure raises TapError naming it and ip's message."""
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode and check:
            raise TapError(f"net setup: `{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")


def main(argv: list[str] | None = None, prog: str = "python -m vmm_core.netsetup") -> int:
    p = argparse.ArgumentParser(prog=prog,
                                description="Connect a VM's network namespace to the host.")
    p.add_argument("--netns", required=True, help="the VM's namespace: an `ip netns` name or a path")
    p.add_argument("--tap", required=True, help="the VM's tap inside that namespace")
    p.add_argument("--name", default="vm0", help="names the veth pair bh-NAME-h / bh-NAME-n")
    p.add_argument("--tap-addr", default="10.0.2.2/24", help="the tap's address: the guest's peer")
    p.add_argument("--link-host", default="10.200.0.1/30")
    p.add_argument("--link-ns", default="10.200.0.2/30")
    p.add_argument("--down", action="store_true", help="remove the veth pair instead")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    try:
        plan = NetPlan(args.netns, args.tap, args.name, args.tap_addr, args.link_host, args.link_ns)
        commands = plan.down() if args.down else plan.up()
        if args.dry_run:
            for c in commands:
                print(" ".join(c))
            return 0
        run(commands, check=not args.down)
    except TapError as e:
        print(f"bulkhead: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
