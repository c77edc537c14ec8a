"""The vhost-user protocol (QEMU `docs/interop/vhost-user.rst`), sans-I/O: messages and their codec.

One codec for both ends of a connection: a backend decodes requests and encodes replies and
backend-channel requests; a frontend (the test double, later the core) does the opposite.  No
sockets here: `ipc_protocol.transport.vhost_user_socket` reads exactly one message's bytes and
fds and hands them to `decode_request` / `decode_reply`.

Wire format ("Message Specification"; all numbers in the machine's byte order)::

    request u32 | flags u32 | size u32 | payload[size]        + SCM_RIGHTS fds on the same sendmsg
    flags: bits 0-1 version (1), bit 2 REPLY, bit 3 NEED_REPLY (REPLY_ACK), every other bit 0

Every payload is a frozen dataclass whose fields carry their limits (`Annotated[int, U32]`),
checked when we build one (a violation is our bug: `LocalProtocolError`) and when we decode the
peer's bytes (the peer's fault: `RemoteProtocolError`).  The frontend is untrusted like a guest:
the decoder refuses payloads larger than `MAX_PAYLOAD_BYTES`, payload sizes that do not match the
request, unknown flag bits, and any fd count other than the one the request carries
(`expected_fds`): one per region for SET_MEM_TABLE, one for SET_VRING_KICK/CALL/ERR unless bit 8
(NOFD) of the u64 is set, one for SET_INFLIGHT_FD, SET_SLAVE_REQ_FD, SET_LOG_BASE and SET_LOG_FD,
none for everything else.  A request this codec does not model (unknown code, or known but not
implemented here: IOTLB, postcopy, crypto, ...) decodes as `Raw` with no fds, so the receiver can
refuse it (see `wants_reply`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Annotated, ClassVar

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import U8, U16, U32, U64, Flag, Int, _field_checks, _Invalid, apply_field_checks

# -- header ---------------------------------------------------------------------------------------

VHOST_USER_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
_KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12

# "Memory regions description": QEMU's VHOST_MEMORY_BASELINE_NREGIONS.
MAX_MEMORY_REGIONS = 8
# QEMU's VHOST_USER_MAX_CONFIG_SIZE: no virtio config space is larger.
MAX_CONFIG_SIZE = 256
# Above every payload modelled here (the largest, a 256-byte config space with its 12-byte header,
# is 268 bytes) and above the unmodelled ones a frontend might still send before being refused; a
# frontend cannot make us buffer more than this per message.
MAX_PAYLOAD_BYTES = 1024
# No message carries more fds than a full memory table; the transport's ancillary buffer is sized
# for a few more so that an excess is seen (and refused) rather than silently truncated.
MAX_FDS = MAX_MEMORY_REGIONS

# Virtio feature bit 30 (UNUSED in VIRTIO 1.1 §6.3) announces GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
# SET_VRING_KICK/CALL/ERR u64: bits 0-7 the ring index, bit 8 "no fd: poll instead".
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8
# vring address flags: VHOST_VRING_F_LOG (log used-ring writes for migration).
VHOST_VRING_F_LOG = 1 << 0


class Request(enum.IntEnum):
    """Front-end message types ("Front-end message types").  Wire values: never renumber."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end message types, sent on the SET_SLAVE_REQ_FD channel ("Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntFlag):
    """GET/SET_PROTOCOL_FEATURES bits ("Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    SLAVE_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    SLAVE_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class Channel(enum.Enum):
    """Which socket a message travels on, hence which request table applies."""

    FRONTEND = "frontend"  # the connection: front-end requests, back-end replies
    BACKEND = "backend"    # the SET_SLAVE_REQ_FD socket: back-end requests, front-end replies


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """The 12-byte header, validated before the transport reads `size` more bytes."""
    if len(data) != HEADER_SIZE:
        raise LocalProtocolError(f"a vhost-user header is {HEADER_SIZE} bytes, not {len(data)}")
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VHOST_USER_VERSION:
        raise RemoteProtocolError(f"vhost-user message version {flags & FLAG_VERSION_MASK}, "
                                  f"only version {VHOST_USER_VERSION} exists")
    if flags & ~_KNOWN_FLAGS:
        raise RemoteProtocolError(f"vhost-user message flags {flags:#x} set undefined bits")
    if flags & FLAG_REPLY and flags & FLAG_NEED_REPLY:
        raise RemoteProtocolError("a vhost-user reply cannot itself ask for a reply")
    if size > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(f"vhost-user payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return Header(request, flags, size)


# -- payloads -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bytes:
    """A field limit: bytes (or bytearray, stored as bytes) of at most `max_len`."""

    max_len: int

    def check(self, value: object) -> bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise _Invalid(f"expected bytes, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _Invalid(f"{len(value)} bytes exceed {self.max_len}")
        return bytes(value)


class Payload:
    """Base of the payload types; subclasses are frozen dataclasses with `Annotated` limits."""

    def __post_init__(self) -> None:
        apply_field_checks(self)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks (raise LocalProtocolError)."""

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes) -> "Payload":
        raise NotImplementedError


