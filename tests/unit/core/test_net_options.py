"""`--net` options, interface names, default MACs and the veth plan (pure: nothing is created)."""

from __future__ import annotations

import pytest

from vmm_core.devices.tap import NetOptions, TapError, check_ifname, default_mac, parse_net
from vmm_core.netsetup import NetPlan, main


@pytest.mark.parametrize("name", ["tap0", "bh-vm1", "x", "a" * 15, "tap%d"])
def test_valid_interface_names(name):
    assert check_ifname(name) == name.encode()


@pytest.mark.parametrize("name,why", [
    ("", "IFNAMSIZ"), ("a" * 16, "IFNAMSIZ"), (".", "'.'"), ("..", "'.'"), ("a/b", "'/'"),
    ("a:b", "'/'"), ("a b", "blanks"), ("tap%", "%d"), ("t%d%d", "%d"), ("t%s", "%d"),
])
def test_invalid_interface_names(name, why):
    with pytest.raises(TapError, match=why):
        check_ifname(name)


def test_default_mac_is_stable_unicast_and_local():
    mac = default_mac("vm1", 0)
    assert mac == default_mac("vm1", 0) != default_mac("vm1", 1) != default_mac("vm2", 0)
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert len(bytes.fromhex(mac.replace(":", ""))) == 6


def test_parse_net_defaults_and_fields():
    opts = parse_net("", 0, "vm1")
    assert opts == NetOptions("bhtap0", None, default_mac("vm1", 0), None, None)
    opts = parse_net("tap=guest0,netns=new,mac=52:54:00:00:00:09,mtu=9000,on-crash=fail", 3, "vm1")
    assert opts == NetOptions("guest0", "new", "52:54:00:00:00:09", 9000, "fail")
    spec = opts.device_spec(7, 9000, {"tx": {"ops": {"size": 1, "refill_time_ms": 1}}})
    assert spec == {"type": "net", "tap_fd": 7, "mac": "52:54:00:00:00:09", "mtu": 9000,
                    "rate_limiter": {"tx": {"ops": {"size": 1, "refill_time_ms": 1}}}}


@pytest.mark.parametrize("text,why", [
    ("tap=a/b", "'/'"), ("bridge=br0", "unknown option"), ("tap", "unknown option"),
    ("tap=a,tap=b", "twice"), ("mac=52:54:00:00:00", "six hex"), ("mac=01:00:5e:00:00:01", "multicast"),
    ("mtu=10", "68 to 65535"), ("mtu=big", "68 to 65535"), ("on-crash=retry", "on-crash"),
])
def test_parse_net_errors(text, why):
    with pytest.raises(TapError, match=why):
        parse_net(text, 0, "vm1")


def test_plan_up_and_down():
    plan = NetPlan("vmns", "bhtap0", name="vm7")
    cmds = [" ".join(c) for c in plan.up()]
    assert cmds[0] == "ip link add bh-vm7-h type veth peer name bh-vm7-n"
    assert cmds[1] == "ip link set bh-vm7-n netns /run/netns/vmns"
    assert "nsenter --net=/run/netns/vmns ip addr add 10.0.2.2/24 dev bhtap0" in cmds
    assert "nsenter --net=/run/netns/vmns ip route add default via 10.200.0.1" in cmds
    assert cmds[-1] == "ip route add 10.0.2.0/24 via 10.200.0.2"
    assert [" ".join(c) for c in plan.down()] == ["ip link del bh-vm7-h"]


def test_plan_with_the_host_side_in_a_namespace():
    plan = NetPlan("/proc/1234/fd/5", "t0", host_netns="peer")
    assert all(c[:2] == ["nsenter", "--net=/run/netns/peer"] or c[:2] == ["nsenter", "--net=/proc/1234/fd/5"]
               for c in plan.up())


@pytest.mark.parametrize("kw,why", [
    ({"tap_addr": "10.200.0.5/24"}, "overlaps"),
    ({"link_ns": "10.201.0.2/30"}, "one subnet"),
    ({"tap_addr": "not-an-ip"}, "net setup"),
    ({"name": "a-very-long-vm-name"}, "IFNAMSIZ"),
])
def test_plan_errors(kw, why):
    with pytest.raises(TapError, match=why):
        NetPlan("vmns", "bhtap0", **kw)


def test_netsetup_dry_run(capsys):
    assert main(["--netns", "vmns", "--tap", "bhtap0", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ip link add bh-vm0-h type veth peer name bh-vm0-n" and len(out) == 11
    assert main(["--netns", "vmns", "--tap", "bad/name", "--dry-run"]) == 2
    assert "bad/name" in capsys.readouterr().err
