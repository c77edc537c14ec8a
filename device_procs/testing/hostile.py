"""Builders for hostile virtqueues: what a malicious or broken guest driver may put in RAM.

Each `publish_*` writes descriptors into a `DriverQueue` set up by `VirtioDriver`, publishes the
head and returns it; the caller kicks and checks that the device answers with an error status
or DEVICE_NEEDS_RESET, never a hang or an access outside RAM.  `setup_*` misconfigure a queue.
"""

from __future__ import annotations

from device_procs.virtio.queue import (DESC_SIZE, MAX_CHAIN_BYTES, MAX_INDIRECT_DESCRIPTORS,
                                       VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE)

from .driver import DriverQueue, VirtioDriver

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
# The core's virtio-mmio base (vmm_core.layout.VIRTIO_MMIO_BASE, checked by a unit test):
# device registers in the MMIO hole, never RAM.
MMIO_HOLE_ADDR = 0xD000_0000


def _scratch(q: DriverQueue, length: int = 512) -> int:
    return q.driver.arena.alloc(length)


def publish_loop(q: DriverQueue, length: int = 2) -> int:
    """A chain 0 → 1 → … → length-1 → 0 that never ends."""
    buf = _scratch(q)
    for i in range(length):
        q.write_desc(i, buf, 16, NEXT, (i + 1) % length)
    q.publish(0)
    return 0


def publish_self_loop_indirect(q: DriverQueue, entries: int = 4) -> int:
    """An indirect table whose last entry points back to its first."""
    buf, table = _scratch(q), _scratch(q, DESC_SIZE * entries)
    for i in range(entries):
        q.write_desc(i, buf, 16, NEXT, (i + 1) % entries, table=table)
    q.write_desc(0, table, DESC_SIZE * entries, INDIRECT)
    q.publish(0)
    return 0


def publish_buffer_at(q: DriverQueue, addr: int, length: int = 512, flags: int = WRITE) -> int:
    """One descriptor at `addr` (e.g. the MMIO hole, or past the end of RAM)."""
    q.write_desc(0, addr, length, flags)
    q.publish(0)
    return 0


def publish_straddling_ram_end(q: DriverQueue) -> int:
    """A buffer that starts in RAM and runs past its end."""
    end = q.memory.regions[0].end
    return publish_buffer_at(q, end - 256, 512)


def publish_indirect_in_indirect(q: DriverQueue) -> int:
    inner, outer = _scratch(q, DESC_SIZE), _scratch(q, DESC_SIZE)
    q.write_desc(0, _scratch(q), 16, WRITE, table=inner)
    q.write_desc(0, inner, DESC_SIZE, INDIRECT, table=outer)
    q.write_desc(0, outer, DESC_SIZE, INDIRECT)
    q.publish(0)
    return 0


def publish_indirect_table(q: DriverQueue, table_len: int, table_addr: int | None = None,
                           flags: int = INDIRECT) -> int:
    """An indirect descriptor with any table length/address (not a multiple of 16, huge, …)."""
    table = _scratch(q, max(table_len, 16)) if table_addr is None else table_addr
    if table_addr is None and table_len >= DESC_SIZE:
        q.write_desc(0, _scratch(q), 16, WRITE, table=table)
    q.write_desc(0, table, table_len, flags)
    q.publish(0)
    return 0


def publish_oversized_indirect(q: DriverQueue) -> int:
    return publish_indirect_table(q, DESC_SIZE * (MAX_INDIRECT_DESCRIPTORS + 1))


def publish_zero_length(q: DriverQueue) -> int:
    """A chain made only of zero-length descriptors."""
    q.write_desc(0, _scratch(q), 0, NEXT | WRITE, 1)
    q.write_desc(1, _scratch(q), 0, WRITE)
    q.publish(0)
    return 0


def publish_oversized_chain(q: DriverQueue) -> int:
    """Descriptors that are each in RAM but together describe more than MAX_CHAIN_BYTES."""
    length = min(q.memory.regions[0].end - 0x1000, 0xFFFF_F000)
    count = MAX_CHAIN_BYTES // length + 1
    if count > q.size:
        raise ValueError(f"a {q.size}-entry queue cannot hold a chain past {MAX_CHAIN_BYTES} bytes")
    for i in range(count):
        last = i == count - 1
        q.write_desc(i, 0x1000, length, WRITE | (0 if last else NEXT), 0 if last else i + 1)
    q.publish(0)
    return 0