def _from_peer(cls: type, *args: object) -> object:
    """Build a payload from decoded fields: a limit violation is the peer's fault."""
    try:
        return cls(*args)
    except LocalProtocolError as err:
        raise RemoteProtocolError(str(err)) from None


def _exact(cls: type, data: bytes, size: int) -> None:
    if len(data) != size:
        raise RemoteProtocolError(f"{cls.__name__} payload is {size} bytes, got {len(data)}")


class _Struct(Payload):
    """A payload that is one fixed struct: FORMAT's fields in declaration order."""

    FORMAT: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return self.FORMAT.pack(*(getattr(self, n) for n in _field_checks(type(self))))

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        _exact(cls, data, cls.FORMAT.size)
        return _from_peer(cls, *cls.FORMAT.unpack(data))  # type: ignore[return-value]


@dataclass(frozen=True)
class Empty(Payload):
    """No payload (also a failed GET_CONFIG reply: "zero length of payload to indicate an error")."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        _exact(cls, data, 0)
        return cls()


@dataclass(frozen=True)
class U64Value(_Struct):
    """"A single 64-bit integer": features, protocol features, queue count, REPLY_ACK status."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=Q")
    value: Annotated[int, U64]


@dataclass(frozen=True)
class VringState(_Struct):
    """"A vring state description": SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE, VRING_CALL."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")
    index: Annotated[int, U32]
    num: Annotated[int, U32]


@dataclass(frozen=True)
class VringAddr(_Struct):
    """"A vring address description" (struct vhost_vring_addr: the table's `size` column is not
    on the wire).  Ring addresses are frontend *user* addresses (QEMU: its virtual addresses;
    UML: guest-physical), translated through the memory table's user_addr column."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    index: Annotated[int, U32]
    flags: Annotated[int, U32]
    desc: Annotated[int, U64]
    used: Annotated[int, U64]
    avail: Annotated[int, U64]
    log: Annotated[int, U64]


