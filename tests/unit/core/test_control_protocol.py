"""The VM control protocol (sans-I/O) and the VM registry."""

import os

import msgpack
import pytest

from ipc_protocol.errors import LocalProtocolError, RemoteProtocolError
from vmm_core import control_protocol as cp
from vmm_core import registry
from vmm_core.errors import ConfigError


@pytest.mark.parametrize("req", [cp.Ps(), cp.GetStats(), cp.Stop(),
                                 cp.InjectFault("blk0", "slow", 250), cp.InjectFault("rng0", "kill")])
def test_requests_round_trip(req):
    assert cp.decode_request(cp.encode_request(req)) == req


@pytest.mark.parametrize("body", [
    {"type": "Reboot"}, {"type": 3}, {}, ["Ps"],
    {"type": "Ps", "extra": 1},
    {"type": "InjectFault", "device": "blk0", "action": "explode", "ms": 0},
    {"type": "InjectFault", "device": "blk0", "action": "slow", "ms": -1},
    {"type": "InjectFault", "device": "blk0", "action": "slow", "ms": True},
    {"type": "InjectFault", "device": "x" * 33, "action": "kill", "ms": 0},
    {"type": "InjectFault", "action": "kill"},
])
def test_invalid_requests_are_remote_errors(body):
    with pytest.raises(RemoteProtocolError):
        cp.decode_request(msgpack.packb(body))


def test_garbage_and_oversized_requests_are_refused():
    for data in (b"\xc1", b"\x81\xa4type", b"\x92" + b"\xa1x" * 2, msgpack.packb({"type": "Ps", "p": "x" * 5000})):
        with pytest.raises(RemoteProtocolError):
            cp.decode_request(data)
    with pytest.raises(RemoteProtocolError):
        cp.decode_request(msgpack.packb(msgpack.ExtType(1, b"x")))


def test_building_a_bad_request_is_our_bug():
    with pytest.raises(LocalProtocolError):
        cp.encode_request(cp.InjectFault("blk0", "explode"))


def test_replies_round_trip_and_are_checked():
    reply = cp.Reply(True, "", {"devices": [{"name": "blk0", "pid": 4}]})
    assert cp.decode_reply(cp.encode_reply(reply)) == reply
    for body in ({"type": "Reply", "ok": 1, "error": "", "body": {}}, {"type": "Ps"},
                 {"type": "Reply", "ok": True, "error": "", "body": []}):
        with pytest.raises(RemoteProtocolError):
            cp.decode_reply(msgpack.packb(body))


def test_registry_register_lookup_unregister(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rdir = tmp_path / "bulkhead-unit-abc"
    rdir.mkdir()
    entry = registry.register("unit", rdir)
    assert registry.lookup("unit") == entry and registry.running() == [entry]
    assert oct(os.stat(registry.registry_dir()).st_mode & 0o777) == "0o700"
    registry.unregister(entry)
    assert registry.lookup("unit") is None and registry.running() == []


def test_registry_forgets_dead_vms_and_their_runtime_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rdir = tmp_path / "bulkhead-ghost-abc"
    rdir.mkdir()
    entry = registry.register("ghost", rdir)
    # Same pid, other start time: what a reused pid looks like.
    stale = registry.VmEntry("ghost", entry.pid, entry.start_ticks + 1, str(rdir))
    (registry.registry_dir() / "ghost.json").write_text(
        '{"name": "ghost", "pid": %d, "start_ticks": %d, "runtime_dir": "%s"}'
        % (stale.pid, stale.start_ticks, stale.runtime_dir))
    assert registry.lookup("ghost") is None
    assert not rdir.exists() and not (registry.registry_dir() / "ghost.json").exists()


def test_registry_refuses_bad_and_taken_names(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(ConfigError):
        registry.register("../x", tmp_path)
    (registry.registry_dir() / "busy.json").write_text(
        '{"name": "busy", "pid": 1, "start_ticks": %d, "runtime_dir": "/nonexistent"}'
        % registry.process_start_ticks(1))
    with pytest.raises(ConfigError, match="running"):
        registry.register("busy", tmp_path)


def test_root_without_xdg_runtime_dir_uses_run_bulkhead(tmp_path, monkeypatch):
    """Not /tmp/bulkhead-0, which any local user could create first (issue 9.9)."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(registry, "ROOT_RUN_DIR", tmp_path)
    monkeypatch.setattr(registry.os, "getuid", lambda: 0)
    assert registry.registry_base() == tmp_path / "bulkhead"
    monkeypatch.setattr(registry.os, "getuid", lambda: 1234)
    assert registry.registry_base().name == "bulkhead-1234"


@pytest.mark.root
def test_a_registry_directory_planted_by_another_user_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    planted = tmp_path / "bulkhead"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    with pytest.raises(ConfigError, match="not a private directory of this user"):
        registry.registry_dir()
