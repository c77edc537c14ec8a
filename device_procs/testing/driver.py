"""A host-side virtio driver that plays the guest, for tests and benchmarks.

`VirtioDriver` talks to any register file given as `read(offset, data)` / `write(offset, data)`
(an `MmioDevice`, or a proxy to a device process) and lays out its queues in a `GuestMemory`,
exactly as a guest kernel would (VIRTIO 1.2 §3.1.1 initialisation, §2.7.13 supplying buffers).
Kicks go through a `kick(index)` callable, by default a QueueNotify register write; with a
device process the completion may come later, so `wait_used` polls with a timeout.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Callable

from device_procs.virtio import mmio as regs
from device_procs.virtio.device import VIRTIO_F_EVENT_IDX
from device_procs.virtio.queue import (DESC_SIZE, USED_ELEM_SIZE, VIRTQ_DESC_F_INDIRECT,
                                       VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE)
from ipc_protocol.guest_memory import GuestMemory

ReadFn = Callable[[int, bytearray], None]
WriteFn = Callable[[int, bytes], None]

_DESC = struct.Struct("<QIHH")
NET_HEADER_SIZE = 12   # struct virtio_net_hdr_v1 (§5.1.6)
NET_RX_BUFFER = 1526   # §5.1.6.3: 1514 + the 12-byte header


class DriverError(Exception):
    """The device refused something a well-behaved driver does (or never answered)."""


class Arena:
    """A bump allocator over [base, base+size) of guest RAM that wraps around when full.

    Tests keep few requests in flight, so wrapping over old buffers is safe enough and keeps long
    runs (benchmarks) from running out of space.  Wrapping goes back to `floor`, never over what
    lies below it (the rings: `VirtioDriver.setup_queue` raises the floor past them).
    """

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size, self.pos, self.floor = base, size, 0, 0

    def alloc(self, length: int, align: int = 16) -> int:
        length = max(length, 1)
        if length > self.size:
            raise DriverError(f"cannot allocate {length} bytes from a {self.size}-byte arena")
        self.pos = (self.pos + align - 1) // align * align
        if self.pos + length > self.size:
            self.pos = (self.floor + align - 1) // align * align
            if self.pos + length > self.size:
                raise DriverError(f"cannot allocate {length} bytes above the rings")
        gpa = self.base + self.pos
        self.pos += length
        return gpa


@dataclass
class Buffer:
    gpa: int
    length: int
    writable: bool


@dataclass
class Completion:
    head: int
    length: int
    buffers: list[Buffer]

    def writable_data(self, memory: GuestMemory) -> bytes:
        return b"".join(memory.read(b.gpa, b.length) for b in self.buffers if b.writable)


class DriverQueue:
    """The driver's side of one split virtqueue."""

    def __init__(self, driver: "VirtioDriver", index: int, size: int, desc: int, avail: int,
                 used: int) -> None:
        self.driver, self.memory = driver, driver.memory
        self.index, self.size = index, size
        self.desc, self.avail, self.used = desc, avail, used
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.in_flight: dict[int, tuple[list[int], list[Buffer]]] = {}

    # -- raw ring access (also used to build hostile rings) ----------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + DESC_SIZE * index, _DESC.pack(addr, length, flags, next_))

    def publish(self, head: int) -> None:
        """Put `head` in the available ring and move idx (element first, then idx)."""
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + USED_ELEM_SIZE * self.size)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def set_avail_flags(self, value: int) -> None:
        self.memory.write_u16(self.avail, value)

    # -- well-formed chains ---------------------------------------------------------------------
    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False,
            publish: bool = True) -> int:
        """Copy `readable` into guest RAM, allocate `writable` buffers, chain them; the head."""
        arena = self.driver.arena
        buffers: list[Buffer] = []
        for data in readable:
            gpa = arena.alloc(len(data))
            self.memory.write(gpa, data)
            buffers.append(Buffer(gpa, len(data), False))
        for length in writable:
            gpa = arena.alloc(length)
            self.memory.write(gpa, bytes(length))
            buffers.append(Buffer(gpa, length, True))
        return self.add_buffers(buffers, indirect=indirect, publish=publish)

    def add_buffers(self, buffers: list[Buffer], *, indirect: bool = False, publish: bool = True) -> int:
        """Chain buffers already placed in guest RAM (benchmarks reuse them, like a real driver's
        preallocated request pool); the head."""
        arena = self.driver.arena
        if not buffers:
            raise DriverError("a chain needs at least one buffer")
        if indirect:
            table = arena.alloc(DESC_SIZE * len(buffers))
            for i, b in enumerate(buffers):
                last = i == len(buffers) - 1
                self.write_desc(i, b.gpa, b.length,
                                (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else i + 1, table=table)
            descs = self._take(1)
            self.write_desc(descs[0], table, DESC_SIZE * len(buffers), VIRTQ_DESC_F_INDIRECT)
        else:
            descs = self._take(len(buffers))
            for i, (d, b) in enumerate(zip(descs, buffers)):
                last = i == len(buffers) - 1
                self.write_desc(d, b.gpa, b.length,
                                (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else descs[i + 1])
        self.in_flight[descs[0]] = (descs, buffers)
        if publish:
            self.publish(descs[0])
        return descs[0]

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise DriverError(f"queue {self.index}: {n} descriptors wanted, {len(self.free)} free")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def kick(self) -> None:
        self.driver.kick(self.index)

    def get_used(self) -> list[Completion]:
        """Collect used elements added since the last call, freeing their descriptors."""
        out: list[Completion] = []
        while True:
            idx = self.used_idx()
            while self.last_used != idx:
                slot = self.last_used % self.size
                head, length = struct.unpack_from("<II", self.memory.read(self.used + 4 + 8 * slot, 8))
                self.last_used = (self.last_used + 1) & 0xFFFF
                descs, buffers = self.in_flight.pop(head, ([], []))
                self.free.extend(descs)
                out.append(Completion(head, length, buffers))
            if not self.driver.negotiated & VIRTIO_F_EVENT_IDX:
                return out
            # Ask to be interrupted on the next used buffer (§2.7.10), as Linux does -- then look
            # again: a device completing concurrently may have added one before it could see the
            # new used_event, and would not interrupt for it (virtqueue_enable_cb's re-check).
            self.set_used_event(self.last_used)
            if self.used_idx() == self.last_used:
                return out

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[Completion]:
        """Collect at least `count` completions, polling until `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        done: list[Completion] = []
        while True:
            done += self.get_used()
            if len(done) >= count:
                return done
            if time.monotonic() > deadline:
                raise DriverError(f"queue {self.index}: {len(done)} of {count} completions "
                                  f"after {timeout} s")
            time.sleep(0.0005)

    def submit(self, readable: list[bytes], writable: list[int], *, indirect: bool = False,
               timeout: float = 5.0) -> Completion:
        """Add one chain, kick, wait for it."""
        head = self.add(readable, writable, indirect=indirect)
        self.kick()
        for c in self.wait_used(1, timeout):
            if c.head == head:
                return c
        raise DriverError(f"queue {self.index}: chain {head} did not come back")


class VirtioDriver:
    """The guest side of a virtio-mmio device, driven from the host.

    `ram_base` is where it may place rings and buffers in guest RAM (`ram_size` bytes).
    """

    def __init__(self, read: ReadFn, write: WriteFn, memory: GuestMemory, *, ram_base: int = 0x100000,
                 ram_size: int = 8 << 20, kick: Callable[[int], None] | None = None) -> None:
        self._read, self._write = read, write
        self.memory = memory
        self.arena = Arena(ram_base, ram_size)
        self.kick = kick or (lambda index: self.write_reg(regs.QUEUE_NOTIFY, index))
        self.queues: dict[int, DriverQueue] = {}
        self.negotiated = 0
        self._net_rx: list[Completion] = []  # receiveq completions not yet made into frames

    # -- registers ----------------------------------------------------------------------------
    def read_reg(self, offset: int, size: int = 4) -> int:
        data = bytearray(size)
        self._read(offset, data)
        return int.from_bytes(data, "little")

    def write_reg(self, offset: int, value: int, size: int = 4) -> None:
        self._write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_config(self, offset: int, size: int) -> bytes:
        data = bytearray(size)
        self._read(regs.CONFIG + offset, data)
        return bytes(data)

    @property
    def status(self) -> int:
        return self.read_reg(regs.STATUS)

    def set_status(self, bits: int) -> None:
        self.write_reg(regs.STATUS, self.status | bits)

    def device_features(self) -> int:
        self.write_reg(regs.DEVICE_FEATURES_SEL, 0)
        low = self.read_reg(regs.DEVICE_FEATURES)
        self.write_reg(regs.DEVICE_FEATURES_SEL, 1)
        return low | self.read_reg(regs.DEVICE_FEATURES) << 32

    def write_driver_features(self, value: int) -> None:
        for sel in (0, 1):
            self.write_reg(regs.DRIVER_FEATURES_SEL, sel)
            self.write_reg(regs.DRIVER_FEATURES, (value >> (32 * sel)) & 0xFFFFFFFF)

    # -- initialisation (§3.1.1) ----------------------------------------------------------------
    def reset(self) -> None:
        self.write_reg(regs.STATUS, 0)
        self.arena.floor = self.arena.pos = 0
        self.queues.clear()
        self.negotiated = 0
        self._net_rx = []

    def negotiate(self, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept `features` ∩ offered (default: all offered)."""
        if self.read_reg(regs.MAGIC_VALUE) != regs.MAGIC or self.read_reg(regs.VERSION) != 2:
            raise DriverError("not a virtio-mmio version 2 device")
        self.reset()
        self.set_status(regs.ACKNOWLEDGE)
        self.set_status(regs.DRIVER)
        offered = self.device_features()
        wanted = offered if features is None else offered & features
        self.write_driver_features(wanted)
        self.set_status(regs.FEATURES_OK)
        if not self.status & regs.FEATURES_OK:
            raise DriverError(f"device refused features {wanted:#x}")
        self.negotiated = wanted
        return wanted

    def setup_queue(self, index: int, size: int | None = None, *, desc: int | None = None,
                    avail: int | None = None, used: int | None = None, ready: bool = True) -> DriverQueue:
        """Program queue `index`; rings are allocated unless addresses are given (hostile tests)."""
        self.write_reg(regs.QUEUE_SEL, index)
        max_size = self.read_reg(regs.QUEUE_NUM_MAX)
        if max_size == 0:
            raise DriverError(f"queue {index} does not exist")
        size = max_size if size is None else size
        desc, avail, used = self.alloc_rings(size, desc, avail, used)
        self.write_reg(regs.QUEUE_NUM, size)
        for low, value in ((regs.QUEUE_DESC_LOW, desc), (regs.QUEUE_DRIVER_LOW, avail),
                           (regs.QUEUE_DEVICE_LOW, used)):
            self.write_reg(low, value & 0xFFFFFFFF)
            self.write_reg(low + 4, value >> 32)
        if ready:
            self.write_reg(regs.QUEUE_READY, 1)
        q = DriverQueue(self, index, max(size, 1), desc, avail, used)
        self.queues[index] = q
        return q

    def alloc_rings(self, size: int, desc: int | None = None, avail: int | None = None,
                    used: int | None = None) -> tuple[int, int, int]:
        """Place (unless given) and zero the three rings of a `size`-entry queue (§2.7.14)."""
        n = max(size, 1)
        desc = self.arena.alloc(DESC_SIZE * n, 4096) if desc is None else desc
        avail = self.arena.alloc(6 + 2 * n, 2) if avail is None else avail
        used = self.arena.alloc(6 + USED_ELEM_SIZE * n, 4096) if used is None else used
        self.arena.floor = self.arena.pos  # buffers may wrap, the rings stay
        for gpa, length in ((desc, DESC_SIZE * n), (avail, 6 + 2 * n), (used, 6 + USED_ELEM_SIZE * n)):
            if self.memory.check(gpa, length):
                self.memory.write(gpa, bytes(length))
        return desc, avail, used

    def driver_ok(self) -> None:
        self.set_status(regs.DRIVER_OK)

    def init(self, features: int | None = None, queue_sizes: dict[int, int] | None = None,
             num_queues: int | None = None) -> int:
        """The whole §3.1.1 sequence: negotiate, set up every queue, DRIVER_OK."""
        negotiated = self.negotiate(features)
        index = 0
        while num_queues is None or index < num_queues:
            self.write_reg(regs.QUEUE_SEL, index)
            if self.read_reg(regs.QUEUE_NUM_MAX) == 0:
                break
            self.setup_queue(index, (queue_sizes or {}).get(index))
            index += 1
        self.driver_ok()
        if self.status & regs.DEVICE_NEEDS_RESET:
            raise DriverError("device needs reset right after DRIVER_OK")
        return negotiated

    def queue(self, index: int) -> DriverQueue:
        return self.queues[index]

    @property
    def interrupt_status(self) -> int:
        return self.read_reg(regs.INTERRUPT_STATUS)

    def ack_interrupt(self) -> int:
        """Read and acknowledge InterruptStatus, as an interrupt handler does."""
        status = self.interrupt_status
        if status:
            self.write_reg(regs.INTERRUPT_ACK, status)
        return status

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & regs.DEVICE_NEEDS_RESET)

    # -- virtio-blk (§5.2.6) ------------------------------------------------------------------
    def blk_request(self, type_: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *,
                    indirect: bool = False, split_header: bool = False) -> BlkResult:
        """One request on queue 0: header (+ out data) readable, (in data +) status writable."""
        header = _BLK_HEADER.pack(type_, 0, sector)
        readable = [header[:8], header[8:]] if split_header else [header]
        if out:
            readable.append(out)
        writable = ([in_len] if in_len else []) + [1]
        done = self.queue(0).submit(readable, writable, indirect=indirect)
        data = done.writable_data(self.memory)
        return BlkResult(data[-1], data[:-1], done.length)

    def blk_read(self, sector: int, nbytes: int, **kw: bool) -> BlkResult:
        return self.blk_request(0, sector, in_len=nbytes, **kw)

    def blk_write(self, sector: int, data: bytes, **kw: bool) -> int:
        return self.blk_request(1, sector, out=data, **kw).status

    def blk_flush(self) -> int:
        return self.blk_request(4).status

    def blk_get_id(self) -> BlkResult:
        return self.blk_request(8, in_len=20)

    def blk_discard(self, segments: list[tuple[int, int, int]], *, write_zeroes: bool = False) -> int:
        """DISCARD (or WRITE_ZEROES) of (sector, num_sectors, flags) segments."""
        payload = b"".join(_BLK_SEGMENT.pack(*s) for s in segments)
        return self.blk_request(13 if write_zeroes else 11, out=payload).status

    # -- virtio-rng (§5.4) and virtio-console (§5.3) --------------------------------------------
    def rng_read(self, nbytes: int) -> bytes:
        done = self.queue(0).submit([], [nbytes])
        return done.writable_data(self.memory)[:done.length]

    def console_write(self, data: bytes) -> None:
        self.queue(1).submit([data], [])

    def console_post_rx(self, nbytes: int = 64, count: int = 1) -> None:
        """Post receive buffers on receiveq 0 and kick."""
        for _ in range(count):
            self.queue(0).add([], [nbytes])
        self.queue(0).kick()

    def console_read(self, timeout: float = 0.0) -> bytes:
        """What the device delivered into posted receive buffers so far."""
        q = self.queue(0)
        done = q.wait_used(1, timeout) if timeout else q.get_used()
        return b"".join(c.writable_data(self.memory)[:c.length] for c in done)


    # -- virtio-net (§5.1.6) --------------------------------------------------------------------
    def net_post_rx(self, size: int = NET_RX_BUFFER, count: int = 1, *, split: int = 0,
                    kick: bool = True) -> None:
        """Post `count` receive buffers of `size` bytes on receiveq 0 (each made of two
        descriptors cut at `split` if given: §2.6.4, any framing) and kick."""
        q = self.queue(0)
        for _ in range(count):
            q.add([], [split, size - split] if 0 < split < size else [size])
        if kick:
            q.kick()

    def net_send(self, frame: bytes, header: bytes = bytes(NET_HEADER_SIZE), *,
                 split_header: bool = False, timeout: float = 5.0) -> Completion:
        """Transmit header + frame on transmitq 1 and wait until the device has used it."""
        readable = [header[:5], header[5:], frame] if split_header else [header + frame]
        return self.queue(1).submit([b for b in readable if b], [], timeout=timeout)

    def net_ctrl(self, cls: int, command: int, data: bytes = b"") -> int:
        """A control queue command (§5.1.6.5, queue 2): the device's ack byte."""
        done = self.queue(2).submit([bytes([cls, command]) + data], [1])
        return done.writable_data(self.memory)[0]

    def net_recv(self, count: int = 1, timeout: float = 0.0) -> list[tuple[bytes, bytes]]:
        """Frames the device delivered, as (12-byte header, frame); waits up to `timeout` for
        `count` of them.  With MRG_RXBUF a frame spans `num_buffers` used buffers."""
        q = self.queue(0)
        deadline = time.monotonic() + timeout
        frames: list[tuple[bytes, bytes]] = []
        while True:
            self._net_rx += q.get_used()
            while self._net_rx:
                first = self._net_rx[0].writable_data(self.memory)[:self._net_rx[0].length]
                # A num_buffers of 0 (a device bug) is read as 1, so that the test sees the header.
                nbufs = int.from_bytes(first[10:12], "little") if len(first) >= NET_HEADER_SIZE else 1
                nbufs = max(nbufs, 1)
                if len(self._net_rx) < nbufs:
                    break
                parts = [c.writable_data(self.memory)[:c.length] for c in self._net_rx[:nbufs]]
                del self._net_rx[:nbufs]
                data = b"".join(parts)
                frames.append((data[:NET_HEADER_SIZE], data[NET_HEADER_SIZE:]))
            if len(frames) >= count or time.monotonic() >= deadline:
                return frames
            time.sleep(0.0005)


@dataclass
class BlkResult:
    status: int
    data: bytes
    used_len: int


_BLK_HEADER = struct.Struct("<IIQ")
_BLK_SEGMENT = struct.Struct("<QII")