@dataclass(frozen=True)
class VringFd(Payload):
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index (bits 0-7) and NOFD (bit 8)."""

    index: Annotated[int, U8]
    nofd: Annotated[bool, Flag()]

    def encode(self) -> bytes:
        return struct.pack("=Q", self.index | (VRING_NOFD if self.nofd else 0))

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        _exact(cls, data, 8)
        (value,) = struct.unpack("=Q", data)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise RemoteProtocolError(f"vring fd u64 {value:#x} sets bits other than index and NOFD")
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD))


_REGION = struct.Struct("=QQQQ")
_END = 1 << 64


@dataclass(frozen=True)
class MemoryRegion(_Struct):
    """One row of the memory table: guest address, size, frontend user address, mmap offset."""

    FORMAT: ClassVar[struct.Struct] = _REGION
    guest_phys_addr: Annotated[int, U64]
    size: Annotated[int, U64]
    user_addr: Annotated[int, U64]
    mmap_offset: Annotated[int, U64]

    def validate(self) -> None:
        if self.size == 0:
            raise LocalProtocolError(f"memory region at {self.guest_phys_addr:#x} has size 0")
        for name, start in (("guest", self.guest_phys_addr), ("user", self.user_addr),
                            ("mmap offset", self.mmap_offset)):
            if start + self.size > _END:
                raise LocalProtocolError(f"memory region {name} range {start:#x}+{self.size:#x} "
                                         "wraps past 2**64")

    def translate_user(self, addr: int, length: int) -> int | None:
        """The guest address of user range [addr, addr+length) if it lies in this region."""
        if self.user_addr <= addr and addr + length <= self.user_addr + self.size:
            return addr - self.user_addr + self.guest_phys_addr
        return None


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@dataclass(frozen=True)
class MemoryTable(Payload):
    """"Memory regions description": u32 count, u32 padding, up to 8 regions; one fd each.

    UML sends its whole two-slot array with a count of 1, so a payload may carry unused slots
    after the `count` rows (their content is ignored); the regions themselves must not overlap
    in guest or in user address space."""

    regions: tuple  # of MemoryRegion, checked in validate

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))
        self.validate()

    def validate(self) -> None:
        if len(self.regions) > MAX_MEMORY_REGIONS:
            raise LocalProtocolError(f"memory table of {len(self.regions)} regions exceeds "
                                     f"{MAX_MEMORY_REGIONS}")
        if not all(isinstance(r, MemoryRegion) for r in self.regions):
            raise LocalProtocolError("memory table rows must be MemoryRegion values")
        for i, a in enumerate(self.regions):
            for b in self.regions[i + 1:]:
                for name, ka, kb in (("guest", a.guest_phys_addr, b.guest_phys_addr),
                                     ("user", a.user_addr, b.user_addr)):
                    if _overlap((ka, a.size), (kb, b.size)):
                        raise LocalProtocolError(
                            f"memory regions {ka:#x}+{a.size:#x} and {kb:#x}+{b.size:#x} "
                            f"overlap in {name} address space")

    def encode(self) -> bytes:
        return struct.pack("=II", len(self.regions), 0) + b"".join(r.encode() for r in self.regions)

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        if len(data) < 8 or (len(data) - 8) % _REGION.size:
            raise RemoteProtocolError(f"memory table payload of {len(data)} bytes is not 8 + 32*n")
        count, _padding = struct.unpack_from("=II", data)
        slots = (len(data) - 8) // _REGION.size
        if count > MAX_MEMORY_REGIONS or slots > MAX_MEMORY_REGIONS:
            raise RemoteProtocolError(f"memory table has {count} regions in {slots} slots, "
                                      f"more than {MAX_MEMORY_REGIONS}")
        if count > slots:
            raise RemoteProtocolError(f"memory table announces {count} regions but carries {slots}")
        rows = tuple(MemoryRegion.decode(data[8 + i * _REGION.size: 8 + (i + 1) * _REGION.size])
                     for i in range(count))
        return _from_peer(cls, rows)  # type: ignore[return-value]


_CONFIG_HEADER = struct.Struct("=III")


@dataclass(frozen=True)
class Config(Payload):
    """"Virtio device config space": offset, size, flags, then `size` bytes (≤ 256).

    flags 0: a driver write of writable fields; 1: live migration (not supported here)."""

    offset: Annotated[int, U32]
    size: Annotated[int, Int(0, MAX_CONFIG_SIZE)]
    flags: Annotated[int, U32]
    data: Annotated[bytes, Bytes(MAX_CONFIG_SIZE)] = b""

    FLAG_WRITABLE: ClassVar[int] = 0
    FLAG_MIGRATION: ClassVar[int] = 1

    def validate(self) -> None:
        if len(self.data) != self.size:
            raise LocalProtocolError(f"config payload of {len(self.data)} bytes, size says {self.size}")
        if self.offset + self.size > 1 << 32:
            raise LocalProtocolError(f"config range {self.offset}+{self.size} wraps past 2**32")

    def encode(self) -> bytes:
        return _CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        if len(data) < _CONFIG_HEADER.size:
            raise RemoteProtocolError(f"config payload of {len(data)} bytes is shorter than its header")
        offset, size, flags = _CONFIG_HEADER.unpack_from(data)
        body = data[_CONFIG_HEADER.size:]
        if len(body) != size:
            raise RemoteProtocolError(f"config payload carries {len(body)} bytes, its size field {size}")
        return _from_peer(cls, offset, size, flags, body)  # type: ignore[return-value]


@dataclass(frozen=True)
class Inflight(Payload):
    """"Inflight description": mmap size, mmap offset (u64), queue count, queue size (u16).

    QEMU's struct is 24 bytes (natural padding after the two u16) and it drops the connection on
    20; packed 20-byte peers exist too (rust-vmm), so 20 and 24 are accepted and 24 is sent."""

    mmap_size: Annotated[int, U64]
    mmap_offset: Annotated[int, U64]
    num_queues: Annotated[int, U16]
    queue_size: Annotated[int, U16]

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    PACKED: ClassVar[struct.Struct] = struct.Struct("=QQHH")

    def encode(self) -> bytes:
        return self.FORMAT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        if len(data) not in (cls.FORMAT.size, cls.PACKED.size):
            raise RemoteProtocolError(f"inflight payload is 24 (or packed 20) bytes, got {len(data)}")
        return _from_peer(cls, *cls.PACKED.unpack_from(data))  # type: ignore[return-value]


@dataclass(frozen=True)
class Log(_Struct):
    """"Log description" of SET_LOG_BASE (dirty logging, refused by our backend)."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    mmap_size: Annotated[int, U64]
    mmap_offset: Annotated[int, U64]


