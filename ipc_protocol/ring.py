"""Sans-I/O single-producer/single-consumer rings carrying MMIO register accesses.

Two rings connect the core to a device process:

- the **request ring** (core -> device): `READ`, `WRITE` and `SYNC` slots, in guest order;
- the **response ring** (device -> core): `READ_DONE` / `SYNC_DONE` slots, one per `READ` / `SYNC`.

Writes are posted (no response), and the device applies slots strictly in FIFO order, so a read's
response reflects every earlier write.  These classes only read and write bytes in a buffer — a
`bytearray` in tests, a shared `mmap` in production (`transport.shm_ring`); waiting and waking is the
transport's business.

Memory layout of one ring (all little-endian; offsets in bytes)::

    0    header: magic u32, layout version u16, slot size u16, capacity u32  (informational)
    64   producer index u64   -- written only by the producer
    128  consumer index u64   -- written only by the consumer
    192  slots[capacity], SLOT_SIZE bytes each

Each index lives in its own 64-byte cache line so the two sides do not false-share.  Indices are
free-running u64 counters (slot = index & (capacity - 1)); "empty" is head == tail and "full" is
head - tail == capacity, so no slot is wasted and no wrap-around ambiguity exists.

Trust: the device process is untrusted and can scribble anywhere in the shared mapping at any
moment.  Hence (1) each side keeps its *own* index in a private attribute and only mirrors it to
the buffer; it reads the buffer only for the *peer's* index; (2) the peer's index is range-checked
against ours on every read; (3) a slot is copied out of shared memory exactly once and the copy is
validated (no double fetch).  Violations raise `RemoteProtocolError`.

Ordering: the producer writes the slot bytes, then publishes the index (and the consumer reads the
index, then the slot).  On x86-64 (TSO) stores are seen in program order, and each `pack_into` is
an opaque C call the compiler cannot reorder across.  A port to a weakly ordered CPU would need
release/acquire fences around the index accesses.
"""

from __future__ import annotations

import enum
import struct
import sys
from dataclasses import dataclass
from typing import Iterable

from .errors import LocalProtocolError, RemoteProtocolError

# -- layout, declared once ---------------------------------------------------------------------

RING_MAGIC = 0x47524842  # "BHRG" little-endian: lets a hexdump of the memfd be recognised
RING_LAYOUT_VERSION = 1
CACHE_LINE = 64

HEADER_STRUCT = struct.Struct("<IHHI")
INDEX_STRUCT = struct.Struct("<Q")
PRODUCER_INDEX_OFFSET = 1 * CACHE_LINE
CONSUMER_INDEX_OFFSET = 2 * CACHE_LINE
SLOTS_OFFSET = 3 * CACHE_LINE

# op u8 | size u8 | reserved u16 (must be 0) | offset u32 | sequence u64 | data 8 bytes
SLOT_STRUCT = struct.Struct("<BBHIQ8s")
SLOT_SIZE = SLOT_STRUCT.size  # 24
SLOT_DATA_MAX = 8

MAX_CAPACITY = 1 << 16
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
ACCESS_SIZES = frozenset((1, 2, 4, 8))  # what an MMIO access can be on x86-64


class Op(enum.IntEnum):
    """Slot operations.  Values are wire values: never renumber, only append."""

    READ = 1        # core -> device: read `size` bytes at `offset`; answer READ_DONE
    WRITE = 2       # core -> device: write `data` at `offset` (posted, no answer)
    SYNC = 3        # core -> device: answer SYNC_DONE once every earlier slot is applied
    READ_DONE = 129  # device -> core: the value read (`data`), echoing seq/offset/size
    SYNC_DONE = 130  # device -> core: echo of a SYNC's sequence


REQUEST_OPS = frozenset((Op.READ, Op.WRITE, Op.SYNC))
RESPONSE_OPS = frozenset((Op.READ_DONE, Op.SYNC_DONE))
_ANSWER_FOR = {Op.READ: Op.READ_DONE, Op.SYNC: Op.SYNC_DONE}


