"""The VM control protocol: its HTTP API (`bulkhead ps|stats|stop|fault`, `curl`) -- sans-I/O.

Each VM serves JSON over HTTP/1.1 on `<runtime dir>/api.sock` (0600, in its 0700 directory),
shaped like cloud-hypervisor's API (`docs/openapi.yaml` documents it):

    GET /api/v1/vm.info       Ps          name, core pid, state, devices
    GET /api/v1/vm.counters   GetStats    per-device counters
    PUT /api/v1/vm.shutdown   Stop        power off (the core exits 0)
    PUT /api/v1/vm.pause      Pause       vCPUs stopped (devices keep their state)
    PUT /api/v1/vm.resume     Resume
    PUT /api/v1/vm.power-button PowerButton  the guest is asked to shut down (ACPI GED)
    PUT /api/v1/vm.fault      InjectFault {"device": ..., "action": ..., "ms": ...}

A closed set of requests, each a frozen dataclass whose fields carry their limits, checked when we
build one (our bug: `LocalProtocolError`) and when we decode one (the peer's fault:
`RemoteProtocolError`, with the HTTP status to answer).  Every request gets one `Reply`: 2xx
with the body as JSON, or 4xx/5xx with ``{"error": "<one line>"}``.  The CLI is a client of the
same API (one control plane).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar


from ipc_protocol.errors import LocalProtocolError, RemoteProtocolError

MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 1 << 20

# What `bulkhead fault VM DEVICE ACTION` may ask for (see `vmm_core.devices.supervisor`).
FAULT_ACTIONS = ("kill", "hang", "slow", "bad-reply", "crash-in-request", "seccomp",
                 "flood-acks", "flood-frames", "fill-doorbell", "grow-memory", "spin")


def _check_name(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= 32:
        raise ValueError(f"{what} must be a string of 1-32 characters")
    return value


class Request:
    """Base of the closed request set; subclasses register by class name."""

    TAG: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ValueError if a field is out of its limits."""


_REQUESTS: dict[str, type[Request]] = {}


def _request(cls: type) -> type:
    cls = dataclass(frozen=True)(cls)
    cls.TAG = cls.__name__
    _REQUESTS[cls.TAG] = cls
    return cls


@_request
class Ps(Request):
    """The VM's name, core pid and devices (name, type, pid, state, restarts, policy)."""


@_request
class GetStats(Request):
    """Per-device counters, restarts, recovery times and ring round-trip percentiles."""


@_request
class Stop(Request):
    """Stop the VM as a power-off would (the core exits 0)."""


@_request
class InjectFault(Request):
    """Make a device misbehave (refused unless the VM runs with --allow-faults)."""

    device: str
    action: str
    ms: int = 0

    def validate(self) -> None:
        _check_name(self.device, "device")
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"action {self.action!r} is not one of {', '.join(FAULT_ACTIONS)}")
        if type(self.ms) is not int or not 0 <= self.ms <= 600_000:
            raise ValueError("ms must be a whole number of milliseconds in [0, 600000]")


@_request
class Pause(Request):
    """Stop every vCPU (the devices keep running and keep their state)."""


@_request
class PowerButton(Request):
    """Press the ACPI power button: a guest OS that handles it shuts down and powers off."""


@_request
class Resume(Request):
    """Run the vCPUs of a paused VM again."""


@dataclass(frozen=True)
class Reply:
    ok: bool
    error: str = ""
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: int = 400  # the HTTP status of a refusal


class HttpError(RemoteProtocolError):
    """A request the API refuses: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


API_PREFIX = "/api/v1/"
ROUTES: dict[str, tuple[str, type[Request]]] = {}   # path -> (method, request class)
_PATHS: dict[type[Request], str] = {}


def _route(method: str, name: str, cls: type[Request]) -> None:
    ROUTES[API_PREFIX + name] = (method, cls)
    _PATHS[cls] = API_PREFIX + name


_route("GET", "vm.info", Ps)
_route("GET", "vm.counters", GetStats)
_route("PUT", "vm.shutdown", Stop)
_route("PUT", "vm.pause", Pause)
_route("PUT", "vm.resume", Resume)
_route("PUT", "vm.power-button", PowerButton)
_route("PUT", "vm.fault", InjectFault)
UNSUPPORTED = {API_PREFIX + "vm.reboot": "Bulkhead does not reboot a VM in place: shut it down "
                                         "and start it again",
               API_PREFIX + "vm.boot": "a Bulkhead VM boots when it starts: use `bulkhead run|up`"}


def to_http(req: Request) -> tuple[str, str, bytes]:
    """(method, path, JSON body) of a request we send."""
    if type(req) not in _PATHS:
        raise LocalProtocolError(f"not a control request: {req!r}")
    try:
        req.validate()
    except ValueError as err:
        raise LocalProtocolError(f"{req.TAG}: {err}") from None
    method = ROUTES[_PATHS[type(req)]][0]
    fields = dataclasses.asdict(req)
    return method, _PATHS[type(req)], json.dumps(fields).encode() if fields else b""


def from_http(method: str, path: str, body: bytes) -> Request:
    """The request a client sent; `HttpError` (404, 405, 400, 413) for anything else."""
    route = ROUTES.get(path)
    if route is None:
        if path in UNSUPPORTED:
            raise HttpError(404, UNSUPPORTED[path])
        raise HttpError(404, f"no such endpoint {path[:100]!r} (endpoints: {', '.join(sorted(ROUTES))})")
    want, cls = route
    if method != want:
        raise HttpError(405, f"{path} takes {want}, not {method[:10]}")
    if len(body) > MAX_REQUEST_BYTES:
        raise HttpError(413, f"request body of {len(body)} bytes exceeds {MAX_REQUEST_BYTES}")
    fields: Any = {}
    if body.strip():
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise HttpError(400, f"the body is not valid JSON: {err}") from None
    if type(fields) is not dict:
        raise HttpError(400, "the body must be a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    if set(fields) - known:
        raise HttpError(400, f"{path}: unknown fields {sorted(set(fields) - known)[:10]} "
                             f"(known: {', '.join(sorted(known)) or 'none'})")
    try:
        req = cls(**fields)
        req.validate()
    except (TypeError, ValueError) as err:
        raise HttpError(400, f"{path}: {err}") from None
    return req


def reply_to_http(reply: Reply) -> tuple[int, bytes]:
    body = reply.body if reply.ok else {"error": reply.error[:1000]}
    data = json.dumps(body).encode()
    if len(data) > MAX_REPLY_BYTES:
        raise LocalProtocolError(f"reply of {len(data)} bytes exceeds {MAX_REPLY_BYTES}")
    return (200 if reply.ok else reply.status), data


def reply_from_http(status: int, data: bytes) -> Reply:
    if len(data) > MAX_REPLY_BYTES:
        raise RemoteProtocolError(f"reply of {len(data)} bytes exceeds {MAX_REPLY_BYTES}")
    try:
        body = json.loads(data) if data.strip() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise RemoteProtocolError(f"the reply is not valid JSON: {err}") from None
    if type(body) is not dict:
        raise RemoteProtocolError("the reply is not a JSON object")
    if 200 <= status < 300:
        return Reply(True, "", body)
    error = body.get("error")
    return Reply(False, error if type(error) is str else f"HTTP status {status}", {}, status)
