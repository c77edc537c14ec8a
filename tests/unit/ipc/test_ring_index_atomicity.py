"""The ring's indices must be published atomically across processes.

Regression: indices were written with struct.pack_into, which zero-fills the field before storing
it, so a peer polling at the wrong instant read 0 and declared the ring corrupt (a spurious
device failure every few seconds under load).  Two real processes hammer one ring here.
"""

import mmap
import os
import subprocess
import sys
import textwrap
import time

from ipc_protocol.ring import (Slot, initialize_ring, request_consumer, request_producer,
                               ring_bytes)

CAPACITY = 64
SECONDS = 1.5


def test_indices_never_read_torn_between_processes():
    size = ring_bytes(CAPACITY)
    fd = os.memfd_create("ring-test")
    os.ftruncate(fd, size)
    buf = mmap.mmap(fd, size)
    initialize_ring(buf, CAPACITY)
    # The child only consumes: every pop publishes its consumer index, which we poll below.
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import mmap, os, time
        from ipc_protocol.ring import request_consumer
        buf = mmap.mmap({fd}, {size})
        c = request_consumer(buf, {CAPACITY})
        end = time.monotonic() + {SECONDS + 1}
        while time.monotonic() < end:
            c.pop()
        """)], pass_fds=[fd], cwd=os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.abspath(__file__))))))
    try:
        producer = request_producer(buf, CAPACITY)
        pushed = 0
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            # free_slots() reads the peer's index and raises RemoteProtocolError if it looks corrupt.
            if producer.push(Slot.write(pushed, 0x50, b"\0\0\0\0")):
                pushed += 1
        assert pushed > 10_000, "the child did not consume: the test proved nothing"
    finally:
        child.kill()
        child.wait()
        os.close(fd)  # the mapping goes with `buf` (the ring ends still export views of it)
