"""The VM control protocol (`bulkhead ps|stats|stop|fault` <-> a running VM): sans-I/O.

A closed set of requests, each a frozen dataclass whose fields carry their limits, checked when we
build one (our bug: `LocalProtocolError`) and when we decode one (the peer's fault:
`RemoteProtocolError`) -- the same style as `ipc_protocol.messages`, but a separate set: the
device protocol is between the core and untrusted children, this one is between the core and
local tools of the same user, and neither should accept the other's messages.

Wire format: one msgpack map, ``{"type": <tag>, <field>: <value>, ...}``.  Every request gets one
`Reply`: ``{"type": "Reply", "ok": bool, "error": str, "body": map}``; the body is plain data
(ps rows, stats) bounded by `MAX_REPLY_BYTES`, read defensively by the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

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


@dataclass(frozen=True)
class Reply:
    ok: bool
    error: str = ""
    body: dict[str, Any] = dataclasses.field(default_factory=dict)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def _unpack(data: bytes, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise RemoteProtocolError(f"message of {len(data)} bytes exceeds {limit}")
    try:
        body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except RemoteProtocolError:
        raise
    except Exception as err:  # msgpack raises several types for invalid input
        raise RemoteProtocolError(f"not valid msgpack: {err}") from None
    if type(body) is not dict:
        raise RemoteProtocolError("message is not a map")
    return body


def encode_request(req: Request) -> bytes:
    if type(req).TAG not in _REQUESTS:
        raise LocalProtocolError(f"not a control request: {req!r}")
    try:
        req.validate()
    except ValueError as err:
        raise LocalProtocolError(f"{req.TAG}: {err}") from None
    return msgpack.packb({"type": req.TAG, **dataclasses.asdict(req)}, use_bin_type=True)


def decode_request(data: bytes) -> Request:
    body = _unpack(data, MAX_REQUEST_BYTES)
    tag = body.pop("type", None)
    cls = _REQUESTS.get(tag) if type(tag) is str else None
    if cls is None:
        raise RemoteProtocolError(f"unknown request {tag!r} (known: {', '.join(sorted(_REQUESTS))})")
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(body) - fields:
        raise RemoteProtocolError(f"{tag}: unknown fields {sorted(set(body) - fields)}")
    try:
        req = cls(**body)
        req.validate()
    except (TypeError, ValueError) as err:
        raise RemoteProtocolError(f"{tag}: {err}") from None
    return req


def encode_reply(reply: Reply) -> bytes:
    data = msgpack.packb({"type": "Reply", "ok": reply.ok, "error": reply.error[:1000],
                          "body": reply.body}, use_bin_type=True)
    if len(data) > MAX_REPLY_BYTES:
        raise LocalProtocolError(f"reply of {len(data)} bytes exceeds {MAX_REPLY_BYTES}")
    return data


def decode_reply(data: bytes) -> Reply:
    body = _unpack(data, MAX_REPLY_BYTES)
    if body.get("type") != "Reply" or set(body) != {"type", "ok", "error", "body"}:
        raise RemoteProtocolError("not a Reply")
    if type(body["ok"]) is not bool or type(body["error"]) is not str or type(body["body"]) is not dict:
        raise RemoteProtocolError("Reply fields have the wrong types")
    return Reply(body["ok"], body["error"], body["body"])
