"""Control messages between the core and a device process: a closed set with a msgpack codec.

Every message is a frozen dataclass whose field annotations carry their own limits
(`Annotated[int, U32]`, `Annotated[str, Text(64)]`, ...), declared once and checked both when we
build a message (a violation is our bug: `LocalProtocolError`) and when we decode bytes from the
peer (a violation is the peer's fault: `RemoteProtocolError`).

Wire format: one msgpack map per message, ``{"type": <tag>, <field>: <value>, ...}``.  The decoder
refuses unknown tags, missing or unknown fields, wrong types (a bool is not an int), values out of
range, msgpack extension types, floats, and payloads larger than `MAX_MESSAGE_BYTES`.

Conversation (see `device_procs.host` for the child's side)::

    child -> core   Hello(version, name, device_type, pid)
    core  -> child  Configure(request_id, spec, memory, ...)      (or ErrorReport + close)
    child -> core   Ready(request_id, device_features)  device built, jail entered, ring served
    core  -> child  Stats / Heartbeat / Reset / Activate / Fault / Shutdown at any time
    child -> core   StatsReply / HeartbeatAck / Ack / ErrorReport

Version rule (`negotiate_version`): the major versions must be equal; the minor version in use is
the smaller of the two, so a newer side only uses what an older peer understands.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError
from .kinds import KINDS, TEST_KIND_NAME
from .virtio_mmio import MAX_QUEUES

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
MAX_MESSAGE_BYTES = 64 * 1024  # a control message is small; anything bigger is hostile


# -- field limits ------------------------------------------------------------------------------

class _Invalid(Exception):
    """A field check failed (converted to Local/RemoteProtocolError by the caller)."""


@dataclass(frozen=True)
class Int:
    low: int
    high: int

    def check(self, value: Any) -> Any:
        if type(value) is not int:  # bool is a subclass of int; refuse it
            raise _Invalid(f"expected an integer, got {type(value).__name__}")
        if not self.low <= value <= self.high:
            raise _Invalid(f"{value} is outside [{self.low}, {self.high}]")
        return value


@dataclass(frozen=True)
class Text:
    max_len: int
    choices: frozenset[str] | None = None

    def check(self, value: Any) -> Any:
        if type(value) is not str:
            raise _Invalid(f"expected a string, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _Invalid(f"string of {len(value)} characters exceeds {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise _Invalid(f"{value!r} is not one of {sorted(self.choices)}")
        return value


@dataclass(frozen=True)
class Flag:
    def check(self, value: Any) -> Any:
        if type(value) is not bool:
            raise _Invalid(f"expected a boolean, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Mapping:
    """A str-keyed map whose values each pass one of `value_checks`."""

    max_items: int
    key: Text
    value_checks: tuple[Any, ...]

    def check(self, value: Any) -> Any:
        if type(value) is not dict:
            raise _Invalid(f"expected a map, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise _Invalid(f"map of {len(value)} entries exceeds {self.max_items}")
        for k, v in value.items():
            self.key.check(k)
            _first_passing(self.value_checks, v, f"value of {k!r}")
        return dict(value)


@dataclass(frozen=True)
class Rows:
    """A list of fixed-length rows of integers (e.g. memory regions, register writes)."""

    max_rows: int
    columns: tuple[Int, ...]

    def check(self, value: Any) -> Any:
        if type(value) not in (list, tuple):
            raise _Invalid(f"expected a list, got {type(value).__name__}")
        if len(value) > self.max_rows:
            raise _Invalid(f"list of {len(value)} rows exceeds {self.max_rows}")
        rows = []
        for i, row in enumerate(value):
            if type(row) not in (list, tuple) or len(row) != len(self.columns):
                raise _Invalid(f"row {i} is not a list of {len(self.columns)} integers")
            rows.append(tuple(col.check(v) for col, v in zip(self.columns, row)))
        return tuple(rows)


def _first_passing(checks: tuple[Any, ...], value: Any, where: str) -> Any:
    reasons = []
    for c in checks:
        try:
            return c.check(value)
        except _Invalid as err:
            reasons.append(str(err))
    raise _Invalid(f"{where}: " + "; ".join(reasons))


U8, U16, U32 = Int(0, 0xFF), Int(0, 0xFFFF), Int(0, 0xFFFF_FFFF)
U64 = Int(0, 0xFFFF_FFFF_FFFF_FFFF)
PID = Int(1, 0x3FFF_FFFF)
NAME = Text(32)
DEVICE_TYPES = Text(16, frozenset({*KINDS, TEST_KIND_NAME}))
SPEC_VALUE = (Flag(), Int(-(1 << 63), (1 << 63) - 1), Text(4096))


# -- the messages ------------------------------------------------------------------------------

class Message:
    """Base of every control message; subclasses are frozen dataclasses registered by tag."""

    TAG: ClassVar[str] = ""

    def __post_init__(self) -> None:
        apply_field_checks(self)


def apply_field_checks(obj: object) -> None:
    """Check (and normalise) every field of frozen dataclass `obj` against its `Annotated`
    limit; a violation is the caller's bug: `LocalProtocolError`.  Also used by the vhost-user
    payloads (`ipc_protocol.vhost_user`)."""
    for name, check in _field_checks(type(obj)).items():
        try:
            object.__setattr__(obj, name, check.check(getattr(obj, name)))
        except _Invalid as err:
            raise LocalProtocolError(f"{type(obj).__name__}.{name}: {err}") from None


_REGISTRY: dict[str, type[Message]] = {}
_CHECKS: dict[type, dict[str, Any]] = {}


def _message(cls: type) -> type:
    """Class decorator: make a frozen dataclass and register it under its tag (closed set)."""
    cls = dataclass(frozen=True)(cls)
    tag = cls.__name__
    if tag in _REGISTRY:
        raise LocalProtocolError(f"duplicate message tag {tag}")
    cls.TAG = tag
    _REGISTRY[tag] = cls
    return cls


def _field_checks(cls: type) -> dict[str, Any]:
    checks = _CHECKS.get(cls)
    if checks is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        checks = {}
        for f in dataclasses.fields(cls):
            metadata = getattr(hints[f.name], "__metadata__", ())
            if not metadata:
                raise LocalProtocolError(f"{cls.__name__}.{f.name} declares no limits")
            checks[f.name] = metadata[0]
        _CHECKS[cls] = checks
    return checks


@_message
class Hello(Message):
    """First message from a child: who it is and which protocol it speaks."""

    version_major: Annotated[int, U16]
    version_minor: Annotated[int, U16]
    name: Annotated[str, NAME]
    device_type: Annotated[str, DEVICE_TYPES]
    pid: Annotated[int, PID]


@_message
class Configure(Message):
    """Core -> child: what to build.  `memory` rows are (guest_phys_addr, size, file_offset)."""

    request_id: Annotated[int, U32]
    spec: Annotated[dict, Mapping(32, Text(32), SPEC_VALUE)]
    memory: Annotated[tuple, Rows(16, (U64, U64, U64))]
    ring_capacity: Annotated[int, Int(1, 1 << 16)]
    spin_us: Annotated[int, Int(0, 1_000_000)]


@_message
class Activate(Message):
    """Core -> child: resume the transport state a predecessor reached (restart after a crash).

    The body is the core's shadow (`virtio_mmio.TransportState.to_wire()`): the child loads it
    (queues resume at the used index found in guest memory) and re-checks every queue.  `queues`
    rows are (index, size, ready, desc, driver, device), one per queue of the device."""

    request_id: Annotated[int, U32]
    status: Annotated[int, U8]
    driver_features: Annotated[int, U64]
    device_features_sel: Annotated[int, U32]
    driver_features_sel: Annotated[int, U32]
    queue_sel: Annotated[int, U32]
    queues: Annotated[tuple, Rows(MAX_QUEUES, (U16, U32, Int(0, 1), U64, U64, U64))]

    def transport_wire(self) -> dict[str, Any]:
        """The `TransportState.to_wire()` form of this message's body."""
        return {f: getattr(self, f) for f in ("status", "driver_features", "device_features_sel",
                                              "driver_features_sel", "queue_sel", "queues")}

    @classmethod
    def from_transport(cls, request_id: int, wire: dict[str, Any]) -> "Activate":
        return cls(request_id, **wire)