@dataclass(frozen=True)
class Raw(Payload):
    """The bytes of a request this codec does not model; carried only so it can be refused."""

    data: Annotated[bytes, Bytes(MAX_PAYLOAD_BYTES)] = b""

    def encode(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        return cls(data)


# -- what each request carries -------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    request: type[Payload]
    reply: type[Payload] | None  # None: no reply of its own (REPLY_ACK's u64 when asked)
    fds: str = "none"            # none | one | per_region | unless_nofd


_FRONTEND: dict[int, _Spec] = {
    Request.GET_FEATURES: _Spec(Empty, U64Value),
    Request.SET_FEATURES: _Spec(U64Value, None),
    Request.SET_OWNER: _Spec(Empty, None),
    Request.RESET_OWNER: _Spec(Empty, None),
    Request.SET_MEM_TABLE: _Spec(MemoryTable, None, "per_region"),
    Request.SET_LOG_BASE: _Spec(Log, U64Value, "one"),
    Request.SET_LOG_FD: _Spec(Empty, None, "one"),
    Request.SET_VRING_NUM: _Spec(VringState, None),
    Request.SET_VRING_ADDR: _Spec(VringAddr, None),
    Request.SET_VRING_BASE: _Spec(VringState, None),
    Request.GET_VRING_BASE: _Spec(VringState, VringState),
    Request.SET_VRING_KICK: _Spec(VringFd, None, "unless_nofd"),
    Request.SET_VRING_CALL: _Spec(VringFd, None, "unless_nofd"),
    Request.SET_VRING_ERR: _Spec(VringFd, None, "unless_nofd"),
    Request.GET_PROTOCOL_FEATURES: _Spec(Empty, U64Value),
    Request.SET_PROTOCOL_FEATURES: _Spec(U64Value, None),
    Request.GET_QUEUE_NUM: _Spec(Empty, U64Value),
    Request.SET_VRING_ENABLE: _Spec(VringState, None),
    Request.SET_SLAVE_REQ_FD: _Spec(Empty, None, "one"),
    Request.GET_CONFIG: _Spec(Config, Config),
    Request.SET_CONFIG: _Spec(Config, None),
    Request.GET_INFLIGHT_FD: _Spec(Inflight, Inflight),
    Request.SET_INFLIGHT_FD: _Spec(Inflight, None, "one"),
    Request.RESET_DEVICE: _Spec(Empty, None),
    Request.VRING_KICK: _Spec(VringState, None),
    Request.GET_MAX_MEM_SLOTS: _Spec(Empty, U64Value),
    Request.SET_STATUS: _Spec(U64Value, None),
    Request.GET_STATUS: _Spec(Empty, U64Value),
}
_BACKEND: dict[int, _Spec] = {
    BackendRequest.CONFIG_CHANGE_MSG: _Spec(Empty, None),
    BackendRequest.VRING_CALL: _Spec(VringState, None),
    BackendRequest.VRING_ERR: _Spec(VringState, None),
}


def _reply_fds(channel: Channel, request: int, payload: Payload) -> int:
    """Only GET_INFLIGHT_FD's reply carries an fd (the backend's inflight memfd), and not when
    it reports failure (mmap_size 0, as QEMU reads it)."""
    if channel is Channel.FRONTEND and request == Request.GET_INFLIGHT_FD:
        return int(isinstance(payload, Inflight) and payload.mmap_size > 0)
    return 0


def _table(channel: Channel) -> dict[int, _Spec]:
    return _FRONTEND if channel is Channel.FRONTEND else _BACKEND


def request_name(request: int, channel: Channel = Channel.FRONTEND) -> str:
    kinds = Request if channel is Channel.FRONTEND else BackendRequest
    try:
        return kinds(request).name
    except ValueError:
        return f"request {request}"


def has_own_reply(request: int, channel: Channel = Channel.FRONTEND) -> bool:
    """True for the requests the spec answers regardless of REPLY_ACK ("Communication")."""
    spec = _table(channel).get(request)
    return spec is not None and spec.reply is not None


def expected_fds(request: int, payload: Payload, channel: Channel = Channel.FRONTEND) -> int:
    """How many fds request `request` with `payload` must carry (0 for anything unmodelled)."""
    spec = _table(channel).get(request)
    if spec is None or isinstance(payload, Raw):
        return 0
    if spec.fds == "one":
        return 1
    if spec.fds == "per_region":
        assert isinstance(payload, MemoryTable)
        return len(payload.regions)
    if spec.fds == "unless_nofd":
        assert isinstance(payload, VringFd)
        return 0 if payload.nofd else 1
    return 0


# -- messages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """One vhost-user message.  `fds` are owned by whoever holds the message: the receiver must
    close the ones it does not keep (the backend does, request by request)."""

    request: int
    payload: Payload
    flags: int = VHOST_USER_VERSION
    fds: tuple[int, ...] = ()
    channel: Channel = Channel.FRONTEND

    def __post_init__(self) -> None:
        if type(self.request) not in (int, Request, BackendRequest) or not 0 <= self.request < 1 << 32:
            raise LocalProtocolError(f"vhost-user request {self.request!r} is not a u32")
        if self.flags & FLAG_VERSION_MASK != VHOST_USER_VERSION or self.flags & ~_KNOWN_FLAGS:
            raise LocalProtocolError(f"vhost-user flags {self.flags:#x} are not version 1 + known bits")
        if not isinstance(self.payload, Payload):
            raise LocalProtocolError(f"vhost-user payload {self.payload!r} is not a Payload")
        object.__setattr__(self, "fds", tuple(self.fds))
        if len(self.fds) > MAX_FDS or not all(type(fd) is int and fd >= 0 for fd in self.fds):
            raise LocalProtocolError(f"vhost-user message fds {self.fds!r}: at most {MAX_FDS} fds")

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request, self.channel)

    def __repr__(self) -> str:
        kind = "reply" if self.is_reply else "request"
        return f"<vhost-user {kind} {self.name} {self.payload!r} fds={list(self.fds)}>"


def request(req: int, payload: Payload | None = None, *, need_reply: bool = False,
            fds: tuple[int, ...] | list[int] = (), channel: Channel = Channel.FRONTEND) -> Message:
    """A request, checked against the request table (payload type and fd count)."""
    msg = Message(req, payload if payload is not None else Empty(),
                  VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0), tuple(fds), channel)
    spec = _table(channel).get(req)
    if spec is not None and not isinstance(msg.payload, spec.request):
        raise LocalProtocolError(f"{msg.name} carries {spec.request.__name__}, not "
                                 f"{type(msg.payload).__name__}")
    want = expected_fds(req, msg.payload, channel)
    if len(msg.fds) != want:
        raise LocalProtocolError(f"{msg.name} carries {want} fds, not {len(msg.fds)}")
    return msg


def reply_to(msg: Message, payload: Payload, fds: tuple[int, ...] | list[int] = ()) -> Message:
    """The reply to `msg` (same request code, REPLY flag)."""
    want = _reply_fds(msg.channel, msg.request, payload)
    if len(fds) != want:
        raise LocalProtocolError(f"the reply to {msg.name} carries {want} fds, not {len(fds)}")
    return Message(msg.request, payload, VHOST_USER_VERSION | FLAG_REPLY, tuple(fds), msg.channel)


def ack(msg: Message, ok: bool = True) -> Message:
    """REPLY_ACK's answer: u64 0 for success, non-zero for failure."""
    return reply_to(msg, U64Value(0 if ok else 1))


def wants_reply(msg: Message) -> bool:
    """Whether the receiver of request `msg` must send something back: its own reply type, or a
    REPLY_ACK status because NEED_REPLY is set."""
    return msg.need_reply or has_own_reply(msg.request, msg.channel)


def encode(msg: Message) -> tuple[bytes, tuple[int, ...]]:
    """Header + payload bytes, and the fds to attach to them."""
    if not isinstance(msg, Message):
        raise LocalProtocolError(f"not a vhost-user message: {msg!r}")
    body = msg.payload.encode()
    if len(body) > MAX_PAYLOAD_BYTES:
        raise LocalProtocolError(f"{msg.name} payload of {len(body)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return HEADER.pack(msg.request, msg.flags, len(body)) + body, msg.fds


def decode_request(header: Header, payload: bytes, fds: tuple[int, ...] | list[int],
                   channel: Channel = Channel.FRONTEND) -> Message:
    """A request from the peer.  Raises `RemoteProtocolError`; the caller still owns `fds` then."""
    if header.is_reply:
        raise RemoteProtocolError(f"expected a request, got a reply to {request_name(header.request, channel)}")
    _check_size(header, payload)
    spec = _table(channel).get(header.request)
    body = spec.request.decode(payload) if spec is not None else Raw.decode(payload)
    want = expected_fds(header.request, body, channel)
    name = request_name(header.request, channel)
    if len(fds) != want:
        raise RemoteProtocolError(f"{name} must carry {want} fds, it carried {len(fds)}")
    return Message(header.request, body, header.flags, tuple(fds), channel)


def decode_reply(header: Header, payload: bytes, fds: tuple[int, ...] | list[int],
                 channel: Channel = Channel.FRONTEND) -> Message:
    """A reply from the peer: the request's own reply type, or a u64 REPLY_ACK status."""
    name = request_name(header.request, channel)
    if not header.is_reply:
        raise RemoteProtocolError(f"expected a reply, got a {name} request")
    _check_size(header, payload)
    spec = _table(channel).get(header.request)
    kind: type[Payload] = spec.reply if spec is not None and spec.reply is not None else U64Value
    if kind is Config and not payload:
        body: Payload = Empty()  # GET_CONFIG failed
    else:
        body = kind.decode(payload)
    want = _reply_fds(channel, header.request, body)
    if len(fds) != want:
        raise RemoteProtocolError(f"the reply to {name} must carry {want} fds, it carried {len(fds)}")
    return Message(header.request, body, header.flags, tuple(fds), channel)


def _check_size(header: Header, payload: bytes) -> None:
    if len(payload) != header.size:
        raise LocalProtocolError(f"header says {header.size} payload bytes, {len(payload)} given")
