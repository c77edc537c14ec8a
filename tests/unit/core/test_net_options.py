"""The net kind's `--net` flag, interface names, default MACs and the veth plan (pure)."""

from __future__ import annotations

import pytest

from ipc_protocol import kinds
from ipc_protocol.kinds import NET
from vmm_core.devices.spec import parse_device_arg
from vmm_core.devices.tap import TapError, check_ifname, default_mac
from vmm_core.errors import ConfigError
from vmm_core.netsetup import NetPlan, main


@pytest.fixture
def net_kind(monkeypatch):
    """NET registered as the lead's wiring will (KINDS["net"])."""
    monkeypatch.setitem(kinds.KINDS, "net", NET)
    return NET


def test_net_flag_through_the_generic_parser(net_kind):
    spec = parse_device_arg(net_kind, "tap=guest0,netns=new,mac=52:54:00:00:00:09,mtu=9000,"
                                      "tx_bandwidth=1048576/100,rx_ops=1000/1000/100", 0)
    assert spec.name == "net0" and spec.params["tap"] == "guest0" and spec.params["mtu"] == 9000
    # The device process never sees the tap's name (it gets the fd as role "tap").
    assert "tap" not in spec.device_spec()
    assert spec.device_spec()["tx_bandwidth"] == "1048576/100"
    assert parse_device_arg(net_kind, "bhtap7", 1).params["tap"] == "bhtap7"  # the shorthand
    assert parse_device_arg(net_kind, "", 2).params["tap"] == "bhtap%d"       # the default


def test_rate_keys_have_the_short_bw_spelling(net_kind):
    """`bw=` (blk), `tx_bw=`/`rx-bw=` (net) name the bandwidth buckets; both spellings of one
    key at once are refused rather than one silently winning."""
    from ipc_protocol.kinds import BLK

    blk = parse_device_arg(BLK, "disk.img,bw=1048576/100,ops=1000/1000", 0)
    assert blk.device_spec()["bandwidth"] == "1048576/100" and blk.params["ops"] == "1000/1000"
    net = parse_device_arg(net_kind, "tap=t0,tx_bw=65536/10,rx-bw=4096/10/8192", 0)
    assert (net.params["tx_bandwidth"], net.params["rx_bandwidth"]) == ("65536/10", "4096/10/8192")
    with pytest.raises(ConfigError, match="bandwidth is given twice"):
        parse_device_arg(BLK, "disk.img,bw=1/1,bandwidth=2/2", 0)
    with pytest.raises(ConfigError, match="SIZE/REFILL_MS"):
        parse_device_arg(BLK, "disk.img,bw=fast", 0)


def test_net_flag_errors_name_the_key(net_kind):
    with pytest.raises(ConfigError, match="bridge"):
        parse_device_arg(net_kind, "tap=x,bridge=br0", 0)
    with pytest.raises(ConfigError, match="mtu"):
        parse_device_arg(net_kind, "mtu=big", 0)


def test_net_kind_declaration():
    assert (NET.virtio_id, NET.queue_count, NET.policy_name) == (1, 3, "net")
    assert [r.role for r in NET.resources] == ["tap"]
    from device_procs.virtio.net import CONTROL_QUEUE_SIZE, QUEUE_SIZE, NetDevice
    assert list(NET.queue_max_sizes) == NetDevice.queue_max_sizes == [QUEUE_SIZE, QUEUE_SIZE,
                                                                      CONTROL_QUEUE_SIZE]


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
    from device_procs.virtio.net import parse_mac
    assert len(parse_mac(mac)) == 6  # and the device takes it


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
    assert all(c[:2] in (["nsenter", "--net=/run/netns/peer"], ["nsenter", "--net=/proc/1234/fd/5"])
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


def test_bulkhead_net_setup_and_down_verbs_print_the_plan(capsys):
    from vmm_core.cli import main as cli_main
    plan = NetPlan("vmns", "bhtap0", "t1", "10.0.2.2/24", "10.200.0.1/30", "10.200.0.2/30")
    assert cli_main(["net", "setup", "--netns", "vmns", "--tap", "bhtap0", "--name", "t1",
                     "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [" ".join(c) for c in plan.up()]
    assert cli_main(["net", "down", "--netns", "vmns", "--tap", "bhtap0", "--name", "t1",
                     "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ip link del bh-t1-h"]
    assert cli_main(["net", "setup", "--netns", "vmns", "--tap", "a b", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'a b'" in err[0]
