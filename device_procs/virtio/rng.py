"""virtio-rng (VIRTIO 1.2 §5.4): entropy from the kernel CSPRNG into device-writable buffers."""

from __future__ import annotations

import os

from .device import VIRTIO_ID_RNG, VirtioDevice
from .queue import DescriptorChain

QUEUE_SIZE = 256
# §5.4.6.1: the device may write fewer bytes than offered; bounding each answer keeps one huge
# request from stalling the other queue work and from draining the host pool for nothing.
MAX_BYTES_PER_REQUEST = 64 * 1024


class RngDevice(VirtioDevice):
    """One requestq (index 0); no feature bits of its own and no config space (§5.4.3-4)."""

    device_type = VIRTIO_ID_RNG
    queue_max_sizes = [QUEUE_SIZE]

    def __init__(self) -> None:
        super().__init__()
        self.counters.update(requests=0, bytes=0)

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        self.counters["requests"] += 1
        # Device-readable buffers carry nothing for rng; they are ignored (§5.4.6).
        budget = MAX_BYTES_PER_REQUEST
        written = 0
        for view in chain.writable_views:
            n = min(len(view), budget - written)
            if n <= 0:
                break
            view[:n] = os.getrandom(n)
            written += n
        self.counters["bytes"] += written
        return written