def publish_head_out_of_table(q: DriverQueue) -> int:
    q.publish(q.size + 3)
    return q.size + 3


def publish_next_out_of_table(q: DriverQueue) -> int:
    q.write_desc(0, _scratch(q), 16, NEXT, q.size)
    q.publish(0)
    return 0


def publish_readable_after_writable(q: DriverQueue) -> int:
    q.write_desc(0, _scratch(q), 16, WRITE | NEXT, 1)
    q.write_desc(1, _scratch(q), 16, 0)
    q.publish(0)
    return 0


def publish_indirect_with_next(q: DriverQueue) -> int:
    table = _scratch(q, DESC_SIZE)
    q.write_desc(0, _scratch(q), 16, WRITE, table=table)
    q.write_desc(0, table, DESC_SIZE, INDIRECT | NEXT, 1)
    q.write_desc(1, _scratch(q), 16, WRITE)
    q.publish(0)
    return 0


def jump_avail_idx(q: DriverQueue) -> None:
    """Move the available idx further ahead than the queue has entries."""
    q.set_avail_idx(q.avail_idx + q.size + 1)


def setup_queue_not_power_of_two(d: VirtioDriver, index: int = 0, size: int = 100) -> DriverQueue:
    return d.setup_queue(index, size)


def setup_queue_in_mmio_hole(d: VirtioDriver, index: int = 0) -> DriverQueue:
    return d.setup_queue(index, 16, desc=MMIO_HOLE_ADDR)


def setup_queue_misaligned(d: VirtioDriver, index: int = 0) -> DriverQueue:
    base = d.arena.alloc(4096, 4096)
    return d.setup_queue(index, 16, desc=base + 8, avail=base + 1024, used=base + 2048)


def setup_queue_past_ram(d: VirtioDriver, index: int = 0) -> DriverQueue:
    """A used ring that starts in RAM and ends past it."""
    end = d.memory.regions[0].end
    return d.setup_queue(index, 16, used=end - 64)


# Every hostile chain, named: each must end in DEVICE_NEEDS_RESET with nothing completed.
CHAIN_CASES = [
    ("loop2", publish_loop),
    ("loop-full", lambda q: publish_loop(q, q.size)),
    ("indirect-loop", publish_self_loop_indirect),
    ("mmio-hole", lambda q: publish_buffer_at(q, MMIO_HOLE_ADDR)),
    ("beyond-ram", lambda q: publish_buffer_at(q, 1 << 48)),
    ("wrapping-addr", lambda q: publish_buffer_at(q, 0xFFFF_FFFF_FFFF_F000, 0xFFFF_FFFF)),
    ("straddle-ram-end", publish_straddling_ram_end),
    ("indirect-in-indirect", publish_indirect_in_indirect),
    ("indirect-len-24", lambda q: publish_indirect_table(q, 24)),
    ("indirect-len-0", lambda q: publish_indirect_table(q, 0)),
    ("indirect-in-hole", lambda q: publish_indirect_table(q, 16, table_addr=MMIO_HOLE_ADDR)),
    ("indirect-too-big", publish_oversized_indirect),
    ("oversized-chain", publish_oversized_chain),
    ("head-out", publish_head_out_of_table),
    ("next-out", publish_next_out_of_table),
    ("readable-after-writable", publish_readable_after_writable),
    ("indirect-with-next", publish_indirect_with_next),
    ("avail-idx-jump", jump_avail_idx),
]

# Queue misconfigurations, checked by the device when the driver sets DRIVER_OK.
QUEUE_SETUP_CASES = [
    ("not-pow2", setup_queue_not_power_of_two),
    ("mmio-hole", setup_queue_in_mmio_hole),
    ("misaligned", setup_queue_misaligned),
    ("past-ram", setup_queue_past_ram),
    ("above-max", lambda d: d.setup_queue(0, 512)),
    ("zero", lambda d: d.setup_queue(0, 0)),
]
