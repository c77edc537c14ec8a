"""virtio-blk on a raw image file (VIRTIO 1.2 §5.2).

A request is parsed from its chain into a `BlkRequest` (header, data views, status view), then
executed against a `RawImage` backend; data moves with preadv/pwritev straight between the file
and guest RAM.  Request layout (§5.2.6): a 16-byte header {le32 type, le32 reserved,
le64 sector} in device-readable memory, then data, then one device-writable status byte — the
last writable byte, wherever the driver split its buffers (§2.6.4).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from dataclasses import dataclass

from . import fastpath
from .device import COMMON_FEATURES, VIRTIO_ID_BLOCK, VirtioDevice
from .errors import DeviceSpecError
from .queue import DescriptorChain, Queue, slice_views
from .rate_limiter import RateLimiter

log = logging.getLogger(__name__)

# Feature bits (§5.2.3).
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# Request types and status values (§5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # a header and a status descriptor besides the data
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: the page size hole punching works in
IOV_MAX = 1024

# fallocate(2) modes (<linux/falloc.h>).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class RawImage:
    """The backend: a raw image file opened once, before the jail."""

    def __init__(self, image: str | int, readonly: bool) -> None:
        """`image`: an fd the core opened (duplicated: the caller keeps its own), or a path
        (tests and tools; the jailed device never opens one)."""
        if isinstance(image, int):
            self.fd = os.dup(image)
            self.path = f"fd {image}"
        else:
            flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
            try:
                self.fd = os.open(image, flags)
            except OSError as e:
                raise DeviceSpecError(f"blk: cannot open image {image!r}: {e.strerror}") from None
            self.path = image
        self.readonly = readonly
        self.capacity = os.fstat(self.fd).st_size // SECTOR_SIZE  # in 512-byte sectors
        self.can_punch = True

    def readv(self, views: list[memoryview], offset: int) -> int:
        done = 0
        for i in range(0, len(views), IOV_MAX):
            batch = views[i:i + IOV_MAX]
            want = sum(len(v) for v in batch)
            n = os.preadv(self.fd, batch, offset + done)
            done += n
            if n < want:
                raise OSError(errno.EIO, "short read from the image")
        return done

    def writev(self, views: list[memoryview], offset: int) -> int:
        done = 0
        pending = list(views)
        while pending:
            n = os.pwritev(self.fd, pending[:IOV_MAX], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "image write made no progress")
            done += n
            while pending and n >= len(pending[0]):  # drop what was written, keep a partial rest
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]
        return done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, *, punch: bool) -> None:
        """Make [offset, offset+length) read as zeroes, deallocating it if `punch`."""
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if punch else []
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        if self.can_punch:
            for mode in modes:
                if _fallocate(self.fd, mode, offset, length) == 0:
                    return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM):
                raise OSError(err, os.strerror(err))
            self.can_punch = False  # e.g. tmpfs without ZERO_RANGE, or seccomp: write zeroes
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, memoryview(chunk)[:min(len(chunk), end - offset)], offset)
            offset += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class BlkRequest:
    """One parsed request; `status` is None when the chain has no writable byte for it."""

    type: int
    sector: int
    data_in: list[memoryview]   # device-writable data (T_IN, T_GET_ID)
    data_out: list[memoryview]  # device-readable data (T_OUT, T_DISCARD, T_WRITE_ZEROES)
    status: memoryview | None

    @property
    def in_len(self) -> int:
        return sum(len(v) for v in self.data_in)

    @property
    def out_len(self) -> int:
        return sum(len(v) for v in self.data_out)

    @classmethod
    def parse(cls, chain: DescriptorChain) -> "BlkRequest":
        """The request in `chain`; a chain too short for a header parses as type -1."""
        writable = chain.writable_len
        status = slice_views(chain.writable_views, writable - 1, 1) if writable else []
        header = b"".join(bytes(v) for v in slice_views(chain.readable_views, 0, HEADER.size))
        if len(header) < HEADER.size:
            # §5.2.6: every request starts with the header; without it there is no type to run.
            # A status byte, if any, still reports the error.
            return cls(-1, 0, [], [], status[0] if status else None)
        type_, _reserved, sector = HEADER.unpack(header)
        return cls(type_, sector,
                   slice_views(chain.writable_views, 0, max(writable - 1, 0)),
                   slice_views(chain.readable_views, HEADER.size),
                   status[0] if status else None)


class BlkDevice(VirtioDevice):
    """virtio-blk, one request queue, requests executed synchronously in order.

    With a `rate_limiter`, each request pays one op and its data bytes (a flush or get-id: the
    op only) before it runs; out of tokens, the device holds the request and takes nothing more
    from the queue until `next_deadline_ns()`.
    """

    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = [QUEUE_SIZE]

    def __init__(self, image: str | int, *, readonly: bool = False, serial: str = "",
                 rate_limiter: RateLimiter | None = None, native: bool = True) -> None:
        super().__init__()
        self.native = native and self.native
        serial_bytes = serial.encode()
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise DeviceSpecError(f"blk: serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.serial = serial_bytes
        self.backend = RawImage(image, readonly)
        self.readonly = readonly
        self.device_features = (COMMON_FEATURES | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                                | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD
                                | VIRTIO_BLK_F_WRITE_ZEROES | (VIRTIO_BLK_F_RO if readonly else 0))
        self.counters.update(requests=0, reads=0, writes=0, flushes=0, discards=0,
                             write_zeroes=0, get_id=0, bytes_read=0, bytes_written=0,
                             errors=0, unsupported=0, malformed=0, throttled=0)
        self.rate_limiter = rate_limiter

    def drain_queue(self, index: int, queue: Queue) -> bool:
        """Reads and writes in the C loop (`fastpath.FastRing.blk`); everything else, and all
        of it under a rate limit, through `handle_chain`, one chain at a time."""
        if self.rate_limiter is not None or self.held:
            return super().drain_queue(index, queue)
        used = False
        while (ring := self.fast_ring(index, queue)) is not None:
            before = queue.used_idx
            rc = ring.blk(self.backend.fd, self.backend.capacity, self.readonly, self.counters)
            used |= queue.used_idx != before
            if rc == fastpath.EMPTY:
                return used
            chain = queue.pop()  # SLOW: this one the Python way
            if chain is not None:
                self.counters["chains"] += 1
                queue.add_used(chain.head, self.handle_chain(index, chain))
                used = True
        return super().drain_queue(index, queue) or used

    def admit(self, queue_index: int, chain: DescriptorChain) -> bool:
        if self.rate_limiter is None:
            return True
        # The data moved, whatever the type: readable bytes past the header, writable bytes
        # before the status (a discard's segment table counts; it is tiny).
        nbytes = max(chain.readable_len - HEADER.size, 0) + max(chain.writable_len - 1, 0)
        if self.rate_limiter.try_consume(nbytes):
            return True
        self.counters["throttled"] += 1
        return False

    def next_deadline_ns(self) -> int | None:
        if self.rate_limiter is None or 0 not in self.held:
            return None
        return self.rate_limiter.deadline_ns()

    def on_timer(self, now_ns: int) -> bool:
        return self.process_queue(0) if 0 in self.held else False

    @classmethod
    def from_spec(cls, spec: dict, fds: dict[str, int]) -> "BlkDevice":
        # `bandwidth` / `ops` (SIZE/REFILL_MS[/BURST]) once the blk kind declares them.
        limiter = RateLimiter.from_fields(spec.get("bandwidth"), spec.get("ops"))
        return cls(fds.get("disk", spec.get("path", "")), readonly=spec.get("readonly", False),
                   serial=spec.get("serial") or "", rate_limiter=limiter)

    def config_bytes(self) -> bytes:
        """struct virtio_blk_config (§5.2.4) up to write_zeroes_may_unmap, padded."""
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.backend.capacity,
            0,                          # size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
            SEG_MAX,
            0, 0, 0,                    # geometry (not offered)
            SECTOR_SIZE,                # blk_size
            0, 0, 0, 0,                 # topology (not offered)
            0, 0, 1,                    # writeback, unused0, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_SECTOR_ALIGNMENT,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
            1,                          # write_zeroes_may_unmap
        )

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        self.counters["requests"] += 1
        request = BlkRequest.parse(chain)
        if request.status is None:
            # No writable byte for a status: nothing can be reported; return the chain unused.
            self.counters["malformed"] += 1
            return 0
        status, written = self.execute(request)
        request.status[0] = status
        if status != VIRTIO_BLK_S_OK:
            self.counters["unsupported" if status == VIRTIO_BLK_S_UNSUPP else "errors"] += 1
        return written + 1

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        """Run a parsed request: (status, data bytes written to the driver)."""
        if req.type == -1:
            self.counters["malformed"] += 1
            return VIRTIO_BLK_S_IOERR, 0
        try:
            if req.type == VIRTIO_BLK_T_IN:
                return self._read(req)
            if req.type == VIRTIO_BLK_T_OUT:
                return self._write(req), 0
            if req.type == VIRTIO_BLK_T_FLUSH:
                self.counters["flushes"] += 1
                self.backend.flush()
                return VIRTIO_BLK_S_OK, 0
            if req.type == VIRTIO_BLK_T_GET_ID:
                self.counters["get_id"] += 1
                return self._get_id(req)
            if req.type in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                return self._discard_or_zero(req), 0
        except OSError as e:
            log.warning("blk: %s request at sector %d failed: %s", req.type, req.sector, e)
            return VIRTIO_BLK_S_IOERR, 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _in_range(self, sector: int, nbytes: int) -> bool:
        # §5.2.6.1: data is whole sectors; §5.2.6.2: past the end is an error.
        return nbytes % SECTOR_SIZE == 0 and sector + nbytes // SECTOR_SIZE <= self.backend.capacity

    def _read(self, req: BlkRequest) -> tuple[int, int]:
        if not self._in_range(req.sector, req.in_len):
            return VIRTIO_BLK_S_IOERR, 0
        n = self.backend.readv(req.data_in, req.sector * SECTOR_SIZE)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += n
        return VIRTIO_BLK_S_OK, n

    def _write(self, req: BlkRequest) -> int:
        # §5.2.6.2: with VIRTIO_BLK_F_RO offered, writes fail with IOERR and write nothing.
        if self.readonly or not self._in_range(req.sector, req.out_len):
            return VIRTIO_BLK_S_IOERR
        n = self.backend.writev(req.data_out, req.sector * SECTOR_SIZE)
        self.counters["writes"] += 1
        self.counters["bytes_written"] += n
        return VIRTIO_BLK_S_OK

    def _get_id(self, req: BlkRequest) -> tuple[int, int]:
        # §5.2.6: a 20-byte serial, NUL-padded (not terminated when it fills all 20).
        ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        written = 0
        for v in req.data_in:
            n = min(len(v), len(ident) - written)
            v[:n] = ident[written:written + n]
            written += n
            if written == len(ident):
                break
        return VIRTIO_BLK_S_OK, written

    def _discard_or_zero(self, req: BlkRequest) -> int:
        discard = req.type == VIRTIO_BLK_T_DISCARD
        self.counters["discards" if discard else "write_zeroes"] += 1
        if self.readonly:
            return VIRTIO_BLK_S_IOERR
        payload = b"".join(bytes(v) for v in req.data_out)
        # §5.2.6: the data is whole virtio_blk_discard_write_zeroes segments, at most max_*_seg.
        if not payload or len(payload) % SEGMENT.size or len(payload) // SEGMENT.size > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_IOERR
        segments = [SEGMENT.unpack_from(payload, i) for i in range(0, len(payload), SEGMENT.size)]
        for sector, num, flags in segments:
            # §5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
            if num > MAX_DISCARD_SECTORS or sector + num > self.backend.capacity:
                return VIRTIO_BLK_S_IOERR
        for sector, num, flags in segments:
            # A discard may deallocate (reads then return zeroes on a raw file); write zeroes
            # deallocates only when the driver allows it with the unmap flag.
            self.backend.zero(sector * SECTOR_SIZE, num * SECTOR_SIZE,
                              punch=discard or bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return VIRTIO_BLK_S_OK

    def stats(self) -> dict:
        out = super().stats()
        out.update(capacity_sectors=self.backend.capacity, readonly=self.readonly)
        return out

    def close(self) -> None:
        self.backend.close()