def ring_bytes(capacity: int) -> int:
    """Bytes one ring of `capacity` slots occupies, rounded up to a cache line."""
    _check_capacity(capacity)
    raw = SLOTS_OFFSET + capacity * SLOT_SIZE
    return (raw + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE


def _check_capacity(capacity: int) -> None:
    if not isinstance(capacity, int) or capacity < 1 or capacity > MAX_CAPACITY \
            or capacity & (capacity - 1):
        raise LocalProtocolError(
            f"ring capacity {capacity!r} must be a power of two between 1 and {MAX_CAPACITY}")


def initialize_ring(buf: memoryview | bytearray, capacity: int) -> None:
    """Write the header and zero both indices.  Done once, by the creator (the core)."""
    view = _as_bytes_view(buf, capacity)
    view[:SLOTS_OFFSET] = bytes(SLOTS_OFFSET)
    HEADER_STRUCT.pack_into(view, 0, RING_MAGIC, RING_LAYOUT_VERSION, SLOT_SIZE, capacity)


def _as_bytes_view(buf: memoryview | bytearray, capacity: int) -> memoryview:
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" \
        else buf
    if view.readonly:
        raise LocalProtocolError("a ring needs a writable buffer")
    if len(view) < ring_bytes(capacity):
        raise LocalProtocolError(
            f"buffer of {len(view)} bytes is too small for a {capacity}-slot ring "
            f"({ring_bytes(capacity)} bytes needed)")
    return view


# -- slots -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Slot:
    """One register access or its answer.

    `data` holds exactly `size` bytes for WRITE and READ_DONE and is empty for READ, SYNC and
    SYNC_DONE.  Building an invalid slot is our own bug: `LocalProtocolError`.
    """

    op: Op
    seq: int
    offset: int = 0
    size: int = 0
    data: bytes = b""

    def __post_init__(self) -> None:
        problem = _slot_problem(self.op, self.seq, self.offset, self.size, self.data)
        if problem:
            raise LocalProtocolError(f"invalid ring slot: {problem}")

    @classmethod
    def read(cls, seq: int, offset: int, size: int) -> "Slot":
        return cls(Op.READ, seq, offset, size)

    @classmethod
    def write(cls, seq: int, offset: int, data: bytes) -> "Slot":
        return cls(Op.WRITE, seq, offset, len(data), bytes(data))

    @classmethod
    def sync(cls, seq: int) -> "Slot":
        return cls(Op.SYNC, seq)

    def answer(self, data: bytes = b"") -> "Slot":
        """The response slot a device sends for this READ (with `data`) or SYNC."""
        op = _ANSWER_FOR.get(self.op)
        if op is None:
            raise LocalProtocolError(f"{self.op.name} slots get no answer")
        return Slot(op, self.seq, self.offset, self.size, bytes(data))


def _slot_problem(op: object, seq: object, offset: object, size: object, data: object) -> str:
    """Why these field values do not form a valid slot ('' if they do)."""
    if not isinstance(op, Op):
        return f"unknown op {op!r}"
    if not isinstance(seq, int) or not 0 <= seq <= U64_MAX:
        return f"sequence {seq!r} is not a u64"
    if not isinstance(offset, int) or not 0 <= offset <= U32_MAX:
        return f"offset {offset!r} is not a u32"
    if not isinstance(data, bytes):
        return "data must be bytes"
    if op in (Op.SYNC, Op.SYNC_DONE):
        if size != 0 or offset != 0 or data:
            return f"{op.name} carries no offset, size or data"
        return ""
    if size not in ACCESS_SIZES:
        return f"{op.name} size {size!r} is not 1, 2, 4 or 8"
    expected_len = 0 if op is Op.READ else size
    if len(data) != expected_len:
        return f"{op.name} of size {size} carries {len(data)} data bytes, not {expected_len}"
    return ""


def encode_slot(slot: Slot) -> bytes:
    """The slot's SLOT_SIZE wire bytes (unused data bytes are zero)."""
    return SLOT_STRUCT.pack(slot.op, slot.size, 0, slot.offset, slot.seq,
                            slot.data.ljust(SLOT_DATA_MAX, b"\0"))


def decode_slot(raw: bytes | memoryview, allowed_ops: Iterable[Op] = tuple(Op)) -> Slot:
    """Parse and validate SLOT_SIZE bytes from the peer; anything off is `RemoteProtocolError`."""
    if len(raw) != SLOT_SIZE:
        raise RemoteProtocolError(f"ring slot is {len(raw)} bytes, not {SLOT_SIZE}")
    op_value, size, reserved, offset, seq, data8 = SLOT_STRUCT.unpack(raw)
    try:
        op = Op(op_value)
    except ValueError:
        raise RemoteProtocolError(f"ring slot has unknown op {op_value}") from None
    if op not in allowed_ops:
        raise RemoteProtocolError(f"ring slot op {op.name} is not allowed on this ring")
    if reserved:
        raise RemoteProtocolError(f"ring slot reserved field is {reserved:#x}, not 0")
    carried = size if op in (Op.WRITE, Op.READ_DONE) and size in ACCESS_SIZES else 0
    # Bytes past the payload must be zero: a peer cannot smuggle state through padding.
    if any(data8[carried:]):
        raise RemoteProtocolError(f"{op.name} slot has non-zero bytes past its {carried}-byte data")
    problem = _slot_problem(op, seq, offset, size, data8[:carried])
    if problem:
        raise RemoteProtocolError(f"invalid ring slot from peer: {problem}")
    return Slot(op, seq, offset, size, data8[:carried])


# -- the two ends ------------------------------------------------------------------------------

class _RingEnd:
    def __init__(self, buf: memoryview | bytearray, capacity: int) -> None:
        self.capacity = capacity
        self._mask = capacity - 1
        self._view = _as_bytes_view(buf, capacity)
        # Indices are read and published as single aligned 8-byte loads/stores through a 'Q'
        # view.  struct.pack_into is not usable here: CPython zero-fills the field before
        # writing it, so the peer could read a transient 0 (seen as a "corrupt" index).
        # A 'Q' view is native-endian: the layout is little-endian, as are the hosts we run on.
        assert sys.byteorder == "little", "the ring layout is little-endian"
        self._indices = self._view[:SLOTS_OFFSET].cast("Q")

    def _read_index(self, offset: int) -> int:
        return self._indices[offset // INDEX_STRUCT.size]

    def _store_index(self, offset: int, value: int) -> None:
        self._indices[offset // INDEX_STRUCT.size] = value

    def _check_peer_distance(self, head: int, tail: int, who: str) -> int:
        """head - tail, which must lie in [0, capacity]; else the peer corrupted its index."""
        used = (head - tail) & U64_MAX
        if used > self.capacity:
            raise RemoteProtocolError(
                f"ring {who} index is corrupt: head {head} / tail {tail} "
                f"in a {self.capacity}-slot ring")
        return used

    def _slot_offset(self, index: int) -> int:
        return SLOTS_OFFSET + (index & self._mask) * SLOT_SIZE


class RingProducer(_RingEnd):
    """The writing end.  `push` never blocks: it answers False when the ring is full."""

    def __init__(self, buf: memoryview | bytearray, capacity: int) -> None:
        super().__init__(buf, capacity)
        self._head = 0  # private copy: never trust what the shared buffer says our index is

    def free_slots(self) -> int:
        tail = self._read_index(CONSUMER_INDEX_OFFSET)
        return self.capacity - self._check_peer_distance(self._head, tail, "consumer")

    def push(self, slot: Slot) -> bool:
        if not isinstance(slot, Slot):
            raise LocalProtocolError(f"push expects a Slot, got {type(slot).__name__}")
        if self.free_slots() == 0:
            return False
        SLOT_STRUCT.pack_into(self._view, self._slot_offset(self._head), slot.op, slot.size, 0,
                              slot.offset, slot.seq, slot.data.ljust(SLOT_DATA_MAX, b"\0"))
        self._head = (self._head + 1) & U64_MAX
        self._store_index(PRODUCER_INDEX_OFFSET, self._head)  # publish last
        return True

    def push_raw(self, raw: bytes) -> bool:
        """Publish arbitrary SLOT_SIZE bytes: fault injection and fuzzing of the peer's validation."""
        if len(raw) != SLOT_SIZE:
            raise LocalProtocolError(f"a raw slot is {SLOT_SIZE} bytes, not {len(raw)}")
        if self.free_slots() == 0:
            return False
        start = self._slot_offset(self._head)
        self._view[start:start + SLOT_SIZE] = raw
        self._head = (self._head + 1) & U64_MAX
        self._store_index(PRODUCER_INDEX_OFFSET, self._head)
        return True


class RingConsumer(_RingEnd):
    """The reading end.  Only slots whose op is in `allowed_ops` are accepted."""

    def __init__(self, buf: memoryview | bytearray, capacity: int,
                 allowed_ops: Iterable[Op]) -> None:
        super().__init__(buf, capacity)
        self._tail = 0
        self._allowed = frozenset(allowed_ops)

    def pending(self) -> int:
        head = self._read_index(PRODUCER_INDEX_OFFSET)
        return self._check_peer_distance(head, self._tail, "producer")

    def pop(self) -> Slot | None:
        if self.pending() == 0:
            return None
        start = self._slot_offset(self._tail)
        raw = bytes(self._view[start:start + SLOT_SIZE])  # one copy out of shared memory
        self._tail = (self._tail + 1) & U64_MAX
        self._store_index(CONSUMER_INDEX_OFFSET, self._tail)
        return decode_slot(raw, self._allowed)


def request_producer(buf: memoryview | bytearray, capacity: int) -> RingProducer:
    return RingProducer(buf, capacity)


def request_consumer(buf: memoryview | bytearray, capacity: int) -> RingConsumer:
    return RingConsumer(buf, capacity, REQUEST_OPS)


def response_producer(buf: memoryview | bytearray, capacity: int) -> RingProducer:
    return RingProducer(buf, capacity)


def response_consumer(buf: memoryview | bytearray, capacity: int) -> RingConsumer:
    return RingConsumer(buf, capacity, RESPONSE_OPS)


# -- matching answers to questions (core side) ---------------------------------------------------

class ResponseMatcher:
    """Checks each response from the device against the request it must answer.

    The core has at most a few answered requests in flight per device (reads are serialized), and
    answers must come back in request order.  Anything else — an answer nobody asked for, a wrong
    sequence, op, offset or size — is `RemoteProtocolError`.
    """

    def __init__(self) -> None:
        self._outstanding: list[Slot] = []

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def expect(self, request: Slot) -> None:
        """Record a READ or SYNC just pushed; its answer must come next (after earlier ones)."""
        if request.op not in _ANSWER_FOR:
            raise LocalProtocolError(f"{request.op.name} slots get no answer to expect")
        self._outstanding.append(request)

    def match(self, response: Slot) -> Slot:
        """Validate `response` against the oldest outstanding request and return that request."""
        if not self._outstanding:
            raise RemoteProtocolError(
                f"device sent {response.op.name} seq {response.seq} but no answer was pending")
        request = self._outstanding[0]
        expected = request.answer(bytes(request.size) if request.op is Op.READ else b"")
        for name in ("op", "seq", "offset", "size"):
            got, want = getattr(response, name), getattr(expected, name)
            if got != want:
                raise RemoteProtocolError(
                    f"device answer mismatch: {name} is {got!r}, expected {want!r} "
                    f"(answering {request.op.name} seq {request.seq})")
        self._outstanding.pop(0)
        return request

    def clear(self) -> None:
        self._outstanding.clear()