@_message
class Reset(Message):
    """Core -> child: reset the device (as if the driver wrote 0 to Status)."""

    request_id: Annotated[int, U32]


@_message
class Ack(Message):
    """Child -> core: the request `request_id` (Configure, Activate, Reset) is done."""

    request_id: Annotated[int, U32]


@_message
class Ready(Message):
    """Child -> core, the answer to Configure: the device is built and jailed, and offers
    `device_features` (the core's transport shadow negotiates against them)."""

    request_id: Annotated[int, U32]
    device_features: Annotated[int, U64]


@_message
class Stats(Message):
    request_id: Annotated[int, U32]


@_message
class StatsReply(Message):
    request_id: Annotated[int, U32]
    counters: Annotated[dict, Mapping(64, Text(48), (Int(0, (1 << 64) - 1),))]


@_message
class Heartbeat(Message):
    seq: Annotated[int, U64]


@_message
class HeartbeatAck(Message):
    seq: Annotated[int, U64]


@_message
class Shutdown(Message):
    """Core -> child: stop serving and exit with status 0."""

    reason: Annotated[str, Text(200)]


LOG_LEVELS = frozenset({"debug", "info", "warning", "error"})


@_message
class Log(Message):
    """Child -> core: a log record.  A jailed device's stdout and stderr are /dev/null: it
    speaks through its channel, and the core logs what it says (escaped, rate-limited)."""

    level: Annotated[str, Text(8, LOG_LEVELS)]
    text: Annotated[str, Text(1000)]


