"""The VM control protocol (sans-I/O) and the VM registry."""

import os

import json
import pytest

from ipc_protocol.errors import LocalProtocolError, RemoteProtocolError
from vmm_core import control_protocol as cp
from vmm_core import registry
from vmm_core.errors import ConfigError


@pytest.mark.parametrize("req", [cp.Ps(), cp.GetStats(), cp.Stop(), cp.Pause(), cp.Resume(),
                                 cp.InjectFault("blk0", "slow", 250), cp.InjectFault("rng0", "kill")])
def test_requests_round_trip_through_http(req):
    method, path, body = cp.to_http(req)
    assert path.startswith("/api/v1/vm.")
    assert cp.from_http(method, path, body) == req


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/api/v1/vm.reboot", b"", 404),
    ("GET", "/api/v1/nope", b"", 404),
    ("PUT", "/api/v1/vm.info", b"", 405),
    ("GET", "/api/v1/vm.shutdown", b"", 405),
    ("PUT", "/api/v1/vm.shutdown", b'{"extra": 1}', 400),
    ("PUT", "/api/v1/vm.fault", b'{"device": "blk0", "action": "explode", "ms": 0}', 400),
    ("PUT", "/api/v1/vm.fault", b'{"device": "blk0", "action": "slow", "ms": -1}', 400),
    ("PUT", "/api/v1/vm.fault", b'{"device": "blk0", "action": "slow", "ms": true}', 400),
    ("PUT", "/api/v1/vm.fault", b'{"device": "' + b"x" * 33 + b'", "action": "kill"}', 400),
    ("PUT", "/api/v1/vm.fault", b'{"action": "kill"}', 400),
    ("PUT", "/api/v1/vm.fault", b"\xc1 not json", 400),
    ("PUT", "/api/v1/vm.fault", b"[1, 2]", 400),
    ("PUT", "/api/v1/vm.fault", b"{" + b" " * 5000 + b"}", 413),
])
def test_invalid_requests_get_their_status(method, path, body, status):
    with pytest.raises(cp.HttpError) as err:
        cp.from_http(method, path, body)
    assert err.value.status == status and isinstance(err.value, RemoteProtocolError)
    code, data = cp.reply_to_http(cp.Reply(False, str(err.value), status=err.value.status))
    assert code == status and set(json.loads(data)) == {"error"}


def test_building_a_bad_request_is_our_bug():
    with pytest.raises(LocalProtocolError):
        cp.to_http(cp.InjectFault("blk0", "explode"))


def test_replies_round_trip_and_are_checked():
    reply = cp.Reply(True, "", {"devices": [{"name": "blk0", "pid": 4}]})
    assert cp.reply_from_http(*cp.reply_to_http(reply)) == reply
    refused = cp.reply_from_http(404, b'{"error": "no such VM"}')
    assert not refused.ok and refused.error == "no such VM" and refused.status == 404
    assert cp.reply_from_http(500, b"{}").error == "HTTP status 500"
    for data in (b"[]", b"\xc1", b"x" * (cp.MAX_REPLY_BYTES + 1)):
        with pytest.raises(RemoteProtocolError):
            cp.reply_from_http(200, data)


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
