"""jail_configs/net.toml: what the virtio-net device process may do once jailed (pure)."""

from __future__ import annotations

from jail.policy import CONFIG_DIR, constants, load_policy
from device_procs.virtio import net


def test_net_layers_common_and_adds_only_tap_io():
    common = load_policy(CONFIG_DIR / "common_device.toml")
    policy = load_policy("net")
    assert [f.name for f in policy.files] == ["common_device.toml", "net.toml"]
    assert set(policy.rules) - set(common.rules) == {"readv", "writev", "ioctl"}
    for name in ("socket", "connect", "bind", "sendmsg", "openat", "execve", "setns", "clone",
                 "preadv", "pwritev", "fcntl"):
        assert not policy.allows(name), name


def test_the_only_ioctl_is_tunsetoffload_with_tun_f_bits():
    c = constants()
    assert c["TUNSETOFFLOAD"] == net.TUNSETOFFLOAD == 0x400454D0
    (alt,) = load_policy("net").rules["ioctl"].when
    by_arg = {cmp.arg: cmp for cmp in alt}
    assert (by_arg[1].op, by_arg[1].value) == ("eq", c["TUNSETOFFLOAD"])
    allowed = c["TUN_F_CSUM"] | c["TUN_F_TSO4"] | c["TUN_F_TSO6"] | c["TUN_F_TSO_ECN"] | c["TUN_F_UFO"]
    assert (by_arg[2].op, by_arg[2].value) == ("masked_eq", 0)
    assert by_arg[2].mask == 0xFFFFFFFF & ~allowed