@_message
class ErrorReport(Message):
    """Either direction: something failed.  Errors cross the boundary only as code + text."""

    code: Annotated[str, Text(32)]
    text: Annotated[str, Text(1000)]


# "syscall": the device attempts a call its jail forbids ({"name": ...}, see device_procs.host).
# "flood_acks": send `count` valid HeartbeatAcks at once; "flood_frames": write `mib` MiB of raw
# ZMTP frames all marked "more" on the channel's socket (the attacks of issue 9, findings 7, 3);
# "fill_doorbell": raise the request doorbell eventfd to its maximum (finding 2); "grow_memory":
# allocate and touch memory until stopped; "spin": burn CPU for `ms` (finding 6).
FAULT_KINDS = frozenset({"crash", "hang", "exit", "stall_ms", "garbage_response", "garbage_control",
                         "syscall", "crash_in_request", "flood_acks", "flood_frames",
                         "fill_doorbell", "grow_memory", "spin"})


@_message
class Fault(Message):
    """Core -> child, tests only: misbehave on purpose (see `device_procs.host`)."""

    kind: Annotated[str, Text(32, FAULT_KINDS)]
    args: Annotated[dict, Mapping(8, Text(32), (Int(0, 1 << 32), Text(200)))]


MESSAGE_TYPES: tuple[type[Message], ...] = tuple(_REGISTRY.values())

# Error codes carried by ErrorReport.
E_VERSION = "version-mismatch"
E_PROTOCOL = "protocol-error"
E_CONFIG = "bad-config"
E_DEVICE = "device-error"


# -- codec -------------------------------------------------------------------------------------

def encode(msg: Message) -> bytes:
    if not isinstance(msg, Message) or type(msg).TAG not in _REGISTRY:
        raise LocalProtocolError(f"not a control message: {msg!r}")
    body: dict[str, Any] = {"type": msg.TAG}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        body[f.name] = [list(r) for r in value] if isinstance(value, tuple) else value
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"{msg.TAG} encodes to {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    return data


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"control message uses msgpack extension type {code}")


def decode(data: bytes) -> Message:
    """Parse and validate one message from the peer; anything off is `RemoteProtocolError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError("decode expects bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True,
                               ext_hook=_refuse_ext)
    except RemoteProtocolError:
        raise
    except Exception as err:  # msgpack raises several types for truncated/invalid input
        raise RemoteProtocolError(f"control message is not valid msgpack: {err}") from None
    if type(body) is not dict:
        raise RemoteProtocolError("control message is not a map")
    tag = body.pop("type", None)
    cls = _REGISTRY.get(tag) if type(tag) is str else None
    if cls is None:
        raise RemoteProtocolError(f"unknown control message type {tag!r}")
    checks = _field_checks(cls)
    unknown = set(body) - set(checks)
    missing = set(checks) - set(body)
    if unknown or missing:
        raise RemoteProtocolError(
            f"{tag}: unknown fields {sorted(map(str, unknown))}, missing {sorted(missing)}")
    values = {}
    for name, check in checks.items():
        try:
            values[name] = check.check(body[name])
        except _Invalid as err:
            raise RemoteProtocolError(f"{tag}.{name}: {err}") from None
    return cls(**values)


def negotiate_version(remote_major: int, remote_minor: int,
                      local: tuple[int, int] = (PROTOCOL_MAJOR, PROTOCOL_MINOR)) -> tuple[int, int]:
    """The (major, minor) both sides will speak, or `RemoteProtocolError` if none."""
    if remote_major != local[0]:
        raise RemoteProtocolError(
            f"peer speaks protocol {remote_major}.{remote_minor}, we speak {local[0]}.{local[1]}: "
            "rebuild both from the same Bulkhead version")
    return local[0], min(local[1], remote_minor)


def check_hello(msg: Message, expected_name: str | None = None,
                expected_pid: int | None = None) -> Hello:
    """Validate a child's first message: type, version, and (if known) its name and pid."""
    if not isinstance(msg, Hello):
        raise RemoteProtocolError(f"expected Hello as first message, got {type(msg).__name__}")
    negotiate_version(msg.version_major, msg.version_minor)
    if expected_name is not None and msg.name != expected_name:
        raise RemoteProtocolError(f"child says it is {msg.name!r}, expected {expected_name!r}")
    if expected_pid is not None and msg.pid != expected_pid:
        raise RemoteProtocolError(f"child says its pid is {msg.pid}, expected {expected_pid}")
    return msg
