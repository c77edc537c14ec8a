"""The VM's HTTP API (issue 15): curl over the Unix socket, the OpenAPI document, pause/resume,
bad requests answered with 4xx and JSON, and the CLI verbs using the same endpoint."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time

import jsonschema
import pytest
from openapi_spec_validator import validate

from vmm_core import control_protocol as cp
from vmm_core import registry
from vmm_core.cli_control import wait_for_vm
from vmm_core.testing import ROOT, TEST_GUEST, BackgroundVm, run_bulkhead

OPENAPI = os.path.join(ROOT, "docs", "openapi.json")


def _doc() -> dict:
    with open(OPENAPI) as f:
        return json.load(f)


def test_the_openapi_document_is_valid_and_matches_the_routes():
    doc = _doc()
    validate(doc)
    documented = {(m.upper(), "/api/v1" + p) for p, ops in doc["paths"].items() for m in ops}
    served = {(method, path) for path, (method, _) in cp.ROUTES.items()}
    assert documented == served


def _curl(sock: str, method: str, path: str, body: str | None = None) -> tuple[int, dict]:
    argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket", sock, "-X", method,
            f"http://localhost/api/v1/{path}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", body]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    text, _, code = out.rpartition("\n")
    return int(code), json.loads(text) if text else {}


def _schema(name: str) -> dict:
    doc = _doc()
    return {**doc["components"]["schemas"][name], "components": doc["components"]}


def _check(body: dict, schema: str) -> None:
    s = _schema(schema)
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{schema}", "components": s["components"]})


@pytest.fixture
def vm(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    name = f"api{os.getpid()}"
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--disk", str(disk), "--rng", "--name", name,
                      "--allow-faults", "--cmdline",
                      "gk.tests=blk-workload gk.blk_sectors=64 gk.blk_rounds=100000")
    try:
        entry = wait_for_vm(name)
        yield vm, entry
    finally:
        vm.kill()


pytestmark = pytest.mark.kvm


def _rounds(vm: BackgroundVm) -> int:
    return sum("blk-workload round" in line for line in vm.stdout)


def test_curl_drives_the_vm_through_its_api(vm):
    vm, entry = vm
    sock = entry.api_socket
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    code, info = _curl(sock, "GET", "vm.info")
    assert code == 200 and info["name"] == entry.name and info["state"] == "running"
    _check(info, "VmInfo")
    assert {d["name"] for d in info["devices"]} == {"blk0", "rng0"}
    code, counters = _curl(sock, "GET", "vm.counters")
    assert code == 200
    _check(counters, "VmInfo")

    deadline = time.monotonic() + 60
    while _rounds(vm) < 3:
        assert time.monotonic() < deadline, vm.explain()
        time.sleep(0.05)
    code, body = _curl(sock, "PUT", "vm.pause")
    assert code == 200 and body == {"state": "paused"}
    _check(body, "State")
    time.sleep(0.3)
    frozen = _rounds(vm)
    time.sleep(1.5)
    assert _rounds(vm) == frozen, "the guest ran while paused"
    assert _curl(sock, "GET", "vm.info")[1]["state"] == "paused"
    code, body = _curl(sock, "PUT", "vm.resume")
    assert code == 200 and body == {"state": "running"}
    deadline = time.monotonic() + 30
    while _rounds(vm) <= frozen:
        assert time.monotonic() < deadline, "the guest did not continue after resume"
        time.sleep(0.05)

    code, body = _curl(sock, "PUT", "vm.fault", '{"device": "rng0", "action": "kill"}')
    assert code == 200 and "done" in body
    code, body = _curl(sock, "PUT", "vm.shutdown")
    assert code == 200 and body == {"stopping": entry.name}
    assert vm.wait(30) == 0, vm.explain()
    results, _ = vm.results()
    assert "blk-workload" not in results or results["blk-workload"][0]  # stopped, not failed


@pytest.mark.parametrize("method, path, body, status, needle", [
    ("GET", "vm.reboot", None, 404, "does not reboot"),
    ("GET", "nope", None, 404, "no such endpoint"),
    ("GET", "vm.shutdown", None, 405, "takes PUT"),
    ("PUT", "vm.fault", '{"device": "rng0", "action": "explode"}', 400, "explode"),
    ("PUT", "vm.fault", '{"device": "nope0", "action": "kill"}', 400, "no device nope0"),
    ("PUT", "vm.fault", "not json", 400, "not valid JSON"),
    ("PUT", "vm.fault", "{" + " " * 5000 + "}", 413, "exceeds"),
    ("PUT", "vm.info", None, 405, "takes GET"),
])
def test_bad_requests_get_4xx_and_a_json_error(vm, method, path, body, status, needle):
    _, entry = vm
    code, reply = _curl(entry.api_socket, method, path, body)
    assert code == status and needle in reply["error"], reply
    _check(reply, "Error")


def test_garbage_and_stalled_clients_do_not_wedge_the_endpoint(vm):
    _, entry = vm
    with socket.socket(socket.AF_UNIX) as s:  # raw garbage
        s.connect(entry.api_socket)
        s.sendall(b"\x00\xff" * 1000 + b"\r\n\r\n")
        s.settimeout(10)
        assert s.recv(100).startswith(b"HTTP/1.")
    with socket.socket(socket.AF_UNIX) as s:  # chunked body
        s.connect(entry.api_socket)
        s.sendall(b"PUT /api/v1/vm.fault HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.settimeout(10)
        assert b" 411 " in s.recv(200)
    staller = socket.socket(socket.AF_UNIX)
    staller.connect(entry.api_socket)
    staller.sendall(b"GET /api/v1/vm.info HTTP/1.1\r\n")  # and never more
    start = time.monotonic()
    code, info = _curl(entry.api_socket, "GET", "vm.info")
    assert code == 200 and info["name"] == entry.name
    assert time.monotonic() - start < 8  # waited out the staller's 5 s deadline at most
    staller.close()


def test_cli_verbs_use_the_same_api(vm):
    vm_, entry = vm
    run = run_bulkhead("pause", entry.name, timeout=30)
    assert run.returncode == 0 and "paused" in run.stdout, run.explain()
    run = run_bulkhead("ps", "--json", timeout=30)
    rows = {v["name"]: v for v in json.loads(run.stdout)}
    assert rows[entry.name]["state"] == "paused"
    run = run_bulkhead("resume", entry.name, timeout=30)
    assert run.returncode == 0 and "running" in run.stdout, run.explain()
    run = run_bulkhead("stop", entry.name, timeout=30)
    assert run.returncode == 0, run.explain()
    assert registry.lookup(entry.name) is None
